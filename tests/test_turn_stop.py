"""Spoken answers end the turn at once when the bot asked for them; partial ones wait.

Unit tests of :class:`bot.turn_stop.ExpectedAnswerUserTurnStopStrategy` inside Pipecat's
user aggregator, with Pipecat's ``run_test``; the turn analyzer is one that never judges
a turn complete (the way smart-turn judges many spoken dates), so a turn that ends here
ended on the caller's words. Plus the parser (:mod:`bot.expected_answers`), with
hypothesis over classes of input.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer, BaseTurnParams, EndOfTurnState
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InterimTranscriptionFrame,
    LLMContextFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bot.expected_answers import (
    AnswerKind,
    AnswerState,
    answer_state,
    ends_mid_sentence,
    expected_answers,
    is_complete_answer,
    words_to_digits,
)
from bot.turn_stop import (
    ExpectedAnswerUserTurnStopStrategy,
    SpeculativeUserTurnStopStrategy,
    last_bot_utterance,
)

DOB = frozenset({AnswerKind.DATE_OF_BIRTH})
ASK_DOB = "Thanks. To verify, could you tell me your date of birth?"


class UnsureTurnAnalyzer(BaseTurnAnalyzer):
    """A turn analyzer that never judges a turn complete (smart-turn on a spoken date)."""

    verdict = EndOfTurnState.INCOMPLETE

    def __init__(self) -> None:
        super().__init__(sample_rate=8000)
        self.cleared = 0

    @property
    def speech_triggered(self) -> bool:
        return False

    @property
    def params(self) -> BaseTurnParams:
        return BaseTurnParams()

    def append_audio(self, buffer: bytes, is_speech: bool) -> EndOfTurnState:
        return EndOfTurnState.INCOMPLETE

    async def analyze_end_of_turn(self) -> tuple[EndOfTurnState, None]:
        return self.verdict, None

    def clear(self) -> None:
        self.cleared += 1


class SureTurnAnalyzer(UnsureTurnAnalyzer):
    """A turn analyzer that judges every pause the end of the turn (smart-turn on a
    caller pausing between the groups of a number)."""

    verdict = EndOfTurnState.COMPLETE


class Turn:
    """The aggregator under test, its strategy, and when the caller's turn ended."""

    def __init__(self, bot_said: str | None, *, analyzer: BaseTurnAnalyzer | None = None) -> None:
        context = LLMContext()
        if bot_said is not None:
            context.add_message({"role": "assistant", "content": bot_said})
        self.strategy = ExpectedAnswerUserTurnStopStrategy.for_context(
            turn_analyzer=analyzer or UnsureTurnAnalyzer(), context=context
        )
        self.aggregator = LLMUserAggregator(
            context,
            params=LLMUserAggregatorParams(
                user_turn_strategies=UserTurnStrategies(stop=[self.strategy]),
                user_turn_stop_timeout=5.0,
            ),
        )
        self.stopped_at: float | None = None

        @self.aggregator.event_handler("on_user_turn_stopped")
        async def stopped(*args: object) -> None:
            self.stopped_at = self.stopped_at or time.monotonic()

    async def run(
        self, *texts: str, still_speaking: bool = False, then_wait: float = 0.6
    ) -> list[Frame]:
        """The caller says ``texts`` (then goes silent unless ``still_speaking``); then
        ``then_wait`` seconds pass."""
        frames: list[Frame] = [VADUserStartedSpeakingFrame(start_secs=0.2, timestamp=time.time())]
        frames += [
            TranscriptionFrame(text=t, user_id="caller", timestamp="now", finalized=True)
            for t in texts
        ]
        if not still_speaking:
            frames.append(VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time()))
        frames.append(SleepFrame(sleep=then_wait))
        down, _ = await run_test(self.aggregator, frames_to_send=frames)
        return list(down)

    @property
    def ended_on_the_words(self) -> bool:
        """The turn ended within 0.45 s of the caller going silent: on the words, not at the
        pipeline's end (0.6 s) or after a hold (1 s). Loose on purpose: CI is loaded."""
        if self.stopped_at is None or not self.silent_at:
            return False
        return self.stopped_at - self.silent_at < 0.45

    @property
    def silent_at(self) -> float:
        """When the strategy saw the caller's last VAD stop."""
        return self.strategy.silent_since


async def test_complete_date_of_birth_ends_the_turn_at_once() -> None:
    turn = Turn(ASK_DOB)
    down = await turn.run("April 12, 1985.")
    assert turn.ended_on_the_words
    assert turn.strategy.early_stops == 1
    context = next(f for f in down if isinstance(f, LLMContextFrame)).context
    assert context.get_messages()[-1] == {"role": "user", "content": "April 12, 1985."}


async def test_date_read_in_two_groups_ends_the_turn_when_the_year_arrives() -> None:
    turn = Turn(ASK_DOB)
    await turn.run("April twelfth", "nineteen eighty five")
    assert turn.ended_on_the_words
    assert turn.strategy.early_stops == 1


async def test_partial_date_keeps_waiting() -> None:
    turn = Turn(ASK_DOB)
    await turn.run("April twelfth")
    assert not turn.ended_on_the_words
    assert turn.strategy.early_stops == 0


async def test_same_words_without_the_question_keep_smart_turns_verdict() -> None:
    turn = Turn("Thanks for calling. How can I help you today?")
    await turn.run("April 12, 1985.")
    assert not turn.ended_on_the_words
    assert turn.strategy.early_stops == 0


async def test_no_early_stop_while_the_caller_is_still_speaking() -> None:
    turn = Turn(ASK_DOB)
    await turn.run("April 12, 1985", still_speaking=True)
    assert not turn.ended_on_the_words
    assert turn.strategy.early_stops == 0


async def test_partial_answer_is_held_open_even_when_smart_turn_says_complete() -> None:
    turn = Turn(ASK_DOB, analyzer=SureTurnAnalyzer())
    await turn.run("April twelfth")
    assert not turn.ended_on_the_words
    assert turn.strategy.holds == 1


async def test_held_partial_answer_ends_after_the_hold_when_nothing_more_comes() -> None:
    turn = Turn(ASK_DOB, analyzer=SureTurnAnalyzer())
    await turn.run("April twelfth", then_wait=2.5)
    assert turn.stopped_at is not None and turn.silent_at
    # Ended by the hold (about 1 s), not by the pipeline's end at 2.5 s.
    assert 0.9 <= turn.stopped_at - turn.silent_at < 2.0


async def test_caller_finishing_the_number_after_a_pause_is_one_turn() -> None:
    turn = Turn("And the ZIP code on the account?", analyzer=SureTurnAnalyzer())
    frames: list[Frame] = [
        VADUserStartedSpeakingFrame(start_secs=0.2, timestamp=time.time()),
        TranscriptionFrame(text="six oh six,", user_id="c", timestamp="now", finalized=True),
        VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time()),
        SleepFrame(sleep=0.4),
        VADUserStartedSpeakingFrame(start_secs=0.2, timestamp=time.time()),
        TranscriptionFrame(text="one four.", user_id="c", timestamp="now", finalized=True),
        VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time()),
        SleepFrame(sleep=0.6),
    ]
    down, _ = await run_test(turn.aggregator, frames_to_send=frames)
    contexts = [f for f in down if isinstance(f, LLMContextFrame)]
    assert len(contexts) == 1
    assert contexts[0].context.get_messages()[-1]["content"] == "six oh six, one four."
    assert turn.ended_on_the_words
    assert turn.strategy.holds == 1


async def test_words_stopping_mid_sentence_are_held_on_any_turn() -> None:
    turn = Turn("What is going on with the car?", analyzer=SureTurnAnalyzer())
    await turn.run("It makes a noise when I")
    assert not turn.ended_on_the_words
    assert turn.strategy.holds == 1


@pytest.mark.parametrize(
    ("text", "dangling"),
    [
        ("It makes a noise when I", True),
        ("I think I will, um,", True),
        ("Necesito una cita para", True),
        ("I need an oil change.", False),
        ("Yes.", False),
        ("I think so", False),
        ("", False),
    ],
)
def test_ends_mid_sentence(text: str, dangling: bool) -> None:
    assert ends_mid_sentence(text) is dangling


async def test_smart_turns_complete_verdict_stands_on_other_turns() -> None:
    turn = Turn("How can I help you today?", analyzer=SureTurnAnalyzer())
    await turn.run("I need an oil change")
    assert turn.ended_on_the_words
    assert turn.strategy.holds == 0


@pytest.mark.parametrize(
    ("bot_said", "caller_said"),
    [
        ("And what is the ZIP code on your account?", "six oh six one four"),
        ("Could you read me the last four of your VIN?", "one two three four"),
        ("I have Tuesday at 9 or Wednesday at 10:30. Which one works for you?", "Tuesday"),
        ("Shall I book that for you?", "yes please"),
        ("¿Me puede dar su fecha de nacimiento?", "12 de abril de 1985"),
    ],
)
async def test_other_expected_answers_end_the_turn(bot_said: str, caller_said: str) -> None:
    turn = Turn(bot_said)
    await turn.run(caller_said)
    assert turn.ended_on_the_words
    assert turn.strategy.early_stops == 1


def test_last_bot_utterance_skips_tool_call_messages() -> None:
    context = LLMContext()
    context.add_message({"role": "assistant", "content": ASK_DOB})
    context.add_message({"role": "user", "content": "hold on"})
    context.add_message({"role": "assistant", "tool_calls": [], "content": None})
    assert last_bot_utterance(context) == ASK_DOB
    assert last_bot_utterance(LLMContext()) == ""


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("April twelfth nineteen eighty five", True),
        ("my birthday is the twelfth of April, nineteen eighty-five", True),
        ("4/12/1985", True),
        ("April 12", False),
        ("April twelfth nineteen", False),
        ("nineteen eighty five", False),
        ("um", False),
    ],
)
def test_date_of_birth_parses(text: str, complete: bool) -> None:
    assert is_complete_answer(text, DOB) is complete


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("April twelfth", AnswerState.PARTIAL),
        ("six oh six", AnswerState.PARTIAL),
        ("six oh six one four", AnswerState.COMPLETE),
        ("April 12, 1985", AnswerState.COMPLETE),
        ("one two three four", AnswerState.UNKNOWN),  # a VIN's four, or most of a ZIP
        ("I don't remember", AnswerState.UNKNOWN),
    ],
)
def test_answer_state_when_any_factor_was_asked(text: str, state: AnswerState) -> None:
    kinds = expected_answers("Your date of birth, ZIP code, or the last four of your VIN?")
    assert answer_state(text, kinds) is state


def test_partial_date_is_not_taken_for_a_vin_or_zip() -> None:
    any_factor = expected_answers("Your date of birth, ZIP code, or the last four of your VIN?")
    assert any_factor == {AnswerKind.DATE_OF_BIRTH, AnswerKind.ZIP_CODE, AnswerKind.VIN_LAST4}
    assert not is_complete_answer("April twelfth nineteen", any_factor)
    assert not is_complete_answer("six oh six", any_factor)
    assert is_complete_answer("six oh six one four", any_factor)


def test_greeting_asks_for_nothing() -> None:
    assert expected_answers("Thanks for calling Sunrise Motors. How can I help you today?") == set()
    assert expected_answers("") == set()


_MONTH = st.sampled_from(["January", "March", "June", "October", "December"])


@settings(max_examples=200, deadline=None)
@given(month=_MONTH, day=st.integers(1, 28), year=st.integers(1930, 2008))
def test_any_spelled_out_date_is_complete_and_its_prefix_is_not(
    month: str, day: int, year: int
) -> None:
    assert is_complete_answer(f"{month} {day}, {year}", DOB)
    assert not is_complete_answer(f"{month} {day}", DOB)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_parser_takes_any_text(text: str) -> None:
    words_to_digits(text)
    kinds = expected_answers(text)
    for kind in AnswerKind:
        assert is_complete_answer(text, frozenset({kind})) in (True, False)
    assert kinds <= set(AnswerKind)


# --- speculative replies at the VAD stop ---------------------------------------------------


class SpeculativeTurn(Turn):
    """:class:`Turn` with :class:`SpeculativeUserTurnStopStrategy`."""

    def __init__(self, bot_said: str | None, *, analyzer: BaseTurnAnalyzer | None = None) -> None:
        super().__init__(bot_said, analyzer=analyzer)
        context = self.aggregator.context
        self.strategy = SpeculativeUserTurnStopStrategy.for_context(
            turn_analyzer=analyzer or SureTurnAnalyzer(), context=context
        )
        self.aggregator = LLMUserAggregator(
            context,
            params=LLMUserAggregatorParams(
                user_turn_strategies=UserTurnStrategies(stop=[self.strategy]),
                user_turn_stop_timeout=5.0,
            ),
        )

        @self.aggregator.event_handler("on_user_turn_stopped")
        async def stopped(*args: object) -> None:
            self.stopped_at = self.stopped_at or time.monotonic()


def _interim(text: str) -> InterimTranscriptionFrame:
    return InterimTranscriptionFrame(text=text, user_id="caller", timestamp="now")


def _final(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="now", finalized=True)


def _speaks() -> VADUserStartedSpeakingFrame:
    return VADUserStartedSpeakingFrame(start_secs=0.2, timestamp=time.time())


def _silent() -> VADUserStoppedSpeakingFrame:
    return VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time())


def _inferences(down: list[Frame]) -> list[LLMContextFrame]:
    return [f for f in down if isinstance(f, LLMContextFrame)]


async def test_reply_starts_at_the_vad_stop_and_the_matching_final_confirms_it() -> None:
    turn = SpeculativeTurn("How can I help you today?")
    frames: list[Frame] = [
        _speaks(),
        _interim("i need an oil change"),
        SleepFrame(sleep=0.05),  # system frames (the VAD's) overtake queued ones
        _silent(),
        SleepFrame(sleep=0.1),
        _final("I need an oil change."),
        SleepFrame(sleep=0.2),
    ]
    down, _ = await run_test(turn.aggregator, frames_to_send=frames)
    inferences = _inferences(list(down))
    # One inference only, the speculative one, on the interim's words, before the final.
    assert [f.speculation for f in inferences] == [True]
    assert inferences[0].context.get_messages()[-1]["content"] == "i need an oil change"
    assert (turn.strategy.speculations, turn.strategy.confirmed) == (1, 1)
    assert not any(isinstance(f, EagerEndOfTurnCancelFrame) for f in down)
    # The context records the committed transcript, not the interim.
    assert turn.aggregator.context.get_messages()[-1] == {
        "role": "user",
        "content": "I need an oil change.",
    }


async def test_caller_going_on_withdraws_the_reply_and_the_turn_is_answered_whole() -> None:
    turn = SpeculativeTurn("What's going on with the car?", analyzer=UnsureTurnAnalyzer())
    frames: list[Frame] = [
        _speaks(),
        _interim("it makes a noise"),
        SleepFrame(sleep=0.05),
        _silent(),
        SleepFrame(sleep=0.1),
        _speaks(),
        _final("It makes a noise when I press the brakes."),
        SleepFrame(sleep=0.1),
    ]
    down, up = await run_test(turn.aggregator, frames_to_send=frames)
    cancels = [f for f in [*down, *up] if isinstance(f, EagerEndOfTurnCancelFrame)]
    assert cancels, "the speculative reply was never withdrawn"
    assert (turn.strategy.speculations, turn.strategy.withdrawn) == (1, 1)
    # The speculated words never became a turn of their own in the context.
    users = [m["content"] for m in turn.aggregator.context.get_messages() if m["role"] == "user"]
    assert "it makes a noise" not in users
    assert users in ([], ["It makes a noise when I press the brakes."])


async def test_different_final_withdraws_the_reply_and_runs_a_fresh_one() -> None:
    turn = SpeculativeTurn("How can I help you today?")
    frames: list[Frame] = [
        _speaks(),
        _interim("i need an oil"),
        SleepFrame(sleep=0.05),
        _silent(),
        SleepFrame(sleep=0.1),
        _final("I need an oil change for my Camry."),
        SleepFrame(sleep=0.2),
    ]
    down, up = await run_test(turn.aggregator, frames_to_send=frames)
    inferences = _inferences(list(down))
    assert [f.speculation for f in inferences] == [True, False]
    assert inferences[1].context.get_messages()[-1]["content"] == (
        "I need an oil change for my Camry."
    )
    assert any(isinstance(f, EagerEndOfTurnCancelFrame) for f in [*down, *up])
    assert (turn.strategy.confirmed, turn.strategy.withdrawn) == (0, 1)


async def test_no_speculation_on_a_partial_answer() -> None:
    turn = SpeculativeTurn(ASK_DOB)
    frames: list[Frame] = [
        _speaks(),
        _final("April twelfth"),
        SleepFrame(sleep=0.05),
        _silent(),
        SleepFrame(sleep=0.2),
    ]
    await run_test(turn.aggregator, frames_to_send=frames)
    assert turn.strategy.speculations == 0
    assert turn.strategy.holds == 1

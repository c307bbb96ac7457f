"""End the caller's turn as soon as a complete spoken answer is in, when one was asked for.

Smart-turn judges "April twelfth nineteen eighty five" (or a ZIP code read in groups)
unfinished often enough that the bot waits out its long fallback in silence. When the
bot's last utterance asked for a date of birth, a ZIP code, the last four of a VIN, a
time among offered slots or a yes/no (:mod:`bot.expected_answers`), and the caller's
transcript already parses as a complete answer, :class:`ExpectedAnswerUserTurnStopStrategy`
ends the turn at once. A partial answer ("April twelfth...") gets the longer wait: the
turn stays open for the rest even when smart-turn judged it complete, which would cut a
caller reading digits in groups; so does any turn whose words stop on one no finished
sentence ends on ("It makes a noise when I ...", "um"). Otherwise it is Pipecat's
:class:`~pipecat.turns.user_stop.TurnAnalyzerUserTurnStopStrategy`, unchanged.

The early stop only ever happens after the VAD has reported the caller silent and with a
transcript in hand, the same conditions Pipecat's strategy needs; it never cuts a caller
who is still speaking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop import NormalizedMatch, TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_stop.eager_match_policy import EagerMatchPolicy

from bot.expected_answers import (
    AnswerKind,
    AnswerState,
    answer_state,
    ends_mid_sentence,
    expected_answers,
)

__all__ = [
    "PARTIAL_ANSWER_HOLD_SECS",
    "ExpectedAnswerUserTurnStopStrategy",
    "SpeculativeUserTurnStopStrategy",
    "last_bot_utterance",
]


def last_bot_utterance(context: LLMContext) -> str:
    """The text of the last assistant message in ``context`` ("" when there is none)."""
    for message in reversed(context.get_messages()):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        # An assistant message with only tool calls asks nothing: look further back.
    return ""


#: How long after the VAD's stop a partial answer ("April twelfth") holds the turn open
#: for the rest, even when the turn model judged it complete (caller pauses between the
#: groups of a number are mostly under a second).
PARTIAL_ANSWER_HOLD_SECS = 1.0


class ExpectedAnswerUserTurnStopStrategy(TurnAnalyzerUserTurnStopStrategy):
    """Pipecat's turn-analyzer stop strategy, knowing what answer the bot asked for.

    When the bot's last utterance asked for a date of birth, ZIP code, VIN last four, a
    time or a yes/no, and the caller is silent (VAD stop) with a transcript in hand:

    * a complete answer ends the turn at once, whatever the turn model says;
    * a partial answer ("April twelfth", "six oh six") keeps the turn open for
      :data:`PARTIAL_ANSWER_HOLD_SECS` even when the turn model judged it complete, so a
      caller reading digits in groups is not cut off between them; if nothing more
      comes, the turn ends then. Words that stop on a dangling word ("... when I",
      "um") are held the same way on any turn.

    On every other turn it is Pipecat's strategy, unchanged. Event handlers and frames are
    those of the parent class. ``early_stops`` and ``holds`` count the turns this strategy
    ended early and the partial answers it held open.
    """

    def __init__(
        self,
        *,
        turn_analyzer: BaseTurnAnalyzer,
        expected: Callable[[], frozenset[AnswerKind]],
        partial_hold_secs: float = PARTIAL_ANSWER_HOLD_SECS,
        **kwargs,
    ) -> None:
        """Build the strategy.

        Args:
            turn_analyzer: The per-call smart-turn analyzer.
            expected: Returns what the bot's last utterance asked for; called when the
                caller stops speaking (cheap: a few regular expressions).
            partial_hold_secs: How long a partial answer holds the turn open.
            **kwargs: Passed to :class:`TurnAnalyzerUserTurnStopStrategy`.
        """
        super().__init__(turn_analyzer=turn_analyzer, **kwargs)
        self._expected = expected
        self._partial_hold_secs = partial_hold_secs
        self._heard: list[str] = []
        self._hold_task: asyncio.Task | None = None
        self._hold_expired = False
        self._silent_since = 0.0
        self.early_stops = 0
        self.holds = 0

    @classmethod
    def for_context(
        cls, *, turn_analyzer: BaseTurnAnalyzer, context: LLMContext
    ) -> ExpectedAnswerUserTurnStopStrategy:
        """A strategy that reads the expected answer off the call's LLM context."""
        return cls(
            turn_analyzer=turn_analyzer,
            expected=lambda: expected_answers(last_bot_utterance(context)),
        )

    @property
    def silent_since(self) -> float:
        """Monotonic time of the caller's last VAD stop (0.0 before the first)."""
        return self._silent_since

    async def _reset(self) -> None:
        await super()._reset()
        self._heard = []

    async def _discard_pending_end_of_turn(self) -> None:
        # Runs at turn boundaries and whenever the caller speaks again.
        await super()._discard_pending_end_of_turn()
        await self._cancel_hold()
        self._hold_expired = False

    async def cleanup(self) -> None:
        """Stop the hold timer with the strategy."""
        await self._cancel_hold()
        await super().cleanup()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Note the caller's words, let Pipecat's strategy judge the frame, then check for
        a complete answer."""
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._heard.append(frame.text.strip())
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._silent_since = time.monotonic()
        result = await super().process_frame(frame)
        if isinstance(frame, (TranscriptionFrame, VADUserStoppedSpeakingFrame)):
            await self._complete_if_answered()
        return result

    async def trigger_user_turn_stopped(
        self, *, enable_user_speaking_frames: bool | None = None
    ) -> None:
        """End the turn, unless the caller is midway through an answer the bot asked for."""
        if self._holding_for_the_rest():
            return
        await self._cancel_hold()
        await self._end_turn(enable_user_speaking_frames=enable_user_speaking_frames)

    async def _end_turn(self, *, enable_user_speaking_frames: bool | None) -> None:
        """Fire the turn end (inference and finalization), as Pipecat's strategy does."""
        await super().trigger_user_turn_stopped(
            enable_user_speaking_frames=enable_user_speaking_frames
        )

    def _state(self) -> AnswerState:
        if not self._heard:
            return AnswerState.UNKNOWN
        heard = " ".join(self._heard)
        state = answer_state(heard, self._expected())
        if state is AnswerState.UNKNOWN and ends_mid_sentence(heard):
            return AnswerState.PARTIAL  # "It makes a noise when I ...": hold for the rest
        return state

    async def _complete_if_answered(self) -> None:
        """Mark the turn complete when the caller is silent and has answered in full."""
        if self._turn_complete or self._vad_user_speaking or not self._vad_stopped:
            return
        if self._state() is not AnswerState.COMPLETE:
            return
        self.early_stops += 1
        logger.debug(f"{self}: complete answer, ending the turn")
        self._turn_complete = True
        await self._maybe_trigger_user_turn_stopped()

    def _holding_for_the_rest(self) -> bool:
        """Whether a partial answer holds the turn open (arming the hold the first time)."""
        if self._hold_expired or self._vad_user_speaking:
            return False
        if self._state() is not AnswerState.PARTIAL:
            return False
        # The hold counts from the caller going silent: a turn that smart-turn already
        # kept open that long is not held again.
        left = self._silent_since + self._partial_hold_secs - time.monotonic()
        if left <= 0:
            return False
        if self._hold_task is None:
            self.holds += 1
            logger.debug(f"{self}: partial answer, holding the turn for the rest")
            self._hold_task = self.task_manager.create_task(
                self._hold_then_stop(left), f"{self}::_hold_then_stop"
            )
        return True

    async def _hold_then_stop(self, secs: float) -> None:
        """After the hold, end the turn on what was said (the caller said no more)."""
        try:
            await asyncio.sleep(secs)
        except asyncio.CancelledError:
            return
        self._hold_task = None
        self._hold_expired = True
        if self._turn_complete and not self._vad_user_speaking:
            await self.trigger_user_turn_stopped()

    async def _cancel_hold(self) -> None:
        if self._hold_task is not None:
            task, self._hold_task = self._hold_task, None
            await self.task_manager.cancel_task(task)


class SpeculativeUserTurnStopStrategy(ExpectedAnswerUserTurnStopStrategy):
    """:class:`ExpectedAnswerUserTurnStopStrategy` that starts the reply at the VAD's stop.

    When the VAD reports the caller silent, the words heard so far (finals plus the
    latest interim) go to the LLM at once, speculatively, while smart-turn and the STT's
    final transcript are still on their way. Pipecat holds that reply in the LLM service
    (``SpeculationGate``) until the turn ends: if the committed transcript matches the
    speculated words (``NormalizedMatch``: case and punctuation aside) the held reply is
    released and no second inference runs; otherwise (the caller went on, or the final
    transcript differs) it is withdrawn with ``EagerEndOfTurnCancelFrame`` and never
    reaches the TTS or the context. A speculative reply that wants a tool is withdrawn by
    Pipecat too (tools never run speculatively), and the turn is answered normally.

    ``speculations``, ``confirmed`` and ``withdrawn`` count what happened.
    """

    def __init__(self, *, match_policy: EagerMatchPolicy | None = None, **kwargs) -> None:
        """Build the strategy.

        Args:
            match_policy: When a committed transcript still matches the speculated one
                (default: Pipecat's ``NormalizedMatch``).
            **kwargs: Passed to :class:`ExpectedAnswerUserTurnStopStrategy`.
        """
        super().__init__(**kwargs)
        self._match_policy = match_policy or NormalizedMatch()
        self._interim = ""
        self._speculation: UserTurnSpeculation | None = None
        self.speculations = 0
        self.confirmed = 0
        self.withdrawn = 0

    @classmethod
    def for_context(
        cls, *, turn_analyzer: BaseTurnAnalyzer, context: LLMContext
    ) -> SpeculativeUserTurnStopStrategy:
        """A strategy that reads the expected answer off the call's LLM context."""
        return cls(
            turn_analyzer=turn_analyzer,
            expected=lambda: expected_answers(last_bot_utterance(context)),
        )

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Track interims, then as the parent; speculate when the caller goes silent."""
        if isinstance(frame, InterimTranscriptionFrame):
            self._interim = frame.text.strip()
        elif isinstance(frame, TranscriptionFrame):
            self._interim = ""
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            # Withdrawn elsewhere (the LLM service wanted a tool): nothing left to confirm.
            if self._speculation is not None:
                self._speculation = None
                self.withdrawn += 1
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            # Before smart-turn runs (in the parent), so the reply overlaps its verdict.
            await self._speculate()
        return await super().process_frame(frame)

    async def _speculate(self) -> None:
        """Run the reply on the words so far, unless one is already in flight."""
        if self._speculation is not None:
            return
        text = " ".join([*self._heard, self._interim]).strip()
        if not text or self._hold_task is not None:
            return
        if answer_state(text, self._expected()) is AnswerState.PARTIAL or ends_mid_sentence(text):
            return  # the caller is midway through: the reply would be wasted
        self._speculation = UserTurnSpeculation(text=text)
        self.speculations += 1
        logger.debug(f"{self}: speculating at the VAD stop")
        await self.trigger_user_turn_inference_triggered(speculation=self._speculation)

    async def _end_turn(self, *, enable_user_speaking_frames: bool | None) -> None:
        speculation, self._speculation = self._speculation, None
        if speculation is None:
            await super()._end_turn(enable_user_speaking_frames=enable_user_speaking_frames)
            return
        if self._match_policy.matches(speculation.text, " ".join(self._heard)):
            self.confirmed += 1
            await self.trigger_user_turn_finalized(
                enable_user_speaking_frames=enable_user_speaking_frames,
                confirms_speculation=True,
            )
            return
        self.withdrawn += 1
        await self.trigger_user_turn_speculation_cancelled()
        await super()._end_turn(enable_user_speaking_frames=enable_user_speaking_frames)

    async def _discard_pending_end_of_turn(self) -> None:
        # The caller speaks again (or a turn boundary): a reply in flight answers words
        # that are no longer the whole turn.
        await super()._discard_pending_end_of_turn()
        if self._speculation is not None:
            self._speculation = None
            self.withdrawn += 1
            await self.trigger_user_turn_speculation_cancelled()

    async def _reset(self) -> None:
        await super()._reset()
        self._interim = ""

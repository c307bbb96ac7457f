"""Barge-in policy: backchannels, minimum speech, protected disclosure, normal turns."""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InterimTranscriptionFrame,
    InterruptionFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    StartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    UserBackchannelFrame,
    UserSpeakingFrame,
    UserStartedSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.services.tts_service import TTSService
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from core.metrics import sample
from processors.barge_in import BackchannelClassifier, BargeInUserTurnStartStrategy


def _aggregator(strategy: BargeInUserTurnStartStrategy) -> tuple[LLMUserAggregator, LLMContext]:
    context = LLMContext()
    agg = LLMUserAggregator(
        context,
        params=LLMUserAggregatorParams(
            user_turn_strategies=UserTurnStrategies(
                start=[strategy],
                stop=[SpeechTimeoutUserTurnStopStrategy(user_speech_timeout=0.1)],
            ),
        ),
    )
    return agg, context


def _t(text: str) -> TranscriptionFrame:
    return TranscriptionFrame(text=text, user_id="caller", timestamp="now")


def _i(text: str) -> InterimTranscriptionFrame:
    return InterimTranscriptionFrame(text=text, user_id="caller", timestamp="now")


def _count(frames: list[Frame], cls: type) -> int:
    return sum(isinstance(f, cls) for f in frames)


# A finished first utterance (the disclosure), then the bot speaking again.
SECOND_UTTERANCE: list[Frame] = [
    BotStartedSpeakingFrame(),
    BotStoppedSpeakingFrame(),
    BotStartedSpeakingFrame(),
]


def test_classifier() -> None:
    c = BackchannelClassifier()
    for text in ["uh-huh", "Okay.", "yeah, yeah", "Mm-hmm", "mhm", "Yep!", "okay right", "Uh huh."]:
        assert c.is_backchannel(text), text
    for text in ["wait", "okay but Thursday", "yeah yeah yeah yeah", "right now please", ""]:
        assert not c.is_backchannel(text), text


async def test_backchannel_while_bot_speaks_does_not_interrupt() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=2)
    agg, context = _aggregator(strategy)
    before = sample("voice_agent_backchannels_ignored_total")
    interruptions = sample("voice_agent_interruptions_total")
    down, _ = await run_test(
        agg,
        frames_to_send=[
            *SECOND_UTTERANCE,
            VADUserStartedSpeakingFrame(),
            _i("uh"),
            _i("uh-huh"),
            _t("Uh-huh."),
            VADUserStoppedSpeakingFrame(),
            _i("okay"),
            _t("Okay, yeah."),
            SleepFrame(sleep=1.2),
        ],
    )
    assert _count(down, InterruptionFrame) == 0
    assert _count(down, UserStartedSpeakingFrame) == 0
    assert _count(down, UserBackchannelFrame) == 2
    assert _count(down, LLMContextFrame) == 0
    assert context.get_messages() == []
    assert strategy.backchannels_ignored == 2 and strategy.interruptions == 0
    assert sample("voice_agent_backchannels_ignored_total") == before + 2
    assert sample("voice_agent_interruptions_total") == interruptions


async def test_real_speech_interrupts_the_bot() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=2)
    agg, context = _aggregator(strategy)
    before = sample("voice_agent_interruptions_total")
    down, up = await run_test(
        agg,
        frames_to_send=[
            *SECOND_UTTERANCE,
            VADUserStartedSpeakingFrame(),
            _i("wait"),  # one word: not yet
            _i("wait, can we"),  # enough words: the interruption goes out
            # STT finalizes later; a final already queued behind the triggering interim
            # would be dropped with the rest of the aggregator's queue by the interruption.
            SleepFrame(sleep=0.05),
            _t("Wait, can we do Thursday instead?"),
            VADUserStoppedSpeakingFrame(),
            SleepFrame(sleep=1.2),
        ],
    )
    assert _count(down, InterruptionFrame) == 1
    assert _count(up, InterruptionFrame) == 1  # reaches the STT/transport side too
    assert _count(down, UserStartedSpeakingFrame) == 1
    # The interruption went out before the final transcript was even in.
    kinds = [type(f) for f in down]
    assert kinds.index(InterruptionFrame) < kinds.index(LLMContextFrame)
    assert strategy.interruptions == 1
    assert sample("voice_agent_interruptions_total") == before + 1
    assert context.get_messages()[-1] == {
        "role": "user",
        "content": "Wait, can we do Thursday instead?",
    }


async def test_single_word_is_below_minimum() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=2)
    agg, _ = _aggregator(strategy)
    down, _ = await run_test(
        agg,
        frames_to_send=[*SECOND_UTTERANCE, _i("no"), _t("No."), SleepFrame(sleep=0.2)],
    )
    assert _count(down, InterruptionFrame) == 0
    assert strategy.interruptions == 0


async def test_duration_minimum_interrupts_short_content() -> None:
    now = [100.0]

    class Tick(UserSpeakingFrame):
        """VAD 'still speaking' tick; the fake clock moves one second when the strategy sees it."""

    strategy = BargeInUserTurnStartStrategy(min_words=5, min_speech_secs=0.6, clock=lambda: now[0])
    original = strategy.process_frame

    async def process(frame: Frame):
        if isinstance(frame, Tick):
            now[0] += 1.0
        return await original(frame)

    strategy.process_frame = process  # type: ignore[method-assign]
    agg, _ = _aggregator(strategy)
    down, _ = await run_test(
        agg,
        frames_to_send=[
            *SECOND_UTTERANCE,
            VADUserStartedSpeakingFrame(),
            _i("mm"),
            Tick(),  # 1 s of backchannel-only sound: no
            _i("hold"),  # 1 content word, but too short so far: no
            Tick(),  # 2 s with a content word: interrupt
            SleepFrame(sleep=0.1),
        ],
    )
    assert _count(down, InterruptionFrame) == 1
    assert strategy.interruptions == 1


async def test_speech_during_disclosure_cannot_interrupt() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=2)
    agg, context = _aggregator(strategy)
    down, _ = await run_test(
        agg,
        frames_to_send=[
            BotStartedSpeakingFrame(),  # the disclosure
            VADUserStartedSpeakingFrame(),
            _i("wait can we do"),
            _t("Wait, can we do Thursday instead?"),
            VADUserStoppedSpeakingFrame(),
            SleepFrame(sleep=1.2),
        ],
    )
    assert _count(down, InterruptionFrame) == 0
    assert _count(down, UserStartedSpeakingFrame) == 0
    assert context.get_messages() == []
    assert strategy.ignored_during_disclosure == 1
    assert strategy.protecting


async def test_after_disclosure_the_bot_can_be_interrupted() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=2)
    agg, _ = _aggregator(strategy)
    down, _ = await run_test(
        agg,
        frames_to_send=[
            BotStartedSpeakingFrame(),
            _i("wait can we do"),
            BotStoppedSpeakingFrame(),  # disclosure done
            BotStartedSpeakingFrame(),
            _i("wait can we do"),
            SleepFrame(sleep=0.2),
        ],
    )
    assert _count(down, InterruptionFrame) == 1
    assert not strategy.protecting


async def test_speech_while_bot_silent_starts_a_normal_turn() -> None:
    strategy = BargeInUserTurnStartStrategy(min_words=3)
    agg, context = _aggregator(strategy)
    interruptions = sample("voice_agent_interruptions_total")
    down, _ = await run_test(
        agg,
        frames_to_send=[
            BotStartedSpeakingFrame(),
            BotStoppedSpeakingFrame(),
            VADUserStartedSpeakingFrame(),  # turn starts on voice, like Pipecat's default
            _t("Yes."),  # a one-word backchannel-like answer is a real answer now
            VADUserStoppedSpeakingFrame(),
            SleepFrame(sleep=1.2),
        ],
    )
    assert _count(down, UserStartedSpeakingFrame) == 1
    assert _count(down, LLMContextFrame) == 1
    assert context.get_messages() == [{"role": "user", "content": "Yes."}]
    # Not a barge-in (the bot was silent), so not counted as one.
    assert sample("voice_agent_interruptions_total") == interruptions
    assert strategy.interruptions == 0


class _FakeTTS(TTSService):
    """TTS without word timestamps (like DeepgramTTSService): 1 s of audio per sentence."""

    def __init__(self, **kwargs):
        super().__init__(push_start_frame=True, push_stop_frames=True, sample_rate=8000, **kwargs)

    async def run_tts(self, text: str, context_id: str):
        for _ in range(10):
            yield TTSAudioRawFrame(
                audio=b"\x00\x00" * 800, sample_rate=8000, num_channels=1, context_id=context_id
            )


class _RealTimeOutput(BaseOutputTransport):
    """Output transport that 'plays' audio in real time, like the Twilio websocket."""

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        await asyncio.sleep(len(frame.audio) / 16000)
        return True


async def test_interrupted_turn_keeps_only_what_was_played() -> None:
    """Pipecat's own trimming: the assistant context gets only sentences whose audio played.

    Without word timestamps the TTS queues each sentence's TTSTextFrame behind its audio in
    the output transport; an interruption drops the queued audio and text, so the
    half-played second sentence and the unplayed third never reach the assistant context.
    """
    context = LLMContext()
    pair = LLMContextAggregatorPair(context)
    output = _RealTimeOutput(TransportParams(audio_out_enabled=True, audio_out_sample_rate=8000))
    messages: list = []

    @pair.assistant().event_handler("on_assistant_turn_stopped")
    async def on_stopped(_agg, message) -> None:
        messages.append(message)

    await run_test(
        Pipeline([pair.user(), _FakeTTS(), output, pair.assistant()]),
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("First sentence is played. "),
            LLMTextFrame("Second sentence is cut off. "),
            LLMTextFrame("Third never starts."),
            LLMFullResponseEndFrame(),
            SleepFrame(sleep=1.5),  # first sentence (1 s) played, second half-way
            InterruptionFrame(),
            SleepFrame(sleep=0.5),
        ],
        pipeline_params=PipelineParams(audio_out_sample_rate=8000),
    )
    assert context.get_messages() == [{"role": "assistant", "content": "First sentence is played."}]
    assert messages and messages[0].interrupted is True

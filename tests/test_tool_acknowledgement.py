"""ToolAcknowledgement: "Let me check." once per caller turn when a reply needs tools.

Each test runs Pipecat's real machinery (``OpenAILLMService`` against the OpenAI wire fake,
its function-call runner, a TTS service, a real-time output transport and the assistant
context aggregator) around the processor, through ``pipecat.tests.utils.run_test``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pipecat.frames.frames import (
    FunctionCallResultProperties,
    InterruptionFrame,
    LLMContextFrame,
    LLMRunFrame,
    StartFrame,
    TTSAudioRawFrame,
    UserStartedSpeakingFrame,
    UserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.tts_service import TTSService
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

from bot.flows import ACKNOWLEDGED_TOOLS, UNACKNOWLEDGED_TOOLS
from bot.i18n import FIXED_SENTENCES, text, translator
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from processors.tool_acknowledgement import ACK_PHRASE, ToolAcknowledgement
from tests.fakes.openai_chat import FakeOpenAI, Step, call_tool, call_tools, say
from tools.registry import TOOLS

RATE = 8000
ANSWER = "You're verified, Maria. I have Tuesday at nine for the oil change."


class _FakeTTS(TTSService):
    """TTS without word timestamps (like Deepgram's): 1 s of audio per sentence."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(push_start_frame=True, push_stop_frames=True, sample_rate=RATE, **kwargs)
        self._by_context: dict[str, list[str]] = {}
        self.started: list[float] = []  # when each utterance reached the TTS

    @property
    def texts(self) -> list[str]:
        """What each utterance (TTS context: a reply or a spoken phrase) said."""
        return [" ".join(t.strip() for t in parts) for parts in self._by_context.values()]

    async def run_tts(self, text: str, context_id: str):
        if context_id not in self._by_context:
            self.started.append(time.monotonic())
        self._by_context.setdefault(context_id, []).append(text)
        for _ in range(10):
            yield TTSAudioRawFrame(
                audio=b"\x10\x00" * 800, sample_rate=RATE, num_channels=1, context_id=context_id
            )


class _RealTimeOutput(BaseOutputTransport):
    """Plays audio in real time, like the Twilio websocket; counts the speech played."""

    def __init__(self, params: TransportParams, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.played = 0.0  # seconds

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: Any) -> bool:
        secs = len(frame.audio) / (2 * RATE)
        await asyncio.sleep(secs)
        if any(frame.audio):  # not the transport's own silence
            self.played += secs
        return True


class _Bot:
    """LLM → acknowledgement → TTS → output → assistant aggregator, with tool handlers."""

    def __init__(self, fake: FakeOpenAI, *, tool_secs: float = 0.0) -> None:
        self.context = LLMContext(
            messages=[{"role": "user", "content": "Hi, I need an oil change."}]
        )
        self.pair = LLMContextAggregatorPair(self.context)
        self.llm = OpenAILLMService(
            api_key="sk-test",
            base_url=fake.base_url,
            settings=OpenAILLMService.Settings(model="gpt-4o"),
        )
        self.ack = ToolAcknowledgement(tools=ACKNOWLEDGED_TOOLS)
        self.tts = _FakeTTS()
        self.output = _RealTimeOutput(
            TransportParams(audio_out_enabled=True, audio_out_sample_rate=RATE)
        )
        self.ran: list[str] = []
        self.tool_secs = tool_secs
        for name in TOOLS:
            self.llm.register_function(name, self._handler)

    async def _handler(self, params: FunctionCallParams) -> None:
        self.ran.append(params.function_name)
        await asyncio.sleep(self.tool_secs)
        await params.result_callback({"ok": True, "tool": params.function_name})

    def pipeline(self) -> Pipeline:
        return Pipeline([self.llm, self.ack, self.tts, self.output, self.pair.assistant()])

    def caller_says(self, words: str) -> list[Any]:
        """A caller turn as it reaches the LLM: the turn starts, then the context runs."""
        self.context.add_message({"role": "user", "content": words})
        return [
            UserStartedSpeakingFrame(),
            UserStoppedSpeakingFrame(),
            LLMContextFrame(self.context),
        ]

    def said_in_context(self) -> list[str]:
        return [
            str(m.get("content"))
            for m in self.context.get_messages()
            if m.get("role") == "assistant" and m.get("content")
        ]


async def _run(bot: _Bot, frames: list[Any]) -> None:
    await run_test(
        bot.pipeline(),
        frames_to_send=frames,
        pipeline_params=PipelineParams(audio_out_sample_rate=RATE),
    )


def _requested_text(fake: FakeOpenAI) -> str:
    return " ".join(str(m.get("content")) for body in fake.requests for m in body["messages"])


async def test_said_once_for_three_round_trips_and_never_in_the_context() -> None:
    script: list[Step] = [
        call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
        call_tool("get_vehicle_history", {}),
        call_tool("check_availability", {"service_type": "oil_change"}),
        say(ANSWER),
    ]
    async with FakeOpenAI(script) as fake:
        bot = _Bot(fake)
        await _run(bot, [*bot.caller_says("April twelfth, 1985."), SleepFrame(sleep=3.0)])
    assert bot.ran == ["verify_customer", "get_vehicle_history", "check_availability"]
    assert bot.tts.texts == [ACK_PHRASE, ANSWER]  # before the answer, once
    assert bot.ack.spoken == 1
    # The context (and every request the model got) holds the answer, never the phrase.
    assert bot.said_in_context() == [ANSWER]
    assert len(fake.requests) == 4 and ACK_PHRASE not in _requested_text(fake)
    # The phrase (1 s of audio) did not hold the chain: the first result went back to the
    # model while it played (bot audio holds the frames queued behind it).
    assert fake.request_times[1] - fake.request_times[0] < 0.5


async def test_a_slow_tool_is_acknowledged_before_its_result() -> None:
    script: list[Step] = [call_tool("check_availability", {"service_type": "oil_change"})]
    async with FakeOpenAI([*script, say("I have Tuesday at nine.")]) as fake:
        bot = _Bot(fake, tool_secs=1.0)
        await _run(bot, [*bot.caller_says("When can you do an oil change?"), SleepFrame(2.5)])
    assert bot.tts.texts == [ACK_PHRASE, "I have Tuesday at nine."]
    # Said at the hold deadline, not after the tool's second: the result queued behind it.
    assert bot.tts.started[0] - fake.request_times[0] < 0.6
    assert bot.tts.started[1] - fake.request_times[0] > 1.0


async def test_parallel_tool_calls_are_one_round_trip_and_one_acknowledgement() -> None:
    script: list[Step] = [
        call_tools(
            [
                ("verify_customer", {"date_of_birth": "1985-04-12"}),
                ("check_availability", {"service_type": "oil_change"}),
            ]
        ),
        say(ANSWER),
    ]
    async with FakeOpenAI(script) as fake:
        bot = _Bot(fake)
        await _run(bot, [*bot.caller_says("April twelfth, 1985."), SleepFrame(sleep=2.5)])
    assert sorted(bot.ran) == ["check_availability", "verify_customer"]
    assert len(fake.requests) == 2  # both results went back in one request
    assert bot.tts.texts == [ACK_PHRASE, ANSWER]


async def test_a_run_sent_after_the_result_is_not_held_behind_the_phrase() -> None:
    """As Pipecat Flows does on a node transition: the result itself runs nothing, and a
    callback then sends the run down the pipeline, through the output transport. Had the
    phrase (1 s of audio) been said right behind the result, the run would wait for it to
    play; said when the next request starts, it plays while the model thinks."""
    script: list[Step] = [
        call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
        say(ANSWER),
    ]
    async with FakeOpenAI(script) as fake:
        bot = _Bot(fake)

        async def transition() -> None:
            await asyncio.sleep(0.03)  # Flows sets the next node first
            await bot.ack.queue_frame(LLMRunFrame())

        async def handler(params: FunctionCallParams) -> None:
            bot.ran.append(params.function_name)
            await params.result_callback(
                {"ok": True},
                properties=FunctionCallResultProperties(
                    run_llm=False, on_context_updated=transition
                ),
            )

        bot.llm.register_function("verify_customer", handler)
        await _run(bot, [*bot.caller_says("April twelfth, 1985."), SleepFrame(sleep=3.0)])
    assert bot.ran == ["verify_customer"]
    assert len(fake.requests) == 2
    assert fake.request_times[1] - fake.request_times[0] < 0.8  # not behind 1 s of phrase
    assert bot.tts.texts == [ACK_PHRASE, ANSWER]
    assert bot.said_in_context() == [ANSWER]


async def test_no_acknowledgement_when_the_model_speaks_first_or_calls_a_control_tool() -> None:
    script: list[Step] = [
        call_tool("check_availability", {"service_type": "oil_change"}, text="Sure, one sec."),
        call_tool("check_availability", {"service_type": "oil_change", "date_from": "2026-12-01"}),
        say("I have Tuesday at nine."),
        call_tool("transfer_to_advisor", {"reason": "wants a person"}),
        say("Connecting you now."),
        say("No tools needed for that."),
    ]
    async with FakeOpenAI(script) as fake:
        bot = _Bot(fake)
        await _run(
            bot,
            [
                # The model said something before its tools: nothing more, on either trip.
                *bot.caller_says("When can you take my car?"),
                SleepFrame(sleep=3.0),
                # A call-control tool is no reason to say "Let me check."
                *bot.caller_says("Can I talk to a person?"),
                SleepFrame(sleep=2.0),
                # A plain answer.
                *bot.caller_says("What are your hours?"),
                SleepFrame(sleep=1.5),
            ],
        )
    assert bot.ack.spoken == 0
    assert ACK_PHRASE not in bot.tts.texts
    assert bot.tts.texts[0] == "Sure, one sec."


async def test_an_interruption_cuts_the_phrase_and_the_next_turn_gets_its_own() -> None:
    script: list[Step] = [
        call_tool("check_availability", {"service_type": "oil_change"}),
        call_tool("check_availability", {"service_type": "tire_rotation"}),
        say("I have Tuesday at nine for the tire rotation."),
    ]
    async with FakeOpenAI(script) as fake:
        bot = _Bot(fake, tool_secs=1.5)
        await _run(
            bot,
            [
                *bot.caller_says("When can you do an oil change?"),
                SleepFrame(sleep=0.5),  # the phrase (1 s of audio) is playing, the tool runs
                InterruptionFrame(),  # the caller talks over it
                *bot.caller_says("Actually, a tire rotation."),
                SleepFrame(sleep=3.5),
            ],
        )
    # The first turn's tool was cancelled; the second turn was acknowledged on its own.
    assert bot.ran == ["check_availability", "check_availability"]
    assert bot.tts.texts == [
        ACK_PHRASE,
        ACK_PHRASE,
        "I have Tuesday at nine for the tire rotation.",
    ]
    assert bot.ack.spoken == 2
    # The interrupted phrase stopped playing: less than its second, then two whole
    # sentences (the second phrase and the answer).
    assert 2.0 <= bot.output.played < 2.8
    assert ACK_PHRASE not in " ".join(bot.said_in_context())
    assert ACK_PHRASE not in _requested_text(fake)


def test_every_tool_is_classified_and_the_phrase_is_translated() -> None:
    """A new tool must be put in one of the two sets; the phrase has a Spanish version."""
    assert set(ACKNOWLEDGED_TOOLS).isdisjoint(UNACKNOWLEDGED_TOOLS)
    assert set(ACKNOWLEDGED_TOOLS) | set(UNACKNOWLEDGED_TOOLS) == set(TOOLS)
    assert {"end_call", "transfer_to_advisor", "opt_out"} <= set(UNACKNOWLEDGED_TOOLS)
    assert text("tool_ack", "en") == ACK_PHRASE and "tool_ack" in FIXED_SENTENCES
    translate = translator(load_profile(DEFAULT_PROFILE), lambda: "es")
    assert translate(ACK_PHRASE) == text("tool_ack", "es") != ACK_PHRASE

"""Pipeline assembly: the one seam the Twilio route, the WebRTC route and the tests use.

transport in → Deepgram STT → user context aggregator (VAD, smart turn) → OpenAI LLM
with the tools → Deepgram TTS → transport out → assistant context aggregator.

Phone audio stays at 8 kHz end to end (pipeline, STT and TTS), so nothing is resampled
on the phone path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from loguru import logger
from pipecat.frames.frames import EndFrame, TTSSpeakFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transcriptions.language import Language
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_mute import FunctionCallUserMuteStrategy
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner

from bot import live_calls
from bot.flows import CallFlow
from bot.prompts import greeting, render_system_prompt
from bot.turn_models import new_turn_analyzer, new_vad_analyzer
from core import metrics
from core.pii import mask_phone
from core.resources import AppResources
from crm import calls as crm_calls
from processors.barge_in import BargeInUserTurnStartStrategy
from processors.latency import LatencyObserver
from processors.session_snapshot import (
    SessionSnapshotProcessor,
    SnapshotStore,
    session_snapshot,
)
from processors.spoken_text import SpokenTextAligner
from tools.console import make_tool_context
from tools.context import CallSession
from tools.customers import identify_caller
from tools.handoff import is_open

PHONE_SAMPLE_RATE = 8000
APOLOGY_TRANSFER = "I'm sorry, I'm having trouble on my side right now."
APOLOGY_CALLBACK = (
    "I'm sorry, I'm having trouble on my side right now, and our advisors are away. "
    "I've asked one to call you back when we open. Goodbye."
)
IDLE_PROMPT = "Are you still there?"
IDLE_GOODBYE = "I haven't heard anything, so I'll let you go. Please call back any time. Goodbye."


class CallControl(Protocol):
    """Telephony side of a call (Twilio REST for phone calls)."""

    async def transfer(self, number: str) -> None:
        """Redirect the live call to ``number``; the media stream then ends."""
        ...


@dataclass
class CallOptions:
    """Knobs of one call's pipeline (the defaults are for the phone)."""

    sample_rate: int = PHONE_SAMPLE_RATE
    user_idle_timeout: float = 8.0
    idle_timeout_secs: float = 300.0
    extra_processors_after_stt: list[FrameProcessor] = field(default_factory=list)
    extra_processors_after_output: list[FrameProcessor] = field(default_factory=list)
    observers: list[Any] = field(default_factory=list)
    on_worker: Callable[[PipelineWorker], Awaitable[None] | None] | None = None


class OpenAISharedClientLLMService(OpenAILLMService):
    """Pipecat's OpenAI LLM service on the process's shared ``AsyncOpenAI`` client.

    Args:
        client: The shared client; ``None`` falls back to Pipecat's client per service.
        **kwargs: Passed to :class:`OpenAILLMService`.
    """

    def __init__(self, *, client: Any = None, **kwargs: Any) -> None:
        self._shared_client = client
        super().__init__(**kwargs)

    def create_client(self, *args: Any, **kwargs: Any) -> Any:
        """The shared client when there is one."""
        if self._shared_client is not None:
            return self._shared_client
        return super().create_client(*args, **kwargs)


def _services(resources: AppResources, system_prompt: str, sample_rate: int):
    settings = resources.settings
    settings.require("OPENAI_API_KEY", "DEEPGRAM_API_KEY")
    assert settings.deepgram_api_key is not None and settings.openai_api_key is not None
    stt = DeepgramSTTService(
        api_key=settings.deepgram_api_key.get_secret_value(),
        base_url=settings.deepgram_stt_url or "",
        sample_rate=sample_rate,
        settings=DeepgramSTTService.Settings(
            model=settings.deepgram_stt_model,
            language=Language.EN,
            smart_format=True,
            punctuate=True,
            interim_results=True,
            keyterm=resources.profile.speech_keyterms(),
        ),
    )
    tts = DeepgramTTSService(
        api_key=settings.deepgram_api_key.get_secret_value(),
        base_url=settings.deepgram_tts_url or "wss://api.deepgram.com",
        sample_rate=sample_rate,
        encoding="linear16",
        settings=DeepgramTTSService.Settings(voice=settings.deepgram_tts_voice),
    )
    llm = OpenAISharedClientLLMService(
        client=resources.clients.openai() if resources.clients else None,
        api_key=settings.openai_api_key.get_secret_value(),
        base_url=settings.openai_base_url,
        settings=OpenAILLMService.Settings(
            model=settings.openai_model, system_instruction=system_prompt, temperature=0.3
        ),
    )
    return stt, llm, tts


async def run_call(
    *,
    transport: BaseTransport,
    session: CallSession,
    resources: AppResources,
    call_control: CallControl | None = None,
    options: CallOptions | None = None,
    now: Callable[[], datetime] | None = None,
) -> CallSession:
    """Assemble and run the pipeline of one call until it ends.

    Args:
        transport: Transport of the call (Twilio websocket, SmallWebRTC, test transport).
        session: The call's session (caller number from the telephony layer).
        resources: Process resources (pool, Redis, profile, settings).
        call_control: Telephony control for transfers; without it a transfer ends the call
            after the transfer sentence.
        options: Pipeline knobs.
        now: Clock for prompts and tools (tests); real time when omitted.

    Returns:
        The session, with outcome and transcript filled in.
    """
    options = options or CallOptions()
    ctx = make_tool_context(resources, session)
    if now is not None:
        ctx.now = now
    clock = now or (lambda: datetime.now(UTC))
    profile = resources.profile

    async with resources.db.connection() as conn:
        await crm_calls.start_call(
            conn, call_sid=session.call_sid, direction=session.direction, scenario=session.scenario
        )
    if session.customer_id is None:
        await identify_caller(ctx)
    logger.info(
        f"call {session.call_sid} {session.direction}/{session.scenario} from "
        f"{mask_phone(session.caller_phone)} starting"
    )

    system_prompt = render_system_prompt(
        session.scenario, profile=profile, session=session, now=clock()
    )
    stt, llm, tts = _services(resources, system_prompt, options.sample_rate)
    settings = resources.settings
    latency = LatencyObserver(call_sid=session.call_sid)
    snapshots = SessionSnapshotProcessor(
        call_sid=session.call_sid,
        store=SnapshotStore(resources.redis, ttl_secs=settings.snapshot_ttl_secs),
        provider=lambda: session_snapshot(
            session, latency, last_turns=settings.snapshot_transcript_turns
        ),
    )
    barge_in = BargeInUserTurnStartStrategy(
        min_words=settings.barge_in_min_words,
        min_speech_secs=settings.barge_in_min_speech_secs,
        max_backchannel_words=settings.barge_in_max_backchannel_words,
        protect_first_utterance=settings.barge_in_protect_disclosure,
    )
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=new_vad_analyzer(),
            user_turn_strategies=UserTurnStrategies(
                start=[barge_in],
                stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=new_turn_analyzer())],
            ),
            user_mute_strategies=[FunctionCallUserMuteStrategy()],
            user_idle_timeout=options.user_idle_timeout,
        ),
    )
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            *options.extra_processors_after_stt,
            aggregators.user(),
            llm,
            tts,
            SpokenTextAligner(),  # sentence text behind its audio: interruptions trim it
            transport.output(),
            snapshots,
            *options.extra_processors_after_output,
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=options.sample_rate,
            audio_out_sample_rate=options.sample_rate,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
        observers=[latency, *options.observers],
        enable_rtvi=False,
        idle_timeout_secs=options.idle_timeout_secs,
    )
    state = {"failed": False, "idle_prompts": 0, "transferred": False}

    async def transfer() -> None:
        if call_control is None:
            logger.info(f"call {session.call_sid}: no telephony for transfer; ending")
            await worker.queue_frame(EndFrame())
            return
        try:
            await call_control.transfer(profile.advisor_transfer_number)
            state["transferred"] = True
            session.outcome = "transferred"
        except Exception as exc:
            logger.error(f"call {session.call_sid}: transfer failed: {type(exc).__name__}")
            session.outcome = "failed"
            await worker.queue_frames([TTSSpeakFrame(APOLOGY_CALLBACK), EndFrame()])

    flow = CallFlow(
        ctx=ctx,
        scenario=session.scenario,
        greeting=greeting(session.scenario, profile=profile, session=session),
        transfer=transfer,
    )
    from pipecat.flows import FlowManager

    manager = FlowManager(
        worker=worker,
        llm=llm,
        context_aggregator=aggregators,
        global_functions=flow.global_functions(),
    )
    flow.manager = manager

    tasks: set[asyncio.Task] = set()

    async def start_flow() -> None:
        await manager.initialize(flow.initial_node())
        session.flow_node = manager.current_node

    @transport.event_handler("on_client_connected")
    async def on_connected(_transport, _client) -> None:
        # Setting the first node waits until the greeting has been played. It runs as
        # its own task so a caller hanging up during the greeting is not stuck behind it
        # (the transport waits for its event handlers before it can shut down).
        task = asyncio.create_task(start_flow(), name=f"flow-start-{session.call_sid}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    @transport.event_handler("on_client_disconnected")
    async def on_disconnected(_transport, _client) -> None:
        for task in list(tasks):
            task.cancel()
        await worker.cancel(reason="caller disconnected")

    @aggregators.user().event_handler("on_user_turn_stopped")
    async def on_user_turn(_agg, _strategy, message) -> None:
        if getattr(message, "content", None):
            session.transcript.append({"role": "caller", "text": message.content})
        state["idle_prompts"] = 0

    @aggregators.assistant().event_handler("on_assistant_turn_stopped")
    async def on_bot_turn(_agg, message) -> None:
        if message.content:
            session.transcript.append(
                {"role": "bot", "text": message.content, "interrupted": message.interrupted}
            )
        session.flow_node = manager.current_node

    @aggregators.user().event_handler("on_user_turn_idle")
    async def on_idle(_agg) -> None:
        state["idle_prompts"] += 1
        if state["idle_prompts"] == 1:
            await worker.queue_frame(TTSSpeakFrame(IDLE_PROMPT))
        elif state["idle_prompts"] == 2:
            if session.outcome is None:
                session.outcome = "abandoned"
            await worker.queue_frames([TTSSpeakFrame(IDLE_GOODBYE), EndFrame()])

    @worker.event_handler("on_pipeline_error")
    async def on_error(_worker, frame) -> None:
        # Any service error mid-call (LLM, STT or TTS socket, database): the caller hears
        # an apology and goes to a person. Pipecat's Deepgram STT says it will reconnect
        # after a dropped socket, but that is not guaranteed to happen in time, and a
        # caller who cannot be heard must not be left talking to nobody.
        if state["failed"]:
            return
        state["failed"] = True
        logger.error(f"call {session.call_sid}: service failure: {frame.error}")
        session.outcome = "failed"
        if is_open(profile, clock()):
            # The apology first, then the transfer node's own sentence and the redirect.
            await worker.queue_frame(TTSSpeakFrame(APOLOGY_TRANSFER))
            await manager.set_node_from_config(flow.transfer_node())
        else:
            async with resources.db.connection() as conn:
                await crm_calls.add_callback_request(
                    conn,
                    call_sid=session.call_sid,
                    customer_id=session.customer_id,
                    phone=session.caller_phone,
                    reason="service failure during call",
                )
            session.outcome = "callback_requested"
            await worker.queue_frames([TTSSpeakFrame(APOLOGY_CALLBACK), EndFrame()])

    if options.on_worker is not None:
        maybe = options.on_worker(worker)
        if maybe is not None:
            await maybe

    runner = WorkerRunner(handle_sigint=False)
    metrics.call_started()
    live_calls.register(session, worker)  # a draining server ends it with a goodbye
    try:
        await runner.add_workers(worker)
        await runner.run()
    finally:
        live_calls.unregister(session.call_sid)
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        session.turn_metrics = latency.to_json()
        await _finish(resources, session)
        metrics.call_finished(session.direction, session.outcome)
    return session


async def _finish(resources: AppResources, session: CallSession) -> None:
    if session.outcome is None:
        session.outcome = "abandoned" if not session.transcript else "info"
    summary = (
        f"{session.direction} {session.scenario} call; outcome {session.outcome}; "
        f"verified={session.verified}; appointments={session.appointment_ids}"
    )
    try:
        async with resources.db.connection() as conn:
            await crm_calls.finish_call(
                conn,
                call_sid=session.call_sid,
                customer_id=session.customer_id,
                verified=session.verified,
                outcome=session.outcome,
                transcript=session.transcript,
                turn_metrics=session.turn_metrics,
                summary=summary,
                appointment_ids=session.appointment_ids,
            )
    except Exception as exc:
        logger.error(f"call {session.call_sid}: could not record call end: {type(exc).__name__}")
    logger.info(f"call {session.call_sid} ended: {session.outcome}")

"""Pipeline assembly: the one seam the Twilio route, the WebRTC route and the tests use.

transport in → Deepgram STT → user context aggregator (VAD, smart turn) → OpenAI LLM
with the tools → Deepgram TTS → transport out → assistant context aggregator.

Phone audio stays at 8 kHz end to end (pipeline, STT and TTS), so nothing is resampled
on the phone path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from loguru import logger
from openai import APIConnectionError, InternalServerError
from pipecat.frames.frames import EndFrame, LLMUpdateSettingsFrame, TTSSpeakFrame
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

from bot.failures import CallRescue
from bot.flows import CallFlow
from bot.prompts import greeting, render_system_prompt
from bot.turn_models import new_turn_analyzer, new_vad_analyzer
from core import metrics
from core.pii import mask_phone
from core.resources import AppResources
from crm import calls as crm_calls
from processors.barge_in import BargeInUserTurnStartStrategy
from processors.dead_air import DeadAirGuard
from processors.latency import LatencyObserver
from processors.session_snapshot import (
    SessionSnapshotProcessor,
    SnapshotStore,
    session_snapshot,
)
from processors.spoken_text import SpokenTextAligner
from tools.context import CallSession, make_tool_context
from tools.customers import identify_caller

PHONE_SAMPLE_RATE = 8000
IDLE_PROMPT = "Are you still there?"
IDLE_GOODBYE = "I haven't heard anything, so I'll let you go. Please call back any time. Goodbye."


class CallControl(Protocol):
    """Telephony side of a call (Twilio REST for phone calls)."""

    async def transfer(self, number: str) -> None:
        """Redirect the live call to ``number``; the media stream then ends."""
        ...

    async def redirect(self, twiml: str) -> None:
        """Replace the live call's TwiML (e.g. ``<Say>``); the media stream then ends."""
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


class LLMTimeoutError(TimeoutError):
    """The LLM produced no token within ``LLM_TIMEOUT_SECS``."""


#: Pause before the one retry of a failed LLM request (5xx or connection error).
LLM_RETRY_DELAY_SECS = 0.2


class _TimedStream:
    """A chat-completion stream whose every chunk must arrive within ``timeout`` seconds.

    Args:
        stream: The SDK's ``AsyncStream``.
        first: Its first chunk, already received (``None`` when it was empty).
        timeout: Longest gap between chunks.
    """

    def __init__(self, stream: Any, first: Any, timeout: float) -> None:
        self._stream = stream
        self._first = first
        self._timeout = timeout

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Any]:
        if self._first is None:
            return
        yield self._first
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    chunk = await self._stream.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise LLMTimeoutError(f"no LLM token for {self._timeout:g} s") from None
            yield chunk

    async def close(self) -> None:
        """Close the HTTP response."""
        await self._stream.close()


class OpenAISharedClientLLMService(OpenAILLMService):
    """Pipecat's OpenAI LLM service on the process's shared client, with a deadline.

    A reply's first token must arrive within ``token_timeout`` seconds of the request
    (retries included), and each later token within ``token_timeout`` of the previous
    one; otherwise the completion fails with :class:`LLMTimeoutError` and the call's
    failure policy takes over. A 5xx or connection error is retried once after
    :data:`LLM_RETRY_DELAY_SECS` when the deadline allows (and the API does not say
    ``x-should-retry: false``); a 429 is not retried (its ``Retry-After`` is longer than a
    caller waits).

    Args:
        client: The shared client; ``None`` falls back to Pipecat's client per service.
        token_timeout: Seconds; see above.
        **kwargs: Passed to :class:`OpenAILLMService`.
    """

    def __init__(self, *, client: Any = None, token_timeout: float = 5.0, **kwargs: Any) -> None:
        self._shared_client = client
        self._token_timeout = token_timeout
        super().__init__(**kwargs)

    def create_client(self, *args: Any, **kwargs: Any) -> Any:
        """The shared client when there is one."""
        if self._shared_client is not None:
            return self._shared_client
        return super().create_client(*args, **kwargs)

    async def get_chat_completions(self, context: LLMContext) -> Any:
        """Start a streamed completion and wait (bounded) for its first chunk."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._token_timeout
        retried = False
        while True:
            stream = None
            try:
                async with asyncio.timeout_at(deadline):
                    stream = await super().get_chat_completions(context)
                    try:
                        first = await stream.__anext__()
                    except StopAsyncIteration:
                        first = None
                return _TimedStream(stream, first, self._token_timeout)
            except TimeoutError:
                await _close_quietly(stream)
                raise LLMTimeoutError(
                    f"no LLM token within {self._token_timeout:g} s of the request"
                ) from None
            except (APIConnectionError, InternalServerError) as exc:
                await _close_quietly(stream)
                if retried or not _retryable(exc) or loop.time() + LLM_RETRY_DELAY_SECS >= deadline:
                    raise
                retried = True
                logger.warning(f"{self}: retrying the completion after {type(exc).__name__}")
                await asyncio.sleep(LLM_RETRY_DELAY_SECS)
            except BaseException:
                await _close_quietly(stream)
                raise


def _retryable(exc: Exception) -> bool:
    """Whether the API allows a retry (OpenAI says no with ``x-should-retry: false``)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    return headers.get("x-should-retry", "").lower() != "false"


async def _close_quietly(stream: Any) -> None:
    if stream is not None:
        try:
            await stream.close()
        except Exception as exc:
            logger.debug(f"closing an abandoned LLM stream failed: {type(exc).__name__}")


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
        token_timeout=settings.llm_timeout_secs,
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
    customer_id: int | None = None,
) -> CallSession:
    """Assemble and run the pipeline of one call until it ends.

    Failures never silence the caller (see :mod:`bot.failures`): with Postgres down at
    the start the caller hears an apology and is transferred (or told what happens next
    after hours) while the call record waits in :class:`core.pending.PendingWrites`; a
    service failing mid-call gets an apology and a transfer or callback.

    Args:
        transport: Transport of the call (Twilio websocket, SmallWebRTC, test transport).
        session: The call's session (caller number from the telephony layer).
        resources: Process resources (pool, Redis, profile, settings).
        call_control: Telephony control for transfers; without it a transfer ends the call
            after the transfer sentence.
        options: Pipeline knobs.
        now: Clock for prompts and tools (tests); real time when omitted.
        customer_id: The CRM customer an outbound call is for (loaded as the call starts;
            the session's caller-ID match is decided against its phone).

    Returns:
        The session, with outcome and transcript filled in.
    """
    options = options or CallOptions()
    ctx = make_tool_context(resources, session)
    if now is not None:
        ctx.now = now
    clock = now or (lambda: datetime.now(UTC))
    profile = resources.profile
    settings = resources.settings
    incidents: list[str] = []

    prompt_session = dataclasses.replace(session)  # who we know before the lookup
    system_prompt = render_system_prompt(
        session.scenario, profile=profile, session=prompt_session, now=clock()
    )
    stt, llm, tts = _services(resources, system_prompt, options.sample_rate)
    latency = LatencyObserver(call_sid=session.call_sid)
    snapshot_store = SnapshotStore(
        resources.redis, ttl_secs=settings.snapshot_ttl_secs, prefix=settings.redis_key_prefix
    )
    snapshots = SessionSnapshotProcessor(
        call_sid=session.call_sid,
        store=snapshot_store,
        provider=lambda: session_snapshot(
            session, latency, last_turns=settings.snapshot_transcript_turns
        ),
    )
    dead_air = DeadAirGuard(hold_secs=settings.dead_air_hold_secs)
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
            dead_air,  # speaks while the LLM (or a tool) keeps the caller waiting
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
    state = {"idle_prompts": 0, "flow_started": False, "failing": False}

    async def transfer() -> None:
        if call_control is None:
            logger.info(f"call {session.call_sid}: no telephony for transfer; ending")
            await worker.queue_frame(EndFrame())
            return
        try:
            await call_control.transfer(profile.advisor_transfer_number)
            session.outcome = "transferred"
        except Exception as exc:
            logger.error(f"call {session.call_sid}: transfer failed: {type(exc).__name__}")
            await rescue.transfer_failed()

    flow = CallFlow(
        ctx=ctx,
        scenario=session.scenario,
        greeting="",  # set once the caller ID lookup is done
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

    async def to_transfer_node() -> None:
        if state["flow_started"]:
            await manager.set_node_from_config(flow.transfer_node())
        else:
            state["flow_started"] = True
            await manager.initialize(flow.transfer_node())

    rescue = CallRescue(
        session=session,
        profile=profile,
        pending=resources.pending,
        clock=clock,
        queue_frames=worker.queue_frames,
        transfer_node=to_transfer_node,
        call_control=call_control,
        incidents=incidents,
    )

    tasks: set[asyncio.Task] = set()  # cancelled when the caller hangs up
    rescues: set[asyncio.Task] = set()  # finished (bounded) even after a hang-up

    def spawn(coro: Awaitable[None], name: str, group: set[asyncio.Task]) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{session.call_sid}")
        group.add(task)
        task.add_done_callback(group.discard)

    async def start_flow() -> None:
        # The greeting's first sentence is the same whoever calls; when the database is
        # slow to answer it is said while we wait, so the caller never hears silence.
        hello = _first_sentence(
            greeting(session.scenario, profile=profile, session=_anonymous(session))
        )
        said_hello = False
        try:
            database_up = await asyncio.wait_for(asyncio.shield(opening), OPENING_WAIT_SECS)
        except TimeoutError:
            await worker.queue_frame(TTSSpeakFrame(hello))
            said_hello = True
            database_up = await opening
        logger.info(
            f"call {session.call_sid} {session.direction}/{session.scenario} from "
            f"{mask_phone(session.caller_phone)} starting"
            + ("" if database_up else " without the database")
        )
        if not database_up:
            await rescue.database_down_at_start(hello="" if said_hello else hello)
            return
        if session.customer_id != prompt_session.customer_id:
            # The lookup found the caller: the prompt says whom caller ID matched.
            prompt = render_system_prompt(
                session.scenario, profile=profile, session=session, now=clock()
            )
            await worker.queue_frame(
                LLMUpdateSettingsFrame(
                    delta=OpenAILLMService.Settings(system_instruction=prompt), service=llm
                )
            )
        flow.greeting = greeting(session.scenario, profile=profile, session=session)
        if said_hello:
            rest = flow.greeting.removeprefix(hello)
            if rest == flow.greeting:  # personalised ("Hi Maria, thanks..."): the plain one
                rest = greeting(
                    session.scenario, profile=profile, session=_anonymous(session)
                ).removeprefix(hello)
            flow.greeting = rest.strip()
        if state["flow_started"]:  # a failure already moved the call to the transfer
            return
        state["flow_started"] = True
        await manager.initialize(flow.initial_node())
        session.flow_node = manager.current_node

    @transport.event_handler("on_client_connected")
    async def on_connected(_transport, _client) -> None:
        # Setting the first node waits until the greeting has been played. It runs as
        # its own task so a caller hanging up during the greeting is not stuck behind it
        # (the transport waits for its event handlers before it can shut down).
        spawn(start_flow(), "flow-start", tasks)

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
        if not rescue.rescued:
            await dead_air.arm()

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

    tts_health = _TTSHealth(tts)

    @worker.event_handler("on_pipeline_error")
    async def on_error(_worker, frame) -> None:
        # Any service error mid-call (LLM, STT or TTS socket, database): the caller hears
        # an apology and goes to a person. Pipecat's Deepgram STT says it will reconnect
        # after a dropped socket, but that is not guaranteed to happen in time, and a
        # caller who cannot be heard must not be left talking to nobody. When the TTS is
        # what failed and does not come back at once, Twilio says the sentence instead.
        if rescue.rescued or state["failing"]:
            return
        state["failing"] = True
        source = getattr(frame, "processor", None)
        what = _service_name(source, stt=stt, llm=llm, tts=tts)
        logger.error(f"call {session.call_sid}: {what} failure: {frame.error}")
        await dead_air.disarm()
        alive = tts_health.alive if source is tts else None
        if source is tts:
            tts_health.mark_failed()
        spawn(rescue.service_failed(what=what, tts_alive=alive), "rescue", rescues)

    if options.on_worker is not None:
        maybe = options.on_worker(worker)
        if maybe is not None:
            await maybe

    runner = WorkerRunner(handle_sigint=False)
    metrics.call_started()
    # The call's row and the caller ID lookup run while the pipeline starts (Deepgram
    # sockets); the flow waits for them before the greeting. With Postgres down they
    # give up after DB_TIMEOUT_SECS and the caller hears the apology instead.
    opening = asyncio.ensure_future(_open_call(resources, session, ctx, customer_id))
    try:
        await runner.add_workers(worker)
        await runner.run()
    finally:
        if not opening.done():
            opening.cancel()
        with contextlib.suppress(BaseException):
            await opening
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if rescues:
            # Bounded: their database writes time out and queue instead.
            await asyncio.wait(list(rescues), timeout=5)
        session.turn_metrics = latency.to_json()
        await _finish(resources, session, incidents=incidents)
        metrics.call_finished(session.direction, session.outcome)
        if snapshots.failures:
            # Redis was down at some point: make sure the call leaves the active set.
            _finish_snapshot_later(snapshot_store, session.call_sid)
    return session


#: Background tasks that take finished calls out of Redis's active set once Redis is back.
_SNAPSHOT_FINISHERS: set[asyncio.Task] = set()
SNAPSHOT_FINISH_RETRY_SECS = 600.0


def _finish_snapshot_later(store: SnapshotStore, call_sid: str) -> None:
    """Mark the call finished in Redis, retrying in the background while Redis is down.

    The snapshot processor's own last write gives up after a couple of seconds; without
    this a call that ended during a Redis outage stayed in ``voice_agent:calls:active``.
    """

    async def finish() -> None:
        delay = 0.5
        deadline = time.monotonic() + SNAPSHOT_FINISH_RETRY_SECS
        while True:
            try:
                await asyncio.wait_for(store.finish(call_sid), 2)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    logger.error(
                        f"call {call_sid}: still listed as active in Redis, which stayed "
                        f"unreachable ({type(exc).__name__})"
                    )
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    task = asyncio.ensure_future(finish())
    task.set_name(f"snapshot-finish-{call_sid}")
    _SNAPSHOT_FINISHERS.add(task)
    task.add_done_callback(_SNAPSHOT_FINISHERS.discard)


class _TTSHealth:
    """Whether the TTS socket came back after an error (Pipecat reconnects it at once).

    Args:
        tts: The call's TTS service.
    """

    def __init__(self, tts: Any) -> None:
        self._tts = tts
        self._refused_at = 0.0
        self._failed_at = 0.0

        @tts.event_handler("on_connection_error")
        async def on_connection_error(_service, _error) -> None:
            self._refused_at = time.monotonic()

    def mark_failed(self) -> None:
        """An error came from the TTS (its reconnect may already have been refused)."""
        self._failed_at = time.monotonic()

    def _socket_open(self) -> bool:
        # Pipecat 1.14 keeps the socket in ``_websocket``; a new, open one means the
        # reconnect after the drop worked.
        from websockets.protocol import State

        ws = getattr(self._tts, "_websocket", None)
        return ws is not None and getattr(ws, "state", None) is State.OPEN

    async def alive(self) -> bool:
        """Wait briefly for the TTS to reconnect; False when it is refused or too slow."""
        from bot.failures import TTS_RECOVERY_SECS

        deadline = time.monotonic() + TTS_RECOVERY_SECS
        await asyncio.sleep(0.05)  # the error is reported before the reconnect starts
        while time.monotonic() < deadline:
            # A refusal within a second before the error reached us belongs to this drop
            # (the reconnect is tried, and refused, before the error is handled).
            if self._refused_at > self._failed_at - 1.0:
                return False
            if self._socket_open():
                return True
            await asyncio.sleep(0.02)
        return False


def _service_name(source: Any, *, stt: Any, llm: Any, tts: Any) -> str:
    if source is stt:
        return "speech recognition"
    if source is llm:
        return "llm"
    if source is tts:
        return "speech synthesis"
    return type(source).__name__ if source is not None else "pipeline"


#: How long the greeting waits for the call's database work before its first sentence is
#: said anyway (the rest follows once the database answers or gives up).
OPENING_WAIT_SECS = 0.4


def _anonymous(session: CallSession) -> CallSession:
    """A copy of the session that knows nothing about the caller (for the plain greeting)."""
    return CallSession(
        call_sid=session.call_sid,
        caller_phone=session.caller_phone,
        direction=session.direction,
        scenario=session.scenario,
    )


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text


async def _open_call(
    resources: AppResources, session: CallSession, ctx: Any, customer_id: int | None
) -> bool:
    """Record the call's start and find the customer; False when Postgres is down."""
    if not await _record_call_start(resources, session):
        return False
    try:
        async with asyncio.timeout(resources.settings.db_timeout_secs):
            if customer_id is not None:
                await _load_customer(resources, session, customer_id)
            elif session.customer_id is None:
                await identify_caller(ctx)
    except Exception as exc:
        # The caller can still be found and verified by the tools later.
        logger.warning(f"call {session.call_sid}: customer lookup failed: {type(exc).__name__}")
    return True


async def _load_customer(resources: AppResources, session: CallSession, cid: int) -> None:
    """The customer an outbound call is for; caller ID matches when we dialled their phone."""
    from crm.customers import get_identity

    async with resources.db.connection() as conn:
        identity = await get_identity(conn, cid)
    if identity is not None:
        session.match_customer(
            customer_id=identity.id,
            first_name=identity.first_name,
            caller_id=identity.phone == session.caller_phone,
        )


async def _record_call_start(resources: AppResources, session: CallSession) -> bool:
    """Create the ``calls`` row; False (and the write queued) when Postgres is down."""

    async def write(conn: Any) -> None:
        await crm_calls.start_call(
            conn,
            call_sid=session.call_sid,
            direction=session.direction,
            scenario=session.scenario,
            started_at=session.started_at,
        )

    if resources.pending is not None:
        return await resources.pending.write(
            call_sid=session.call_sid, what="call start", write=write
        )
    try:
        async with asyncio.timeout(resources.settings.db_timeout_secs):
            async with resources.db.connection() as conn:
                await write(conn)
    except Exception as exc:
        logger.error(f"call {session.call_sid}: call start not recorded: {type(exc).__name__}")
        return False
    return True


async def _finish(
    resources: AppResources, session: CallSession, *, incidents: list[str] | None = None
) -> None:
    if session.outcome is None:
        session.outcome = "abandoned" if not session.transcript else "info"
    summary = (
        f"{session.direction} {session.scenario} call; outcome {session.outcome}; "
        f"verified={session.verified}; appointments={session.appointment_ids}"
    )
    if incidents:
        summary += "; incidents: " + ", ".join(incidents)
    ended_at = datetime.now(UTC)

    async def write(conn: Any) -> None:
        await crm_calls.finish_call(
            conn,
            call_sid=session.call_sid,
            direction=session.direction,
            scenario=session.scenario,
            started_at=session.started_at,
            ended_at=ended_at,
            customer_id=session.customer_id,
            verified=session.verified,
            outcome=session.outcome,
            transcript=session.transcript,
            turn_metrics=session.turn_metrics,
            summary=summary,
            appointment_ids=session.appointment_ids,
        )

    if resources.pending is not None:
        await resources.pending.write(call_sid=session.call_sid, what="call record", write=write)
    else:
        try:
            async with asyncio.timeout(resources.settings.db_timeout_secs):
                async with resources.db.connection() as conn:
                    await write(conn)
        except Exception as exc:
            logger.error(
                f"call {session.call_sid}: could not record call end: {type(exc).__name__}"
            )
    logger.info(f"call {session.call_sid} ended: {session.outcome}")

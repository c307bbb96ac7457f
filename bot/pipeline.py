"""Pipeline assembly of one call (its lifecycle is :mod:`bot.call`).

transport in → Deepgram STT → user context aggregator (VAD, smart turn) → OpenAI LLM
with the tools → Deepgram TTS → transport out → assistant context aggregator.

Phone audio stays at 8 kHz end to end (pipeline, STT and TTS), so nothing is resampled
on the phone path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import deepgram.base_client
import httpx
from loguru import logger
from openai import APIConnectionError, InternalServerError
from pipecat.flows import FlowManager
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.filters.function_filter import FunctionFilter
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transcriptions.language import Language
from pipecat.transports.base_transport import BaseTransport
from pipecat.turns.user_mute import FunctionCallUserMuteStrategy
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from bot.features import CallFeatures, stt_language, tts_voice  # [phone-features hook]
from bot.flows import ACKNOWLEDGED_TOOLS, CallFlow
from bot.i18n import text
from bot.turn_models import new_turn_analyzer, new_vad_analyzer
from bot.turn_stop import ExpectedAnswerUserTurnStopStrategy, SpeculativeUserTurnStopStrategy
from core.resources import AppResources
from processors.barge_in import BargeInUserTurnStartStrategy
from processors.dead_air import DeadAirGuard
from processors.latency import LatencyObserver
from processors.session_snapshot import (
    SessionSnapshotProcessor,
    SnapshotStore,
    session_snapshot,
)
from processors.spoken_text import SpokenTextAligner
from processors.tool_acknowledgement import ToolAcknowledgement
from processors.tool_calls import ToolCallRecorder
from processors.tool_result_grouping import ToolResultGrouping
from tools.context import ToolContext

PHONE_SAMPLE_RATE = 8000


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


async def _not_caller_audio(frame: Frame) -> bool:
    return not isinstance(frame, InputAudioRawFrame)


async def _not_bot_audio(frame: Frame) -> bool:
    return not isinstance(frame, OutputAudioRawFrame)


def audio_stops_here(kind: type[InputAudioRawFrame] | type[OutputAudioRawFrame]) -> FunctionFilter:
    """A filter that ends the journey of the caller's or the bot's audio frames.

    Pipecat passes every audio frame on to the end of the pipeline: the caller's (25 a
    second, see ``DealershipTwilioSerializer``) through the LLM, the TTS and the output
    transport after the user aggregator has run the VAD and the turn strategies on it;
    the bot's from the output transport through the processors behind it. Nothing there
    uses them (call recording is Twilio's, not an audio buffer in the pipeline), and each
    hop costs a queue, a task switch and a ``FrameProcessed`` event for every observer:
    in ``benchmarks/capacity.py`` the caller's audio alone made 11 of a frame's 16 hops.

    Args:
        kind: ``InputAudioRawFrame`` (after the user aggregator) or
            ``OutputAudioRawFrame`` (after the output transport).

    Returns:
        Pipeline processor letting every other frame, system frames included, through.
    """
    caller = kind is InputAudioRawFrame
    return FunctionFilter(
        filter=_not_caller_audio if caller else _not_bot_audio,
        filter_system_frames=caller,  # the caller's audio frames are system frames
        name="CallerAudioStop" if caller else "BotAudioStop",
    )


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


def is_flux_model(model: str) -> bool:
    """Whether ``DEEPGRAM_STT_MODEL`` names a Flux model (``flux-general-en``, ...)."""
    return model.strip().lower().startswith("flux")


def flux_listen_url(base_url: str | None) -> str:
    """Flux's listen endpoint (``/v2/listen``) under ``DEEPGRAM_STT_URL``.

    Args:
        base_url: The configured base URL (``ws(s)://`` or ``http(s)://``, no path);
            empty or ``None`` means Deepgram's cloud.

    Returns:
        The WebSocket URL Pipecat's Flux service connects to.
    """
    base = (base_url or "wss://api.deepgram.com").rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return base.removesuffix("/v1/listen").removesuffix("/v2/listen") + "/v2/listen"


_deepgram_http_client: httpx.AsyncClient | None = None


@contextlib.contextmanager
def _one_deepgram_http_client() -> Iterator[None]:
    """While Pipecat builds a Deepgram service, the SDK gets the process's one HTTP client.

    ``AsyncDeepgramClient`` makes an ``httpx.AsyncClient`` (a TLS context, the CA bundle
    parsed: 24 ms of CPU) each time, and Pipecat's Nova STT service makes one client per
    call, on the event loop every other call runs on, for a streaming service that only
    uses the SDK's websocket. Building it with one shared HTTP client takes that out of
    each call's start (``tests/test_deepgram_client.py`` fails if the SDK's hook moves).
    """
    make_default = deepgram.base_client._make_default_async_client

    def shared(**kwargs: Any) -> httpx.AsyncClient:
        global _deepgram_http_client
        if _deepgram_http_client is None:
            _deepgram_http_client = make_default(**kwargs)
        return _deepgram_http_client

    deepgram.base_client._make_default_async_client = shared
    try:
        yield
    finally:
        deepgram.base_client._make_default_async_client = make_default


def _stt(resources: AppResources, sample_rate: int) -> DeepgramSTTService | DeepgramFluxSTTService:
    """Deepgram's speech recognition: Flux (its own turn detection) or Nova."""
    settings = resources.settings
    assert settings.deepgram_api_key is not None
    api_key = settings.deepgram_api_key.get_secret_value()
    if is_flux_model(settings.deepgram_stt_model):
        # Flux ends turns itself (StartOfTurn / EndOfTurn); with speculative replies its
        # EagerEndOfTurn starts the reply, which a TurnResumed withdraws.
        return DeepgramFluxSTTService(
            api_key=api_key,
            url=flux_listen_url(settings.deepgram_stt_url),
            sample_rate=sample_rate,
            enable_eager_end_of_turn=settings.speculative_replies,
            settings=DeepgramFluxSTTService.Settings(
                model=settings.deepgram_stt_model,
                keyterm=resources.profile.speech_keyterms(),
                # flux-general-multi only (the others warn and ignore them).
                language_hints=[Language(code) for code in resources.profile.phone.languages]
                if "multi" in settings.deepgram_stt_model
                else None,
            ),
        )
    with _one_deepgram_http_client():
        return DeepgramSTTService(
            api_key=api_key,
            base_url=settings.deepgram_stt_url or "",
            sample_rate=sample_rate,
            settings=DeepgramSTTService.Settings(
                model=settings.deepgram_stt_model,
                language=stt_language(resources.profile.phone.languages),  # [phone-features hook]
                smart_format=True,
                punctuate=True,
                interim_results=True,
                keyterm=resources.profile.speech_keyterms(),
            ),
        )


def _services(resources: AppResources, system_prompt: str, sample_rate: int, language: str = "en"):
    settings = resources.settings
    settings.require("OPENAI_API_KEY", "DEEPGRAM_API_KEY")
    assert settings.deepgram_api_key is not None and settings.openai_api_key is not None
    stt = _stt(resources, sample_rate)
    tts = DeepgramTTSService(
        api_key=settings.deepgram_api_key.get_secret_value(),
        base_url=settings.deepgram_tts_url or "wss://api.deepgram.com",
        sample_rate=sample_rate,
        encoding="linear16",
        settings=DeepgramTTSService.Settings(
            voice=tts_voice(settings, language)  # [phone-features hook]
        ),
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


@dataclass
class CallPipeline:
    """One call's assembled pipeline: what the call's lifecycle (:mod:`bot.call`) drives."""

    worker: PipelineWorker
    manager: FlowManager
    flow: CallFlow
    aggregators: LLMContextAggregatorPair
    stt: DeepgramSTTService | DeepgramFluxSTTService
    llm: OpenAISharedClientLLMService
    tts: DeepgramTTSService
    latency: LatencyObserver
    snapshots: SessionSnapshotProcessor
    snapshot_store: SnapshotStore
    dead_air: DeadAirGuard
    tool_log: ToolCallRecorder
    tool_ack: ToolAcknowledgement | None

    def service_name(self, source: object) -> str:
        """Which service ``source`` is, in words for the logs and the call's incidents."""
        if source is self.stt:
            return "speech recognition"
        if source is self.llm:
            return "llm"
        if source is self.tts:
            return "speech synthesis"
        return type(source).__name__ if source is not None else "pipeline"


def build_call_pipeline(
    *,
    transport: BaseTransport,
    resources: AppResources,
    ctx: ToolContext,
    options: CallOptions,
    system_prompt: str,
    transfer: Callable[[], Awaitable[None]],
    features: CallFeatures,
) -> CallPipeline:
    """Assemble one call's services, processors, pipeline, worker and conversation flow.

    Args:
        transport: Transport of the call.
        resources: Process resources (settings, profile, Redis, shared clients).
        ctx: The call's tool context (its session included).
        options: Pipeline knobs.
        system_prompt: The LLM's first system prompt.
        transfer: What the flow calls to send the caller to an advisor.
        features: The call's phone features (keypad, language, recording, summary).

    Returns:
        The assembled pipeline, not yet running.
    """
    settings = resources.settings
    session = ctx.session
    stt, llm, tts = _services(resources, system_prompt, options.sample_rate, session.language)
    tool_log = ToolCallRecorder()  # tool calls, masked, for the calls row (ops console)
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
    # "Let me check." as soon as a reply starts with a tool call (translated before the
    # TTS like the other fixed sentences); it also stops the dead-air guard.
    tool_ack = (
        ToolAcknowledgement(tools=ACKNOWLEDGED_TOOLS, phrase=text("tool_ack", "en"))
        if settings.tool_acknowledgement
        else None
    )
    aggregators = _aggregators(resources, options, stt)
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            *features.after_stt(),  # [phone-features hook]
            *options.extra_processors_after_stt,
            aggregators.user(),
            audio_stops_here(InputAudioRawFrame),  # the VAD has had it: no further
            llm,
            ToolResultGrouping(),  # parallel tool calls: one LLM run for the group
            *([tool_ack] if tool_ack else []),  # speaks when a reply needs tools
            dead_air,  # speaks while the LLM (or a tool) keeps the caller waiting
            *features.before_tts(),  # [phone-features hook]
            tts,
            SpokenTextAligner(),  # sentence text behind its audio: interruptions trim it
            transport.output(),
            audio_stops_here(OutputAudioRawFrame),  # played: nobody behind needs it
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
        observers=[latency, tool_log, *options.observers],
        enable_rtvi=False,
        # Pipecat's turn tracking observer: nothing here reads it, and every observer
        # gets an event for each frame each processor handles.
        enable_turn_tracking=False,
        idle_timeout_secs=options.idle_timeout_secs,
    )
    flow = CallFlow(
        ctx=ctx,
        scenario=session.scenario,
        greeting="",  # set once the caller ID lookup is done
        transfer=transfer,
    )
    manager = FlowManager(
        worker=worker,
        # Pipecat 1.14 annotates ``llm: LLMService | LLMSwitcher``; with TAdapter's default
        # that is the invariant LLMService[BaseLLMAdapter], which no concrete service
        # (OpenAILLMService included) matches; Pipecat itself uses LLMService[Any] elsewhere.
        llm=llm,  # pyright: ignore[reportArgumentType]
        context_aggregator=aggregators,
        global_functions=flow.global_functions(),
    )
    flow.manager = manager
    return CallPipeline(
        worker=worker,
        manager=manager,
        flow=flow,
        aggregators=aggregators,
        stt=stt,
        llm=llm,
        tts=tts,
        latency=latency,
        snapshots=snapshots,
        snapshot_store=snapshot_store,
        dead_air=dead_air,
        tool_log=tool_log,
        tool_ack=tool_ack,
    )


def _aggregators(
    resources: AppResources,
    options: CallOptions,
    stt: DeepgramSTTService | DeepgramFluxSTTService,
) -> LLMContextAggregatorPair:
    """The context aggregators: VAD, barge-in and smart-turn strategies, idle detection.

    With Flux the turn strategies are the ones the service recommends: its own
    StartOfTurn / EndOfTurn decide the turn (Pipecat's external strategies), and with
    speculative replies its EagerEndOfTurn starts the reply (Pipecat's eager strategies,
    the LLM service's speculation gate holding it until EndOfTurn). The VAD still runs,
    for the latency figures only.
    """
    settings = resources.settings
    context = LLMContext()
    strategies: UserTurnStrategies
    if isinstance(stt, DeepgramFluxSTTService):
        strategies = stt.recommended_user_turn_strategies(enable_interruptions=True)
    else:
        strategies = UserTurnStrategies(
            start=[
                BargeInUserTurnStartStrategy(
                    min_words=settings.barge_in_min_words,
                    min_speech_secs=settings.barge_in_min_speech_secs,
                    max_backchannel_words=settings.barge_in_max_backchannel_words,
                    protect_first_utterance=settings.barge_in_protect_disclosure,
                )
            ],
            stop=[_stop_strategy(resources, context)],
        )
    return LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=new_vad_analyzer(),
            user_turn_strategies=strategies,
            user_mute_strategies=[FunctionCallUserMuteStrategy()],
            user_idle_timeout=options.user_idle_timeout,
        ),
    )


def _stop_strategy(
    resources: AppResources, context: LLMContext
) -> TurnAnalyzerUserTurnStopStrategy:
    """The end-of-turn strategy with Nova: smart-turn, plus answers or speculation."""
    settings = resources.settings
    if settings.speculative_replies:
        return SpeculativeUserTurnStopStrategy.for_context(
            turn_analyzer=new_turn_analyzer(), context=context
        )
    if settings.turn_stop_on_answer:
        return ExpectedAnswerUserTurnStopStrategy.for_context(
            turn_analyzer=new_turn_analyzer(), context=context
        )
    return TurnAnalyzerUserTurnStopStrategy(turn_analyzer=new_turn_analyzer())

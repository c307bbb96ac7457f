"""Per-turn latency of a call: breakdown, log line, Prometheus metrics.

:class:`LatencyObserver` extends Pipecat's
:class:`~pipecat.observers.user_bot_latency_observer.UserBotLatencyObserver` (which already
measures caller silence → ``BotStartedSpeakingFrame`` and collects the services' TTFB
``MetricsFrame``\\ s per cycle) with the timeline of the turn and the tool durations:

caller stopped speaking (VAD stop minus ``stop_secs``) → final transcript
(``TranscriptionFrame``) → first LLM token (``LLMTextFrame``) → first TTS audio
(``TTSAudioRawFrame``) → first audio handed to the transport (``BotStartedSpeakingFrame``).

Service times come from Pipecat's TTFB metrics (``PipelineParams(enable_metrics=True)``):
STT TTFB (speech end → final), LLM TTFB (request → first token), TTS TTFB (request → first
audio byte). Tool durations come from ``FunctionCallInProgressFrame`` →
``FunctionCallResultFrame``.

Wiring::

    latency = LatencyObserver(call_sid=session.call_sid)
    worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True, ...),
                            observers=[latency])
    ...
    session.turn_metrics = latency.to_json()   # for the calls row
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    FunctionCallCancelFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    LLMTextFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.observers.user_bot_latency_observer import LatencyBreakdown, UserBotLatencyObserver
from pipecat.processors.frame_processor import FrameDirection

from core.metrics import (
    LLM_TTFT_SECONDS,
    STT_SECONDS,
    TOOL_ERRORS_TOTAL,
    TOOL_SECONDS,
    TTS_TTFB_SECONDS,
    VOICE_TO_VOICE_SECONDS,
)

#: Tool result ``error`` codes that count as tool errors (domain refusals do not).
DEFAULT_TOOL_ERROR_CODES: tuple[str, ...] = ("internal", "unknown_tool", "bad_arguments")


@dataclass
class ToolTiming:
    """One tool call.

    Attributes:
        name: Tool (function) name.
        secs: Seconds from ``FunctionCallInProgressFrame`` to its result or cancellation.
        status: ``ok``, ``error`` or ``cancelled``.
    """

    name: str
    secs: float
    status: str = "ok"


@dataclass
class TurnLatency:
    """Latency of one caller turn → bot answer cycle.

    Offsets (``*_at_secs``) are seconds after the caller stopped speaking; durations
    (``*_secs``) are the services' own TTFB metrics. Missing values are ``None``.

    Attributes:
        turn: 1-based turn number within the call.
        started_at: Wall-clock time (ISO 8601, UTC) the caller stopped speaking.
        voice_to_voice_secs: Caller stopped speaking → first bot audio to the transport.
        stt_final_at_secs: Offset of the final transcript.
        llm_first_token_at_secs: Offset of the first LLM token.
        tts_first_audio_at_secs: Offset of the first TTS audio.
        transport_first_audio_at_secs: Offset of the first audio handed to the transport.
        stt_secs: STT TTFB (speech end → final transcript).
        llm_ttft_secs: LLM TTFB (request → first token) of the first inference.
        tts_ttfb_secs: TTS TTFB (request → first audio) of the first utterance.
        user_turn_secs: Caller silence → end of turn decided (VAD + STT + turn analyzer).
        tools: Tool calls that finished during the cycle.
    """

    turn: int
    started_at: str
    voice_to_voice_secs: float
    stt_final_at_secs: float | None = None
    llm_first_token_at_secs: float | None = None
    tts_first_audio_at_secs: float | None = None
    transport_first_audio_at_secs: float | None = None
    stt_secs: float | None = None
    llm_ttft_secs: float | None = None
    tts_ttfb_secs: float | None = None
    user_turn_secs: float | None = None
    tools: list[ToolTiming] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (seconds rounded to milliseconds)."""
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, float):
                data[key] = round(value, 3)
        for tool in data["tools"]:
            tool["secs"] = round(tool["secs"], 3)
        return data

    def log_line(self) -> str:
        """One-line breakdown without transcript text or caller data."""

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}s"

        tools = ",".join(f"{t.name}:{t.secs:.3f}s:{t.status}" for t in self.tools) or "-"
        return (
            f"turn {self.turn} v2v={fmt(self.voice_to_voice_secs)} "
            f"[stt_final@{fmt(self.stt_final_at_secs)} "
            f"llm_first_token@{fmt(self.llm_first_token_at_secs)} "
            f"tts_first_audio@{fmt(self.tts_first_audio_at_secs)} "
            f"transport@{fmt(self.transport_first_audio_at_secs)}] "
            f"stt={fmt(self.stt_secs)} llm_ttft={fmt(self.llm_ttft_secs)} "
            f"tts_ttfb={fmt(self.tts_ttfb_secs)} endpointing={fmt(self.user_turn_secs)} "
            f"tools={tools}"
        )


def _kind(processor: str) -> str | None:
    """Service kind from a processor name such as ``DeepgramSTTService#0``."""
    name = processor.split("#", 1)[0].upper()
    for kind in ("STT", "TTS", "LLM"):
        if kind in name:
            return kind
    return None


class LatencyObserver(UserBotLatencyObserver):
    """Collects a :class:`TurnLatency` per turn, logs it and feeds Prometheus.

    Args:
        call_sid: Call id for the log lines (not PII).
        on_turn: Optional callback (sync or async) with each finished :class:`TurnLatency`.
        tool_error_codes: ``result["error"]`` values of a tool result that count as errors
            (a ``FunctionCallResultFrame.error`` always does).
        time_source: Wall clock in seconds (``time.time``); VAD frame timestamps use it.
        **kwargs: Passed to :class:`UserBotLatencyObserver`.
    """

    def __init__(
        self,
        *,
        call_sid: str | None = None,
        on_turn: Callable[[TurnLatency], Awaitable[None] | None] | None = None,
        tool_error_codes: Iterable[str] = DEFAULT_TOOL_ERROR_CODES,
        time_source: Callable[[], float] = time.time,
        **kwargs,
    ):
        """Initialize the observer."""
        super().__init__(time_source=time_source, **kwargs)
        self._call_sid = call_sid or "-"
        self._on_turn = on_turn
        self._tool_error_codes = set(tool_error_codes)
        self._clock = time_source

        self.turns: list[TurnLatency] = []
        self._user_stopped_at: float | None = None
        self._marks: dict[str, float] = {}
        self._tool_starts: dict[str, tuple[str, float]] = {}
        self._cycle_tools: list[ToolTiming] = []

        self.add_event_handler("on_latency_breakdown", self._on_breakdown)

    async def on_push_frame(self, data: FramePushed):
        """Record the turn's timeline, then let Pipecat's observer do its part."""
        if data.direction == FrameDirection.DOWNSTREAM:
            self._track(data)
        await super().on_push_frame(data)

    def _mark_once(self, name: str) -> None:
        if self._user_stopped_at is not None and name not in self._marks:
            self._marks[name] = self._clock()

    def _track(self, data: FramePushed) -> None:
        frame = data.frame
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._user_stopped_at = None
            self._marks = {}
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._user_stopped_at = frame.timestamp - frame.stop_secs
            self._marks = {}
        elif isinstance(frame, TranscriptionFrame):
            # The last final before the LLM is asked is the one that ends the turn.
            if self._user_stopped_at is not None and "llm" not in self._marks:
                self._marks["stt"] = self._clock()
        elif isinstance(frame, LLMTextFrame):
            self._mark_once("llm")
        elif isinstance(frame, TTSAudioRawFrame):
            self._mark_once("tts")
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._mark_once("transport")
        elif isinstance(frame, FunctionCallInProgressFrame):
            self._tool_starts[frame.tool_call_id] = (frame.function_name, self._clock())
        elif isinstance(frame, FunctionCallResultFrame):
            self._tool_finished(frame.tool_call_id, self._tool_status(frame))
        elif isinstance(frame, FunctionCallCancelFrame):
            self._tool_finished(frame.tool_call_id, "cancelled")

    def _tool_status(self, frame: FunctionCallResultFrame) -> str:
        result = frame.result
        if frame.error or (
            isinstance(result, dict) and result.get("error") in self._tool_error_codes
        ):
            return "error"
        return "ok"

    def _tool_finished(self, tool_call_id: str, status: str) -> None:
        start = self._tool_starts.pop(tool_call_id, None)
        if start is None:
            return
        name, started = start
        timing = ToolTiming(name=name, secs=max(0.0, self._clock() - started), status=status)
        self._cycle_tools.append(timing)
        if status != "cancelled":
            TOOL_SECONDS.labels(tool=name).observe(timing.secs)
        if status == "error":
            TOOL_ERRORS_TOTAL.labels(tool=name).inc()
        logger.debug(f"call {self._call_sid} tool {name} {status} in {timing.secs:.3f}s")

    async def _on_breakdown(self, _observer: UserBotLatencyObserver, breakdown: LatencyBreakdown):
        stopped = self._user_stopped_at
        transport = self._marks.get("transport")
        if stopped is None or transport is None:
            return  # the greeting (measured from connection), not a caller turn
        self._user_stopped_at = None

        def offset(name: str) -> float | None:
            at = self._marks.get(name)
            return None if at is None else max(0.0, at - stopped)

        ttfb: dict[str, float] = {}
        for metric in breakdown.ttfb:
            kind = _kind(metric.processor)
            if kind is not None and kind not in ttfb:
                ttfb[kind] = metric.duration_secs

        turn = TurnLatency(
            turn=len(self.turns) + 1,
            started_at=datetime.fromtimestamp(stopped, UTC).isoformat(),
            voice_to_voice_secs=max(0.0, transport - stopped),
            stt_final_at_secs=offset("stt"),
            llm_first_token_at_secs=offset("llm"),
            tts_first_audio_at_secs=offset("tts"),
            transport_first_audio_at_secs=offset("transport"),
            stt_secs=ttfb.get("STT"),
            llm_ttft_secs=ttfb.get("LLM"),
            tts_ttfb_secs=ttfb.get("TTS"),
            user_turn_secs=breakdown.user_turn_secs,
            tools=self._cycle_tools,
        )
        self._cycle_tools = []
        self.turns.append(turn)

        VOICE_TO_VOICE_SECONDS.observe(turn.voice_to_voice_secs)
        if turn.stt_secs is not None:
            STT_SECONDS.observe(turn.stt_secs)
        if turn.llm_ttft_secs is not None:
            LLM_TTFT_SECONDS.observe(turn.llm_ttft_secs)
        if turn.tts_ttfb_secs is not None:
            TTS_TTFB_SECONDS.observe(turn.tts_ttfb_secs)
        logger.info(f"call {self._call_sid} latency {turn.log_line()}")

        if self._on_turn is not None:
            maybe = self._on_turn(turn)
            if maybe is not None:
                await maybe

    def to_json(self) -> list[dict[str, Any]]:
        """All turns of the call, JSON-ready (for the ``calls`` row)."""
        return [t.to_json() for t in self.turns]

    def summary(self) -> dict[str, Any]:
        """Small summary for session snapshots: turn count, median/max/last voice-to-voice."""
        values = [t.voice_to_voice_secs for t in self.turns]
        if not values:
            return {"turns": 0}
        return {
            "turns": len(values),
            "v2v_p50_secs": round(statistics.median(values), 3),
            "v2v_max_secs": round(max(values), 3),
            "last_v2v_secs": round(values[-1], 3),
        }

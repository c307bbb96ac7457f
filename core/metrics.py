"""Prometheus metrics of the voice agent, on a dedicated registry.

All metric objects live on :data:`REGISTRY` (not the process-global default registry), so
tests and the ``GET /metrics`` route see exactly the voice agent's metrics.

Example::

    from fastapi import Response
    from core.metrics import render_metrics

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render_metrics()
        return Response(content=body, media_type=content_type)
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
#: prometheus-client's multiprocess mode: set (by ``runner.py serve``, or by hand) before
#: prometheus_client is first imported, every process of the host writes its samples to
#: files there, and ``GET /metrics`` on any worker reports all of them.
MULTIPROC_DIR: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
if MULTIPROC_DIR:
    # A directory given by hand may not exist yet (an empty volume mounted at /tmp): the
    # metrics below write their files into it as soon as they are made.
    os.makedirs(MULTIPROC_DIR, exist_ok=True)

#: Buckets (seconds) for voice-path latencies: 50 ms .. 5 s.
VOICE_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.8,
    1.0,
    1.25,
    1.5,
    2.0,
    2.5,
    3.0,
    4.0,
    5.0,
)
#: Buckets (seconds) for tool calls (database, calendar): 10 ms .. 10 s.
TOOL_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

VOICE_TO_VOICE_SECONDS = Histogram(
    "voice_agent_voice_to_voice_seconds",
    "Caller stopped speaking to the first bot audio handed to the transport.",
    buckets=VOICE_BUCKETS,
    registry=REGISTRY,
)
STT_SECONDS = Histogram(
    "voice_agent_stt_seconds",
    "Speech-to-text time to final transcript (STT TTFB).",
    buckets=VOICE_BUCKETS,
    registry=REGISTRY,
)
LLM_TTFT_SECONDS = Histogram(
    "voice_agent_llm_ttft_seconds",
    "LLM request to first token (LLM TTFB).",
    buckets=VOICE_BUCKETS,
    registry=REGISTRY,
)
TTS_TTFB_SECONDS = Histogram(
    "voice_agent_tts_ttfb_seconds",
    "TTS request to first audio byte (TTS TTFB).",
    buckets=VOICE_BUCKETS,
    registry=REGISTRY,
)
TOOL_SECONDS = Histogram(
    "voice_agent_tool_seconds",
    "Duration of one tool (function) call.",
    ["tool"],
    buckets=TOOL_BUCKETS,
    registry=REGISTRY,
)
CALLS_TOTAL = Counter(
    "voice_agent_calls_total",
    "Finished calls by direction and outcome.",
    ["direction", "outcome"],
    registry=REGISTRY,
)
INTERRUPTIONS_TOTAL = Counter(
    "voice_agent_interruptions_total",
    "Caller barge-ins that interrupted the bot.",
    registry=REGISTRY,
)
BACKCHANNELS_IGNORED_TOTAL = Counter(
    "voice_agent_backchannels_ignored_total",
    "Caller backchannels ('uh-huh', 'okay') heard while the bot spoke and not treated as "
    "an interruption.",
    registry=REGISTRY,
)
TOOL_ERRORS_TOTAL = Counter(
    "voice_agent_tool_errors_total",
    "Tool calls that failed (handler error or internal error result).",
    ["tool"],
    registry=REGISTRY,
)
SNAPSHOT_FAILURES_TOTAL = Counter(
    "voice_agent_snapshot_failures_total",
    "Session snapshots that could not be written to Redis.",
    registry=REGISTRY,
)
ACTIVE_CALLS = Gauge(
    "voice_agent_active_calls",
    "Calls currently in progress (all worker processes of the host).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)

READY_WORKERS = Gauge(
    "voice_agent_ready_workers",
    "Worker processes ready to take calls (started and not draining), all of the host.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)


def render_metrics() -> tuple[bytes, str]:
    """Render the voice agent's registry in the Prometheus text format.

    In multiprocess mode (:data:`MULTIPROC_DIR`) the samples of every worker process of
    the host are merged: counters and histograms summed, active calls summed over the
    live processes.

    Returns:
        The exposition body and its content type, for a ``GET /metrics`` response.
    """
    if MULTIPROC_DIR:
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=MULTIPROC_DIR)
        return generate_latest(merged), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def series_names() -> set[str]:
    """Names of the series ``GET /metrics`` exports (what dashboards and alerts may use):
    ``<name>_total`` of counters, ``<name>_bucket``/``_sum``/``_count`` of histograms,
    ``<name>`` of gauges."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Read one sample of the registry (tests and debugging).

    Args:
        name: Sample name, e.g. ``voice_agent_interruptions_total`` or
            ``voice_agent_stt_seconds_count``.
        labels: Label values of the sample, if any.

    Returns:
        The sample value, 0.0 when the sample does not exist yet.
    """
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def call_started() -> None:
    """Count a call as active (pair with :func:`call_finished`)."""
    ACTIVE_CALLS.inc()


def call_finished(direction: str, outcome: str | None) -> None:
    """Count a finished call and remove it from the active calls.

    Args:
        direction: ``inbound`` or ``outbound``.
        outcome: The call's outcome (``None`` is recorded as ``unknown``).
    """
    ACTIVE_CALLS.dec()
    CALLS_TOTAL.labels(direction=direction, outcome=outcome or "unknown").inc()

"""Small server-side SVG charts (no JavaScript, no chart library, no inline styles).

Every chart is an ``<svg>`` with a ``viewBox`` (it scales to its container) whose parts
carry CSS classes styled by ``ops/static/console.css``. Text is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from markupsafe import Markup, escape


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _nice_max(value: float, ticks: int = 4) -> float:
    """A round axis maximum at or above ``value`` whose ``ticks`` steps are round too."""
    if value <= 0:
        return 1.0
    for step in (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0):
        if value <= step * ticks:
            return step * ticks
    return float(math.ceil(value))


def _ticks(top: float, count: int = 4) -> list[float]:
    return [top * i / count for i in range(count + 1)]


def _fmt_secs(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _empty(width: int, height: int, message: str, label: str) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}"><text class="chart-empty" x="{width / 2}" '
        f'y="{height / 2}" text-anchor="middle">{escape(message)}</text></svg>'
    )


#: Parts of a turn's voice-to-voice time: (class, label, start offset key, end offset key).
_SEGMENTS = (
    ("seg-stt", "caller stopped → transcript", None, "stt_final_at_secs"),
    ("seg-llm", "→ first LLM token", "stt_final_at_secs", "llm_first_token_at_secs"),
    ("seg-tts", "→ first TTS audio", "llm_first_token_at_secs", "tts_first_audio_at_secs"),
    ("seg-out", "→ audio out", "tts_first_audio_at_secs", "voice_to_voice_secs"),
)


def turn_latency_chart(turns: Sequence[dict[str, Any]]) -> Markup:
    """Stacked bars of each turn's voice-to-voice time and where it went.

    Args:
        turns: The ``turn_metrics`` of a call (``voice_to_voice_secs`` and the offsets).

    Returns:
        An SVG bar chart (an empty-state SVG when no turn was measured).
    """
    width, height = 1000, 270
    left, right, top, bottom = 64, 16, 18, 58
    rows = [t for t in turns if isinstance(t, dict) and _num(t.get("voice_to_voice_secs"))]
    if not rows:
        return _empty(width, height, "No measured turns", "Per-turn latency")
    rows = rows[:60]
    top_value = _nice_max(max(_num(t["voice_to_voice_secs"]) or 0.0 for t in rows))
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(value: float) -> float:
        return top + plot_h - (value / top_value) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Voice-to-voice latency per turn">'
    ]
    for tick in _ticks(top_value):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
            f'y2="{y(tick):.1f}"/><text class="axis" x="{left - 6}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{escape(_fmt_secs(tick))}</text>'
        )
    slot = plot_w / len(rows)
    bar_w = max(4.0, min(44.0, slot * 0.5))
    for index, turn in enumerate(rows):
        total = _num(turn["voice_to_voice_secs"]) or 0.0
        x = left + slot * index + (slot - bar_w) / 2
        label = f"Turn {turn.get('turn', index + 1)}: {_fmt_secs(total)}"
        parts.append(f'<g class="bar"><title>{escape(label)}</title>')
        previous = 0.0
        for css, _name, _start_key, end_key in _SEGMENTS:
            end = _num(turn.get(end_key))
            if end is None:
                continue
            end = min(max(end, previous), total)
            if end > previous:
                parts.append(
                    f'<rect class="{css}" x="{x:.1f}" y="{y(end):.1f}" width="{bar_w:.1f}" '
                    f'height="{y(previous) - y(end):.1f}"/>'
                )
                previous = end
        if previous < total:
            parts.append(
                f'<rect class="seg-out" x="{x:.1f}" y="{y(total):.1f}" width="{bar_w:.1f}" '
                f'height="{y(previous) - y(total):.1f}"/>'
            )
        parts.append(
            f'<text class="value" x="{x + bar_w / 2:.1f}" y="{y(total) - 4:.1f}" '
            f'text-anchor="middle">{escape(_fmt_secs(total))}</text>'
        )
        parts.append(
            f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" '
            f'text-anchor="middle">{escape(str(turn.get("turn", index + 1)))}</text></g>'
        )
    parts.append(
        f'<text class="axis" x="{left + plot_w / 2}" y="{top + plot_h + 32}" '
        'text-anchor="middle">turn</text>'
    )
    legend_x = left
    for css, name, _a, _b in _SEGMENTS:
        parts.append(
            f'<rect class="{css}" x="{legend_x}" y="{height - 14}" width="10" height="10"/>'
            f'<text class="legend" x="{legend_x + 14}" y="{height - 5}">{escape(name)}</text>'
        )
        legend_x += 14 + 6 * len(name) + 24
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class SeriesPoint:
    """One bucket of a percentile time series."""

    at: datetime
    p50: float | None
    p95: float | None
    count: int


def percentile_chart(
    points: Sequence[SeriesPoint], *, start: datetime, end: datetime, tz: ZoneInfo
) -> Markup:
    """p50 and p95 lines over ``[start, end]``.

    Args:
        points: Buckets (their start instants).
        start: Left edge.
        end: Right edge.
        tz: Time zone of the axis labels.

    Returns:
        An SVG line chart (an empty-state SVG without points).
    """
    width, height = 1000, 250
    left, right, top, bottom = 64, 32, 16, 46
    values = [v for p in points for v in (p.p50, p.p95) if _num(v) is not None]
    if not values:
        return _empty(width, height, "No finished turns in this period", "Voice-to-voice")
    top_value = _nice_max(max(values))
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max((end - start).total_seconds(), 1.0)

    def x(at: datetime) -> float:
        return left + max(0.0, min(1.0, (at - start).total_seconds() / span)) * plot_w

    def y(value: float) -> float:
        return top + plot_h - (value / top_value) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Voice-to-voice p50 and p95">'
    ]
    for tick in _ticks(top_value):
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(tick):.1f}" '
            f'y2="{y(tick):.1f}"/><text class="axis" x="{left - 6}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{escape(_fmt_secs(tick))}</text>'
        )
    tick_at = start
    step = timedelta(seconds=span / 4)
    for _ in range(5):
        parts.append(
            f'<text class="axis" x="{x(tick_at):.1f}" y="{top + plot_h + 18}" '
            f'text-anchor="middle">{tick_at.astimezone(tz):%H:%M}</text>'
        )
        tick_at += step
    # Points sit in the middle of their bucket.
    half = timedelta(seconds=span / max(len(points), 1) / 2) if len(points) > 1 else timedelta()
    for css, attr, name in (("line-p95", "p95", "p95"), ("line-p50", "p50", "p50")):
        coords = [
            (x(p.at + half), y(_num(getattr(p, attr)) or 0.0), p)
            for p in points
            if _num(getattr(p, attr)) is not None
        ]
        if len(coords) > 1:
            path = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy, _ in coords)
            parts.append(f'<polyline class="{css}" points="{path}"/>')
        for cx, cy, p in coords:
            label = (
                f"{p.at.astimezone(tz):%H:%M} {name} {_fmt_secs(getattr(p, attr))} "
                f"({p.count} turns)"
            )
            parts.append(
                f'<circle class="{css}" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5">'
                f"<title>{escape(label)}</title></circle>"
            )
    parts.append(
        f'<line class="line-p50" x1="{left}" x2="{left + 18}" y1="{height - 8}" '
        f'y2="{height - 8}"/><text class="legend" x="{left + 24}" y="{height - 4}">p50</text>'
        f'<line class="line-p95" x1="{left + 70}" x2="{left + 88}" y1="{height - 8}" '
        f'y2="{height - 8}"/><text class="legend" x="{left + 94}" y="{height - 4}">p95</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class TimelineItem:
    """An appointment on the schedule timeline."""

    id: int
    lane: str
    starts_at: datetime
    ends_at: datetime
    label: str
    title: str
    status: str
    by_bot: bool


def schedule_timeline(
    lanes: Sequence[str],
    items: Sequence[TimelineItem],
    *,
    start: datetime,
    end: datetime,
    tz: ZoneInfo,
) -> Markup:
    """Appointments per bay on a day's timeline; the bot's bookings are marked.

    Args:
        lanes: Bay ids, top to bottom (items on other bays get their own lanes).
        items: Appointments.
        start: Left edge (opening time).
        end: Right edge (closing time).
        tz: Time zone of the hour labels.

    Returns:
        An SVG timeline; each appointment links to ``#appt-<id>``.
    """
    all_lanes = list(dict.fromkeys([*lanes, *(i.lane for i in items)]))
    lane_h, left, right, top = 44, 72, 28, 28
    width = 1000
    height = top + lane_h * max(len(all_lanes), 1) + 8
    span = max((end - start).total_seconds(), 1.0)
    plot_w = width - left - right

    def x(at: datetime) -> float:
        return left + max(0.0, min(1.0, (at - start).total_seconds() / span)) * plot_w

    parts = [
        f'<svg class="chart timeline" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="Appointments per bay">'
    ]
    hour = start.astimezone(tz).replace(minute=0, second=0, microsecond=0)
    if hour < start:
        hour += timedelta(hours=1)
    while hour <= end:
        parts.append(
            f'<line class="grid" x1="{x(hour):.1f}" x2="{x(hour):.1f}" y1="{top - 6}" '
            f'y2="{height - 8}"/><text class="axis" x="{x(hour):.1f}" y="{top - 10}" '
            f'text-anchor="middle">{hour:%H:%M}</text>'
        )
        hour += timedelta(hours=1)
    for index, lane in enumerate(all_lanes):
        ly = top + index * lane_h
        parts.append(
            f'<rect class="lane{" lane-alt" if index % 2 else ""}" x="{left}" y="{ly}" '
            f'width="{plot_w}" height="{lane_h}"/>'
            f'<text class="lane-label" x="{left - 8}" y="{ly + lane_h / 2 + 4}" '
            f'text-anchor="end">{escape(lane)}</text>'
        )
    lane_index = {lane: i for i, lane in enumerate(all_lanes)}
    for item in items:
        if item.ends_at <= start or item.starts_at >= end:
            continue
        x0, x1 = x(item.starts_at), x(item.ends_at)
        ly = top + lane_index[item.lane] * lane_h + 5
        w = max(x1 - x0 - 2, 3.0)
        css = f"appt status-{escape(item.status)}{' by-bot' if item.by_bot else ''}"
        text = f"AI · {item.label}" if item.by_bot else item.label
        max_chars = int((w - 10) / 6.5)
        label = text if len(text) <= max_chars else text[: max(max_chars - 1, 0)]
        if label and len(label) < len(text):
            label += "…"
        parts.append(
            f'<a href="#appt-{item.id}"><g class="{css}"><title>{escape(item.title)}</title>'
            f'<rect x="{x0 + 1:.1f}" y="{ly}" width="{w:.1f}" height="{lane_h - 10}" rx="5"/>'
        )
        if label:
            parts.append(
                f'<text class="appt-label" x="{x0 + 6:.1f}" y="{ly + (lane_h - 10) / 2:.1f}">'
                f"{escape(label)}</text>"
            )
        parts.append("</g></a>")
    parts.append("</svg>")
    return Markup("".join(parts))

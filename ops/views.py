"""Input parsing and display helpers of the console (no I/O).

Everything from a request is hostile: each parser accepts exactly the documented shapes and
raises :class:`BadInput` (a 400 page naming the field) for anything else.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from core.pii import mask_phone, redact_text, redact_value
from crm.ops import DIRECTIONS, OUTCOMES, SCENARIOS, HistoryFilter

PAGE_SIZE = 50
MAX_TEXT = 100
_CALL_SID = re.compile(r"^[A-Za-z]{2}[A-Za-z0-9_-]{6,62}$")
_PHONE_QUERY = re.compile(r"^\+?[\d\s().-]+$")
_NAME_QUERY = re.compile(r"^[^\W\d_][\w' .-]*$")
_NEXT = re.compile(r"^/ops(/[A-Za-z0-9_./-]*)?(\?[A-Za-z0-9_.~=&%+-]*)?$")


class BadInput(ValueError):
    """A request parameter is not acceptable; the message says which and why."""


def clean_text(value: str | None, *, name: str, max_len: int = MAX_TEXT) -> str | None:
    """A trimmed single-line text parameter, or None when empty.

    Raises:
        BadInput: Too long, or it holds control characters.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if len(text) > max_len:
        raise BadInput(f"{name} is too long (at most {max_len} characters)")
    if any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise BadInput(f"{name} contains characters that are not allowed")
    return text


def parse_choice(value: str | None, choices: tuple[str, ...], *, name: str) -> str | None:
    """One of ``choices``, or None when empty."""
    text = clean_text(value, name=name, max_len=40)
    if text is None:
        return None
    if text not in choices:
        raise BadInput(f"{name} must be one of: {', '.join(choices)}")
    return text


def parse_day(value: str | None, *, name: str) -> date | None:
    """A ``YYYY-MM-DD`` day between 2000 and 2100, or None when empty."""
    text = clean_text(value, name=name, max_len=10)
    if text is None:
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise BadInput(f"{name} must be a date like 2026-11-30")
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise BadInput(f"{name} is not a calendar date") from exc
    if not date(2000, 1, 1) <= day <= date(2100, 12, 31):
        raise BadInput(f"{name} must be between 2000 and 2100")
    return day


def parse_int(value: str | None, *, name: str, low: int, high: int) -> int | None:
    """A decimal integer in ``[low, high]``, or None when empty."""
    text = clean_text(value, name=name, max_len=20)
    if text is None:
        return None
    if not re.fullmatch(r"\d+", text):
        raise BadInput(f"{name} must be a whole number")
    number = int(text)
    if not low <= number <= high:
        raise BadInput(f"{name} must be between {low} and {high}")
    return number


def parse_id(value: str) -> int | None:
    """A positive database id from a path segment, or None when it is not one."""
    if not re.fullmatch(r"\d{1,18}", value or ""):
        return None
    number = int(value)
    return number if number > 0 else None


def valid_call_sid(value: str) -> bool:
    """Whether ``value`` looks like a call id (Twilio ``CA…`` or a generated one)."""
    return bool(_CALL_SID.fullmatch(value or ""))


def encode_cursor(started_at: datetime, row_id: int) -> str:
    """An opaque keyset cursor for ``(started_at, id)``."""
    raw = f"{started_at.astimezone(UTC).isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(value: str | None, *, name: str) -> tuple[datetime, int] | None:
    """The ``(started_at, id)`` of a cursor, or None when empty.

    Raises:
        BadInput: Not a cursor this console made.
    """
    text = clean_text(value, name=name, max_len=120)
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        stamp, row_id = raw.split("|")
        started_at = datetime.fromisoformat(stamp)
        number = int(row_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadInput(f"{name} is not a valid page cursor") from exc
    if started_at.tzinfo is None or not 0 < number < 2**63 or not 2000 <= started_at.year <= 2100:
        raise BadInput(f"{name} is not a valid page cursor")
    return started_at, number


@dataclass
class HistoryQuery:
    """A parsed call-history request."""

    flt: HistoryFilter
    after: tuple[datetime, int] | None
    before: tuple[datetime, int] | None
    form: dict[str, str] = field(default_factory=dict)

    def link(self, **cursor: str) -> str:
        """``/ops/calls`` with the same filters and the given cursor."""
        params = {k: v for k, v in self.form.items() if v} | cursor
        return "/ops/calls" + (f"?{urlencode(params)}" if params else "")


def parse_history(params: Mapping[str, str], tz: ZoneInfo) -> HistoryQuery:
    """Parse the history page's query parameters.

    ``from``/``to`` (days, dealership time, inclusive), ``outcome``, ``direction``,
    ``scenario``, ``customer`` (an id), ``q`` (a name, "first last", 4+ phone digits or a
    call SID), ``after``/``before`` (cursors).
    """
    day_from = parse_day(params.get("from"), name="from")
    day_to = parse_day(params.get("to"), name="to")
    if day_from and day_to and day_from > day_to:
        raise BadInput("from must not be after to")
    outcome = parse_choice(params.get("outcome"), (*OUTCOMES, "none"), name="outcome")
    direction = parse_choice(params.get("direction"), DIRECTIONS, name="direction")
    scenario = parse_choice(params.get("scenario"), SCENARIOS, name="scenario")
    customer_id = parse_int(params.get("customer"), name="customer", low=1, high=2**63 - 1)
    q = clean_text(params.get("q"), name="search")
    names: tuple[str, ...] = ()
    phone_digits = call_sid = None
    if q is not None:
        digits = re.sub(r"\D", "", q)
        if valid_call_sid(q) and q[:2].isalpha() and any(c.isdigit() for c in q):
            call_sid = q
        elif _PHONE_QUERY.fullmatch(q):
            if len(digits) < 4 or len(digits) > 15:
                raise BadInput("search by phone needs 4 to 15 digits")
            phone_digits = digits
        elif _NAME_QUERY.fullmatch(q):
            names = tuple(q.lower().split()[:2])
        else:
            raise BadInput("search takes a name, 4 or more phone digits, or a call SID")
    after = decode_cursor(params.get("after"), name="after")
    before = None if after else decode_cursor(params.get("before"), name="before")
    flt = HistoryFilter(
        started_from=datetime.combine(day_from, time(0), tz) if day_from else None,
        started_before=(
            datetime.combine(day_to + timedelta(days=1), time(0), tz) if day_to else None
        ),
        outcome=outcome,
        direction=direction,
        scenario=scenario,
        customer_id=customer_id,
        name_prefixes=names,
        phone_digits=phone_digits,
        call_sid=call_sid,
    )
    form = {
        "from": day_from.isoformat() if day_from else "",
        "to": day_to.isoformat() if day_to else "",
        "outcome": outcome or "",
        "direction": direction or "",
        "scenario": scenario or "",
        "customer": str(customer_id) if customer_id else "",
        "q": q or "",
    }
    return HistoryQuery(flt=flt, after=after, before=before, form=form)


def safe_next(value: str | None) -> str:
    """Where to go after the login: a console path, never another site."""
    if value and len(value) <= 300 and _NEXT.fullmatch(value) and "//" not in value:
        if not value.startswith(("/ops/login", "/ops/logout", "/ops/static")):
            return value
    return "/ops/live"


# --- display --------------------------------------------------------------------------------


def person(first: str | None, last: str | None) -> str:
    """``Maria G.``; ``Unknown caller`` without a customer."""
    if not first:
        return "Unknown caller"
    initial = f" {last.strip()[0]}." if last and last.strip() else ""
    return f"{first.strip()}{initial}"


def local(moment: datetime | None, tz: ZoneInfo, fmt: str = "%a %b %-d, %H:%M") -> str:
    """A timestamp in dealership time; ``–`` for none."""
    return moment.astimezone(tz).strftime(fmt) if moment else "–"


def duration(secs: float | None) -> str:
    """``4:05`` (minutes:seconds) or ``1:02:03``; ``–`` for none."""
    if secs is None or secs < 0:
        return "–"
    total = int(secs)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"


def ago(moment: datetime | None, now: datetime) -> str:
    """``5 min ago``, ``3 h ago``, ``2 d ago``."""
    if moment is None:
        return "–"
    secs = (now - moment).total_seconds()
    if secs < 60:
        return "just now"
    if secs < 3600:
        return f"{int(secs // 60)} min ago"
    if secs < 86400:
        return f"{int(secs // 3600)} h ago"
    return f"{int(secs // 86400)} d ago"


def secs_text(value: Any) -> str:
    """``420 ms`` / ``1.25 s`` for a number of seconds; ``–`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def label(value: str | None) -> str:
    """``callback_requested`` → ``callback requested``."""
    return (value or "–").replace("_", " ")


def transcript_view(transcript: Any) -> list[dict[str, Any]]:
    """Transcript turns for display: role, masked text, interrupted flag."""
    turns = []
    for item in transcript if isinstance(transcript, list) else []:
        if not isinstance(item, dict):
            continue
        role = item.get("role")
        turns.append(
            {
                "role": "bot" if role in ("bot", "assistant") else "caller",
                "text": redact_text(str(item.get("text") or ""))[:4000],
                "interrupted": bool(item.get("interrupted")),
            }
        )
    return turns


def pretty_json(value: Any) -> str:
    """Masked, indented JSON of a tool argument object or result."""
    try:
        return json.dumps(redact_value(value), indent=2, ensure_ascii=False, default=str)[:6000]
    except (TypeError, ValueError):
        return redact_text(str(value))[:6000]


__all__ = [
    "PAGE_SIZE",
    "BadInput",
    "HistoryQuery",
    "ago",
    "decode_cursor",
    "duration",
    "encode_cursor",
    "label",
    "local",
    "mask_phone",
    "parse_choice",
    "parse_day",
    "parse_history",
    "parse_id",
    "parse_int",
    "person",
    "pretty_json",
    "safe_next",
    "secs_text",
    "transcript_view",
    "valid_call_sid",
]

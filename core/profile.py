"""The dealership profile: hours, bays, services, advisors, calling windows.

Loaded from a TOML file (``DEALERSHIP_PROFILE``) and validated at startup. Every mistake
becomes a :class:`ProfileError` whose message names the field, e.g.
``hours.monday: ranges 08:00-12:00 and 11:00-14:00 overlap``.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
KNOWN_CAPABILITIES = frozenset(
    {"quick_lube", "general", "alignment", "tires", "diagnostics", "electrical", "body", "ev"}
)
_RANGE_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
_E164_RE = re.compile(r"^\+[1-9]\d{7,14}$")
#: Legal bounds for outbound calls in the customer's local time (TCPA: 8 AM to 9 PM).
LEGAL_CALL_WINDOW = (time(8, 0), time(21, 0))


class ProfileError(ValueError):
    """The dealership profile is invalid; the message names the offending field."""


@dataclass(frozen=True)
class TimeRange:
    """A local-time range within one day, ``end`` exclusive."""

    start: time
    end: time

    def contains(self, value: time) -> bool:
        """Whether ``value`` falls inside the range."""
        return self.start <= value < self.end


@dataclass(frozen=True)
class Bay:
    """A service bay and the kinds of work it can take."""

    id: str
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Advisor:
    """A service advisor."""

    id: str
    name: str


@dataclass(frozen=True)
class Service:
    """An item of the service menu."""

    code: str
    spoken_name: str
    duration_minutes: int
    price_min: int
    price_max: int
    capability: str


@dataclass(frozen=True)
class ScheduleSlot:
    """When a campaign runs: on some weekdays (0 = Monday), at a dealership-local time."""

    weekdays: frozenset[int]
    at: time
    label: str

    def due_on(self, day: date) -> bool:
        """Whether the slot runs on ``day``."""
        return day.weekday() in self.weekdays


#: Schedule keys of the profile's ``[schedule]`` table -> campaign names.
SCHEDULE_CAMPAIGNS = {"confirmations": "confirmation", "service_due": "service_due"}
_SCHEDULE_DAYS = {
    "daily": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
    **{name[:3]: frozenset({i}) for i, name in enumerate(WEEKDAYS)},
}
_SLOT_RE = re.compile(r"^([a-z,]+)\s+([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class CampaignSettings:
    """Outbound campaign settings (``[campaigns]`` and ``[schedule]``).

    Attributes:
        slots: Campaign name (``service_due``, ``confirmation``) -> when it runs.
        max_retries: Redials after no-answer, busy or a failed dial request.
        retry_backoff_minutes: Wait before retry n (the last value repeats).
        calls_per_second: Most new calls started per second.
        max_concurrent: Most calls in flight at once.
        max_call_minutes: After this long a call no longer counts as in flight.
        due_within_days: Service-due look-ahead for the due date.
        recent_attempt_days: A customer attempted this recently is not called again.
        default_miles_per_day: Mileage rate when a vehicle's history gives none.
    """

    slots: dict[str, tuple[ScheduleSlot, ...]] = field(default_factory=dict)
    max_retries: int = 2
    retry_backoff_minutes: tuple[int, ...] = (30, 120)
    calls_per_second: float = 1.0
    max_concurrent: int = 4
    max_call_minutes: int = 15
    due_within_days: int = 7
    recent_attempt_days: int = 14
    default_miles_per_day: float = 35.0


@dataclass(frozen=True)
class DealershipProfile:
    """Validated dealership profile."""

    name: str
    time_zone: ZoneInfo
    phone_number: str
    advisor_transfer_number: str
    loaner_cars: int
    hours: dict[str, tuple[TimeRange, ...]]
    holidays: frozenset[date]
    bays: tuple[Bay, ...]
    advisors: tuple[Advisor, ...]
    services: dict[str, Service]
    outbound_window: TimeRange
    customer_call_window: TimeRange
    booking_lead_time_minutes: int = 120
    slot_step_minutes: int = 30
    max_booking_days_ahead: int = 60
    recording_enabled: bool = False
    schedule: dict[str, tuple[str, ...]] = field(default_factory=dict)
    keyterms: tuple[str, ...] = ()
    campaigns: CampaignSettings = field(default_factory=CampaignSettings)
    # --- texting (SMS): see the "Texting" block below ---
    address: str = ""
    texting: TextingSettings = field(default_factory=lambda: TextingSettings())

    def speech_keyterms(self) -> list[str]:
        """Words the speech recognizer should favour: name, makes, models, services."""
        terms = [self.name, *self.keyterms, *(s.spoken_name for s in self.services.values())]
        return list(dict.fromkeys(t for t in terms if t))

    def opening_hours(self, day: date) -> tuple[TimeRange, ...]:
        """Opening ranges for a calendar day; empty when closed or a holiday."""
        if day in self.holidays:
            return ()
        return self.hours.get(WEEKDAYS[day.weekday()], ())

    def service(self, code: str) -> Service | None:
        """Look up a service by code, case-insensitively."""
        return self.services.get(code.strip().lower())

    def bays_for(self, capability: str) -> tuple[Bay, ...]:
        """Bays that can take work needing ``capability``."""
        return tuple(bay for bay in self.bays if capability in bay.capabilities)


def _parse_range(value: object, where: str) -> TimeRange:
    if not isinstance(value, str) or not (match := _RANGE_RE.match(value.strip())):
        raise ProfileError(f"{where}: expected a range like '08:00-17:30', got {value!r}")
    sh, sm, eh, em = (int(g) for g in match.groups())
    if eh == 24 and em != 0:
        raise ProfileError(f"{where}: {value!r} is not a valid time")
    start = time(sh, sm)
    end = time(23, 59, 59) if eh == 24 else time(eh, em)
    if end <= start:
        raise ProfileError(f"{where}: range {value!r} ends before it starts")
    return TimeRange(start, end)


def _require(data: dict, key: str, kind: type | tuple[type, ...], where: str = "") -> object:
    name = f"{where}{key}"
    if key not in data:
        raise ProfileError(f"{name}: missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProfileError(f"{name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _phone(data: dict, key: str) -> str:
    value = _require(data, key, str)
    if not _E164_RE.match(value):
        raise ProfileError(f"{key}: expected an E.164 number like +15555550100")
    return value


def _parse_slot(value: object, where: str) -> ScheduleSlot:
    text = value.strip().lower() if isinstance(value, str) else ""
    match = _SLOT_RE.match(text)
    days: set[int] = set()
    for part in match.group(1).split(",") if match else []:
        if part not in _SCHEDULE_DAYS:
            match = None
            break
        days |= _SCHEDULE_DAYS[part]
    if not match:
        raise ProfileError(
            f"{where}: expected e.g. 'daily 10:00', 'weekdays 16:00' or 'mon,thu 11:30', "
            f"got {value!r}"
        )
    return ScheduleSlot(frozenset(days), time(int(match.group(2)), int(match.group(3))), text)


def _number(
    data: dict, key: str, kind: type, default: float, low: float, high: float, where: str
) -> Any:
    value = data.get(key, default)
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or not low <= value <= high:
        raise ProfileError(f"{where}{key}: expected a number from {low} to {high}, got {value!r}")
    return kind(value)


def _parse_campaigns(data: dict) -> CampaignSettings:
    schedule = data.get("schedule", {})
    if not isinstance(schedule, dict):
        raise ProfileError("schedule: expected a table")
    slots: dict[str, tuple[ScheduleSlot, ...]] = {}
    for key, campaign in SCHEDULE_CAMPAIGNS.items():
        raw = schedule.get(key, [])
        raw = raw if isinstance(raw, list) else [raw]
        parsed = tuple(_parse_slot(v, f"schedule.{key}[{i}]") for i, v in enumerate(raw))
        labels = [slot.label for slot in parsed]
        if len(set(labels)) != len(labels):
            raise ProfileError(f"schedule.{key}: duplicate slot")
        slots[campaign] = parsed
    section = data.get("campaigns", {})
    if not isinstance(section, dict):
        raise ProfileError("campaigns: expected a table")
    where = "campaigns."
    backoff = section.get("retry_backoff_minutes", [30, 120])
    if (
        not isinstance(backoff, list)
        or not backoff
        or not all(
            isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 24 * 60 for m in backoff
        )
    ):
        raise ProfileError(
            f"{where}retry_backoff_minutes: expected a list of minutes (1-1440), got {backoff!r}"
        )
    return CampaignSettings(
        slots=slots,
        max_retries=_number(section, "max_retries", int, 2, 0, 10, where),
        retry_backoff_minutes=tuple(backoff),
        calls_per_second=_number(section, "calls_per_second", float, 1.0, 0.01, 100, where),
        max_concurrent=_number(section, "max_concurrent", int, 4, 1, 500, where),
        max_call_minutes=_number(section, "max_call_minutes", int, 15, 1, 240, where),
        due_within_days=_number(section, "due_within_days", int, 7, 0, 90, where),
        recent_attempt_days=_number(section, "recent_attempt_days", int, 14, 0, 365, where),
        default_miles_per_day=_number(
            section, "default_miles_per_day", float, 35.0, 1, 1000, where
        ),
    )


def parse_profile(data: dict) -> DealershipProfile:
    """Validate a profile already parsed from TOML.

    Args:
        data: The TOML document as a dict.

    Returns:
        The validated profile.

    Raises:
        ProfileError: The first problem found, naming the field.
    """
    name = _require(data, "name", str)
    tz_name = _require(data, "time_zone", str)
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ProfileError(f"time_zone: unknown time zone {tz_name!r}") from exc

    hours_data = _require(data, "hours", dict)
    hours: dict[str, tuple[TimeRange, ...]] = {}
    for day_name, ranges in hours_data.items():
        if day_name not in WEEKDAYS:
            raise ProfileError(f"hours.{day_name}: not a weekday name ({', '.join(WEEKDAYS)})")
        if not isinstance(ranges, list):
            raise ProfileError(f"hours.{day_name}: expected a list of ranges")
        parsed = sorted(
            (_parse_range(r, f"hours.{day_name}") for r in ranges), key=lambda r: r.start
        )
        for earlier, later in itertools.pairwise(parsed):
            if later.start < earlier.end:
                raise ProfileError(
                    f"hours.{day_name}: ranges {earlier.start:%H:%M}-{earlier.end:%H:%M} and "
                    f"{later.start:%H:%M}-{later.end:%H:%M} overlap"
                )
        hours[day_name] = tuple(parsed)
    if not any(hours.values()):
        raise ProfileError("hours: the dealership is never open")

    holidays: set[date] = set()
    for raw in data.get("holidays", []):
        try:
            holidays.add(raw if isinstance(raw, date) else date.fromisoformat(str(raw)))
        except ValueError as exc:
            raise ProfileError(f"holidays: {raw!r} is not a YYYY-MM-DD date") from exc

    bays: list[Bay] = []
    for i, raw in enumerate(_require(data, "bays", list)):
        where = f"bays[{i}]."
        bay_id = _require(raw, "id", str, where)
        caps = frozenset(_require(raw, "capabilities", list, where))
        unknown = caps - KNOWN_CAPABILITIES
        if unknown:
            raise ProfileError(
                f"{where}capabilities: unknown capability {sorted(unknown)[0]!r} "
                f"(known: {', '.join(sorted(KNOWN_CAPABILITIES))})"
            )
        if any(b.id == bay_id for b in bays):
            raise ProfileError(f"{where}id: duplicate bay id {bay_id!r}")
        bays.append(Bay(bay_id, caps))
    if not bays:
        raise ProfileError("bays: at least one service bay is needed")

    advisors = tuple(
        Advisor(
            _require(a, "id", str, f"advisors[{i}]."), _require(a, "name", str, f"advisors[{i}].")
        )
        for i, a in enumerate(data.get("advisors", []))
    )

    services: dict[str, Service] = {}
    for i, raw in enumerate(_require(data, "services", list)):
        where = f"services[{i}]."
        code = _require(raw, "code", str, where).lower()
        duration = _require(raw, "duration_minutes", int, where)
        price_min = _require(raw, "price_min", int, where)
        price_max = _require(raw, "price_max", int, where)
        capability = _require(raw, "capability", str, where)
        if not 5 <= duration <= 8 * 60:
            raise ProfileError(f"{where}duration_minutes: must be between 5 and 480")
        if price_min < 0 or price_max < price_min:
            raise ProfileError(f"{where}price_max: must be >= price_min >= 0")
        if capability not in KNOWN_CAPABILITIES:
            raise ProfileError(f"{where}capability: unknown capability {capability!r}")
        if not any(capability in bay.capabilities for bay in bays):
            raise ProfileError(f"{where}capability: no bay offers {capability!r}")
        if code in services:
            raise ProfileError(f"{where}code: duplicate service code {code!r}")
        services[code] = Service(
            code=code,
            spoken_name=_require(raw, "spoken_name", str, where),
            duration_minutes=duration,
            price_min=price_min,
            price_max=price_max,
            capability=capability,
        )

    outbound = data.get("outbound", {})
    outbound_window = _parse_range(outbound.get("window", "09:00-19:00"), "outbound.window")
    customer_window = _parse_range(
        outbound.get("customer_window", "09:00-20:00"), "outbound.customer_window"
    )
    legal_start, legal_end = LEGAL_CALL_WINDOW
    for label, window in (("window", outbound_window), ("customer_window", customer_window)):
        if window.start < legal_start or window.end > legal_end:
            raise ProfileError(f"outbound.{label}: must stay within 08:00-21:00")

    loaner_cars = _require(data, "loaner_cars", int)
    if loaner_cars < 0:
        raise ProfileError("loaner_cars: must be >= 0")

    schedule = {
        key: tuple(value) if isinstance(value, list) else (str(value),)
        for key, value in data.get("schedule", {}).items()
    }
    return DealershipProfile(
        name=name,
        time_zone=tz,
        phone_number=_phone(data, "phone_number"),
        advisor_transfer_number=_phone(data, "advisor_transfer_number"),
        loaner_cars=loaner_cars,
        hours=hours,
        holidays=frozenset(holidays),
        bays=tuple(bays),
        advisors=advisors,
        services=services,
        outbound_window=outbound_window,
        customer_call_window=customer_window,
        booking_lead_time_minutes=int(data.get("booking_lead_time_minutes", 120)),
        slot_step_minutes=int(data.get("slot_step_minutes", 30)),
        max_booking_days_ahead=int(data.get("max_booking_days_ahead", 60)),
        recording_enabled=bool(data.get("recording_enabled", False)),
        schedule=schedule,
        keyterms=tuple(str(t) for t in data.get("keyterms", [])),
        campaigns=_parse_campaigns(data),
        **_parse_texting(data),
    )


# --- Texting (SMS) ---------------------------------------------------------------------
# ``address`` (top level) and the ``[texting]`` table: confirmation texts, reminders,
# quiet hours and the sender's throughput. Used by messaging/ and campaigns/reminders.py.


@dataclass(frozen=True)
class TextingSettings:
    """Text message settings (``[texting]``).

    Attributes:
        enabled: Whether the server and the worker send texts at all.
        reminder_hours: Reminders before each live appointment, hours ahead, largest first.
        send_window: Customer-local time in which reminders are sent (never outside
            08:00-21:00); a reminder due at night waits for the window to open.
        reminder_cutoff_minutes: The last reminder is not sent closer to the visit than this.
        messages_per_second: Most texts per second from the dealership's number (a US long
            code sends 1 segment per second).
        retry_after_minutes: Wait before the one retry of a transiently failed text.
    """

    enabled: bool = True
    reminder_hours: tuple[int, ...] = (24, 2)
    send_window: TimeRange = TimeRange(time(8, 0), time(21, 0))
    reminder_cutoff_minutes: int = 30
    messages_per_second: float = 1.0
    retry_after_minutes: int = 10


def _parse_texting(data: dict) -> dict[str, Any]:
    """``address`` and ``texting`` of :class:`DealershipProfile` from the TOML document."""
    address = data.get("address", "")
    if not isinstance(address, str) or len(address) > 200:
        raise ProfileError("address: expected the street address as text (at most 200 chars)")
    section = data.get("texting", {})
    if not isinstance(section, dict):
        raise ProfileError("texting: expected a table")
    where = "texting."
    enabled = section.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ProfileError(f"{where}enabled: expected true or false, got {enabled!r}")
    hours = section.get("reminder_hours", [24, 2])
    if (
        not isinstance(hours, list)
        or not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= 336 for h in hours)
        or len(set(hours)) != len(hours)
    ):
        raise ProfileError(
            f"{where}reminder_hours: expected distinct whole hours from 1 to 336, got {hours!r}"
        )
    window = _parse_range(section.get("send_window", "08:00-21:00"), f"{where}send_window")
    legal_start, legal_end = LEGAL_CALL_WINDOW
    if window.start < legal_start or window.end > legal_end:
        raise ProfileError(f"{where}send_window: must stay within 08:00-21:00")
    cutoff = _number(section, "reminder_cutoff_minutes", int, 30, 0, 600, where)
    if hours and min(hours) * 60 <= cutoff:
        raise ProfileError(f"{where}reminder_cutoff_minutes: must be less than the last reminder")
    return {
        "address": address.strip(),
        "texting": TextingSettings(
            enabled=enabled,
            reminder_hours=tuple(sorted(hours, reverse=True)),
            send_window=window,
            reminder_cutoff_minutes=cutoff,
            messages_per_second=_number(
                section, "messages_per_second", float, 1.0, 0.01, 100, where
            ),
            retry_after_minutes=_number(section, "retry_after_minutes", int, 10, 1, 24 * 60, where),
        ),
    }


# --- end of the texting block ------------------------------------------------------------


def load_profile(path: Path | str) -> DealershipProfile:
    """Read and validate a dealership profile TOML file.

    Args:
        path: Path to the TOML file.

    Returns:
        The validated profile.

    Raises:
        ProfileError: The file is missing, not TOML, or invalid; the message names the field.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileError(f"DEALERSHIP_PROFILE: file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"DEALERSHIP_PROFILE: {path} is not valid TOML: {exc}") from exc
    try:
        return parse_profile(data)
    except ProfileError as exc:
        raise ProfileError(f"{path.name}: {exc}") from exc

"""The dealership profile: hours, bays, services, advisors, calling windows.

Loaded from a TOML file (``DEALERSHIP_PROFILE``) and validated at startup by pydantic models
that mirror the file. Every mistake becomes a :class:`ProfileError` whose message names the
field, e.g. ``hours.monday: ranges 08:00-12:00 and 11:00-14:00 overlap``. The validated file
becomes the frozen :class:`DealershipProfile` the rest of the app reads.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import ErrorDetails

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


class _ItemError(ValueError):
    """A check on a whole table or list that blames one item inside it.

    Attributes:
        loc: Path of the item, relative to where the check ran (e.g. ``(2, "id")``).
    """

    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


# --- value types -------------------------------------------------------------------------


#: The end of a range written ``"...-24:00"``: the end of the day, which it includes.
END_OF_DAY = time(23, 59, 59)


@dataclass(frozen=True)
class TimeRange:
    """A local-time range within one day, ``end`` exclusive (but see :data:`END_OF_DAY`)."""

    start: time
    end: time

    def contains(self, value: time) -> bool:
        """Whether ``value`` falls inside the range."""
        return self.start <= value and (value < self.end or self.end == END_OF_DAY)


@dataclass(frozen=True)
class ScheduleSlot:
    """When a campaign runs: on some weekdays (0 = Monday), at a dealership-local time."""

    weekdays: frozenset[int]
    at: time
    label: str

    def due_on(self, day: date) -> bool:
        """Whether the slot runs on ``day``."""
        return day.weekday() in self.weekdays


def _parse_range(value: object) -> TimeRange:
    if not isinstance(value, str) or not (match := _RANGE_RE.match(value.strip())):
        raise ValueError(f"expected a range like '08:00-17:30', got {value!r}")
    sh, sm, eh, em = (int(g) for g in match.groups())
    if eh == 24 and em != 0:
        raise ValueError(f"{value!r} is not a valid time")
    start = time(sh, sm)
    end = END_OF_DAY if eh == 24 else time(eh, em)
    if end <= start:
        raise ValueError(f"range {value!r} ends before it starts")
    return TimeRange(start, end)


def _opening_ranges(value: object) -> tuple[TimeRange, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of ranges")
    ranges = sorted(map(_parse_range, value), key=lambda r: r.start)
    for earlier, later in itertools.pairwise(ranges):
        if later.start < earlier.end:
            raise ValueError(
                f"ranges {earlier.start:%H:%M}-{earlier.end:%H:%M} and "
                f"{later.start:%H:%M}-{later.end:%H:%M} overlap"
            )
    return tuple(ranges)


def _weekday(name: str) -> str:
    if name not in WEEKDAYS:
        raise ValueError(f"not a weekday name ({', '.join(WEEKDAYS)})")
    return name


def _within_legal_window(window: TimeRange) -> TimeRange:
    legal_start, legal_end = LEGAL_CALL_WINDOW
    if window.start < legal_start or window.end > legal_end:
        raise ValueError("must stay within 08:00-21:00")
    return window


def _time_zone(value: object) -> ZoneInfo:
    if not isinstance(value, str):
        raise ValueError(f"expected str, got {value!r}")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {value!r}") from None


def _e164(value: str) -> str:
    if not _E164_RE.match(value):
        raise ValueError("expected an E.164 number like +15555550100")
    return value


def _holidays(value: object) -> frozenset[date]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of YYYY-MM-DD dates, got {value!r}")
    days: set[date] = set()
    for raw in value:
        if isinstance(raw, date) and not isinstance(raw, datetime):
            days.add(raw)
            continue
        try:
            days.add(date.fromisoformat(raw if isinstance(raw, str) else ""))
        except ValueError:
            raise ValueError(f"{raw!r} is not a YYYY-MM-DD date") from None
    return frozenset(days)


def _between(kind: type[int] | type[float], low: float, high: float) -> PlainValidator:
    """A validator for a number of ``kind`` (no booleans, no strings) in ``[low, high]``."""

    def check(value: Any) -> int | float:
        ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}, got {value!r}")
        return kind(value)

    return PlainValidator(check)


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


#: Schedule keys of the profile's ``[schedule]`` table -> campaign names.
SCHEDULE_CAMPAIGNS = {"confirmations": "confirmation", "service_due": "service_due"}
_SCHEDULE_DAYS = {
    "daily": frozenset(range(7)),
    "weekdays": frozenset(range(5)),
    "weekends": frozenset({5, 6}),
    **{name[:3]: frozenset({i}) for i, name in enumerate(WEEKDAYS)},
}
_SLOT_RE = re.compile(r"^([a-z,]+)\s+([01]\d|2[0-3]):([0-5]\d)$")


def _parse_slot(value: object) -> ScheduleSlot:
    text = value.strip().lower() if isinstance(value, str) else ""
    match = _SLOT_RE.match(text)
    parts = match.group(1).split(",") if match else []
    if not match or any(part not in _SCHEDULE_DAYS for part in parts):
        raise ValueError(
            f"expected e.g. 'daily 10:00', 'weekdays 16:00' or 'mon,thu 11:30', got {value!r}"
        )
    days = frozenset().union(*(_SCHEDULE_DAYS[part] for part in parts))
    return ScheduleSlot(days, time(int(match.group(2)), int(match.group(3))), text)


def _distinct_slots(slots: tuple[ScheduleSlot, ...]) -> tuple[ScheduleSlot, ...]:
    labels = [slot.label for slot in slots]
    if len(set(labels)) != len(labels):
        raise ValueError("duplicate slot")
    return slots


OpeningRanges = Annotated[tuple[TimeRange, ...], PlainValidator(_opening_ranges)]
CallWindow = Annotated[
    TimeRange, PlainValidator(_parse_range), AfterValidator(_within_legal_window)
]
Phone = Annotated[StrictStr, AfterValidator(_e164)]
Slots = Annotated[
    tuple[Annotated[ScheduleSlot, PlainValidator(_parse_slot)], ...],
    BeforeValidator(lambda value: value if isinstance(value, list) else [value]),
    AfterValidator(_distinct_slots),
]


# --- profile objects ---------------------------------------------------------------------


def _known_capabilities(capabilities: frozenset[str]) -> frozenset[str]:
    unknown = capabilities - KNOWN_CAPABILITIES
    if unknown:
        raise ValueError(
            f"unknown capability {sorted(unknown)[0]!r} "
            f"(known: {', '.join(sorted(KNOWN_CAPABILITIES))})"
        )
    return capabilities


def _known_capability(capability: str) -> str:
    if capability not in KNOWN_CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    return capability


def _duration(minutes: int) -> int:
    if not 5 <= minutes <= 8 * 60:
        raise ValueError("must be between 5 and 480")
    return minutes


@pydantic_dataclass(frozen=True)
class Bay:
    """A service bay and the kinds of work it can take."""

    id: StrictStr
    capabilities: Annotated[frozenset[StrictStr], AfterValidator(_known_capabilities)]


@pydantic_dataclass(frozen=True)
class Advisor:
    """A service advisor."""

    id: StrictStr
    name: StrictStr


@pydantic_dataclass(frozen=True)
class Service:
    """An item of the service menu (``code`` is lower-cased)."""

    code: Annotated[StrictStr, AfterValidator(str.lower)]
    spoken_name: StrictStr
    duration_minutes: Annotated[StrictInt, AfterValidator(_duration)]
    price_min: StrictInt
    price_max: StrictInt
    capability: Annotated[StrictStr, AfterValidator(_known_capability)]

    @field_validator("price_max")
    @classmethod
    def _prices_in_order(cls, price_max: int, info: ValidationInfo) -> int:
        price_min = info.data.get("price_min")
        if price_min is not None and (price_min < 0 or price_max < price_min):
            raise ValueError("must be >= price_min >= 0")
        return price_max


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


#: Languages the bot can serve a call in (prompts, fixed sentences, voices).
SUPPORTED_LANGUAGES = ("en", "es")


@dataclass(frozen=True)
class PhoneSettings:
    """Phone features (``[phone]``).

    Attributes:
        languages: Languages offered, the first being the default (``en``, ``es``).
        pause_recording_during_verification: Pause the recording while the caller gives
            a verification factor (date of birth, ZIP code, VIN), resume after the check.
        warm_transfer: Whisper a summary to the advisor and play a hold message to the
            caller (``False``: a plain ``<Dial>``).
        transfer_ring_secs: How long the advisor line rings before the caller is told
            nobody answered and a callback is recorded.
        llm_summary: Write the post-call summary with the LLM (a template otherwise, and
            whenever the LLM fails).
    """

    languages: tuple[str, ...] = ("en",)
    pause_recording_during_verification: bool = True
    warm_transfer: bool = True
    transfer_ring_secs: int = 20
    llm_summary: bool = True


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
    address: str = ""
    texting: TextingSettings = field(default_factory=TextingSettings)
    phone: PhoneSettings = field(default_factory=PhoneSettings)

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


# --- the TOML file -----------------------------------------------------------------------


class _Outbound(BaseModel):
    """``[outbound]``: dealership-side and default customer-side calling windows."""

    window: CallWindow = TimeRange(time(9), time(19))
    customer_window: CallWindow = TimeRange(time(9), time(20))


class _Schedule(BaseModel):
    """``[schedule]``: when ``runner.py worker`` runs each campaign."""

    confirmations: Slots = ()
    service_due: Slots = ()


def _backoff(value: object) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(type(m) is int and 1 <= m <= 24 * 60 for m in value)
    ):
        raise ValueError(f"expected a list of minutes (1-1440), got {value!r}")
    return tuple(value)


class _Campaigns(BaseModel):
    """``[campaigns]``: retries, rate, concurrency and planning settings."""

    max_retries: Annotated[int, _between(int, 0, 10)] = 2
    retry_backoff_minutes: Annotated[tuple[int, ...], PlainValidator(_backoff)] = (30, 120)
    calls_per_second: Annotated[float, _between(float, 0.01, 100)] = 1.0
    max_concurrent: Annotated[int, _between(int, 1, 500)] = 4
    max_call_minutes: Annotated[int, _between(int, 1, 240)] = 15
    due_within_days: Annotated[int, _between(int, 0, 90)] = 7
    recent_attempt_days: Annotated[int, _between(int, 0, 365)] = 14
    default_miles_per_day: Annotated[float, _between(float, 1, 1000)] = 35.0


def _reminder_hours(value: object) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not all(type(h) is int and 1 <= h <= 336 for h in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(f"expected distinct whole hours from 1 to 336, got {value!r}")
    return tuple(sorted(value, reverse=True))


class _Texting(BaseModel):
    """``[texting]``: confirmation texts, reminders, quiet hours, the sender's throughput."""

    enabled: StrictBool = True
    reminder_hours: Annotated[tuple[int, ...], PlainValidator(_reminder_hours)] = (24, 2)
    send_window: CallWindow = TimeRange(time(8, 0), time(21, 0))
    reminder_cutoff_minutes: Annotated[int, _between(int, 0, 600)] = 30
    messages_per_second: Annotated[float, _between(float, 0.01, 100)] = 1.0
    retry_after_minutes: Annotated[int, _between(int, 1, 24 * 60)] = 10

    @model_validator(mode="after")
    def _cutoff_before_last_reminder(self) -> _Texting:
        if self.reminder_hours and min(self.reminder_hours) * 60 <= self.reminder_cutoff_minutes:
            raise _ItemError(("reminder_cutoff_minutes",), "must be less than the last reminder")
        return self


def _languages(value: object) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(code, str) for code in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(f"expected a list of distinct language codes, got {value!r}")
    unknown = [code for code in value if code not in SUPPORTED_LANGUAGES]
    if unknown:
        raise ValueError(
            f"unsupported language {unknown[0]!r} (supported: {', '.join(SUPPORTED_LANGUAGES)})"
        )
    return tuple(value)


class _Phone(BaseModel):
    """``[phone]``: languages, recording pauses, warm transfer, summaries."""

    languages: Annotated[tuple[str, ...], PlainValidator(_languages)] = ("en",)
    pause_recording_during_verification: StrictBool = True
    warm_transfer: StrictBool = True
    transfer_ring_secs: Annotated[int, _between(int, 5, 120)] = 20
    llm_summary: StrictBool = True


class _ProfileFile(BaseModel):
    """The profile TOML document. Unknown keys are ignored."""

    name: StrictStr
    time_zone: Annotated[ZoneInfo, PlainValidator(_time_zone)]
    phone_number: Phone
    advisor_transfer_number: Phone
    loaner_cars: Annotated[StrictInt, AfterValidator(_non_negative)]
    booking_lead_time_minutes: Annotated[int, _between(int, 0, 7 * 24 * 60)] = 120
    slot_step_minutes: Annotated[int, _between(int, 5, 240)] = 30
    max_booking_days_ahead: Annotated[int, _between(int, 0, 366)] = 60
    recording_enabled: StrictBool = False
    keyterms: tuple[StrictStr, ...] = ()
    holidays: Annotated[frozenset[date], PlainValidator(_holidays)] = frozenset()
    hours: dict[Annotated[str, AfterValidator(_weekday)], OpeningRanges]
    bays: tuple[Bay, ...]
    advisors: tuple[Advisor, ...] = ()
    services: tuple[Service, ...]
    outbound: _Outbound = _Outbound()
    schedule: _Schedule = _Schedule()
    campaigns: _Campaigns = _Campaigns()
    address: Annotated[StrictStr, StringConstraints(strip_whitespace=True, max_length=200)] = ""
    texting: _Texting = _Texting()
    phone: _Phone = _Phone()

    @field_validator("hours")
    @classmethod
    def _open_sometimes(cls, hours: dict[str, tuple[TimeRange, ...]]) -> Any:
        if not any(hours.values()):
            raise ValueError("the dealership is never open")
        return hours

    @field_validator("bays")
    @classmethod
    def _distinct_bays(cls, bays: tuple[Bay, ...]) -> tuple[Bay, ...]:
        if not bays:
            raise ValueError("at least one service bay is needed")
        seen: set[str] = set()
        for i, bay in enumerate(bays):
            if bay.id in seen:
                raise _ItemError((i, "id"), f"duplicate bay id {bay.id!r}")
            seen.add(bay.id)
        return bays

    @field_validator("services")
    @classmethod
    def _distinct_services(cls, services: tuple[Service, ...]) -> tuple[Service, ...]:
        seen: set[str] = set()
        for i, service in enumerate(services):
            if service.code in seen:
                raise _ItemError((i, "code"), f"duplicate service code {service.code!r}")
            seen.add(service.code)
        return services

    @model_validator(mode="after")
    def _services_have_bays(self) -> _ProfileFile:
        offered = frozenset().union(*(bay.capabilities for bay in self.bays))
        for i, service in enumerate(self.services):
            if service.capability not in offered:
                raise _ItemError(
                    ("services", i, "capability"), f"no bay offers {service.capability!r}"
                )
        return self

    def to_profile(self) -> DealershipProfile:
        """The profile the app reads."""
        schedule = {key: getattr(self.schedule, key) for key in SCHEDULE_CAMPAIGNS}
        return DealershipProfile(
            name=self.name,
            time_zone=self.time_zone,
            phone_number=self.phone_number,
            advisor_transfer_number=self.advisor_transfer_number,
            loaner_cars=self.loaner_cars,
            hours=dict(self.hours),
            holidays=self.holidays,
            bays=self.bays,
            advisors=self.advisors,
            services={service.code: service for service in self.services},
            outbound_window=self.outbound.window,
            customer_call_window=self.outbound.customer_window,
            booking_lead_time_minutes=self.booking_lead_time_minutes,
            slot_step_minutes=self.slot_step_minutes,
            max_booking_days_ahead=self.max_booking_days_ahead,
            recording_enabled=self.recording_enabled,
            schedule={key: tuple(slot.label for slot in slots) for key, slots in schedule.items()},
            keyterms=self.keyterms,
            campaigns=CampaignSettings(
                slots={SCHEDULE_CAMPAIGNS[key]: slots for key, slots in schedule.items()},
                **self.campaigns.model_dump(),
            ),
            address=self.address,
            texting=TextingSettings(
                **{name: getattr(self.texting, name) for name in _Texting.model_fields}
            ),
            phone=PhoneSettings(**self.phone.model_dump()),
        )


#: pydantic error types -> the type named in "expected <type>, got <value>".
_EXPECTED = {
    "string_type": "str",
    "int_type": "int",
    "float_type": "float",
    "bool_type": "bool",
    "list_type": "list",
    "tuple_type": "list",
    "set_type": "list",
    "frozen_set_type": "list",
    "dict_type": "dict",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dataclass_type": "a table",
    "dataclass_exact_type": "a table",
}


def _describe(error: ErrorDetails) -> str:
    """``field.path: message`` for one pydantic error, in the profile's own words."""
    cause = error.get("ctx", {}).get("error")
    loc = [*error["loc"], *(cause.loc if isinstance(cause, _ItemError) else ())]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc if p != "[key]")
    if error["type"] == "missing":
        message = "missing"
    elif error["type"] in _EXPECTED:
        message = f"expected {_EXPECTED[error['type']]}, got {error['input']!r}"
    elif isinstance(cause, ValueError):
        message = str(cause)
    else:
        message = error["msg"]
    return f"{where.lstrip('.')}: {message}" if where else message


def parse_profile(data: dict) -> DealershipProfile:
    """Validate a profile already parsed from TOML.

    Args:
        data: The TOML document as a dict.

    Returns:
        The validated profile.

    Raises:
        ProfileError: Every problem found (``; ``-separated), each naming its field.
    """
    try:
        document = _ProfileFile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError("; ".join(_describe(e) for e in exc.errors())) from None
    return document.to_profile()


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

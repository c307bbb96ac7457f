"""What each text says. A body never carries a date of birth or a full VIN.

Appointment texts are written when they are sent, from the appointment as it is then
(day and time in the dealership's time zone, vehicle, service, confirmation code, the
dealership's address). :func:`scrub` runs over every body before it leaves: any 17
character VIN-like token is masked to its last 4 characters, and the customer's own date
of birth and VINs are removed in every common spelling, whatever field they hid in.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from datetime import date, datetime

from core.profile import DealershipProfile
from crm.messages import TextFacts

#: Longest body we send (two GSM-7 segments); longer bodies are cut.
MAX_BODY_CHARS = 320
OPTIONS = "Reply C to confirm, R to reschedule, HELP for help, STOP to opt out."
_VIN_LIKE = re.compile(r"(?<![A-Za-z0-9])[A-HJ-NPR-Z0-9]{17}(?![A-Za-z0-9])", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def spoken_number(number: str) -> str:
    """``+15555550199`` -> ``(555) 555-0199``; other numbers unchanged."""
    digits = number.removeprefix("+1")
    if number.startswith("+1") and len(digits) == 10 and digits.isdigit():
        return f"({digits[:3]}) {digits[3:6]}-{digits[6:]}"
    return number


def when(starts_at: datetime, profile: DealershipProfile) -> str:
    """``Tue, Dec 1 at 9:00 AM CST`` in the dealership's time zone."""
    local = starts_at.astimezone(profile.time_zone)
    return f"{local:%a, %b} {local.day} at {local:%-I:%M %p} {local:%Z}"


def _clean(text: str | None, limit: int = 40) -> str:
    text = unicodedata.normalize("NFKC", text or "")
    return _CONTROL.sub("", text).strip()[:limit]


def service_names(codes: Iterable[str] | None, profile: DealershipProfile) -> str:
    """Spoken names of service codes (``oil change and tire rotation``)."""
    names = []
    for code in codes or ():
        service = profile.service(code)
        names.append(service.spoken_name if service else code.replace("_", " "))
    return " and ".join(names) or "service"


def _vehicle(facts: TextFacts) -> str:
    parts = [str(facts.vehicle_year or ""), _clean(facts.vehicle_make), _clean(facts.vehicle_model)]
    return " ".join(p for p in parts if p) or "your vehicle"


def render(facts: TextFacts, profile: DealershipProfile) -> str:
    """The body of an appointment text (booked, rescheduled, cancelled, reminder_<N>h).

    Args:
        facts: The appointment, vehicle and customer, as they are now.
        profile: Dealership name, time zone, address and phone number.

    Returns:
        The text, already scrubbed of the customer's date of birth and VINs.
    """
    name = profile.name
    at = when(facts.starts_at, profile) if facts.starts_at else "your appointment time"
    what = service_names(facts.service_codes, profile)
    vehicle = _vehicle(facts)
    code = facts.confirmation_code or ""
    address = f" {profile.address}." if profile.address else ""
    call = f"Questions? Call {spoken_number(profile.phone_number)}."
    if facts.kind == "booked":
        body = (
            f"{name} service: you're booked for {what} on {at} ({vehicle}). "
            f"Confirmation code {code}.{address} {OPTIONS}"
        )
    elif facts.kind == "rescheduled":
        body = (
            f"{name} service: your {what} is moved to {at} ({vehicle}). "
            f"New confirmation code {code}.{address} {OPTIONS}"
        )
    elif facts.kind == "cancelled":
        body = (
            f"{name} service: your {what} on {at} ({vehicle}) is cancelled. "
            f"To book again call {spoken_number(profile.phone_number)}."
        )
    elif facts.kind.startswith("reminder_"):
        body = (
            f"Reminder from {name} service: {what} on {at} for your {vehicle}. "
            f"Code {code}.{address} {OPTIONS}"
        )
    else:
        body = f"{name} service. {call}"
    return scrub(body, date_of_birth=facts.date_of_birth, vins=facts.vins)


def _date_spellings(day: date) -> set[str]:
    month = day.strftime("%B")
    return {
        day.isoformat(),
        f"{day.month}/{day.day}/{day.year}",
        f"{day.month:02d}/{day.day:02d}/{day.year}",
        f"{day.month}-{day.day}-{day.year}",
        f"{day.month:02d}-{day.day:02d}-{day.year}",
        f"{day.month}/{day.day}/{day.year % 100:02d}",
        f"{day.month:02d}/{day.day:02d}/{day.year % 100:02d}",
        f"{day.year}/{day.month:02d}/{day.day:02d}",
        f"{month} {day.day}, {day.year}",
        f"{month} {day.day} {day.year}",
        f"{month[:3]} {day.day}, {day.year}",
        f"{month[:3]} {day.day} {day.year}",
        f"{day.day} {month} {day.year}",
        f"{day.month:02d}{day.day:02d}{day.year}",
        f"{day.year}{day.month:02d}{day.day:02d}",
    }


def scrub(body: str, *, date_of_birth: date | None = None, vins: Iterable[str] = ()) -> str:
    """Remove what a text must never carry, and cap its length.

    Args:
        body: The text.
        date_of_birth: The customer's date of birth: removed in every common spelling.
        vins: The customer's VINs: each reduced to ``...`` and its last 4 characters.

    Returns:
        The safe body, at most :data:`MAX_BODY_CHARS` characters, without control
        characters.
    """
    text = _CONTROL.sub("", unicodedata.normalize("NFC", body))
    for vin in vins:
        if vin and len(vin) >= 5:
            text = re.sub(re.escape(vin), f"...{vin[-4:]}", text, flags=re.IGNORECASE)
    text = _VIN_LIKE.sub(lambda m: f"...{m.group(0)[-4:]}", text)
    if date_of_birth is not None:
        for spelling in sorted(_date_spellings(date_of_birth), key=len, reverse=True):
            text = re.sub(re.escape(spelling), "[date removed]", text, flags=re.IGNORECASE)
    if len(text) > MAX_BODY_CHARS:
        text = text[: MAX_BODY_CHARS - 3].rstrip() + "..."
    return text

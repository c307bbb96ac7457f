"""Availability: which (time, bay) slots a service can be booked into.

Pure computation over the dealership profile and the busy intervals of each bay; the
database access lives in :mod:`crm.appointments` and the calendar adapters. All times
are timezone-aware; local times are in the dealership's zone and correct across DST
changes (a local time that does not exist that day is skipped, an ambiguous one takes
its first occurrence).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from core.profile import DealershipProfile, Service

PARTS_OF_DAY: dict[str, tuple[time, time]] = {
    "morning": (time(0, 0), time(12, 0)),
    "afternoon": (time(12, 0), time(17, 0)),
    "evening": (time(17, 0), time(23, 59, 59)),
}
Interval = tuple[datetime, datetime]


@dataclass(frozen=True)
class Slot:
    """A bookable start time on one bay for one service."""

    starts_at: datetime
    ends_at: datetime
    bay_id: str
    service_code: str
    label: str


def speakable(moment: datetime, tz: ZoneInfo) -> str:
    """Render a moment the way the bot says it: ``Tuesday, November 25 at 9:00 AM``.

    Args:
        moment: An aware datetime.
        tz: The dealership's time zone.

    Returns:
        The spoken label, in local time.
    """
    local = moment.astimezone(tz)
    hour = local.hour % 12 or 12
    suffix = "AM" if local.hour < 12 else "PM"
    return f"{local:%A}, {local:%B} {local.day} at {hour}:{local.minute:02d} {suffix}"


def local_to_aware(day: date, clock: time, tz: ZoneInfo) -> datetime | None:
    """Combine a local date and time into an aware datetime.

    Args:
        day: Local calendar day.
        clock: Local wall-clock time.
        tz: Time zone.

    Returns:
        The aware datetime, or ``None`` when that wall-clock time does not exist that day
        (skipped by a DST change).
    """
    candidate = datetime.combine(day, clock, tzinfo=tz)
    round_trip = candidate.astimezone(UTC).astimezone(tz)
    if round_trip.replace(tzinfo=None) != candidate.replace(tzinfo=None):
        return None
    return candidate


def _overlaps(start: datetime, end: datetime, busy: Sequence[Interval]) -> bool:
    return any(b_start < end and start < b_end for b_start, b_end in busy)


def candidate_slots(
    *,
    profile: DealershipProfile,
    service: Service,
    busy_by_bay: Mapping[str, Sequence[Interval]],
    shop_busy: Sequence[Interval] = (),
    date_from: date,
    date_to: date,
    now: datetime,
    part_of_day: str | None = None,
) -> Iterable[Slot]:
    """Yield every free slot for ``service`` in chronological order.

    Args:
        profile: The dealership profile (hours, holidays, bays, lead time).
        service: The service to book; its duration and capability decide the bays.
        busy_by_bay: Busy intervals per bay id (active appointments).
        shop_busy: Intervals that block every bay (e.g. calendar busy times).
        date_from: First local day to consider (inclusive).
        date_to: Last local day to consider (inclusive).
        now: Current time (aware); nothing earlier than now plus the lead time is offered.
        part_of_day: ``morning``, ``afternoon`` or ``evening`` to narrow the search.

    Yields:
        Free slots, earliest first; for one start time, the first free capable bay.
    """
    tz = profile.time_zone
    earliest = now + timedelta(minutes=profile.booking_lead_time_minutes)
    duration = timedelta(minutes=service.duration_minutes)
    step = timedelta(minutes=profile.slot_step_minutes)
    bays = profile.bays_for(service.capability)
    window = PARTS_OF_DAY.get(part_of_day or "", (time(0, 0), time(23, 59, 59)))
    day = date_from
    while day <= date_to:
        for opening in profile.opening_hours(day):
            close = local_to_aware(day, opening.end, tz)
            cursor = datetime.combine(day, opening.start)
            while True:
                clock = cursor.time()
                if cursor.date() != day:
                    break
                start = local_to_aware(day, clock, tz)
                cursor += step
                if start is None:
                    continue
                end = start + duration  # absolute duration, right across DST changes
                if close is None or end > close:
                    break
                if start < earliest or not (window[0] <= clock < window[1]):
                    continue
                if _overlaps(start, end, shop_busy):
                    continue
                for bay in bays:
                    if not _overlaps(start, end, busy_by_bay.get(bay.id, ())):
                        yield Slot(
                            starts_at=start,
                            ends_at=end,
                            bay_id=bay.id,
                            service_code=service.code,
                            label=speakable(start, tz),
                        )
                        break
        day += timedelta(days=1)


def pick_spread(slots: Iterable[Slot], *, limit: int = 5, per_day: int = 2) -> list[Slot]:
    """Choose up to ``limit`` slots spread over days, earliest first.

    At most ``per_day`` slots are taken from one day on the first pass, at least an hour
    apart, so a caller hears real choices; remaining room is then filled in order.

    Args:
        slots: Free slots in chronological order.
        limit: How many to return.
        per_day: Cap per day on the first pass.

    Returns:
        The chosen slots, sorted by start time.
    """
    pool = list(slots)
    chosen: list[Slot] = []
    taken_per_day: dict[date, list[datetime]] = defaultdict(list)
    for slot in pool:
        if len(chosen) >= limit:
            break
        day = slot.starts_at.date()
        starts = taken_per_day[day]
        if len(starts) >= per_day or any(
            abs(slot.starts_at - s) < timedelta(hours=1) for s in starts
        ):
            continue
        chosen.append(slot)
        starts.append(slot.starts_at)
    for slot in pool:
        if len(chosen) >= limit:
            break
        if slot not in chosen:
            chosen.append(slot)
    return sorted(chosen, key=lambda s: (s.starts_at, s.bay_id))

"""Slot computation: hours, holidays, bays, lead time, part of day, DST."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime, time, timedelta

from core.profile import TimeRange, load_profile
from core.settings import DEFAULT_PROFILE
from scheduling.availability import candidate_slots, local_to_aware, pick_spread, speakable

PROFILE = load_profile(DEFAULT_PROFILE)
TZ = PROFILE.time_zone
OIL = PROFILE.service("oil_change")


def _slots(**kwargs):
    defaults = dict(
        profile=PROFILE,
        service=OIL,
        busy_by_bay={},
        date_from=date(2026, 11, 30),
        date_to=date(2026, 12, 4),
        now=datetime(2026, 11, 29, 12, 0, tzinfo=TZ),
    )
    defaults.update(kwargs)
    return list(candidate_slots(**defaults))


def test_slots_inside_hours_on_capable_bays() -> None:
    slots = _slots()
    assert slots
    for slot in slots:
        local = slot.starts_at.astimezone(TZ)
        assert local.weekday() < 5
        assert time(7, 30) <= local.time()
        assert slot.ends_at.astimezone(TZ).time() <= time(18, 0)
        assert slot.ends_at - slot.starts_at == timedelta(minutes=45)
        assert slot.bay_id in {"bay-1", "bay-2", "bay-6"}  # quick_lube bays only
    assert slots[0].label == "Monday, November 30 at 7:30 AM"


def test_busy_bays_and_lead_time_and_past() -> None:
    start = datetime(2026, 11, 30, 7, 30, tzinfo=TZ)
    busy = {b: [(start, start + timedelta(hours=2))] for b in ("bay-1", "bay-2", "bay-6")}
    slots = _slots(busy_by_bay=busy)
    assert slots[0].starts_at == start + timedelta(hours=2)
    # now is Monday 10:00: lead time of 2 h means nothing before 12:00
    now = datetime(2026, 11, 30, 10, 0, tzinfo=TZ)
    slots = _slots(now=now)
    assert min(s.starts_at for s in slots) == datetime(2026, 11, 30, 12, 0, tzinfo=TZ)


def test_holiday_and_part_of_day() -> None:
    slots = _slots(date_from=date(2026, 12, 25), date_to=date(2026, 12, 25))
    assert slots == []
    afternoon = _slots(part_of_day="afternoon")
    assert afternoon and all(12 <= s.starts_at.astimezone(TZ).hour < 17 for s in afternoon)


def test_dst_spring_forward_and_fall_back() -> None:
    # A shop open around the clock on Sunday 2027-03-14, when 02:00-03:00 does not exist
    # in America/Chicago, and on 2026-11-01, when 01:00-02:00 happens twice.
    hours = dict(PROFILE.hours, sunday=(TimeRange(time(0, 0), time(23, 59, 59)),))
    profile = dataclasses.replace(PROFILE, hours=hours, slot_step_minutes=30)
    spring = list(
        candidate_slots(
            profile=profile,
            service=OIL,
            busy_by_bay={},
            date_from=date(2027, 3, 14),
            date_to=date(2027, 3, 14),
            now=datetime(2027, 3, 1, tzinfo=UTC),
        )
    )
    local_hours = {s.starts_at.astimezone(TZ).strftime("%H:%M") for s in spring}
    assert "02:00" not in local_hours and "02:30" not in local_hours
    assert {"01:30", "03:00"} <= local_hours
    for slot in spring:  # durations are real elapsed time across the change
        assert slot.ends_at.astimezone(UTC) - slot.starts_at.astimezone(UTC) == timedelta(
            minutes=45
        )
    assert local_to_aware(date(2027, 3, 14), time(2, 30), TZ) is None
    fall = local_to_aware(date(2026, 11, 1), time(1, 30), TZ)
    assert fall is not None and fall.utcoffset() == timedelta(hours=-5)  # first occurrence
    assert speakable(datetime(2027, 3, 14, 8, 0, tzinfo=UTC), TZ) == "Sunday, March 14 at 3:00 AM"


def test_pick_spread_limits_and_spreads() -> None:
    chosen = pick_spread(_slots(), limit=5)
    assert len(chosen) == 5
    days = [s.starts_at.date() for s in chosen]
    assert len(set(days)) >= 3
    assert chosen == sorted(chosen, key=lambda s: s.starts_at)

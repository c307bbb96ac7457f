"""Dealership profile validation: the shipped example loads, mistakes name the field."""

from __future__ import annotations

import tomllib
from datetime import date, time

import pytest

from core.profile import ProfileError, load_profile, parse_profile
from core.settings import DEFAULT_PROFILE


@pytest.fixture
def profile_data() -> dict:
    return tomllib.loads(DEFAULT_PROFILE.read_text())


def test_example_profile_loads() -> None:
    profile = load_profile(DEFAULT_PROFILE)
    assert profile.name == "Riverside Motors"
    assert str(profile.time_zone) == "America/Chicago"
    assert profile.service("OIL_CHANGE").duration_minutes == 45
    assert {b.id for b in profile.bays_for("alignment")} == {"bay-5"}
    assert profile.opening_hours(date(2026, 12, 25)) == ()  # holiday
    assert profile.opening_hours(date(2026, 11, 29)) == ()  # a Sunday
    assert profile.opening_hours(date(2026, 11, 30))[0].start == time(7, 30)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(time_zone="Mars/Olympus"), "time_zone: unknown time zone"),
        (
            lambda d: d["hours"].update(monday=["08:00-12:00", "11:00-14:00"]),
            "hours.monday: ranges 08:00-12:00 and 11:00-14:00 overlap",
        ),
        (lambda d: d["hours"].update(monday=["18:00-08:00"]), "ends before it starts"),
        (lambda d: d["hours"].update(funday=["08:00-12:00"]), "hours.funday: not a weekday"),
        (
            lambda d: d["bays"][0].update(capabilities=["teleport"]),
            "bays[0].capabilities: unknown capability 'teleport'",
        ),
        (
            lambda d: d["services"][0].update(capability="body"),
            "services[0].capability: no bay offers 'body'",
        ),
        (lambda d: d.update(holidays=["Christmas"]), "holidays: 'Christmas'"),
        (lambda d: d.pop("name"), "name: missing"),
        (lambda d: d["outbound"].update(window="07:00-19:00"), "outbound.window: must stay"),
        (lambda d: d.update(advisor_transfer_number="555-1234"), "advisor_transfer_number"),
    ],
)
def test_invalid_profiles_name_the_field(profile_data: dict, mutate, message: str) -> None:
    mutate(profile_data)
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_profile(profile_data)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ProfileError, match="file not found"):
        load_profile(tmp_path / "nope.toml")

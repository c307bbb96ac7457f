"""Dealership profile validation: the shipped example loads, mistakes name the field."""

from __future__ import annotations

import copy
import re
import tomllib
from datetime import date, time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.profile import ProfileError, TimeRange, load_profile, parse_profile
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


def _parent(data: dict, path: str) -> tuple[Any, str | int]:
    """The container and key that the path ``a.0.b`` names in ``data``."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target: Any = data
    for key in parents:
        target = target[key]
    return target, last


def _set(data: dict, path: str, value: object) -> None:
    """``data[a][0][b] = value`` for the path ``a.0.b``."""
    target, key = _parent(data, path)
    target[key] = value


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("name", 5, "name: expected str, got 5"),
        ("time_zone", 7, "time_zone: expected str, got 7"),
        ("time_zone", "../etc/passwd", "time_zone: unknown time zone '../etc/passwd'"),
        ("phone_number", "+1 555 555 0199", "phone_number: expected an E.164 number"),
        ("loaner_cars", -1, "loaner_cars: must be >= 0"),
        ("loaner_cars", True, "loaner_cars: expected int, got True"),
        ("slot_step_minutes", 0, "slot_step_minutes: expected a number from 5 to 240, got 0"),
        ("recording_enabled", "yes", "recording_enabled: expected bool, got 'yes'"),
        ("keyterms", ["Camry", 7], "keyterms[1]: expected str, got 7"),
        ("hours", [], "hours: expected dict, got []"),
        ("hours.monday", "07:30-18:00", "hours.monday: expected a list of ranges"),
        ("hours.monday", ["7:30-18:00"], "hours.monday: expected a range like '08:00-17:30'"),
        ("hours.monday", ["08:00-24:30"], "hours.monday: '08:00-24:30' is not a valid time"),
        ("hours.monday", ["08:00-08:00"], "hours.monday: range '08:00-08:00' ends before it"),
        ("holidays", "2026-12-25", "holidays: expected a list of YYYY-MM-DD dates"),
        ("bays", [], "bays: at least one service bay is needed"),
        ("bays.1.id", "bay-1", "bays[1].id: duplicate bay id 'bay-1'"),
        ("bays.0", "bay-1", "bays[0]: expected a table, got 'bay-1'"),
        ("bays.0.capabilities", "general", "bays[0].capabilities: expected list, got 'general'"),
        ("advisors.1", {"id": "adv-x"}, "advisors[1].name: missing"),
        ("services.0.duration_minutes", 600, "services[0].duration_minutes: must be between 5"),
        ("services.0.duration_minutes", 45.0, "services[0].duration_minutes: expected int"),
        ("services.0.price_max", 10, "services[0].price_max: must be >= price_min >= 0"),
        ("services.0.capability", "warp", "services[0].capability: unknown capability 'warp'"),
        ("services.1.code", "OIL_CHANGE", "services[1].code: duplicate service code 'oil_change'"),
        ("outbound", "09:00-19:00", "outbound: expected a table, got '09:00-19:00'"),
        ("outbound.customer_window", "08:00-21:30", "outbound.customer_window: must stay within"),
        ("schedule.service_due", ["weekdays 11:00", "Weekdays 11:00"], "service_due: duplicate"),
        ("schedule.confirmations", ["daily"], r"schedule.confirmations[0]: expected e.g."),
        ("campaigns.max_concurrent", 0, "campaigns.max_concurrent: expected a number from 1"),
        ("phone.languages", ["en", "fr"], "phone.languages: unsupported language 'fr'"),
        ("phone.languages", [], "phone.languages: expected a list of distinct language codes"),
        ("phone.languages", ["es", "es"], "phone.languages: expected a list of distinct"),
        ("phone.warm_transfer", "yes", "phone.warm_transfer: expected bool, got 'yes'"),
        ("phone.transfer_ring_secs", 1, "phone.transfer_ring_secs: expected a number from 5"),
        ("phone.llm_summary", 1, "phone.llm_summary: expected bool, got 1"),
    ],
)
def test_each_mistake_names_its_field(
    profile_data: dict, path: str, value: object, message: str
) -> None:
    _set(profile_data, path, value)
    with pytest.raises(ProfileError) as caught:
        parse_profile(profile_data)
    assert message in str(caught.value)


def test_the_dealership_must_open_sometime(profile_data: dict) -> None:
    profile_data["hours"] = {day: [] for day in profile_data["hours"]}
    with pytest.raises(ProfileError, match=r"^hours: the dealership is never open$"):
        parse_profile(profile_data)


def test_every_mistake_is_reported_at_once(profile_data: dict) -> None:
    del profile_data["name"]
    profile_data["hours"]["monday"] = ["18:00-08:00"]
    profile_data["campaigns"]["max_retries"] = 99
    with pytest.raises(ProfileError) as caught:
        parse_profile(profile_data)
    assert str(caught.value) == (
        "name: missing; "
        "hours.monday: range '18:00-08:00' ends before it starts; "
        "campaigns.max_retries: expected a number from 0 to 10, got 99"
    )


def test_load_profile_prefixes_the_file_name(tmp_path) -> None:
    bad = tmp_path / "dealer.toml"
    bad.write_text(DEFAULT_PROFILE.read_text().replace('"America/Chicago"', '"Mars/Olympus"'))
    with pytest.raises(ProfileError, match=r"^dealer\.toml: time_zone: unknown time zone"):
        load_profile(bad)
    bad.write_text("name = ")
    with pytest.raises(ProfileError, match=r"dealer\.toml is not valid TOML"):
        load_profile(bad)


def test_loaded_values_keep_their_shape() -> None:
    profile = load_profile(DEFAULT_PROFILE)
    assert profile.outbound_window == TimeRange(time(9), time(19))
    assert profile.customer_call_window == TimeRange(time(9), time(20))
    assert date(2026, 12, 25) in profile.holidays
    assert [s.label for s in profile.campaigns.slots["service_due"]] == [
        "weekdays 11:00",
        "weekdays 16:00",
    ]
    assert profile.campaigns.slots["confirmation"][0].due_on(date(2026, 11, 29))  # a Sunday
    assert profile.campaigns.retry_backoff_minutes == (30, 120)
    assert profile.speech_keyterms()[:2] == ["Riverside Motors", "Toyota"]
    assert profile.service(" Oil_Change ").spoken_name == "oil change"


# --- fuzz: whatever a TOML file holds, the answer is a profile or a ProfileError ----------


def _paths(value: object, prefix: str = "") -> list[str]:
    """Every key and list index of the example profile, as ``a.0.b`` paths."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in items:
        path = f"{prefix}{key}"
        found.append(path)
        if isinstance(child, dict | list):
            found.extend(_paths(child, f"{path}."))
    return found


EXAMPLE = tomllib.loads(DEFAULT_PROFILE.read_text())
PATHS = _paths(EXAMPLE)
TOP_LEVEL = "|".join(re.escape(key) for key in EXAMPLE)
toml_scalars = (
    st.text(max_size=12)
    | st.sampled_from(["08:00-12:00", "24:00", "daily 10:00", "+15555550100", "general"])
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.booleans()
    | st.dates()
    | st.datetimes()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


DELETE = object()


@settings(max_examples=400, deadline=None)
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(PATHS), toml_values | st.just(DELETE)), min_size=1, max_size=3
    )
)
def test_fuzzed_profiles_give_a_profile_or_a_profile_error(changes: list) -> None:
    data = copy.deepcopy(EXAMPLE)
    for path, value in changes:
        try:
            target, key = _parent(data, path)
            if value is DELETE:
                del target[key]
            else:
                target[key] = copy.deepcopy(value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced the parent
    try:
        parse_profile(data)
    except ProfileError as exc:
        assert re.match(rf"^({TOP_LEVEL})\b", str(exc)), str(exc)


def test_phone_features_have_defaults_and_the_example_offers_spanish(profile_data: dict) -> None:
    example = parse_profile(profile_data).phone
    assert example.languages == ("en", "es") and example.pause_recording_during_verification
    del profile_data["phone"]
    defaults = parse_profile(profile_data).phone
    assert defaults.languages == ("en",) and defaults.warm_transfer
    assert defaults.transfer_ring_secs == 20 and defaults.llm_summary


def test_a_range_to_24_00_includes_the_last_second_of_the_day(profile_data: dict) -> None:
    """ "00:00-24:00" is open around the clock: the CI run at 23:59 Chicago time found
    that "00:00-23:59" (and "24:00", then an exclusive 23:59:59) left a gap."""
    data = copy.deepcopy(profile_data)
    data["hours"] = {day: ["00:00-24:00"] for day in data["hours"]}
    [whole_day] = parse_profile(data).opening_hours(date(2026, 11, 30))
    for moment in (time(0, 0), time(12, 0), time(23, 59), time(23, 59, 59, 999_999)):
        assert whole_day.contains(moment)
    assert not TimeRange(time(8, 0), time(17, 30)).contains(time(17, 30))  # still exclusive

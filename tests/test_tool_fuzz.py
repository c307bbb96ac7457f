"""Hostile tool arguments and verification factors, on a migrated and seeded CRM.

* A hypothesis fuzz suite calls EVERY registered tool through :func:`tools.registry.run_tool`
  (the dispatch the bot's flow functions and the tool console use) with arbitrary JSON for
  declared and undeclared keys, for callers in every state (unknown number, caller ID
  matched but unverified, verified): the result is always a well-formed JSON object, ``ok``
  or an error code the tools declare with a sentence to say, never ``internal``.
* Every tool run for each verified demo customer, plus the system prompts, greetings and
  call snapshot: no date of birth, ZIP code, VIN or VIN last four appears anywhere.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

import tools  # noqa: F401  (registers every tool)
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from scheduling.calendar import PostgresCalendar
from seed_data import DEMO_CUSTOMERS, seed
from tools.context import CallSession, ToolContext
from tools.customers import identify_caller
from tools.registry import TOOLS, run_tool

REPO = Path(__file__).resolve().parents[1]
PROFILE = load_profile(DEFAULT_PROFILE)
TZ = PROFILE.time_zone
ANCHOR = date(2026, 11, 30)
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=TZ)  # Monday morning: open
NIGHT = datetime(2026, 11, 30, 22, 0, tzinfo=TZ)  # closed: hand-offs become callbacks
MARIA = DEMO_CUSTOMERS[0]
#: The fuzzed caller: two vehicles and an unconfirmed appointment to work on.
JAMES = DEMO_CUSTOMERS[1]


def declared_error_codes() -> set[str]:
    """Every error code the tools can answer with, read from their source."""
    codes = {"unknown_tool", "bad_arguments", "missing_argument", "refused"}
    for path in (REPO / "tools").glob("*.py"):
        if path.name == "console.py":  # the console's own line errors are not tool results
            continue
        text = path.read_text(encoding="utf-8")
        codes.update(re.findall(r'code="([a-z_]+)"', text))
        codes.update(re.findall(r'"error": "([a-z_]+)"', text))
    codes.discard("internal")  # an unexpected error: never the answer to bad input
    return codes


KNOWN_ERRORS = declared_error_codes()


def assert_well_formed(result: Any) -> None:
    """A result the model can read and the bot can say."""
    assert isinstance(result, dict), result
    json.dumps(result)  # plain JSON, nothing that needs a default=
    assert result.get("ok") in (True, False), result
    if result["ok"] is False:
        assert result.get("error") in KNOWN_ERRORS, result
        assert isinstance(result.get("say"), str) and result["say"].strip(), result
    elif "say" in result:
        assert isinstance(result["say"], str) and result["say"].strip(), result


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    await seed(migrated_db, customers=60, seed=7, anchor_date=ANCHOR)
    return migrated_db


@pytest.fixture
async def pool(crm_db: str):
    async with AsyncConnectionPool(crm_db, min_size=1, max_size=10, open=False) as pool:
        yield pool


def make_ctx(pool, redis_client, caller: str | None, *, now: datetime = NOW) -> ToolContext:
    session = CallSession(call_sid=f"CAfuzz{id(object()):x}", caller_phone=caller)
    return ToolContext(
        session=session,
        db=pool,
        profile=PROFILE,
        calendar=PostgresCalendar(),
        now=lambda: now,
    )


async def _ids(pool) -> dict[str, list[int]]:
    """Real ids the fuzzer mixes in: James's and other customers' vehicles, appointments."""
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM vehicles ORDER BY customer_id <> 2, id LIMIT 6")
        vehicles = [r[0] for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT id FROM appointments ORDER BY customer_id <> 2, id DESC LIMIT 6"
        )
        appointments = [r[0] for r in await cur.fetchall()]
        cur = await conn.execute(
            "SELECT id FROM appointments WHERE customer_id = 2 AND status = 'scheduled'"
        )
        upcoming = [r[0] for r in await cur.fetchall()]
    assert upcoming, "James's upcoming appointment is missing from the seed"
    return {"vehicles": vehicles, "appointments": appointments, "upcoming": upcoming}


# -- strategies -------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
NASTY_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "oil\x00change",
        "\ud800",
        "x" * 501,
        "9" * 5000,
        "'; DROP TABLE customers; --",
        "%(id)s",
        "{}",
        "null",
        "NaN",
        "-1",
        "0",
        "12",
        "1e400",
        "٣",
        "🚗",
        "\n\t",
        "slot-000000",
    ]
)
DATES = st.sampled_from(
    [
        "2026-11-30",
        "2026-12-01",
        "2026-12-24",
        "2027-03-14",
        "0001-01-01",
        "9999-12-31",
        "2026-02-30",
        "20261201",
        "2026-W49-1",
        "tomorrow",
        "1985-04-12",
        "April 12th, 1985",
        "04/12/1985",
    ]
)
NUMBERS_AS_TEXT = st.integers(min_value=-(2**70), max_value=2**70).map(str)
BIG_INTEGERS = st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30])


def _spelled(choices: list[str]) -> st.SearchStrategy[str]:
    """Choices as the model might write them: other case, padding, spaces for underscores."""
    return st.tuples(st.sampled_from(choices), st.sampled_from(["", "upper", "pad", "space"])).map(
        lambda pair: {
            "": pair[0],
            "upper": pair[0].upper(),
            "pad": f"  {pair[0]} ",
            "space": pair[0].replace("_", " "),
        }[pair[1]]
    )


ISO_DATES = st.one_of(
    DATES,
    st.sampled_from(["9999-12-31", "0001-01-01", "9999-12-26", "2026-11-29"]),
    st.dates().map(date.isoformat),
    st.dates(min_value=date(2026, 11, 1), max_value=date(2027, 3, 31)).map(date.isoformat),
)


def one_of_list(values: list[int]) -> st.SearchStrategy[int]:
    """An element of ``values``, a list that grows during the run (booked appointments).

    Hypothesis draws a plain index, so the strategy stays the same while the list grows.
    """
    return st.integers(min_value=0, max_value=10**6).map(lambda i: values[i % len(values)])


def targeted(
    name: str, ids: dict[str, list[int]], slots: dict[str, Any]
) -> st.SearchStrategy | None:
    """Plausible values for the arguments the tools declare, to reach their deeper paths."""
    vehicles = one_of_list(ids["vehicles"])
    appointments = one_of_list(ids["upcoming"]) | one_of_list(ids["appointments"])
    demo = DEMO_CUSTOMERS
    by_name: dict[str, st.SearchStrategy] = {
        "service_type": _spelled([*sorted(PROFILE.services), "teleportation"]),
        "date_from": ISO_DATES,
        "date_to": ISO_DATES,
        "part_of_day": _spelled(["morning", "afternoon", "evening", "lunch"]),
        "transportation": _spelled(["waiter", "drop_off", "loaner", "shuttle", "uber"]),
        "slot_id": st.sampled_from(sorted(slots) or ["slot-abc"]),
        "vehicle_id": vehicles | vehicles.map(str),
        "appointment_id": appointments | appointments.map(str),
        "phone": st.sampled_from([c.phone for c in demo] + ["5555550101", "+1 (555) 555-0199"])
        | st.text(alphabet="0123456789+-() ", max_size=20),
        "first_name": st.sampled_from([c.first_name for c in demo]),
        "last_name": st.sampled_from([c.last_name for c in demo]),
        "zip_code": st.sampled_from([c.zip_code for c in demo] + ["60614-1234", "6061"])
        | st.text(alphabet="0123456789- ", max_size=12),
        "date_of_birth": ISO_DATES | st.sampled_from([c.date_of_birth.isoformat() for c in demo]),
        "vin_last4": st.sampled_from([v.vin[-4:] for c in demo for v in c.vehicles])
        | st.text(alphabet="ABCDEFGHJKLMNPRSTUVWXYZ0123456789 -", max_size=8),
        "reason": st.text(max_size=80),
        "notes": st.text(max_size=80),
        "answer": st.booleans() | st.sampled_from(["yes", "no", "true", "false"]),
    }
    return by_name.get(name)


def hostile_for(spec: dict[str, Any]) -> st.SearchStrategy:
    """Values a model should never send for a property of this type."""
    hostile = [JSON_VALUES, NASTY_STRINGS, st.text(max_size=40)]
    if spec["type"] == "integer":
        hostile += [
            st.integers(),
            BIG_INTEGERS,
            NUMBERS_AS_TEXT,
            st.floats(min_value=-1e6, max_value=1e6),
        ]
    else:
        hostile += [st.integers(min_value=-(10**6), max_value=10**6), ISO_DATES]
    return st.one_of(*hostile)


def arguments_for(name: str, ids: dict[str, list[int]], slots: dict[str, Any]) -> st.SearchStrategy:
    """Arguments for one tool: plausible ones (to reach the business paths), plausible ones
    with one hostile value, any mix, undeclared keys, or not an object at all."""
    schema = TOOLS[name].schema
    properties = schema.properties
    plausible = {
        key: hostile_for(spec) if strategy is None else strategy
        for key, spec in properties.items()
        for strategy in [targeted(key, ids, slots)]
    }
    hostile = {key: hostile_for(spec) for key, spec in properties.items()}
    good = st.fixed_dictionaries(
        {k: plausible[k] for k in schema.required},
        optional={k: v for k, v in plausible.items() if k not in schema.required},
    )
    if "slot_id" in properties and "service_type" in properties:
        # Booking: mostly the service the slot was offered for, as the model would.
        good = st.tuples(good, st.booleans()).map(
            lambda pair: (
                {**pair[0], "service_type": slots[pair[0]["slot_id"]].service_code}
                if pair[1] and pair[0].get("slot_id") in slots
                else pair[0]
            )
        )
    options = [good, good, good]
    if properties:
        keys = sorted(properties)
        one_bad = st.tuples(
            good, st.sampled_from(keys).flatmap(lambda key: st.tuples(st.just(key), hostile[key]))
        ).map(lambda pair: {**pair[0], pair[1][0]: pair[1][1]})
        mixed = st.fixed_dictionaries(
            {}, optional={k: st.one_of(plausible[k], hostile[k]) for k in keys}
        )
        options += [one_bad, one_bad, mixed]
    undeclared = st.dictionaries(
        st.text(max_size=12) | st.sampled_from(["customer_id", "ctx", "verified", "__class__"]),
        JSON_VALUES,
        min_size=1,
        max_size=3,
    )
    options.append(st.tuples(good, undeclared).map(lambda pair: {**pair[1], **pair[0]}))
    options.append(JSON_VALUES)
    return st.one_of(*options)


# -- the fuzz suite ---------------------------------------------------------------------

CASES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()
FUZZ_EXAMPLES = 2000


@pytest.fixture
async def real_ids(pool, redis_client) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Real ids and slot ids (offered to James) for the fuzzer to mix in."""
    ids = await _ids(pool)
    offer = make_ctx(pool, redis_client, JAMES.phone)
    for service in ("oil_change", "tire_rotation"):
        result = await run_tool(offer, "check_availability", {"service_type": service})
        assert result["ok"] and result["slots"], result
    return ids, dict(offer.session.offered_slots)


@pytest.fixture
def fuzz_cases():
    """Counts the fuzz cases per tool and caller state; every pair must be exercised."""
    CASES.clear()
    OUTCOMES.clear()
    yield CASES
    total = sum(CASES.values())
    print(f"\ntool fuzz: {total} cases: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))
    for name in TOOLS:
        for state in ("unknown", "unverified", "verified"):
            assert CASES[f"{name}/{state}"] >= 3, (name, state, CASES)
    # Past the argument checks and the verification gate, into each tool's business.
    shallow = ("bad_arguments", "missing_argument", "not_verified", "no_customer")
    for name in TOOLS:
        deep = sum(
            n
            for k, n in OUTCOMES.items()
            if k.startswith(f"{name}:") and k.split(":")[1] not in shallow
        )
        assert deep >= 1, (name, OUTCOMES)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
@pytest.mark.timeout(900)
async def test_every_tool_answers_hostile_arguments_with_a_sentence(
    pool, redis_client, real_ids, fuzz_cases, data
) -> None:
    ids, slots = real_ids
    name = data.draw(st.sampled_from(sorted(TOOLS)), label="tool")
    state = data.draw(st.sampled_from(["unknown", "unverified", "verified"]), label="caller")
    now = data.draw(st.sampled_from([NOW, NOW, NOW, NIGHT]), label="now")
    arguments = data.draw(arguments_for(name, ids, slots), label="arguments")
    ctx = make_ctx(pool, redis_client, "+15555559999" if state == "unknown" else JAMES.phone)
    ctx.now = lambda: now
    if state != "unknown":
        assert await identify_caller(ctx)
    if state == "verified":
        ctx.session.verified = True  # as after verify_customer, without using an attempt
        ctx.session.offered_slots.update(slots)
    async with pool.connection() as conn:  # keep the comparison path reachable
        await conn.execute(
            "UPDATE customers SET verification_attempts = '{}', verification_locked_until = NULL,"
            " verification_failed_attempts = 0, verification_last_failed_at = NULL WHERE id = 2"
        )
    fuzz_cases[f"{name}/{state}"] += 1
    result = await run_tool(ctx, name, arguments)
    OUTCOMES[f"{name}:{result.get('error') or 'ok'}"] += 1
    if isinstance(result.get("appointment_id"), int):  # later cases work on it
        ids["upcoming"].append(result["appointment_id"])
    assert_well_formed(result)
    assert result.get("error") != "internal", (name, arguments, result)


async def test_registry_rejects_wrong_types_with_the_argument_named(pool, redis_client) -> None:
    """The reported case and its relatives: a sentence, and the tool does not run."""
    ctx = make_ctx(pool, redis_client, MARIA.phone)
    assert await identify_caller(ctx)
    ctx.session.verified = True
    for arguments in (
        {"vehicle_id": "abc"},
        {"vehicle_id": ["a"]},
        {"vehicle_id": {"id": 1}},
        {"vehicle_id": True},
        {"vehicle_id": 1.5},
        {"vehicle_id": 2**64},
        {"vehicle_id": "1e3"},
    ):
        result = await run_tool(ctx, "get_vehicle_history", arguments)
        assert result["error"] == "bad_arguments", (arguments, result)
        assert result["argument"] == "vehicle_id"
        assert result["say"] == "Sorry, I didn't catch the vehicle id. Could you say it again?"
    # Numeric strings and integral floats are what the model meant.
    vehicle_id = (await run_tool(ctx, "get_vehicle_history", {}))["vehicles"][0]["vehicle_id"]
    for spelled in (str(vehicle_id), f" {vehicle_id} ", float(vehicle_id)):
        result = await run_tool(ctx, "get_vehicle_history", {"vehicle_id": spelled})
        assert result["ok"] and result["vehicles"][0]["vehicle_id"] == vehicle_id
    # Strings: too long, NUL bytes, enum values said differently.
    long = await run_tool(ctx, "check_availability", {"service_type": "x" * 501})
    assert long["error"] == "bad_arguments" and "too long" in long["say"]
    nul = await run_tool(ctx, "check_availability", {"service_type": "oil\x00change"})
    assert nul["error"] == "bad_arguments"
    spaced = await run_tool(
        ctx, "check_availability", {"service_type": "oil_change", "part_of_day": " Afternoon "}
    )
    assert spaced["ok"] and all("PM" in s["when"] for s in spaced["slots"])
    wrong = await run_tool(
        ctx, "check_availability", {"service_type": "oil_change", "part_of_day": "lunch"}
    )
    assert wrong["say"] == (
        "Sorry, I didn't catch the part of day. It can be morning, afternoon or evening."
    )
    # Not an object at all, and a tool name that is not a string.
    assert (await run_tool(ctx, "list_appointments", ["a"]))["error"] == "bad_arguments"
    assert (await run_tool(ctx, ["a"], {}))["error"] == "unknown_tool"  # type: ignore[arg-type]
    # Undeclared keys never reach a tool: no customer id from the model.
    other = await run_tool(ctx, "get_vehicle_history", {"customer_id": 2})
    assert other["ok"] and {v["name"] for v in other["vehicles"]} == {"2021 Toyota Camry SE"}


# -- verification factors never reach the model ------------------------------------------


def _factor_patterns(customer) -> list[re.Pattern[str]]:
    dob: date = customer.date_of_birth
    values = [
        dob.isoformat(),
        dob.strftime("%Y%m%d"),
        dob.strftime("%m/%d/%Y"),
        f"{dob:%B} {dob.day}, {dob.year}",
        f"{dob:%B} {dob.day}",
        customer.zip_code,
    ]
    for vehicle in customer.vehicles:
        values += [vehicle.vin, vehicle.vin[-4:], vehicle.vin[-6:]]
    # As a token: a VIN ending "0001" must not match inside an unrelated longer number.
    return [
        re.compile(rf"(?<![0-9A-Za-z]){re.escape(v)}(?![0-9A-Za-z])", re.IGNORECASE) for v in values
    ]


def _leaks(text: str, customer) -> list[str]:
    return [p.pattern for p in _factor_patterns(customer) if p.search(text)]


async def _every_tool_result(pool, redis_client, customer) -> list[dict]:
    """Each tool, called the way the bot would, for a verified ``customer``."""
    ctx = make_ctx(pool, redis_client, customer.phone)
    assert await identify_caller(ctx)
    ctx.session.verified = True  # as after verify_customer (its replies: the next test)
    results: list[dict] = []
    called: set[str] = set()

    async def call(name: str, arguments: dict[str, Any]) -> dict:
        called.add(name)
        result = await run_tool(ctx, name, arguments)
        results.append(result)
        return result

    await call(
        "lookup_customer",
        {
            "phone": customer.phone,
            "first_name": customer.first_name,
            "last_name": customer.last_name,
            "zip_code": customer.zip_code,
        },
    )
    ctx.session.verified = True  # the lookup re-matched the same customer
    await call("verify_customer", {"date_of_birth": customer.date_of_birth.isoformat()})
    history = await call("get_vehicle_history", {})
    for vehicle in history.get("vehicles", []):
        await call("get_vehicle_history", {"vehicle_id": vehicle["vehicle_id"]})
    await call("list_appointments", {})
    slots = await call("check_availability", {"service_type": "oil_change"})
    vehicles = history.get("vehicles") or [{"vehicle_id": 0}]
    booked = await call(
        "book_appointment",
        {
            "slot_id": slots["slots"][0]["slot_id"],
            "vehicle_id": vehicles[0]["vehicle_id"],
            "service_type": "oil_change",
            "transportation": "loaner",
        },
    )
    assert booked["ok"] is bool(history.get("vehicles")), booked
    if booked["ok"]:
        await call("list_appointments", {})
        await call("confirm_appointment", {"appointment_id": booked["appointment_id"]})
        moved = await call(
            "reschedule_appointment",
            {"appointment_id": booked["appointment_id"], "slot_id": slots["slots"][1]["slot_id"]},
        )
        await call("cancel_appointment", {"appointment_id": moved["appointment_id"]})
    else:
        await call("confirm_appointment", {"appointment_id": 1})
        await call("reschedule_appointment", {"appointment_id": 1, "slot_id": "slot-x"})
        await call("cancel_appointment", {"appointment_id": 1})
    await call("record_text_consent", {"answer": True})
    await call("transfer_to_advisor", {"reason": "wants a person"})
    ctx.now = lambda: NIGHT
    await call("transfer_to_advisor", {"reason": "after hours"})
    await call("end_call", {})
    await call("opt_out", {})
    assert called == set(TOOLS)
    return results


async def test_no_tool_result_carries_a_verification_factor(pool, redis_client) -> None:
    from bot.prompts import SCENARIOS, greeting, render_system_prompt
    from processors.session_snapshot import session_snapshot

    for customer in DEMO_CUSTOMERS:
        if customer.locked:
            continue
        results = await _every_tool_result(pool, redis_client, customer)
        for result in results:
            assert_well_formed(result)
        text = json.dumps(results)
        assert not _leaks(text, customer), (customer.first_name, _leaks(text, customer), text)
        if customer.vehicles:
            assert any(r.get("vehicles") for r in results)  # the history was there to leak
        # What else the model or an operator sees about the call.
        session = CallSession(call_sid="CAprompt", caller_phone=customer.phone)
        session.match_customer(customer_id=1, first_name=customer.first_name, caller_id=True)
        session.verified = True
        for scenario in SCENARIOS:
            seen = render_system_prompt(scenario, profile=PROFILE, session=session, now=NOW)
            seen += greeting(scenario, profile=PROFILE, session=session)
            seen += json.dumps(session_snapshot(session), default=str)
            assert not _leaks(seen, customer), (scenario, _leaks(seen, customer))


async def test_the_verification_itself_answers_without_factors(pool, redis_client) -> None:
    """Right, wrong and partial answers: the replies name no factor value."""
    ctx = make_ctx(pool, redis_client, "+15555559999")  # not the number on file: 2 factors
    found = await run_tool(ctx, "lookup_customer", {"phone": MARIA.phone})
    replies = [found]
    replies.append(await run_tool(ctx, "verify_customer", {"zip_code": "60615"}))
    replies.append(await run_tool(ctx, "verify_customer", {"zip_code": MARIA.zip_code}))
    replies.append(
        await run_tool(ctx, "verify_customer", {"vin_last4": MARIA.vehicles[0].vin[-4:]})
    )
    assert replies[-1]["verified"] is True
    assert not _leaks(json.dumps(replies), MARIA)


def test_night_is_after_hours() -> None:
    """The fuzz suite's second clock really reaches the after-hours branch."""
    local = NIGHT.astimezone(TZ)
    assert all(not r.contains(local.time()) for r in PROFILE.opening_hours(local.date()))
    assert any(r.contains(time(9)) for r in PROFILE.opening_hours(NOW.date()))

"""The bot's tools against a real Postgres and Redis: happy paths, refusals, attacks."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from datetime import datetime, time, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool

from core.profile import TimeRange, load_profile
from core.settings import DEFAULT_PROFILE
from crm.vin import is_valid_vin, make_vin
from scheduling.calendar import PostgresCalendar
from tools.context import CallSession, ToolContext
from tools.registry import run_tool

BASE_PROFILE = load_profile(DEFAULT_PROFILE)
TZ = BASE_PROFILE.time_zone
# Monday 2026-11-30 09:00 local: open, and the next days are ordinary weekdays.
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=TZ)
ANA_PHONE = "+15555550100"
BEN_PHONE = "+15555550101"


#: Redis key prefix of the running test (its own namespace on the given Redis).
KEY_PREFIX = ""


@pytest.fixture(autouse=True)
def _own_redis_namespace(redis_key_prefix: str) -> None:
    global KEY_PREFIX
    KEY_PREFIX = redis_key_prefix


@pytest.fixture
async def pool(migrated_db: str):
    async with AsyncConnectionPool(migrated_db, min_size=1, max_size=30, open=False) as pool:
        yield pool


@pytest.fixture
async def crm_data(pool: AsyncConnectionPool) -> dict[str, int]:
    """Two customers with one vehicle each."""
    ids: dict[str, int] = {}
    async with pool.connection() as conn:
        for key, first, last, phone, dob, zip_code, serial in (
            ("ana", "Ana", "Lopez", ANA_PHONE, "1985-04-12", "60614", "100001"),
            ("ben", "Ben", "Okafor", BEN_PHONE, "1979-09-30", "60201", "100002"),
        ):
            cur = await conn.execute(
                """
                INSERT INTO customers (first_name, last_name, phone, zip_code, date_of_birth,
                                       call_consent, do_not_call)
                VALUES (%s, %s, %s, %s, %s, true, false) RETURNING id
                """,
                (first, last, phone, zip_code, dob),
            )
            ids[key] = (await cur.fetchone())[0]
            vin = make_vin(wmi="4T1", vds="B11HK", year_code="M", plant="U", serial=serial)
            assert is_valid_vin(vin)
            cur = await conn.execute(
                """
                INSERT INTO vehicles (customer_id, vin, year, make, model, trim, current_mileage)
                VALUES (%s, %s, 2021, 'Toyota', 'Camry', 'SE', 31000) RETURNING id
                """,
                (ids[key], vin),
            )
            ids[f"{key}_vehicle"] = (await cur.fetchone())[0]
            ids[f"{key}_vin4"] = vin[-4:]  # type: ignore[assignment]
    return ids


def make_ctx(pool, redis_client, caller: str | None, *, now=NOW, profile=BASE_PROFILE, sid=None):
    session = CallSession(call_sid=sid or f"CA{id(object()):x}", caller_phone=caller)
    return ToolContext(
        session=session,
        db=pool,
        profile=profile,
        calendar=PostgresCalendar(),
        now=lambda: now,
    )


async def verified_ctx(
    pool, redis_client, caller=ANA_PHONE, dob="1985-04-12", **kwargs
) -> ToolContext:
    from tools.customers import identify_caller

    ctx = make_ctx(pool, redis_client, caller, **kwargs)
    assert await identify_caller(ctx)
    result = await run_tool(ctx, "verify_customer", {"date_of_birth": dob})
    assert result["verified"] is True, result
    return ctx


async def appointment_rows(pool) -> list[tuple]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, customer_id, vehicle_id, bay_id, starts_at, status, "
            "rescheduled_from_id, cancel_reason FROM appointments ORDER BY id"
        )
        return await cur.fetchall()


# -- verification -----------------------------------------------------------------------


async def test_caller_id_plus_one_factor_verifies(pool, redis_client, crm_data) -> None:
    ctx = await verified_ctx(pool, redis_client)
    history = await run_tool(ctx, "get_vehicle_history", {})
    assert history["ok"] and history["vehicles"][0]["vehicle_id"] == crm_data["ana_vehicle"]
    assert history["vehicles"][0]["name"] == "2021 Toyota Camry SE"


async def test_unverified_caller_gets_no_vehicle_data(pool, redis_client, crm_data) -> None:
    from tools.customers import identify_caller

    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    await identify_caller(ctx)
    for name, args in (
        ("get_vehicle_history", {}),
        ("list_appointments", {}),
        ("cancel_appointment", {"appointment_id": 1}),
    ):
        result = await run_tool(ctx, name, args)
        assert result["ok"] is False and result["error"] == "not_verified"
        assert "Camry" not in json.dumps(result)


async def test_lookup_reveals_first_name_only_and_needs_two_factors(
    pool, redis_client, crm_data
) -> None:
    ctx = make_ctx(pool, redis_client, "+15555559999")  # unknown caller ID
    found = await run_tool(ctx, "lookup_customer", {"first_name": "ana", "last_name": "LOPEZ"})
    assert found == {
        "ok": True,
        "found": True,
        "first_name": "Ana",
        "needs": "verification",
        "factors_needed": 2,
    }
    one = await run_tool(ctx, "verify_customer", {"zip_code": "60614"})
    assert one["verified"] is False
    two = await run_tool(ctx, "verify_customer", {"vin_last4": crm_data["ana_vin4"].lower()})
    assert two["verified"] is True
    missing = await run_tool(ctx, "lookup_customer", {"last_name": "Nobody"})
    assert missing["found"] is False


async def test_date_of_birth_is_never_read_back(pool, redis_client, crm_data) -> None:
    ctx = await verified_ctx(pool, redis_client)
    outputs = [
        await run_tool(ctx, name, {})
        for name in ("get_vehicle_history", "list_appointments", "verify_customer")
    ]
    text = json.dumps(outputs)
    assert "1985" not in text and "60614" not in text and ANA_PHONE not in text


async def test_verification_carries_the_vehicles_and_upcoming_appointments(
    pool, redis_client, crm_data
) -> None:
    """The verified result spares the model a round trip; it still names no factor."""
    from tools.customers import identify_caller

    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    assert await identify_caller(ctx)
    result = await run_tool(ctx, "verify_customer", {"date_of_birth": "1985-04-12"})
    assert result == {
        "ok": True,
        "verified": True,
        "first_name": "Ana",
        "vehicles": [
            {
                "vehicle_id": crm_data["ana_vehicle"],
                "name": "2021 Toyota Camry SE",
                "service_due": False,
            }
        ],
        "upcoming_appointments": [],
    }
    slot = (await run_tool(ctx, "check_availability", {"service_type": "oil_change"}))["slots"][0]
    booked = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": slot["slot_id"],
            "vehicle_id": crm_data["ana_vehicle"],
            "service_type": "oil_change",
        },
    )
    again = await run_tool(ctx, "verify_customer", {})  # already verified: the same overview
    assert again["upcoming_appointments"] == [
        {
            "appointment_id": booked["appointment_id"],
            "when": slot["when"],
            "services": ["oil change"],
            "vehicle": "2021 Toyota Camry SE",
            "status": "scheduled",
        }
    ]
    text = json.dumps([result, again])
    assert len(text) < 1000  # small: names and ids, no history
    assert "1985" not in text and "60614" not in text and ANA_PHONE not in text
    vin = await _vin(pool, crm_data["ana_vehicle"])
    for part in (vin, vin[-4:], vin[-6:]):
        assert not re.search(rf"(?<![0-9A-Za-z]){part}(?![0-9A-Za-z])", text, re.IGNORECASE)


async def test_verification_stands_when_the_overview_cannot_be_read(
    pool, redis_client, crm_data, monkeypatch
) -> None:
    from tools import customers as customers_tools

    async def broken(ctx, customer_id):
        raise OSError("database went away")

    monkeypatch.setattr(customers_tools, "account_overview", broken)
    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    assert await customers_tools.identify_caller(ctx)
    result = await run_tool(ctx, "verify_customer", {"date_of_birth": "1985-04-12"})
    assert result == {
        "ok": True,
        "verified": True,
        "first_name": "Ana",
        "account_details": "unavailable",
    }
    assert ctx.session.verified


async def _ana_verifies(pool, redis_client, arguments: dict) -> tuple[ToolContext, dict]:
    """Ana calls from her own number and gives ``arguments`` to verify_customer."""
    from tools.customers import identify_caller

    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    assert await identify_caller(ctx)
    return ctx, await run_tool(ctx, "verify_customer", arguments)


async def test_verification_with_a_service_carries_bookable_slots(
    pool, redis_client, crm_data
) -> None:
    """verify_customer(service_type=...) holds check_availability's slots: one round trip."""
    ctx, result = await _ana_verifies(
        pool, redis_client, {"date_of_birth": "1985-04-12", "service_type": "oil_change"}
    )
    assert result["verified"] and result["vehicles"][0]["name"] == "2021 Toyota Camry SE"
    availability = result["availability"]
    assert availability["ok"] and availability["service"] == "oil change"
    assert 1 <= len(availability["slots"]) <= 5
    # The same slots check_availability offers, remembered for booking: the first books.
    assert availability == await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    booked = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": availability["slots"][0]["slot_id"],
            "vehicle_id": crm_data["ana_vehicle"],
            "service_type": "oil_change",
        },
    )
    assert booked["ok"], booked
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM appointments WHERE id = %s AND status = 'scheduled'",
            (booked["appointment_id"],),
        )
        assert (await cur.fetchone())[0] == 1
    assert "1985" not in json.dumps(result) and ANA_PHONE not in json.dumps(result)


async def test_verification_with_an_unknown_service_still_verifies(
    pool, redis_client, crm_data
) -> None:
    ctx, result = await _ana_verifies(
        pool, redis_client, {"date_of_birth": "1985-04-12", "service_type": "teleport"}
    )
    assert result["verified"] and ctx.session.verified
    assert result["availability"]["ok"] is False
    assert "teleport" in result["availability"]["say"]
    assert result["vehicles"]


async def test_a_failed_verification_looks_up_no_slots(pool, redis_client, crm_data) -> None:
    ctx, result = await _ana_verifies(
        pool, redis_client, {"date_of_birth": "1990-01-01", "service_type": "oil_change"}
    )
    assert result["ok"] is False and "availability" not in result
    assert not ctx.session.offered_slots and not ctx.session.verified


async def _vin(pool, vehicle_id: int) -> str:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT vin FROM vehicles WHERE id = %s", (vehicle_id,))
        return (await cur.fetchone())[0]


async def test_lockout_after_three_failures_shared_by_concurrent_calls(
    pool, redis_client, crm_data
) -> None:
    from tools.customers import identify_caller

    first, second = (make_ctx(pool, redis_client, ANA_PHONE) for _ in range(2))
    for ctx in (first, second):
        await identify_caller(ctx)
    results = await asyncio.gather(
        run_tool(first, "verify_customer", {"date_of_birth": "1990-01-01"}),
        run_tool(second, "verify_customer", {"zip_code": "99999"}),
        run_tool(first, "verify_customer", {"vin_last4": "0000"}),
    )
    assert sorted(r["error"] for r in results) == ["locked", "mismatch", "mismatch"]
    # Now even the right answer is refused, in either call, with a transfer hint.
    for ctx in (first, second):
        locked = await run_tool(ctx, "verify_customer", {"date_of_birth": "1985-04-12"})
        assert locked["error"] == "locked" and locked["transfer"] is True
        assert not ctx.session.verified
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT verification_locked_until > now() FROM customers WHERE id = %s",
            (crm_data["ana"],),
        )
        assert (await cur.fetchone())[0] is True


async def _reset_verification(pool, customer_id: int) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET verification_attempts = '{}', verification_failed_attempts = 0,"
            " verification_last_failed_at = NULL, verification_locked_until = NULL,"
            " last_verified_at = NULL WHERE id = %s",
            (customer_id,),
        )


async def _verification_row(pool, customer_id: int) -> tuple[int, int, bool, bool]:
    """(attempts in the window, failed attempts, locked now, verified ever) of a customer."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT cardinality(verification_attempts), verification_failed_attempts,"
            " coalesce(verification_locked_until > now(), false), last_verified_at IS NOT NULL"
            " FROM customers WHERE id = %s",
            (customer_id,),
        )
        return await cur.fetchone()


class ComparisonCounter:
    """Counts the comparisons against the record that really run, and their outcomes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tools.customers as customers_tools

        self.outcomes: list[bool] = []  # True: every given factor matched
        real = customers_tools._check_factors

        async def counting(*args, **kwargs):
            passed, failed = await real(*args, **kwargs)
            self.outcomes.append(not failed)
            return passed, failed

        monkeypatch.setattr(customers_tools, "_check_factors", counting)


RIGHT = {"date_of_birth": "1985-04-12"}


def _wrong_guess(i: int, vin4: str) -> dict[str, str]:
    """A wrong factor of one of the three kinds."""
    kind = i % 3
    if kind == 0:
        return {"date_of_birth": f"19{60 + i % 30}-0{1 + i % 9}-1{i % 10}"}
    if kind == 1:
        return {"zip_code": f"{10000 + i:05d}"}
    wrong = f"{(int(vin4) + 1 + i) % 10000:04d}" if vin4.isdigit() else "0000"
    return {"vin_last4": wrong}


async def _guess_in_parallel(
    pool, redis_client, guesses: list[dict[str, str]], delays: list[float] | None = None
) -> list[dict]:
    from tools.customers import identify_caller

    contexts = [
        make_ctx(pool, redis_client, ANA_PHONE, sid=f"CAg{i:030d}") for i in range(len(guesses))
    ]
    for ctx in contexts:
        assert await identify_caller(ctx)

    async def guess(ctx: ToolContext, args: dict[str, str], delay: float) -> dict:
        if delay:
            await asyncio.sleep(delay)
        return await run_tool(ctx, "verify_customer", args)

    return list(
        await asyncio.gather(
            *(
                guess(ctx, args, (delays or [0.0] * len(guesses))[i])
                for i, (ctx, args) in enumerate(zip(contexts, guesses, strict=True))
            )
        )
    )


def _check_lockout_outcome(results: list[dict], outcomes: list[bool], row: tuple) -> None:
    attempts, failed, locked, _ = row
    verified = [r for r in results if r.get("verified") is True]
    mismatches = [r for r in results if r.get("error") == "mismatch"]
    # At most 3 comparisons for 50 sessions, and the database counted each of them.
    assert len(outcomes) <= 3 and attempts == len(outcomes)
    assert len(verified) == outcomes.count(True)
    assert len(mismatches) + len(verified) <= 3
    assert failed == outcomes.count(False)
    # Everyone else was refused with a transfer, none was compared.
    refused = [r for r in results if r.get("error") == "locked"]
    assert len(refused) + len(mismatches) + len(verified) == len(results)
    assert all(r["transfer"] is True for r in refused)
    if outcomes.count(False) == 3:
        assert locked and not verified


async def test_fifty_parallel_guesses_get_three_comparisons(
    pool, redis_client, crm_data, monkeypatch
) -> None:
    """The attack: 50 calls guess one customer's factors at once, the right DOB among them."""
    counter = ComparisonCounter(monkeypatch)
    guesses = [_wrong_guess(i, crm_data["ana_vin4"]) for i in range(50)]
    guesses[25] = RIGHT
    results = await _guess_in_parallel(pool, redis_client, guesses)
    row = await _verification_row(pool, crm_data["ana"])
    _check_lockout_outcome(results, counter.outcomes, row)
    assert len(counter.outcomes) == 3  # the three slots were used, no more
    # Afterwards nobody gets a comparison, not even with the right answer.
    late = make_ctx(pool, redis_client, ANA_PHONE, sid="CAlate")
    from tools.customers import identify_caller

    await identify_caller(late)
    again = await run_tool(late, "verify_customer", RIGHT)
    assert again["error"] == "locked" and not late.session.verified
    assert len(counter.outcomes) == 3


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    right=st.lists(st.booleans(), min_size=50, max_size=50),
    delays=st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002, 0.01]), min_size=50, max_size=50),
)
async def test_any_interleaving_of_right_and_wrong_guesses_compares_at_most_three(
    pool, redis_client, crm_data, monkeypatch, right: list[bool], delays: list[float]
) -> None:
    await _reset_verification(pool, crm_data["ana"])
    with monkeypatch.context() as patch:
        counter = ComparisonCounter(patch)
        guesses = [
            RIGHT if is_right else _wrong_guess(i, crm_data["ana_vin4"])
            for i, is_right in enumerate(right)
        ]
        results = await _guess_in_parallel(pool, redis_client, guesses, delays)
    row = await _verification_row(pool, crm_data["ana"])
    _check_lockout_outcome(results, counter.outcomes, row)
    assert len(counter.outcomes) == 3
    # Right answers verify only while fewer than 3 comparisons failed before them: with
    # three slots, a verification can never come after three failures.
    assert row[1] == counter.outcomes.count(False)


async def test_success_does_not_wipe_other_calls_failures(pool, redis_client, crm_data) -> None:
    from tools.customers import identify_caller

    attacker, owner, third = (
        make_ctx(pool, redis_client, ANA_PHONE, sid=f"CAs{i}") for i in range(3)
    )
    for ctx in (attacker, owner, third):
        await identify_caller(ctx)
    for guess in ({"zip_code": "99999"}, {"date_of_birth": "1990-01-01"}):
        assert (await run_tool(attacker, "verify_customer", guess))["error"] == "mismatch"
    assert (await run_tool(owner, "verify_customer", RIGHT))["verified"] is True
    assert await _verification_row(pool, crm_data["ana"]) == (3, 2, False, True)
    # The success used the last comparison of the window; the failures are still there.
    refused = await run_tool(third, "verify_customer", RIGHT)
    assert refused["error"] == "locked" and not third.session.verified
    # Once the attempts age out of the 15 minutes, one more failure completes the run of
    # three (each within 15 minutes of the previous) and locks the row.
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE customers SET verification_attempts = ARRAY["
            " now() - interval '16 minutes', now() - interval '15 minutes 30 seconds'] "
            "WHERE id = %s",
            (crm_data["ana"],),
        )
    locked = await run_tool(third, "verify_customer", {"vin_last4": "ZZZZ"})
    assert locked["error"] == "locked" and locked["transfer"] is True
    attempts, failed, is_locked, _ = await _verification_row(pool, crm_data["ana"])
    assert (attempts, failed, is_locked) == (1, 3, True)


async def test_lookup_by_zip_is_no_oracle(pool, redis_client, crm_data) -> None:
    """ZIP guesses through lookup_customer use the same 3 attempts as verify_customer."""
    guesses = [f"{60600 + i:05d}" for i in range(6)] + ["60614"]  # the right one last
    replies = []
    for zip_code in guesses:
        ctx = make_ctx(pool, redis_client, "+15555559999")
        replies.append(
            await run_tool(
                ctx,
                "lookup_customer",
                {"first_name": "Ana", "last_name": "Lopez", "zip_code": zip_code},
            )
        )
    assert [r.get("found") for r in replies[:3]] == [False, False, False]
    assert all(r["error"] == "locked" for r in replies[3:]), replies
    assert await _verification_row(pool, crm_data["ana"]) == (3, 3, True, False)


async def test_lookup_with_the_right_zip_counts_as_one_factor(pool, redis_client, crm_data) -> None:
    ctx = make_ctx(pool, redis_client, "+15555559999")  # not her number: two factors
    found = await run_tool(
        ctx, "lookup_customer", {"first_name": "Ana", "last_name": "Lopez", "zip_code": "60614"}
    )
    assert found == {
        "ok": True,
        "found": True,
        "first_name": "Ana",
        "needs": "verification",
        "factors_needed": 1,
    }
    verified = await run_tool(ctx, "verify_customer", {"vin_last4": crm_data["ana_vin4"]})
    assert verified["verified"] is True
    assert await _verification_row(pool, crm_data["ana"]) == (2, 0, False, True)
    # From her own number the ZIP completes verification (caller ID + ZIP).
    own = make_ctx(pool, redis_client, ANA_PHONE)
    done = await run_tool(own, "lookup_customer", {"phone": ANA_PHONE, "zip_code": "60614"})
    assert done["verified"] is True and own.session.verified


async def test_lookup_zip_tells_namesakes_apart(pool, redis_client, crm_data) -> None:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO customers (first_name, last_name, phone, zip_code, date_of_birth) "
            "VALUES ('Ana', 'Lopez', '+15555550177', '60201', '1990-02-02') RETURNING id"
        )
        other = (await cur.fetchone())[0]
    ctx = make_ctx(pool, redis_client, "+15555559999")
    both = await run_tool(ctx, "lookup_customer", {"first_name": "Ana", "last_name": "Lopez"})
    assert both["unique"] is False
    one = await run_tool(
        ctx, "lookup_customer", {"first_name": "Ana", "last_name": "Lopez", "zip_code": "60201"}
    )
    assert one["found"] is True and ctx.session.customer_id == other
    # Each namesake's ZIP was compared once; neither failed (one of them matched).
    assert (await _verification_row(pool, other))[:3] == (1, 0, False)
    assert (await _verification_row(pool, crm_data["ana"]))[:3] == (1, 0, False)


async def test_unparseable_factor_is_asked_again_without_using_an_attempt(
    pool, redis_client, crm_data
) -> None:
    from tools.customers import identify_caller

    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    await identify_caller(ctx)
    for args in (
        {"date_of_birth": "sometime in spring"},
        {"zip_code": "606"},
        {"vin_last4": "7"},
    ):
        result = await run_tool(ctx, "verify_customer", args)
        assert result["error"] == "bad_arguments" and result["say"].endswith("?"), result
    assert await _verification_row(pool, crm_data["ana"]) == (0, 0, False, False)
    assert (await run_tool(ctx, "verify_customer", {"zip_code": "60614-1234"}))["verified"]


# -- availability and booking -----------------------------------------------------------


async def test_book_happy_path_and_idempotent_retry(pool, redis_client, crm_data) -> None:
    ctx = await verified_ctx(pool, redis_client)
    slots = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    assert slots["ok"] and 1 <= len(slots["slots"]) <= 5
    chosen = slots["slots"][0]
    assert chosen["when"].startswith("Monday, November 30 at 11:00 AM")  # 2 h lead time
    args = {
        "slot_id": chosen["slot_id"],
        "vehicle_id": crm_data["ana_vehicle"],
        "service_type": "oil_change",
        "transportation": "waiter",
    }
    booked = await run_tool(ctx, "book_appointment", args)
    assert booked["ok"], booked
    assert len(booked["confirmation_code"]) == 6
    again = await run_tool(ctx, "book_appointment", args)
    assert again["appointment_id"] == booked["appointment_id"]
    rows = await appointment_rows(pool)
    assert len(rows) == 1
    row = rows[0]
    assert row[1] == crm_data["ana"] and row[2] == crm_data["ana_vehicle"]
    assert row[4] == ctx.session.offered_slots[chosen["slot_id"]].starts_at
    assert row[5] == "scheduled"


async def test_attacks_are_refused(pool, redis_client, crm_data) -> None:
    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    from tools.customers import identify_caller

    await identify_caller(ctx)
    slots = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    slot_id = slots["slots"][0]["slot_id"]
    before = await run_tool(
        ctx,
        "book_appointment",
        {"slot_id": slot_id, "vehicle_id": crm_data["ana_vehicle"], "service_type": "oil_change"},
    )
    assert before["error"] == "not_verified"
    await run_tool(ctx, "verify_customer", {"date_of_birth": "April 12th, 1985"})
    assert ctx.session.verified
    other_vehicle = await run_tool(
        ctx,
        "book_appointment",
        {"slot_id": slot_id, "vehicle_id": crm_data["ben_vehicle"], "service_type": "oil_change"},
    )
    assert other_vehicle["error"] == "unknown_vehicle"
    invented = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": "slot-abc123",
            "vehicle_id": crm_data["ana_vehicle"],
            "service_type": "oil_change",
        },
    )
    assert invented["error"] == "unknown_slot"
    history = await run_tool(ctx, "get_vehicle_history", {"vehicle_id": crm_data["ben_vehicle"]})
    assert history["error"] == "unknown_vehicle" and "Camry" not in json.dumps(history)
    assert await appointment_rows(pool) == []
    # Ben's appointment cannot be cancelled or moved by Ana.
    ben = await verified_ctx(pool, redis_client, caller=BEN_PHONE, dob="1979-09-30")
    ben_slots = await run_tool(ben, "check_availability", {"service_type": "oil_change"})
    ben_booked = await run_tool(
        ben,
        "book_appointment",
        {
            "slot_id": ben_slots["slots"][0]["slot_id"],
            "vehicle_id": crm_data["ben_vehicle"],
            "service_type": "oil_change",
        },
    )
    cancel = await run_tool(
        ctx, "cancel_appointment", {"appointment_id": ben_booked["appointment_id"]}
    )
    assert cancel["error"] == "unknown_appointment"
    unknown = await run_tool(ctx, "check_availability", {"service_type": "teleportation"})
    assert unknown["error"] == "unknown_service" and "say" in unknown


async def add_vehicles(pool, customer_id: int, count: int, *, first_serial: int) -> list[int]:
    """``count`` more vehicles for one customer (valid, unique VINs)."""
    ids = []
    async with pool.connection() as conn:
        for n in range(count):
            vin = make_vin(
                wmi="1HG", vds="CM826", year_code="M", plant="A", serial=f"{first_serial + n:06d}"
            )
            cur = await conn.execute(
                "INSERT INTO vehicles (customer_id, vin, year, make, model) "
                "VALUES (%s, %s, 2021, 'Honda', 'Accord') RETURNING id",
                (customer_id, vin),
            )
            ids.append((await cur.fetchone())[0])
    return ids


async def test_fifty_concurrent_bookings_of_one_slot(pool, redis_client, crm_data) -> None:
    """Fifty bookings of one bay and time for fifty different vehicles: one wins the bay.

    (One vehicle booked fifty times is refused for another reason, "you already have that
    time": see tests/test_bookings.py.)
    """
    vehicles = [crm_data["ana_vehicle"]] + await add_vehicles(
        pool, crm_data["ana"], 49, first_serial=200000
    )
    contexts = []
    for i in range(50):
        ctx = make_ctx(pool, redis_client, ANA_PHONE, sid=f"CA{i:032d}")
        ctx.session.match_customer(customer_id=crm_data["ana"], first_name="Ana", caller_id=True)
        ctx.session.verified = True
        contexts.append(ctx)
    offered = [
        (await run_tool(ctx, "check_availability", {"service_type": "alignment"}))["slots"][0]
        for ctx in contexts
    ]
    assert len({o["when"] for o in offered}) == 1  # everyone was offered the same slot
    results = await asyncio.gather(
        *(
            run_tool(
                ctx,
                "book_appointment",
                {
                    "slot_id": o["slot_id"],
                    "vehicle_id": vehicle,
                    "service_type": "alignment",
                },
            )
            for ctx, o, vehicle in zip(contexts, offered, vehicles, strict=True)
        )
    )
    winners = [r for r in results if r["ok"]]
    losers = [r for r in results if not r["ok"]]
    assert len(winners) == 1
    assert len(losers) == 49
    assert all(r["error"] == "slot_taken" and len(r["alternatives"]) == 2 for r in losers)
    assert len(await appointment_rows(pool)) == 1


async def test_reschedule_and_cancel_keep_history(pool, redis_client, crm_data) -> None:
    ctx = await verified_ctx(pool, redis_client)
    slots = (await run_tool(ctx, "check_availability", {"service_type": "oil_change"}))["slots"]
    booked = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": slots[0]["slot_id"],
            "vehicle_id": crm_data["ana_vehicle"],
            "service_type": "oil_change",
        },
    )
    moved = await run_tool(
        ctx,
        "reschedule_appointment",
        {"appointment_id": booked["appointment_id"], "slot_id": slots[1]["slot_id"]},
    )
    assert moved["ok"], moved
    listed = await run_tool(ctx, "list_appointments", {})
    assert [a["appointment_id"] for a in listed["appointments"]] == [moved["appointment_id"]]
    cancelled = await run_tool(
        ctx,
        "cancel_appointment",
        {"appointment_id": moved["appointment_id"], "reason": "car sold"},
    )
    assert cancelled["ok"]
    rows = await appointment_rows(pool)
    assert [(r[5], r[6], r[7]) for r in rows] == [
        ("cancelled", None, "rescheduled"),
        ("cancelled", booked["appointment_id"], "car sold"),
    ]
    # The freed time can be booked again by someone else.
    again = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    assert again["slots"][0]["when"] == slots[0]["when"]


async def test_booking_survives_barge_in(pool, redis_client, crm_data, monkeypatch) -> None:
    """Cancelling the handler mid-write (caller barges in) neither loses nor halves it."""
    import crm.appointments as crm_appointments

    ctx = await verified_ctx(pool, redis_client)
    slot_id = (await run_tool(ctx, "check_availability", {"service_type": "oil_change"}))["slots"][
        0
    ]["slot_id"]
    real_insert = crm_appointments.insert_appointment
    entered = asyncio.Event()

    async def slow_insert(conn, **kwargs):
        entered.set()
        await asyncio.sleep(0.3)
        return await real_insert(conn, **kwargs)

    monkeypatch.setattr(crm_appointments, "insert_appointment", slow_insert)
    task = asyncio.create_task(
        run_tool(
            ctx,
            "book_appointment",
            {
                "slot_id": slot_id,
                "vehicle_id": crm_data["ana_vehicle"],
                "service_type": "oil_change",
            },
        )
    )
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    rows = await appointment_rows(pool)
    assert len(rows) == 1 and rows[0][5] == "scheduled"
    assert ctx.session.late_results[-1]["tool"] == "book_appointment"
    assert ctx.session.late_results[-1]["result"]["appointment_id"] == rows[0][0]


async def test_dst_change_slots_are_labelled_in_local_time(pool, redis_client, crm_data) -> None:
    # Saturday 2027-03-13 → Monday 2027-03-15 across the spring-forward night.
    now = datetime(2027, 3, 13, 14, 0, tzinfo=TZ)
    ctx = await verified_ctx(pool, redis_client, now=now)
    result = await run_tool(
        ctx,
        "check_availability",
        {"service_type": "oil_change", "date_from": "2027-03-15", "date_to": "2027-03-15"},
    )
    first = result["slots"][0]
    assert first["when"] == "Monday, March 15 at 7:30 AM"
    slot = ctx.session.offered_slots[first["slot_id"]]
    assert slot.starts_at.utcoffset() == timedelta(hours=-5)  # CDT after the change


# -- hand-off ---------------------------------------------------------------------------


async def test_transfer_during_hours_and_callback_after_hours(pool, redis_client, crm_data) -> None:
    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    result = await run_tool(ctx, "transfer_to_advisor", {"reason": "wants a person"})
    assert result["transferring"] is True and ctx.session.pending_action == "transfer"
    night = datetime.combine(NOW.date(), time(22, 0), tzinfo=TZ)
    late = make_ctx(pool, redis_client, ANA_PHONE, now=night, sid="CAlate")
    result = await run_tool(late, "transfer_to_advisor", {"reason": "brakes squeal"})
    assert result["transferring"] is False
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT call_sid, reason, status FROM callback_requests WHERE call_sid = 'CAlate'"
        )
        assert await cur.fetchone() == ("CAlate", "brakes squeal", "open")
    ended = await run_tool(late, "end_call", {})
    assert ended["ending"] and late.session.pending_action == "end"


async def test_closed_profile_hours_respected(pool, redis_client, crm_data) -> None:
    saturday_only = dataclasses.replace(
        BASE_PROFILE,
        hours={"saturday": (TimeRange(time(8), time(12)),)},
    )
    ctx = await verified_ctx(pool, redis_client, profile=saturday_only)
    result = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    assert result["slots"]
    assert all(s["when"].startswith("Saturday") for s in result["slots"])


async def test_database_down_mid_call_gives_a_sentence_not_a_traceback(
    migrated_db, redis_client
) -> None:
    pool = AsyncConnectionPool(migrated_db, min_size=1, max_size=2, open=False, timeout=1.0)
    await pool.open()
    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    await pool.close()  # Postgres went away
    result = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    assert result["ok"] is False and result["error"] == "internal"
    assert "transfer you to a service advisor" in result["say"]
    looked_up = await run_tool(ctx, "lookup_customer", {"phone": BEN_PHONE})
    assert looked_up["ok"] is False and "say" in looked_up

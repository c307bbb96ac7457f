"""One vehicle, one place at a time: double bookings and replays, against real Postgres.

The attack: twenty sessions of one caller each book "the first slot" and the CRM ends up
with eleven appointments for one car, three of them at the same moment on three bays. And
a replayed booking answered "booked" with a row that had been cancelled by a reschedule.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduling.availability import speakable
from tests import test_tools
from tests.test_tools import ANA_PHONE, BEN_PHONE, NOW, TZ, make_ctx, verified_ctx
from tools.registry import run_tool

# The same Postgres-backed fixtures as the other tool tests: a pool on a migrated database,
# and Ana and Ben with one Camry each.
pool = test_tools.pool
crm_data = test_tools.crm_data

CAMRY = "2021 Toyota Camry SE"
LIVE = "status NOT IN ('cancelled', 'no_show')"
TOMORROW = (NOW + timedelta(days=1)).date().isoformat()


async def rows_of(pool, vehicle_id: int) -> list[tuple]:
    """(id, status, starts_at, ends_at, bay_id, service_codes, confirmation_code)."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT id, status, starts_at, ends_at, bay_id, service_codes, confirmation_code "
            "FROM appointments WHERE vehicle_id = %s ORDER BY id",
            (vehicle_id,),
        )
        return await cur.fetchall()


async def live_overlaps(pool, vehicle_id: int) -> int:
    """Pairs of live appointments of the vehicle that overlap in time."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            f"""
            SELECT count(*) FROM appointments a JOIN appointments b
              ON a.vehicle_id = b.vehicle_id AND a.id < b.id
             AND tstzrange(a.starts_at, a.ends_at, '[)') && tstzrange(b.starts_at, b.ends_at, '[)')
            WHERE a.vehicle_id = %s AND a.{LIVE} AND b.{LIVE}
            """,
            (vehicle_id,),
        )
        return (await cur.fetchone())[0]


def book_args(slot_id: str, vehicle_id: int, service: str = "oil_change") -> dict:
    return {"slot_id": slot_id, "vehicle_id": vehicle_id, "service_type": service}


async def slot_ids(ctx, service: str = "oil_change", **dates: str) -> list[str]:
    found = await run_tool(ctx, "check_availability", {"service_type": service, **dates})
    assert found["ok"] and found["slots"], found
    return [s["slot_id"] for s in found["slots"]]


async def first_slot(ctx, service: str = "oil_change", **dates: str) -> str:
    return (await slot_ids(ctx, service, **dates))[0]


def expected_same_time(when: str, service: str = "an oil change") -> str:
    return (
        f"You already have {service} booked for your {CAMRY} then, on {when}. "
        "Would you like to move it instead?"
    )


def expected_same_service(when: str, service: str = "an oil change") -> str:
    return (
        f"Your {CAMRY} already has {service} booked for {when}. "
        "Would you like to move that appointment instead?"
    )


# -- the attack ---------------------------------------------------------------------------


async def test_twenty_sessions_of_one_caller_book_the_vehicle_once(
    pool, redis_client, crm_data
) -> None:
    """Ten sessions book the slot they were all offered at once; ten more look up "the
    first slot" and book it while the others are booking (so some see the next bay)."""
    vehicle = crm_data["ana_vehicle"]
    # One real verification (the lockout allows 3 comparisons per 15 minutes per customer);
    # the other 19 sessions of the same caller carry the verified state it produced.
    first = await verified_ctx(pool, redis_client, sid=f"CA{0:032d}")
    contexts = [first]
    for i in range(1, 20):
        ctx = make_ctx(pool, redis_client, ANA_PHONE, sid=f"CA{i:032d}")
        ctx.session.match_customer(
            customer_id=first.session.customer_id,
            first_name=first.session.customer_first_name,
            caller_id=True,
        )
        ctx.session.factors = set(first.session.factors)
        ctx.session.verified = True
        contexts.append(ctx)
    offered = [await first_slot(ctx) for ctx in contexts[:10]]

    async def look_then_book(ctx) -> dict:
        return await run_tool(ctx, "book_appointment", book_args(await first_slot(ctx), vehicle))

    results = await asyncio.gather(
        *(
            run_tool(ctx, "book_appointment", book_args(slot_id, vehicle))
            for ctx, slot_id in zip(contexts[:10], offered, strict=True)
        ),
        *(look_then_book(ctx) for ctx in contexts[10:]),
    )
    rows = await rows_of(pool, vehicle)
    assert len(rows) == 1, rows
    (row_id, status, starts_at, _, _, codes, code) = rows[0]
    assert status == "scheduled" and codes == ["oil_change"]
    winners = [r for r in results if r["ok"]]
    assert len(winners) == 1 and winners[0]["appointment_id"] == row_id
    when = speakable(starts_at, TZ)
    losers = [r for r in results if not r["ok"]]
    assert len(losers) == 19
    for loser in losers:
        assert loser["error"] == "already_booked", loser
        assert loser["existing_appointment"] == {
            "appointment_id": row_id,
            "when": when,
            "services": ["oil change"],
            "confirmation_code": code,
            "confirmation_code_spoken": " ".join(code),
        }
        if loser["reason"] == "same_time":
            assert loser["say"] == expected_same_time(when)
        else:
            assert loser["reason"] == "same_service"
            assert loser["say"] == expected_same_service(when)
    # Whoever won booked the very time the first ten were offered (at worst on another
    # bay), so those of them who lost are told they already have that time.
    assert all(r["reason"] == "same_time" for r in results[:10] if not r["ok"])


async def test_database_refuses_a_second_vehicle_booking_that_skips_the_checks(
    pool, redis_client, crm_data
) -> None:
    """A writer that bypasses the tool (raw SQL, no lock) still cannot double-book."""
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    booked = await run_tool(ctx, "book_appointment", book_args(await first_slot(ctx), vehicle))
    assert booked["ok"]
    (_, _, starts_at, ends_at, bay, _, _) = (await rows_of(pool, vehicle))[0]
    other_bay = next(b.id for b in ctx.profile.bays if b.id != bay)
    async with pool.connection() as conn:
        with pytest.raises(
            psycopg.errors.ExclusionViolation, match="appointments_no_vehicle_overlap"
        ):
            await conn.execute(
                "INSERT INTO appointments (customer_id, vehicle_id, service_codes, starts_at, "
                "ends_at, bay_id, confirmation_code) VALUES (%s, %s, '{tire_rotation}', %s, "
                "%s, %s, 'ZZZZZ9')",
                (crm_data["ana"], vehicle, starts_at + timedelta(minutes=15), ends_at, other_bay),
            )
    assert len(await rows_of(pool, vehicle)) == 1


async def test_constraint_race_is_answered_with_the_appointment_in_the_way(
    pool, redis_client, crm_data
) -> None:
    """A raw insert that is still uncommitted when the tool checks: the tool's insert waits
    on it, hits the vehicle constraint, and the answer names the row that won."""
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    slot_id = await first_slot(ctx)
    slot = ctx.session.offered_slots[slot_id]
    other_bay = next(b.id for b in ctx.profile.bays if b.id != slot.bay_id)
    async with pool.connection() as rival:
        async with rival.transaction():
            cur = await rival.execute(
                "INSERT INTO appointments (customer_id, vehicle_id, service_codes, starts_at, "
                "ends_at, bay_id, confirmation_code) VALUES (%s, %s, '{alignment}', %s, %s, "
                "%s, 'RACE77') RETURNING id",
                (crm_data["ana"], vehicle, slot.starts_at, slot.ends_at, other_bay),
            )
            rival_id = (await cur.fetchone())[0]
            task = asyncio.create_task(
                run_tool(ctx, "book_appointment", book_args(slot_id, vehicle))
            )
            # Autocommit: pg_stat_activity is a snapshot per transaction.
            async with await psycopg.AsyncConnection.connect(
                pool.conninfo, autocommit=True
            ) as watcher:
                for _ in range(1500):  # until the booking waits on the rival's row
                    assert not task.done(), task.result()
                    cur = await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                    if (await cur.fetchone())[0]:
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("the booking never waited on the uncommitted rival row")
        result = await task
    assert result["error"] == "already_booked" and result["reason"] == "same_time"
    assert result["existing_appointment"]["appointment_id"] == rival_id
    assert result["existing_appointment"]["confirmation_code"] == "RACE77"
    assert result["say"] == expected_same_time(speakable(slot.starts_at, TZ), "a wheel alignment")
    assert [r[0] for r in await rows_of(pool, vehicle)] == [rival_id]


async def test_other_service_at_an_overlapping_time_is_refused_other_times_are_fine(
    pool, redis_client, crm_data
) -> None:
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    oil = await run_tool(ctx, "book_appointment", book_args(await first_slot(ctx), vehicle))
    assert oil["ok"]
    # A tire rotation at the same moment (the first tire slot: same time, other bay).
    tire_slot = await first_slot(ctx, "tire_rotation")
    assert ctx.session.offered_slots[tire_slot].starts_at == (await rows_of(pool, vehicle))[0][2]
    clash = await run_tool(ctx, "book_appointment", book_args(tire_slot, vehicle, "tire_rotation"))
    assert clash["reason"] == "same_time"
    assert clash["say"] == expected_same_time(oil["when"])
    assert clash["existing_appointment"]["appointment_id"] == oil["appointment_id"]
    # The same tire rotation tomorrow is fine: another service, another time.
    later = await first_slot(ctx, "tire_rotation", date_from=TOMORROW, date_to=TOMORROW)
    tire = await run_tool(ctx, "book_appointment", book_args(later, vehicle, "tire_rotation"))
    assert tire["ok"], tire
    # A second oil change tomorrow is not: that service is already booked.
    # (its second slot: at least an hour after the first, so clear of the tire rotation)
    again = (await slot_ids(ctx, "oil_change", date_from=TOMORROW, date_to=TOMORROW))[1]
    second_oil = await run_tool(ctx, "book_appointment", book_args(again, vehicle))
    assert second_oil["reason"] == "same_service"
    assert second_oil["say"] == expected_same_service(oil["when"])
    statuses = [r[1] for r in await rows_of(pool, vehicle)]
    assert statuses == ["scheduled", "scheduled"]


async def test_reschedule_onto_the_vehicles_other_appointment_is_refused(
    pool, redis_client, crm_data
) -> None:
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    oil = await run_tool(ctx, "book_appointment", book_args(await first_slot(ctx), vehicle))
    later = await first_slot(ctx, "tire_rotation", date_from=TOMORROW, date_to=TOMORROW)
    tire = await run_tool(ctx, "book_appointment", book_args(later, vehicle, "tire_rotation"))
    assert oil["ok"] and tire["ok"]
    # Move the tire rotation onto the oil change's time (another bay is free then).
    found = await run_tool(ctx, "check_availability", {"service_type": "tire_rotation"})
    onto = next(s["slot_id"] for s in found["slots"] if s["when"] == oil["when"])
    moved = await run_tool(
        ctx, "reschedule_appointment", {"appointment_id": tire["appointment_id"], "slot_id": onto}
    )
    assert moved["error"] == "already_booked" and moved["reason"] == "same_time"
    assert moved["say"] == (
        f"Your {CAMRY} already has an oil change booked then, on {oil['when']}, so I can't "
        "move this one there. Your original appointment is unchanged. Would you like a "
        "different time?"
    )
    rows = await rows_of(pool, vehicle)
    assert [(r[0], r[1]) for r in rows] == [
        (oil["appointment_id"], "scheduled"),
        (tire["appointment_id"], "scheduled"),
    ]


async def test_previous_owners_booking_is_not_revealed(pool, redis_client, crm_data) -> None:
    """The car changed hands: its old owner's appointment blocks the time, privately."""
    vehicle = crm_data["ben_vehicle"]
    ben = await verified_ctx(pool, redis_client, caller=BEN_PHONE, dob="1979-09-30")
    bens = await run_tool(ben, "book_appointment", book_args(await first_slot(ben), vehicle))
    assert bens["ok"]
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE vehicles SET customer_id = %s WHERE id = %s", (crm_data["ana"], vehicle)
        )
    ana = await verified_ctx(pool, redis_client)
    clash = await run_tool(ana, "book_appointment", book_args(await first_slot(ana), vehicle))
    assert clash == {
        "ok": False,
        "error": "already_booked",
        "reason": "same_time",
        "say": "That vehicle already has an appointment at that time.",
    }


# -- replays ------------------------------------------------------------------------------


async def test_replay_after_reschedule_never_answers_with_the_cancelled_row(
    pool, redis_client, crm_data
) -> None:
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    found = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    x, y = (s["slot_id"] for s in found["slots"][:2])
    first = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    moved = await run_tool(
        ctx, "reschedule_appointment", {"appointment_id": first["appointment_id"], "slot_id": y}
    )
    assert first["ok"] and moved["ok"]
    again = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    # Not "booked" with the cancelled row: the oil change is booked, at the new time.
    assert again.get("appointment_id") != first["appointment_id"]
    assert again["ok"] is False and again["reason"] == "same_service"
    assert again["existing_appointment"]["appointment_id"] == moved["appointment_id"]
    assert again["existing_appointment"]["confirmation_code"] == moved["confirmation_code"]
    assert again["say"] == expected_same_service(moved["when"])
    statuses = {r[0]: r[1] for r in await rows_of(pool, vehicle)}
    assert statuses == {first["appointment_id"]: "cancelled", moved["appointment_id"]: "scheduled"}


async def test_another_service_in_the_same_bay_and_minute_is_not_a_replay(
    pool, redis_client, crm_data
) -> None:
    """Found by the sequence test: the replay key ignored the service, so an alignment asked
    for in the bay and minute of the caller's tire rotation answered "booked" with the tire
    rotation's row."""
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    tire_id = await first_slot(ctx, "tire_rotation")
    align_id = await first_slot(ctx, "alignment")
    tire_slot, align_slot = (ctx.session.offered_slots[i] for i in (tire_id, align_id))
    assert (tire_slot.bay_id, tire_slot.starts_at) == (align_slot.bay_id, align_slot.starts_at)
    tire = await run_tool(ctx, "book_appointment", book_args(tire_id, vehicle, "tire_rotation"))
    assert tire["ok"]
    alignment = await run_tool(ctx, "book_appointment", book_args(align_id, vehicle, "alignment"))
    assert alignment["ok"] is False and alignment["reason"] == "same_time", alignment
    assert alignment["say"] == expected_same_time(tire["when"], "a tire rotation")
    assert [r[5] for r in await rows_of(pool, vehicle)] == [["tire_rotation"]]


async def test_cancelled_then_booked_again_at_the_same_time_makes_a_new_live_row(
    pool, redis_client, crm_data
) -> None:
    vehicle = crm_data["ana_vehicle"]
    ctx = await verified_ctx(pool, redis_client)
    x = await first_slot(ctx)
    first = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    replay = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    assert replay["appointment_id"] == first["appointment_id"]  # a live replay is idempotent
    cancelled = await run_tool(
        ctx, "cancel_appointment", {"appointment_id": first["appointment_id"]}
    )
    assert cancelled["ok"]
    again = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    assert again["ok"], again
    assert again["appointment_id"] != first["appointment_id"]
    assert again["confirmation_code"] != first["confirmation_code"]
    assert again["when"] == first["when"]
    rows = await rows_of(pool, vehicle)
    assert [(r[0], r[1]) for r in rows] == [
        (first["appointment_id"], "cancelled"),
        (again["appointment_id"], "scheduled"),
    ]
    assert rows[0][2:5] == rows[1][2:5]  # same time, same bay
    # And that one replays to itself.
    replay = await run_tool(ctx, "book_appointment", book_args(x, vehicle))
    assert replay["appointment_id"] == again["appointment_id"]


# -- any sequence of operations -----------------------------------------------------------

SERVICES = ("oil_change", "tire_rotation", "alignment")
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("book"), st.integers(0, 29)),
        st.tuples(st.just("replay"), st.integers(0, 30)),
        # (which appointment, which slot, whether the slot is for that appointment's service)
        st.tuples(st.just("reschedule"), st.integers(0, 30), st.integers(0, 29), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=OPERATIONS)
async def test_any_sequence_keeps_one_vehicle_in_one_place(
    pool, redis_client, crm_data, operations: list[tuple]
) -> None:
    """Random book / replay / reschedule / cancel sequences for one vehicle.

    After every step: no two live appointments of the vehicle overlap, no two live ones
    share a service, and every "booked" / "rescheduled" answer names a live row at the
    time that was asked for. The outcome of each step is also predicted from a model of
    the live appointments.
    """
    vehicle = crm_data["ana_vehicle"]
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM appointments")
    ctx = make_ctx(pool, redis_client, ANA_PHONE)
    ctx.session.match_customer(customer_id=crm_data["ana"], first_name="Ana", caller_id=True)
    ctx.session.verified = True
    # Thirty slots over two days, three services: many overlap each other.
    slots: list[tuple[str, str]] = []  # (slot_id, service)
    for day in (NOW.date(), NOW.date() + timedelta(days=1)):
        for service in SERVICES:
            found = await run_tool(
                ctx,
                "check_availability",
                {"service_type": service, "date_from": str(day), "date_to": str(day)},
            )
            slots += [(s["slot_id"], service) for s in found["slots"]]
    assert len(slots) == 30
    booked_calls: list[int] = []  # slot indexes of earlier book calls, for replays
    booked_by_call: dict[int, int] = {}  # slot index -> row its last "booked" answer named
    known_ids: list[int] = []

    for step in operations:
        kind = step[0]
        if kind == "replay":
            if not booked_calls:
                continue
            kind, step = "book", ("book", booked_calls[step[1] % len(booked_calls)])
        by_id_before = {r[0]: r for r in await rows_of(pool, vehicle)}
        live = {r[0]: r for r in by_id_before.values() if r[1] not in ("cancelled", "no_show")}
        if kind == "book":
            slot_id, service = slots[step[1] % len(slots)]
            slot = ctx.session.offered_slots[slot_id]
            booked_calls.append(step[1])
            # A replay returns the row this booking made, only while that row is live.
            key_row = booked_by_call.get(step[1])
            key_row = key_row if key_row in live else None
            overlapping = [
                r for r in live.values() if r[2] < slot.ends_at and slot.starts_at < r[3]
            ]
            same_service = [r for r in live.values() if service in r[5]]
            result = await run_tool(ctx, "book_appointment", book_args(slot_id, vehicle, service))
            if key_row is not None:
                assert result["ok"] and result["appointment_id"] == key_row, (step, result)
            elif overlapping:
                assert result.get("reason") == "same_time", (step, result)
                assert result["existing_appointment"]["appointment_id"] in {
                    r[0] for r in overlapping
                }
            elif same_service:
                assert result.get("reason") == "same_service", (step, result)
                assert result["existing_appointment"]["appointment_id"] == same_service[0][0]
            else:
                assert result["ok"], (step, result)
                assert result["appointment_id"] not in live
            if result["ok"]:
                booked_by_call[step[1]] = result["appointment_id"]
                booked_services = [service]
        elif kind == "reschedule":
            if not known_ids:
                continue
            target = known_ids[step[1] % len(known_ids)]
            candidates = slots
            if step[3]:
                services = by_id_before[target][5]
                candidates = [s for s in slots if s[1] in services]
            slot_id, service = candidates[step[2] % len(candidates)]
            slot = ctx.session.offered_slots[slot_id]
            result = await run_tool(
                ctx, "reschedule_appointment", {"appointment_id": target, "slot_id": slot_id}
            )
            others = [r for r in live.values() if r[0] != target]
            if target not in live:
                assert result.get("error") == "not_changeable", (step, result)
            elif service not in live[target][5]:
                assert result.get("error") == "slot_service_mismatch", (step, result)
            elif any(r[2] < slot.ends_at and slot.starts_at < r[3] for r in others):
                assert result.get("reason") == "same_time", (step, result)
            else:
                assert result["ok"], (step, result)
            if result["ok"]:
                booked_services = list(live[target][5])
        else:  # cancel
            if not known_ids:
                continue
            target = known_ids[step[1] % len(known_ids)]
            result = await run_tool(ctx, "cancel_appointment", {"appointment_id": target})
            assert result["ok"] == (target in live), (step, result)

        event(f"{kind}: {'ok' if result['ok'] else result.get('reason') or result['error']}")
        rows = await rows_of(pool, vehicle)
        by_id = {r[0]: r for r in rows}
        known_ids = list(by_id)
        still_live = [r for r in rows if r[1] not in ("cancelled", "no_show")]
        assert await live_overlaps(pool, vehicle) == 0, (step, rows)
        served = [c for r in still_live for c in r[5]]
        assert len(served) == len(set(served)), (step, rows)
        if result["ok"] and "appointment_id" in result:  # "booked" or "rescheduled"
            row = by_id[result["appointment_id"]]
            assert row[1] == "scheduled", (step, result, rows)
            assert row[2] == slot.starts_at and row[4] == slot.bay_id
            assert row[5] == booked_services, (step, result, rows)
            assert result["confirmation_code"] == row[6]
        if result.get("existing_appointment"):
            named = by_id[result["existing_appointment"]["appointment_id"]]
            assert named[1] not in ("cancelled", "no_show")

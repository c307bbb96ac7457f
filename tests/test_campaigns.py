"""Outbound campaigns against a real Postgres: planning, windows, dedupe, attempts, retries."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import itertools
import json
import os
import signal
import sys
import time as time_mod
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from campaigns import dialer as app_campaigns
from campaigns.cli import campaign_command, worker_command
from campaigns.worker import WORKER_LOCK_ID, due_slots, run_worker
from core.profile import DealershipProfile, ProfileError, load_profile, parse_profile
from core.settings import DEFAULT_PROFILE, Settings
from crm import calls as crm_calls
from crm import campaigns as cc
from crm.vin import make_vin

REPO = Path(__file__).resolve().parents[1]
CHI = ZoneInfo("America/Chicago")
# Monday 2026-11-30 10:30 in Chicago: dealership open, every US zone but Hawaii in window.
NOW = datetime(2026, 11, 30, 10, 30, tzinfo=CHI)
RULES = cc.CallRules(
    dealer_time_zone="America/Chicago",
    dealer_window=(time(8, 0), time(21, 0)),
    customer_window=(time(9, 0), time(20, 0)),
)
_serials = itertools.count(100001)
_phones = itertools.count(5550100)
_codes = itertools.count(1)


def next_phone() -> str:
    return f"+1312{next(_phones):07d}"


@dataclass
class Crm:
    """Helpers that insert CRM rows into the test database."""

    conn: psycopg.AsyncConnection
    ids: dict[str, int] = field(default_factory=dict)

    async def customer(
        self,
        key: str,
        *,
        phone: str | None = None,
        alt_phone: str | None = None,
        time_zone: str | None = "America/Chicago",
        state: str | None = None,
        do_not_call: bool = False,
        call_consent: bool = True,
        locked_until: datetime | None = None,
        due_in_days: int | None = 3,
    ) -> int:
        """A customer, by default with one vehicle due for service in ``due_in_days``."""
        cur = await self.conn.execute(
            """
            INSERT INTO customers (first_name, last_name, phone, alt_phone, time_zone, state,
                                   do_not_call, call_consent, verification_locked_until)
            VALUES (%s, 'Test', %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                key.title(),
                phone or next_phone(),
                alt_phone,
                time_zone,
                state,
                do_not_call,
                call_consent,
                locked_until,
            ),
        )
        self.ids[key] = (await cur.fetchone())[0]
        if due_in_days is not None:
            await self.vehicle(key, due_date=NOW.date() + timedelta(days=due_in_days))
        return self.ids[key]

    async def vehicle(
        self,
        key: str,
        *,
        due_date: date | None = None,
        due_mileage: int | None = None,
        current_mileage: int | None = None,
        mileage_read_at: date | None = None,
    ) -> int:
        vin = make_vin(
            wmi="1HG", vds="CV1F3", year_code="M", plant="A", serial=f"{next(_serials):06d}"
        )
        cur = await self.conn.execute(
            """
            INSERT INTO vehicles (customer_id, vin, year, make, model, current_mileage,
                                  mileage_read_at, next_service_due_date,
                                  next_service_due_mileage)
            VALUES (%s, %s, 2021, 'Honda', 'Accord', %s, %s, %s, %s) RETURNING id
            """,
            (self.ids[key], vin, current_mileage, mileage_read_at, due_date, due_mileage),
        )
        vehicle_id = (await cur.fetchone())[0]
        self.ids[f"{key}.vehicle"] = vehicle_id
        return vehicle_id

    async def history(self, vehicle_id: int, *points: tuple[date, int]) -> None:
        for day, miles in points:
            await self.conn.execute(
                "INSERT INTO service_history (vehicle_id, service_date, mileage, "
                "services_performed) VALUES (%s, %s, %s, '{oil_change}')",
                (vehicle_id, day, miles),
            )

    async def appointment(
        self, key: str, *, starts_at: datetime, status: str = "scheduled", bay: str = "bay-1"
    ) -> int:
        cur = await self.conn.execute(
            """
            INSERT INTO appointments (customer_id, vehicle_id, service_codes, status,
                                      starts_at, ends_at, bay_id, confirmation_code)
            VALUES (%s, %s, '{oil_change}', %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                self.ids[key],
                self.ids[f"{key}.vehicle"],
                status,
                starts_at,
                starts_at + timedelta(minutes=45),
                bay,
                f"C{next(_codes):05d}",
            ),
        )
        return (await cur.fetchone())[0]


@pytest.fixture
async def conn(migrated_db: str):
    async with await psycopg.AsyncConnection.connect(migrated_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def crm(conn) -> Crm:
    return Crm(conn)


async def planned_ids(
    conn, *, now: datetime = NOW, rules: cc.CallRules = RULES, campaign: str = "service_due"
) -> set[int]:
    plan = await cc.plan_calls(conn, campaign=campaign, now=now, rules=rules)
    return {p.customer_id for p in plan}


# --- calling windows ------------------------------------------------------------------


async def test_window_follows_each_customers_time_zone(conn, crm: Crm) -> None:
    ny = await crm.customer("ny", time_zone="America/New_York")
    chi = await crm.customer("chi", time_zone="America/Chicago")
    la = await crm.customer("la", time_zone="America/Los_Angeles")
    ca_by_state = await crm.customer("ca", time_zone=None, state="CA")
    ny_by_state = await crm.customer("nys", time_zone=None, state="NY")
    no_zone = await crm.customer("none", time_zone=None)
    bogus = await crm.customer("bogus", time_zone="Mars/Olympus_Mons", state="NY")
    texas = await crm.customer("tx", time_zone=None, state="TX")  # Central and Mountain

    # 08:30 Chicago: only Eastern customers are past 09:00.
    early = datetime(2026, 11, 30, 8, 30, tzinfo=CHI)
    assert await planned_ids(conn, now=early) == {ny, ny_by_state, bogus}
    # 09:30 Chicago = 08:30 Denver: Texas (part Mountain) still waits, Central is in.
    assert await planned_ids(conn, now=datetime(2026, 11, 30, 9, 30, tzinfo=CHI)) == {
        ny,
        chi,
        ny_by_state,
        no_zone,
        bogus,
    }
    # 11:30 Chicago = 09:30 Los Angeles: everyone.
    late_morning = datetime(2026, 11, 30, 11, 30, tzinfo=CHI)
    assert await planned_ids(conn, now=late_morning) == {
        ny,
        chi,
        la,
        ca_by_state,
        ny_by_state,
        no_zone,
        bogus,
        texas,
    }
    # 19:30 Chicago = 20:30 New York: Eastern customers are done for the day.
    evening = datetime(2026, 11, 30, 19, 30, tzinfo=CHI)
    assert await planned_ids(conn, now=evening) == {chi, la, ca_by_state, no_zone, texas}
    plan = await cc.plan_calls(conn, campaign="service_due", now=evening, rules=RULES)
    local = {p.customer_id: (p.time_zone, p.local_time) for p in plan}
    assert local[la] == ("America/Los_Angeles", datetime(2026, 11, 30, 17, 30))
    assert local[no_zone][0] == "America/Chicago"


async def test_dealership_window_closes_everything(conn, crm: Crm) -> None:
    await crm.customer("ny", time_zone="America/New_York")
    rules = cc.CallRules(
        dealer_time_zone="America/Chicago",
        dealer_window=(time(9, 0), time(17, 0)),
        customer_window=(time(8, 0), time(21, 0)),
    )
    assert await planned_ids(conn, now=datetime(2026, 11, 30, 8, 30, tzinfo=CHI), rules=rules) == (
        set()
    )
    assert len(await planned_ids(conn, now=datetime(2026, 11, 30, 9, 0, tzinfo=CHI), rules=rules))


async def test_customer_window_is_clamped_to_legal_hours(conn, crm: Crm) -> None:
    ny = await crm.customer("ny", time_zone="America/New_York")
    rules = cc.CallRules(
        dealer_time_zone="America/New_York",
        dealer_window=(time(0, 0), time(23, 59)),
        customer_window=(time(6, 0), time(23, 0)),
    )
    ny_tz = ZoneInfo("America/New_York")
    assert await planned_ids(
        conn, now=datetime(2026, 11, 30, 7, 59, tzinfo=ny_tz), rules=rules
    ) == (set())
    assert await planned_ids(conn, now=datetime(2026, 11, 30, 8, 0, tzinfo=ny_tz), rules=rules) == {
        ny
    }
    assert await planned_ids(
        conn, now=datetime(2026, 11, 30, 21, 0, tzinfo=ny_tz), rules=rules
    ) == (set())


async def test_window_across_the_end_of_daylight_saving_time(conn, crm: Crm) -> None:
    """The same UTC instant is inside the window before 2026-11-01 and outside after it."""
    ny = await crm.customer("ny", time_zone="America/New_York", due_in_days=-60)
    la = await crm.customer("la", time_zone="America/Los_Angeles", due_in_days=-60)
    open_all_day = (time(0, 0), time(23, 59))
    east = cc.CallRules(dealer_time_zone="America/New_York", dealer_window=open_all_day)
    west = cc.CallRules(dealer_time_zone="America/Los_Angeles", dealer_window=open_all_day)

    # 13:30 UTC: 09:30 EDT on Friday 30 October, but 08:30 EST on Monday 2 November.
    before = datetime(2026, 10, 30, 13, 30, tzinfo=UTC)
    after = datetime(2026, 11, 2, 13, 30, tzinfo=UTC)
    assert await planned_ids(conn, now=before, rules=east) == {ny}
    assert await planned_ids(conn, now=after, rules=east) == set()
    # 03:30 UTC: 20:30 PDT (too late) before the change, 19:30 PST (fine) after it.
    assert await planned_ids(conn, now=datetime(2026, 10, 31, 3, 30, tzinfo=UTC), rules=west) == (
        set()
    )
    assert await planned_ids(conn, now=datetime(2026, 11, 3, 3, 30, tzinfo=UTC), rules=west) == {la}
    # On the night of the change itself (01:30 happens twice in New York): nobody.
    night = datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    assert await planned_ids(conn, now=night, rules=east) == set()


# --- who is called ----------------------------------------------------------------------


async def test_do_not_call_consent_and_verification_lock_are_respected(conn, crm: Crm) -> None:
    ok = await crm.customer("ok")
    await crm.customer("dnc", do_not_call=True)
    await crm.customer("noconsent", call_consent=False)
    await crm.customer("locked", locked_until=NOW + timedelta(minutes=10))
    lock_over = await crm.customer("lockover", locked_until=NOW - timedelta(minutes=1))
    assert await planned_ids(conn) == {ok, lock_over}


async def test_service_due_by_date_mileage_and_history_rate(conn, crm: Crm) -> None:
    soon = await crm.customer("soon", due_in_days=7)
    await crm.customer("later", due_in_days=8)
    overdue = await crm.customer("overdue", due_in_days=-30)
    # 29,000 mi read 30 days ago; no history: 35 mi/day -> ~30,050 mi >= 30,000.
    by_default_rate = await crm.customer("rate35", due_in_days=None)
    await crm.vehicle(
        "rate35",
        due_mileage=30000,
        current_mileage=29000,
        mileage_read_at=NOW.date() - timedelta(days=30),
    )
    # Same, but its history says 10 mi/day -> ~29,300 mi: not due yet.
    await crm.customer("rate10", due_in_days=None)
    slow = await crm.vehicle(
        "rate10",
        due_mileage=30000,
        current_mileage=29000,
        mileage_read_at=NOW.date() - timedelta(days=30),
    )
    await crm.history(slow, (date(2026, 1, 1), 26000), (date(2026, 4, 11), 27000))
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    assert [p.customer_id for p in plan][:1] == [overdue]  # most urgent first
    assert {p.customer_id for p in plan} == {soon, overdue, by_default_rate}
    reasons = {p.customer_id: p.reason for p in plan}
    assert "estimated 30050 mi" in reasons[by_default_rate]


async def test_upcoming_visit_and_recent_attempt_skip_service_due(conn, crm: Crm) -> None:
    await crm.customer("booked")
    await crm.appointment("booked", starts_at=NOW + timedelta(days=2))
    past_only = await crm.customer("past")
    await crm.appointment("past", starts_at=NOW - timedelta(days=200), status="no_show")
    await crm.customer("recent")
    await conn.execute(
        "INSERT INTO campaign_attempts (campaign, customer_id, local_date, reason, status, "
        "planned_at) VALUES ('service_due', %s, %s, 'x', 'completed', %s)",
        (crm.ids["recent"], NOW.date() - timedelta(days=5), NOW - timedelta(days=5)),
    )
    long_ago = await crm.customer("longago")
    await conn.execute(
        "INSERT INTO campaign_attempts (campaign, customer_id, local_date, reason, status, "
        "planned_at) VALUES ('service_due', %s, %s, 'x', 'completed', %s)",
        (crm.ids["longago"], NOW.date() - timedelta(days=20), NOW - timedelta(days=20)),
    )
    assert await planned_ids(conn) == {past_only, long_ago}


async def test_confirmations_plan_tomorrows_unconfirmed_appointments(conn, crm: Crm) -> None:
    tomorrow = datetime(2026, 12, 1, 8, 0, tzinfo=CHI)
    first = await crm.customer("first", due_in_days=None)
    await crm.vehicle("first")
    appt = await crm.appointment("first", starts_at=tomorrow)
    late = await crm.customer("late", due_in_days=None)
    await crm.vehicle("late")
    await crm.appointment("late", starts_at=datetime(2026, 12, 1, 23, 0, tzinfo=CHI), bay="bay-2")
    await crm.customer("confirmed", due_in_days=None)
    await crm.vehicle("confirmed")
    await crm.appointment("confirmed", starts_at=tomorrow, status="confirmed", bay="bay-3")
    await crm.customer("today", due_in_days=None)
    await crm.vehicle("today")
    await crm.appointment("today", starts_at=NOW + timedelta(hours=3), bay="bay-4")
    await crm.customer("later", due_in_days=None)
    await crm.vehicle("later")
    await crm.appointment("later", starts_at=tomorrow + timedelta(days=1), bay="bay-5")
    plan = await cc.plan_calls(conn, campaign="confirmation", now=NOW, rules=RULES)
    assert [p.customer_id for p in plan] == [first, late]
    assert plan[0].appointment_id == appt
    assert plan[0].reason == "appointment 2026-12-01 08:00"


async def test_household_sharing_a_number_gets_one_call(conn, crm: Crm) -> None:
    shared = next_phone()
    parent = await crm.customer("parent", phone=shared, due_in_days=1)
    await crm.customer("teen", alt_phone=shared, due_in_days=3)
    other = await crm.customer("other", due_in_days=5)
    # The other way round: the first customer's alternate is the second one's phone.
    spouse_phone = next_phone()
    await crm.customer("a", alt_phone=spouse_phone, due_in_days=6)
    spouse = await crm.customer("spouse", phone=spouse_phone, due_in_days=4)
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    assert {p.customer_id for p in plan} == {parent, other, spouse}
    # Once the parent was called today, the teen still waits for another day.
    inserted = await cc.insert_attempts(conn, planned=plan, now=NOW)
    assert set(inserted) == {parent, other, spouse}
    assert await planned_ids(conn, now=NOW + timedelta(hours=2)) == set()


async def test_limit_takes_the_most_urgent(conn, crm: Crm) -> None:
    ids = [await crm.customer(f"c{i}", due_in_days=6 - i) for i in range(5)]
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES, limit=2)
    assert [p.customer_id for p in plan] == [ids[4], ids[3]]


# --- attempts -----------------------------------------------------------------------------


async def test_rerun_inserts_and_dials_nobody_twice(conn, crm: Crm) -> None:
    for key in ("a", "b", "c"):
        await crm.customer(key)
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    first = await cc.insert_attempts(conn, planned=plan, now=NOW)
    assert len(first) == 3
    # The process "dies" here. A rerun the same day plans nobody, and re-inserting the
    # old plan returns no rows to dial.
    assert await planned_ids(conn, now=NOW + timedelta(minutes=5)) == set()
    assert await cc.insert_attempts(conn, planned=plan, now=NOW) == {}


async def test_claim_is_atomic_and_rechecks_flags(conn, crm: Crm, migrated_db: str) -> None:
    a = await crm.customer("a")
    b = await crm.customer("b")
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    ids = await cc.insert_attempts(conn, planned=plan, now=NOW)
    async with await psycopg.AsyncConnection.connect(migrated_db, autocommit=True) as other:
        won = await cc.claim_attempt(conn, attempt_id=ids[a], now=NOW, rules=RULES)
        lost = await cc.claim_attempt(other, attempt_id=ids[a], now=NOW, rules=RULES)
    assert won is not None and won.attempt_count == 1 and won.phone.startswith("+1312")
    assert lost is None
    await conn.execute("UPDATE customers SET do_not_call = true WHERE id = %s", (b,))
    assert await cc.claim_attempt(conn, attempt_id=ids[b], now=NOW, rules=RULES) is None
    await conn.execute("UPDATE customers SET do_not_call = false WHERE id = %s", (b,))
    night = datetime(2026, 11, 30, 22, 0, tzinfo=CHI)
    assert await cc.claim_attempt(conn, attempt_id=ids[b], now=night, rules=RULES) is None


async def test_no_answer_retries_with_backoff_then_fails(conn, crm: Crm) -> None:
    a = await crm.customer("a")
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    attempt_id = (await cc.insert_attempts(conn, planned=plan, now=NOW))[a]
    backoff = [30, 120]
    now = NOW
    for n, expected in ((1, "retry_pending"), (2, "retry_pending"), (3, "failed")):
        statuses = ("planned", "retry_pending")
        claimed = await cc.claim_attempt(
            conn, attempt_id=attempt_id, now=now, rules=RULES, from_statuses=statuses
        )
        assert claimed is not None and claimed.attempt_count == n
        await cc.record_dialed(conn, attempt_id=attempt_id, call_sid=f"CA{n}")
        row = await cc.apply_call_status(
            conn,
            call_sid=f"CA{n}",
            status="no-answer",
            answered_by=None,
            now=now,
            max_retries=2,
            backoff_minutes=backoff,
        )
        assert row["status"] == expected and row["outcome"] == "no_answer"
        cur = await conn.execute(
            "SELECT next_attempt_at FROM campaign_attempts WHERE id = %s", (attempt_id,)
        )
        next_at = (await cur.fetchone())[0]
        if expected == "retry_pending":
            assert next_at == now + timedelta(minutes=backoff[n - 1])
            assert await cc.due_retry_ids(conn, now=next_at - timedelta(seconds=1)) == []
            assert await cc.due_retry_ids(conn, now=next_at) == [attempt_id]
            now = next_at
        else:
            assert next_at is None
    # A late duplicate callback does not reopen a finished attempt.
    assert (
        await cc.apply_call_status(
            conn,
            call_sid="CA3",
            status="busy",
            answered_by=None,
            now=now,
            max_retries=2,
            backoff_minutes=backoff,
        )
        is None
    )


async def test_completed_call_takes_the_bots_outcome_and_opt_out_sets_dnc(conn, crm: Crm) -> None:
    a = await crm.customer("a")
    b = await crm.customer("b")
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    ids = await cc.insert_attempts(conn, planned=plan, now=NOW)
    for cid, sid in ((a, "CAopt"), (b, "CAvm")):
        assert await cc.claim_attempt(conn, attempt_id=ids[cid], now=NOW, rules=RULES)
        await cc.record_dialed(conn, attempt_id=ids[cid], call_sid=sid)
    await conn.execute(
        "INSERT INTO calls (call_sid, direction, scenario, outcome) "
        "VALUES ('CAopt', 'outbound', 'service_due', 'opted_out')"
    )
    kwargs = {"now": NOW, "max_retries": 2, "backoff_minutes": [30]}
    row = await cc.apply_call_status(
        conn, call_sid="CAopt", status="completed", answered_by="human", **kwargs
    )
    assert (row["status"], row["outcome"]) == ("completed", "opted_out")
    row = await cc.apply_call_status(
        conn, call_sid="CAvm", status="completed", answered_by="machine_end_beep", **kwargs
    )
    assert (row["status"], row["outcome"]) == ("completed", "voicemail")
    cur = await conn.execute("SELECT do_not_call, call_consent FROM customers WHERE id = %s", (a,))
    assert await cur.fetchone() == (True, False)


async def test_stale_rows_after_a_crash_are_requeued_or_closed(conn, crm: Crm) -> None:
    a = await crm.customer("a")
    b = await crm.customer("b")
    plan = await cc.plan_calls(conn, campaign="service_due", now=NOW, rules=RULES)
    ids = await cc.insert_attempts(conn, planned=plan, now=NOW)
    assert await cc.claim_attempt(conn, attempt_id=ids[b], now=NOW, rules=RULES)
    # Crash: a never claimed, b claimed but no CallSid recorded.
    later = NOW + timedelta(minutes=20)
    # While a run of this process may still be working through its rows, they stay.
    counts = await cc.close_stale_attempts(
        conn, now=later, rules=RULES, stale_after=timedelta(minutes=15), requeue_planned=False
    )
    assert counts == {"requeued": 0, "interrupted": 1, "expired": 0}
    counts = await cc.close_stale_attempts(
        conn, now=later, rules=RULES, stale_after=timedelta(minutes=15)
    )
    assert counts == {"requeued": 1, "interrupted": 0, "expired": 0}
    assert await cc.due_retry_ids(conn, now=later) == [ids[a]]
    cur = await conn.execute("SELECT status FROM campaign_attempts WHERE id = %s", (ids[b],))
    assert (await cur.fetchone())[0] == "failed"
    # The next dealership day, a retry that never happened expires.
    counts = await cc.close_stale_attempts(
        conn, now=NOW + timedelta(days=1), rules=RULES, stale_after=timedelta(minutes=15)
    )
    assert counts["expired"] == 1


async def test_scheduled_slot_runs_once(conn) -> None:
    day = NOW.date()
    assert await cc.claim_run(conn, campaign="service_due", local_date=day, slot="11:00")
    assert not await cc.claim_run(conn, campaign="service_due", local_date=day, slot="11:00")
    assert await cc.claim_run(conn, campaign="service_due", local_date=day, slot="16:00")


# --- running campaigns (campaigns.dialer, campaigns.worker) -------------------------------------


def make_profile(**campaign_settings) -> DealershipProfile:
    base = load_profile(DEFAULT_PROFILE)
    settings = {"calls_per_second": 1000.0, "max_concurrent": 3, **campaign_settings}
    return dataclasses.replace(base, campaigns=dataclasses.replace(base.campaigns, **settings))


class FakeDial:
    """Stands in for ``place_outbound_call``: counts calls in flight, returns CallSids."""

    def __init__(self, *, delay: float = 0.02, name: str = "dial") -> None:
        self.delay = delay
        self.name = name
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[dict] = []
        self.started = asyncio.Event()
        self.block: asyncio.Event | None = None
        self.fail_numbers: set[str] = set()

    async def __call__(self, settings, *, to, scenario, customer_id, campaign_attempt_id=None):
        self.in_flight += 1
        number = len(self.calls) + 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.calls.append(
            {
                "to": to,
                "scenario": scenario,
                "customer_id": customer_id,
                "attempt_id": campaign_attempt_id,
                "by": self.name,
            }
        )
        self.started.set()
        try:
            if self.block is not None:
                await self.block.wait()
            await asyncio.sleep(self.delay)
            if to in self.fail_numbers:
                raise ConnectionError("twilio unreachable")
            return f"CA{self.name}{number}"
        finally:
            self.in_flight -= 1

    async def wait_for_calls(self, count: int) -> None:
        while len(self.calls) < count:
            self.started.clear()
            await self.started.wait()

    def customers(self) -> list[int]:
        return [c["customer_id"] for c in self.calls]


@pytest.fixture
async def pool(migrated_db: str):
    async with AsyncConnectionPool(migrated_db, min_size=1, max_size=20, open=False) as pool:
        yield pool


async def attempts(conn) -> dict[int, dict]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("SELECT * FROM campaign_attempts ORDER BY id")
        return {row["customer_id"]: row for row in await cur.fetchall()}


async def test_run_campaign_caps_calls_in_flight(pool, conn, crm: Crm) -> None:
    ids = {await crm.customer(f"c{i}") for i in range(12)}
    dial = FakeDial(delay=0.05)
    result = await app_campaigns.run_campaign(
        pool,
        profile=make_profile(),
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        hold_calls=False,
    )
    assert result.summary()["dialed"] == 12
    assert sorted(dial.customers()) == sorted(ids)
    assert dial.max_in_flight == 3
    rows = await attempts(conn)
    assert {r["status"] for r in rows.values()} == {"dialing"}
    assert all(r["call_sid"] and r["attempt_count"] == 1 for r in rows.values())


async def test_max_concurrent_override_and_rate_limit(pool, crm: Crm) -> None:
    for i in range(6):
        await crm.customer(f"c{i}")
    dial = FakeDial(delay=0.0)
    started = time_mod.monotonic()
    await app_campaigns.run_campaign(
        pool,
        profile=make_profile(calls_per_second=20.0),
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        max_concurrent=1,
        hold_calls=False,
    )
    assert dial.max_in_flight == 1 and len(dial.calls) == 6
    assert time_mod.monotonic() - started >= 5 / 20 - 0.01


async def test_rate_limit_holds_for_concurrent_calls(pool, crm: Crm) -> None:
    for i in range(6):
        await crm.customer(f"c{i}")
    dial = FakeDial(delay=0.0)
    started = time_mod.monotonic()
    await app_campaigns.run_campaign(
        pool,
        profile=make_profile(calls_per_second=4.0, max_concurrent=6),
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        hold_calls=False,
    )
    assert len(dial.calls) == 6
    assert time_mod.monotonic() - started >= 5 / 4 - 0.01  # one call every 0.25 s


async def test_held_calls_keep_their_slot_until_the_call_ends(pool, crm: Crm) -> None:
    for i in range(4):
        await crm.customer(f"c{i}")
    dial = FakeDial(delay=0.0)
    profile = make_profile(max_concurrent=2)
    live: set[str] = set()
    peak = 0

    async def hang_up_later(settings, **kwargs) -> str:
        nonlocal peak
        sid = await dial(settings, **kwargs)
        live.add(sid)
        peak = max(peak, len(live))

        async def completed() -> None:
            await asyncio.sleep(0.1)
            live.discard(sid)
            await app_campaigns.record_call_status(
                pool, call_sid=sid, status="completed", answered_by="human", now=NOW
            )

        asyncio.get_running_loop().create_task(completed())
        return sid

    dialer = app_campaigns.Dialer(
        pool, profile=profile, settings=None, dial=hang_up_later, poll_seconds=0.02, now=NOW
    )
    result = await app_campaigns.run_campaign(
        pool, profile=profile, settings=None, campaign="service_due", now=NOW, dialer=dialer
    )
    assert result.stats.dialed == 4
    assert peak == 2


async def test_crash_and_rerun_never_dials_anyone_twice(pool, conn, crm: Crm) -> None:
    for i in range(5):
        await crm.customer(f"c{i}")
    profile = make_profile(max_concurrent=1)
    dial = FakeDial(delay=0.0)
    dial.block = asyncio.Event()
    run = asyncio.create_task(
        app_campaigns.run_campaign(
            pool,
            profile=profile,
            settings=None,
            campaign="service_due",
            now=NOW,
            dial=dial,
            hold_calls=False,
        )
    )
    await asyncio.wait_for(dial.started.wait(), 5)
    run.cancel()  # the process dies while the first dial request is in the air
    with contextlib.suppress(asyncio.CancelledError):
        await run
    assert len(dial.calls) == 1
    statuses = sorted(r["status"] for r in (await attempts(conn)).values())
    assert statuses == ["dialing", "planned", "planned", "planned", "planned"]

    # Restart at once: the same day's rows exist, nobody is planned or dialed again.
    rerun = await app_campaigns.run_campaign(
        pool,
        profile=profile,
        settings=None,
        campaign="service_due",
        now=NOW + timedelta(minutes=1),
        dial=dial,
        hold_calls=False,
    )
    assert (rerun.planned, rerun.stats.dialed, len(dial.calls)) == (0, 0, 1)

    # Later the worker's housekeeping requeues the never-dialed rows; the interrupted one
    # (it may have reached Twilio) is closed and never redialed.
    later = NOW + timedelta(minutes=20)
    counts = await app_campaigns.housekeeping(pool, profile=profile, now=later)
    assert (counts["requeued"], counts["interrupted"]) == (4, 1)
    dial.block = None
    dialer = app_campaigns.Dialer(
        pool, profile=profile, settings=None, dial=dial, hold_calls=False, clock=lambda: later
    )
    assert (await app_campaigns.run_due_retries(dialer)).dialed == 4
    assert (await app_campaigns.run_due_retries(dialer)).dialed == 0
    assert len(dial.customers()) == len(set(dial.customers())) == 5


async def test_no_answer_is_retried_after_the_backoff(pool, conn, crm: Crm) -> None:
    a = await crm.customer("a")
    profile = make_profile(max_retries=1, retry_backoff_minutes=(30,))
    dial = FakeDial(delay=0.0)
    await app_campaigns.run_campaign(
        pool,
        profile=profile,
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        hold_calls=False,
    )
    first_sid = (await attempts(conn))[a]["call_sid"]
    row = await app_campaigns.record_call_status(
        pool,
        call_sid=first_sid,
        status="no-answer",
        campaign_settings=profile.campaigns,
        now=NOW,
    )
    assert row["status"] == "retry_pending"

    def dialer_at(when: datetime) -> app_campaigns.Dialer:
        return app_campaigns.Dialer(
            pool,
            profile=profile,
            settings=None,
            dial=dial,
            hold_calls=False,
            clock=lambda: when,
        )

    assert (await app_campaigns.run_due_retries(dialer_at(NOW + timedelta(minutes=29)))).dialed == 0
    assert (await app_campaigns.run_due_retries(dialer_at(NOW + timedelta(minutes=30)))).dialed == 1
    second = (await attempts(conn))[a]
    assert second["attempt_count"] == 2 and second["call_sid"] != first_sid
    # The first call's late callback changes nothing; the retry's busy exhausts retries.
    assert (
        await app_campaigns.record_call_status(pool, call_sid=first_sid, status="busy", now=NOW)
        is None
    )
    row = await app_campaigns.record_call_status(
        pool,
        call_sid=second["call_sid"],
        status="busy",
        campaign_settings=profile.campaigns,
        now=NOW + timedelta(minutes=31),
    )
    assert (row["status"], row["outcome"]) == ("failed", "busy")
    assert dial.customers() == [a, a]


async def test_failed_dial_request_is_retried(pool, conn, crm: Crm) -> None:
    a = await crm.customer("a")
    profile = make_profile(max_retries=1, retry_backoff_minutes=(10,))
    dial = FakeDial(delay=0.0)
    phone = (
        await (await conn.execute("SELECT phone FROM customers WHERE id = %s", (a,))).fetchone()
    )[0]
    dial.fail_numbers.add(phone)
    result = await app_campaigns.run_campaign(
        pool,
        profile=profile,
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        hold_calls=False,
    )
    assert result.stats.failed == 1
    row = (await attempts(conn))[a]
    assert row["status"] == "retry_pending" and "ConnectionError" in row["last_error"]
    assert NOW + timedelta(minutes=10) <= row["next_attempt_at"] < NOW + timedelta(minutes=11)


async def test_opted_out_on_a_campaign_call_sets_do_not_call(pool, conn, crm: Crm) -> None:
    a = await crm.customer("a")
    b = await crm.customer("b")
    profile = make_profile()
    dial = FakeDial(delay=0.0)
    await app_campaigns.run_campaign(
        pool,
        profile=profile,
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=dial,
        hold_calls=False,
    )
    rows = await attempts(conn)
    # a: the bot's opt_out tool ran; the bot's calls row says so when the call completes.
    await crm_calls.start_call(
        conn, call_sid=rows[a]["call_sid"], direction="outbound", scenario="service_due"
    )
    await conn.execute(
        "UPDATE calls SET outcome = 'opted_out' WHERE call_sid = %s", (rows[a]["call_sid"],)
    )
    row = await app_campaigns.record_call_status(
        pool, call_sid=rows[a]["call_sid"], status="completed", answered_by="human", now=NOW
    )
    assert row["outcome"] == "opted_out"
    # b: the bot reports its outcome before the status callback (record_call_outcome).
    await app_campaigns.record_call_outcome(pool, call_sid=rows[b]["call_sid"], outcome="opted_out")
    row = await app_campaigns.record_call_status(
        pool, call_sid=rows[b]["call_sid"], status="completed", now=NOW
    )
    assert (row["status"], row["outcome"]) == ("completed", "opted_out")
    cur = await conn.execute(
        "SELECT id, do_not_call, call_consent FROM customers WHERE id = ANY(%s) ORDER BY id",
        ([a, b],),
    )
    assert await cur.fetchall() == [(a, True, False), (b, True, False)]
    # Three weeks on, both would be due again: neither is planned.
    assert await planned_ids(conn, now=NOW + timedelta(days=21)) == set()


async def test_late_bot_outcome_is_copied_by_housekeeping(pool, conn, crm: Crm) -> None:
    a = await crm.customer("a")
    profile = make_profile()
    await app_campaigns.run_campaign(
        pool,
        profile=profile,
        settings=None,
        campaign="service_due",
        now=NOW,
        dial=FakeDial(delay=0.0),
        hold_calls=False,
    )
    sid = (await attempts(conn))[a]["call_sid"]
    await app_campaigns.record_call_status(pool, call_sid=sid, status="completed", now=NOW)
    assert (await attempts(conn))[a]["outcome"] is None
    await crm_calls.start_call(conn, call_sid=sid, direction="outbound", scenario="service_due")
    await conn.execute("UPDATE calls SET outcome = 'booked' WHERE call_sid = %s", (sid,))
    counts = await app_campaigns.housekeeping(pool, profile=profile, now=NOW)
    assert counts["outcomes"] == 1
    assert (await attempts(conn))[a]["outcome"] == "booked"


async def test_two_workers_one_dialer(pool, conn, crm: Crm, migrated_db: str) -> None:
    ids = {await crm.customer(f"c{i}") for i in range(6)}
    await crm.vehicle("c0")
    await crm.appointment("c0", starts_at=datetime(2026, 12, 1, 9, 0, tzinfo=CHI))
    profile = make_profile()
    # Monday 11:05: the 10:00 confirmations and 11:00 service-due slots are both due.
    clock_now = datetime(2026, 11, 30, 11, 5, tzinfo=CHI)
    dials = [FakeDial(delay=0.01, name="w1"), FakeDial(delay=0.01, name="w2")]
    stops = [asyncio.Event(), asyncio.Event()]
    workers = [
        asyncio.create_task(
            run_worker(
                pool,
                conninfo=migrated_db,
                profile=profile,
                settings=None,
                dial=dials[i],
                stop=stops[i],
                poll_seconds=0.05,
                clock=lambda: clock_now,
                hold_calls=False,
            )
        )
        for i in range(2)
    ]
    reached = [asyncio.create_task(d.wait_for_calls(6)) for d in dials]
    await asyncio.wait(reached, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    for task in reached:
        task.cancel()
    await asyncio.sleep(0.3)
    holder = 0 if dials[0].calls else 1
    assert dials[1 - holder].calls == []
    # c0 is called once, for its confirmation: service-due skips its upcoming visit.
    assert sorted(dials[holder].customers()) == sorted(ids)
    scenarios = {c["customer_id"]: c["scenario"] for c in dials[holder].calls}
    assert scenarios[crm.ids["c0"]] == "confirmation"
    # The holder stops; the other takes the lock over but finds nothing left to run.
    stops[holder].set()
    first = await asyncio.wait_for(workers[holder], 10)
    await asyncio.sleep(0.3)
    stops[1 - holder].set()
    second = await asyncio.wait_for(workers[1 - holder], 10)
    assert first.held_lock and second.held_lock
    assert first.runs and second.runs == []
    assert dials[1 - holder].calls == []
    cur = await conn.execute("SELECT campaign, slot FROM campaign_runs ORDER BY 1, 2")
    assert await cur.fetchall() == [
        ("confirmation", "daily 10:00"),
        ("service_due", "weekdays 11:00"),
    ]


async def test_worker_stop_finishes_dials_in_flight_and_starts_no_more(
    pool, conn, crm: Crm, migrated_db: str
) -> None:
    for i in range(8):
        await crm.customer(f"c{i}")
    profile = make_profile(max_concurrent=2)
    dial = FakeDial(delay=0.3)
    stop = asyncio.Event()
    clock_now = datetime(2026, 11, 30, 11, 5, tzinfo=CHI)
    worker = asyncio.create_task(
        run_worker(
            pool,
            conninfo=migrated_db,
            profile=profile,
            settings=None,
            dial=dial,
            stop=stop,
            poll_seconds=0.05,
            clock=lambda: clock_now,
            hold_calls=False,
        )
    )
    await asyncio.wait_for(dial.started.wait(), 10)
    await asyncio.sleep(0.05)
    stop.set()  # what SIGTERM does
    report = await asyncio.wait_for(worker, 10)
    rows = (await attempts(conn)).values()
    assert report.dialed == len(dial.calls) == 2
    assert sorted(r["status"] for r in rows) == ["dialing"] * 2 + ["planned"] * 6
    assert all(r["call_sid"] for r in rows if r["status"] == "dialing")
    cur = await conn.execute(
        "SELECT campaign, dialed, finished_at IS NOT NULL FROM campaign_runs ORDER BY 1"
    )
    assert await cur.fetchall() == [("confirmation", 0, True), ("service_due", 2, True)]


def test_due_slots_follow_the_schedule_and_the_outbound_window() -> None:
    profile = load_profile(DEFAULT_PROFILE)
    monday = datetime(2026, 11, 30, tzinfo=CHI)
    assert due_slots(profile, monday.replace(hour=9, minute=59)) == []
    assert due_slots(profile, monday.replace(hour=10)) == [("confirmation", "daily 10:00")]
    assert due_slots(profile, monday.replace(hour=16, minute=30)) == [
        ("confirmation", "daily 10:00"),
        ("service_due", "weekdays 11:00"),
        ("service_due", "weekdays 16:00"),
    ]
    assert due_slots(profile, monday.replace(hour=19, minute=30)) == []  # window closed
    sunday = datetime(2026, 11, 29, 12, 0, tzinfo=CHI)
    assert due_slots(profile, sunday) == [("confirmation", "daily 10:00")]
    christmas = datetime(2026, 12, 25, 12, 0, tzinfo=CHI)
    assert due_slots(profile, christmas) == []


def test_profile_campaign_settings_are_validated() -> None:
    import tomllib

    data = tomllib.loads(DEFAULT_PROFILE.read_text())
    assert parse_profile(data).campaigns.max_retries == 2
    data.pop("campaigns")
    data.pop("schedule")
    assert parse_profile(data).campaigns.calls_per_second == 1.0  # old profiles still load
    for section, key, value, message in (
        ("campaigns", "max_retries", -1, "campaigns.max_retries"),
        ("campaigns", "retry_backoff_minutes", [], "campaigns.retry_backoff_minutes"),
        ("campaigns", "calls_per_second", "fast", "campaigns.calls_per_second"),
        ("schedule", "service_due", ["weekdayz 11:00"], r"schedule.service_due\[0\]"),
        ("schedule", "confirmations", "daily 25:00", r"schedule.confirmations\[0\]"),
    ):
        bad = tomllib.loads(DEFAULT_PROFILE.read_text())
        bad[section][key] = value
        with pytest.raises(ProfileError, match=message):
            parse_profile(bad)


async def test_cli_dry_run_prints_masked_plan(migrated_db: str, redis_server_url: str, crm: Crm):
    a = await crm.customer("a", phone="+13125550199")
    settings = Settings(_env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url)
    out = io.StringIO()
    args = argparse.Namespace(
        campaign="service-due",
        dry_run=True,
        json=True,
        limit=None,
        max_concurrent=None,
        now=NOW.isoformat(),
    )
    assert await campaign_command(settings, args, out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [
        {
            "customer_id": a,
            "reason": f"service due 2026-12-03 (vehicle {crm.ids['a.vehicle']})",
            "local_time": "2026-11-30T10:30",
            "time_zone": "America/Chicago",
            "phone": "+1***…0199",
        }
    ]
    assert "5550199" not in out.getvalue()
    out = io.StringIO()
    args.json = False
    assert await campaign_command(settings, args, out=out) == 0
    assert "+1***…0199" in out.getvalue() and "1 call(s) planned" in out.getvalue()
    # A real run with a fake dialer (the call ends at once: the run waits for calls in
    # flight to end); a second run the same day dials nobody.
    dial = FakeDial(delay=0.0)

    async def dial_and_hang_up(settings, **kwargs) -> str:
        sid = await dial(settings, **kwargs)
        # Twilio's callback can beat the CallSid into the database; it is only recorded.
        async with await psycopg.AsyncConnection.connect(migrated_db, autocommit=True) as c:
            await crm_calls.record_status_callback(
                c, call_sid=sid, call_status="busy", sequence=3, payload={"CallSid": sid}
            )
        return sid

    args.dry_run = False
    args.now = (NOW + timedelta(seconds=1)).isoformat()
    for _ in range(2):
        out = io.StringIO()
        assert await campaign_command(settings, args, dial=dial_and_hang_up, out=out) == 0
    assert dial.customers() == [a]
    assert json.loads(out.getvalue().splitlines()[-1])["dialed"] == 0


async def test_sigterm_stops_the_worker_command(
    migrated_db: str, redis_server_url: str, conn
) -> None:
    settings = Settings(_env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url)
    task = asyncio.create_task(worker_command(settings, dial=FakeDial()))
    deadline = time_mod.monotonic() + 30
    held = False
    while not held and time_mod.monotonic() < deadline and not task.done():
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
            (WORKER_LOCK_ID & 0xFFFFFFFF,),
        )
        held = (await cur.fetchone())[0] == 1
        await asyncio.sleep(0.1)
    assert held
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(task, 20) == 0
    cur = await conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    assert (await cur.fetchone())[0] == 0


async def test_cli_dry_run_outside_the_window_says_when_it_opens(
    migrated_db: str, redis_server_url: str, crm: Crm
) -> None:
    """`runner.py campaign service-due --dry-run --now <Sunday 22:00>`: not silent."""
    await crm.customer("a")
    await crm.customer("b")
    await crm.customer("later", due_in_days=30)  # not due
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": migrated_db,
        "REDIS_URL": redis_server_url,
        "REDIS_KEY_PREFIX": os.environ["REDIS_KEY_PREFIX"],  # this session's namespace
        "LOG_LEVEL": "WARNING",
    }

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "runner.py"),
            "campaign",
            "service-due",
            "--dry-run",
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        return proc.returncode or 0, out.decode(), err.decode()

    sunday_night = "2026-11-29T22:00:00-06:00"
    code, out, err = await cli("--now", sunday_night)
    assert code == 0, err
    assert "calling window is closed" in out
    assert "Sun 2026-11-29 22:00 CST" in out and "window 09:00-19:00" in out
    assert "opens Mon 2026-11-30 09:00 CST; 2 customer(s) due would be called then" in out
    assert "0 call(s) planned" in out
    assert "Traceback" not in err

    # --json keeps stdout JSON lines (none: nobody is planned); the sentence goes to stderr.
    code, out, err = await cli("--json", "--now", "2026-11-30T06:30:00-06:00")
    assert code == 0, err
    assert out == ""
    assert "opens Mon 2026-11-30 09:00 CST; 2 customer(s) due" in err

    # Inside the window: the plan, no notice.
    code, out, err = await cli("--now", NOW.isoformat())
    assert code == 0, err
    assert "2 call(s) planned" in out and "closed" not in out + err


@given(
    instant=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(["America/Chicago", "America/Los_Angeles", "Pacific/Honolulu"]),
)
@hypothesis_settings(max_examples=300, deadline=None)
def test_next_window_opening_is_the_next_start_of_the_window(instant: datetime, zone: str) -> None:
    profile = dataclasses.replace(load_profile(DEFAULT_PROFILE), time_zone=ZoneInfo(zone))
    window = profile.outbound_window
    opens = app_campaigns.next_window_opening(profile, instant)
    local = instant.astimezone(profile.time_zone)
    if window.contains(local.time()):
        assert opens is None
        return
    assert opens is not None and opens > instant
    assert opens.astimezone(profile.time_zone).time() == window.start
    # No earlier opening in between: the window is closed from now until then.
    assert opens - instant <= timedelta(hours=25)
    if local.time() < window.start:
        assert opens.date() == local.date()
    else:
        assert opens.date() == local.date() + timedelta(days=1)

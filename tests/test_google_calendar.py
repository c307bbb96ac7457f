"""Google Calendar backend against a local fake of the Calendar API and a real Postgres.

The gcsa client is the real one, built by ``scheduling.google_calendar.build_client`` with
anonymous credentials and ``api_endpoint`` pointing at
:class:`tests.fakes.google_calendar.FakeGoogleCalendarApi`; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from psycopg_pool import AsyncConnectionPool

from core.metrics import sample
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from crm import appointments as crm_appointments
from crm.vin import make_vin
from scheduling.google_calendar import (
    APPOINTMENT_PROPERTY,
    CODE_PROPERTY,
    GoogleCalendar,
    build_client,
    sync_pending,
)
from tests.fakes.google_calendar import FakeGoogleCalendarApi

PROFILE = load_profile(DEFAULT_PROFILE)
TZ = PROFILE.time_zone
CALENDAR_ID = "service-bay@group.calendar.google.com"
# Tuesday 2026-12-01, 09:00 local.
START = datetime(2026, 12, 1, 9, 0, tzinfo=TZ)


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeGoogleCalendarApi]:
    fake = FakeGoogleCalendarApi()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(migrated_db, min_size=1, max_size=5, open=False) as pool:
        yield pool


def make_calendar(
    pool: AsyncConnectionPool, endpoint: str, *, timeout: float = 5.0
) -> GoogleCalendar:
    return GoogleCalendar(
        clients=lambda: build_client(
            calendar_id=CALENDAR_ID,
            credentials=AnonymousCredentials(),
            api_endpoint=endpoint,
            timeout=timeout,
        ),
        profile=PROFILE,
        db=pool,
        timeout=timeout,
    )


@pytest.fixture
def calendar(pool: AsyncConnectionPool, fake_api: FakeGoogleCalendarApi) -> GoogleCalendar:
    return make_calendar(pool, fake_api.api_endpoint)


@pytest.fixture
async def owner(pool: AsyncConnectionPool) -> dict[str, int]:
    """Maria and her 2021 Toyota Camry."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            """
            INSERT INTO customers (first_name, last_name, phone, zip_code, date_of_birth,
                                   call_consent, do_not_call)
            VALUES ('Maria', 'Garcia', '+15555550142', '60614', '1988-02-03', true, false)
            RETURNING id
            """
        )
        customer_id = (await cur.fetchone())[0]
        vin = make_vin(wmi="4T1", vds="B11HK", year_code="M", plant="U", serial="200001")
        cur = await conn.execute(
            """
            INSERT INTO vehicles (customer_id, vin, year, make, model, current_mileage)
            VALUES (%s, %s, 2021, 'Toyota', 'Camry', 31000) RETURNING id
            """,
            (customer_id, vin),
        )
        vehicle_id = (await cur.fetchone())[0]
    return {"customer": customer_id, "vehicle": vehicle_id}


async def book(
    pool: AsyncConnectionPool,
    owner: dict[str, int],
    *,
    starts_at: datetime = START,
    minutes: int = 30,
    key: str = "call-1",
    rescheduled_from_id: int | None = None,
) -> crm_appointments.AppointmentRow:
    async with pool.connection() as conn, conn.transaction():
        return await crm_appointments.insert_appointment(
            conn,
            customer_id=owner["customer"],
            vehicle_id=owner["vehicle"],
            service_codes=["oil_change"],
            starts_at=starts_at,
            ends_at=starts_at + timedelta(minutes=minutes),
            bay_id="bay-1",
            transportation="waiter",
            source="phone_inbound",
            call_sid="CA-test",
            key=key,
            rescheduled_from_id=rescheduled_from_id,
            calendar_sync_state="pending",
        )


async def cancel(
    pool: AsyncConnectionPool, owner: dict[str, int], appointment_id: int, reason: str
) -> crm_appointments.AppointmentRow:
    async with pool.connection() as conn, conn.transaction():
        row = await crm_appointments.cancel_appointment(
            conn, appointment_id=appointment_id, customer_id=owner["customer"], reason=reason
        )
    assert row is not None
    return row


async def sync_row(pool: AsyncConnectionPool, appointment_id: int) -> dict[str, Any]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT external_event_id, calendar_sync_state, calendar_sync_error "
            "FROM appointments WHERE id = %s",
            (appointment_id,),
        )
        event_id, state, error = await cur.fetchone()
    return {"event_id": event_id, "state": state, "error": error}


async def reload(pool: AsyncConnectionPool, owner: dict[str, int], appointment_id: int):
    async with pool.connection() as conn:
        row = await crm_appointments.get_for_customer(
            conn, appointment_id=appointment_id, customer_id=owner["customer"]
        )
    assert row is not None
    return row


VEHICLE = "2021 Toyota Camry"


# -- mirroring ---------------------------------------------------------------------------


async def test_new_appointment_creates_event(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    [event] = fake_api.live_events(CALENDAR_ID)
    assert event["summary"] == "Oil change - Maria - 2021 Toyota Camry"
    assert event["start"] == {"dateTime": "2026-12-01T09:00:00-06:00", "timeZone": TZ.key}
    assert event["end"] == {"dateTime": "2026-12-01T09:30:00-06:00", "timeZone": TZ.key}
    assert f"Confirmation code: {row.confirmation_code}" in event["description"]
    assert event["extendedProperties"]["private"] == {
        APPOINTMENT_PROPERTY: str(row.id),
        CODE_PROPERTY: row.confirmation_code,
    }
    assert event["transparency"] == "transparent"  # never counted as shop busy time
    assert await sync_row(pool, row.id) == {
        "event_id": event["id"],
        "state": "synced",
        "error": None,
    }
    assert calendar.sync_failures == 0


async def test_reschedule_moves_the_same_event(calendar, fake_api, pool, owner) -> None:
    old = await book(pool, owner)
    await calendar.appointment_changed(old, first_name="Maria", vehicle=VEHICLE)
    [event] = fake_api.live_events(CALENDAR_ID)

    # What the reschedule tool does: cancel the old row, book a new one that points at it.
    old = await cancel(pool, owner, old.id, "rescheduled")
    new = await book(
        pool,
        owner,
        starts_at=START + timedelta(days=1, hours=5),
        key=f"resched:{old.id}",
        rescheduled_from_id=old.id,
    )
    await calendar.appointment_changed(new, first_name="Maria", vehicle=VEHICLE)
    # The tool never syncs the old row; a catch-up may: it must not delete the moved event.
    await calendar.appointment_changed(old, first_name="Maria", vehicle=VEHICLE)

    [moved] = fake_api.live_events(CALENDAR_ID)
    assert moved["id"] == event["id"]
    assert moved["start"]["dateTime"] == "2026-12-02T14:00:00-06:00"
    assert moved["extendedProperties"]["private"][APPOINTMENT_PROPERTY] == str(new.id)
    assert fake_api.count("insert") == 1 and fake_api.count("update") == 1
    assert fake_api.count("delete") == 0
    assert (await sync_row(pool, new.id))["event_id"] == event["id"]
    assert (await sync_row(pool, new.id))["state"] == "synced"
    assert (await sync_row(pool, old.id))["state"] == "synced"


async def test_changed_times_update_the_event(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE appointments SET ends_at = ends_at + interval '30 minutes' WHERE id = %s",
            (row.id,),
        )
    row = await reload(pool, owner, row.id)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    [event] = fake_api.live_events(CALENDAR_ID)
    assert event["end"]["dateTime"] == "2026-12-01T10:00:00-06:00"
    assert fake_api.count("insert") == 1 and fake_api.count("update") == 1


async def test_cancel_deletes_the_event(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)
    event_id = (await sync_row(pool, row.id))["event_id"]

    row = await cancel(pool, owner, row.id, "car sold")
    await calendar.appointment_changed(row, first_name="Maria", vehicle="")

    assert fake_api.live_events(CALENDAR_ID) == []
    assert fake_api.events[CALENDAR_ID][event_id]["status"] == "cancelled"
    assert await sync_row(pool, row.id) == {"event_id": event_id, "state": "synced", "error": None}
    # A repeated cancel sync (event already gone) is still a success.
    await calendar.appointment_changed(row, first_name="Maria", vehicle="")
    assert (await sync_row(pool, row.id))["state"] == "synced"


async def test_cancel_before_any_event_is_synced(calendar, fake_api, pool, owner) -> None:
    row = await cancel(pool, owner, (await book(pool, owner)).id, "changed mind")
    assert await calendar.sync_appointment(row, first_name="Maria", vehicle="")
    assert fake_api.count("insert") == 0 and fake_api.count("delete") == 0
    assert await sync_row(pool, row.id) == {"event_id": None, "state": "synced", "error": None}


async def test_event_deleted_in_google_is_mirrored_again(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)
    fake_api.events[CALENDAR_ID].clear()  # someone removed it by hand (hard delete)

    await calendar.appointment_changed(
        await reload(pool, owner, row.id), first_name="Maria", vehicle=VEHICLE
    )
    [event] = fake_api.live_events(CALENDAR_ID)
    assert await sync_row(pool, row.id) == {
        "event_id": event["id"],
        "state": "synced",
        "error": None,
    }


# -- failures and catch-up ---------------------------------------------------------------


async def test_google_error_leaves_failed_then_sync_pending_catches_up(
    calendar, fake_api, pool, owner
) -> None:
    errors_before = sample("voice_agent_calendar_errors_total", {"operation": "sync"})
    row = await book(pool, owner)
    fake_api.fail("insert", 500, times=3)  # every retry of the call fails

    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)  # no raise
    assert fake_api.count("insert") == 3

    assert fake_api.live_events(CALENDAR_ID) == []
    assert await sync_row(pool, row.id) == {
        "event_id": None,
        "state": "failed",
        "error": "HTTP 500",
    }
    assert calendar.sync_failures == 1 and calendar.last_error == "sync: HTTP 500"
    assert sample("voice_agent_calendar_errors_total", {"operation": "sync"}) == errors_before + 1

    # Fresh failures are left alone for a while, then retried.
    assert await sync_pending(pool, calendar) == 0
    assert await sync_pending(pool, calendar, min_age=timedelta(0)) == 1
    [event] = fake_api.live_events(CALENDAR_ID)
    assert event["summary"] == "Oil change - Maria - 2021 Toyota Camry"
    assert await sync_row(pool, row.id) == {
        "event_id": event["id"],
        "state": "synced",
        "error": None,
    }
    assert await sync_pending(pool, calendar, min_age=timedelta(0)) == 0


async def test_sync_pending_handles_moves_and_cancels_made_while_down(
    calendar, fake_api, pool, owner
) -> None:
    fake_api.fail("list", 503, times=None)  # Google down: every sync fails at the search
    first = await book(pool, owner)
    await calendar.appointment_changed(first, first_name="Maria", vehicle=VEHICLE)
    first = await cancel(pool, owner, first.id, "rescheduled")
    moved = await book(
        pool,
        owner,
        starts_at=START + timedelta(days=2),
        key=f"resched:{first.id}",
        rescheduled_from_id=first.id,
    )
    await calendar.appointment_changed(moved, first_name="Maria", vehicle=VEHICLE)
    other = await book(pool, owner, starts_at=START + timedelta(days=3), key="call-2")
    await calendar.appointment_changed(other, first_name="Maria", vehicle=VEHICLE)
    other = await cancel(pool, owner, other.id, "not needed")
    # The cancel itself marks the mirror as owed ('pending'); the failed syncs say 'failed'.
    assert [(await sync_row(pool, a.id))["state"] for a in (first, moved)] == [
        "pending",
        "failed",
    ]

    fake_api.clear_failures()
    assert await sync_pending(pool, calendar, min_age=timedelta(0)) == 3

    [event] = fake_api.live_events(CALENDAR_ID)  # only the moved appointment is on it
    assert event["start"]["dateTime"] == "2026-12-03T09:00:00-06:00"
    assert (await sync_row(pool, moved.id))["event_id"] == event["id"]
    assert fake_api.count("insert") == 1


async def test_retried_create_does_not_duplicate(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)
    event_id = (await sync_row(pool, row.id))["event_id"]
    # The event was made but the row never learnt it (crash, lost response, DB down).
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE appointments SET external_event_id = NULL, calendar_sync_state = 'pending' "
            "WHERE id = %s",
            (row.id,),
        )

    assert await sync_pending(pool, calendar, min_age=timedelta(0)) == 1
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    assert [e["id"] for e in fake_api.live_events(CALENDAR_ID)] == [event_id]
    assert fake_api.count("insert") == 1
    assert await sync_row(pool, row.id) == {"event_id": event_id, "state": "synced", "error": None}


async def test_concurrent_syncs_of_one_appointment_make_one_event(
    calendar, fake_api, pool, owner
) -> None:
    row = await book(pool, owner)
    other = make_calendar(pool, fake_api.api_endpoint)  # another call's instance
    await asyncio.gather(
        *(
            c.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)
            for c in (calendar, other)
        )
    )
    assert len(fake_api.live_events(CALENDAR_ID)) == 1


# -- free/busy ---------------------------------------------------------------------------


async def test_busy_returns_calendar_busy_time(calendar, fake_api, pool, owner) -> None:
    meeting = (START.replace(hour=12), START.replace(hour=13))
    fake_api.busy_blocks[CALENDAR_ID] = [meeting]
    row = await book(pool, owner)  # mirrored appointments are transparent: not busy time
    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    day_start = START.replace(hour=0)
    busy = await calendar.busy(day_start, day_start + timedelta(days=1))

    assert busy == [meeting]
    assert all(s.tzinfo is not None and e.tzinfo is not None for s, e in busy)
    [request] = [r for r in fake_api.requests if r.operation == "freeBusy"]
    assert request.body["items"] == [{"id": CALENDAR_ID}]
    assert request.body["timeZone"] == TZ.key
    assert datetime.fromisoformat(request.body["timeMin"]) == day_start


async def test_busy_is_empty_and_counted_when_google_fails(calendar, fake_api) -> None:
    errors_before = sample("voice_agent_calendar_errors_total", {"operation": "busy"})
    fake_api.busy_blocks[CALENDAR_ID] = [(START, START + timedelta(hours=1))]
    fake_api.fail("freeBusy", 503)

    assert await calendar.busy(START, START + timedelta(days=1)) == []
    assert calendar.busy_failures == 1 and calendar.last_error == "busy: HTTP 503"
    assert sample("voice_agent_calendar_errors_total", {"operation": "busy"}) == errors_before + 1
    assert len(await calendar.busy(START, START + timedelta(days=1))) == 1  # recovered


@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/calendar/v3/"


async def test_busy_times_out_instead_of_hanging(pool, silent_server) -> None:
    calendar = make_calendar(pool, silent_server, timeout=0.5)
    started = time.monotonic()
    assert await calendar.busy(START, START + timedelta(days=1)) == []
    assert time.monotonic() - started < 3
    assert calendar.busy_failures == 1 and calendar.last_error == "busy: timeout"


async def test_sync_times_out_and_is_recorded(pool, owner, silent_server) -> None:
    calendar = make_calendar(pool, silent_server, timeout=0.5)
    row = await book(pool, owner)
    assert not await calendar.sync_appointment(row, first_name="Maria", vehicle=VEHICLE)
    assert (await sync_row(pool, row.id))["state"] == "failed"


async def test_a_timed_out_request_is_not_retried(pool, owner) -> None:
    """The request may still complete at Google: sending it again could double the event."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}/calendar/v3/"
        calendar = make_calendar(pool, endpoint, timeout=0.5)
        row = await book(pool, owner)
        assert not await calendar.sync_appointment(row, first_name="Maria", vehicle=VEHICLE)
        assert calendar.last_error == "sync: timeout"
        listener.setblocking(False)
        connections = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                listener.accept()[0].close()
                connections += 1
    assert connections == 1


async def test_busy_on_unknown_calendar_fails_softly(pool, fake_api) -> None:
    calendar = make_calendar(pool, fake_api.api_endpoint)
    fake_api.events.clear()  # the fake reports the calendar as not found
    assert await calendar.busy(START, START + timedelta(days=1)) == []
    assert calendar.busy_failures == 1


# -- construction ------------------------------------------------------------------------


def test_from_settings_uses_the_refresh_token(pool_free_settings: Settings) -> None:
    calendar = GoogleCalendar.from_settings(pool_free_settings, PROFILE, db=None)  # type: ignore[arg-type]
    assert calendar.initial_sync_state == "pending"
    client = calendar._clients.get()  # built without any network access
    credentials = client.credentials
    assert credentials.refresh_token == "refresh-token-1"
    assert credentials.client_id == "client-1.apps.googleusercontent.com"
    assert credentials.token_uri == "https://oauth2.googleapis.com/token"
    assert client.default_calendar == CALENDAR_ID
    # Instances for later calls share the process-wide clients.
    again = GoogleCalendar.from_settings(pool_free_settings, PROFILE, db=None)  # type: ignore[arg-type]
    assert again._clients is calendar._clients


@pytest.fixture
def pool_free_settings() -> Settings:
    return Settings(
        _env_file=None,
        GOOGLE_CLIENT_ID="client-1.apps.googleusercontent.com",
        GOOGLE_CLIENT_SECRET="secret-1",
        GOOGLE_REFRESH_TOKEN="refresh-token-1",
        GOOGLE_CALENDAR_ID=CALENDAR_ID,
    )


def test_from_settings_requires_all_google_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOOGLE_CLIENT_SECRET", "GOOGLE_REFRESH_TOKEN", "GOOGLE_CALENDAR_ID"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None, GOOGLE_CLIENT_ID="client-1")
    with pytest.raises(ValueError, match="incomplete"):
        GoogleCalendar.from_settings(settings, PROFILE, db=None)  # type: ignore[arg-type]


# -- through the scheduling tools --------------------------------------------------------

MARIA_PHONE = "+15555550142"
# Monday 2026-11-30 09:00 local; the first bookable time is 11:00 (2 h lead time).
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=TZ)


async def tool_ctx(pool, redis_client, calendar: GoogleCalendar, key_prefix: str):
    from tools.context import CallSession, ToolContext
    from tools.customers import identify_caller
    from tools.registry import run_tool

    session = CallSession(call_sid=f"CA{id(object()):x}", caller_phone=MARIA_PHONE)
    ctx = ToolContext(
        session=session,
        db=pool,
        profile=PROFILE,
        calendar=calendar,
        now=lambda: NOW,
    )
    assert await identify_caller(ctx)
    result = await run_tool(ctx, "verify_customer", {"date_of_birth": "1988-02-03"})
    assert result["verified"] is True, result
    return ctx


async def test_tools_book_and_cancel_mirror_to_google(
    calendar, fake_api, pool, owner, redis_client, redis_key_prefix
) -> None:
    from tools.registry import run_tool

    staff_meeting = (NOW.replace(hour=11), NOW.replace(hour=12))
    fake_api.busy_blocks[CALENDAR_ID] = [staff_meeting]
    ctx = await tool_ctx(pool, redis_client, calendar, redis_key_prefix)

    slots = await run_tool(
        ctx, "check_availability", {"service_type": "oil_change", "date_to": "2026-11-30"}
    )
    assert slots["ok"] and slots["slots"]
    offered = [ctx.session.offered_slots[s["slot_id"]] for s in slots["slots"]]
    assert all(s.ends_at <= staff_meeting[0] or s.starts_at >= staff_meeting[1] for s in offered)

    booked = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": slots["slots"][0]["slot_id"],
            "vehicle_id": owner["vehicle"],
            "service_type": "oil_change",
        },
    )
    assert booked["ok"], booked
    [event] = fake_api.live_events(CALENDAR_ID)
    assert event["summary"].startswith("Oil change - Maria - 2021 Toyota Camry")
    assert (await sync_row(pool, booked["appointment_id"]))["state"] == "synced"

    cancelled = await run_tool(
        ctx, "cancel_appointment", {"appointment_id": booked["appointment_id"]}
    )
    assert cancelled["ok"], cancelled
    assert fake_api.live_events(CALENDAR_ID) == []


async def test_tools_book_while_google_is_down(
    calendar, fake_api, pool, owner, redis_client, redis_key_prefix
) -> None:
    from tools.registry import run_tool

    fake_api.fail("freeBusy", 500, times=None)
    fake_api.fail("list", 500, times=None)
    ctx = await tool_ctx(pool, redis_client, calendar, redis_key_prefix)

    slots = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    assert slots["ok"] and slots["slots"]  # availability does not depend on Google
    booked = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": slots["slots"][0]["slot_id"],
            "vehicle_id": owner["vehicle"],
            "service_type": "oil_change",
        },
    )
    assert booked["ok"], booked  # the booking stands
    assert (await sync_row(pool, booked["appointment_id"]))["state"] == "failed"
    assert calendar.busy_failures == 1 and calendar.sync_failures == 1

    fake_api.clear_failures()
    assert await sync_pending(pool, calendar, min_age=timedelta(0)) == 1
    assert len(fake_api.live_events(CALENDAR_ID)) == 1


async def test_a_transient_google_error_is_retried_with_backoff(
    calendar, fake_api, pool, owner
) -> None:
    row = await book(pool, owner)
    fake_api.fail("insert", 503)  # once

    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    [event] = fake_api.live_events(CALENDAR_ID)
    assert (await sync_row(pool, row.id))["state"] == "synced"
    assert (await sync_row(pool, row.id))["event_id"] == event["id"]
    assert fake_api.count("insert") == 2


async def test_a_client_error_is_not_retried(calendar, fake_api, pool, owner) -> None:
    row = await book(pool, owner)
    fake_api.fail("insert", 400, times=None)

    await calendar.appointment_changed(row, first_name="Maria", vehicle=VEHICLE)

    assert fake_api.count("insert") == 1
    assert (await sync_row(pool, row.id))["state"] == "failed"

"""Text messages against a real Postgres, Redis and the Twilio REST fake: the Messages
resource of the fake, consent, confirmation texts after each kind of change, the sender's
rate limit and opt-out checks, reminders (once, across restarts and two workers, in each
customer's time zone and across DST), replies, delivery status and retries."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time as time_mod
from datetime import UTC, date, datetime, time, timedelta

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from campaigns.dialer import Dialer, run_due_retries
from campaigns.reminders import queue_reminders
from campaigns.worker import run_worker
from core.profile import ProfileError, TimeRange, load_profile, parse_profile
from core.settings import DEFAULT_PROFILE, Settings
from crm import messages as crm_messages
from crm.messages import TextFacts
from crm.vin import make_vin
from messaging import keywords
from messaging.bodies import render, scrub
from messaging.replies import handle_inbound
from messaging.sender import Sender, record_delivery_status
from scheduling.calendar import PostgresCalendar
from tests.fakes.twilio_rest import FakeTwilioREST
from tools.context import CallSession, ToolContext
from tools.registry import run_tool

ACCOUNT_SID = "AC" + "2" * 32
AUTH_TOKEN = "sms-auth-token"
DEALER_NUMBER = "+15555550199"
PROFILE = load_profile(DEFAULT_PROFILE)
CHI = PROFILE.time_zone
# Monday 2026-11-30 09:00 in Chicago: open, the next days are ordinary weekdays.
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=CHI)
LONG_AGO = datetime(2026, 10, 1, tzinfo=UTC)
_phones = itertools.count(5550300)
_serials = itertools.count(200001)
_codes = itertools.count(1)
_sids = itertools.count(1)


def next_phone() -> str:
    return f"+1312{next(_phones):07d}"


def message_sid() -> str:
    return f"SM{next(_sids):032x}"


class Clock:
    """A settable clock for the sender and the worker."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def pool(migrated_db: str):
    async with AsyncConnectionPool(migrated_db, min_size=1, max_size=20, open=False) as pool:
        yield pool


@pytest.fixture
async def conn(migrated_db: str):
    async with await psycopg.AsyncConnection.connect(migrated_db, autocommit=True) as conn:
        yield conn


@pytest.fixture
async def twilio():
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


@pytest.fixture
def sms_settings(twilio: FakeTwilioREST) -> Settings:
    return Settings(
        _env_file=None,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_PHONE_NUMBER=DEALER_NUMBER,
        TWILIO_API_BASE_URL=twilio.base_url,
        PUBLIC_BASE_URL="https://agent.example.test",
    )


def make_sender(pool, settings, redis=None, *, clock=None, rate=1000.0, profile=PROFILE) -> Sender:
    return Sender(
        pool,
        settings=settings,
        profile=profile,
        redis=redis,
        clock=clock or (lambda: NOW),
        poll_seconds=0.05,
        messages_per_second=rate,
    )


async def add_customer(
    conn,
    *,
    first: str = "Ana",
    phone: str | None = None,
    alt_phone: str | None = None,
    consent: bool | None = True,
    time_zone: str | None = "America/Chicago",
    state: str | None = None,
    dob: date = date(1985, 4, 12),
    zip_code: str = "60614",
) -> tuple[int, int, str]:
    """A customer with one vehicle: ``(customer id, vehicle id, phone)``.

    ``consent``: True (agreed), False (said no on a call), None (never asked).
    """
    phone = phone or next_phone()
    cur = await conn.execute(
        """
        INSERT INTO customers (first_name, last_name, phone, alt_phone, time_zone, state,
                               date_of_birth, zip_code, sms_consent, sms_consent_at)
        VALUES (%s, 'Test', %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (
            first,
            phone,
            alt_phone,
            time_zone,
            state,
            dob,
            zip_code,
            bool(consent),
            None if consent is None else LONG_AGO,
        ),
    )
    cid = (await cur.fetchone())[0]
    vin = make_vin(wmi="4T1", vds="B11HK", year_code="M", plant="U", serial=f"{next(_serials):06d}")
    cur = await conn.execute(
        "INSERT INTO vehicles (customer_id, vin, year, make, model) "
        "VALUES (%s, %s, 2021, 'Toyota', 'Camry') RETURNING id",
        (cid, vin),
    )
    return cid, (await cur.fetchone())[0], phone


async def add_appointment(
    conn,
    customer_id: int,
    vehicle_id: int,
    *,
    starts_at: datetime,
    status: str = "scheduled",
    created_at: datetime = LONG_AGO,
    bay: str | None = None,
) -> int:
    cur = await conn.execute(
        """
        INSERT INTO appointments (customer_id, vehicle_id, service_codes, status, starts_at,
                                  ends_at, bay_id, confirmation_code, created_at, cancelled_at)
        VALUES (%s, %s, '{oil_change}', %s, %s, %s, %s, %s, %s,
                CASE WHEN %s = 'cancelled' THEN now() END) RETURNING id
        """,
        (
            customer_id,
            vehicle_id,
            status,
            starts_at,
            starts_at + timedelta(minutes=45),
            bay or f"bay-{next(_codes)}",
            f"K{next(_codes):05d}",
            created_at,
            status,
        ),
    )
    return (await cur.fetchone())[0]


async def messages(conn, **where) -> list[dict]:
    clause = " AND ".join(f"{k} = %({k})s" for k in where) or "true"
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT * FROM messages WHERE {clause} ORDER BY id", where)
        return await cur.fetchall()


def tool_ctx(pool, redis_client, caller: str, *, now=NOW) -> ToolContext:
    return ToolContext(
        session=CallSession(call_sid=f"CA{next(_sids):032x}", caller_phone=caller),
        db=pool,
        profile=PROFILE,
        calendar=PostgresCalendar(),
        now=lambda: now,
    )


async def verified(pool, redis_client, phone: str) -> ToolContext:
    from tools.customers import identify_caller

    ctx = tool_ctx(pool, redis_client, phone)
    assert await identify_caller(ctx)
    result = await run_tool(ctx, "verify_customer", {"date_of_birth": "1985-04-12"})
    assert result["verified"] is True, result
    return ctx


async def book(
    ctx: ToolContext, vehicle_id: int, *, index: int = 0, service: str = "oil_change"
) -> dict:
    slots = await run_tool(ctx, "check_availability", {"service_type": service})
    result = await run_tool(
        ctx,
        "book_appointment",
        {
            "slot_id": slots["slots"][index]["slot_id"],
            "vehicle_id": vehicle_id,
            "service_type": service,
        },
    )
    assert result["ok"], result
    return result


# --- the Twilio REST fake speaks the Messages API ------------------------------------------


async def test_twilio_sdk_messages_create_reaches_the_fake(twilio: FakeTwilioREST) -> None:
    client = Client(ACCOUNT_SID, AUTH_TOKEN)
    client.api.base_url = twilio.base_url
    sent = await asyncio.to_thread(
        client.messages.create,
        to="+15555550100",
        from_=DEALER_NUMBER,
        body="Your oil change is booked.",
        status_callback="https://agent.example.test/twilio/sms/status",
    )
    assert sent.sid.startswith("SM") and len(sent.sid) == 34
    assert sent.status == "queued" and sent.direction == "outbound-api"
    assert sent.num_segments == "1"
    request = twilio.requests_to("POST", f"/Accounts/{ACCOUNT_SID}/Messages.json")[-1]
    assert request.form == {
        "To": "+15555550100",
        "From": DEALER_NUMBER,
        "Body": "Your oil change is booked.",
        "StatusCallback": "https://agent.example.test/twilio/sms/status",
    }
    assert twilio.texts[-1].body == "Your oil change is booked."
    fetched = await asyncio.to_thread(lambda: client.messages(sent.sid).fetch())
    assert fetched.body == "Your oil change is booked."

    via_service = await asyncio.to_thread(
        client.messages.create, to="+15555550101", messaging_service_sid="MG" + "3" * 32, body="Hi"
    )
    assert via_service.status == "accepted"
    assert twilio.texts[-1].sender == "MG" + "3" * 32

    for kwargs, code in (
        ({"to": "+15555550100", "from_": DEALER_NUMBER}, 21602),
        ({"to": "+15555550100", "body": "x"}, 21603),
        ({"to": "5550100", "from_": DEALER_NUMBER, "body": "x"}, 21211),
        ({"to": "+15555550100", "from_": DEALER_NUMBER, "body": "x" * 1601}, 21617),
    ):
        with pytest.raises(TwilioRestException) as err:
            await asyncio.to_thread(client.messages.create, **kwargs)
        assert err.value.code == code
    wrong = Client(ACCOUNT_SID, "wrong-token")
    wrong.api.base_url = twilio.base_url
    with pytest.raises(TwilioRestException) as err:
        await asyncio.to_thread(wrong.messages.create, to="+15555550100", from_="+1", body="x")
    assert err.value.status == 401
    assert len(twilio.texts) == 2


# --- keywords, bodies, profile -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "intent"),
    [
        *((word, "opt_out") for word in sorted(keywords.OPT_OUT)),
        *((word.upper(), "opt_out") for word in sorted(keywords.OPT_OUT)),
        ("  Stop. ", "opt_out"),
        ("ＳＴＯＰ", "opt_out"),
        ("START", "opt_in"),
        ("unstop", "opt_in"),
        ("Yes!", "opt_in"),
        ("HELP", "help"),
        ("info", "help"),
        ("C", "confirm"),
        ("c", "confirm"),
        ("Confirm", "confirm"),
        ("R", "reschedule"),
        ("reschedule.", "reschedule"),
        ("stop texting me", "other"),
        ("cancel my appointment", "other"),
        ("", "other"),
        ("\x00STOP", "opt_out"),
        ("C" * 5000, "other"),
    ],
)
def test_keywords(body: str, intent: str) -> None:
    assert keywords.classify(body)[0] == intent


VIN = make_vin(wmi="1HG", vds="CM826", year_code="3", plant="A", serial="004352")
DOB = date(1985, 4, 12)
DOB_SPELLINGS = ["1985-04-12", "4/12/1985", "04/12/1985", "April 12, 1985", "04121985"]


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["booked", "rescheduled", "cancelled", "reminder_24h", "reminder_2h"]),
    make=st.sampled_from(["Toyota", f"Toyota {VIN}", VIN.lower(), "Ford"]),
    model=st.one_of(
        st.sampled_from(["Camry", *(f"Camry {d}" for d in DOB_SPELLINGS), f"X{VIN}Y"]),
        st.text(max_size=60),
    ),
    first=st.text(max_size=30),
)
def test_a_body_never_carries_a_date_of_birth_or_a_full_vin(
    kind: str, make: str, model: str, first: str
) -> None:
    facts = TextFacts(
        kind=kind,
        first_name=first,
        starts_at=NOW + timedelta(days=1),
        service_codes=["oil_change"],
        confirmation_code="K7D9XA",
        appointment_status="scheduled",
        vehicle_year=2021,
        vehicle_make=make,
        vehicle_model=model,
        date_of_birth=DOB,
        vins=[VIN],
    )
    body = render(facts, PROFILE)
    assert VIN not in body.upper()
    for spelling in DOB_SPELLINGS:
        assert spelling.lower() not in body.lower()
    assert len(body) <= 320 and "\x00" not in body
    if kind != "cancelled":
        assert "K7D9XA" in body


def test_scrub_masks_any_vin_like_token() -> None:
    assert scrub(f"vin {VIN} ok") == f"vin ...{VIN[-4:]} ok"
    assert scrub("born 1985-04-12", date_of_birth=DOB) == "born [date removed]"
    assert "K7D9XA" in scrub("code K7D9XA")


def test_profile_texting_settings_are_validated() -> None:
    import tomllib

    base = tomllib.loads(DEFAULT_PROFILE.read_text())
    assert PROFILE.texting.reminder_hours == (24, 2)
    assert PROFILE.texting.send_window == TimeRange(time(8, 0), time(21, 0))
    assert PROFILE.address.startswith("2400 River Road")
    for texting, field in (
        ({"reminder_hours": [24, 24]}, "texting.reminder_hours"),
        ({"reminder_hours": [0]}, "texting.reminder_hours"),
        ({"send_window": "06:00-22:00"}, "texting.send_window"),
        ({"send_window": "nights"}, "texting.send_window"),
        ({"messages_per_second": 0}, "texting.messages_per_second"),
        ({"enabled": "yes"}, "texting.enabled"),
        ({"reminder_hours": [1], "reminder_cutoff_minutes": 90}, "texting.reminder_cutoff"),
    ):
        with pytest.raises(ProfileError, match=field):
            parse_profile(base | {"texting": texting})
    custom = parse_profile(
        base | {"texting": {"reminder_hours": [2, 48], "send_window": "09:00-20:00"}}
    )
    assert custom.texting.reminder_hours == (48, 2)


# --- confirmation texts after each kind of change -------------------------------------------


async def test_booking_reschedule_and_cancel_each_text_the_customer(
    pool, conn, redis_client, twilio, sms_settings
) -> None:
    _, vid, phone = await add_customer(conn, consent=True)
    ctx = await verified(pool, redis_client, phone)
    booked = await book(ctx, vid)
    assert booked["text"] == "will_text"
    sender = make_sender(pool, sms_settings)
    stats = await sender.drain()
    assert stats.sent == 1
    [text] = twilio.texts_to(phone)
    assert text.sender == DEALER_NUMBER
    assert text.status_callback == "https://agent.example.test/twilio/sms/status"
    assert booked["confirmation_code"] in text.body
    assert "oil change" in text.body and "2021 Toyota Camry" in text.body
    assert "2400 River Road" in text.body and "Riverside Motors" in text.body
    row = (await messages(conn, kind="booked"))[0]
    assert row["status"] == "sent" and row["twilio_sid"] == text.sid
    assert row["body"] == text.body and row["appointment_id"] == booked["appointment_id"]

    slots = await run_tool(ctx, "check_availability", {"service_type": "oil_change"})
    moved = await run_tool(
        ctx,
        "reschedule_appointment",
        {"appointment_id": booked["appointment_id"], "slot_id": slots["slots"][2]["slot_id"]},
    )
    assert moved["ok"] and moved["text"] == "will_text"
    await sender.drain()
    cancelled = await run_tool(
        ctx, "cancel_appointment", {"appointment_id": moved["appointment_id"]}
    )
    assert cancelled["ok"] and cancelled["text"] == "will_text"
    await sender.drain()
    await sender.drain()
    texts = twilio.texts_to(phone)
    assert len(texts) == 3
    assert "moved to" in texts[1].body and moved["confirmation_code"] in texts[1].body
    assert "is cancelled" in texts[2].body
    kinds = [(r["kind"], r["appointment_id"]) for r in await messages(conn, direction="outbound")]
    assert kinds == [
        ("booked", booked["appointment_id"]),
        ("rescheduled", moved["appointment_id"]),
        ("cancelled", moved["appointment_id"]),
    ]
    # A repeated booking call (idempotent retry) texts nobody twice.
    async with pool.connection() as c:
        again = await crm_messages.queue_appointment_text(
            c,
            appointment_id=booked["appointment_id"],
            kind="booked",
            call_sid="CAx",
            now=NOW,
            hold=timedelta(minutes=1),
            expires_after=timedelta(hours=1),
        )
    assert again is None


async def test_consent_is_asked_once_and_recorded_with_time_and_call(
    pool, conn, redis_client, twilio, sms_settings
) -> None:
    cid, vid, phone = await add_customer(conn, consent=None)
    ctx = await verified(pool, redis_client, phone)
    first = await book(ctx, vid)
    assert first["text"] == "ask_consent"
    second = await book(ctx, vid, index=3, service="tire_rotation")  # one oil change
    assert second["text"] == "none"  # asked once per call
    sender = make_sender(pool, sms_settings)
    await sender.drain()
    assert twilio.texts == []  # waiting for the answer
    queued = await messages(conn, status="queued")
    assert len(queued) == 2 and all(r["call_sid"] == ctx.session.call_sid for r in queued)

    answer = await run_tool(ctx, "record_text_consent", {"answer": True})
    assert answer["ok"] and answer["text_consent"] is True
    cur = await conn.execute(
        "SELECT sms_consent, sms_consent_at, sms_consent_call_sid FROM customers WHERE id = %s",
        (cid,),
    )
    assert await cur.fetchone() == (True, NOW, ctx.session.call_sid)
    await sender.drain()
    bodies = [t.body for t in twilio.texts_to(phone)]
    assert len(bodies) == 2
    assert first["confirmation_code"] in bodies[0] and second["confirmation_code"] in bodies[1]


async def test_a_no_or_a_call_ended_without_an_answer_sends_nothing(
    pool, conn, redis_client, twilio, sms_settings
) -> None:
    sender = make_sender(pool, sms_settings)
    _, vid, phone = await add_customer(conn, consent=None)
    ctx = await verified(pool, redis_client, phone)
    assert (await book(ctx, vid))["text"] == "ask_consent"
    refused = await run_tool(ctx, "record_text_consent", {"answer": "no"})
    assert refused["text_consent"] is False
    await sender.drain()
    assert twilio.texts == []
    assert [r["error"] for r in await messages(conn, kind="booked")] == ["no consent"]

    _, vid2, phone2 = await add_customer(conn, consent=None)
    ctx2 = await verified(pool, redis_client, phone2)
    assert (await book(ctx2, vid2, index=2))["text"] == "ask_consent"
    await conn.execute(
        "INSERT INTO calls (call_sid, direction, ended_at, started_at) "
        "VALUES (%s, 'inbound', now(), now())",
        (ctx2.session.call_sid,),
    )
    await sender.drain()
    assert twilio.texts == []
    rows = await messages(conn, kind="booked")
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    bad = await run_tool(ctx2, "record_text_consent", {"answer": "maybe"})
    assert bad["ok"] is False and bad["error"] == "bad_arguments"  # the registry's check


async def test_unverified_caller_cannot_record_consent(pool, conn, redis_client) -> None:
    _, _, phone = await add_customer(conn, consent=None)
    ctx = tool_ctx(pool, redis_client, phone)
    result = await run_tool(ctx, "record_text_consent", {"answer": True})
    assert result["error"] == "not_verified"
    cur = await conn.execute("SELECT count(*) FROM customers WHERE sms_consent")
    assert (await cur.fetchone())[0] == 0


# --- the sender: one rate limit, opt-outs ---------------------------------------------------


async def test_the_rate_limit_holds_across_two_senders(
    pool, conn, redis_client, twilio, sms_settings
) -> None:
    rate = 4.0
    phones = []
    async with pool.connection() as c:
        for _ in range(6):
            phones.append(next_phone())
            await crm_messages.queue_reply(
                c, phone=phones[-1], customer_id=None, body="Hello", now=NOW
            )
    senders = [make_sender(pool, sms_settings, redis_client, rate=rate) for _ in range(2)]
    started = time_mod.monotonic()
    results = await asyncio.gather(*(s.drain() for s in senders))
    assert sum(r.sent for r in results) == 6
    assert sorted(t.to for t in twilio.texts) == sorted(phones)  # each once
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(twilio.texts)]
    assert min(gaps) >= 1 / rate - 0.05, gaps
    assert time_mod.monotonic() - started >= 5 / rate - 0.05


async def test_default_throughput_is_one_text_per_second(
    pool, redis_client, twilio, sms_settings
) -> None:
    async with pool.connection() as c:
        for _ in range(3):
            await crm_messages.queue_reply(
                c, phone=next_phone(), customer_id=None, body="Hi", now=NOW
            )
    sender = Sender(
        pool, settings=sms_settings, profile=PROFILE, redis=redis_client, clock=Clock(NOW)
    )
    await sender.drain()
    assert len(twilio.texts) == 3
    assert twilio.texts[2].received_at - twilio.texts[0].received_at >= 1.95


async def test_stop_is_honoured_by_every_sender(
    pool, conn, redis_client, twilio, sms_settings
) -> None:
    cid, vid, phone = await add_customer(conn, consent=True)
    tomorrow = NOW + timedelta(days=1)
    aid = await add_appointment(conn, cid, vid, starts_at=tomorrow)
    stop = await handle_inbound(
        pool, profile=PROFILE, message_sid=message_sid(), from_number=phone, body="STOP", now=NOW
    )
    assert stop.action == "opted_out" and stop.reply_id is None
    sender = make_sender(pool, sms_settings)
    # A confirmation text after a booking on a call...
    ctx = await verified(pool, redis_client, phone)
    # (tomorrow's appointment is an oil change: this books another service)
    assert (await book(ctx, vid, service="tire_rotation"))["text"] == "none"
    await conn.execute(  # booked at the test's "now"
        "UPDATE appointments SET created_at = %s WHERE call_sid = %s", (NOW, ctx.session.call_sid)
    )
    # ... a reminder due now ...
    assert await queue_reminders(pool, profile=PROFILE, now=NOW) == 0
    # ... an answer to HELP ...
    helped = await handle_inbound(
        pool, profile=PROFILE, message_sid=message_sid(), from_number=phone, body="HELP", now=NOW
    )
    assert helped.action == "help"
    await sender.drain()
    assert twilio.texts == []
    assert {r["error"] for r in await messages(conn, direction="outbound")} == {"opted out"}
    # START: texts flow again.
    started = await handle_inbound(
        pool, profile=PROFILE, message_sid=message_sid(), from_number=phone, body="start", now=NOW
    )
    assert started.action == "opted_in"
    await handle_inbound(
        pool, profile=PROFILE, message_sid=message_sid(), from_number=phone, body="help", now=NOW
    )
    assert await queue_reminders(pool, profile=PROFILE, now=NOW) == 1
    await sender.drain()
    assert len(twilio.texts_to(phone)) == 2
    assert [r["kind"] for r in await messages(conn, appointment_id=aid)] == ["reminder_24h"]


async def test_a_stop_between_claim_and_send_wins(pool, conn, twilio, sms_settings) -> None:
    phone = next_phone()
    async with pool.connection() as c:
        await crm_messages.queue_reply(c, phone=phone, customer_id=None, body="Hi", now=NOW)

    class SlowLimiter:
        async def wait(self) -> None:
            async with pool.connection() as c:
                await crm_messages.opt_out(c, phone=phone, keyword="stop")

    sender = make_sender(pool, sms_settings)
    sender.limiter = SlowLimiter()  # the STOP lands while the text waits for its turn
    stats = await sender.drain()
    assert stats.sent == 0 and twilio.texts == []
    assert (await messages(conn, kind="reply"))[0]["status"] == "skipped"


# --- reminders -------------------------------------------------------------------------------


async def test_reminders_24h_and_2h_sent_once_across_restarts_and_two_workers(
    pool, conn, migrated_db, redis_client, twilio, sms_settings
) -> None:
    cid, vid, phone = await add_customer(conn, consent=True)
    visit = datetime(2026, 12, 2, 11, 0, tzinfo=CHI)
    aid = await add_appointment(conn, cid, vid, starts_at=visit)
    clock = Clock(visit - timedelta(hours=30))
    dialed: list[str] = []

    async def dial(settings, *, to, scenario, customer_id, campaign_attempt_id=None) -> str:
        dialed.append(to)  # the confirmation campaign calls too; not the point here
        return f"CA{len(dialed):032x}"

    async def run_workers(count: int, *, expect_texts: int) -> None:
        stops = [asyncio.Event() for _ in range(count)]
        tasks = [
            asyncio.create_task(
                run_worker(
                    pool,
                    conninfo=migrated_db,
                    profile=PROFILE,
                    settings=None,
                    dial=dial,
                    stop=stops[i],
                    poll_seconds=0.05,
                    clock=clock,
                    hold_calls=False,
                    sender=make_sender(pool, sms_settings, redis_client, clock=clock),
                )
            )
            for i in range(count)
        ]
        async with asyncio.timeout(15):
            while True:
                if len(twilio.texts) >= expect_texts:
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # time enough for a duplicate to show
        for stop in stops:
            stop.set()
        for task in tasks:
            await asyncio.wait_for(task, 20)

    await run_workers(1, expect_texts=0)
    assert twilio.texts == []  # 30 hours ahead: nothing due
    clock.now = visit - timedelta(hours=23, minutes=50)
    await run_workers(1, expect_texts=1)
    await run_workers(1, expect_texts=1)  # a restart
    await run_workers(2, expect_texts=1)  # two workers at once
    [reminder] = twilio.texts
    assert reminder.to == phone and reminder.body.startswith("Reminder from Riverside Motors")
    assert "Wed, Dec 2 at 11:00 AM CST" in reminder.body
    cur = await conn.execute("SELECT reminded_at FROM appointments WHERE id = %s", (aid,))
    assert (await cur.fetchone())[0] == clock.now
    clock.now = visit - timedelta(hours=1, minutes=55)
    await run_workers(2, expect_texts=2)
    await run_workers(1, expect_texts=2)
    assert [t.to for t in twilio.texts] == [phone, phone]
    rows = await messages(conn, appointment_id=aid)
    assert [(r["kind"], r["status"]) for r in rows] == [
        ("reminder_24h", "sent"),
        ("reminder_2h", "sent"),
    ]
    clock.now = visit - timedelta(minutes=10)  # past the cutoff: nothing else
    await run_workers(1, expect_texts=2)
    assert len(twilio.texts) == 2


async def test_no_reminder_for_a_visit_booked_after_it_was_due_or_not_live(pool, conn) -> None:
    cid, vid, _ = await add_customer(conn, consent=True)
    visit = NOW + timedelta(hours=26)  # Tuesday 11:00; its 24-hour reminder is due Monday 11:00
    booked_at = NOW + timedelta(hours=3)  # ... but it was booked at 12:00
    await add_appointment(conn, cid, vid, starts_at=visit, created_at=booked_at)
    await add_appointment(conn, cid, vid, starts_at=visit + timedelta(hours=2), status="cancelled")
    no_consent, vid2, _ = await add_customer(conn, consent=False)
    await add_appointment(conn, no_consent, vid2, starts_at=visit)
    never_asked, vid3, _ = await add_customer(conn, consent=None)
    await add_appointment(conn, never_asked, vid3, starts_at=visit)
    assert await queue_reminders(pool, profile=PROFILE, now=booked_at + timedelta(minutes=30)) == 0
    # Its 2-hour reminder does come (and only its).
    assert await queue_reminders(pool, profile=PROFILE, now=visit - timedelta(hours=2)) == 1


@pytest.mark.parametrize(
    ("zone", "state", "at_utc", "queued"),
    [
        # 14:10 UTC: 08:10 in Chicago, 09:10 in New York, 06:10 in Los Angeles.
        ("America/New_York", None, datetime(2026, 12, 1, 14, 10, tzinfo=UTC), True),
        ("America/Chicago", None, datetime(2026, 12, 1, 14, 10, tzinfo=UTC), True),
        ("America/Los_Angeles", None, datetime(2026, 12, 1, 14, 10, tzinfo=UTC), False),
        (None, "CA", datetime(2026, 12, 1, 14, 10, tzinfo=UTC), False),
        (None, "NY", datetime(2026, 12, 1, 14, 10, tzinfo=UTC), True),
        (None, None, datetime(2026, 12, 1, 14, 10, tzinfo=UTC), True),  # dealership's zone
        # 03:30 UTC: 21:30 in Chicago, 19:30 in Los Angeles.
        ("America/Chicago", None, datetime(2026, 12, 2, 3, 30, tzinfo=UTC), False),
        ("America/Los_Angeles", None, datetime(2026, 12, 2, 3, 30, tzinfo=UTC), True),
    ],
)
async def test_quiet_hours_follow_each_customers_time_zone(
    pool, conn, zone, state, at_utc, queued
) -> None:
    cid, vid, _ = await add_customer(conn, consent=True, time_zone=zone, state=state)
    # Due 24 hours before: the reminder may go out from 8 hours before `at_utc` on.
    await add_appointment(conn, cid, vid, starts_at=at_utc + timedelta(hours=16))
    assert await queue_reminders(pool, profile=PROFILE, now=at_utc) == int(queued)


async def test_quiet_hours_across_the_end_of_daylight_saving_time(pool, conn) -> None:
    # New York falls back on Sunday 2026-11-01 at 06:00 UTC (2 AM EDT -> 1 AM EST).
    cid, vid, _ = await add_customer(conn, consent=True, time_zone="America/New_York")
    visit = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)  # Monday 07:00 EST
    aid = await add_appointment(conn, cid, vid, starts_at=visit)
    # 24-hour reminder due at 12:00 UTC = 07:00 EST (it would be 08:00 EDT): quiet.
    assert await queue_reminders(pool, profile=PROFILE, now=visit - timedelta(hours=24)) == 0
    # 12:30 UTC is 07:30 EST: still quiet (a fixed -4 offset would say 08:30).
    assert await queue_reminders(pool, profile=PROFILE, now=visit - timedelta(hours=23.5)) == 0
    # 13:00 UTC is 08:00 EST: the window opens.
    assert await queue_reminders(pool, profile=PROFILE, now=visit - timedelta(hours=23)) == 1
    # The 2-hour reminder is due at 05:00 EST and expires at 06:30: never sent at night.
    for minutes in range(0, 120, 15):
        now = visit - timedelta(hours=2) + timedelta(minutes=minutes)
        await queue_reminders(pool, profile=PROFILE, now=now)
    assert [r["kind"] for r in await messages(conn, appointment_id=aid)] == ["reminder_24h"]


async def test_spring_forward_reminder_at_the_right_local_hour(pool, conn) -> None:
    # Chicago springs forward on Sunday 2027-03-14 (2 AM CST -> 3 AM CDT).
    cid, vid, _ = await add_customer(conn, consent=True)
    visit = datetime(2027, 3, 15, 9, 0, tzinfo=CHI)  # Monday 09:00 CDT = 14:00 UTC
    await add_appointment(conn, cid, vid, starts_at=visit)
    before = visit - timedelta(hours=24, minutes=1)
    assert await queue_reminders(pool, profile=PROFILE, now=before) == 0
    due = visit - timedelta(hours=24)  # Sunday 09:00 CDT: 24 real hours, one local hour apart
    assert due.astimezone(CHI).hour == 9
    assert await queue_reminders(pool, profile=PROFILE, now=due) == 1


# --- replies ---------------------------------------------------------------------------------


async def inbound(pool, phone: str, body: str, *, now: datetime = NOW, sid: str | None = None):
    return await handle_inbound(
        pool,
        profile=PROFILE,
        message_sid=sid or message_sid(),
        from_number=phone,
        body=body,
        now=now,
    )


async def reply_bodies(conn, phone: str) -> list[str]:
    return [r["body"] for r in await messages(conn, kind="reply", phone=phone)]


async def test_c_confirms_the_nearest_appointment_once(pool, conn) -> None:
    cid, vid, phone = await add_customer(conn)
    later = await add_appointment(conn, cid, vid, starts_at=NOW + timedelta(days=5))
    sooner = await add_appointment(conn, cid, vid, starts_at=NOW + timedelta(days=1))
    result = await inbound(pool, phone, "c")
    assert (result.action, result.appointment_id) == ("confirmed", sooner)
    cur = await conn.execute("SELECT id, status, confirmed_at FROM appointments ORDER BY starts_at")
    assert await cur.fetchall() == [(sooner, "confirmed", NOW), (later, "scheduled", None)]
    again = await inbound(pool, phone, "Confirm")
    assert again.action == "already_confirmed"
    replies = await reply_bodies(conn, phone)
    assert "is confirmed" in replies[0] and "Tue, Dec 1 at 9:00 AM CST" in replies[0]
    assert "already confirmed" in replies[1]


async def test_a_webhook_retry_is_acted_on_once(pool, conn) -> None:
    cid, vid, phone = await add_customer(conn)
    await add_appointment(conn, cid, vid, starts_at=NOW + timedelta(days=1))
    sid = message_sid()
    first = await inbound(pool, phone, "C", sid=sid)
    second = await inbound(pool, phone, "C", sid=sid)
    assert (first.action, second.action) == ("confirmed", "duplicate")
    assert len(await reply_bodies(conn, phone)) == 1


async def test_household_reply_goes_to_the_nearest_upcoming_appointment(pool, conn) -> None:
    shared = next_phone()
    daniel, dvid, _ = await add_customer(conn, first="Daniel", phone=shared)
    grace, gvid, _ = await add_customer(conn, first="Grace", alt_phone=shared)
    await add_appointment(conn, daniel, dvid, starts_at=NOW + timedelta(days=4))
    grace_visit = await add_appointment(conn, grace, gvid, starts_at=NOW + timedelta(days=2))
    result = await inbound(pool, shared, "C")
    assert (result.customer_id, result.appointment_id) == (grace, grace_visit)


async def test_r_queues_a_bot_callback_or_an_advisor(pool, conn) -> None:
    cid, vid, phone = await add_customer(conn)
    aid = await add_appointment(conn, cid, vid, starts_at=NOW + timedelta(days=2))
    open_now = datetime(2026, 11, 30, 10, 30, tzinfo=CHI)  # inside both calling windows
    result = await inbound(pool, phone, "R", now=open_now)
    assert result.action == "callback_bot"
    cur = await conn.execute(
        "SELECT campaign, customer_id, appointment_id, status, next_attempt_at "
        "FROM campaign_attempts"
    )
    assert await cur.fetchall() == [("confirmation", cid, aid, "retry_pending", open_now)]
    assert "call you shortly" in (await reply_bodies(conn, phone))[0]
    # The worker's retry pass places the call, in the confirmation scenario.
    calls: list[dict] = []

    async def dial(settings, *, to, scenario, customer_id, campaign_attempt_id=None) -> str:
        calls.append({"to": to, "scenario": scenario, "customer_id": customer_id})
        return "CA" + "7" * 32

    dialer = Dialer(pool, profile=PROFILE, settings=None, dial=dial, now=open_now, hold_calls=False)
    assert (await run_due_retries(dialer)).dialed == 1
    assert calls == [{"to": phone, "scenario": "confirmation", "customer_id": cid}]
    # Late at night nobody may be called now: an advisor calls back.
    cid2, vid2, phone2 = await add_customer(conn)
    aid2 = await add_appointment(conn, cid2, vid2, starts_at=NOW + timedelta(days=2))
    night = datetime(2026, 11, 30, 22, 30, tzinfo=CHI)
    late = await inbound(pool, phone2, "reschedule", now=night)
    assert late.action == "callback_advisor"
    cur = await conn.execute("SELECT customer_id, phone, reason, status FROM callback_requests")
    assert await cur.fetchall() == [
        (cid2, phone2, f"text reply R: reschedule appointment {aid2}", "open")
    ]
    assert "service advisor will call you" in (await reply_bodies(conn, phone2))[0]


@pytest.mark.parametrize("word", sorted(keywords.OPT_OUT))
async def test_each_carrier_opt_out_keyword_opts_out_and_start_words_opt_back_in(
    pool, conn, word: str
) -> None:
    _, _, phone = await add_customer(conn)
    assert (await inbound(pool, phone, f" {word.upper()} ")).action == "opted_out"
    async with pool.connection() as c:
        assert await crm_messages.is_opted_out(c, phone)
    for again in sorted(keywords.OPT_IN):
        assert (await inbound(pool, phone, again.title())).action == "opted_in"
        async with pool.connection() as c:
            assert not await crm_messages.is_opted_out(c, phone)
            await crm_messages.opt_out(c, phone=phone, keyword=word)
    assert await reply_bodies(conn, phone) == []  # Twilio confirms these, we stay silent


async def test_help_other_and_unknown_numbers(pool, conn) -> None:
    _, _, phone = await add_customer(conn)
    assert (await inbound(pool, phone, "HELP")).action == "help"
    assert (await inbound(pool, phone, "what time do you open?")).action == "options"
    help_text, options = await reply_bodies(conn, phone)
    assert "Riverside Motors" in help_text and "(555) 555-0199" in help_text
    assert "C to confirm" in options and "R to reschedule" in options
    stranger = next_phone()
    assert (await inbound(pool, stranger, "C")).action == "no_appointment"
    assert "couldn't find an upcoming appointment" in (await reply_bodies(conn, stranger))[0]
    for bad_from in ("", "12345", "+1 555 555 0100", "client:alice", "\x00+15555550100"):
        assert (await inbound(pool, bad_from, "C")).action == "ignored"
    huge = await inbound(pool, phone, "\x00" + "Ω" * 10_000)
    assert huge.action == "options"
    stored = (await messages(conn, kind="inbound"))[-1]["body"]
    assert len(stored) == 1600 and "\x00" not in stored


# --- delivery status, failures, retries ------------------------------------------------------


async def send_one(pool, sender: Sender, phone: str) -> str:
    async with pool.connection() as c:
        await crm_messages.queue_reply(
            c, phone=phone, customer_id=None, body="Hi", now=sender.now()
        )
    stats = await sender.drain()
    assert stats.sent == 1, stats
    return stats.sids[0]


async def test_delivery_status_and_one_retry_of_a_transient_failure(
    pool, conn, twilio, sms_settings
) -> None:
    clock = Clock(NOW)
    sender = make_sender(pool, sms_settings, clock=clock)
    phone = next_phone()
    sid = await send_one(pool, sender, phone)
    for status in ("sent", "delivered", "sent"):  # out of order, twice: delivered stays
        await record_delivery_status(
            pool, profile=PROFILE, sid=sid, status=status, error_code=None, now=NOW
        )
    assert (await messages(conn, twilio_sid=sid))[0]["status"] == "delivered"

    sid = await send_one(pool, sender, phone)
    failed = await record_delivery_status(
        pool, profile=PROFILE, sid=sid, status="undelivered", error_code=30003, now=NOW
    )
    assert failed.status == "undelivered"
    [original] = await messages(conn, twilio_sid=sid)
    assert original["error_code"] == 30003
    [retry] = await messages(conn, retry_of=original["id"])
    assert retry["status"] == "queued" and retry["not_before"] == NOW + timedelta(minutes=10)
    assert (await sender.drain()).sent == 0  # not before the retry delay
    clock.now = NOW + timedelta(minutes=10)
    [retry_sid] = (await sender.drain()).sids
    # The retry fails too: recorded, never retried again.
    await record_delivery_status(
        pool, profile=PROFILE, sid=retry_sid, status="failed", error_code=30003, now=clock.now
    )
    assert (await messages(conn, twilio_sid=retry_sid))[0]["status"] == "failed"
    assert await messages(conn, retry_of=retry["id"]) == []

    # Permanent: a landline. Recorded, not retried.
    sid = await send_one(pool, sender, next_phone())
    await record_delivery_status(
        pool, profile=PROFILE, sid=sid, status="undelivered", error_code=30006, now=clock.now
    )
    [landline] = await messages(conn, twilio_sid=sid)
    assert (
        landline["status"] == "undelivered" and await messages(conn, retry_of=landline["id"]) == []
    )
    async with pool.connection() as c:
        failed_rows = await crm_messages.failed_texts(c)
    assert [(r.error_code, r.retried_by is not None) for r in failed_rows] == [
        (30006, False),
        (30003, False),
        (30003, True),
    ]


async def test_rest_errors_transient_retried_permanent_not_21610_opts_out(
    pool, conn, twilio, sms_settings
) -> None:
    clock = Clock(NOW)
    sender = make_sender(pool, sms_settings, clock=clock)
    phones = [next_phone() for _ in range(3)]
    twilio.fail_next_messages(1, status=500, code=20500, message="Internal Server Error")
    twilio.fail_next_messages(
        1, status=400, code=21614, message="'To' number is not a valid mobile number"
    )
    twilio.fail_next_messages(
        1, status=400, code=21610, message="Attempt to send to unsubscribed recipient"
    )
    async with pool.connection() as c:
        for phone in phones:
            await crm_messages.queue_reply(c, phone=phone, customer_id=None, body="Hi", now=NOW)
    stats = await sender.drain()
    assert stats.failed == 3 and twilio.texts == []
    rows = await messages(conn, kind="reply")
    assert [(r["phone"], r["status"], r["error_code"], r["retry_of"]) for r in rows] == [
        (phones[0], "failed", 20500, None),
        (phones[1], "failed", 21614, None),
        (phones[2], "failed", 21610, None),
        (phones[0], "queued", None, rows[0]["id"]),  # the one retry of the transient failure
    ]
    async with pool.connection() as c:
        assert await crm_messages.is_opted_out(c, phones[2])
    clock.now = NOW + timedelta(minutes=10)
    assert (await sender.drain()).sent == 1
    assert [t.to for t in twilio.texts] == [phones[0]]


async def test_a_status_callback_before_the_sid_is_stored_still_counts(
    pool, conn, twilio, sms_settings, monkeypatch
) -> None:
    import messaging.sender as sender_module

    real_send = sender_module.send_sms

    async def send_then_callback(settings, *, to, body):
        # Twilio's callback lands between its REST answer and our bookkeeping.
        sent = await real_send(settings, to=to, body=body)
        await record_delivery_status(
            pool, profile=PROFILE, sid=sent.sid, status="failed", error_code=30008, now=NOW
        )
        return sent

    monkeypatch.setattr(sender_module, "send_sms", send_then_callback)
    sid = await send_one(pool, make_sender(pool, sms_settings), next_phone())
    [row] = await messages(conn, twilio_sid=sid)
    assert row["status"] == "failed" and row["error_code"] == 30008
    assert len(await messages(conn, retry_of=row["id"])) == 1


async def test_a_text_lost_while_sending_is_never_sent_again(
    pool, conn, twilio, sms_settings
) -> None:
    async with pool.connection() as c:
        await crm_messages.queue_reply(c, phone=next_phone(), customer_id=None, body="Hi", now=NOW)
        claimed = await crm_messages.claim_next(c, now=NOW)
    assert claimed is not None  # ... and the process died here
    sender = make_sender(pool, sms_settings, clock=lambda: NOW + timedelta(minutes=11))
    stats = await sender.drain()
    assert stats.skipped == {"interrupted": 1} and twilio.texts == []
    assert (await messages(conn))[0]["status"] == "failed"


async def test_texting_off_queues_nothing(pool, conn, redis_client) -> None:
    _, vid, phone = await add_customer(conn)
    ctx = await verified(pool, redis_client, phone)
    ctx.profile = dataclasses.replace(
        PROFILE, texting=dataclasses.replace(PROFILE.texting, enabled=False)
    )
    booked = await book(ctx, vid)
    assert "text" not in booked
    assert await messages(conn) == []
    assert await queue_reminders(pool, profile=ctx.profile, now=NOW + timedelta(days=1)) == 0

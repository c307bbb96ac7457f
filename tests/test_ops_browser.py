"""The ops console in a real browser (Chromium driven by Playwright).

One server (``tests.harness.running_agent`` with the wire-protocol fakes) and one browser
for the whole module; the tests run in order and build on each other: log in, watch a
live call update, find it in the history, act on a callback, see a campaign run, look at
the schedule and the health page. Each page is saved as ``docs/screenshots/<page>.png``.

Chromium comes from Debian (``/usr/bin/chromium``); the session fixture installs it with
``apt-get`` when it is missing, and the tests FAIL (never skip) when it cannot be installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time as clock
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright, expect

from campaigns.dialer import Dialer, run_campaign
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from crm.migrate import apply_migrations
from seeding import seed
from tests.conftest_db import create_database, database_url, drop_database
from tests.fakes.audio import speech_pcm16, speech_ulaw
from tests.fakes.openai_chat import FakeOpenAI, say
from tests.harness import BOOKING_UTTERANCES, Agent, booking_script, running_agent
from tests.ops_support import insert_call, insert_callback, query
from tests.system_packages import apt_install

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "e2e-admin"  # tests.harness sets ADMIN_TOKEN to this
MARIA = "+15555550100"
PROFILE = load_profile(DEFAULT_PROFILE)
UI_TIMEOUT_MS = 20_000
expect.set_options(timeout=UI_TIMEOUT_MS)
#: What the tests of this module hand on to the next ones (they run in order).
STATE: dict[str, str] = {}


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing; the test fails without it."""
    log = apt_install(["chromium"], installed=CHROMIUM.exists)
    if not CHROMIUM.exists():
        pytest.fail(
            "The console's browser tests need Chromium at /usr/bin/chromium and "
            "`apt-get install -y chromium` could not install it:\n" + "\n".join(log)
        )
    return str(CHROMIUM)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def crm() -> AsyncIterator[str]:
    """A seeded CRM (demo customers included) anchored on today, with some call history."""
    name = await create_database()
    url = database_url(name)
    try:
        await apply_migrations(url)
        today = datetime.now(PROFILE.time_zone).date()
        await seed(url, customers=200, seed=7, anchor_date=today, profile=PROFILE)
        _history(url)
        yield url
    finally:
        await drop_database(name)


def _history(url: str) -> None:
    """Earlier calls of the last days, so the history has more than one row."""
    now = datetime.now(UTC)
    inbound = ["booked", "info", "transferred", "callback_requested", "rescheduled", "booked"]
    outbound = ["confirmed", "voicemail", "booked", "opted_out"]
    turns = [
        {"role": "bot", "text": "Hi, this is the AI assistant from Riverside Motors service."},
        {"role": "caller", "text": "I'd like to check on my appointment."},
        {"role": "bot", "text": "Of course. Can you confirm your ZIP code?"},
    ]
    for i in range(24):
        is_outbound = i % 4 == 3
        insert_call(
            url,
            call_sid=f"CA{i:032x}",
            started_at=now - timedelta(hours=5 + i * 3, minutes=i * 7),
            direction="outbound" if is_outbound else "inbound",
            scenario=("confirmation" if i % 8 == 3 else "service_due")
            if is_outbound
            else "inbound",
            outcome=outbound[i // 4 % 4] if is_outbound else inbound[i % len(inbound)],
            customer_id=8 + i,
            transcript=turns,
        )


def _staff_bookings(url: str, day_start: datetime) -> int:
    """Appointments booked by people (no call) on the other bays of a day; returns how many."""
    added = 0
    plan = [
        ("bay-2", 8 * 60, 60, "oil_change"),
        ("bay-2", 10 * 60, 90, "brake_inspection"),
        ("bay-3", 7 * 60 + 30, 120, "brake_inspection"),
        ("bay-3", 13 * 60, 60, "oil_change"),
        ("bay-4", 9 * 60, 150, "diagnostics"),
        ("bay-4", 14 * 60, 60, "multipoint_inspection"),
        ("bay-5", 8 * 60 + 30, 60, "alignment"),
        ("bay-5", 11 * 60, 90, "tire_rotation"),
        ("bay-6", 12 * 60, 45, "tire_rotation"),
        ("bay-6", 15 * 60, 60, "oil_change"),
    ]
    with psycopg.connect(url) as conn:
        vehicles = conn.execute(
            "SELECT id, customer_id FROM vehicles WHERE customer_id > 10 ORDER BY id LIMIT 10"
        ).fetchall()
        for n, ((bay, minute, length, service), (vehicle, customer)) in enumerate(
            zip(plan, vehicles, strict=False)
        ):
            starts = day_start + timedelta(minutes=minute)
            try:
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO appointments (customer_id, vehicle_id, service_codes, "
                        "status, starts_at, ends_at, bay_id, source, confirmation_code) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            customer,
                            vehicle,
                            [service],
                            "confirmed" if n % 3 == 0 else "scheduled",
                            starts,
                            starts + timedelta(minutes=length),
                            bay,
                            "web" if n % 2 else "walk_in",
                            f"ST{n:04d}",
                        ),
                    )
                added += 1
            except psycopg.errors.IntegrityError:
                continue  # the seed already has something there
    return added


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent(crm: str, redis_server_url: str) -> AsyncIterator[Agent]:
    """The server with its fakes; the OpenAI fake plays the scripted booking call."""
    async with running_agent(
        database_url=crm, redis_url=redis_server_url, llm=FakeOpenAI(booking_script())
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    """One headless Chromium for the module."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def page(browser: Browser, agent: Agent) -> AsyncIterator[Page]:
    """The service manager's tab (a tablet-sized window)."""
    context = await browser.new_context(
        base_url=agent.base_url, viewport={"width": 1280, "height": 860}
    )
    tab = await context.new_page()
    tab.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield tab
    finally:
        await context.close()


def bounded(secs: float) -> Callable[[Callable[..., Awaitable[None]]], Any]:
    """Fail a test after ``secs`` with the traceback of the await it was stuck in."""

    def wrap(test: Callable[..., Awaitable[None]]) -> Any:
        @functools.wraps(test)
        async def run(*args: Any, **kwargs: Any) -> None:
            async with asyncio.timeout(secs):
                await test(*args, **kwargs)

        return run

    return wrap


async def shot(page: Page, name: str) -> None:
    """Save the page as docs/screenshots/<name>.png, after checking that it fits a tablet.

    On a tablet in portrait (820 px wide) nothing may stick out of the page sideways (wide
    tables and the timeline scroll inside their cards).
    """
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    await page.set_viewport_size({"width": 820, "height": 1180})
    try:
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        if overflow > 0:
            culprits = await page.evaluate(
                """() => [...document.querySelectorAll('body *')]
                    .filter(e => e.getBoundingClientRect().right
                                 > document.documentElement.clientWidth)
                    .slice(0, 8).map(e => e.tagName + '.' + e.className)"""
            )
            raise AssertionError(f"{name}: {overflow} px wider than a tablet: {culprits}")
    finally:
        await page.set_viewport_size(size)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def say_turn(client, seconds: float = 0.8) -> None:
    """The caller speaks one scripted utterance and waits for the whole reply."""
    end = await client.send_audio(speech_ulaw(seconds))
    await client.wait_for_bot_audio(min_seconds=0.2, timeout=20, since=end)
    await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)


@bounded(60)
async def test_an_unauthenticated_visit_goes_to_the_login(browser: Browser, agent: Agent) -> None:
    context = await browser.new_context(base_url=agent.base_url)
    try:
        tab = await context.new_page()
        for path in ("/ops/calls", "/ops/live", "/ops/callbacks", "/ops/health"):
            await tab.goto(path)
            assert re.search(r"/ops/login\?next=", tab.url), tab.url
            await expect(tab.get_by_role("heading", name="Sign in")).to_be_visible()
        await tab.fill("input[name=username]", "admin")
        await tab.fill("input[name=password]", "not the token")
        await tab.click("button[type=submit]")
        await expect(tab.get_by_role("alert")).to_contain_text("Wrong user name or password")
        await shot(tab, "login")
    finally:
        await context.close()


@bounded(60)
async def test_log_in(page: Page) -> None:
    await page.goto("/ops/live")
    assert "/ops/login" in page.url
    await page.fill("input[name=username]", "admin")
    await page.fill("input[name=password]", ADMIN)
    await page.click("button[type=submit]")
    await page.wait_for_url("**/ops/live")
    await expect(page.get_by_role("heading", name="Live calls")).to_be_visible()
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["ops_session"]
    assert session["httpOnly"] is True and session["sameSite"] == "Strict"
    # The session cookie is not readable from scripts.
    assert "ops_session" not in await page.evaluate("document.cookie")


@bounded(150)
async def test_a_live_call_appears_and_its_transcript_updates(page: Page, agent: Agent) -> None:
    await page.goto("/ops/live")
    await expect(page.locator("#live-status")).to_have_text("Live")
    agent.stt.script(BOOKING_UTTERANCES)
    rang = clock.monotonic()
    client = await agent.inbound_call(MARIA)
    card = page.locator(f'article[data-call-sid="{client.call_sid}"]')
    # Listed from the start of the call, before any turn (no reload: server-sent events).
    await expect(card).to_be_visible()
    await expect(card.locator(".who")).to_have_text("Unverified caller")
    await expect(card).to_contain_text("+1***…0100")
    # The greeting (counted from the start: it may have been played while we looked).
    await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=rang)
    await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)

    await say_turn(client)  # "Hi, I need an oil change for my Camry."
    await expect(card.locator(".transcript")).to_contain_text("I need an oil change")
    await expect(card.locator(".transcript")).to_contain_text("confirm your date of birth")
    await say_turn(client)  # the date of birth: verified now
    await expect(card.locator(".who")).to_have_text("Maria")
    await expect(card.locator(".transcript")).to_contain_text("[date]")
    await expect(card.locator(".latency")).to_have_text(re.compile(r"\d+ ms|\d\.\d\d s"))
    await expect(card.locator(".flow-node")).not_to_have_text("starting")
    text = await card.inner_text()
    assert "1985" not in text and "eighty-five" not in text and "5555550100" not in text
    await shot(page, "live")

    await say_turn(client)  # picks the first slot
    await expect(card.locator(".transcript")).to_contain_text("confirmation code")
    end = await client.send_audio(speech_ulaw(0.8))  # "No, that's all. Thanks!"
    assert end
    await client.wait_closed(timeout=30)
    row = await agent.wait_for_call_row(client.call_sid)
    assert row["outcome"] == "booked"
    # Gone from the live list once it ended.
    await expect(card).to_have_count(0)
    STATE["booked_call_sid"] = client.call_sid


def _booked_sid() -> str:
    sid = STATE.get("booked_call_sid")
    assert sid, "the live call test did not run"
    return sid


@bounded(90)
async def test_the_ended_call_is_in_the_history_with_transcript_chart_and_appointment(
    page: Page, agent: Agent
) -> None:
    call_sid = _booked_sid()
    await page.goto("/ops/calls")
    row = page.locator("table.history tbody tr").first
    await expect(row).to_contain_text("Maria G.")
    await expect(row).to_contain_text("booked")
    await shot(page, "history")
    # Filter by outcome and name, then open the call.
    await page.select_option("select[name=outcome]", "booked")
    await page.fill("input[name=q]", "garcia")
    await page.click("form.filters button[type=submit]")
    await page.wait_for_url(re.compile(r"outcome=booked"))
    links = page.locator("table.history tbody a")
    await expect(links).to_have_count(1)
    await links.first.click()
    await page.wait_for_url(f"**/ops/calls/{call_sid}")
    transcript = page.locator("ol.transcript")
    await expect(transcript).to_contain_text("I need an oil change for my Camry")
    await expect(transcript).to_contain_text("confirmation code")
    await expect(page.locator("#latency svg.chart rect.seg-out").first).to_be_attached()
    bars = await page.locator("#latency svg.chart g.bar").count()
    assert bars >= 3
    tools = page.locator("table.tools")
    for name in (
        "verify_customer",
        "get_vehicle_history",
        "check_availability",
        "book_appointment",
    ):
        await expect(tools).to_contain_text(name)
    appointment = agent.query(
        "SELECT id, starts_at FROM appointments WHERE call_sid = %s", (call_sid,)
    )[0]
    link = page.locator(f'#appointments a[href$="#appt-{appointment["id"]}"]')
    await expect(link).to_be_visible()
    html = await page.content()
    for secret in ("1985-04-12", "nineteen eighty-five", "5555550100", "555-0100"):
        assert secret not in html, secret
    await shot(page, "call")
    # The appointment link opens the schedule of its day with the booking marked (and the
    # bookings made by people are not).
    day = appointment["starts_at"].astimezone(PROFILE.time_zone).date()
    staff = _staff_bookings(agent.database_url, datetime.combine(day, time(0), PROFILE.time_zone))
    assert staff >= 5
    await link.click()
    await page.wait_for_url(re.compile(r"/ops/schedule\?day=\d{4}-\d\d-\d\d#appt-\d+"))
    marked = page.locator(f"#appt-{appointment['id']}")
    await expect(marked).to_have_class(re.compile("by-bot"))
    await expect(marked).to_contain_text("AI assistant")
    await expect(page.locator("svg.timeline g.by-bot")).to_have_count(1)
    assert await page.locator("svg.timeline g.appt").count() >= 1 + staff
    assert await page.locator("table.schedule-list tr.by-bot").count() == 1
    await shot(page, "schedule")


@bounded(60)
async def test_a_callback_is_marked_done(page: Page, agent: Agent, crm: str) -> None:
    done_id = insert_callback(
        crm,
        call_sid="CAcallback0001",
        customer_id=3,
        phone="+15555550102",
        reason="Wants to talk to an advisor about the recall",
        source="after_hours",
    )
    insert_callback(
        crm,
        call_sid="CAcallback0002",
        customer_id=2,
        phone="+15555550101",
        reason="transfer failed: caller asked for a person",
        source="transfer_failed",
    )
    insert_callback(
        crm,
        call_sid="CAcallback0003",
        customer_id=None,
        phone="+15555550177",
        reason="Question about a tire quote",
        source="after_hours",
    )
    await page.goto("/ops/callbacks")
    row = page.locator(f"#callback-{done_id}")
    await expect(row).to_contain_text("Priya P.")
    await expect(row).to_contain_text("***…0102")
    assert "+15555550102" not in await page.content()
    await row.locator("select[name=advisor]").select_option("adv-marcus")
    await row.get_by_role("button", name="Assign").click()
    await expect(page.get_by_role("status")).to_have_text("Assigned.")
    await page.locator(f"#callback-{done_id}").get_by_role("button", name="Done").click()
    await expect(page.get_by_role("status")).to_have_text("Marked done.")
    await expect(page.locator(f"#callback-{done_id}")).to_have_count(0)
    await expect(page.locator(f"#handled-{done_id}")).to_contain_text("admin")
    assert query(
        crm,
        "SELECT status, handled_by, assigned_to FROM callback_requests WHERE id = %s",
        (done_id,),
    ) == [("done", "admin", "adv-marcus")]
    assert query(
        crm,
        "SELECT actor, action, target_id FROM ops_audit_log "
        "WHERE action LIKE 'callback%%' ORDER BY id",
    ) == [
        ("admin", "callback_assigned", str(done_id)),
        ("admin", "callback_done", str(done_id)),
    ]
    await expect(page.locator("table.audit")).to_contain_text("callback done")
    await shot(page, "callbacks")


@bounded(60)
async def test_an_action_without_the_csrf_token_is_refused(page: Page, crm: str) -> None:
    target = insert_callback(
        crm, call_sid="CAcallback0009", customer_id=4, phone=None, reason="csrf check"
    )
    await page.goto("/ops/callbacks")
    status = await page.evaluate(
        """async (id) => {
            const response = await fetch(`/ops/callbacks/${id}/done`, {
                method: "POST", body: new URLSearchParams({advisor: "adv-ana"}),
            });
            return response.status;
        }""",
        target,
    )
    assert status == 403
    assert query(crm, "SELECT status FROM callback_requests WHERE id = %s", (target,)) == [
        ("open",)
    ]


@bounded(90)
async def test_a_campaign_run_appears_with_its_counts(page: Page, agent: Agent) -> None:
    resources = agent.app.state.resources
    tz = PROFILE.time_zone
    now = datetime.combine(datetime.now(tz).date(), time(12, 0), tz)
    sids = (f"CA{0xCA0000 + i:032x}" for i in count(1))  # well-formed CallSids
    dialed: list[str] = []

    async def dial(_settings, *, to, scenario, customer_id, campaign_attempt_id=None) -> str:
        sid = next(sids)
        dialed.append(sid)
        return sid

    dialer = Dialer(
        resources.db,
        profile=resources.profile,
        settings=agent.settings,
        dial=dial,
        hold_calls=False,
        calls_per_second=50,
        now=now,
    )
    result = await run_campaign(
        resources.db,
        profile=resources.profile,
        settings=agent.settings,
        campaign="service_due",
        now=now,
        limit=4,
        dialer=dialer,
    )
    assert result.stats.dialed == len(dialed) >= 3, result.summary()
    # Twilio reports back: a voicemail, no answer, and a person who booked.
    await agent.post_signed(
        "/twilio/status",
        {
            "CallSid": dialed[0],
            "CallStatus": "completed",
            "AnsweredBy": "machine_end_beep",
            "SequenceNumber": "3",
        },
    )
    await agent.post_signed(
        "/twilio/status", {"CallSid": dialed[1], "CallStatus": "no-answer", "SequenceNumber": "3"}
    )
    insert_call(
        agent.database_url,
        call_sid=dialed[2],
        direction="outbound",
        scenario="service_due",
        outcome="booked",
    )
    await agent.post_signed(
        "/twilio/status",
        {
            "CallSid": dialed[2],
            "CallStatus": "completed",
            "AnsweredBy": "human",
            "SequenceNumber": "3",
        },
    )
    await page.goto("/ops/campaigns")
    row = page.locator(f'tr[data-campaign="service_due"][data-day="{now.date()}"]')
    await expect(row).to_be_visible()
    cells = {
        name: (await row.locator(f"td.{name}").inner_text()).strip()
        for name in ("planned", "dialed", "answered", "booked", "voicemail", "no-answer")
    }
    assert cells == {
        "planned": str(len(dialed)),
        "dialed": str(len(dialed)),
        "answered": "1",
        "booked": "1",
        "voicemail": "1",
        "no-answer": "1",
    }
    await row.get_by_role("link").click()
    attempts = page.locator("table.attempts tbody tr")
    await expect(attempts).to_have_count(len(dialed))
    assert "+1555" not in await page.locator("table.attempts").inner_text()
    await shot(page, "campaigns")


@bounded(60)
async def test_the_health_page_shows_the_last_hour(page: Page) -> None:
    await page.goto("/ops/health")
    # Postgres, Redis and phone calls (all call settings are set); no Google Calendar.
    await expect(page.locator(".component.state-ok")).to_have_count(3)
    await expect(page.locator("#active-calls")).to_have_text("0")
    await expect(page.locator("#v2v-p50")).to_have_text(re.compile(r"\d+ ms|\d\.\d\d s"))
    await expect(page.locator("#v2v-p95")).to_have_text(re.compile(r"\d+ ms|\d\.\d\d s"))
    await expect(page.locator("svg.chart circle.line-p50").first).to_be_attached()
    await expect(page.locator("table.tool-stats")).to_contain_text("book_appointment")
    await shot(page, "health")


# --- the browser test page (/client) ------------------------------------------------

DEV_ENV = {"WEBRTC_DEV": "true", "WEBRTC_DEV_FORCE": "true"}  # the harness sets PUBLIC_BASE_URL
#: What the fake microphone says (looped by Chromium): the greeting plays over the first
#: seconds of silence, then one utterance, then a long pause.
MIC_PLAN = ((3.5, False), (1.2, True), (9.0, False))
JAMES_SAYS = "Hi, this is James. My truck needs a tire rotation."
BOT_REPLY = "Happy to help with the tire rotation. What is your date of birth?"


def _fake_microphone_wav(path: Path) -> Path:
    """A 16 kHz mono WAV of silence and speech-like sound (Silero hears it as speech)."""
    import wave

    pcm = b"".join(
        speech_pcm16(secs, sample_rate=16000) if voiced else b"\0\0" * int(secs * 16000)
        for secs, voiced in MIC_PLAN
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm)
    return path


@contextlib.asynccontextmanager
async def _served(app: Any, settings: Settings) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on ``settings``' port; yields its base URL."""
    import uvicorn

    from runner import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, settings))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@bounded(90)
async def test_the_dev_page_says_it_is_disabled(browser: Browser, agent: Agent) -> None:
    context = await browser.new_context(base_url=agent.base_url)
    try:
        tab = await context.new_page()
        response = await tab.goto("/client")
        assert response is not None and response.status == 404
        await expect(tab.get_by_role("heading", level=1)).to_have_text(
            "The browser test page is disabled"
        )
        await expect(tab.locator(".dev-message")).to_contain_text("WEBRTC_DEV=true")
        await expect(tab.locator(".brand")).to_contain_text(PROFILE.name)
    finally:
        await context.close()


@bounded(120)
async def test_the_dev_page_names_the_missing_keys_and_disables_the_call_button(
    browser: Browser, crm: str, redis_server_url: str
) -> None:
    from tests.conftest_db import delete_keys, new_name
    from tests.harness import free_port

    prefix = new_name()
    settings = Settings(
        _env_file=None,
        DATABASE_URL=crm,
        REDIS_URL=redis_server_url,
        REDIS_KEY_PREFIX=prefix,
        WEBRTC_DEV=True,
        ADMIN_TOKEN=ADMIN,
        HOST="127.0.0.1",
        PORT=free_port(),
        LOG_LEVEL="WARNING",
    )
    from runner import create_app

    try:
        async with _served(create_app(settings), settings) as base_url:
            context = await browser.new_context(
                base_url=base_url, viewport={"width": 1280, "height": 860}
            )
            try:
                tab = await context.new_page()
                await tab.goto("/client")
                # Not logged in: the page asks for the admin token.
                await expect(tab.locator("input[name=token]")).to_be_visible()
                await tab.fill("input[name=token]", ADMIN)
                await tab.click("button[type=submit]")
                await tab.wait_for_url("**/client/")
                alert = tab.locator("#missing-keys")
                await expect(alert).to_contain_text(
                    "Calls are disabled: this server is missing OPENAI_API_KEY and DEEPGRAM_API_KEY"
                )
                await expect(tab.locator("#call-button")).to_be_disabled()
                await expect(tab.locator("#call-state")).to_have_text("Calls disabled")
                # The demo customers are listed all the same (first name, masked number).
                maria = tab.locator("label.caller", has_text="Maria")
                await expect(maria).to_contain_text("+1***…0100")
                await expect(tab.locator("label.caller")).to_have_count(8)
                assert "5555550100" not in await tab.content()
            finally:
                await context.close()
    finally:
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_server_url)
        try:
            await delete_keys(client, prefix)
        finally:
            await client.aclose()


@bounded(180)
async def test_a_browser_call_from_the_dev_page_shows_the_transcript(
    chromium: str, crm: str, redis_server_url: str, tmp_path: Path
) -> None:
    """Chromium's fake microphone (a WAV file) calls the bot as James; the page shows the
    greeting, what he said and the reply as the call goes on."""
    wav = _fake_microphone_wav(tmp_path / "mic.wav")
    llm = FakeOpenAI([say(BOT_REPLY)])
    async with (
        running_agent(database_url=crm, redis_url=redis_server_url, llm=llm, env=DEV_ENV) as dev,
        async_playwright() as playwright,
    ):
        dev.stt.script([JAMES_SAYS, "Nineteen seventy-nine.", "Thanks."])
        media = await playwright.chromium.launch(
            executable_path=chromium,
            args=[
                *CHROMIUM_ARGS,
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            context = await media.new_context(
                base_url=dev.base_url, viewport={"width": 1280, "height": 860}
            )
            await context.grant_permissions(["microphone"], origin=dev.base_url)
            tab = await context.new_page()
            tab.set_default_timeout(UI_TIMEOUT_MS)
            await tab.goto(f"/client?token={ADMIN}")
            await tab.wait_for_url("**/client/")
            await expect(tab.locator("#call-state")).to_have_text("Ready")
            await expect(tab.locator("#missing-keys")).to_have_count(0)
            call_button = tab.locator("#call-button")
            await expect(call_button).to_be_enabled()
            await tab.locator("label.caller", has_text="James").click()
            await call_button.click()
            await expect(tab.locator("#call-state")).to_have_text("In call", timeout=30_000)
            await expect(tab.locator("#hangup-button")).to_be_enabled()
            transcript = tab.locator("#transcript")
            await expect(transcript.locator(".turn.bot").first).to_contain_text(
                "Thanks for calling", timeout=30_000
            )
            await expect(transcript.locator(".turn.caller").first).to_contain_text(
                JAMES_SAYS, timeout=40_000
            )
            await expect(transcript).to_contain_text(BOT_REPLY, timeout=30_000)
            # A browser call is never credited caller ID: no name in the greeting.
            assert "James" not in await transcript.locator(".turn.bot").first.inner_text()
            await shot(tab, "dev-page")
            await tab.locator("#hangup-button").click()
            await expect(tab.locator("#call-state")).to_have_text("Call ended")
            await expect(call_button).to_be_enabled()
            rows = await _wait_for_rows(dev, "SELECT * FROM calls WHERE call_sid LIKE 'webrtc-%%'")
            assert rows[0]["direction"] == "inbound" and rows[0]["verified"] is not True
            await context.close()
        finally:
            await media.close()


async def _wait_for_rows(agent: Agent, sql: str, timeout: float = 30.0) -> list[dict]:  # noqa: ASYNC109
    deadline = clock.monotonic() + timeout
    while True:
        rows = agent.query(sql)
        if rows and rows[0].get("ended_at") is not None:
            return rows
        assert clock.monotonic() < deadline, f"no finished row for {sql!r}"
        await asyncio.sleep(0.25)

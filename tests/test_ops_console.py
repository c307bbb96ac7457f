"""The ops console over HTTP: access control, CSRF, actions, history paging, PII, fuzzing.

The browser tests (``tests/test_ops_browser.py``) drive the same pages in Chromium; these
tests check the rules at the HTTP level, where every header and row can be asserted.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from ops.auth import hash_password
from runner import create_app
from seeding import seed
from tests.ops_support import (
    ADMIN_TOKEN,
    PII_TRANSCRIPT,
    TOOL_CALLS,
    TURN_METRICS,
    csrf_of,
    insert_call,
    insert_callback,
    log_in,
    query,
)

PROFILE = load_profile(DEFAULT_PROFILE)
REPO = Path(__file__).resolve().parents[1]
PAGES = [
    "/ops",
    "/ops/live",
    "/ops/calls",
    "/ops/calls?outcome=booked",
    "/ops/calls/CA0123456789abcdef0123456789abcdef",
    "/ops/callbacks",
    "/ops/campaigns",
    "/ops/schedule",
    "/ops/health",
    "/ops/no-such-page",
]


@dataclass
class Console:
    """The app in-process, an HTTP client on it and its database."""

    app: FastAPI
    client: httpx.AsyncClient
    database_url: str
    redis_url: str
    key_prefix: str

    def new_client(self, ip: str = "10.0.0.2") -> httpx.AsyncClient:
        """Another browser (own cookies), from another address."""
        transport = httpx.ASGITransport(app=self.app, client=(ip, 4321))
        return httpx.AsyncClient(transport=transport, base_url="http://console.test")


@pytest.fixture
async def console(
    migrated_db: str, redis_server_url: str, redis_key_prefix: str
) -> AsyncIterator[Console]:
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    settings_ = Settings(
        _env_file=None,
        DATABASE_URL=migrated_db,
        REDIS_URL=redis_server_url,
        ADMIN_TOKEN=ADMIN_TOKEN,
        LOG_LEVEL="WARNING",
        OPS_LOGIN_MAX_FAILURES="3",
        REDIS_KEY_PREFIX=redis_key_prefix,
    )
    app = create_app(settings_)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
            yield Console(app, client, migrated_db, redis_server_url, redis_key_prefix)


async def test_every_page_sends_a_visitor_without_a_session_to_the_login(
    console: Console,
) -> None:
    for path in PAGES:
        response = await console.client.get(path)
        assert response.status_code == 303, path
        location = response.headers["location"]
        assert location.startswith("/ops/login?next="), (path, location)
        assert "ops_session" not in response.headers.get("set-cookie", "")
    stream = await console.client.get("/ops/live/stream")
    assert stream.status_code == 401
    # Actions too: no session, no action (and nothing is written).
    callback = insert_callback(
        console.database_url, call_sid="CA-nosession", customer_id=1, phone=None, reason="x"
    )
    refused = await console.client.post(f"/ops/callbacks/{callback}/done", data={"csrf_token": "x"})
    assert refused.status_code == 303 and refused.headers["location"] == "/ops/login"
    assert query(
        console.database_url, "SELECT status FROM callback_requests WHERE id = %s", (callback,)
    ) == [("open",)]
    # The login page itself is reachable, with strict security headers.
    login = await console.client.get("/ops/login")
    assert login.status_code == 200
    assert "script-src 'self'" in login.headers["content-security-policy"]
    assert login.headers["x-frame-options"] == "DENY"
    assert login.headers["cache-control"] == "no-store"


async def test_login_sets_an_httponly_samesite_session_kept_in_redis(console: Console) -> None:
    response = await log_in(console.client)
    assert response.status_code == 303 and response.headers["location"] == "/ops/live"
    cookie = next(
        c for c in response.headers.get_list("set-cookie") if c.startswith("ops_session=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "max-age", "path"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/ops" in cookie.lower()
    token = cookie.split(";")[0].split("=", 1)[1]
    assert len(token) >= 40
    redis = aioredis.Redis.from_url(console.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(f"{console.key_prefix}:ops:session:*")]
        assert len(keys) == 1 and token.encode() not in keys[0]  # stored hashed
        assert 0 < await redis.ttl(keys[0]) <= 8 * 3600
    finally:
        await redis.aclose()
    page = await console.client.get("/ops/live")
    assert page.status_code == 200 and "Live calls" in page.text
    assert query(console.database_url, "SELECT actor, action FROM ops_audit_log") == [
        ("admin", "login")
    ]
    # Logging out (a CSRF-checked POST) ends the session in Redis.
    out = await console.client.post("/ops/logout", data={"csrf_token": csrf_of(page.text)})
    assert out.status_code == 303
    assert (await console.client.get("/ops/live")).status_code == 303
    # A database user logs in with their own password.
    with_user = console.new_client("10.0.0.9")
    async with with_user:
        with __import__("psycopg").connect(console.database_url) as conn:
            conn.execute(
                "INSERT INTO ops_users (username, password_hash) VALUES ('ana', %s)",
                (hash_password("correct horse battery"),),
            )
        ok = await log_in(with_user, username="ana", password="correct horse battery")
        assert ok.status_code == 303
        assert "ana" in (await with_user.get("/ops/callbacks")).text


async def test_failed_logins_are_rate_limited_per_address(console: Console) -> None:
    for _ in range(3):
        wrong = await log_in(console.client, password="guess")
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    # Locked out now, even with the right password.
    locked = await log_in(console.client)
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert "ops_session" not in locked.headers.get("set-cookie", "")
    # Another address is not affected.
    other = console.new_client("10.0.0.3")
    async with other:
        assert (await log_in(other)).status_code == 303
    # Unknown users and an unset password count as failures too, without a 500.
    third = console.new_client("10.0.0.4")
    async with third:
        for user in ("nobody", "ADMIN ", "x" * 500, "admin\x00"):
            response = await log_in(third, username=user, password="p")
            assert response.status_code in (401, 429)


async def test_login_without_the_form_token_is_refused(console: Console) -> None:
    response = await console.client.post(
        "/ops/login", data={"username": "admin", "password": ADMIN_TOKEN}
    )
    assert response.status_code == 403
    assert "ops_session" not in response.headers.get("set-cookie", "")


async def test_an_action_without_its_csrf_token_is_refused(console: Console) -> None:
    await log_in(console.client)
    callback = insert_callback(
        console.database_url, call_sid="CA-csrf", customer_id=1, phone=None, reason="call me"
    )
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "forged"}):
        response = await console.client.post(f"/ops/callbacks/{callback}/done", data=data)
        assert response.status_code == 403, data
        assert "security token" in response.text
    # Another user's token does not work either.
    other = console.new_client("10.0.0.5")
    async with other:
        await log_in(other)
        their_token = csrf_of((await other.get("/ops/callbacks")).text)
    stolen = await console.client.post(
        f"/ops/callbacks/{callback}/done", data={"csrf_token": their_token}
    )
    assert stolen.status_code == 403
    # A foreign origin is refused even with the right token.
    mine = csrf_of((await console.client.get("/ops/callbacks")).text)
    foreign = await console.client.post(
        f"/ops/callbacks/{callback}/done",
        data={"csrf_token": mine},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    assert query(
        console.database_url,
        "SELECT status, handled_by FROM callback_requests WHERE id = %s",
        (callback,),
    ) == [("open", None)]
    assert query(
        console.database_url, "SELECT count(*) FROM ops_audit_log WHERE action LIKE 'callback%%'"
    ) == [(0,)]


async def test_callback_actions_write_the_row_and_the_audit_log(console: Console) -> None:
    await log_in(console.client)
    callback = insert_callback(
        console.database_url,
        call_sid="CA-cb1",
        customer_id=1,
        phone="+15555550100",
        reason="wants to talk about the recall",
        source="after_hours",
    )
    page = await console.client.get("/ops/callbacks")
    assert "Maria G." in page.text and "wants to talk about the recall" in page.text
    assert "+15555550100" not in page.text and "***…0100" in page.text
    token = csrf_of(page.text)
    assigned = await console.client.post(
        f"/ops/callbacks/{callback}/assign", data={"csrf_token": token, "advisor": "adv-ana"}
    )
    assert assigned.status_code == 303
    bad = await console.client.post(
        f"/ops/callbacks/{callback}/assign", data={"csrf_token": token, "advisor": "adv-mallory"}
    )
    assert bad.status_code == 400
    done = await console.client.post(f"/ops/callbacks/{callback}/done", data={"csrf_token": token})
    assert done.status_code == 303 and done.headers["location"] == "/ops/callbacks?notice=done"
    again = await console.client.post(f"/ops/callbacks/{callback}/done", data={"csrf_token": token})
    assert again.headers["location"] == "/ops/callbacks?notice=gone"
    rows = query(
        console.database_url,
        "SELECT status, handled_by, handled_at IS NOT NULL, assigned_to FROM callback_requests "
        "WHERE id = %s",
        (callback,),
    )
    assert rows == [("done", "admin", True, "adv-ana")]
    audit = query(
        console.database_url,
        "SELECT actor, action, target_kind, target_id, details ->> 'advisor', client_ip "
        "FROM ops_audit_log WHERE action LIKE 'callback%%' ORDER BY id",
    )
    assert audit == [
        ("admin", "callback_assigned", "callback_request", str(callback), "adv-ana", "10.0.0.1"),
        ("admin", "callback_done", "callback_request", str(callback), None, "10.0.0.1"),
    ]
    after = await console.client.get("/ops/callbacks?notice=done")
    assert "Marked done." in after.text and f'id="handled-{callback}"' in after.text


def _pager_link(html: str, rel: str) -> str | None:
    found = re.search(rf'href="([^"]+)" rel="{rel}"', html)
    return found.group(1).replace("&amp;", "&") if found else None


async def test_history_pages_through_every_call_once_newest_first(console: Console) -> None:
    await log_in(console.client)
    base = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
    outcomes = ["booked", "info", "voicemail", "transferred"]
    for i in range(130):
        insert_call(
            console.database_url,
            call_sid=f"CAhist{i:04d}",
            # Pairs of calls share a start time: the id breaks the tie.
            started_at=base - timedelta(minutes=i // 2),
            outcome=outcomes[i % 4],
            direction="outbound" if i % 5 == 0 else "inbound",
            customer_id=1 if i % 10 == 0 else 2,
        )
    seen: list[str] = []
    link: str | None = "/ops/calls"
    pages = 0
    while link:
        page = await console.client.get(link)
        assert page.status_code == 200
        seen += re.findall(r'href="/ops/calls/(CAhist\d{4})"', page.text)
        link = _pager_link(page.text, "next")
        pages += 1
    assert pages == 3 and len(seen) == 130 and len(set(seen)) == 130
    rows = query(
        console.database_url,
        "SELECT call_sid FROM calls WHERE call_sid LIKE 'CAhist%%' "
        "ORDER BY started_at DESC, id DESC",
    )
    assert seen == [r[0] for r in rows]
    # "Newer" from the last page goes back to the middle page.
    first = await console.client.get("/ops/calls")
    second = await console.client.get(_pager_link(first.text, "next"))
    third = await console.client.get(_pager_link(second.text, "next"))
    back = await console.client.get(_pager_link(third.text, "prev"))
    assert re.findall(r"CAhist\d{4}", back.text) == re.findall(r"CAhist\d{4}", second.text)
    # Filters: outcome and direction, customer by name and by phone digits, one customer.
    booked = await console.client.get("/ops/calls?outcome=booked&direction=outbound")
    found = set(re.findall(r'href="/ops/calls/(CAhist\d{4})"', booked.text))
    assert found == {f"CAhist{i:04d}" for i in range(130) if i % 4 == 0 and i % 5 == 0}
    maria = set(re.findall(r"CAhist\d{4}", (await console.client.get("/ops/calls?q=garc")).text))
    assert maria == {f"CAhist{i:04d}" for i in range(0, 130, 10)}
    by_phone = await console.client.get("/ops/calls?q=555-0100")
    assert set(re.findall(r"CAhist\d{4}", by_phone.text)) == maria
    by_name = await console.client.get("/ops/calls?q=Maria+Garcia")
    assert set(re.findall(r"CAhist\d{4}", by_name.text)) == maria
    by_id = await console.client.get("/ops/calls?customer=1")
    assert set(re.findall(r"CAhist\d{4}", by_id.text)) == maria
    day = (base - timedelta(hours=6)).date().isoformat()  # dealership day (America/Chicago)
    dated = await console.client.get(f"/ops/calls?from={day}&to={day}&q=CAhist0007")
    assert re.findall(r'href="/ops/calls/(CAhist\d{4})"', dated.text) == ["CAhist0007"]
    empty = await console.client.get("/ops/calls?from=2020-01-01&to=2020-01-02")
    assert "No calls match these filters." in empty.text


async def test_a_call_page_shows_transcript_tools_latency_and_no_pii(console: Console) -> None:
    await log_in(console.client)
    with __import__("psycopg").connect(console.database_url) as conn:
        appt = conn.execute("SELECT id FROM appointments WHERE customer_id = 2 LIMIT 1").fetchone()
    insert_call(
        console.database_url,
        call_sid="CApii0000000000000000000000000001",
        customer_id=1,
        outcome="booked",
        transcript=PII_TRANSCRIPT,
        turn_metrics=TURN_METRICS,
        tool_calls=[
            *TOOL_CALLS,
            {
                "name": "lookup_customer",
                "arguments": {"phone": "+15555550100"},
                "result": {"vin": "1HGCM82633A004352"},
                "secs": 0.02,
                "status": "error",
                "at_secs": 3.0,
            },
        ],
        appointment_ids=[appt[0]],
    )
    with __import__("psycopg").connect(console.database_url) as conn:
        conn.execute(
            "INSERT INTO call_status_events (call_sid, call_status, sequence_number, payload) "
            "VALUES ('CApii0000000000000000000000000001', 'completed', 3, %s)",
            (
                __import__("psycopg").types.json.Jsonb(
                    {"RecordingUrl": "https://api.twilio.com/2010-04-01/Recordings/RE1"}
                ),
            ),
        )
    page = await console.client.get("/ops/calls/CApii0000000000000000000000000001")
    assert page.status_code == 200
    html = page.text
    for secret in (
        "1985",
        "nineteen eighty-five",
        "April twelfth",
        "555-0100",
        "5555550100",
        "1HGCM82633A004352",
        "312-555-0199",
    ):
        assert secret not in html, secret
    assert "[date]" in html and "…4352" in html and "***…0100" in html
    assert html.count('class="interrupted"') == 1
    # What callers say is text, never markup.
    assert "<img src=x" not in html and "<script>alert" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "verify_customer" in html and "lookup_customer" in html and "tool-error" in html
    assert '<svg class="chart"' in html and "Turn 2: 1.31 s" in html
    assert f"#appt-{appt[0]}" in html
    assert "https://api.twilio.com/2010-04-01/Recordings/RE1" in html
    assert (await console.client.get("/ops/calls/CAnope0000")).status_code == 404
    assert (await console.client.get("/ops/calls/..%2F..%2Fetc")).status_code == 404


async def test_live_calls_come_from_the_snapshots_in_redis(console: Console) -> None:
    from processors.session_snapshot import SnapshotStore, session_snapshot
    from tools.context import CallSession

    await log_in(console.client)
    session = CallSession(call_sid="CAlive0001", caller_phone="+15555550100")
    session.match_customer(customer_id=1, first_name="Maria", caller_id=True)
    session.transcript = [{"role": "caller", "text": "Born April 12, 1985, oil change please"}]
    session.flow_node = "identify"
    redis = aioredis.Redis.from_url(console.redis_url)
    try:
        store = SnapshotStore(redis, prefix=console.key_prefix)
        snap = session_snapshot(session)
        assert snap["caller"] == "+1***…0100" and snap["customer_first_name"] is None
        await store.write("CAlive0001", 1, snap | {"call_sid": "CAlive0001"})
        page = (await console.client.get("/ops/live")).text
        assert "CAlive0001" in page and "Unverified caller" in page and "Maria" not in page
        assert "+1***…0100" in page and "[date]" in page and "1985" not in page
        session.verified = True
        await store.write("CAlive0001", 2, session_snapshot(session) | {"call_sid": "CAlive0001"})
        assert "Maria" in (await console.client.get("/ops/live")).text
        await store.finish("CAlive0001")
        assert "CAlive0001" not in (await console.client.get("/ops/live")).text
    finally:
        await redis.aclose()


async def test_campaign_schedule_and_health_pages(console: Console) -> None:
    await log_in(console.client)
    today = datetime.now(PROFILE.time_zone).date()
    with __import__("psycopg").connect(console.database_url) as conn:
        for cid, status, outcome, attempts in (
            (1, "completed", "booked", 1),
            (2, "completed", "voicemail", 1),
            (3, "failed", "no_answer", 3),
            (4, "completed", "opted_out", 1),
            (5, "planned", None, 0),
        ):
            conn.execute(
                "INSERT INTO campaign_attempts (campaign, customer_id, local_date, reason, "
                "status, outcome, attempt_count, dialed_at) VALUES ('service_due', %s, %s, "
                "'oil change due', %s, %s, %s, CASE WHEN %s > 0 THEN now() END)",
                (cid, today, status, outcome, attempts, attempts),
            )
    page = await console.client.get("/ops/campaigns")
    row = re.search(
        rf'<tr data-campaign="service_due" data-day="{today}".*?</tr>', page.text, re.S
    ).group(0)
    counts = dict(re.findall(r'class="num ([a-z-]+)">(\d+)<', row))
    assert counts == {
        "planned": "5",
        "dialed": "4",
        "answered": "2",
        "booked": "1",
        "confirmed": "0",
        "voicemail": "1",
        "no-answer": "1",
        "failed": "0",
        "opted-out": "1",
    }
    detail = await console.client.get(f"/ops/campaigns?campaign=service_due&day={today}")
    assert detail.text.count("oil change due") == 5 and "+1555" not in detail.text
    schedule = await console.client.get("/ops/schedule")
    assert schedule.status_code == 200 and "bay-1" in schedule.text
    health = await console.client.get("/ops/health")
    assert health.status_code == 200 and "Database (Postgres)" in health.text
    assert 'id="active-calls">0<' in health.text


@pytest.mark.parametrize(
    "path",
    [
        "/ops/calls?from=2026-02-30",
        "/ops/calls?from=2026-12-01&to=2026-11-01",
        "/ops/calls?outcome=everything",
        "/ops/calls?after=bm9wZQ",
        "/ops/calls?q=%00",
        "/ops/calls?q=" + "a" * 200,
        "/ops/calls?q=12",
        "/ops/calls?customer=-1",
        "/ops/schedule?day=yesterday",
        "/ops/campaigns?days=0",
        "/ops/callbacks?notice=%3Cscript%3E",
    ],
)
async def test_bad_parameters_are_a_400_page_naming_the_field(console: Console, path: str) -> None:
    await log_in(console.client)
    response = await console.client.get(path)
    assert response.status_code == 400, response.text
    assert "<script>" not in response.text


# --- hostile input: hypothesis -----------------------------------------------------------

_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789-/:+TZ", max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "%",
            "_",
            "\\",
            "'",
            '"',
            "<script>",
            "\x00",
            "9" * 30,
            "2026-11-30",
            "9999-12-31",
            "0000-01-01",
            "CA" + "f" * 32,
            "-1",
            "1e9",
        ]
    ),
)
_history_params = st.fixed_dictionaries(
    {},
    optional={
        name: _text
        for name in (
            "from",
            "to",
            "outcome",
            "direction",
            "scenario",
            "customer",
            "q",
            "after",
            "before",
        )
    },
)


def _run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)


async def test_fuzzed_query_parameters_never_give_a_server_error(console: Console) -> None:
    await log_in(console.client)
    loop = asyncio.get_running_loop()
    client = console.client
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        page=st.sampled_from(["/ops/calls", "/ops/schedule", "/ops/campaigns", "/ops/callbacks"]),
        params=_history_params,
        extra=st.dictionaries(
            st.sampled_from(["day", "days", "campaign", "notice"]), _text, max_size=3
        ),
    )
    def check(page: str, params: dict[str, str], extra: dict[str, str]) -> None:
        response = _run(loop, client.get(page, params={**params, **extra}))
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (page, params, extra, response.text[:300])

    await asyncio.to_thread(check)
    assert seen.get(200) and seen.get(400), seen


async def test_fuzzed_paths_and_form_posts_never_give_a_server_error(console: Console) -> None:
    await log_in(console.client)
    page = await console.client.get("/ops/callbacks")
    token = csrf_of(page.text)
    loop = asyncio.get_running_loop()
    client = console.client

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        target=st.one_of(st.text(max_size=30), st.integers(-5, 2**70).map(str)),
        action=st.sampled_from(["done", "assign"]),
        form=st.dictionaries(
            st.sampled_from(["csrf_token", "advisor", "next", "x"]),
            st.one_of(_text, st.just(token), st.sampled_from(["adv-ana", "adv-marcus"])),
            max_size=3,
        ),
        call=st.text(max_size=80),
        login=st.dictionaries(
            st.sampled_from(["username", "password", "csrf_token", "next"]), _text, max_size=4
        ),
    )
    def check(
        target: str, action: str, form: dict[str, str], call: str, login: dict[str, str]
    ) -> None:
        post = _run(
            loop, client.post(f"/ops/callbacks/{quote(target, safe='')}/{action}", data=form)
        )
        assert post.status_code < 500, (target, action, form, post.text[:300])
        got = _run(loop, client.get(f"/ops/calls/{quote(call, safe='')}"))
        assert got.status_code < 500, (call, got.text[:300])
        tried = _run(loop, client.post("/ops/login", data=login))
        assert tried.status_code < 500, (login, tried.text[:300])

    await asyncio.to_thread(check)
    # Garbage bodies: not a form, too big, a wrong content type.
    for body, ctype in (
        (b"\xff\xfe\x00", "application/x-www-form-urlencoded"),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x"),
        (b"a=" + b"b" * 70_000, "application/x-www-form-urlencoded"),
        (b"{}", "application/json"),
    ):
        response = await client.post(
            "/ops/callbacks/1/done", content=body, headers={"content-type": ctype}
        )
        assert 400 <= response.status_code < 500, (body[:20], response.status_code)
    assert (
        await client.post(
            "/ops/login",
            content=b"\xff",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    ).status_code < 500


async def test_users_command_adds_a_user_who_can_log_in(console: Console) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": console.database_url,
        "REDIS_URL": console.redis_url,
        "LOG_LEVEL": "WARNING",
    }

    async def users(*args: str, stdin: str = "") -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ops.users",
            *args,
            env=env,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
        return proc.returncode or 0, out.decode() + err.decode()

    assert (await users("add", "admin", stdin="long enough password\n"))[0] == 2
    assert (await users("add", "marcus", stdin="short\n"))[0] == 2
    code, out = await users("add", "Marcus", stdin="a long enough password\n")
    assert code == 0, out
    stored = query(
        console.database_url, "SELECT password_hash FROM ops_users WHERE username = 'marcus'"
    )
    assert stored and stored[0][0].startswith("scrypt$") and "long enough" not in stored[0][0]
    other = console.new_client("10.0.0.7")
    async with other:
        assert (
            await log_in(other, username="marcus", password="wrong password!")
        ).status_code == 401
        assert (
            await log_in(other, username="marcus", password="a long enough password")
        ).status_code == 303
    code, out = await users("disable", "marcus")
    assert code == 0, out
    third = console.new_client("10.0.0.8")
    async with third:
        assert (
            await log_in(third, username="marcus", password="a long enough password")
        ).status_code == 401


def test_cookie_secure_flag_follows_the_public_url() -> None:
    assert Settings(_env_file=None).ops_cookie_is_secure is False
    https = Settings(_env_file=None, PUBLIC_BASE_URL="https://agent.example.com")
    assert https.ops_cookie_is_secure is True
    forced = Settings(
        _env_file=None, PUBLIC_BASE_URL="https://agent.example.com", OPS_COOKIE_SECURE="false"
    )
    assert forced.ops_cookie_is_secure is False
    assert Settings(_env_file=None, OPS_COOKIE_SECURE="true").ops_cookie_is_secure is True

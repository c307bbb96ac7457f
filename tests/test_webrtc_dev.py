"""The browser test page (``WEBRTC_DEV``): off by default, refused on an exposed server,
behind the admin token, bounded, never crediting caller ID, never a 5xx on odd input."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.prompts import greeting
from core.profile import load_profile
from core.resources import StartupError, open_resources
from core.settings import DEFAULT_PROFILE, Settings
from crm.migrate import apply_migrations
from processors.session_snapshot import SnapshotStore
from runner import create_app
from seeding import DEMO_CUSTOMERS, seed
from tests.fakes.audio import speech_pcm16
from tests.fakes.browser_webrtc import MIC_RATE, FakeBrowser
from tests.fakes.openai_chat import FakeOpenAI, call_tool, say
from tests.harness import free_port, last_tool_result, running_agent

REPO = Path(__file__).resolve().parents[1]
PROFILE = load_profile(DEFAULT_PROFILE)
TOKEN = "dev-admin-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
JAMES = "+15555550101"  # James Carter, DOB 1979-09-30, ZIP 60201
BASE = "http://127.0.0.1:8000"
DEV_ENV = {"WEBRTC_DEV": "true", "WEBRTC_DEV_FORCE": "true"}  # the harness sets PUBLIC_BASE_URL


def dev_settings(**overrides: Any) -> Settings:
    """Settings of a developer's server with the browser page on."""
    values: dict[str, Any] = {
        "WEBRTC_DEV": True,
        "ADMIN_TOKEN": TOKEN,
        "OPENAI_API_KEY": "sk-test",
        "DEEPGRAM_API_KEY": "dg-test",
        "HOST": "127.0.0.1",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def asgi_client(app: FastAPI, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE, **kwargs)


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=5, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


# --- Off by default, refused on an exposed server -----------------------------------

ROUTES = [
    ("GET", "/client"),
    ("GET", "/client/"),
    ("GET", "/client/index.html"),
    ("POST", "/start"),
    ("POST", "/api/offer"),
    ("PATCH", "/api/offer"),
    ("POST", "/sessions/abc/api/offer"),
]


async def test_dev_page_is_off_by_default() -> None:
    app = create_app(Settings(_env_file=None, HOST="127.0.0.1", ADMIN_TOKEN=TOKEN))
    async with asgi_client(app, headers=BEARER) as client:
        for method, path in [*ROUTES, ("GET", "/client/calls/webrtc-0123456789abcdef/transcript")]:
            response = await client.request(method, path, json={"sdp": "x", "type": "offer"})
            assert response.status_code == 404, (method, path, response.text)
        assert (await client.get("/client/?token=" + TOKEN)).status_code == 404
        assert (await client.get("/client/static/dev_page.js")).status_code == 404
        # The page says it is off, and how to turn it on; in the dealership's colours.
        page = await client.get("/client")
        assert page.headers["content-type"].startswith("text/html")
        assert "The browser test page is disabled" in page.text
        for how in ("WEBRTC_DEV=true", "ADMIN_TOKEN", "/client?token=", "WEBRTC_DEV_FORCE"):
            assert how in page.text, how
        assert PROFILE.name in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'id="call-form"' not in page.text  # no call page behind it
    assert Settings(_env_file=None, WEBRTC_DEV="").webrtc_dev is False


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"PUBLIC_BASE_URL": "https://voice.example.com"}, "PUBLIC_BASE_URL"),
        ({"HOST": "0.0.0.0"}, "HOST=0.0.0.0"),
        ({"ADMIN_TOKEN": None}, "ADMIN_TOKEN"),
    ],
)
def test_dev_page_is_refused_on_an_exposed_server(overrides: dict, named: str) -> None:
    with pytest.raises(StartupError) as refused:
        create_app(dev_settings(**overrides))
    assert named in str(refused.value)
    if named != "ADMIN_TOKEN":
        assert "WEBRTC_DEV_FORCE" in str(refused.value)
        # Forced: the operator said they mean it.
        app = create_app(dev_settings(WEBRTC_DEV_FORCE=True, **overrides))
        assert TestClient(app).post("/start", headers=BEARER).status_code == 200


def test_runner_refuses_the_dev_page_with_a_message_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "DATA_DIR": str(tmp_path / "data"),
        "PORT": str(free_port()),
        "WEBRTC_DEV": "true",
        "ADMIN_TOKEN": TOKEN,
        "PUBLIC_BASE_URL": "https://voice.example.com",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "runner.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "WEBRTC_DEV=true is refused because PUBLIC_BASE_URL is set" in output
    assert "WEBRTC_DEV_FORCE" in output
    assert "Traceback" not in output
    assert not (tmp_path / "data").exists()  # refused before any embedded server started


# --- Access: the admin token ---------------------------------------------------------


async def test_every_route_needs_the_admin_token() -> None:
    app = create_app(dev_settings())
    wrong = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer dev-admin-tokén".encode()},
        {"Authorization": b"Bearer \xff\xfe"},
        {"Cookie": f"voice_agent_dev={TOKEN}"},  # the raw token is not the cookie value
        {"Cookie": "voice_agent_dev=0000"},
    ]
    async with asgi_client(app, follow_redirects=True) as client:
        for headers in wrong:
            for method, path in ROUTES:
                response = await client.request(
                    method, path, headers=headers, json={"body": {"caller": JAMES}}
                )
                assert response.status_code == 401, (headers, method, path, response.text)
                if path.startswith("/client"):
                    assert "/client?token=" in response.text  # says how to get in
                else:
                    assert "admin token required" in response.json()["error"]
        bad_login = await client.get("/client/?token=nope")
        assert bad_login.status_code == 401 and "not this server" in bad_login.text
        assert "set-cookie" not in bad_login.headers
        assert len(app.state.webrtc.sessions) == 0


async def test_token_link_sets_a_strict_http_only_cookie_the_page_then_uses() -> None:
    app = create_app(dev_settings())
    async with asgi_client(app) as browser:
        login = await browser.get(f"/client/?token={TOKEN}&caller=%2B15555550101")
        assert login.status_code == 303 and login.headers["location"] == "/client/"
        cookies = login.headers.get_list("set-cookie")
        auth = next(c for c in cookies if c.startswith("voice_agent_dev="))
        assert "httponly" in auth.lower() and "samesite=strict" in auth.lower()
        assert TOKEN not in auth  # a derived value, not the admin token itself
        page = await browser.get("/client/")
        assert page.status_code == 200 and 'id="call-form"' in page.text
        assert '<script src="/client/static/dev_page.js">' in page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        asset = await browser.get("/client/static/dev_page.js")
        assert asset.status_code == 200 and "/api/offer" in asset.text
        assert (await browser.get("/client/static/nothing.js")).status_code == 404
        assert (await browser.get("/client/elsewhere")).status_code == 404
        start = await browser.post("/start", json={"transport": "webrtc"})
        assert start.status_code == 200
        # The customer picked on the page is the one the session plays.
        assert app.state.webrtc.sessions.get(start.json()["sessionId"]) == JAMES
    async with asgi_client(app, headers=BEARER) as script:
        assert (await script.post("/start")).status_code == 200


async def test_login_form_and_access_log_keep_the_token_out_of_sight() -> None:
    app = create_app(dev_settings())
    async with asgi_client(app) as browser:
        page = await browser.get("/client/")
        assert page.status_code == 401
        assert 'type="password" name="token"' in page.text
        # The form sends an empty caller when none is typed: that is not an error.
        login = await browser.get(f"/client/?token={TOKEN}&caller=")
        assert login.status_code == 303
        assert login.headers["cache-control"] == "no-store"
    # uvicorn's access log line for the token link, as uvicorn logs it.
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/client/?token={TOKEN}&caller=%2B15555550101", "1.1", 303),
        None,
    )
    for log_filter in logging.getLogger("uvicorn.access").filters:
        assert isinstance(log_filter, logging.Filter) and log_filter.filter(record)
    line = record.getMessage()
    assert TOKEN not in line and "token=***" in line


async def test_start_reports_missing_api_keys_and_the_page_says_so() -> None:
    app = create_app(dev_settings(OPENAI_API_KEY=None, DEEPGRAM_API_KEY=""))
    async with asgi_client(app) as browser:
        await browser.get(f"/client/?token={TOKEN}")
        start = await browser.post("/start", json={})
        assert start.status_code == 503
        body = start.json()
        assert body["missing"] == ["OPENAI_API_KEY", "DEEPGRAM_API_KEY"]
        assert "OPENAI_API_KEY" in body["error"] and "DEEPGRAM_API_KEY" in body["error"]
        page = await browser.get("/client/")
        assert page.status_code == 503
        assert "Calls are disabled: this server is missing OPENAI_API_KEY and " in page.text
        assert "DEEPGRAM_API_KEY" in page.text and 'id="missing-keys"' in page.text
        assert re.search(r'<button[^>]*id="call-button"[^>]*\sdisabled>Call</button>', page.text)
        assert len(app.state.webrtc.sessions) == 0
    # One key missing: the page names that one only; with both set the button is live.
    app = create_app(dev_settings(DEEPGRAM_API_KEY=None))
    async with asgi_client(app) as browser:
        await browser.get(f"/client/?token={TOKEN}")
        page = await browser.get("/client/")
        assert "this server is missing DEEPGRAM_API_KEY." in page.text
        assert "OPENAI_API_KEY" not in page.text
    app = create_app(dev_settings())
    async with asgi_client(app) as browser:
        await browser.get(f"/client/?token={TOKEN}")
        page = await browser.get("/client/")
        assert page.status_code == 200 and "missing-keys" not in page.text
        assert re.search(r'<button[^>]*id="call-button"[^>]*>Call</button>', page.text)
        assert not re.search(r'id="call-button"[^>]*disabled', page.text)


# --- The page: demo customers to call as, masked ------------------------------------


async def test_page_lists_the_demo_customers_masked_and_start_plays_the_one_picked(
    crm_db: str, redis_server_url: str
) -> None:
    settings = dev_settings(DATABASE_URL=crm_db, REDIS_URL=redis_server_url)
    async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
        app = create_app(settings, resources=resources)
        app.state.resources = resources  # (the ASGI test client runs no lifespan)
        sessions = app.state.webrtc.sessions
        async with asgi_client(app) as browser:
            await browser.get(f"/client/?token={TOKEN}")
            page = await browser.get("/client/")
            assert page.status_code == 200
            html = page.text
            assert PROFILE.name in html  # the dealership's name in the header
            ids = {}
            for demo in DEMO_CUSTOMERS:
                match = re.search(
                    r'value="(\d+)"[^>]*><span class="caller-name">'
                    + demo.first_name
                    + r'</span><span class="caller-phone mono">\+1\*\*\*…'
                    + demo.phone[-4:],
                    html,
                )
                assert match, demo.first_name
                ids[demo.phone] = int(match.group(1))
                # Never the full number, the last name, the date of birth, ZIP or a VIN.
                for secret in (
                    demo.phone,
                    demo.phone[2:],
                    f"555-{demo.phone[-4:]}",
                    demo.last_name,
                    demo.date_of_birth.isoformat(),
                    demo.date_of_birth.strftime("%m/%d/%Y"),
                    demo.zip_code,
                    *(v.vin for v in demo.vehicles),
                ):
                    assert secret not in html, (demo.first_name, secret)
            assert 'value="unknown"' in html and "Unknown caller" in html
            # Only the demo customers: the generated ones are not offered.
            assert html.count('name="caller"') == len(DEMO_CUSTOMERS) + 1
            # The first one (Maria) is picked unless a ?caller= link said otherwise.
            assert re.search(f'value="{ids["+15555550100"]}" checked', html)

            async def plays(body: Any) -> str | None:
                response = await browser.post("/start", json=body)
                assert response.status_code == 200, response.text
                return sessions.get(response.json()["sessionId"])

            assert await plays({"body": {"customer_id": ids[JAMES]}}) == JAMES
            assert await plays({"customer_id": ids["+15555550104"]}) == "+15555550104"
            assert await plays({"body": {"caller": "unknown"}}) == ""  # no caller ID
            for wrong in (99, 0, -1, 2**70, "1", 1.0, True, None, [1]):
                response = await browser.post("/start", json={"body": {"customer_id": wrong}})
                assert response.status_code == 422, (wrong, response.text)
                assert "customer_id" in response.json()["error"]
            # A ?caller= link picks the customer the page starts with ...
            await browser.get("/client/?caller=%2B15555550102")
            html = (await browser.get("/client/")).text
            assert re.search(f'value="{ids["+15555550102"]}" checked', html)
            # ... or, for a number that is not a demo customer, offers that number masked.
            await browser.get("/client/?caller=%2B15551234567")
            html = (await browser.get("/client/")).text
            assert re.search(r'value="link" checked>.*\+1\*\*\*…4567', html)
            assert "5551234567" not in html
            # ... and ?caller=unknown starts on the unknown caller.
            await browser.get("/client/?caller=unknown")
            html = (await browser.get("/client/")).text
            assert 'value="unknown" checked' in html and html.count(" checked") == 1
            assert await plays({}) == ""  # the page sends no caller for the link's choice
            # The browser call of an unknown caller has no number at all.
            from api.webrtc import browser_call_session

            assert browser_call_session("").caller_phone is None


async def test_page_without_the_database_still_offers_the_unknown_caller() -> None:
    app = create_app(dev_settings())  # no lifespan here: no database pool
    async with asgi_client(app) as browser:
        await browser.get(f"/client/?token={TOKEN}")
        page = await browser.get("/client/")
        assert page.status_code == 200
        assert "The demo customers cannot be listed" in page.text
        assert 'value="unknown" checked' in page.text
        response = await browser.post("/start", json={"body": {"customer_id": 1}})
        assert response.status_code == 503 and "database" in response.json()["error"]


# --- The transcript feed the page polls ---------------------------------------------


async def test_transcript_feed_numbers_masks_and_guards_the_turns(redis_server_url: str) -> None:
    import redis.asyncio as aioredis

    prefix = f"devpage-test-{os.getpid()}"
    settings = dev_settings(REDIS_URL=redis_server_url, REDIS_KEY_PREFIX=prefix)
    app = create_app(settings)
    client = aioredis.from_url(redis_server_url)

    class Resources:  # what the feed uses of the app's resources
        redis = client

    Resources.settings = settings
    app.state.resources = Resources()
    store = SnapshotStore(client, prefix=prefix)
    sid = "webrtc-0123456789abcdef"
    turns = [{"role": "bot" if i % 2 else "caller", "text": f"turn {i}"} for i in range(2)] + [
        {"role": "caller", "text": "My birthday is April 12th, 1985 and my number is 555-0100"},
        {"role": "bot", "text": "Thanks, one moment.", "interrupted": True},
    ]
    try:
        async with asgi_client(app) as browser:
            feed = f"/client/calls/{sid}/transcript"
            assert (await browser.get(feed)).status_code == 401  # the admin token first
            await browser.get(f"/client/?token={TOKEN}")
            assert (await browser.get(feed)).json() == {
                "call_sid": sid,
                "found": False,
                "finished": False,
                "turns": [],
            }
            # The snapshot keeps the last 2 of 4 turns: they are turns 2 and 3.
            await store.write(
                sid, 1, {"transcript": turns[-2:], "transcript_turns": 4, "call_sid": sid}
            )
            body = (await browser.get(feed)).json()
            assert body["found"] is True and body["finished"] is False
            assert [t["n"] for t in body["turns"]] == [2, 3]
            said = body["turns"][0]["text"]
            assert "1985" not in said and "[date]" in said and "555-0100" not in said
            assert body["turns"][1] == {
                "n": 3,
                "role": "bot",
                "text": "Thanks, one moment.",
                "interrupted": True,
            }
            after = (await browser.get(feed, params={"after": 3})).json()
            assert [t["n"] for t in after["turns"]] == [3]
            await store.finish(sid)
            assert (await browser.get(feed)).json()["finished"] is True
            for bad in ("CA" + "0" * 32, "webrtc-xyz", "webrtc-0123456789abcdef0"):
                response = await browser.get(f"/client/calls/{bad}/transcript")
                assert response.status_code == 404, bad
            for after_value in ("-1", "x", "100001"):
                response = await browser.get(feed, params={"after": after_value})
                assert response.status_code == 422
    finally:
        await client.delete(store.key(sid), store.active_key)
        await client.aclose()


# --- The session table ---------------------------------------------------------------


async def test_session_table_is_bounded_and_keeps_only_the_caller() -> None:
    app = create_app(dev_settings())
    dev = app.state.webrtc
    padding = "x" * (15 * 1024)  # just under the body limit, none of it kept
    async with asgi_client(app, headers=BEARER) as client:
        ids = []
        for i in range(1000):
            response = await client.post(
                "/start", json={"body": {"caller": JAMES, "padding": padding, "i": i}}
            )
            assert response.status_code == 200
            ids.append(response.json()["sessionId"])
            assert len(dev.sessions) <= 100
        assert len(dev.sessions) == 100
        # The oldest sessions were evicted, the newest are live (and play James).
        assert (await client.post(f"/sessions/{ids[0]}/api/offer", json={})).status_code == 404
        assert dev.sessions.get(ids[-1]) == JAMES
        recent = await client.post(f"/sessions/{ids[-1]}/api/offer", json={})
        assert recent.status_code == 422  # the session exists; the offer is empty
        # Over the body limit: refused without being read into the table.
        huge = await client.post("/start", content=b'{"body": "' + b"y" * 65536 + b'"}')
        assert huge.status_code == 413
        assert len(dev.sessions) == 100


async def test_sessions_expire() -> None:
    app = create_app(dev_settings())
    sessions = app.state.webrtc.sessions
    now = [1000.0]
    sessions.clock = lambda: now[0]
    async with asgi_client(app, headers=BEARER) as client:
        old = (await client.post("/start")).json()["sessionId"]
        now[0] += 200
        kept = (await client.post("/start")).json()["sessionId"]
        now[0] += 150  # old: 350 s since start; kept: 150 s
        assert (await client.post(f"/sessions/{old}/api/offer", json={})).status_code == 404
        assert (await client.post(f"/sessions/{kept}/api/offer", json={})).status_code == 422
        assert len(sessions) == 1
        now[0] += 301
        assert len(sessions) == 0


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"params": {"caller": "James"}}, 422),
        ({"params": {"caller": "+1"}}, 422),
        ({"json": {"body": {"caller": 15555550101}}}, 422),
        ({"json": {"body": {"caller": ["+15555550101"]}}}, 422),
        ({"json": {"body": "caller"}}, 422),
        ({"json": [1, 2]}, 422),
        ({"json": "start"}, 422),
        ({"content": b"\xff\xfe{}"}, 400),
        ({"content": b"{"}, 400),
        ({"content": b"[" * 20000}, 413),
        ({"content": b"[" * 10000}, 400),  # nesting deeper than the JSON parser goes
    ],
)
async def test_start_refuses_odd_bodies(request_kwargs: dict, status: int) -> None:
    app = create_app(dev_settings())
    async with asgi_client(app, headers=BEARER) as client:
        response = await client.post("/start", **request_kwargs)
        assert response.status_code == status, response.text
        assert response.json()["error"]
        assert len(app.state.webrtc.sessions) == 0


# --- Caller ID is never credited to a browser call -----------------------------------


async def test_browser_session_needs_two_factors_and_is_not_greeted_by_name(
    crm_db: str, redis_server_url: str
) -> None:
    from api.webrtc import browser_call_session
    from tools.context import make_tool_context
    from tools.customers import identify_caller
    from tools.registry import run_tool

    settings = dev_settings(DATABASE_URL=crm_db, REDIS_URL=redis_server_url)
    async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
        await resources.redis.flushdb()
        session = browser_call_session(JAMES)
        ctx = make_tool_context(resources, session)
        assert await identify_caller(ctx)  # the number picks James's record ...
        assert session.customer_first_name == "James"
        assert session.caller_id_trusted is False
        assert session.caller_id_matched is False  # ... but is not a verification factor
        assert "caller_id" not in session.factors
        text = greeting("inbound", profile=resources.profile, session=session)
        assert "James" not in text and text.startswith("Thanks for calling")
        one = await run_tool(ctx, "verify_customer", {"date_of_birth": "1979-09-30"})
        assert one["verified"] is False, one
        two = await run_tool(ctx, "verify_customer", {"zip_code": "60201"})
        assert two["verified"] is True, two
        # Looking the record up again by the same number does not credit it either.
        looked_up = await run_tool(ctx, "lookup_customer", {"phone": JAMES})
        assert looked_up["found"] is True
        # (the two factors given above are what verified him; none is left to give)
        assert looked_up["factors_needed"] == 0
        assert session.caller_id_matched is False and "caller_id" not in session.factors


async def test_browser_call_over_webrtc_is_not_credited_caller_id(
    crm_db: str, redis_server_url: str
) -> None:
    """A whole browser call: the fake browser plays James; the bot greets without his name
    and one verification factor is not enough."""
    llm = FakeOpenAI(
        [
            call_tool("verify_customer", {"date_of_birth": "1979-09-30"}),
            say("Thanks. And your ZIP code?"),
        ]
    )
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, env=DEV_ENV
    ) as agent:
        agent.stt.script(["Hi, this is James, my birthday is September thirtieth 1979."])
        http = httpx.AsyncClient(base_url=agent.base_url, timeout=10)
        login = await http.get("/client/?token=e2e-admin&caller=%2B15555550101")
        assert login.status_code == 303
        browser = FakeBrowser(http)
        try:
            answer = await browser.call()
            assert answer.status_code == 200, answer.text
            call_sid = answer.json()["call_sid"]
            assert call_sid.startswith("webrtc-")
            await browser.wait_for_bot_audio(frames=10, timeout=30)
            assert agent.tts.texts, "the bot greeted"
            assert agent.tts.texts[0].startswith("Thanks for calling")
            assert "James" not in agent.tts.texts[0]
            await browser.say(speech_pcm16(1.0, sample_rate=MIC_RATE))
            await _wait_for(lambda: len(llm.requests) >= 2, timeout=30)
            system = llm.requests[0]["messages"][0]["content"]
            assert "James" not in system
            result = last_tool_result(llm.requests[1], "verify_customer")
            assert result["verified"] is False, result
            # The page's transcript feed shows both sides as the call goes on, masked.
            feed = f"/client/calls/{call_sid}/transcript"
            turns: list[dict] = []

            async def fetch_turns() -> bool:
                body = (await http.get(feed)).json()
                turns[:] = body["turns"]
                return any(t["role"] == "bot" and "ZIP code" in t["text"] for t in turns) and any(
                    t["role"] == "caller" for t in turns
                )

            await _wait_for_async(fetch_turns, timeout=30)
            assert [t["n"] for t in turns] == list(range(len(turns)))
            assert turns[0]["role"] == "bot" and turns[0]["text"].startswith("Thanks for calling")
            said = next(t["text"] for t in turns if t["role"] == "caller")
            assert said.startswith("Hi, this is James") and "[date]" in said
            assert "1979" not in said
            newer = (await http.get(feed, params={"after": len(turns)})).json()
            assert newer["turns"] == [] and newer["finished"] is False
        finally:
            await browser.close()
            await http.aclose()
        rows = agent.query("SELECT * FROM calls WHERE call_sid LIKE 'webrtc-%%'")
        assert len(rows) == 1 and rows[0]["verified"] is not True
        assert rows[0]["call_sid"] == call_sid


async def _wait_for(predicate, timeout: float) -> None:  # noqa: ASYNC109
    from tests.fakes._util import wait_until

    await wait_until(predicate, timeout)


async def _wait_for_async(check, timeout: float) -> None:  # noqa: ASYNC109
    """Wait until the coroutine function ``check`` returns True (polled every 0.2 s)."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.2)


# --- Fuzz: odd requests are a 4xx, never a 5xx ---------------------------------------

SAMPLE_OFFER_LINES = [
    "v=0",
    "o=- 4005037159 4005037159 IN IP4 0.0.0.0",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0",
    "a=msid-semantic:WMS *",
    "m=audio 41854 UDP/TLS/RTP/SAVPF 96 9 0 8",
    "c=IN IP4 127.0.0.1",
    "a=sendrecv",
    "a=mid:0",
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=rtcp-mux",
    "a=ssrc:2758982633 cname:d52ebc76-3acd-4ab5-b293-3045147c8779",
    "a=rtpmap:96 opus/48000/2",
    "a=rtpmap:0 PCMU/8000",
    "a=candidate:f957a2332b1715da3b0ef8ba684454eb 1 udp 2130706431 127.0.0.1 41854 typ host",
    "a=end-of-candidates",
    "a=ice-ufrag:8Hky",
    "a=ice-pwd:GcrAh0NLJ0K9WUNpAFmuyZ",
    "a=fingerprint:sha-256 8E:4C:7D:E5:97:1F:21:FF:5F:18:32:35:9B:C6:40:97:B9:AE:40:14:AC:45:"
    "14:13:AF:70:45:76:14:19:D2:ED",
    "a=setup:actpass",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
odd_text = st.text(max_size=60) | st.sampled_from(["", " ", "offer", "answer", "null", "\x00"])


@st.composite
def mutated_sdp(draw: st.DrawFn) -> str:
    """A real offer with lines dropped, garbled, cut or duplicated; the audio section is
    always there, so it reaches the WebRTC stack (the lines it cannot do without are
    dropped less often)."""
    required = ("m=audio", "a=ice-ufrag", "a=ice-pwd", "a=fingerprint")
    lines = [
        line
        for line in SAMPLE_OFFER_LINES
        if line.startswith("m=audio")
        or draw(st.integers(0, 9 if line.startswith(required) else 3)) > 0
    ]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        edit = draw(st.sampled_from(["garble", "cut", "duplicate", "value"]))
        if edit == "garble":
            lines[i] = draw(st.text(max_size=40))
        elif edit == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        elif edit == "duplicate":
            lines.insert(i, lines[i])
        else:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}:{draw(st.text(max_size=30))}"
    return "\r\n".join(lines) + "\r\n"


offer_bodies = st.fixed_dictionaries(
    {"sdp": json_values | odd_text | mutated_sdp(), "type": json_values | odd_text},
    optional={
        "pc_id": json_values | odd_text,
        "restart_pc": json_values,
        "requestData": json_values,
    },
)
patch_bodies = st.fixed_dictionaries(
    {
        "pc_id": json_values | odd_text,
        "candidates": json_values
        | st.lists(
            st.fixed_dictionaries(
                {
                    "candidate": json_values | odd_text,
                    "sdp_mid": json_values | odd_text,
                    "sdp_mline_index": json_values | st.integers(),
                }
            ),
            max_size=3,
        ),
    }
)
start_bodies = st.fixed_dictionaries(
    {},
    optional={
        "body": json_values | st.fixed_dictionaries({"caller": json_values | odd_text}),
        "caller": json_values | odd_text,
        "customer_id": json_values | st.integers(-(2**70), 2**70) | st.integers(1, 12),
        "transport": json_values,
    },
)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


sdp_offers = st.fixed_dictionaries(
    {"sdp": mutated_sdp(), "type": st.just("offer")}, optional={"pc_id": odd_text}
)
raw_bodies = (
    (json_values | offer_bodies | sdp_offers | patch_bodies | start_bodies).map(encode)
    | st.binary(max_size=300)
    | st.integers(16 * 1024 - 64, 48 * 1024).map(lambda n: b'{"sdp": "' + b"v" * n + b'"}')
    | st.integers(1, 20000).map(lambda n: b"[" * n)
    | st.just(b"")
)
odd_headers = st.fixed_dictionaries(
    {},
    optional={
        "Content-Type": st.sampled_from(
            ["application/json", "text/plain", "application/x-www-form-urlencoded", "", "*/*"]
        ),
        "Cookie": st.sampled_from(["voice_agent_dev_caller=%2B1", "voice_agent_dev_caller=x"]),
    },
)


def test_webrtc_routes_never_answer_5xx(migrated_db: str, redis_server_url: str) -> None:
    """Odd JSON, types, encodings, sizes and mutated SDP offers on every signalling route.

    The server runs for real (resources open); an offer the WebRTC stack accepts starts a
    call that cannot reach its (absent) speech services and is hung up at shutdown.
    """
    app = create_app(
        dev_settings(
            DATABASE_URL=migrated_db,
            REDIS_URL=redis_server_url,
            DEEPGRAM_STT_URL=f"ws://127.0.0.1:{free_port()}",
            DEEPGRAM_TTS_URL=f"ws://127.0.0.1:{free_port()}",
            OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
            LOG_LEVEL="WARNING",
        )
    )
    statuses: dict[str, int] = {}
    with TestClient(app, base_url=BASE, headers=BEARER) as client:
        session_id = client.post("/start").json()["sessionId"]
        paths = st.sampled_from(
            ["/start", "/api/offer", f"/sessions/{session_id}/api/offer", "/sessions/x/api/offer"]
        )

        @settings(
            max_examples=int(os.environ.get("WEBRTC_FUZZ_EXAMPLES", "400")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(
            path=paths,
            method=st.sampled_from(["POST", "PATCH"]),
            body=raw_bodies,
            headers=odd_headers,
            caller=st.none() | odd_text,
        )
        def fuzz(path: str, method: str, body: bytes, headers: dict, caller: str | None) -> None:
            if path == "/start":
                method = "POST"
            params = {"caller": caller} if caller is not None and path == "/start" else None
            response = client.request(method, path, content=body, headers=headers, params=params)
            kind = f"{method} {path.split('/')[1]} {response.status_code}"
            statuses[kind] = statuses.get(kind, 0) + 1
            assert response.status_code < 500, (path, method, body[:200], response.text)
            if response.status_code >= 400:
                error = response.json()
                assert error.get("error") or error.get("detail")

        fuzz()

        # Mutated offers straight to the WebRTC stack: answered (a call starts), or a 4xx.
        @settings(
            max_examples=int(os.environ.get("WEBRTC_SDP_FUZZ_EXAMPLES", "150")),
            deadline=None,
            database=None,
        )
        @given(sdp=mutated_sdp())
        def fuzz_sdp(sdp: str) -> None:
            response = client.post(
                f"/sessions/{session_id}/api/offer", json={"sdp": sdp, "type": "offer"}
            )
            kind = f"SDP {response.status_code}"
            statuses[kind] = statuses.get(kind, 0) + 1
            assert response.status_code in (200, 400, 422), (sdp, response.text)
            if response.status_code == 200:
                assert response.json()["type"] == "answer"

        fuzz_sdp()
        assert len(app.state.webrtc.sessions) <= 100
    total = sum(statuses.values())
    print(f"\nwebrtc route fuzz: {total} cases, {dict(sorted(statuses.items()))}")
    assert total >= 200


def test_admin_routes_never_answer_5xx_to_odd_authorization(
    migrated_db: str, redis_server_url: str
) -> None:
    """Any Authorization header bytes (non-ASCII included) and call ids: 401, never a 5xx;
    with no ADMIN_TOKEN configured, the routes say they are disabled."""
    protected = create_app(
        Settings(
            _env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url, ADMIN_TOKEN=TOKEN
        )
    )
    disabled = create_app(
        Settings(_env_file=None, DATABASE_URL=migrated_db, REDIS_URL=redis_server_url)
    )
    header_bytes = st.binary(max_size=60).map(
        lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)
    ) | st.text(max_size=40).map(lambda t: ("Bearer " + t).encode("utf-8"))
    call_sid_chars = st.characters(exclude_categories=("Cs",), exclude_characters="/")
    cases = 0
    with (
        TestClient(protected, base_url=BASE) as client,
        TestClient(disabled, base_url=BASE) as off,
    ):

        @settings(max_examples=300, deadline=None, database=None)
        @given(
            authorization=st.none() | header_bytes,
            call_sid=st.text(call_sid_chars, min_size=1, max_size=40).filter(
                lambda s: s not in (".", "..")
            ),
        )
        def fuzz(authorization: bytes | None, call_sid: str) -> None:
            nonlocal cases
            headers = {"Authorization": authorization} if authorization is not None else {}
            for path in ("/calls/active", "/calls/" + quote(call_sid, safe="")):
                response = client.get(path, headers=headers)
                assert response.status_code == 401, (authorization, path, response.text)
                assert response.json()["detail"] == "admin token required"
                response = off.get(path, headers=headers)
                assert response.status_code == 503, (authorization, path, response.text)
                assert "ADMIN_TOKEN" in response.json()["detail"]
            # With the token, any call id is a 404 or a snapshot, never a 5xx.
            response = client.get("/calls/" + quote(call_sid, safe=""), headers=BEARER)
            assert response.status_code in (200, 404), (call_sid, response.text)
            cases += 1

        fuzz()
    print(f"\nadmin route fuzz: {cases} cases")
    assert cases >= 100

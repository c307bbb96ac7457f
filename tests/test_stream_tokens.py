"""Media-stream admission: the per-call token, its single use, one stream per call, and
clean refusals of odd start messages and odd webhook input.

The codec is tested as a property (round trip, any tampering voids the token); the rest
through the real server (``tests/harness.py``) with Twilio's media-stream protocol.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from runner import create_app, uvicorn_config
from seeding import seed
from telephony import twilio as tw
from tests.fakes.twilio_media import TwilioMediaClient, new_sid
from tests.harness import (
    ACCOUNT_SID,
    LogCapture,
    free_port,
    parse_stream_twiml,
    running_agent,
    sign,
)

MARIA = "+15555550100"
JAMES = "+15555550101"
STRANGER = "+15555550777"
PROFILE = load_profile(DEFAULT_PROFILE)
SETTINGS = Settings(_env_file=None, TWILIO_AUTH_TOKEN="codec-test-token")
NOW = 1_800_000_000.0


# --- the token codec ----------------------------------------------------------------

call_sids = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "CA" + h)
ids = st.one_of(st.just(""), st.integers(1, 10**18 - 1).map(str))
callers = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn", "Zs")),
    max_size=tw.MAX_STREAM_PARAMETER_CHARS,
)
claims_strategy = st.builds(
    tw.StreamClaims,
    call_sid=call_sids,
    caller=callers,
    direction=st.sampled_from(tw.STREAM_DIRECTIONS),
    scenario=st.sampled_from(tw.STREAM_SCENARIOS),
    customer_id=ids,
    attempt_id=ids,
)


def _stream_params(claims: tw.StreamClaims, ttl: int = 120) -> dict[str, str]:
    token = tw.make_stream_token(SETTINGS, claims, ttl=ttl, now=NOW)
    return {**claims.parameters(), "token": token}


@given(
    claims=claims_strategy, ttl=st.integers(0, 10**6), extra=st.dictionaries(st.text(), st.text())
)
@settings(max_examples=200, deadline=None)
def test_a_token_verifies_for_exactly_its_claims(
    claims: tw.StreamClaims, ttl: int, extra: dict[str, str]
) -> None:
    assert claims.is_well_formed()
    params = {**extra, **_stream_params(claims, ttl)}  # unsigned extras are ignored
    verified = tw.verify_stream_token(
        SETTINGS, call_sid=claims.call_sid, parameters=params, now=NOW
    )
    assert verified is not None
    assert verified.claims == claims and verified.expiry == int(NOW) + ttl
    # Expired one second later; another deployment's key never verifies it.
    later = NOW + ttl + 1
    assert (
        tw.verify_stream_token(SETTINGS, call_sid=claims.call_sid, parameters=params, now=later)
        is None
    )
    other = Settings(_env_file=None, TWILIO_AUTH_TOKEN="another-token")
    assert (
        tw.verify_stream_token(other, call_sid=claims.call_sid, parameters=params, now=NOW) is None
    )


@given(claims=claims_strategy, data=st.data())
@settings(max_examples=300, deadline=None)
def test_any_changed_field_voids_the_token(claims: tw.StreamClaims, data: st.DataObject) -> None:
    params: dict[str, Any] = _stream_params(claims)
    call_sid = claims.call_sid
    field = data.draw(st.sampled_from(["call_sid", "token", *tw.SIGNED_STREAM_PARAMETERS]))
    if field == "call_sid":
        call_sid = data.draw(call_sids.filter(lambda s: s != claims.call_sid))
    elif field == "token":
        token = params["token"]
        i = data.draw(st.integers(0, len(token) - 1))
        c = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[i]))
        params["token"] = token[:i] + c + token[i + 1 :]
    else:
        replacement = data.draw(
            st.one_of(
                st.text(max_size=80),
                st.integers(),
                st.none(),
                st.lists(st.text(), max_size=2),
                st.just("__absent__"),
            ).filter(
                lambda v: v != params[field] and not (v == "__absent__" and params[field] == "")
            )
        )
        if replacement == "__absent__":
            del params[field]
        else:
            params[field] = replacement
    assert tw.verify_stream_token(SETTINGS, call_sid=call_sid, parameters=params, now=NOW) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    parameters=st.one_of(
        json_values,
        st.dictionaries(st.sampled_from(["token", *tw.SIGNED_STREAM_PARAMETERS]), json_values),
        st.builds(
            lambda digits, tail: {"token": f"v2.{digits}{tail}"},
            st.text("0123456789", min_size=1, max_size=6000),
            st.text(max_size=120),
        ),
    ),
    call_sid=st.one_of(call_sids, st.text()),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_parameters_never_raise(parameters: object, call_sid: str) -> None:
    assert (
        tw.verify_stream_token(SETTINGS, call_sid=call_sid, parameters=parameters, now=NOW) is None
    )


@given(a=st.lists(st.text(max_size=8), max_size=5), b=st.lists(st.text(max_size=8), max_size=5))
@settings(max_examples=500, deadline=None)
def test_the_canonical_encoding_is_unambiguous(a: list[str], b: list[str]) -> None:
    assert (tw._canonical(a) == tw._canonical(b)) == (a == b)


def test_field_boundaries_cannot_be_shifted() -> None:
    """Moving characters from one field into its neighbour changes the MAC."""
    base = tw.StreamClaims(call_sid="CA" + "a" * 32, caller="+1555", scenario="inbound")
    params = _stream_params(base)
    shifted = {**params, "caller": "+155", "direction": "5inbound"}
    assert (
        tw.verify_stream_token(SETTINGS, call_sid=base.call_sid, parameters=shifted, now=NOW)
        is None
    )
    assert tw.verify_stream_token(SETTINGS, call_sid=base.call_sid, parameters=params, now=NOW)


# --- single use and one live stream per call, in Redis ------------------------------


async def test_a_token_is_consumed_once_for_its_remaining_lifetime(
    redis_client: aioredis.Redis,
) -> None:
    claims = tw.StreamClaims(call_sid=new_sid("CA"), caller=MARIA)
    now = time.time()
    token = tw.make_stream_token(SETTINGS, claims, ttl=30, now=now)
    verified = tw.verify_stream_token(
        SETTINGS, call_sid=claims.call_sid, parameters={**claims.parameters(), "token": token}
    )
    assert verified is not None
    assert await tw.consume_stream_token(redis_client, verified, now=now) is True
    assert await tw.consume_stream_token(redis_client, verified, now=now) is False
    key = tw.STREAM_TOKEN_USED_KEY.format(digest=verified.digest)
    assert 25 <= await redis_client.ttl(key) <= 31
    assert token not in key  # the key is a hash, not the token


async def test_one_live_marker_per_call_across_processes(redis_client: aioredis.Redis) -> None:
    sid = new_sid("CA")
    first = tw.LiveCallMarker(redis_client, sid, ttl=60)
    second = tw.LiveCallMarker(redis_client, sid, ttl=60)  # another process, same call
    assert await first.acquire() is True
    assert await second.acquire() is False
    assert 0 < await redis_client.ttl(first.live_key) <= 60  # the safety net
    assert await second.refresh() is False  # only the owner refreshes its marker
    assert await first.refresh() is True
    await second.release()  # a refused stream ending must not free the call
    assert await redis_client.exists(first.live_key)
    await first.release()
    assert not await redis_client.exists(first.live_key)
    assert 0 < await redis_client.ttl(first.ended_key) <= tw.STREAM_TOKEN_TTL_SECS
    assert await tw.LiveCallMarker(redis_client, sid).acquire() is False  # the call ended
    # A running call keeps its marker; a marker left by a dead process expires by itself.
    running = tw.LiveCallMarker(redis_client, new_sid("CA"), ttl=1)
    crashed = tw.LiveCallMarker(redis_client, new_sid("CA"), ttl=1)
    assert await running.acquire() and await crashed.acquire()
    keep_alive = asyncio.create_task(running.keep_alive())
    await asyncio.sleep(2.1)
    keep_alive.cancel()
    assert await redis_client.exists(running.live_key)
    assert not await redis_client.exists(crashed.live_key)


# --- through the server -------------------------------------------------------------


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


def ws_url(agent) -> str:
    return agent.base_url.replace("http://", "ws://") + "/twilio/media"


async def _voice_params(agent, call_sid: str, caller: str) -> dict[str, str]:
    form = {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": caller, "To": "+15555550199"}
    response = await agent.post_signed("/twilio/voice", form)
    assert response.status_code == 200, response.text
    return parse_stream_twiml(response.text)[1]


async def _refused(agent, call_sid: str, params: dict[str, Any]) -> int | None:
    client = TwilioMediaClient(ws_url(agent), call_sid=call_sid, custom_parameters=params)
    await client.connect()
    try:
        return await client.wait_closed(timeout=5)
    finally:
        await client.close()


async def test_a_stream_token_opens_one_stream_once(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        with LogCapture() as logs:  # after the start: uvicorn's logging setup resets handlers
            call = await agent.inbound_call(MARIA)
            await call.wait_for_bot_audio(min_seconds=0.3, timeout=20)
            token_params = dict(call.custom_parameters)

            # The same token again, while the call runs: refused, the call goes on.
            assert await _refused(agent, call.call_sid, token_params) == 1008
            assert "stream token already used" in logs.text
            # A fresh, valid token for the same live call: refused too.
            fresh = await _voice_params(agent, call.call_sid, MARIA)
            assert fresh["token"] != token_params["token"]
            assert await _refused(agent, call.call_sid, fresh) == 1008
            assert "already has a live stream" in logs.text
            assert not call.closed
            assert agent.stt.connections == 1  # one pipeline
            redis = agent.app.state.resources.redis
            live_key = tw.LIVE_CALL_KEY.format(call_sid=call.call_sid)
            assert 0 < await redis.ttl(live_key) <= tw.LIVE_MARKER_TTL_SECS

            await call.hang_up()
            await agent.wait_for_call_row(call.call_sid)
            # After the call: the used token, an unused one and a new one are all refused.
            assert await _refused(agent, call.call_sid, token_params) == 1008
            assert await _refused(agent, call.call_sid, fresh) == 1008
            later = await _voice_params(agent, call.call_sid, MARIA)
            assert await _refused(agent, call.call_sid, later) == 1008
            assert not await redis.exists(live_key)
            assert agent.stt.connections == 1
            assert agent.query("SELECT count(*) AS n FROM calls")[0]["n"] == 1
    logs.assert_clean()
    assert MARIA not in logs.text and MARIA[2:] not in logs.text


async def test_changed_parameters_void_a_valid_token(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        with LogCapture() as logs:  # after the start: uvicorn's logging setup resets handlers
            call_sid = new_sid("CA")
            path = "/twilio/outbound?scenario=confirmation&customer_id=2&attempt_id=7"
            form = {"CallSid": call_sid, "To": JAMES, "AnsweredBy": "human"}
            response = await agent.post_signed(path, form)
            assert response.status_code == 200
            params = parse_stream_twiml(response.text)[1]
            assert params["customer_id"] == "2" and params["attempt_id"] == "7"
            for name, value in (
                ("caller", MARIA),
                ("customer_id", "1"),
                ("scenario", "service_due"),
                ("attempt_id", "8"),
                ("attempt_id", None),  # dropped
                ("direction", "inbound"),
                ("customer_id", "02"),
            ):
                changed = {k: v for k, v in params.items() if not (k == name and value is None)}
                if value is not None:
                    changed[name] = value
                assert await _refused(agent, call_sid, changed) == 1008, name
            # Another call's token, carrying this call's sid, is refused as well.
            inbound = await _voice_params(agent, new_sid("CA"), STRANGER)
            assert await _refused(agent, call_sid, {**inbound, "caller": JAMES}) == 1008
            assert agent.tts.texts == [] and agent.stt.connections == 0
            assert agent.llm.requests == []
            assert agent.query("SELECT count(*) AS n FROM calls")[0]["n"] == 0

            # The unchanged parameters still work (refusals did not use the token up).
            client = TwilioMediaClient(ws_url(agent), call_sid=call_sid, custom_parameters=params)
            agent.clients.append(client)
            await client.connect()
            await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
            assert "James" in agent.tts.texts[0] and "Maria" not in " ".join(agent.tts.texts)
            await client.hang_up()
            row = await agent.wait_for_call_row(call_sid)
            assert row["direction"] == "outbound" and row["scenario"] == "confirmation"
    logs.assert_clean()


def _token(digits: str) -> str:
    return f"v2.{digits}.{'0' * 32}.{'0' * 64}"


def _start(**start: Any) -> str:
    return json.dumps({"event": "start", "start": start})


SID = "CA" + "1" * 32
MZ = "MZ" + "1" * 32
ODD_FIRST_MESSAGES: list[str | bytes] = [
    "[1]",
    "null",
    '"start"',
    "not json at all",
    "{",
    "[" * 5000 + "]" * 5000,
    b"\x00\x01binary",
    json.dumps({"event": "start", "start": None}),
    json.dumps({"event": "start", "start": [1, 2]}),
    json.dumps({"event": "start"}),
    json.dumps({"event": ["start"]}),
    json.dumps({"event": {"start": 1}}),
    json.dumps({"event": "media", "media": {"payload": "AAAA"}}),
    _start(callSid=SID, streamSid=MZ, customParameters=[["token", "x"]]),
    _start(callSid=SID, streamSid=MZ, customParameters="token=x"),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": 12345}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": None}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": {"v": 2}}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": "9" * 5000 + ".abc"}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": _token("9" * 5000)}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": _token("1" * 12)}),
    _start(callSid=SID, streamSid=MZ, customParameters={"token": _token("1" * 12), "caller": 5}),
    _start(callSid=12, streamSid=MZ, customParameters={}),
    _start(callSid=SID, streamSid=None),
    _start(callSid=SID + "\x00", streamSid=MZ),
    _start(callSid="", streamSid=""),
]


async def test_odd_start_messages_are_refused_cleanly(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        with LogCapture() as logs:  # after the start: uvicorn's logging setup resets handlers
            for message in ODD_FIRST_MESSAGES:
                async with connect(ws_url(agent), max_size=2**22) as ws:
                    await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
                    await ws.send(message)
                    with pytest.raises(ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None, message
                assert closed.value.rcvd.code == 1008, message
            assert agent.stt.connections == 0
            health = await agent.http.get("/health")
            assert health.status_code == 200
    logs.assert_clean()
    refusals = [line for line in logs.lines if "media stream refused" in line]
    assert len(refusals) == len(ODD_FIRST_MESSAGES)
    assert all("WARNING" in line for line in refusals)


async def test_odd_webhook_input_gets_a_clear_4xx(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        with LogCapture() as logs:  # after the start: uvicorn's logging setup resets handlers
            sid = new_sid("CA")
            cases: list[tuple[str, dict[str, str], int]] = [
                (
                    "/twilio/status",
                    {"CallSid": sid, "CallStatus": "ringing", "SequenceNumber": "abc"},
                    400,
                ),
                (
                    "/twilio/status",
                    {"CallSid": sid, "CallStatus": "ringing", "SequenceNumber": "9" * 12},
                    400,
                ),
                ("/twilio/status", {"CallSid": sid, "CallStatus": "ring\x00ing"}, 400),
                ("/twilio/status", {"CallSid": sid, "CallStatus": "ringing", "Foo\x00": "x"}, 400),
                (
                    "/twilio/status",
                    {"CallSid": sid, "CallStatus": "ringing", "Caller": "\x00"},
                    400,
                ),
                ("/twilio/status", {"CallSid": "CA\x00", "CallStatus": "ringing"}, 400),
                ("/twilio/status", {"CallSid": sid, "CallStatus": "<b>" * 20}, 400),
                (
                    "/twilio/status",
                    {"CallSid": sid, "CallStatus": "ringing", "SequenceNumber": "2"},
                    204,
                ),
                ("/twilio/voice", {"CallSid": "not-a-sid", "From": MARIA}, 400),
                ("/twilio/voice", {"From": MARIA}, 400),
                ("/twilio/voice", {"CallSid": sid, "From": "+1" * 200}, 400),
                ("/twilio/voice", {"CallSid": sid, "From": "+1555\n<Hangup/>"}, 400),
                ("/twilio/outbound?scenario=confirmation&customer_id=abc", {"CallSid": sid}, 400),
                (
                    "/twilio/outbound?scenario=confirmation&customer_id=" + "9" * 40,
                    {"CallSid": sid},
                    400,
                ),
                ("/twilio/outbound?scenario=confirmation&customer_id=-1", {"CallSid": sid}, 400),
                ("/twilio/outbound?scenario=confirmation&customer_id=0", {"CallSid": sid}, 400),
                ("/twilio/outbound?scenario=service_due&attempt_id=1e9", {"CallSid": sid}, 400),
                ("/twilio/outbound?scenario=../../etc", {"CallSid": sid}, 400),
                ("/twilio/outbound?customer_id=" + "1" * 18, {"CallSid": sid, "To": JAMES}, 200),
            ]
            for path, form, expected in cases:
                response = await agent.post_signed(path, form)
                assert response.status_code == expected, (path, form, response.text)
            # Not a url-encoded form, or too big: answered before the signature check.
            multipart = await agent.http.post("/twilio/status", files={"CallSid": b"x"})
            assert multipart.status_code == 415
            huge = {"CallSid": sid, "Pad": "x" * 100_000}
            assert (await agent.post_signed("/twilio/status", huge)).status_code == 413
            assert (await agent.http.get("/health")).status_code == 200
    logs.assert_clean()


async def test_every_twilio_webhook_names_the_missing_keys(
    migrated_db: str, redis_server_url: str
) -> None:
    settings_ = Settings(
        _env_file=None,
        DATABASE_URL=migrated_db,
        REDIS_URL=redis_server_url,
        HOST="127.0.0.1",
        PORT=free_port(),
        LOG_LEVEL="WARNING",
    )
    app = create_app(settings_)
    server = uvicorn.Server(uvicorn_config(app, settings_))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    import httpx

    with LogCapture() as logs:
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(60):
                while not server.started:
                    if task.done():
                        task.result()
                    await asyncio.sleep(0.05)
            base = f"http://127.0.0.1:{settings_.port}"
            form = {"CallSid": new_sid("CA"), "CallStatus": "completed"}
            async with httpx.AsyncClient(base_url=base) as http:
                for path in ("/twilio/voice", "/twilio/outbound", "/twilio/status"):
                    signed = {"X-Twilio-Signature": sign(base + path, form)}
                    response = await http.post(path, data=form, headers=signed)
                    assert response.status_code == 503, (path, response.text)
                    for name in ("OPENAI_API_KEY", "TWILIO_AUTH_TOKEN", "PUBLIC_BASE_URL"):
                        assert name in response.text
            async with connect(base.replace("http", "ws") + "/twilio/media") as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)
    logs.assert_clean()
    assert "calls disabled: missing" in logs.text


def test_secret_token_characters_are_random() -> None:
    """Two tokens for the same claims and second differ (the nonce), so each is single use."""
    claims = tw.StreamClaims(call_sid="CA" + secrets.token_hex(16))
    assert tw.make_stream_token(SETTINGS, claims, now=NOW) != tw.make_stream_token(
        SETTINGS, claims, now=NOW
    )

"""Offline end-to-end calls through the real server over real sockets.

Caller audio goes in as Twilio media-stream messages (8 kHz mu-law, paced in real time);
Deepgram, OpenAI and Twilio REST are local fakes reached through their configured URLs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis
from loguru import logger

from core import metrics
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from seeding import seed
from tests.fakes.audio import speech_ulaw
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI, call_tool, fail, say
from tests.fakes.twilio_media import TwilioMediaClient
from tests.harness import (
    AUTH_TOKEN,
    BOOKING_UTTERANCES,
    booking_script,
    last_tool_result,
    parse_stream_twiml,
    running_agent,
    sign,
)

REPO = Path(__file__).resolve().parents[1]

MARIA = "+15555550100"
PROFILE = load_profile(DEFAULT_PROFILE)


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


async def say_turn(
    client, seconds: float = 0.8, *, expect_reply: bool = True, min_reply_secs: float = 0.2
) -> float:
    """The caller speaks (the STT fake transcribes it from its script) and, by default,
    waits for the bot's whole reply. Returns the time the caller's last frame was sent."""
    end = await client.send_audio(speech_ulaw(seconds))
    if expect_reply:
        await client.wait_for_bot_audio(min_seconds=min_reply_secs, timeout=20, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
    return end


async def test_demo_customer_books_an_oil_change(crm_db: str, redis_server_url: str) -> None:
    llm = FakeOpenAI(booking_script())
    log_lines: list[str] = []
    sink = logger.add(log_lines.append, level="INFO", diagnose=False)
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(BOOKING_UTTERANCES)
        v2v_before = metrics.sample("voice_agent_voice_to_voice_seconds_count")
        booked_before = metrics.sample(
            "voice_agent_calls_total", {"direction": "inbound", "outcome": "booked"}
        )
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        for _ in range(3):
            await say_turn(client)
        await say_turn(client, expect_reply=False)
        await client.wait_closed(timeout=30)
        row = await agent.wait_for_call_row(client.call_sid)

        appointments = agent.query(
            "SELECT a.*, v.vin FROM appointments a JOIN vehicles v ON v.id = a.vehicle_id "
            "WHERE a.call_sid = %s",
            (client.call_sid,),
        )
        assert len(appointments) == 1
        booked = appointments[0]
        assert booked["customer_id"] == 1 and booked["vehicle_id"] == 1
        assert booked["service_codes"] == ["oil_change"] and booked["status"] == "scheduled"
        # The spoken confirmation carries the code of the row in the database.
        spoken = " ".join(agent.tts.texts)
        assert " ".join(booked["confirmation_code"]) in spoken
        assert "AI" in agent.tts.texts[0]  # the greeting discloses the AI assistant
        assert row["outcome"] == "booked"
        assert row["verified"] is True and row["customer_id"] == 1
        assert row["appointment_ids"] == [booked["id"]]
        # The bot hung up through Twilio REST when the conversation ended.
        updates = agent.call_updates(client.call_sid)
        assert updates and updates[-1].form.get("Status") == "completed"
        assert client.bot_audio_secs() > 1.0
        # Ops: a snapshot with the booked appointment and a TTL, no longer active.
        redis = aioredis.Redis.from_url(redis_server_url)
        try:
            prefix = agent.settings.redis_key_prefix
            ttl = await redis.ttl(f"{prefix}:call:{client.call_sid}")
            assert 0 < ttl <= 24 * 3600
            assert not await redis.sismember(f"{prefix}:calls:active", client.call_sid)
        finally:
            await redis.aclose()
        admin = {"Authorization": "Bearer e2e-admin"}
        assert (await agent.http.get(f"/calls/{client.call_sid}")).status_code == 401
        snapshot = (await agent.http.get(f"/calls/{client.call_sid}", headers=admin)).json()
        assert snapshot["appointment_ids"] == [booked["id"]]
        assert snapshot["verified_customer_id"] == 1
        # Metrics: one voice-to-voice observation per measured turn; the call counted.
        turns = row["turn_metrics"]
        assert len(turns) >= 3
        assert metrics.sample("voice_agent_voice_to_voice_seconds_count") == v2v_before + len(
            [t for t in turns if t.get("voice_to_voice_secs") is not None]
        )
        assert (
            metrics.sample("voice_agent_calls_total", {"direction": "inbound", "outcome": "booked"})
            == booked_before + 1
        )
        exposition = (await agent.http.get("/metrics")).text
        assert "voice_agent_voice_to_voice_seconds_bucket" in exposition
        # No PII in the log at the production level: number, name, DOB, VIN.
        logger.remove(sink)
        log_text = "".join(log_lines)
        assert "call " in log_text and "+1***" in log_text
        for secret in ("+15555550100", "5555550100", "Maria", "Garcia", "1985-04-12"):
            assert secret not in log_text, secret
        vin = agent.query("SELECT vin FROM vehicles WHERE id = 1")[0]["vin"]
        assert vin not in log_text and vin[-4:] + " " not in log_text
        # The call ends with a spoken goodbye before the hang-up.
        assert agent.tts.texts[-1].strip() == "Thank you for calling Riverside Motors. Goodbye!"


# --- shared helpers for the scenarios below --------------------------------------------

ALWAYS_OPEN_HOURS = "\n".join(
    f'{day} = ["00:00-24:00"]'
    for day in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
)


@pytest.fixture
def always_open_profile(tmp_path) -> str:
    """The example profile, open around the clock (transfers are possible whenever CI runs)."""
    text = DEFAULT_PROFILE.read_text()
    start = text.index("[hours]")
    end = text.index("[", start + len("[hours]"))
    text = text[:start] + "[hours]\n" + ALWAYS_OPEN_HOURS + "\n\n" + text[end:]
    text = text.replace(
        text[text.index("holidays = [") : text.index("]", text.index("holidays = [")) + 1],
        "holidays = []",
    )
    path = tmp_path / "always_open.toml"
    path.write_text(text)
    return str(path)


LONG_REPLY = (
    "Sure. Let me tell you a little about how our service department works before we start. "
    "We look at the brakes, the tires, the fluids and the battery on every visit, and we "
    "write down everything we find so you can decide what to do next. Does that sound good?"
)


def ws_url(agent) -> str:
    return agent.base_url.replace("http://", "ws://") + "/twilio/media"


async def test_barge_in_clears_twilio_and_keeps_only_what_was_played(
    crm_db: str, redis_server_url: str
) -> None:
    seen: dict[str, Any] = {}

    def after_interruption(body: dict[str, Any]):
        seen["messages"] = body["messages"]
        return say("Sure, a tire rotation.")

    llm = FakeOpenAI([say(LONG_REPLY), after_interruption])
    tts = FakeDeepgramTTS(secs_per_char=0.03)  # the long reply plays for about 8 s
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=tts
    ) as agent:
        agent.stt.script(
            [
                "I have a question about my car.",
                "Uh-huh.",
                "Wait, sorry, I need a tire rotation instead.",
            ]
        )
        interruptions_before = metrics.sample("voice_agent_interruptions_total")
        ignored_before = metrics.sample("voice_agent_backchannels_ignored_total")
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        end = await client.send_audio(speech_ulaw(0.8))
        await client.wait_for_bot_audio(min_seconds=1.0, timeout=20, since=end)

        # A backchannel while the bot talks: no clear, the bot keeps talking.
        backchannel_start = time.monotonic()
        await client.send_audio(speech_ulaw(0.4))
        await asyncio.sleep(1.0)
        assert [t for t in client.clears if t >= backchannel_start] == []
        assert time.monotonic() - (client.last_bot_audio_at() or 0) < 0.3

        # Real speech interrupts: Twilio is told to clear its buffer at once.
        speech_start = time.monotonic()
        sending = asyncio.create_task(client.send_audio(speech_ulaw(1.2)))
        clear_at = await client.wait_for_clear(since=speech_start, timeout=5)
        await sending
        barge_in_secs = clear_at - speech_start
        print(f"barge-in: caller speech start -> clear {barge_in_secs * 1000:.0f} ms")
        assert barge_in_secs < 1.5
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=20, since=clear_at + 0.2)

        # The context keeps only the sentences that were actually played.
        kept = [
            m["content"]
            for m in seen["messages"]
            if m["role"] == "assistant" and isinstance(m.get("content"), str)
        ][-1]
        assert kept and LONG_REPLY.startswith(kept.strip()[:40])
        assert "Does that sound good?" not in kept
        assert len(kept) < len(LONG_REPLY)
        assert metrics.sample("voice_agent_interruptions_total") >= interruptions_before + 1
        assert metrics.sample("voice_agent_backchannels_ignored_total") >= ignored_before + 1
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        bot_turns = [t for t in row["transcript"] if t["role"] == "bot"]
        assert any(t.get("interrupted") for t in bot_turns)


async def test_unsigned_webhooks_and_bad_stream_tokens_are_refused(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        form = {"CallSid": "CA" + "9" * 32, "From": MARIA, "To": "+15555550199"}
        assert (await agent.http.post("/twilio/voice", data=form)).status_code == 403
        bad = {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"}
        assert (await agent.http.post("/twilio/voice", data=form, headers=bad)).status_code == 403
        # Signed for another host (a replay against a different public URL).
        other = {"X-Twilio-Signature": sign("https://evil.example/twilio/voice", form)}
        response = await agent.http.post("/twilio/voice", data=form, headers=other)
        assert response.status_code == 403
        status = {"CallSid": form["CallSid"], "CallStatus": "completed"}
        assert (
            await agent.http.post("/twilio/status", data=status, headers=bad)
        ).status_code == 403

        # A valid token is bound to its CallSid; a made-up or missing one is refused.
        legit = await agent.inbound_call(MARIA, connect=False)
        token = legit.custom_parameters["token"]
        for params, sid in (
            ({"token": "nope", "caller": MARIA}, "CA" + "1" * 32),
            ({"token": token, "caller": MARIA}, "CA" + "2" * 32),  # someone else's token
            ({"caller": MARIA}, "CA" + "3" * 32),
        ):
            client = TwilioMediaClient(ws_url(agent), call_sid=sid, custom_parameters=params)
            await client.connect()
            assert await client.wait_closed(timeout=5) == 1008
            await client.close()
        assert agent.stt.connections == 0 and agent.llm.requests == []
        assert agent.query("SELECT count(*) AS n FROM calls")[0]["n"] == 0


async def test_llm_failure_mid_call_apologises_and_transfers(
    crm_db: str, redis_server_url: str, always_open_profile: str
) -> None:
    llm = FakeOpenAI([fail(500, times=3)])  # the SDK retries twice
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": always_open_profile},
    ) as agent:
        agent.stt.script(["I need to book a service."])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        end = await client.send_audio(speech_ulaw(0.8))
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=end)
        update = await wait_for_update(agent, client.call_sid)
        assert "<Dial " in update.form["Twiml"] and "+15555550142" in update.form["Twiml"]
        await client.hang_up()  # Twilio ends the stream once the call is redirected
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] in ("failed", "transferred")
        spoken = " ".join(agent.tts.texts)
        assert "trouble on my side" in spoken and "service advisor" in spoken
        # The advisor leg must not be hung up by the pipeline ending.
        assert agent.hang_ups(client.call_sid) == []


async def wait_for_update(agent, call_sid: str, timeout: float = 15.0):  # noqa: ASYNC109
    """The first REST update of ``call_sid`` that carries TwiML."""
    async with asyncio.timeout(timeout):
        while True:
            for request in agent.call_updates(call_sid):
                if "Twiml" in request.form:
                    return request
            await asyncio.sleep(0.05)


async def test_transfer_redirects_the_live_call_to_the_advisor(
    crm_db: str, redis_server_url: str, always_open_profile: str
) -> None:
    llm = FakeOpenAI([call_tool("transfer_to_advisor", {"reason": "caller asked for a person"})])
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": always_open_profile},
    ) as agent:
        agent.stt.script(["Can I talk to a real person please?"])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await client.send_audio(speech_ulaw(0.8))
        update = await wait_for_update(agent, client.call_sid)
        twiml = update.form["Twiml"]
        assert "<Dial" in twiml and "+15555550142" in twiml
        # The bot said its one sentence before the redirect.
        assert any("connect you with a service advisor" in t for t in agent.tts.texts)
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred"
        assert agent.hang_ups(client.call_sid) == []


async def test_outbound_call_command_posts_the_twilio_request(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        s = agent.settings
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": crm_db,
            "REDIS_URL": redis_server_url,
            "REDIS_KEY_PREFIX": s.redis_key_prefix,
            "TWILIO_ACCOUNT_SID": s.twilio_account_sid,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_PHONE_NUMBER": "+15555550199",
            "TWILIO_API_BASE_URL": agent.twilio.base_url,
            "PUBLIC_BASE_URL": "https://agent.example.com",
            "LOG_LEVEL": "WARNING",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "runner.py"),
            "call",
            "+15555550101",
            "--scenario",
            "confirmation",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        printed = json.loads(out.decode().strip().splitlines()[-1])
        [create] = agent.twilio.requests_to("POST", "/Calls.json")
        assert printed["call_sid"] == agent.twilio.created[0]
        assert printed["to"] != "+15555550101"  # masked
        form = create.form
        assert form["To"] == "+15555550101" and form["From"] == "+15555550199"
        assert form["Url"] == (
            "https://agent.example.com/twilio/outbound?scenario=confirmation&customer_id=2"
        )
        assert form["StatusCallback"] == "https://agent.example.com/twilio/status"
        # Asynchronous AMD: the voicemail is dropped after the beep (/twilio/amd).
        assert form["MachineDetection"] == "DetectMessageEnd" and form["AsyncAmd"] == "true"
        assert form["AsyncAmdStatusCallback"] == (
            "https://agent.example.com/twilio/amd?scenario=confirmation&customer_id=2"
        )
        assert "+15555550101" not in err.decode() + out.decode().replace(form["To"], "", 0)


async def test_answered_outbound_call_streams_to_the_bot_or_leaves_a_voicemail(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        path = "/twilio/outbound?scenario=confirmation&customer_id=2"
        human = {"CallSid": "CA" + "4" * 32, "To": "+15555550101", "AnsweredBy": "human"}
        response = await agent.post_signed(path, human)
        assert response.status_code == 200
        url, params = parse_stream_twiml(response.text)
        assert url == ws_url(agent)
        assert params["scenario"] == "confirmation" and params["customer_id"] == "2"
        assert params["direction"] == "outbound" and params["token"]

        machine = {
            "CallSid": "CA" + "5" * 32,
            "To": "+15555550101",
            "AnsweredBy": "machine_end_beep",
        }
        response = await agent.post_signed(path, machine)
        assert response.status_code == 200
        assert "<Say>" in response.text and "<Hangup/>" in response.text
        assert "5 5 5 5 5 5 0 1 9 9" in response.text  # the callback number, spoken
        row = agent.query("SELECT outcome FROM calls WHERE call_sid = %s", (machine["CallSid"],))
        assert row == [{"outcome": "voicemail"}]


def client_sockets(agent) -> dict[str, int]:
    """Established client connections from this process to each fake."""
    from urllib.parse import urlparse

    import psutil

    ports = {
        urlparse(url).port: name
        for name, url in (
            ("openai", agent.llm.base_url),
            ("twilio", agent.twilio.base_url),
            ("stt", agent.stt.url),
            ("tts", agent.tts.url),
        )
    }
    counts = dict.fromkeys(ports.values(), 0)
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port in ports and conn.status == "ESTABLISHED":
            counts[ports[conn.raddr.port]] += 1
    return counts


def _open_fds() -> int:
    import psutil

    return psutil.Process().num_fds()


async def test_twenty_calls_in_a_row_leave_nothing_behind(
    crm_db: str, redis_server_url: str, always_open_profile: str
) -> None:
    """Calls that end every way (hang-up mid-greeting, after a turn, LLM failure, bot
    goodbye) close every Deepgram socket, database connection and task they opened."""

    def respond(body: dict[str, Any]):
        said = next((m["content"] for m in reversed(body["messages"]) if m["role"] == "user"), "")
        if "broken" in said:
            return fail(500, retryable=False)  # one failed request, no SDK retries
        if "bye" in said:
            return call_tool("end_call", {"reason": "done"})
        return say("Okay, I can help with that.")

    llm = FakeOpenAI([respond] * 200)
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        tts=FakeDeepgramTTS(secs_per_char=0.004),
        env={"DEALERSHIP_PROFILE": always_open_profile},
    ) as agent:
        resources = agent.app.state.resources
        # One warm-up call, so lazily created process-wide things exist before counting.
        agent.stt.script(["Just warming up."])
        warm = await agent.inbound_call(MARIA)
        await warm.wait_for_bot_audio(min_seconds=0.2, timeout=20)
        await warm.wait_for_bot_silence(silence_secs=0.4, timeout=20)
        await say_turn(warm, min_reply_secs=0.05)
        await warm.close()
        await agent.wait_for_call_row(warm.call_sid)
        await asyncio.sleep(0.5)
        tasks_before = set(asyncio.all_tasks())
        fds_before = _open_fds()

        outcomes = []
        for i in range(20):
            kind = i % 4
            client = await agent.inbound_call(MARIA)
            await client.wait_for_bot_audio(min_seconds=0.2, timeout=20)
            if kind == 0:  # hangs up in the middle of the greeting, no stop message
                await client._ws.close()  # an abrupt disconnect
            elif kind == 1:  # one turn, then hangs up properly
                agent.stt.script(["I just wanted to check something."])
                await client.wait_for_bot_silence(silence_secs=0.4, timeout=20)
                await say_turn(client, min_reply_secs=0.05)  # a fast talker in this test
                await client.hang_up()
            elif kind == 2:  # the LLM fails mid-call: apology and transfer
                agent.stt.script(["This will be broken."])
                await client.wait_for_bot_silence(silence_secs=0.4, timeout=20)
                await client.send_audio(speech_ulaw(0.8))
                await wait_for_update(agent, client.call_sid)
                await client.hang_up()
            else:  # the bot says goodbye and hangs up itself
                agent.stt.script(["Okay, bye now."])
                await client.wait_for_bot_silence(silence_secs=0.4, timeout=20)
                await client.send_audio(speech_ulaw(0.8))
                await client.wait_closed(timeout=20)
            await client.close()
            outcomes.append((await agent.wait_for_call_row(client.call_sid))["outcome"])

        def new_tasks() -> list[str]:
            # psycopg's pool starts its own worker tasks once, when it first grows; the
            # fakes' own per-connection handlers are counted by client_sockets() instead.
            names = [
                getattr(t.get_coro(), "__qualname__", t.get_name())
                for t in asyncio.all_tasks() - tasks_before
                if not t.get_name().startswith("pool-") and t is not asyncio.current_task()
            ]
            return [n for n in names if n != "RequestHandler.start"]

        def state() -> dict[str, Any]:
            stats = resources.db.get_stats()
            return {
                "stt_open": agent.stt.open_connections,
                "tts_open": agent.tts.open_connections,
                "active_calls": len(agent.call_hooks.active or {}),
                "db_checked_out": stats.get("pool_size", 0) - stats.get("pool_available", 0),
                "extra_tasks": len(new_tasks()),
            }

        settled = dict.fromkeys(state(), 0)
        deadline = time.monotonic() + 15
        while state() != settled and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        assert state() == settled, (state(), new_tasks(), client_sockets(agent))
        assert _open_fds() <= fds_before + 5
        # The shared OpenAI client keeps at most its pooled connection; nothing per call.
        assert client_sockets(agent) == {"openai": 1, "twilio": 0, "stt": 0, "tts": 0}
        assert agent.stt.connections >= 21 and agent.tts.connections >= 21
        assert outcomes.count("transferred") + outcomes.count("failed") >= 5
        assert all(o is not None for o in outcomes)
        active = await resources.redis.smembers(
            f"{resources.settings.redis_key_prefix}:calls:active"
        )
        assert active == set()


async def test_silent_caller_is_prompted_once_then_the_call_ends(
    crm_db: str, redis_server_url: str
) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        from bot.pipeline import CallOptions

        agent.call_hooks.options_factory = lambda: CallOptions(user_idle_timeout=1.0)
        client = await agent.inbound_call(MARIA)
        await client.wait_closed(timeout=20)
        texts = [t.strip() for t in agent.tts.texts]
        assert texts[-2:] == [
            "Are you still there?",
            "I haven't heard anything, so I'll let you go. Please call back any time. Goodbye.",
        ]
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "abandoned"
        hang_up = agent.call_updates(client.call_sid)
        assert hang_up and hang_up[-1].form.get("Status") == "completed"


async def test_browser_client_page_is_served_with_the_admin_token(
    crm_db: str, redis_server_url: str
) -> None:
    env = {"WEBRTC_DEV": "true", "WEBRTC_DEV_FORCE": "true"}  # the harness sets PUBLIC_BASE_URL
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, env=env) as agent:
        refused = await agent.http.get("/client", follow_redirects=True)
        assert refused.status_code == 401
        response = await agent.http.get("/client?token=e2e-admin", follow_redirects=True)
        assert response.status_code == 200
        assert 'id="call-form"' in response.text
        # The running server lists the demo customers (first name, masked number).
        assert "Maria" in response.text and "+1***…0100" in response.text
        assert "+15555550100" not in response.text


async def test_status_callbacks_drive_campaign_retries(crm_db: str, redis_server_url: str) -> None:
    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        sid = "CA" + "6" * 32
        with psycopg.connect(crm_db, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO campaign_attempts (campaign, customer_id, local_date, reason, "
                "status, attempt_count, call_sid, dialed_at) VALUES ('service_due', 1, "
                "current_date, 'due by date', 'dialing', 1, %s, now())",
                (sid,),
            )
        form = {"CallSid": sid, "CallStatus": "no-answer", "SequenceNumber": "3"}
        for _ in range(2):  # Twilio retries callbacks: the second is a no-op
            response = await agent.post_signed("/twilio/status", form)
            assert response.status_code == 204
        [attempt] = agent.query(
            "SELECT status, outcome, next_attempt_at > now() AS later FROM campaign_attempts "
            "WHERE call_sid = %s",
            (sid,),
        )
        assert attempt == {"status": "retry_pending", "outcome": "no_answer", "later": True}
        events = agent.query(
            "SELECT count(*) AS n FROM call_status_events WHERE call_sid = %s", (sid,)
        )
        assert events == [{"n": 1}]


async def test_outbound_confirmation_call_confirms_the_appointment(
    crm_db: str, redis_server_url: str
) -> None:
    def confirm_first(body: dict[str, Any]):
        [appointment] = last_tool_result(body, "list_appointments")["appointments"]
        return call_tool("confirm_appointment", {"appointment_id": appointment["appointment_id"]})

    llm = FakeOpenAI(
        [
            say("Great. To make sure it's you, what's your date of birth?"),
            call_tool("verify_customer", {"date_of_birth": "1979-09-30"}),
            call_tool("list_appointments", {}),
            say("You have a tire rotation tomorrow morning. Will you make it?"),
            confirm_first,
            say("You're confirmed. See you then!"),
        ]
    )
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(
            ["Yes, this is James.", "September thirtieth, 1979.", "Yes, I'll be there."]
        )
        client = await agent.answered_outbound_call(
            to="+15555550101", scenario="confirmation", customer_id=2
        )
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        assert agent.tts.texts[0].startswith("Hi, this is the AI assistant from Riverside Motors")
        assert "James" in agent.tts.texts[0]
        for _ in range(3):
            await say_turn(client)
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["direction"] == "outbound" and row["scenario"] == "confirmation"
        assert row["outcome"] == "confirmed"
        [appointment] = agent.query(
            "SELECT status, confirmed_at IS NOT NULL AS confirmed FROM appointments "
            "WHERE customer_id = 2"
        )
        assert appointment == {"status": "confirmed", "confirmed": True}
        # The outbound prompt was used.
        system = agent.llm.requests[0]["messages"][0]
        assert system["role"] == "system" and "confirm" in system["content"].lower()


async def test_stop_calling_me_sets_do_not_call(crm_db: str, redis_server_url: str) -> None:
    llm = FakeOpenAI([call_tool("opt_out", {})])
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["Please stop calling me."])
        client = await agent.answered_outbound_call(
            to="+15555550100", scenario="service_due", customer_id=1
        )
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await client.send_audio(speech_ulaw(0.8))
        await client.wait_closed(timeout=20)
        assert (
            agent.tts.texts[-1].strip() == "Understood. We won't call you again. Have a good day."
        )
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "opted_out"
        assert agent.query("SELECT do_not_call, call_consent FROM customers WHERE id = 1") == [
            {"do_not_call": True, "call_consent": False}
        ]


def recorded_word_ulaw() -> bytes:
    """A real recorded word (the one speech recording shipped inside pipecat), as 8 kHz
    mu-law phone audio."""
    import wave

    import numpy as np
    import pipecat

    from tests.fakes.audio import pcm16_to_ulaw

    path = Path(pipecat.__file__).parent / "services" / "aws" / "nova_sonic" / "ready.wav"
    with wave.open(str(path)) as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).astype(np.int32)
    phone = ((pcm[0::2][: len(pcm) // 2] + pcm[1::2][: len(pcm) // 2]) // 2).astype(np.int16)
    return pcm16_to_ulaw(phone.tobytes())


async def test_recorded_speech_gets_a_reply_without_dead_air(
    crm_db: str, redis_server_url: str
) -> None:
    """Smart-turn on real recorded speech: complete or not, the bot answers within the
    phone-tuned wait (1.2 s), never the stock 3 s."""
    llm = FakeOpenAI([say("Great, let's get started.")])
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script(["Ready."])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        end = await client.send_audio(recorded_word_ulaw())
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=10, since=end)
        reply_after = client.first_bot_audio_after(end) - end
        print(f"recorded word: bot audio {reply_after * 1000:.0f} ms after the caller's last frame")
        assert reply_after < 2.0
        await client.hang_up()


async def test_speech_recognition_dropping_mid_call_apologises_and_transfers(
    crm_db: str, redis_server_url: str, always_open_profile: str
) -> None:
    llm = FakeOpenAI([say("Sure, I can help with that.")])
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": always_open_profile},
    ) as agent:
        agent.stt.script(["Hello, I have a question."])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await say_turn(client)
        for session in list(agent.stt._sessions):  # Deepgram drops the socket
            await session.ws.close(code=1011)
        update = await wait_for_update(agent, client.call_sid)
        assert "+15555550142" in update.form["Twiml"]
        spoken = [t.strip() for t in agent.tts.texts]
        apology = spoken.index("I'm sorry, I'm having trouble on my side right now.")
        transfer = next(i for i, t in enumerate(spoken) if "connect you with a service" in t)
        assert apology < transfer
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred"


async def test_failure_after_hours_takes_a_callback_request_and_ends(
    crm_db: str, redis_server_url: str, tmp_path
) -> None:
    from datetime import timedelta

    today = datetime.now(PROFILE.time_zone).date()
    holidays = ", ".join(f'"{today + timedelta(days=d)}"' for d in (-1, 0, 1))
    text = DEFAULT_PROFILE.read_text()
    start = text.index("holidays = [")
    end = text.index("]", start) + 1
    closed = tmp_path / "closed.toml"  # the service department is closed today
    closed.write_text(text[:start] + f"holidays = [{holidays}]" + text[end:])
    llm = FakeOpenAI([fail(500, retryable=False)])
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": str(closed)},
    ) as agent:
        agent.stt.script(["I need to book a service."])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await client.send_audio(speech_ulaw(0.8))
        await client.wait_closed(timeout=20)  # the bot apologises and hangs up
        assert "asked one to call you back" in agent.tts.texts[-1]
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "callback_requested"
        requests = agent.query(
            "SELECT customer_id, reason FROM callback_requests WHERE call_sid = %s",
            (client.call_sid,),
        )
        assert requests == [{"customer_id": 1, "reason": "service failure during call"}]


async def test_oversized_media_messages_are_refused(crm_db: str, redis_server_url: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with running_agent(database_url=crm_db, redis_url=redis_server_url) as agent:
        async with connect(ws_url(agent), max_size=2**22) as ws:
            await ws.send(json.dumps({"event": "connected", "padding": "x" * 20_000}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert agent.stt.connections == 0


async def test_audio_frames_stop_where_nobody_needs_them(
    crm_db: str, redis_server_url: str
) -> None:
    """The caller's audio reaches the VAD (the user aggregator) and stops there; the bot's
    reaches Twilio and stops behind the output transport. Every hop past those was a
    queue, a task switch and an event per observer, for nothing."""
    from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
    from pipecat.observers.base_observer import BaseObserver, FrameProcessed

    from bot.pipeline import CallOptions

    class AudioRoute(BaseObserver):
        def __init__(self) -> None:
            super().__init__()
            self.caller: set[str] = set()
            self.bot: set[str] = set()

        async def on_process_frame(self, data: FrameProcessed) -> None:
            name = data.processor.name.split("#")[0]
            if isinstance(data.frame, InputAudioRawFrame):
                self.caller.add(name)
            elif isinstance(data.frame, OutputAudioRawFrame):
                self.bot.add(name)

    route = AudioRoute()
    llm = FakeOpenAI([say("Great, let's get started.")])
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.call_hooks.options_factory = lambda: CallOptions(observers=[route])
        agent.stt.script(["I'd like to book a service."])
        client = await agent.inbound_call(MARIA)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await say_turn(client)  # the VAD heard the caller: the bot replied
        await client.hang_up()
    assert "LLMUserAggregator" in route.caller and "CallerAudioStop" in route.caller
    assert not route.caller & {"OpenAILLMService", "DeepgramTTSService", "BotAudioStop"}
    assert "BotAudioStop" in route.bot and client.bot_audio_secs() > 1.0
    assert not route.bot & {"SessionSnapshotProcessor", "LLMAssistantAggregator"}

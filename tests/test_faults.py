"""Injected faults, end to end: what the caller hears and how the call ends.

Every test places a real call through the server (tests/harness.py) with one fault
injected through the fakes (Deepgram, OpenAI, Twilio REST) or a TCP proxy cut in front of
Postgres or Redis (tests/fakes/tcp_proxy.py), and asserts on what a caller and the
dealership see: the bot audio the phone received (and when), the sentences the TTS was
asked to speak, Twilio REST requests (``<Dial>``, ``<Say>``, hang-up), the ``calls`` row
and ``callback_requests``.

The rule checked: the caller hears words within 2 s of the fault, and the call ends in a
transfer, a callback request or a goodbye. Each test adds a row to a fault table printed at
the end of the module (run with ``-s``) and merged into ``benchmarks/results/faults.json``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from bot.failures import (
    APOLOGY,
    CALL_BACK_AFTER_HOURS,
    CALLBACK_AFTER_HOURS,
    OUTBOUND_CALL_AGAIN,
    TRANSFER_FAILED_CALLBACK,
)
from bot.i18n import text as sentence
from core import metrics
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from processors.dead_air import HOLD_PHRASE
from seeding import seed
from tests.fakes.audio import speech_ulaw
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI, call_tool, fail, say, stall
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.twilio_media import TwilioMediaClient
from tests.harness import Agent, running_agent

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "faults.json"
PROFILE = load_profile(DEFAULT_PROFILE)
MARIA = "+15555550100"
ADVISOR = "+15555550142"
ADMIN = {"Authorization": "Bearer e2e-admin"}
#: The rule: words within this many seconds of the fault.
WORDS_WITHIN_SECS = 2.0
#: Cloud-like service latencies, so the figures are not those of instant fakes.
TTS_FIRST_BYTE_SECS = 0.25
LLM_FIRST_TOKEN_SECS = 0.3


def cloud_tts() -> FakeDeepgramTTS:
    """A TTS fake with Deepgram-like time to first byte."""
    return FakeDeepgramTTS(secs_per_char=0.01, first_byte_delay=TTS_FIRST_BYTE_SECS)


def cloud_llm(script: list[Any]) -> FakeOpenAI:
    """An LLM fake with OpenAI-like time to first token."""
    return FakeOpenAI(script, first_token_delay=LLM_FIRST_TOKEN_SECS)


# --- the fault table ---------------------------------------------------------------------


@dataclass
class FaultRow:
    """One line of the fault table."""

    fault: str
    first_words_secs: float
    first_words: str
    ended: str
    outcome: str


TABLE: list[FaultRow] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    """Print the table after the module and merge it into benchmarks/results/faults.json."""
    yield
    if not TABLE:
        return
    rows = {}
    if RESULTS.exists():
        try:
            rows = {r["fault"]: r for r in json.loads(RESULTS.read_text())["faults"]}
        except (ValueError, KeyError, TypeError):
            rows = {}
    for row in TABLE:
        rows[row.fault] = asdict(row) | {
            "measured_at": datetime.now().isoformat(timespec="seconds")
        }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"faults": list(rows.values())}, indent=2) + "\n")
    width = max(len(r.fault) for r in TABLE)
    print(f"\n{'fault':<{width}}  first words  how the call ended (outcome)")
    for r in TABLE:
        print(f"{r.fault:<{width}}  {r.first_words_secs:9.2f} s  {r.ended} ({r.outcome})")
        print(f"{'':<{width}}    heard: {r.first_words}")


def record(
    fault: str, *, first_words_secs: float, first_words: str, ended: str, outcome: str
) -> None:
    """Add a row to the fault table and check the 2 s rule."""
    TABLE.append(FaultRow(fault, round(first_words_secs, 3), first_words, ended, outcome))
    assert first_words_secs < WORDS_WITHIN_SECS, (fault, first_words_secs)


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


def _profile_with(tmp_path: Path, name: str, *, hours: str | None, holidays: str) -> str:
    text = DEFAULT_PROFILE.read_text()
    if hours is not None:
        start = text.index("[hours]")
        end = text.index("[", start + len("[hours]"))
        text = text[:start] + "[hours]\n" + hours + "\n\n" + text[end:]
    start = text.index("holidays = [")
    end = text.index("]", start) + 1
    text = text[:start] + f"holidays = [{holidays}]" + text[end:]
    # The post-call summary is the template here: these tests count the LLM's requests.
    text = text.replace("llm_summary = true", "llm_summary = false")
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def open_profile(tmp_path: Path) -> str:
    """The example profile, open around the clock (transfers possible whenever CI runs)."""
    days = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    hours = "\n".join(f'{day} = ["00:00-24:00"]' for day in days)
    return _profile_with(tmp_path, "open.toml", hours=hours, holidays="")


@pytest.fixture
def closed_profile(tmp_path: Path) -> str:
    """The example profile, closed today (yesterday to tomorrow are holidays)."""
    today = datetime.now(PROFILE.time_zone).date()
    holidays = ", ".join(f'"{today + timedelta(days=d)}"' for d in (-1, 0, 1))
    return _profile_with(tmp_path, "closed.toml", hours=None, holidays=holidays)


@pytest.fixture
async def db_proxy(crm_db: str) -> AsyncIterator[TcpProxy]:
    """A cuttable proxy in front of the test's Postgres."""
    async with TcpProxy.for_postgres_url(crm_db) as proxy:
        yield proxy


@pytest.fixture
async def redis_proxy(redis_server_url: str) -> AsyncIterator[TcpProxy]:
    """A cuttable proxy in front of the test session's Redis."""
    async with TcpProxy.for_redis_url(redis_server_url) as proxy:
        yield proxy


# --- helpers -----------------------------------------------------------------------------


async def greeted(agent: Agent, caller: str = MARIA) -> TwilioMediaClient:
    """An inbound call whose greeting has been played."""
    client = await agent.inbound_call(caller)
    await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
    await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
    return client


async def speak(client: TwilioMediaClient, seconds: float = 0.8) -> float:
    """The caller says one (scripted) utterance; returns the time of its last frame."""
    return await client.send_audio(speech_ulaw(seconds))


async def first_words_after(client: TwilioMediaClient, t: float, timeout: float = 15) -> float:  # noqa: ASYNC109
    """Arrival time of the first voiced bot audio after ``t`` (the bot was silent at ``t``)."""
    return await client.wait_for_bot_audio(min_seconds=0.1, timeout=timeout, since=t)


def texts_since(agent: Agent, index: int, *, hold: bool = True) -> list[str]:
    """Sentences the TTS was asked to speak after the first ``index`` ones.

    Args:
        agent: The agent.
        index: How many sentences to skip.
        hold: Keep the dead-air hold phrase (said when a turn's answer is slow).
    """
    texts = [t.strip() for t in agent.tts.texts[index:] if t.strip()]
    return texts if hold else [t for t in texts if t != HOLD_PHRASE]


async def wait_for_twiml(agent: Agent, call_sid: str, timeout: float = 15) -> tuple[Any, float]:  # noqa: ASYNC109
    """The first REST update of the call carrying TwiML, and when it arrived."""
    async with asyncio.timeout(timeout):
        while True:
            for request, at in zip(agent.twilio.requests, agent.twilio.request_times, strict=True):
                if request.path.endswith(f"/Calls/{call_sid}.json") and "Twiml" in request.form:
                    return request, at
            await asyncio.sleep(0.02)


def dials_advisor(twiml: str) -> bool:
    """Whether TwiML dials the advisor line: a cold ``<Dial>`` or the warm transfer's
    ``<Dial action=...><Number url=...>`` (with its hold message)."""
    return "<Dial" in twiml and ADVISOR in twiml


async def wait_until_true(predicate: Any, timeout: float) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` until it holds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def callback_requests(agent: Agent, call_sid: str) -> list[dict[str, Any]]:
    """The call's callback requests."""
    return agent.query(
        "SELECT customer_id, phone, reason, status FROM callback_requests WHERE call_sid = %s",
        (call_sid,),
    )


# --- 1. speech recognition drops -----------------------------------------------------------


async def test_stt_socket_drop(crm_db: str, redis_server_url: str, open_profile: str) -> None:
    llm = cloud_llm([say("Sure, I can help with that.")])
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["Hello, I have a question."])
        client = await greeted(agent)
        await speak(client)
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        spoken = len(agent.tts.texts)
        # A prompt answer needs no "One moment, please."
        assert [t.strip() for t in agent.tts.texts[1:]] == ["Sure, I can help with that."]
        fault_at = time.monotonic()
        assert await agent.stt.drop() == 1  # Deepgram closes the socket (1011)
        heard_at = await first_words_after(client, fault_at)
        update, _ = await wait_for_twiml(agent, client.call_sid)
        assert dials_advisor(update.form["Twiml"])
        said = texts_since(agent, spoken)
        assert said[0] == APOLOGY and "connect you with a service advisor" in said[1]
        await client.hang_up()  # Twilio ends the stream once the call is redirected
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred"
        assert "speech recognition failed" in row["summary"]
        assert agent.hang_ups(client.call_sid) == []
        record(
            "STT socket drop",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="apology, transfer <Dial>",
            outcome=row["outcome"],
        )


# --- 2. speech synthesis drops -------------------------------------------------------------

LONG_ANSWER = (
    "Sure, I can help with that. Our service department looks at the brakes, the tires, "
    "the fluids and the battery on every visit, and we write down everything we find."
)


async def test_tts_socket_drop_mid_sentence_reconnects_and_apologises(
    crm_db: str, redis_server_url: str, open_profile: str
) -> None:
    """Deepgram closes the speak socket in the middle of a sentence and takes the next
    connection: Pipecat reconnects at once, so our own voice apologises and transfers."""
    llm = cloud_llm([say(LONG_ANSWER)])
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["Hello, I have a question."])
        client = await greeted(agent)
        agent.tts.drop_mid_utterance(after_secs=0.4)
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.tts.dropped_at), timeout=20)
        fault_at = agent.tts.dropped_at[0]
        update, _ = await wait_for_twiml(agent, client.call_sid)
        assert dials_advisor(update.form["Twiml"])
        said = texts_since(agent, spoken)
        apology = said.index(APOLOGY)
        assert "connect you with a service advisor" in said[apology + 1]
        # The apology's audio: the first chunk the fake sent for a Flush after the drop.
        apology_sent = next(t for t in agent.tts.first_audio_sent_at if t > fault_at)
        heard_at = client.first_bot_audio_after(apology_sent)
        assert heard_at is not None
        assert client.bot_audio_secs(since=apology_sent) > 0.5  # the sentences were played
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred"
        assert "speech synthesis failed" in row["summary"]
        record(
            "TTS socket drop mid-sentence (reconnects)",
            first_words_secs=heard_at - fault_at,
            first_words=APOLOGY,
            ended="apology in our voice, transfer <Dial>",
            outcome=row["outcome"],
        )


@pytest.mark.parametrize("hours", ["open", "closed"])
async def test_tts_down_twilio_says_the_apology(
    crm_db: str, redis_server_url: str, open_profile: str, closed_profile: str, hours: str
) -> None:
    """Deepgram drops the speak socket mid-sentence and refuses to reconnect: our voice is
    gone, so the live call is redirected to TwiML where Twilio's <Say> apologises, then
    <Dial>s the advisor (open) or hangs up after taking a callback request (closed)."""
    llm = cloud_llm([say(LONG_ANSWER)])
    profile = open_profile if hours == "open" else closed_profile
    env = {"DEALERSHIP_PROFILE": profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["Hello, I have a question."])
        client = await greeted(agent)
        agent.tts.drop_mid_utterance(after_secs=0.4, refuse=True)
        await speak(client)
        await wait_until_true(lambda: bool(agent.tts.dropped_at), timeout=20)
        fault_at = agent.tts.dropped_at[0]
        update, said_at = await wait_for_twiml(agent, client.call_sid)
        twiml = update.form["Twiml"]
        assert twiml.index("<Say>") < twiml.index("</Say>")
        assert "<Say>I'm sorry, I'm having trouble on my side right now" in twiml
        if hours == "open":
            assert twiml.endswith(f"<Dial>{ADVISOR}</Dial></Response>")
        else:
            assert "call you back when we open" in twiml and twiml.endswith("<Hangup/></Response>")
        assert agent.tts.refused >= 1
        # Twilio now owns the call: the stream ends, and nobody hangs the call up on it.
        await client.wait_closed(timeout=15)
        row = await agent.wait_for_call_row(client.call_sid)
        assert agent.hang_ups(client.call_sid) == []
        assert "sentence said by Twilio" in row["summary"]
        if hours == "open":
            assert row["outcome"] == "transferred"
            ended = "Twilio <Say> apology, <Dial>"
        else:
            assert row["outcome"] == "callback_requested"
            assert callback_requests(agent, client.call_sid) == [
                {
                    "customer_id": 1,
                    "phone": MARIA,
                    "reason": "service failure during call",
                    "status": "open",
                }
            ]
            ended = "Twilio <Say> apology + callback request, <Hangup/>"
        record(
            f"TTS down (drop + refused), {hours}",
            first_words_secs=said_at - fault_at,
            first_words="(Twilio <Say>) " + APOLOGY,
            ended=ended,
            outcome=row["outcome"],
        )


# --- 3-5. the LLM fails ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "step", "requests"),
    [
        ("LLM 500 (x2: one quick retry)", fail(500, times=2), 2),
        ("LLM 429 with Retry-After: 20", fail(429, "Rate limit reached", retry_after=20), 1),
    ],
)
async def test_llm_error_apologises_and_transfers(
    crm_db: str,
    redis_server_url: str,
    open_profile: str,
    fault: str,
    step: Any,
    requests: int,
) -> None:
    llm = cloud_llm([step])
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["I need to book a service."])
        client = await greeted(agent)
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]  # the API fails the turn's request
        heard_at = await first_words_after(client, fault_at)
        update, _ = await wait_for_twiml(agent, client.call_sid)
        assert dials_advisor(update.form["Twiml"])
        said = texts_since(agent, spoken)
        assert said[0] == APOLOGY and "connect you with a service advisor" in said[1]
        # 500: one quick retry, then give up; 429: no retry (Retry-After is too long).
        assert len(agent.llm.requests) == requests
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred" and "llm failed" in row["summary"]
        record(
            fault,
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="apology, transfer <Dial>",
            outcome=row["outcome"],
        )


async def test_llm_stall_holds_then_apologises_and_transfers(
    crm_db: str, redis_server_url: str, open_profile: str
) -> None:
    """The API accepts the request and never sends a token: "One moment, please." after
    DEAD_AIR_HOLD_SECS (1.2 s), the apology and transfer at LLM_TIMEOUT_SECS (5 s)."""
    llm = cloud_llm([stall(60)])
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        assert agent.settings.llm_timeout_secs == 5.0  # the default
        agent.stt.script(["I need to book a service."])
        client = await greeted(agent)
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]
        heard_at = await first_words_after(client, fault_at)
        update, _ = await wait_for_twiml(agent, client.call_sid, timeout=20)
        timed_out_after = agent.llm.request_times[0]
        assert dials_advisor(update.form["Twiml"])
        said = texts_since(agent, spoken)
        assert said[0] == HOLD_PHRASE
        assert said[1] == APOLOGY and "connect you with a service advisor" in said[2]
        await wait_until_true(lambda: agent.llm.disconnects >= 1, timeout=5)  # abandoned
        assert len(agent.llm.requests) == 1
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred" and "llm failed" in row["summary"]
        assert timed_out_after
        record(
            "LLM stall (no token; 5 s deadline)",
            first_words_secs=heard_at - fault_at,
            first_words=said[0] + " ... " + said[1],
            ended="hold phrase, apology at 5 s, transfer <Dial>",
            outcome=row["outcome"],
        )


# --- 6. Redis down -----------------------------------------------------------------------------


async def test_redis_down_at_call_start_the_call_goes_on(
    crm_db: str, redis_proxy: TcpProxy, open_profile: str
) -> None:
    """Redis holds only snapshots and verification counters: with Redis down from the
    start the caller is greeted at once and the call runs to its goodbye."""
    llm = cloud_llm(
        [say("We're open every day. Anything else?"), call_tool("end_call", {"reason": "done"})]
    )
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_proxy.redis_url(),
        llm=llm,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        agent.stt.script(["When are you open?", "No, that's all, bye."])
        failures_before = metrics.sample("voice_agent_snapshot_failures_total")
        await redis_proxy.cut("refuse")
        fault_at = time.monotonic()
        client = await agent.inbound_call(MARIA)
        heard_at = await first_words_after(client, fault_at)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        end = await speak(client)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await speak(client)
        await client.wait_closed(timeout=20)  # the bot said goodbye and hung up
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "info"
        assert agent.tts.texts[0].startswith("Hi Maria, thanks for calling")
        assert agent.tts.texts[-1].strip() == "Thank you for calling Riverside Motors. Goodbye!"
        assert agent.hang_ups(client.call_sid)
        assert metrics.sample("voice_agent_snapshot_failures_total") > failures_before
        await redis_proxy.restore()
        await wait_until_not_active(agent, client.call_sid, snapshot=False)
        record(
            "Redis down at call start",
            first_words_secs=heard_at - fault_at,
            first_words=agent.tts.texts[0].strip(),
            ended="normal call, goodbye, hang-up",
            outcome=row["outcome"],
        )


async def wait_until_not_active(agent: Agent, call_sid: str, *, snapshot: bool = True) -> None:
    """Wait until the ended call is out of Redis's set of active calls (and, when it has a
    snapshot, until the snapshot says it finished)."""
    redis = agent.app.state.resources.redis
    async with asyncio.timeout(15):
        active = f"{agent.settings.redis_key_prefix}:calls:active"
        while await redis.sismember(active, call_sid):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    if snapshot:
        found = (await agent.http.get(f"/calls/{call_sid}", headers=ADMIN)).json()
        assert found["finished"] is True


def say_tool_sentence(name: str) -> Any:
    """An LLM step that speaks the ``say`` of the latest ``name`` tool result."""
    from tests.harness import last_tool_result

    return lambda body: say(last_tool_result(body, name)["say"])


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
async def test_redis_down_mid_call_verification_still_works(
    crm_db: str, redis_proxy: TcpProxy, open_profile: str, mode: str
) -> None:
    """Redis goes away mid-call: verification needs only Postgres (the lockout is counted
    there), so the caller is verified and the call goes on to a goodbye. Only snapshots
    are lost while Redis is away; the call leaves the active set once Redis is back."""
    llm = cloud_llm(
        [
            call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
            say("Thanks, Maria, you're verified. What can I do for you?"),
            call_tool("end_call", {"reason": "caller is done"}),
        ]
    )
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_proxy.redis_url(),
        llm=llm,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        agent.stt.script(["My date of birth is April twelfth, 1985.", "That's all, thanks."])
        client = await greeted(agent)
        await redis_proxy.cut(mode)  # type: ignore[arg-type]
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]  # the first turn after Redis went away
        heard_at = await first_words_after(client, fault_at)
        await wait_until_true(lambda: len(agent.llm.requests) >= 2, timeout=20)
        answered = agent.llm.request_times[1]  # with the tool's result
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=answered)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        said = texts_since(agent, spoken)
        assert "Thanks, Maria, you're verified. What can I do for you?" in " ".join(said)
        await speak(client)
        row = await agent.wait_for_call_row(client.call_sid, timeout=30)
        assert row["verified"] is True
        assert agent.hang_ups(client.call_sid)
        await redis_proxy.restore()
        await wait_until_not_active(agent, client.call_sid)
        record(
            f"Redis down mid-call ({mode}), verification",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="verified from Postgres, goodbye, hang-up",
            outcome=row["outcome"],
        )


# --- 7. Postgres down when the call starts ------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "hours", "direction"),
    [
        ("refuse", "open", "inbound"),
        ("refuse", "closed", "inbound"),
        ("blackhole", "open", "inbound"),
        ("refuse", "open", "outbound"),
    ],
)
async def test_postgres_down_at_call_start(
    crm_db: str,
    db_proxy: TcpProxy,
    redis_server_url: str,
    open_profile: str,
    closed_profile: str,
    mode: str,
    hours: str,
    direction: str,
) -> None:
    """No CRM: the caller hears an apology and is transferred (open) or told an advisor
    will call back (closed); the call's row (and callback request) is written once
    Postgres is back."""
    env = {"DEALERSHIP_PROFILE": open_profile if hours == "open" else closed_profile}
    async with running_agent(
        database_url=db_proxy.postgres_url(crm_db),
        observe_database_url=crm_db,
        redis_url=redis_server_url,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        await db_proxy.cut(mode)  # type: ignore[arg-type]
        fault_at = time.monotonic()
        if direction == "inbound":
            client = await agent.inbound_call(MARIA)
        else:  # a campaign call answered by Maria: the customer preload fails too
            client = await agent.answered_outbound_call(
                to=MARIA, scenario="service_due", customer_id=1
            )
        heard_at = await first_words_after(client, fault_at)
        hello = "Thanks for calling Riverside Motors service. "
        if direction == "outbound":
            await client.wait_closed(timeout=20)
            said = [t.strip() for t in agent.tts.texts]
            assert " ".join(said) == (
                "Hi, this is the AI assistant from Riverside Motors service. " + OUTBOUND_CALL_AGAIN
            )
            assert agent.hang_ups(client.call_sid)
            ended = "apology, 'we'll call you another time', hang-up"
        elif hours == "open":
            update, _ = await wait_for_twiml(agent, client.call_sid)
            assert dials_advisor(update.form["Twiml"])
            said = [t.strip() for t in agent.tts.texts]
            assert " ".join(said).startswith(hello + APOLOGY)
            assert "connect you with a service advisor" in said[-1]
            await client.hang_up()
            ended = "apology, transfer <Dial>"
        else:
            await client.wait_closed(timeout=20)
            said = [t.strip() for t in agent.tts.texts]
            assert " ".join(said) == hello + CALLBACK_AFTER_HOURS
            assert agent.hang_ups(client.call_sid)
            ended = "apology + callback request (written later), goodbye, hang-up"
        assert agent.llm.requests == []
        await asyncio.sleep(0.5)
        assert agent.query("SELECT * FROM calls WHERE call_sid = %s", (client.call_sid,)) == []
        await db_proxy.restore()
        row = await agent.wait_for_call_row(client.call_sid, timeout=15)
        assert "database unreachable at call start" in row["summary"]
        assert row["started_at"] <= row["ended_at"]
        if direction == "outbound":
            assert row["outcome"] == "failed"
        elif hours == "open":
            assert row["outcome"] == "transferred"
        else:
            assert row["outcome"] == "callback_requested"
            assert callback_requests(agent, client.call_sid) == [
                {
                    "customer_id": None,
                    "phone": MARIA,
                    "reason": "database unreachable when the call started",
                    "status": "open",
                }
            ]
        assert agent.app.state.resources.pending.pending == 0
        assert row["direction"] == direction
        record(
            f"Postgres down at call start ({mode}), {hours}, {direction}",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended=ended,
            outcome=row["outcome"],
        )


async def test_calls_work_right_after_postgres_comes_back(
    crm_db: str, db_proxy: TcpProxy, redis_server_url: str, open_profile: str
) -> None:
    """An outage of several seconds with calls arriving, then Postgres returns: the very
    next call is a normal call (greeting, CRM), not another apology. psycopg_pool's
    defaults took 10 to 18 s to reconnect after such an outage."""
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=db_proxy.postgres_url(crm_db),
        observe_database_url=crm_db,
        redis_url=redis_server_url,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        await db_proxy.cut("refuse")
        outage_start = time.monotonic()
        during = await agent.inbound_call(MARIA)
        await wait_for_twiml(agent, during.call_sid)
        await during.hang_up()
        await asyncio.sleep(max(0.0, 8.0 - (time.monotonic() - outage_start)))
        await db_proxy.restore()
        restored_at = time.monotonic()
        after = await agent.inbound_call(MARIA)
        heard_at = await first_words_after(after, restored_at)
        await after.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        greeting = agent.tts.texts[-1].strip()
        assert greeting.startswith("Hi Maria, thanks for calling Riverside Motors service.")
        rows = agent.query("SELECT ended_at FROM calls WHERE call_sid = %s", (after.call_sid,))
        assert rows and rows[0]["ended_at"] is None  # started, recorded, still going
        await after.hang_up()
        for sid in (during.call_sid, after.call_sid):
            await agent.wait_for_call_row(sid)
        record(
            "Postgres back after an 8 s outage: next call",
            first_words_secs=heard_at - restored_at,
            first_words=greeting,
            ended="normal call (CRM found the caller)",
            outcome="(normal)",
        )


# --- 8. Postgres down mid-call --------------------------------------------------------------


async def test_postgres_down_mid_call_tool_offers_transfer(
    crm_db: str, db_proxy: TcpProxy, redis_server_url: str, open_profile: str
) -> None:
    llm = cloud_llm(
        [
            call_tool("check_availability", {"service_type": "oil_change"}),
            say_tool_sentence("check_availability"),
            call_tool("transfer_to_advisor", {"reason": "system trouble"}),
        ]
    )
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=db_proxy.postgres_url(crm_db),
        observe_database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        agent.stt.script(["When can I bring my car in for an oil change?", "Yes, please."])
        client = await greeted(agent)
        await db_proxy.cut("refuse")
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]  # the tool call hits the dead database next
        heard_at = await first_words_after(client, fault_at)
        # "Let me check." as the tool starts (the database is slow to fail), then the
        # tool's sentence once it has given up.
        await wait_until_true(
            lambda: any("service advisor" in t for t in agent.tts.texts[spoken:]), timeout=20
        )
        await client.wait_for_bot_audio(min_seconds=0.1, since=agent.tts.spoken_at[-1])
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        said = texts_since(agent, spoken)
        assert said[0] == sentence("tool_ack", "en")
        assert " ".join(said[-2:]) == (
            "I'm sorry, something went wrong on my side. I can transfer you to a service advisor."
        )
        await speak(client)
        update, _ = await wait_for_twiml(agent, client.call_sid)
        assert dials_advisor(update.form["Twiml"])
        await client.hang_up()
        await asyncio.sleep(0.5)
        await db_proxy.restore()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "transferred"
        record(
            "Postgres down mid-call (tool), open",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="sentence offering transfer, transfer <Dial>; row written when back",
            outcome=row["outcome"],
        )


async def test_postgres_down_after_hours_callback_request_waits_for_the_database(
    crm_db: str, db_proxy: TcpProxy, redis_server_url: str, closed_profile: str
) -> None:
    """After hours, the caller asks for a person while Postgres is down: the callback
    request is queued, the caller is told so, and it lands once Postgres is back."""
    llm = cloud_llm(
        [
            call_tool("transfer_to_advisor", {"reason": "wants a person"}),
            say_tool_sentence("transfer_to_advisor"),
            call_tool("end_call", {"reason": "done"}),
        ]
    )
    env = {"DEALERSHIP_PROFILE": closed_profile}
    async with running_agent(
        database_url=db_proxy.postgres_url(crm_db),
        observe_database_url=crm_db,
        redis_url=redis_server_url,
        llm=llm,
        tts=cloud_tts(),
        env=env,
    ) as agent:
        agent.stt.script(["Can I talk to a person?", "No, that's all."])
        client = await greeted(agent)
        await db_proxy.cut("refuse")
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]
        heard_at = await first_words_after(client, fault_at)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        said = texts_since(agent, spoken)
        assert said[-1] == (
            "Our advisors are away right now, so I've asked one to call you back on this "
            "number when we open."
        )
        await speak(client)
        await client.wait_closed(timeout=20)
        assert agent.tts.texts[-1].strip() == "Thank you for calling Riverside Motors. Goodbye!"
        assert callback_requests(agent, client.call_sid) == []
        await db_proxy.restore()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "callback_requested"
        assert callback_requests(agent, client.call_sid) == [
            {"customer_id": 1, "phone": MARIA, "reason": "wants a person", "status": "open"}
        ]
        record(
            "Postgres down mid-call (callback), closed",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="callback request queued and written when back, goodbye",
            outcome=row["outcome"],
        )


# --- 9. Twilio REST fails on transfer -------------------------------------------------------


async def test_twilio_rest_failing_on_transfer_takes_a_callback(
    crm_db: str, redis_server_url: str, open_profile: str
) -> None:
    llm = cloud_llm([call_tool("transfer_to_advisor", {"reason": "caller asked for a person"})])
    env = {"DEALERSHIP_PROFILE": open_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["Can I talk to a real person please?"])
        client = await greeted(agent)
        agent.twilio.fail_next_updates(1)  # Twilio's REST API answers 500
        spoken = len(agent.tts.texts)
        await speak(client)
        update, fault_at = await wait_for_twiml(agent, client.call_sid)
        assert dials_advisor(update.form["Twiml"]) and agent.twilio.update_failures_served == 1
        heard_at = await first_words_after(client, fault_at)
        await client.wait_closed(timeout=20)  # goodbye, then the stream ends
        said = texts_since(agent, spoken)
        assert "connect you with a service advisor" in said[0]
        assert said[-1] == TRANSFER_FAILED_CALLBACK
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "callback_requested"
        assert callback_requests(agent, client.call_sid) == [
            {
                "customer_id": 1,
                "phone": MARIA,
                "reason": "transfer to an advisor failed",
                "status": "open",
            }
        ]
        record(
            "Twilio REST 500 on transfer",
            first_words_secs=heard_at - fault_at,
            first_words=said[-1],
            ended="callback request, goodbye (stream closed)",
            outcome=row["outcome"],
        )


# --- withheld caller ID after hours -----------------------------------------------------------


async def test_anonymous_caller_after_hours_failure_still_hears_and_is_recorded(
    crm_db: str, redis_server_url: str, closed_profile: str
) -> None:
    """Caller ID withheld ("Anonymous"), after hours, the LLM fails: the callback request
    is recorded without a number and the caller is told to call back (the insert used to
    fail the E.164 check and the caller heard nothing)."""
    llm = cloud_llm([fail(500, retryable=False)])
    env = {"DEALERSHIP_PROFILE": closed_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["I need to book a service."])
        client = await greeted(agent, caller="Anonymous")
        spoken = len(agent.tts.texts)
        await speak(client)
        await wait_until_true(lambda: bool(agent.llm.request_times), timeout=20)
        fault_at = agent.llm.request_times[0]
        heard_at = await first_words_after(client, fault_at)
        await client.wait_closed(timeout=20)
        said = texts_since(agent, spoken)
        assert said == [CALL_BACK_AFTER_HOURS]
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "failed"
        assert callback_requests(agent, client.call_sid) == [
            {
                "customer_id": None,
                "phone": None,
                "reason": "service failure during call",
                "status": "open",
            }
        ]
        record(
            "LLM 500 after hours, caller ID withheld",
            first_words_secs=heard_at - fault_at,
            first_words=said[0],
            ended="callback request without number, 'call us back', hang-up",
            outcome=row["outcome"],
        )


async def test_anonymous_caller_after_hours_is_asked_for_a_callback_number(
    crm_db: str, redis_server_url: str, closed_profile: str
) -> None:
    llm = cloud_llm(
        [
            call_tool("transfer_to_advisor", {"reason": "brakes squeal"}),
            say_tool_sentence("transfer_to_advisor"),
            call_tool(
                "transfer_to_advisor",
                {"reason": "brakes squeal", "callback_number": "(312) 555-0147"},
            ),
            say_tool_sentence("transfer_to_advisor"),
        ]
    )
    env = {"DEALERSHIP_PROFILE": closed_profile}
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, tts=cloud_tts(), env=env
    ) as agent:
        agent.stt.script(["Can I talk to someone about my brakes?", "It's 312 555 0147."])
        client = await greeted(agent, caller="Anonymous")
        spoken = len(agent.tts.texts)
        await speak(client)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        assert " ".join(texts_since(agent, spoken, hold=False)) == (
            "Our advisors are away right now, and I've noted that you'd like a call back. "
            "What number should they call you on?"
        )
        assert callback_requests(agent, client.call_sid) == [
            {"customer_id": None, "phone": None, "reason": "brakes squeal", "status": "open"}
        ]
        spoken = len(agent.tts.texts)
        end = await speak(client)
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        assert " ".join(texts_since(agent, spoken, hold=False)) == (
            "Our advisors are away right now, so I've asked one to call you back on the "
            "number you gave me when we open."
        )
        assert callback_requests(agent, client.call_sid) == [
            {
                "customer_id": None,
                "phone": "+13125550147",
                "reason": "brakes squeal",
                "status": "open",
            }
        ]
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)
        assert row["outcome"] == "callback_requested"


# --- building blocks ------------------------------------------------------------------------


async def _call_row_writer(sid: str, calls: list[str]) -> Any:
    from crm import calls as crm_calls

    async def write(conn: Any) -> None:
        calls.append(sid)
        await crm_calls.start_call(conn, call_sid=sid, direction="inbound", scenario="inbound")

    return write


async def test_pending_writes_wait_for_postgres_and_keep_their_order(migrated_db: str) -> None:
    from core.pending import PendingWrites
    from core.resources import new_pool
    from crm import calls as crm_calls

    async with TcpProxy.for_postgres_url(migrated_db) as proxy:
        pool = new_pool(proxy.postgres_url(migrated_db), timeout=0.5)
        await pool.open(wait=True)
        pending = PendingWrites(pool, timeout=0.5, retry_initial=0.1, retry_max=0.5)
        pending.start()
        try:
            tried: list[str] = []
            assert await pending.write(
                call_sid="CA1", what="call start", write=await _call_row_writer("CA1", tried)
            )
            await proxy.cut("refuse")
            started = time.monotonic()
            queued = await pending.write(
                call_sid="CA2", what="call start", write=await _call_row_writer("CA2", tried)
            )
            assert queued is False and time.monotonic() - started < 1.5
            ended_at = datetime.now(PROFILE.time_zone)

            async def finish(conn: Any) -> None:
                await crm_calls.finish_call(
                    conn,
                    call_sid="CA2",
                    direction="inbound",
                    scenario="inbound",
                    started_at=ended_at - timedelta(minutes=2),
                    ended_at=ended_at,
                    customer_id=None,
                    verified=False,
                    outcome="transferred",
                    transcript=[],
                    turn_metrics=[],
                    summary="late",
                    appointment_ids=[],
                )

            # Behind the queued start of the same call, even though it could be tried.
            assert await pending.write(call_sid="CA2", what="call record", write=finish) is False
            assert pending.pending == 2
            await asyncio.sleep(1.0)
            await proxy.restore()
            await wait_until_true(lambda: pending.pending == 0, timeout=10)
            assert pending.written_late == 2 and pending.lost == 0
        finally:
            await pending.aclose()
            await pool.close()
    import psycopg

    with psycopg.connect(migrated_db) as conn:
        rows = conn.execute(
            "SELECT call_sid, outcome, ended_at - started_at AS took FROM calls ORDER BY call_sid"
        ).fetchall()
    # The start was written first, then the end onto it; the start kept its own time.
    assert [(r[0], r[1]) for r in rows] == [("CA1", None), ("CA2", "transferred")]
    assert rows[1][2] >= timedelta(0)


async def test_pending_writes_give_up_loudly(migrated_db: str) -> None:
    from loguru import logger

    from core.pending import PendingWrites
    from core.resources import new_pool

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR")
    async with TcpProxy.for_postgres_url(migrated_db) as proxy:
        pool = new_pool(proxy.postgres_url(migrated_db), timeout=0.3)
        await pool.open(wait=True)
        pending = PendingWrites(pool, timeout=0.3, retry_initial=0.1, give_up_after=0.8)
        pending.start()
        try:
            await proxy.cut("refuse")
            tried: list[str] = []
            for sid in ("CAold", "CAnew"):
                write = await _call_row_writer(sid, tried)
                assert await pending.write(call_sid=sid, what="call record", write=write) is False
            await wait_until_true(lambda: pending.lost == 2, timeout=10)
            # Still down at shutdown: what is queued then is lost too, and said so.
            write = await _call_row_writer("CAlast", tried)
            await pending.write(call_sid="CAlast", what="callback request", write=write)
            await pending.aclose(drain_timeout=0.3)
        finally:
            logger.remove(sink)
            await pool.close()
    assert pending.lost == 3
    lost = [line for line in lines if "LOST" in line]
    assert any("call CAold: call record LOST" in line for line in lost)
    assert any(
        "call CAlast: callback request LOST" in line and "process stopped" in line for line in lost
    )


@hyp_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    caller=st.one_of(
        st.none(),
        st.sampled_from(["Anonymous", "Restricted", "Unknown", "", "+266696687", "+15555550100"]),
        st.text(max_size=30),
    ),
    given_number=st.one_of(st.none(), st.text(max_size=40), st.from_regex(r"\+?1?[0-9 ()-]{7,16}")),
)
# Cut to 40 characters, this once became "+10000000000", a number the caller never said.
@example(caller=None, given_number=":" * 26 + "+1-0000000000-0")
def test_after_hours_callback_request_takes_any_caller_id_and_any_number(
    migrated_db: str, caller: str | None, given_number: str | None
) -> None:
    """Whatever the carrier reports and whatever the caller says, the request is stored
    (a number only when it is E.164) and the tool answers with a sentence."""
    asyncio.run(_callback_once(migrated_db, caller, given_number))


async def _callback_once(database_url: str, caller: str | None, given_number: str | None) -> None:
    import contextlib as _contextlib
    import uuid

    import psycopg

    from crm import calls as crm_calls
    from crm.calls import E164
    from tools.context import CallSession, ToolContext
    from tools.registry import run_tool

    closed = load_profile(DEFAULT_PROFILE)
    night = datetime.combine(datetime(2026, 11, 30).date(), datetime.min.time().replace(hour=23))
    night = night.replace(tzinfo=closed.time_zone)

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:

        class OneConnection:
            @_contextlib.asynccontextmanager
            async def connection(self) -> AsyncIterator[Any]:
                yield conn

        sid = "CA" + uuid.uuid4().hex
        session = CallSession(call_sid=sid, caller_phone=caller)
        ctx = ToolContext(session=session, db=OneConnection(), profile=closed, now=lambda: night)
        args: dict[str, Any] = {"reason": "brakes"}
        if given_number is not None:
            args["callback_number"] = given_number
        result = await run_tool(ctx, "transfer_to_advisor", args)
        if result["ok"] is False:
            # An argument no person could say (NUL, control characters) is asked again by
            # the registry's argument check, before the tool runs: nothing is written.
            assert result["error"] == "bad_arguments" and result["say"], result
            assert given_number is not None
            return
        assert result["transferring"] is False, result
        assert result["say"] and "transfer you" not in result["say"]
        cur = await conn.execute("SELECT phone FROM callback_requests WHERE call_sid = %s", (sid,))
        [(phone,)] = await cur.fetchall()
        assert phone is None or E164.fullmatch(phone)
        from tools.customers import normalize_phone
        from tools.handoff import MAX_SPOKEN_NUMBER_CHARS

        # A blank argument means "not given" (the registry's rule for every tool).
        given_number = given_number if given_number and given_number.strip() else None
        said = (
            crm_calls.callback_number(normalize_phone(given_number))
            if given_number and len(given_number) <= MAX_SPOKEN_NUMBER_CHARS
            else None
        )
        assert phone == (said or crm_calls.callback_number(caller))
        asks = bool(given_number and said is None) or phone is None
        assert bool(result.get("needs_callback_number")) == asks, result


def test_twilio_say_twiml_escapes_the_text() -> None:
    from bot.failures import say_twiml

    twiml = say_twiml('Tom & Jerry <said> "hi"', dial="+15555550142")
    assert '<Say>Tom &amp; Jerry &lt;said&gt; "hi"</Say><Dial>+15555550142</Dial>' in twiml
    assert say_twiml("Bye.").endswith("<Say>Bye.</Say><Hangup/></Response>")


async def test_tcp_proxy_refuses_and_black_holes() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(100):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with TcpProxy(upstream_host="127.0.0.1", upstream_port=port) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping")
        assert await reader.read(4) == b"ping"
        await proxy.cut("refuse")
        try:
            data = await reader.read(4)
        except ConnectionResetError:
            data = b""
        assert data == b""  # the open connection was killed
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(proxy.host, proxy.port)
        await proxy.cut("blackhole")
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"ping")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(4), 0.3)
        await proxy.restore()
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(b"pong")
        assert await reader.read(4) == b"pong"
        writer.close()
    server.close()

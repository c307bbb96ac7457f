"""Many processes, many hosts, one service: ``runner.py serve --workers 2`` as subprocesses.

Two "hosts" are two servers on two ports sharing one Postgres and one Redis (what two
machines behind a load balancer share); the fakes of Deepgram, OpenAI and Twilio run in
the test process and are reached through the configured URLs.

* a call's webhook on host A, its media stream on host B: the booking is made, A shows
  the call live and then its snapshot, B's ``/metrics`` counts it whichever worker
  answers, and campaign workers on both hosts dial each customer once;
* the active campaign worker is SIGKILLed: the standby takes the dialing lock over;
* SIGTERM in the middle of a booking call: not ready at once, new media streams refused
  after the grace, the booking completes, the caller hears the goodbye at the drain
  timeout, the call is recorded and the process exits 0 leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from websockets.exceptions import InvalidStatus

from bot.live_calls import DRAIN_GOODBYE
from campaigns.worker import WORKER_LOCK_ID, run_worker
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE, Settings
from seeding import seed
from tests.fakes.audio import speech_ulaw
from tests.fakes.deepgram_stt import FakeDeepgramSTT
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI
from tests.fakes.twilio_media import TwilioMediaClient, new_sid
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.harness import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    BOOKING_UTTERANCES,
    booking_script,
    free_port,
    parse_stream_twiml,
    sign,
)

REPO = Path(__file__).resolve().parents[1]
PROFILE = load_profile(DEFAULT_PROFILE)
MARIA = "+15555550100"
ADMIN = {"Authorization": "Bearer e2e-admin"}
START_TIMEOUT = 240.0  # two servers of two workers each, on a loaded 2-core machine


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    """A small seeded CRM anchored on today's date (the demo customers included)."""
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


@dataclass
class Fakes:
    stt: FakeDeepgramSTT
    tts: FakeDeepgramTTS
    llm: FakeOpenAI
    twilio: FakeTwilioREST


@contextlib.asynccontextmanager
async def running_fakes(llm: FakeOpenAI) -> AsyncIterator[Fakes]:
    fakes = Fakes(
        stt=FakeDeepgramSTT(),
        tts=FakeDeepgramTTS(secs_per_char=0.01),
        llm=llm,
        twilio=FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN),
    )
    async with contextlib.AsyncExitStack() as stack:
        for fake in (fakes.stt, fakes.tts, fakes.llm, fakes.twilio):
            await stack.enter_async_context(fake)
        yield fakes


def app_env(
    fakes: Fakes, *, database_url: str, redis_url: str, public_url: str, tmp: Path, **extra: str
) -> dict[str, str]:
    """The environment of a server or worker process reaching the fakes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "DATA_DIR": str(tmp / "data"),
            "OPENAI_API_KEY": "sk-e2e",
            "OPENAI_BASE_URL": fakes.llm.base_url,
            "DEEPGRAM_API_KEY": "dg-e2e",
            "DEEPGRAM_STT_URL": fakes.stt.url,
            "DEEPGRAM_TTS_URL": fakes.tts.url,
            "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "TWILIO_PHONE_NUMBER": "+15555550199",
            "TWILIO_API_BASE_URL": fakes.twilio.base_url,
            "PUBLIC_BASE_URL": public_url,
            "ADMIN_TOKEN": "e2e-admin",
            "HOST": "127.0.0.1",
            "LOG_LEVEL": "INFO",
            **extra,
        }
    )
    return env


class Process:
    """A ``runner.py`` subprocess whose log goes to a file (read at any time)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, str(REPO / "runner.py"), *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.NoSuchProcess):
            return psutil.Process(self.popen.pid).children(recursive=True)
        return []

    def workers(self) -> list[psutil.Process]:
        """The live worker processes of ``serve`` (zombies and the departed left out)."""
        found = []
        for proc in self.descendants():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(
                    proc.cmdline()
                ):
                    found.append(proc)
        return found

    async def wait(self, timeout: float) -> int:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout:.0f} s:\n{self.log[-3000:]}")
            await asyncio.sleep(0.2)
        return self.popen.returncode

    def stop(self) -> None:
        if self.popen.poll() is None:
            for child in self.descendants():
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


class Server(Process):
    """``runner.py serve --workers N`` on ``port``."""

    def __init__(self, env: dict[str, str], *, port: int, workers: int, log: Path) -> None:
        super().__init__(["serve", "--workers", str(workers)], {**env, "PORT": str(port)}, log)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/twilio/media"
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=10)

    async def wait_ready(self, workers: int) -> None:
        """Until every worker process answers (each one counts itself as ready)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"server exited {self.popen.returncode}:\n{self.log[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (await self.http.get("/ready")).status_code == 200 and metric(
                    (await self.http.get("/metrics")).text, "voice_agent_ready_workers"
                ) == workers:
                    return
            await asyncio.sleep(0.5)
        raise AssertionError(f"not ready in {START_TIMEOUT:.0f} s:\n{self.log[-3000:]}")

    async def post_signed(self, path: str, form: dict[str, str], public_url: str):
        url = public_url.rstrip("/") + path
        return await self.http.post(
            path, data=form, headers={"X-Twilio-Signature": sign(url, form)}
        )

    async def aclose(self) -> None:
        await self.http.aclose()
        self.stop()


def metric(exposition: str, name: str, labels: str = "") -> float | None:
    """One sample of a Prometheus text exposition (``labels`` as printed, e.g.
    ``direction="inbound",outcome="booked"``)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", exposition, re.MULTILINE)
    return float(found.group(1)) if found else None


async def ring(server: Server, caller: str, public_url: str) -> tuple[str, dict[str, str], str]:
    """Twilio's inbound webhook on ``server``: ``(call sid, stream parameters, stream url)``."""
    call_sid = new_sid("CA")
    form = {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": caller,
        "To": "+15555550199",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    response = await server.post_signed("/twilio/voice", form, public_url)
    assert response.status_code == 200, response.text
    url, params = parse_stream_twiml(response.text)
    return call_sid, params, url


async def say_turn(client: TwilioMediaClient, *, expect_reply: bool = True) -> float:
    """The caller speaks (the STT fake transcribes it from its script) and, by default,
    waits for the bot's whole reply."""
    end = await client.send_audio(speech_ulaw(0.8))
    if expect_reply:
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=30, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
    return end


def said(fakes: Fakes, text: str) -> bool:
    """Whether the bot asked the TTS to speak ``text``."""
    return any(t.strip() == text for t in fakes.tts.texts)


def query(database_url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


async def wait_for_call_row(database_url: str, call_sid: str, timeout: float = 30):  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            rows = query(database_url, "SELECT * FROM calls WHERE call_sid = %s", (call_sid,))
            if rows and rows[0]["ended_at"] is not None:
                return rows[0]
            await asyncio.sleep(0.2)


# --- two hosts ---------------------------------------------------------------------


async def test_two_hosts_share_calls_snapshots_metrics_and_one_dialer(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    async with running_fakes(FakeOpenAI(booking_script())) as fakes:
        port_a, port_b = free_port(), free_port()
        public = f"http://127.0.0.1:{port_a}"  # the load balancer's URL: the same for both
        env = app_env(
            fakes, database_url=crm_db, redis_url=redis_server_url, public_url=public, tmp=tmp_path
        )
        a = Server(env, port=port_a, workers=2, log=tmp_path / "a.log")
        b = Server(env, port=port_b, workers=2, log=tmp_path / "b.log")
        try:
            await asyncio.gather(a.wait_ready(2), b.wait_ready(2))
            # Each worker froze its start-up heap (core.supervisor.freeze_startup_heap),
            # just after it started serving.
            for server in (a, b):
                for _ in range(50):
                    frozen = re.findall(r"start-up heap frozen \((\d+) objects\)", server.log)
                    if len(frozen) == 2:
                        break
                    await asyncio.sleep(0.1)
                assert len(frozen) == 2 and all(int(n) > 50_000 for n in frozen), server.log
                # And runs with few malloc arenas (core.supervisor.WORKER_MALLOC_ARENAS).
                workers = server.workers()
                assert len(workers) == 2
                assert all(w.environ().get("MALLOC_ARENA_MAX") == "2" for w in workers)
                # And one thread for NumPy's OpenBLAS (core.supervisor.WORKER_NATIVE_THREADS):
                # spawned workers load it with one thread, not one per core.
                assert all(w.environ().get("OPENBLAS_NUM_THREADS") == "1" for w in workers)
            fakes.stt.script(BOOKING_UTTERANCES)
            # The webhook on host A; the media stream lands on host B.
            call_sid, params, url = await ring(a, MARIA, public)
            assert url == public.replace("http", "ws") + "/twilio/media"
            client = TwilioMediaClient(
                b.ws_url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
            )
            await client.connect()
            await client.wait_for_bot_audio(min_seconds=0.3, timeout=30)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
            await say_turn(client)
            # Host A sees the call that runs on host B.
            live = (await a.http.get("/calls/active", headers=ADMIN)).json()["calls"]
            assert [c["call_sid"] for c in live] == [call_sid]
            await say_turn(client)
            await say_turn(client)
            await say_turn(client, expect_reply=False)
            await client.wait_closed(timeout=30)
            row = await wait_for_call_row(crm_db, call_sid)
            assert row["outcome"] == "booked"
            booked = query(crm_db, "SELECT * FROM appointments WHERE call_sid = %s", (call_sid,))
            assert len(booked) == 1
            snapshot = (await a.http.get(f"/calls/{call_sid}", headers=ADMIN)).json()
            assert snapshot["appointment_ids"] == [booked[0]["id"]]
            assert (await a.http.get("/calls/active", headers=ADMIN)).json()["calls"] == []
            # B's /metrics counts the call whichever of its workers answers; A's does not.
            labels = 'direction="inbound",outcome="booked"'
            for _ in range(6):
                text = (await b.http.get("/metrics")).text
                assert metric(text, "voice_agent_calls_total", labels) == 1.0
                assert metric(text, "voice_agent_active_calls") == 0.0
                assert metric(text, "voice_agent_ready_workers") == 2.0
                assert metric(
                    (await a.http.get("/metrics")).text, "voice_agent_calls_total", labels
                ) in (None, 0.0)
            # A worker process of B dies (the OOM killer, a crash): B restarts it, and its
            # /metrics drops the dead process's gauges and keeps its counters.
            workers = b.workers()
            assert len(workers) == 2
            workers[0].kill()
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    alive = b.workers()
                    try:  # a connection kept alive to the killed worker is gone
                        text = (await b.http.get("/metrics")).text
                    except httpx.HTTPError:
                        text = ""
                    if (
                        len(alive) == 2
                        and workers[0] not in alive
                        and metric(text, "voice_agent_ready_workers") == 2.0
                    ):
                        break
                    await asyncio.sleep(0.5)
            assert metric(text, "voice_agent_calls_total", labels) == 1.0
            assert "died (exit code -9); restarting it" in b.log
        finally:
            await asyncio.gather(a.aclose(), b.aclose())

        # The campaign worker on both hosts: one dials (the advisory lock), nobody twice.
        await _campaign_workers_on_two_hosts(crm_db, fakes, public)


async def _campaign_workers_on_two_hosts(database_url: str, fakes: Fakes, public: str) -> None:
    from zoneinfo import ZoneInfo

    chicago = ZoneInfo("America/Chicago")
    # The coming Monday, 11:05 in Chicago: the 10:00 confirmations and 11:00 service-due
    # slots are due, every customer's calling window is open.
    today = datetime.now(chicago).date()
    monday = today + timedelta(days=(7 - today.weekday()) % 7)
    now = datetime.combine(monday, dt_time(11, 5), tzinfo=chicago)
    settings = Settings(
        _env_file=None,
        DATABASE_URL=database_url,
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_PHONE_NUMBER="+15555550199",
        TWILIO_API_BASE_URL=fakes.twilio.base_url,
        PUBLIC_BASE_URL=public,
    )
    before = len(fakes.twilio.requests_to("POST", "/Calls.json"))
    stops = [asyncio.Event(), asyncio.Event()]
    async with (
        AsyncConnectionPool(database_url, min_size=1, max_size=4) as pool_a,
        AsyncConnectionPool(database_url, min_size=1, max_size=4) as pool_b,
    ):
        workers = [
            asyncio.create_task(
                run_worker(
                    pool,
                    conninfo=database_url,
                    profile=PROFILE,
                    settings=settings,
                    stop=stop,
                    poll_seconds=0.1,
                    clock=lambda: now,
                    hold_calls=False,
                )
            )
            for pool, stop in ((pool_a, stops[0]), (pool_b, stops[1]))
        ]
        # Until both slots have run and every attempt row has been dialed.
        async with asyncio.timeout(60):
            while True:
                runs = query(
                    database_url, "SELECT * FROM campaign_runs WHERE finished_at IS NOT NULL"
                )
                if len(runs) >= 2:
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # a further pass by each worker dials nothing more
        for stop in stops:
            stop.set()
        reports = await asyncio.gather(*workers)
    dialed = fakes.twilio.requests_to("POST", "/Calls.json")[before:]
    numbers = [r.form["To"] for r in dialed]
    assert numbers, "the campaigns dialed someone"
    assert len(numbers) == len(set(numbers)), "a customer was dialed twice"
    assert sum(r.dialed for r in reports) == len(numbers)
    assert [bool(r.dialed) for r in reports].count(True) == 1, "one dialer"
    attempts = query(
        database_url, "SELECT call_sid FROM campaign_attempts WHERE call_sid IS NOT NULL"
    )
    assert len(attempts) == len(numbers)


# --- dialer failover ------------------------------------------------------------------


async def _lock_holder(database_url: str) -> int | None:
    rows = query(
        database_url,
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND ((classid::bigint << 32) | objid::bigint) = %s",
        (WORKER_LOCK_ID,),
    )
    return rows[0]["pid"] if rows else None


async def _lock_tries_by_others(database_url: str, holder: int) -> bool:
    rows = query(
        database_url,
        "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> %s",
        ("%pg_try_advisory_lock%", holder),
    )
    return bool(rows)


async def test_standby_dialer_takes_over_when_the_active_worker_is_killed(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    async with running_fakes(FakeOpenAI()) as fakes:
        env = app_env(
            fakes,
            database_url=crm_db,
            redis_url=redis_server_url,
            public_url="http://127.0.0.1:9",
            tmp=tmp_path,
            CAMPAIGN_POLL_SECS="1",
        )
        active = Process(["worker"], env, tmp_path / "active.log")
        standby: Process | None = None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while "holds the dialing lock" not in active.log:
                    assert active.popen.poll() is None, active.log[-3000:]
                    await asyncio.sleep(0.2)
            first_holder = await _lock_holder(crm_db)
            assert first_holder is not None
            standby = Process(["worker"], env, tmp_path / "standby.log")
            # The standby is up and tries for the lock (its own session asks), in vain.
            async with asyncio.timeout(START_TIMEOUT):
                while not await _lock_tries_by_others(crm_db, first_holder):
                    assert standby.popen.poll() is None, standby.log[-3000:]
                    await asyncio.sleep(0.2)
            await asyncio.sleep(3)
            assert "holds the dialing lock" not in standby.log
            assert await _lock_holder(crm_db) == first_holder
            killed_at = time.monotonic()
            active.popen.send_signal(signal.SIGKILL)
            async with asyncio.timeout(60):
                while "holds the dialing lock" not in standby.log:
                    assert standby.popen.poll() is None, standby.log[-3000:]
                    await asyncio.sleep(0.1)
            took = time.monotonic() - killed_at
            holder = await _lock_holder(crm_db)
            assert holder is not None and holder != first_holder
            assert took < 60
            # The standby's retry interval is 1 s: it takes over within a few seconds.
            assert took < 15, took
            standby.popen.send_signal(signal.SIGTERM)
            assert await standby.wait(60) == 0
            assert await _lock_holder(crm_db) is None
        finally:
            active.stop()
            if standby is not None:
                standby.stop()


# --- graceful drain -------------------------------------------------------------------


async def test_sigterm_mid_booking_drains_finishes_the_booking_and_says_goodbye(
    crm_db: str, redis_server_url: str, tmp_path: Path
) -> None:
    # The booking script without its end_call: after the read-back the caller stays on
    # the line and chats (the LLM fake answers "Is there anything else?") until the
    # drain timeout ends the call with the goodbye.
    async with running_fakes(FakeOpenAI(booking_script()[:-1])) as fakes:
        port = free_port()
        public = f"http://127.0.0.1:{port}"
        env = app_env(
            fakes,
            database_url=crm_db,
            redis_url=redis_server_url,
            public_url=public,
            tmp=tmp_path,
            DRAIN_GRACE_SECS="2",
            DRAIN_TIMEOUT_SECS="40",
        )
        server = Server(env, port=port, workers=2, log=tmp_path / "server.log")
        try:
            await server.wait_ready(2)
            fakes.stt.script(BOOKING_UTTERANCES[:3] + ["Let me check my calendar."] * 40)
            call_sid, params, _ = await ring(server, MARIA, public)
            client = TwilioMediaClient(
                server.ws_url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
            )
            await client.connect()
            await client.wait_for_bot_audio(min_seconds=0.3, timeout=30)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
            await say_turn(client)  # wants an oil change
            await say_turn(client)  # verified; slots offered

            # SIGTERM in the middle of the booking.
            server.popen.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.5)
            for _ in range(4):  # every worker: not ready; alive
                assert (await server.http.get("/ready")).status_code == 503
                assert (await server.http.get("/health")).status_code == 200
            # After the grace, a new media stream is refused at the handshake (HTTP 503,
            # for the load balancer to retry elsewhere); webhooks are still answered.
            await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - signalled)))
            other_sid, other_params, _ = await ring(server, "+15555550101", public)
            refused = TwilioMediaClient(
                server.ws_url,
                call_sid=other_sid,
                account_sid=ACCOUNT_SID,
                custom_parameters=other_params,
            )
            with pytest.raises(InvalidStatus) as excinfo:
                await refused.connect()
            assert excinfo.value.response.status_code == 503

            # The live call goes on: the booking completes and is read back.
            await say_turn(client)  # "The first one" -> booked, code read back
            booked = query(crm_db, "SELECT * FROM appointments WHERE call_sid = %s", (call_sid,))
            assert len(booked) == 1 and booked[0]["status"] == "scheduled"
            assert " ".join(booked[0]["confirmation_code"]) in " ".join(fakes.tts.texts)
            # The caller keeps talking until the server says goodbye at the drain timeout.
            async with asyncio.timeout(90):
                while not said(fakes, DRAIN_GOODBYE) and not client.closed:
                    await say_turn(client)
            assert said(fakes, DRAIN_GOODBYE)
            assert time.monotonic() - signalled >= 40 - 1, "not before the drain timeout"
            await client.wait_closed(timeout=60)
            # The goodbye was the last thing the bot said, and the caller heard all of it
            # before Twilio was told to hang up.
            assert fakes.tts.texts[-1].strip() == DRAIN_GOODBYE
            goodbye_secs = fakes.tts.audio_secs(DRAIN_GOODBYE)
            last_audio = client.last_bot_audio_at()
            assert last_audio is not None
            heard = client.bot_audio_secs(since=last_audio - goodbye_secs - 0.5)
            assert heard >= 0.8 * goodbye_secs, (heard, goodbye_secs)
            updates = fakes.twilio.requests_to("POST", f"/Calls/{call_sid}.json")
            assert updates and updates[-1].form.get("Status") == "completed"
            assert await server.wait(90) == 0
            row = await wait_for_call_row(crm_db, call_sid, timeout=5)
            assert row["outcome"] == "booked"
            assert row["appointment_ids"] == [booked[0]["id"]]
            assert not query(crm_db, "SELECT 1 FROM calls WHERE call_sid = %s", (other_sid,))
            # Nothing left behind: no process, the port free, no live call in Redis.
            assert server.descendants() == []
            assert "drain timeout: ended 1 live call(s) with a goodbye" in server.log
            redis = aioredis.Redis.from_url(redis_server_url)
            try:
                assert not await redis.sismember("voice_agent:calls:active", call_sid)
            finally:
                await redis.aclose()
            with contextlib.suppress(httpx.ConnectError):
                await server.http.get("/health")
                raise AssertionError("something still listens on the port")
        finally:
            await server.aclose()

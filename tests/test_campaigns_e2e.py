"""A real campaign run: `runner.py campaign` dials through the Twilio REST fake over HTTP,
the server takes Twilio's status callbacks, and nobody is dialed twice or over the cap."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

from seeding import seed
from tests.harness import AUTH_TOKEN, running_agent

REPO = Path(__file__).resolve().parents[1]
NOW = "2026-11-30T12:00:00-06:00"  # Monday noon in Chicago: inside every US window
CALL_SECS = 0.6
CAP = 2


async def run_cli(agent, database_url: str, redis_url: str, *args: str) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": agent.settings.redis_key_prefix,
        "TWILIO_ACCOUNT_SID": agent.settings.twilio_account_sid,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": "+15555550199",
        "TWILIO_API_BASE_URL": agent.twilio.base_url,
        "PUBLIC_BASE_URL": agent.base_url,
        "LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "runner.py"),
        "campaign",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"campaign run did not finish; created={len(agent.twilio.created)} "
            f"attempts={agent.query('SELECT id, status, call_sid FROM campaign_attempts')}"
            f"\n{err.decode()[-3000:]}"
        ) from None
    return proc.returncode or 0, out.decode(), err.decode()


async def test_campaign_run_dials_each_planned_call_once_within_the_cap(
    migrated_db: str, redis_server_url: str
) -> None:
    await seed(migrated_db, customers=400, seed=11, anchor_date=date(2026, 11, 30))
    async with running_agent(database_url=migrated_db, redis_url=redis_server_url) as agent:
        code, out, err = await run_cli(
            agent,
            migrated_db,
            redis_server_url,
            "service-due",
            "--dry-run",
            "--json",
            "--limit",
            "6",
            "--now",
            NOW,
        )
        assert code == 0, err
        planned = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert len(planned) == 6

        # Twilio's side: each created call rings for CALL_SECS, then reports "completed".
        live: dict[str, float] = {}
        most_live = 0
        answered: set[str] = set()
        done = asyncio.Event()

        async def play_twilio() -> None:
            nonlocal most_live
            while not done.is_set():
                now = time.monotonic()
                for sid in agent.twilio.created:
                    if sid not in live and sid not in answered:
                        live[sid] = now
                for sid, started in list(live.items()):
                    if now - started >= CALL_SECS:
                        del live[sid]
                        answered.add(sid)
                        form = {"CallSid": sid, "CallStatus": "completed", "SequenceNumber": "4"}
                        response = await agent.post_signed("/twilio/status", form)
                        assert response.status_code == 204
                most_live = max(most_live, len(live))
                await asyncio.sleep(0.02)

        twilio = asyncio.create_task(play_twilio())
        try:
            code, out, err = await run_cli(
                agent,
                migrated_db,
                redis_server_url,
                "service-due",
                "--limit",
                "6",
                "--max-concurrent",
                str(CAP),
                "--now",
                NOW,
            )
            assert code == 0, err
            first_run = [r.form["To"] for r in agent.twilio.requests_to("POST", "/Calls.json")]
            assert sorted(first_run) == sorted(  # exactly the plan, each number once
                agent.query(
                    "SELECT c.phone FROM campaign_attempts a JOIN customers c "
                    "ON c.id = a.customer_id"
                )[i]["phone"]
                for i in range(6)
            )
            assert len(set(first_run)) == 6
            rows = agent.query(
                "SELECT status, count(*) AS n FROM campaign_attempts GROUP BY status ORDER BY 1"
            )
            assert rows == [{"status": "completed", "n": 6}]
            assert sorted(p["customer_id"] for p in planned) == sorted(
                r["customer_id"] for r in agent.query("SELECT customer_id FROM campaign_attempts")
            )

            # Run it again the same day: the next most urgent customers are called, and
            # nobody from the first run is dialed a second time.
            code, out, err = await run_cli(
                agent,
                migrated_db,
                redis_server_url,
                "service-due",
                "--limit",
                "6",
                "--max-concurrent",
                str(CAP),
                "--now",
                NOW,
            )
            assert code == 0, err
        finally:
            done.set()
            await twilio
        creates = agent.twilio.requests_to("POST", "/Calls.json")
        dialed = [r.form["To"] for r in creates]
        assert len(dialed) == 12 and len(set(dialed)) == 12
        assert 1 <= most_live <= CAP
        assert all("/twilio/outbound?scenario=service_due" in r.form["Url"] for r in creates)

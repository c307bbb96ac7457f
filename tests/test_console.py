"""The tool console (`python runner.py tools`): one call session per process, JSON lines."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from seeding import seed

REPO = Path(__file__).resolve().parents[1]
NOW = "2026-11-30T09:00:00-06:00"  # a Monday morning, dealership time


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    await seed(migrated_db, customers=60, seed=7, anchor_date=date(2026, 11, 30))
    return migrated_db


class Console:
    """One `runner.py tools` process, driven line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, *, caller: str, database_url: str, redis_url: str, key_prefix: str
    ) -> Console:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": key_prefix,
            "LOG_LEVEL": "WARNING",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "runner.py"),
            "tools",
            "--caller",
            caller,
            "--now",
            NOW,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            err = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"console exited: {err.decode()[-2000:]}")
        return json.loads(line)

    async def call(self, name: str, **arguments: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"name": name, "arguments": arguments}).encode() + b"\n")
        await self.proc.stdin.drain()
        reply = await self.read()
        assert reply["name"] == name
        return reply["result"]

    async def send_line(self, line: bytes) -> dict[str, Any]:
        """Send one raw input line; return the one JSON line answered."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        await self.proc.stdin.drain()
        return await self.read()

    async def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 60)
        return self.proc.returncode or 0


async def test_console_verifies_lists_and_books_for_a_demo_customer(
    crm_db: str, redis_server_url: str, redis_key_prefix: str
) -> None:
    console = await Console.start(
        caller="+15555550100",
        database_url=crm_db,
        redis_url=redis_server_url,
        key_prefix=redis_key_prefix,
    )
    hello = await console.read()
    assert hello["caller_id_matched"] is True
    # Before verification: no vehicle data.
    refused = await console.call("get_vehicle_history")
    assert refused["ok"] is False and "vehicles" not in refused
    verified = await console.call("verify_customer", date_of_birth="1985-04-12")
    assert verified["ok"] is True and verified["verified"] is True
    vehicles = (await console.call("get_vehicle_history"))["vehicles"]
    slots = (await console.call("check_availability", service_type="oil_change"))["slots"]
    assert 1 <= len(slots) <= 5
    booked = await console.call(
        "book_appointment",
        slot_id=slots[0]["slot_id"],
        vehicle_id=vehicles[0]["vehicle_id"],
        service_type="oil_change",
    )
    assert booked["ok"] is True
    assert await console.close() == 0
    with psycopg.connect(crm_db) as conn:
        row = conn.execute(
            "SELECT customer_id, vehicle_id, confirmation_code FROM appointments WHERE id = %s",
            (booked["appointment_id"],),
        ).fetchone()
    assert row == (1, vehicles[0]["vehicle_id"], booked["confirmation_code"])


async def test_twenty_consoles_booking_the_same_slot_make_one_appointment(
    crm_db: str, redis_server_url: str, redis_key_prefix: str
) -> None:
    with psycopg.connect(crm_db) as conn:
        callers = conn.execute(
            "SELECT c.phone, c.date_of_birth, min(v.id) FROM customers c "
            "JOIN vehicles v ON v.customer_id = c.id WHERE c.id > 7 "
            "AND c.verification_locked_until IS NULL GROUP BY c.id ORDER BY c.id LIMIT 20"
        ).fetchall()
    assert len(callers) == 20
    consoles = await asyncio.gather(
        *(
            Console.start(
                caller=phone,
                database_url=crm_db,
                redis_url=redis_server_url,
                key_prefix=redis_key_prefix,
            )
            for phone, _, _ in callers
        )
    )
    try:
        for console in consoles:
            assert (await console.read())["caller_id_matched"] is True

        async def prepare(console: Console, dob: date) -> dict[str, Any]:
            verified = await console.call("verify_customer", date_of_birth=dob.isoformat())
            assert verified["verified"] is True, verified
            return (await console.call("check_availability", service_type="oil_change"))["slots"][0]

        firsts = await asyncio.gather(
            *(prepare(c, dob) for c, (_, dob, _) in zip(consoles, callers, strict=True))
        )
        assert len({s["when"] for s in firsts}) == 1  # everyone was offered the same time
        results = await asyncio.gather(
            *(
                c.call(
                    "book_appointment",
                    slot_id=slot["slot_id"],
                    vehicle_id=vehicle_id,
                    service_type="oil_change",
                )
                for c, slot, (_, _, vehicle_id) in zip(consoles, firsts, callers, strict=True)
            )
        )
    finally:
        codes = await asyncio.gather(*(c.close() for c in consoles), return_exceptions=True)
    assert codes == [0] * 20
    winners = [r for r in results if r["ok"]]
    assert len(winners) == 1, results
    losers = [r for r in results if not r["ok"]]
    assert all(r.get("alternatives") for r in losers), losers[:2]
    with psycopg.connect(crm_db) as conn:
        booked = conn.execute(
            "SELECT count(*) FROM appointments WHERE call_sid LIKE 'console-%%'"
        ).fetchone()[0]
    assert booked == 1


async def test_console_answers_bad_lines_and_keeps_going(
    crm_db: str, redis_server_url: str, redis_key_prefix: str
) -> None:
    console = await Console.start(
        caller="+15555550100",
        database_url=crm_db,
        redis_url=redis_server_url,
        key_prefix=redis_key_prefix,
    )
    assert (await console.read())["caller_id_matched"] is True
    for line, says in (
        (b'{"name": ["a"]}', '"name" must be a tool name'),
        (b'{"name": {"x": 1}, "arguments": {}}', '"name" must be a tool name'),
        (b'{"name": "verify_customer", "arguments": [1]}', '"arguments" must be a JSON object'),
        (b"[1, 2]", "expected a JSON object"),
        (b"not json", "not JSON"),
        (b"\xff\xfe{", "not JSON"),
        (b"[" * 100_000, "not JSON"),
    ):
        reply = await console.send_line(line)
        assert reply["ok"] is False and reply["error"] == "bad_input_line", (line[:40], reply)
        assert says in reply["message"]
    # A hostile argument is the tool's business: a sentence, not a traceback.
    verified = await console.call("verify_customer", date_of_birth="1985-04-12")
    assert verified["verified"] is True
    odd = await console.call("get_vehicle_history", vehicle_id="abc")
    assert odd["error"] == "bad_arguments" and odd["argument"] == "vehicle_id"
    assert (await console.call("get_vehicle_history", vehicle_id="1"))["ok"] is True
    assert await console.close() == 1  # some lines were not tool calls
    assert console.proc.stderr is not None
    assert b"Traceback" not in await console.proc.stderr.read()


@pytest.mark.parametrize("now", ["tomorrow", "2026-11-30T09:00:00", "2026-13-45T09:00:00+00:00"])
async def test_console_now_needs_a_time_with_an_offset(now: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO / "runner.py"),
        "tools",
        "--caller",
        "+15555550100",
        "--now",
        now,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_LEVEL": "WARNING"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert out == b""
    lines = err.decode().strip().splitlines()  # (Pipecat's import banner may come first)
    assert lines[-2].startswith("usage: runner.py tools")
    assert lines[-1] == (
        "runner.py tools: error: argument --now: expected an ISO 8601 time with a UTC offset, "
        f"e.g. 2026-11-30T10:00:00-06:00, not {now!r}"
    )
    assert "Traceback" not in err.decode() and "ValueError" not in err.decode()

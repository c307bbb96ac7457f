"""Benchmark: the ops console's call-history page over 100,000 calls (budget 300 ms).

Usage::

    python benchmarks/ops_history.py [--calls 100000] [--customers 10000] [--runs 25]

With ``DATABASE_URL`` / ``REDIS_URL`` set, a scratch database is created on that server
(and dropped at the end) and Redis logical database 14 is used; otherwise embedded servers
start in a temporary directory. The CRM is seeded (``--customers``, seed 7), then
``--calls`` rows of ``calls`` are loaded with COPY (``crm.bulk_load.load_calls``): a
year of inbound and outbound calls with transcripts, per-turn latency and tool calls.

Then the real app (``runner.create_app``, in-process over ASGI, logged in through the
login form) serves ``/ops/calls``: the first page and a deep keyset page (the cursor of
the row 90% down), without and with filters, and the searches. Each case is requested
``--runs`` times after one warm-up; the time is the whole request (query, template, HTML).
Prints a table (p50, p95, max in ms) and writes ``benchmarks/results/ops_history.json``;
exits 1 when a p95 is over the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.settings import Settings  # noqa: E402
from crm.bulk_load import load_calls  # noqa: E402
from crm.migrate import apply_migrations  # noqa: E402
from ops.views import encode_cursor  # noqa: E402
from runner import create_app  # noqa: E402
from seeding import seed  # noqa: E402

BUDGET_MS = 300.0
ANCHOR = date(2026, 11, 30)
TOKEN = "bench-admin-token"
REDIS_DB = 14
INBOUND = (
    ["booked"] * 5
    + ["info"] * 6
    + ["transferred"] * 3
    + ["rescheduled", "cancelled"]
    + [
        "callback_requested",
        "abandoned",
        "failed",
    ]
)
OUTBOUND = ["confirmed"] * 4 + ["booked"] * 2 + ["voicemail"] * 4 + ["opted_out", "failed", "info"]
TOOLS = ["verify_customer", "get_vehicle_history", "check_availability", "book_appointment"]


def call_rows(count: int, customers: int, seed_value: int) -> list[tuple[Any, ...]]:
    """``count`` calls over the year before the anchor day, in ``CALL_COLUMNS`` order."""
    rng = random.Random(seed_value)
    end = datetime(ANCHOR.year, ANCHOR.month, ANCHOR.day, 23, 0, tzinfo=UTC)
    rows = []
    for i in range(count):
        outbound = rng.random() < 0.3
        scenario = rng.choice(["service_due", "confirmation"]) if outbound else "inbound"
        outcome = rng.choice(OUTBOUND if outbound else INBOUND)
        started = end - timedelta(seconds=rng.randrange(365 * 86400))
        customer = rng.randrange(1, customers + 1) if rng.random() < 0.85 else None
        turns = rng.randrange(2, 9)
        transcript = [
            {"role": "bot" if t % 2 == 0 else "caller", "text": f"Turn {t} of call {i}."}
            for t in range(turns)
        ]
        metrics = [
            {
                "turn": t + 1,
                "started_at": (started + timedelta(seconds=6 * t)).isoformat(),
                "voice_to_voice_secs": round(rng.uniform(0.4, 1.6), 3),
                "tools": [],
            }
            for t in range(turns // 2)
        ]
        tools = [
            {"name": name, "arguments": {}, "result": {"ok": True}, "secs": 0.01, "status": "ok"}
            for name in TOOLS[: rng.randrange(0, len(TOOLS) + 1)]
        ]
        rows.append(
            (
                f"CA{uuid.UUID(int=rng.getrandbits(128)).hex}",
                "outbound" if outbound else "inbound",
                scenario,
                customer,
                customer is not None,
                outcome,
                "completed",
                started,
                started + timedelta(seconds=rng.randrange(20, 600)),
                Jsonb(transcript),
                Jsonb(metrics),
                Jsonb(tools),
                f"{'outbound' if outbound else 'inbound'} {scenario} call; outcome {outcome}",
                [],
            )
        )
    return rows


@contextlib.asynccontextmanager
async def servers() -> AsyncIterator[tuple[str, str]]:
    """(admin database URL, Redis URL): from the environment, or embedded ones."""
    admin_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    async with contextlib.AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="va-ops-bench-")))
        if not admin_url:
            from core.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres()
            await pg.astart(tmp / "pg")
            stack.push_async_callback(pg.astop)
            admin_url = pg.url
        if not redis_url:
            from core.embedded import EmbeddedRedis

            rd = EmbeddedRedis()
            await rd.astart(tmp / "redis")
            stack.push_async_callback(rd.astop)
            redis_url = rd.url
        yield admin_url, redis_url


def _with_db(url: str, name: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo(**params)


def _redis_db(url: str) -> str:
    if url.startswith("unix://"):
        return f"{url}{'&' if '?' in url else '?'}db={REDIS_DB}"
    return re.sub(r"(/\d+)?$", f"/{REDIS_DB}", url, count=1)


async def time_case(
    client: httpx.AsyncClient, name: str, path: str, runs: int, *, expect_rows: bool = True
) -> dict[str, Any]:
    """GET ``path`` once to warm up, then ``runs`` times; milliseconds per request."""
    first = await client.get(path)
    assert first.status_code == 200, (path, first.status_code, first.text[:300])
    rows = len(re.findall(r'<a href="/ops/calls/CA', first.text))
    assert rows or not expect_rows, f"{name}: no rows on {path}"
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = await client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    times.sort()
    return {
        "case": name,
        "path": path,
        "rows": rows,
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
        "max_ms": round(times[-1], 1),
        "runs": runs,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description="ops console call-history benchmark")
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=25)
    args = parser.parse_args()
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    async with servers() as (admin_url, redis_url):
        name = f"va_ops_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = _with_db(admin_url, name)
        try:
            await apply_migrations(url)
            started = time.perf_counter()
            await seed(url, customers=args.customers, seed=7, anchor_date=ANCHOR)
            seed_s = time.perf_counter() - started
            rows = call_rows(args.calls, args.customers, 7)
            started = time.perf_counter()
            await asyncio.to_thread(load_calls, url, rows)
            load_s = time.perf_counter() - started
            del rows
            with psycopg.connect(url) as conn:
                total = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
                deep = conn.execute(
                    "SELECT started_at, id FROM calls ORDER BY started_at DESC, id DESC "
                    "OFFSET %s LIMIT 1",
                    (int(total * 0.9),),
                ).fetchone()
                booked = conn.execute("SELECT count(*) FROM calls WHERE outcome = 'booked'")
                booked_total = booked.fetchone()[0]
                deep_booked = conn.execute(
                    "SELECT started_at, id FROM calls WHERE outcome = 'booked' "
                    "ORDER BY started_at DESC, id DESC OFFSET %s LIMIT 1",
                    (int(booked_total * 0.9),),
                ).fetchone()
                surname, phone = conn.execute(
                    "SELECT cu.last_name, cu.phone FROM calls c JOIN customers cu "
                    "ON cu.id = c.customer_id GROUP BY cu.id ORDER BY count(*) DESC LIMIT 1"
                ).fetchone()
                server = conn.execute("SHOW server_version").fetchone()[0]
            settings = Settings(
                _env_file=None,
                DATABASE_URL=url,
                REDIS_URL=_redis_db(redis_url),
                ADMIN_TOKEN=TOKEN,
                LOG_LEVEL="WARNING",
            )
            app = create_app(settings)
            async with app.router.lifespan_context(app):
                await app.state.resources.redis.flushdb()
                transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://bench", timeout=60
                ) as client:
                    form = await client.get("/ops/login")
                    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text).group(1)
                    login = await client.post(
                        "/ops/login",
                        data={"username": "admin", "password": TOKEN, "csrf_token": token},
                    )
                    assert login.status_code == 303, login.text
                    week_from = (ANCHOR - timedelta(days=120)).isoformat()
                    week_to = (ANCHOR - timedelta(days=114)).isoformat()
                    cases = [
                        ("first page", "/ops/calls"),
                        ("deep page (90%)", f"/ops/calls?after={encode_cursor(*deep)}"),
                        ("first page, outcome=booked", "/ops/calls?outcome=booked"),
                        (
                            "deep page, outcome=booked",
                            f"/ops/calls?outcome=booked&after={encode_cursor(*deep_booked)}",
                        ),
                        (
                            "outbound + confirmation",
                            "/ops/calls?direction=outbound&scenario=confirmation",
                        ),
                        ("one week, 4 months ago", f"/ops/calls?from={week_from}&to={week_to}"),
                        (
                            "week + outcome=opted_out",
                            f"/ops/calls?from={week_from}&to={week_to}&outcome=opted_out",
                        ),
                        ("search: last name", f"/ops/calls?q={surname.lower()[:4]}"),
                        ("search: phone digits", f"/ops/calls?q={phone[-7:]}"),
                        ("rare: outcome=failed", "/ops/calls?outcome=failed&direction=outbound"),
                    ]
                    results = [
                        await time_case(
                            client, case, path, args.runs, expect_rows="opted_out" not in path
                        )
                        for case, path in cases
                    ]
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(
        f"data: {total} calls, {args.customers} customers; Postgres {server}; seed "
        f"{seed_s:.1f} s, COPY of the calls {load_s:.1f} s"
    )
    print(f"{'case':<30} {'rows':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for r in results:
        print(
            f"{r['case']:<30} {r['rows']:>5} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
            f"{r['max_ms']:>8.1f}"
        )
    ok = all(r["p95_ms"] < BUDGET_MS for r in results)
    print(f"history page budget {BUDGET_MS:.0f} ms (p95 of every case): {'OK' if ok else 'OVER'}")
    out = ROOT / "benchmarks" / "results" / "ops_history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "calls": total,
                "customers": args.customers,
                "postgres": server,
                "seed_s": round(seed_s, 2),
                "copy_s": round(load_s, 2),
                "budget_ms": BUDGET_MS,
                "within_budget": ok,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

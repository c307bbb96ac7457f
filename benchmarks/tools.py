"""Benchmark: p50/p99 latency of each LLM tool against the 100,000-customer seed.

Usage::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
    REDIS_URL=redis://127.0.0.1:6379/0 \
        python benchmarks/tools.py [--customers 100000] [--iterations 300]

Creates a scratch database on the server of ``DATABASE_URL``, seeds it with
:func:`seed_data.seed` (``--customers`` generated customers, seed 7, anchor 2026-11-30),
and calls every tool through :func:`tools.registry.run_tool` exactly as the bot does, with
one connection pool and one Redis client (logical database 14, flushed first). "Now" is
fixed at Monday 2026-11-30 09:00 America/Chicago.

Timed, ``--iterations`` times each (``time.perf_counter`` around ``run_tool`` only):

* ``lookup_customer``: by the phone of a random seeded customer, from a caller whose
  number is not on file;
* ``verify_customer``: a random seeded customer from their own number with their date of
  birth, a fresh call and a different customer each time (the limit of 3 comparisons per
  customer per 15 minutes counts right answers too), none of them used below;
* ``get_vehicle_history``: a random customer with a vehicle, verified beforehand;
* ``check_availability``: oil change over the 7 days from "now";
* ``book_appointment``: a random customer with a vehicle, verified and offered slots
  beforehand (untimed); books the first offered slot;
* ``cancel_appointment``: each of those bookings.

After every timed call one ``SELECT 1`` round trip on the same pool is timed as well: the
in-run baseline. The table shows each tool's p50 as a multiple of it, which is what to
compare across noisy shared machines. Writes ``benchmarks/results/tools.json``; exits 1
when a p99 target is missed. The scratch database is dropped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import psycopg
import redis.asyncio as aioredis
from loguru import logger
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.profile import DealershipProfile, load_profile  # noqa: E402
from core.settings import DEFAULT_PROFILE  # noqa: E402
from scheduling.calendar import PostgresCalendar  # noqa: E402
from seeding import seed  # noqa: E402
from tools.context import CallSession, ToolContext  # noqa: E402
from tools.customers import identify_caller  # noqa: E402
from tools.registry import run_tool  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_DB = 14
ANCHOR = date(2026, 11, 30)
NOW = datetime(2026, 11, 30, 9, 0, tzinfo=ZoneInfo("America/Chicago"))
UNKNOWN_CALLER = "+15555559999"  # not on file: lookup_customer never matches caller ID
SERVICE = "oil_change"
#: p99 targets in milliseconds.
TARGETS_MS = {
    "lookup_customer": 25.0,
    "verify_customer": 25.0,
    "get_vehicle_history": None,
    "check_availability": 25.0,
    "book_appointment": 50.0,
    "cancel_appointment": None,
}
RESULTS = ROOT / "benchmarks" / "results" / "tools.json"


class BenchmarkError(RuntimeError):
    """A tool did not give the result the benchmark relies on."""


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of non-empty ``samples``."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def scratch_url(admin_url: str, name: str) -> str:
    """``admin_url`` with its database replaced by ``name``."""
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    return make_conninfo(**params)


def redis_url_for_db(url: str, db: int) -> str:
    """``url`` pointed at logical database ``db`` (the URL's own path would override)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("db="))
        return urlunsplit(parts._replace(query=f"{query}&db={db}" if query else f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


class Bench:
    """Runs the tools against one pool and Redis client and collects timings."""

    def __init__(
        self, pool: AsyncConnectionPool, redis: Any, profile: DealershipProfile, seed_value: int
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.profile = profile
        self.rng = random.Random(seed_value)
        self.samples: dict[str, list[float]] = {name: [] for name in TARGETS_MS}
        self.baseline: list[float] = []
        self._calls = 0

    def ctx(self, caller: str | None) -> ToolContext:
        """A new call: fresh session, shared pool and Redis, fixed clock."""
        self._calls += 1
        session = CallSession(call_sid=f"CAbench{self._calls:08d}", caller_phone=caller)
        return ToolContext(
            session=session,
            db=self.pool,
            profile=self.profile,
            calendar=PostgresCalendar(),
            now=lambda: NOW,
        )

    async def select_one(self) -> float:
        started = time.perf_counter()
        async with self.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return (time.perf_counter() - started) * 1000

    async def timed(
        self, ctx: ToolContext, name: str, args: dict[str, Any], *, record: bool = True
    ) -> dict[str, Any]:
        """Run one tool call; record its latency (and one baseline round trip)."""
        started = time.perf_counter()
        result = await run_tool(ctx, name, args)
        elapsed = (time.perf_counter() - started) * 1000
        if record:
            self.samples[name].append(elapsed)
            self.baseline.append(await self.select_one())
        return result

    async def verified_ctx(self, phone: str, dob: str) -> ToolContext:
        """A call from the customer's own number, verified with their DOB (untimed)."""
        ctx = self.ctx(phone)
        if not await identify_caller(ctx):
            raise BenchmarkError(f"caller ID {phone} matched no customer")
        result = await run_tool(ctx, "verify_customer", {"date_of_birth": dob})
        if result.get("verified") is not True:
            raise BenchmarkError(f"verification failed: {result}")
        return ctx

    async def sample_customers(self, n: int) -> tuple[list[str], list[tuple[str, str, int]]]:
        """Random phones of generated customers, and random verifiable vehicle owners."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT phone FROM customers WHERE id > 7 ORDER BY id")
            phones = [r[0] for r in await cur.fetchall()]
            cur = await conn.execute(
                """
                SELECT c.phone, c.date_of_birth, min(v.id)
                FROM customers c JOIN vehicles v ON v.customer_id = c.id
                WHERE c.id > 7 AND c.date_of_birth IS NOT NULL
                  AND c.verification_locked_until IS NULL
                  -- a vehicle with a booking of its own would (rightly) be refused
                  AND NOT EXISTS (SELECT 1 FROM appointments a WHERE a.vehicle_id = v.id
                                  AND a.status IN ('requested', 'scheduled', 'confirmed'))
                GROUP BY c.id ORDER BY c.id
                """
            )
            owners = [(r[0], r[1].isoformat(), r[2]) for r in await cur.fetchall()]
        if not phones or not owners:
            raise BenchmarkError("the seed has no generated customers with vehicles")
        return self._pick(phones, n), self._pick(owners, n)

    def _pick(self, population: list, n: int) -> list:
        return (
            self.rng.sample(population, n)
            if len(population) >= n
            else self.rng.choices(population, k=n)
        )

    async def run(self, iterations: int, warmup: int) -> None:
        phones, sampled = await self.sample_customers(2 * iterations + warmup)
        # Owners for history and booking (verified twice each); verifiers verified once.
        owners, verifiers = sampled[:iterations], sampled[iterations:]
        week = {
            "service_type": SERVICE,
            "date_from": ANCHOR.isoformat(),
            "date_to": (ANCHOR + timedelta(days=6)).isoformat(),
        }

        async def lookup(phone: str, record: bool) -> None:
            result = await self.timed(
                self.ctx(UNKNOWN_CALLER), "lookup_customer", {"phone": phone}, record=record
            )
            if result.get("found") is not True:
                raise BenchmarkError(f"lookup_customer found nothing: {result}")

        async def verify(i: int, record: bool) -> None:
            phone, dob, _ = verifiers[i]
            ctx = self.ctx(phone)
            if not await identify_caller(ctx):
                raise BenchmarkError(f"caller ID {phone} matched no customer")
            result = await self.timed(ctx, "verify_customer", {"date_of_birth": dob}, record=record)
            if result.get("verified") is not True:
                raise BenchmarkError(f"verify_customer did not verify: {result}")

        async def history(ctx: ToolContext, record: bool) -> None:
            result = await self.timed(ctx, "get_vehicle_history", {}, record=record)
            if not result.get("ok") or not result.get("vehicles"):
                raise BenchmarkError(f"get_vehicle_history returned no vehicles: {result}")

        async def availability(record: bool) -> None:
            result = await self.timed(self.ctx(None), "check_availability", week, record=record)
            if not result.get("ok") or not result.get("slots"):
                raise BenchmarkError(f"check_availability offered nothing: {result}")

        # Warm-up (untimed): connections, plan caches, Redis scripts.
        for i in range(warmup):
            await lookup(phones[i % len(phones)], False)
            await verify(iterations + i, False)
            await availability(False)
            await self.select_one()

        await self._loop("lookup_customer", iterations, lambda i: lookup(phones[i], True))
        await self._loop("verify_customer", iterations, lambda i: verify(i, True))
        contexts = [await self.verified_ctx(phone, dob) for phone, dob, _ in owners]
        await self._loop("get_vehicle_history", iterations, lambda i: history(contexts[i], True))
        await self._loop("check_availability", iterations, lambda i: availability(True))

        booked: list[tuple[ToolContext, int]] = []

        async def book(i: int) -> None:
            # A new call per booking (the one used for history has other slots offered).
            phone, dob, vehicle_id = owners[i]
            ctx = await self.verified_ctx(phone, dob)
            slot_id = await self._first_slot(ctx)
            result = await self.timed(
                ctx,
                "book_appointment",
                {"slot_id": slot_id, "vehicle_id": vehicle_id, "service_type": SERVICE},
            )
            if not result.get("ok"):
                raise BenchmarkError(f"book_appointment failed: {result}")
            booked.append((ctx, result["appointment_id"]))

        async def cancel(i: int) -> None:
            ctx, appointment_id = booked[i]
            result = await self.timed(ctx, "cancel_appointment", {"appointment_id": appointment_id})
            if result.get("cancelled") is not True:
                raise BenchmarkError(f"cancel_appointment failed: {result}")

        await self._loop("book_appointment", iterations, book)
        await self._loop("cancel_appointment", len(booked), cancel)

    async def _first_slot(self, ctx: ToolContext) -> str:
        """The first slot check_availability offers, moving a week on while one is full."""
        horizon = ANCHOR + timedelta(days=self.profile.max_booking_days_ahead)
        first = ANCHOR
        while first <= horizon:
            args = {
                "service_type": SERVICE,
                "date_from": first.isoformat(),
                "date_to": (first + timedelta(days=6)).isoformat(),
            }
            result = await run_tool(ctx, "check_availability", args)
            if result.get("slots"):
                return result["slots"][0]["slot_id"]
            first += timedelta(days=7)
        raise BenchmarkError("no oil change slot left within the booking horizon")

    async def _loop(self, name: str, n: int, step: Callable[[int], Awaitable[None]]) -> None:
        started = time.perf_counter()
        for i in range(n):
            await step(i)
        print(f"  {name}: {n} calls in {time.perf_counter() - started:.1f} s", flush=True)


def summarize(bench: Bench) -> tuple[list[dict[str, Any]], dict[str, float], bool]:
    """Rows of the table, the baseline stats, and whether every target was met."""
    base_p50 = statistics.median(bench.baseline)
    baseline = {
        "n": len(bench.baseline),
        "p50_ms": round(base_p50, 3),
        "p99_ms": round(percentile(bench.baseline, 99), 3),
        "max_ms": round(max(bench.baseline), 3),
    }
    rows = []
    all_ok = True
    for name, target in TARGETS_MS.items():
        samples = bench.samples[name]
        if not samples:
            continue
        p99 = percentile(samples, 99)
        ok = target is None or p99 < target
        all_ok = all_ok and ok
        p50 = statistics.median(samples)
        rows.append(
            {
                "tool": name,
                "n": len(samples),
                "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3),
                "max_ms": round(max(samples), 3),
                "target_p99_ms": target,
                "ok": ok,
                "p50_x_baseline": round(p50 / base_p50, 2) if base_p50 else None,
            }
        )
    return rows, baseline, all_ok


def print_table(rows: list[dict[str, Any]], baseline: dict[str, float]) -> None:
    header = (
        f"{'tool':<20} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'target ms':>10} {'':>5} {'p50/base':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        target = f"< {r['target_p99_ms']:.0f}" if r["target_p99_ms"] is not None else "-"
        verdict = ("OK" if r["ok"] else "OVER") if r["target_p99_ms"] is not None else ""
        print(
            f"{r['tool']:<20} {r['n']:>5} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['max_ms']:>8.2f} {target:>10} {verdict:>5} {r['p50_x_baseline']:>8.1f}x"
        )
    print(
        f"{'SELECT 1 (baseline)':<20} {baseline['n']:>5} {baseline['p50_ms']:>8.2f} "
        f"{baseline['p99_ms']:>8.2f} {baseline['max_ms']:>8.2f} {'':>10} {'':>5} {1:>8.1f}x"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description="tool latency benchmark (p50/p99)")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls per read tool")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.iterations < 1 or args.customers < 1:
        parser.error("--iterations and --customers must be >= 1")

    logger.remove()  # the tools log every match at INFO: keep the output to the table
    logger.add(sys.stderr, level="WARNING")

    admin_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = redis_url_for_db(os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL, REDIS_DB)
    profile = load_profile(DEFAULT_PROFILE)

    name = f"va_bench_tools_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = scratch_url(admin_url, name)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        if redis.connection_pool.connection_kwargs.get("db") != REDIS_DB:
            raise BenchmarkError(f"refusing to flush: {redis_url} is not Redis db {REDIS_DB}")
        await redis.flushdb()
        print(f"seeding {args.customers} customers into {name} ...", flush=True)
        started = time.perf_counter()
        counts = await seed(
            url, customers=args.customers, seed=args.seed, anchor_date=ANCHOR, profile=profile
        )
        print(
            f"seeded in {time.perf_counter() - started:.1f} s: "
            + ", ".join(f"{v} {k}" for k, v in counts.items()),
            flush=True,
        )
        async with AsyncConnectionPool(url, min_size=2, max_size=4, open=False) as pool:
            await pool.open(wait=True)
            bench = Bench(pool, redis, profile, args.seed)
            await bench.run(args.iterations, args.warmup)
        await redis.flushdb()
    finally:
        await redis.aclose()
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    rows, baseline, all_ok = summarize(bench)
    print()
    print_table(rows, baseline)
    missed = [r["tool"] for r in rows if not r["ok"]]
    print(f"targets: {'all met' if all_ok else 'MISSED by ' + ', '.join(missed)}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "customers": args.customers,
                "iterations": args.iterations,
                "warmup": args.warmup,
                "seed": args.seed,
                "now": NOW.isoformat(),
                "seeded_rows": counts,
                "baseline_select_1": baseline,
                "tools": rows,
                "all_targets_met": all_ok,
            },
            indent=2,
        )
    )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

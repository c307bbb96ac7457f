"""Benchmark: campaign planning (the ``--dry-run`` query) on the CRM in ``DATABASE_URL``.

Usage::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/crm \\
        python benchmarks/campaign_plan.py [--runs 5] [--now 2026-11-30T11:00:00-06:00]

Plans ``service_due`` and ``confirmation`` (writing nothing) ``--runs`` times each on
whatever data the database holds, after applying pending migrations, and checks the
10 s budget for service-due planning. Seed the 100,000-customer CRM first with
``python seed_data.py --customers 100000 --seed 7 --anchor-date 2026-11-30`` (the default
``--now`` is that anchor day, 11:00 in the example dealership's time zone); with fewer
customers the table says so. Writes ``benchmarks/results/campaign_plan.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from campaigns.dialer import plan_campaign  # noqa: E402
from core.profile import DealershipProfile, load_profile  # noqa: E402
from core.settings import DEFAULT_PROFILE  # noqa: E402
from crm.migrate import apply_migrations  # noqa: E402

BUDGET_S = 10.0
TARGET_CUSTOMERS = 100_000


async def time_plans(
    pool: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    campaign: str,
    now: datetime,
    runs: int,
) -> dict[str, object]:
    """Plan ``campaign`` ``runs`` times; seconds of each run and the plan size."""
    seconds = []
    planned = 0
    for _ in range(runs):
        started = time.perf_counter()
        calls = await plan_campaign(pool, profile=profile, campaign=campaign, now=now)
        seconds.append(time.perf_counter() - started)
        planned = len(calls)
    return {
        "campaign": campaign,
        "planned": planned,
        "first_s": round(seconds[0], 3),
        "min_s": round(min(seconds), 3),
        "median_s": round(statistics.median(seconds), 3),
        "max_s": round(max(seconds), 3),
        "runs": runs,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description="campaign planning benchmark")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--now", default="2026-11-30T11:00:00-06:00")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("DATABASE_URL is not set (a database seeded with seed_data.py)", file=sys.stderr)
        return 2
    now = datetime.fromisoformat(args.now)
    profile = load_profile(os.environ.get("DEALERSHIP_PROFILE") or DEFAULT_PROFILE)
    await apply_migrations(url)
    with psycopg.connect(url) as conn:
        sizes = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("customers", "vehicles", "service_history", "appointments")
        }
        server = conn.execute("SHOW server_version").fetchone()[0]
    async with AsyncConnectionPool(url, min_size=1, max_size=2, open=False) as pool:
        results = [
            await time_plans(pool, profile=profile, campaign=c, now=now, runs=args.runs)
            for c in ("service_due", "confirmation")
        ]

    print(
        f"data: {sizes['customers']} customers, {sizes['vehicles']} vehicles, "
        f"{sizes['service_history']} service history rows, {sizes['appointments']} "
        f"appointments; Postgres {server}; now {now.isoformat()}"
    )
    if sizes["customers"] < TARGET_CUSTOMERS:
        print(f"note: fewer than {TARGET_CUSTOMERS} customers; seed with seed_data.py first")
    header = ("campaign", "planned", "first s", "min s", "median s", "max s")
    print("{:<13} {:>8} {:>8} {:>7} {:>9} {:>7}".format(*header))
    for r in results:
        print(
            f"{r['campaign']:<13} {r['planned']:>8} {r['first_s']:>8.3f} {r['min_s']:>7.3f} "
            f"{r['median_s']:>9.3f} {r['max_s']:>7.3f}"
        )
    service_due = results[0]
    ok = service_due["max_s"] < BUDGET_S
    print(f"service-due planning budget {BUDGET_S:.0f} s: {'OK' if ok else 'OVER'}")
    out = ROOT / "benchmarks" / "results" / "campaign_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "now": now.isoformat(),
                "data": sizes,
                "postgres": server,
                "results": results,
                "budget_s": BUDGET_S,
                "within_budget": ok,
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

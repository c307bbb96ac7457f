"""Benchmark: bulk-load the mock CRM with seed_data (COPY) and check the 60 s budget.

Usage::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \
        python benchmarks/seed.py [--customers 100000] [--seed 7]

Creates a scratch database per size on the server of ``DATABASE_URL`` (or an embedded
server when it is unset), seeds it, and reports rows and seconds. The 1,000-customer run is
the in-run baseline: the table shows how the big load scales against it (ratio of
seconds per customer), which is what to compare across noisy shared machines.
Writes ``benchmarks/results/seed.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import date
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seeding import seed  # noqa: E402

BUDGET_S = 60.0


async def run_one(admin_url: str, customers: int, seed_value: int) -> dict[str, object]:
    name = f"va_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    url = make_conninfo(**params)
    try:
        started = time.perf_counter()
        counts = await seed(
            url, customers=customers, seed=seed_value, anchor_date=date(2026, 11, 30)
        )
        elapsed = time.perf_counter() - started
        with psycopg.connect(url) as conn:
            invalid = conn.execute(
                "SELECT count(*) FROM vehicles WHERE NOT vin_check_digit_ok(vin)"
            ).fetchone()[0]
        return {
            "customers": customers,
            "seconds": round(elapsed, 2),
            "rows": counts,
            "invalid_vins": invalid,
        }
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def main() -> int:
    parser = argparse.ArgumentParser(description="seed_data bulk-load benchmark")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    admin_url = os.environ.get("DATABASE_URL")
    server = None
    tmp = None
    if not admin_url:
        from core.embedded import EmbeddedPostgres

        tmp = tempfile.TemporaryDirectory(prefix="va-bench-")
        server = EmbeddedPostgres()
        await server.astart(Path(tmp.name) / "pg")
        admin_url = server.url
    try:
        baseline = await run_one(admin_url, 1_000, args.seed)
        big = await run_one(admin_url, args.customers, args.seed)
    finally:
        if server is not None:
            await server.astop()
            tmp.cleanup()

    per_base = baseline["seconds"] / 1_000
    per_big = big["seconds"] / args.customers
    print(
        f"{'customers':>10} {'seconds':>8} {'vehicles':>9} {'history':>9} {'appts':>7} "
        f"{'ms/1k cust':>11}"
    )
    for r in (baseline, big):
        rows = r["rows"]
        print(
            f"{r['customers']:>10} {r['seconds']:>8.2f} {rows['vehicles']:>9} "
            f"{rows['service_history']:>9} {rows['appointments']:>7} "
            f"{1000 * r['seconds'] / r['customers'] * 1000:>11.1f}"
        )
    ratio = per_big / per_base if per_base else float("nan")
    print(
        f"per-customer cost ratio (big / 1k baseline): {ratio:.2f}; "
        f"budget {BUDGET_S:.0f} s: {'OK' if big['seconds'] < BUDGET_S else 'OVER'}; "
        f"invalid VINs: {big['invalid_vins']}"
    )
    out = ROOT / "benchmarks" / "results" / "seed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"baseline": baseline, "run": big, "ratio": ratio, "budget_s": BUDGET_S}, indent=2
        )
    )
    return 0 if big["seconds"] < BUDGET_S and big["invalid_vins"] == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

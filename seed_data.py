"""Deterministic mock CRM data: customers, vehicles, service history and appointments.

Usage::

    python seed_data.py --customers 100000 --seed 7 [--reset] [--anchor-date 2026-11-30]

Loads into ``DATABASE_URL`` (or, when it is unset, the embedded server under ``DATA_DIR``).
The same seed, customer count and anchor date always produce the same rows, ids included.
``--anchor-date`` is "today" for the data (default: today in the dealership's time zone):
service histories end before it and upcoming appointments start after it.

What it makes:

* the named demo customers of ``seeding.DEMO_CUSTOMERS`` (ids 1-7, listed in the README), so a
  person can try the bot by phone or at ``/client``;
* ``N`` generated customers with 0-3 vehicles each (valid, unique VINs; plausible make,
  model, trim and year), mileage that grows steadily with the vehicle's age, service
  histories, past and upcoming appointments packed onto the bays without overlap;
* edge cases: shared household numbers (``alt_phone``), customers with no vehicle, locked
  verification, do-not-call, no call consent, expired warranties and open recalls.

Rows go in with ``COPY`` (explicit ids, sequences moved past them afterwards). The
catalogue, the builder and :func:`seeding.seed` live in the ``seeding`` package; the
loader is ``crm.bulk_load``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import date
from pathlib import Path

import psycopg

from seeding import DEMO_CUSTOMERS, SeedError, seed

__all__ = ["DEMO_CUSTOMERS", "SeedError", "main", "seed"]


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=200, help="generated customers")
    parser.add_argument("--seed", type=int, default=7, help="RNG seed (default 7)")
    parser.add_argument("--reset", action="store_true", help="replace existing CRM rows")
    parser.add_argument(
        "--anchor-date", type=date.fromisoformat, default=None, help="today for the data"
    )
    args = parser.parse_args(argv)
    if args.customers < 0:
        parser.error("--customers must be >= 0")

    async def run() -> dict[str, int]:
        from core.settings import get_settings

        settings = get_settings()
        if settings.database_url:
            return await seed(
                settings.database_url,
                customers=args.customers,
                seed=args.seed,
                reset=args.reset,
                anchor_date=args.anchor_date,
                progress=sys.stderr.isatty(),
            )
        from core.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres()
        await pg.astart(Path(settings.data_dir) / "postgres")
        try:
            return await seed(
                pg.url,
                customers=args.customers,
                seed=args.seed,
                reset=args.reset,
                anchor_date=args.anchor_date,
                progress=sys.stderr.isatty(),
            )
        finally:
            await pg.astop()

    started = time.perf_counter()
    try:
        counts = asyncio.run(run())
    except SeedError as exc:
        print(f"seed_data: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"seed_data: cannot reach Postgres ({exc}). Check DATABASE_URL.", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    summary = ", ".join(f"{count} {table}" for table, count in counts.items())
    print(f"seeded {summary} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Apply the ordered SQL migrations in ``crm/migrations``.

Run at startup by the app and by ``python -m crm.migrate`` (reads ``DATABASE_URL``).
Idempotent, and safe when several processes start at once: the whole run holds a
Postgres advisory lock, and each file is applied in its own transaction together with
its row in ``schema_migrations``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from importlib import resources
from typing import LiteralString, cast

import psycopg
from loguru import logger

#: Arbitrary constant identifying this application's migration lock.
MIGRATION_LOCK_ID = 0x7661_6D69  # "vami"


def migration_files() -> list[tuple[str, str]]:
    """``(name, sql)`` of every migration, in order."""
    folder = resources.files("crm").joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


async def apply_migrations(conninfo: str) -> list[str]:
    """Apply pending migrations.

    Args:
        conninfo: Postgres connection string.

    Returns:
        Names of the migrations applied by this call (empty when up to date).
    """
    applied: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT name FROM schema_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for name, sql in migration_files():
                if name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(cast(LiteralString, sql))  # our own migration file
                    await conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
                applied.append(name)
                logger.info(f"applied migration {name}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    return applied


def main() -> int:
    """``python -m crm.migrate``: migrate the database in ``DATABASE_URL``."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("DATABASE_URL is not set (e.g. postgresql://postgres@127.0.0.1/crm)", file=sys.stderr)
        return 2
    try:
        applied = asyncio.run(apply_migrations(url))
    except psycopg.OperationalError as exc:
        print(f"Postgres is unreachable: {exc}", file=sys.stderr)
        return 1
    except psycopg.Error as exc:  # a migration refused (e.g. 0025 on overlapping bookings)
        hint = f"\nHint: {exc.diag.message_hint}" if exc.diag.message_hint else ""
        print(f"Migration failed, nothing of it was applied: {exc}{hint}", file=sys.stderr)
        return 1
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

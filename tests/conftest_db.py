"""Database fixtures and test namespaces: tests touch only what they create.

The Postgres server comes from ``TEST_ADMIN_DATABASE_URL`` (set by ``tests/conftest.py``
to ``DATABASE_URL`` or to the embedded server it started). Every database a test creates
is named ``<TEST_DB_PREFIX><session>_<random>`` (``TEST_DB_PREFIX`` defaults to
``va_test_``) and dropped after the test; every Redis key a test writes sits under a
prefix of the same shape (``<prefix>:...``, the app's ``REDIS_KEY_PREFIX``) and only keys
under that prefix are deleted afterwards. Nothing else on a given server is touched.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from crm.migrate import apply_migrations

DEFAULT_TEST_PREFIX = "va_test_"


def test_prefix() -> str:
    """``TEST_DB_PREFIX``: the start of every database name and Redis key tests create."""
    prefix = os.environ.get("TEST_DB_PREFIX", DEFAULT_TEST_PREFIX)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,29}", prefix):
        raise pytest.UsageError(
            f"TEST_DB_PREFIX must be 1-30 lowercase letters, digits or _, got {prefix!r}"
        )
    return prefix


#: This test session's namespace: every database and key prefix it creates starts with it.
SESSION_NAMESPACE = f"{test_prefix()}{uuid.uuid4().hex[:8]}"


def new_name() -> str:
    """A fresh name inside this session's namespace (a database, a Redis key prefix)."""
    return f"{SESSION_NAMESPACE}_{uuid.uuid4().hex[:12]}"


def admin_url() -> str:
    """Connection string of the test server's admin database."""
    url = os.environ.get("TEST_ADMIN_DATABASE_URL")
    if not url:
        raise RuntimeError("TEST_ADMIN_DATABASE_URL is unset: tests/conftest.py sets it")
    return url


def database_url(name: str) -> str:
    """Connection string for database ``name`` on the test server."""
    params = conninfo_to_dict(admin_url())
    params["dbname"] = name
    return make_conninfo(**params)


async def create_database() -> str:
    """Create an empty database in this session's namespace and return its name."""
    name = new_name()
    async with await psycopg.AsyncConnection.connect(admin_url(), autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    return name


async def drop_database(name: str) -> None:
    """Drop a database this session created, disconnecting whoever is still on it."""
    if not name.startswith(f"{SESSION_NAMESPACE}_"):
        raise ValueError(f"refusing to drop {name!r}: this test session did not create it")
    async with await psycopg.AsyncConnection.connect(admin_url(), autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_session_databases() -> list[str]:
    """Drop the databases this session created and left behind (a test that crashed)."""
    with psycopg.connect(admin_url(), autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)",
                (f"{SESSION_NAMESPACE}_",),
            )
        ]
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return names


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


async def delete_keys(client: aioredis.Redis, prefix: str) -> int:
    """Delete the keys under ``prefix`` (``<prefix>:...`` and ``<prefix>_...``), only those.

    Args:
        client: A client on the given Redis.
        prefix: A name from :func:`new_name` or :data:`SESSION_NAMESPACE`.

    Returns:
        How many keys were deleted.
    """
    if not prefix.startswith(SESSION_NAMESPACE):
        raise ValueError(f"refusing to delete keys under {prefix!r}: not this session's")
    deleted = 0
    for pattern in (f"{_glob_escape(prefix)}:*", f"{_glob_escape(prefix)}_*"):
        batch = []
        async for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += await client.unlink(*batch)
                batch = []
        if batch:
            deleted += await client.unlink(*batch)
    return deleted


@pytest.fixture
async def fresh_db() -> AsyncIterator[str]:
    """Connection string of a new, empty database (dropped after the test)."""
    name = await create_database()
    try:
        yield database_url(name)
    finally:
        await drop_database(name)


@pytest.fixture
async def migrated_db(fresh_db: str) -> str:
    """A new database with every CRM migration applied."""
    await apply_migrations(fresh_db)
    return fresh_db

"""Database fixtures: a fresh, uniquely named database per test.

The server comes from ``TEST_ADMIN_DATABASE_URL`` (set by ``tests/conftest.py`` to
``DATABASE_URL`` or to the embedded server it started).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from crm.migrate import apply_migrations


def admin_url() -> str:
    """Connection string of the test server's admin database."""
    return os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def database_url(name: str) -> str:
    """Connection string for database ``name`` on the test server."""
    params = conninfo_to_dict(admin_url())
    params["dbname"] = name
    return make_conninfo(**params)


async def create_database() -> str:
    """Create an empty uniquely named database and return its name."""
    name = f"va_test_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(admin_url(), autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    return name


async def drop_database(name: str) -> None:
    """Drop a test database, disconnecting whoever is still on it."""
    async with await psycopg.AsyncConnection.connect(admin_url(), autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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

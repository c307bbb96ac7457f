"""Shared fixtures: Postgres and Redis for tests.

Tests use ``DATABASE_URL`` / ``REDIS_URL`` when they are set (CI on a machine with local
services may set them). Otherwise they start the same embedded servers the app uses,
once per test session, in a temporary directory. No database test is ever skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

pytest_plugins = ["tests.conftest_db"]


@pytest.fixture(scope="session", autouse=True)
def postgres_server_url() -> Iterator[str]:
    """An admin connection string to a Postgres server for the whole test session.

    Sets ``TEST_ADMIN_DATABASE_URL`` for the database fixtures in ``tests.conftest_db``.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        os.environ["TEST_ADMIN_DATABASE_URL"] = url
        yield url
        return
    from core.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="va-pg-") as tmp:
        server = EmbeddedPostgres()
        server.start(Path(tmp) / "pg")
        os.environ["TEST_ADMIN_DATABASE_URL"] = server.url
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A Redis URL for the whole test session (``REDIS_URL`` or an embedded server)."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from core.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="va-rd-") as tmp:
        server = EmbeddedRedis()
        server.start(Path(tmp) / "redis")
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
async def redis_client(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client on a test-only logical database, emptied before each test."""
    client = aioredis.Redis.from_url(redis_server_url, db=13)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()

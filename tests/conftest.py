"""Shared fixtures: Postgres and Redis for tests.

Tests use ``DATABASE_URL`` / ``REDIS_URL`` when they are set (CI on a machine with local
services may set them). Otherwise they start the same embedded servers the app uses,
once per test session, in a temporary directory. No database test is ever skipped.

On a given server, tests touch only what they create (see ``tests/conftest_db.py``):
databases named ``<TEST_DB_PREFIX>...``, dropped afterwards, and Redis keys under a
per-test prefix (the app's ``REDIS_KEY_PREFIX``), deleted afterwards. No test flushes a
Redis database or picks a database number of its own.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from tests.conftest_db import SESSION_NAMESPACE, delete_keys, drop_session_databases, new_name

pytest_plugins = ["tests.conftest_db"]

# In-process Settings read the environment: anything a test builds without its own
# prefix still writes inside this session's namespace, never under "voice_agent".
os.environ["REDIS_KEY_PREFIX"] = SESSION_NAMESPACE


@pytest.fixture(scope="session", autouse=True)
def postgres_server_url() -> Iterator[str]:
    """An admin connection string to a Postgres server for the whole test session.

    Sets ``TEST_ADMIN_DATABASE_URL`` for the database fixtures in ``tests.conftest_db``.
    On a given server, databases this session left behind are dropped at the end.
    """
    url = os.environ.get("DATABASE_URL")
    if url:
        os.environ["TEST_ADMIN_DATABASE_URL"] = url
        try:
            yield url
        finally:
            drop_session_databases()
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
    """A Redis URL for the whole test session (``REDIS_URL`` or an embedded server).

    On a given server, keys this session left behind (under its namespace) are deleted at
    the end; nothing else is touched.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            yield url
        finally:
            client = redis.Redis.from_url(url)
            try:
                keys = list(client.scan_iter(match=f"{SESSION_NAMESPACE}*", count=500))
                if keys:
                    client.unlink(*keys)
            finally:
                client.close()
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
def server_tmp() -> Iterator[Path]:
    """A temporary directory for embedded servers a test starts itself.

    Not ``tmp_path``: pytest keeps ``/tmp/pytest-of-<user>`` at mode 0700 (any pytest run
    starting meanwhile resets it), which the unprivileged Postgres user (when tests run
    as root) cannot traverse. Short, too: unix socket paths are limited.
    """
    with tempfile.TemporaryDirectory(prefix="va-t-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def redis_key_prefix(redis_server_url: str) -> AsyncIterator[str]:
    """This test's Redis key prefix (pass it as ``REDIS_KEY_PREFIX`` / ``key_prefix``);
    the keys under it are deleted after the test."""
    prefix = new_name()
    try:
        yield prefix
    finally:
        client = aioredis.Redis.from_url(redis_server_url)
        try:
            await delete_keys(client, prefix)
        finally:
            await client.aclose()


@pytest.fixture
async def redis_client(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the test Redis, as given (its own database number, no flush): write
    only under the test's ``redis_key_prefix``."""
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        await client.aclose()

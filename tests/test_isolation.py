"""Tests touch only what they create on the servers they are given.

A nested test run gets ``REDIS_URL`` / ``DATABASE_URL`` of servers this test started and
filled with sentinels: keys in the app's own namespace and in another logical database,
and databases that look like other test runs'. Afterwards the sentinels are intact and the
nested run left nothing of its own behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from pydantic import ValidationError

from core.embedded import EmbeddedPostgres, EmbeddedRedis
from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
NESTED_PREFIX = "va_nested_"
#: Tests that write Redis keys (verification counters and locks, snapshots, a console
#: subprocess) and create databases.
NESTED_TESTS = [
    "tests/test_tools.py::test_lockout_after_three_failures_shared_by_concurrent_calls",
    "tests/test_tools.py::test_caller_id_plus_one_factor_verifies",
    "tests/test_session_snapshot.py::test_write_sets_ttl_and_active",
    "tests/test_console.py::test_console_verifies_lists_and_books_for_a_demo_customer",
]
SENTINEL_KEYS = {
    "voice_agent:calls:active": "CA-sentinel",
    "voice_agent:verify:lock:1": "sentinel lock",
    "voice_agent:verify:fail:2": "sentinel count",
    "sentinel:plain": "keep me",
}


def _databases(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


@pytest.mark.timeout(900)
def test_a_test_run_leaves_what_it_did_not_create_alone(server_tmp: Path) -> None:
    pg = EmbeddedPostgres().start(server_tmp / "pg")
    rd = EmbeddedRedis().start(server_tmp / "redis")
    try:
        admin = pg.url.replace("/voice_agent?", "/postgres?")
        main = redis.Redis.from_url(rd.url)
        other_db = redis.Redis.from_url(rd.url, db=13)
        for key, value in SENTINEL_KEYS.items():
            if key.endswith(":active"):
                main.sadd(key, value)
            else:
                main.set(key, value)
        other_db.set("sentinel:db13", "keep me")
        sentinel_dbs = [
            f"sentinel_{uuid.uuid4().hex[:8]}",
            f"va_test_{uuid.uuid4().hex[:8]}",  # another run's name with the default prefix
            f"{NESTED_PREFIX}sentinel",  # our prefix, but not created by the nested run
        ]
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in sentinel_dbs:
                conn.execute(f'CREATE DATABASE "{name}"')
        databases_before = _databases(admin)

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(server_tmp),
            "PYTHONPATH": str(REPO),
            "REDIS_URL": rd.url,
            "DATABASE_URL": admin,
            "TEST_DB_PREFIX": NESTED_PREFIX,
        }
        nested = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NESTED_TESTS],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert nested.returncode == 0, nested.stdout[-4000:] + nested.stderr[-2000:]
        assert f"{len(NESTED_TESTS)} passed" in nested.stdout, nested.stdout[-2000:]

        # The sentinels are intact.
        assert main.smembers("voice_agent:calls:active") == {b"CA-sentinel"}
        for key, value in SENTINEL_KEYS.items():
            if not key.endswith(":active"):
                assert main.get(key) == value.encode(), key
        assert other_db.get("sentinel:db13") == b"keep me"
        assert _databases(admin) == databases_before
        # The nested run left nothing of its own: no key, no database.
        for db in (main, other_db):
            assert list(db.scan_iter(match=f"{NESTED_PREFIX}*")) == []
        assert main.dbsize() == len(SENTINEL_KEYS)
        assert other_db.dbsize() == 1
        main.close()
        other_db.close()
    finally:
        rd.stop()
        pg.stop()


def test_the_key_prefix_setting() -> None:
    assert Settings(_env_file=None, REDIS_KEY_PREFIX="shop_1:").redis_key_prefix == "shop_1"
    assert Settings(_env_file=None, REDIS_KEY_PREFIX=" ").redis_key_prefix == "voice_agent"
    assert Settings(_env_file=None, REDIS_KEY_PREFIX="shop:1").redis_key_prefix == "shop:1"
    for bad in ("two words", "star*", "br[ack]et"):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, REDIS_KEY_PREFIX=bad)

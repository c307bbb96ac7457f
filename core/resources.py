"""Process-wide resources: one Postgres pool and one Redis client per process.

Opened once in the FastAPI lifespan (or a CLI command) by :func:`open_resources`. When
``DATABASE_URL`` / ``REDIS_URL`` are unset, embedded servers are started under
``DATA_DIR`` (or the ones another process already runs there are reused) and left again
on exit; the last process to leave stops them (see :mod:`core.embedded`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import redis.asyncio as aioredis
from loguru import logger
from psycopg_pool import AsyncConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_exponential

from core.pending import PendingWrites
from core.profile import DealershipProfile, load_profile
from core.settings import Settings

T = TypeVar("T")


class StartupError(RuntimeError):
    """A dependency is unreachable or misconfigured; the message says what and how to fix it."""


class SharedClients:
    """HTTP API clients shared by every call of the process, closed at shutdown.

    Pipecat's OpenAI service builds a client per service instance, that is per call, with
    keep-alive connections that never expire; sharing one client reuses connections (and
    their TLS sessions) across calls and leaves nothing open after a call.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._openai: Any = None

    def openai(self) -> Any:
        """The process's ``AsyncOpenAI`` client (created on first use)."""
        if self._openai is None:
            from openai import AsyncOpenAI, DefaultAsyncHttpxClient

            self._settings.require("OPENAI_API_KEY")
            assert self._settings.openai_api_key is not None
            self._openai = AsyncOpenAI(
                api_key=self._settings.openai_api_key.get_secret_value(),
                base_url=self._settings.openai_base_url,
                # The LLM service retries itself, within LLM_TIMEOUT_SECS: the SDK's own
                # retries would sleep through a 429's Retry-After while the caller waits.
                max_retries=0,
                # The SDK's client is httpx2's, so are its limits.
                http_client=DefaultAsyncHttpxClient(
                    limits=httpx2.Limits(
                        max_keepalive_connections=50, max_connections=500, keepalive_expiry=60
                    )
                ),
            )
        return self._openai

    async def aclose(self) -> None:
        """Close whatever was opened."""
        if self._openai is not None:
            await self._openai.close()
            self._openai = None


@dataclass
class AppResources:
    """Everything a request or a call needs from the process."""

    settings: Settings
    profile: DealershipProfile
    db: AsyncConnectionPool
    redis: aioredis.Redis
    database_url: str
    redis_url: str
    embedded: list[object] = field(default_factory=list)
    clients: SharedClients | None = None
    pending: PendingWrites | None = None


#: Seconds a failed reconnection keeps being retried in the background before the pool
#: gives up on it; the next request then starts a fresh attempt at once. psycopg_pool
#: doubles its wait between attempts (1, 2, 4, 8 s...), so with its default of 300 s a
#: database back after a 10 s outage was only reconnected 5 to 18 s later.
DB_RECONNECT_TIMEOUT_SECS = 2.0
#: Seconds a new database connection may take (a black-holed server fails here).
DB_CONNECT_TIMEOUT_SECS = 2


def new_pool(database_url: str, *, timeout: float, max_size: int = 20) -> AsyncConnectionPool:
    """The process's connection pool, tuned to fail fast and recover fast.

    * ``check``: every connection handed out is checked first (one empty round trip), so
      connections killed by a database restart are replaced instead of failing a query.
    * ``timeout``: a request waits at most ``timeout`` seconds for a connection, so a dead
      database fails the request fast (the default is 30 s of silence on a call).
    * ``reconnect_timeout``: see :data:`DB_RECONNECT_TIMEOUT_SECS`.
    * ``max_idle``: idle connections beyond ``min_size`` are closed after a minute.
    * TCP keepalives and ``connect_timeout``: a connection to a server that vanished from
      the network is noticed in seconds, not after the kernel's two hours.

    Args:
        database_url: Connection string.
        timeout: Seconds a request waits for a connection.
        max_size: Most connections.

    Returns:
        The pool (not opened).
    """
    return AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        open=False,
        timeout=timeout,
        check=AsyncConnectionPool.check_connection,
        reconnect_timeout=DB_RECONNECT_TIMEOUT_SECS,
        max_idle=60.0,
        kwargs={
            "connect_timeout": DB_CONNECT_TIMEOUT_SECS,
            "keepalives": 1,
            "keepalives_idle": 5,
            "keepalives_interval": 2,
            "keepalives_count": 3,
        },
    )


def new_redis_client(redis_url: str) -> aioredis.Redis:
    """The process's Redis client: short timeouts and few, quick retries.

    redis-py retries a failed command 10 times with up to a second between tries by
    default, about 4 s in all, which a caller hears as dead air when Redis is down.

    Args:
        redis_url: ``redis://`` or ``unix://`` URL.

    Returns:
        The client.
    """
    return aioredis.Redis.from_url(
        redis_url,
        socket_connect_timeout=1,
        socket_timeout=2,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.2), retries=2),
    )


async def retry_with_backoff(
    action: Callable[[], Awaitable[T]],
    *,
    what: str,
    attempts: int = 5,
    first_delay: float = 0.2,
    max_delay: float = 3.0,
) -> T:
    """Run ``action`` until it succeeds, sleeping with exponential backoff in between.

    Args:
        action: Coroutine factory to run.
        what: Human description used in log lines ("Postgres", "Redis").
        attempts: Total tries before giving up.
        first_delay: Seconds to wait after the first failure.
        max_delay: Cap on the wait between tries.

    Returns:
        Whatever ``action`` returned.

    Raises:
        Exception: The last error when every attempt failed.
    """

    def log_failure(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        logger.warning(f"{what} not reachable (attempt {state.attempt_number}/{attempts}): {exc}")

    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=first_delay, exp_base=2, max=max_delay),
        before_sleep=log_failure,
        reraise=True,
    ):
        with attempt:
            return await action()
    raise AssertionError("unreachable")


async def check_database(pool: AsyncConnectionPool) -> None:
    """Run a real query through the app's pool (raises when Postgres does not answer).

    Args:
        pool: The pool the app uses.

    Raises:
        Exception: The pool gave no connection in 3 s, or the query failed.
    """
    async with pool.connection(timeout=3) as conn:
        cur = await conn.execute("SELECT 1")
        if await cur.fetchone() != (1,):
            raise RuntimeError("Postgres answered SELECT 1 with something else")


async def check_redis(client: aioredis.Redis) -> None:
    """PING Redis on the app's client (raises when Redis does not answer PONG).

    Args:
        client: The Redis client the app uses.

    Raises:
        Exception: No answer in 3 s, a connection error, or an answer other than PONG.
    """
    if await asyncio.wait_for(client.ping(), timeout=3) is not True:
        raise RuntimeError("Redis did not answer PONG")


@contextlib.asynccontextmanager
async def open_resources(
    settings: Settings,
    *,
    migrate: Callable[[str], Awaitable[object]] | None,
    seed_demo: Callable[[str], Awaitable[object]] | None,
) -> AsyncIterator[AppResources]:
    """Open the pool and the Redis client (starting embedded servers when needed).

    Args:
        settings: Application settings.
        migrate: Applies pending CRM migrations to a database URL before the pool opens
            (``crm.migrate.apply_migrations``); ``None`` applies none.
        seed_demo: Seeds the demo CRM data into an embedded database on its first start
            (given its URL; what it returns is logged); ``None`` seeds nothing.

    Yields:
        The process resources; everything is closed and stopped on exit.

    Raises:
        StartupError: A dependency is unreachable; the message names it and the fix.
    """
    from core.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

    profile = load_profile(settings.dealership_profile)
    embedded: list[object] = []
    async with contextlib.AsyncExitStack() as stack:
        database_url = settings.database_url
        fresh_embedded_db = False
        if not database_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            pg = EmbeddedPostgres()
            try:
                await pg.astart(settings.data_dir / "postgres")
            except EmbeddedServerError as exc:
                raise StartupError(f"{exc}\n(or set DATABASE_URL)") from exc
            fresh_embedded_db = pg.initialized_here  # only the process that ran initdb seeds
            stack.push_async_callback(pg.astop)
            embedded.append(pg)
            database_url = pg.url
            logger.info("DATABASE_URL unset: using the embedded Postgres under DATA_DIR")
        redis_url = settings.redis_url
        if not redis_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            rd = EmbeddedRedis()
            try:
                await rd.astart(settings.data_dir / "redis")
            except EmbeddedServerError as exc:
                raise StartupError(f"{exc}\n(or set REDIS_URL)") from exc
            stack.push_async_callback(rd.astop)
            embedded.append(rd)
            redis_url = rd.url
            logger.info("REDIS_URL unset: using the embedded Redis under DATA_DIR")

        if migrate is not None:
            try:
                await retry_with_backoff(lambda: migrate(database_url), what="Postgres", attempts=5)
            except Exception as exc:
                raise StartupError(
                    f"Postgres is unreachable or refused the migrations ({exc}). Check "
                    "DATABASE_URL, or unset it to use the embedded server."
                ) from exc
        if seed_demo is not None and fresh_embedded_db:
            summary = await seed_demo(database_url)
            logger.info(f"Seeded the embedded CRM with demo data: {summary}")

        pool = new_pool(database_url, timeout=settings.db_timeout_secs)
        await pool.open(wait=False)
        stack.push_async_callback(pool.close)
        try:
            await retry_with_backoff(lambda: check_database(pool), what="Postgres")
        except Exception as exc:
            raise StartupError(
                f"Postgres is unreachable ({exc}). Check DATABASE_URL, or unset it to use "
                "the embedded server."
            ) from exc

        client = new_redis_client(redis_url)
        stack.push_async_callback(client.aclose)
        try:
            await retry_with_backoff(lambda: check_redis(client), what="Redis")
        except Exception as exc:
            raise StartupError(
                f"Redis is unreachable ({exc}). Check REDIS_URL, or unset it to use the "
                "embedded server."
            ) from exc

        clients = SharedClients(settings)
        stack.push_async_callback(clients.aclose)
        pending = PendingWrites(
            pool,
            timeout=settings.db_timeout_secs,
            give_up_after=settings.pending_writes_max_age_secs,
        )
        pending.start()
        stack.push_async_callback(pending.aclose)  # before the pool closes
        yield AppResources(
            clients=clients,
            settings=settings,
            profile=profile,
            db=pool,
            redis=client,
            database_url=database_url,
            redis_url=redis_url,
            embedded=embedded,
            pending=pending,
        )

"""Database writes that must survive a Postgres outage: call records, callback requests.

A call goes on when Postgres is down (the caller hears an apology and is transferred or
told what happens next); what the call must leave behind (its ``calls`` row, a callback
request) is written as soon as Postgres is back. :class:`PendingWrites` tries a write at
once with a short deadline; when that fails it keeps the write in memory, in order, and a
background task retries with backoff. Writes must be idempotent (the ``crm.calls``
functions are keyed by CallSid). A write still failing after ``give_up_after`` seconds, or
still queued when the process stops, is logged as an error naming the call and what was
lost (no personal data).

The queue is in-process: a crash of the process loses what it holds (logged on a clean
shutdown). Redis is not used for it, because the outage it covers may be the network that
Redis sits behind too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

Write = Callable[[AsyncConnection], Awaitable[Any]]


@dataclass
class PendingWrite:
    """One queued write.

    Attributes:
        call_sid: The call it belongs to (for log lines).
        what: Human description, e.g. ``"call record"``.
        write: Coroutine function taking a connection; must be idempotent.
        queued_at: Monotonic time it was queued.
        attempts: Tries so far.
    """

    call_sid: str
    what: str
    write: Write
    queued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0


class PendingWrites:
    """Writes tried now, or queued and retried in the background until Postgres is back.

    Args:
        pool: The process's connection pool.
        timeout: Deadline of one try (getting a connection and running the write).
        retry_initial: First wait between background retries.
        retry_max: Longest wait between background retries.
        give_up_after: Seconds after which a queued write is dropped with an error log.
        max_queued: Queue bound; the oldest write is dropped (with an error log) beyond it.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        timeout: float = 1.0,
        retry_initial: float = 0.25,
        retry_max: float = 5.0,
        give_up_after: float = 3600.0,
        max_queued: int = 10_000,
    ) -> None:
        self._pool = pool
        self.timeout = timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._give_up_after = give_up_after
        self._max_queued = max_queued
        self._queue: deque[PendingWrite] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written_late = 0
        self.lost = 0

    @property
    def pending(self) -> int:
        """Writes waiting for Postgres."""
        return len(self._queue)

    def start(self) -> None:
        """Start the background retrier (on the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._retrier(), name="pending-db-writes")

    async def aclose(self, *, drain_timeout: float = 3.0) -> None:
        """Stop the retrier after one last attempt to write what is queued.

        Args:
            drain_timeout: How long to keep trying before giving up on what is left.
        """
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + drain_timeout
        while self._queue and time.monotonic() < deadline:
            if not await self._try(self._queue[0]):
                await asyncio.sleep(0.2)
                continue
            self._queue.popleft()
        while self._queue:
            self._lose(self._queue.popleft(), "the process stopped while Postgres was unreachable")

    async def write(self, *, call_sid: str, what: str, write: Write) -> bool:
        """Run ``write`` now, or queue it for when Postgres is back.

        Never raises for a database failure and never waits longer than ``timeout``.
        Writes for the same call keep their order: while earlier ones are queued, later
        ones are queued behind them.

        Args:
            call_sid: The call the write belongs to.
            what: What is written, for log lines (no personal data).
            write: Idempotent coroutine function taking a connection.

        Returns:
            True when written now, False when queued.
        """
        item = PendingWrite(call_sid=call_sid, what=what, write=write)
        if not any(p.call_sid == call_sid for p in self._queue) and await self._try(item):
            return True
        self._enqueue(item)
        return False

    def _enqueue(self, item: PendingWrite) -> None:
        if len(self._queue) >= self._max_queued:
            self._lose(self._queue.popleft(), "the queue of pending writes was full")
        self._queue.append(item)
        logger.warning(
            f"call {item.call_sid}: {item.what} not written (Postgres unreachable); "
            f"queued, {len(self._queue)} waiting"
        )
        self.start()
        self._wakeup.set()

    async def _try(self, item: PendingWrite) -> bool:
        item.attempts += 1
        try:
            # The deadline covers the connection check as well: a pooled connection to a
            # black-holed server would otherwise wait for TCP to give up.
            async with asyncio.timeout(self.timeout):
                async with self._pool.connection(timeout=self.timeout) as conn:
                    await item.write(conn)
        except Exception as exc:
            if item.attempts == 1:
                logger.debug(f"call {item.call_sid}: {item.what} failed: {type(exc).__name__}")
            return False
        return True

    def _lose(self, item: PendingWrite, why: str) -> None:
        self.lost += 1
        age = time.monotonic() - item.queued_at
        logger.error(
            f"call {item.call_sid}: {item.what} LOST after {item.attempts} attempts over "
            f"{age:.0f} s: {why}"
        )

    async def _retrier(self) -> None:
        delay = self._retry_initial
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                delay = self._retry_initial
                continue
            item = self._queue[0]
            if time.monotonic() - item.queued_at > self._give_up_after:
                self._queue.popleft()
                self._lose(item, f"Postgres unreachable for more than {self._give_up_after:.0f} s")
                continue
            if await self._try(item):
                self._queue.popleft()
                self.written_late += 1
                late = time.monotonic() - item.queued_at
                logger.info(f"call {item.call_sid}: {item.what} written {late:.1f} s late")
                delay = self._retry_initial
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._retry_max)

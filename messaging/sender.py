"""The one rate-limited sender every text goes through.

Each process that sends (the web server, the campaign worker) runs a :class:`Sender` over
the shared outbox (``messages`` rows, see ``crm/messages.py``). Per pass it first settles
the due texts that must not go out (opted-out number, no consent, expired, appointment
changed), then claims one sendable text at a time, waits for the number's throughput
(``[texting] messages_per_second``; a token shared through Redis by every process that
sends from the same number), checks the opt-out once more and sends it through Twilio.

Twilio's answer is recorded on the row (MessageSid, or the error). Delivery status
callbacks (:func:`record_delivery_status`) mark texts delivered, undelivered or failed; a
transient failure (``telephony.sms.is_transient``) is retried once, as a new row, after
``retry_after_minutes``. Error 21610 (the recipient texted STOP to Twilio) also records the
number's opt-out here.

A sender wakes on ``NOTIFY sms_outbox`` (sent when a text is queued, by any process) and
otherwise looks every ``poll_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time as time_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from core.pii import mask_phone
from core.profile import DealershipProfile
from core.settings import Settings
from crm import messages as crm
from messaging.bodies import render, scrub
from telephony.sms import UNSUBSCRIBED_CODE, SmsSendError, is_transient, send_sms, sender_identity

#: A text claimed this long ago without a MessageSid belongs to a sender that died.
STALE_SENDING = timedelta(minutes=10)
_RATE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now, nxt)
redis.call('SET', KEYS[1], slot + tonumber(ARGV[1]), 'PX', tonumber(ARGV[1]) + 60000)
return slot - now
"""


class LocalRateLimiter:
    """Spaces events at least ``1 / per_second`` seconds apart within this process."""

    def __init__(self, per_second: float) -> None:
        self._interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when the next event may happen."""
        async with self._lock:
            delay = self._next - time_mod.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next = max(time_mod.monotonic(), self._next) + self._interval


class RedisRateLimiter:
    """Spaces events at least ``1 / per_second`` seconds apart across processes.

    Each call reserves the next free slot of ``key`` atomically (a Lua script on Redis's
    clock) and sleeps until it.
    """

    def __init__(self, redis: Any, *, key: str, per_second: float) -> None:
        self._redis = redis
        self._key = key
        self._interval_ms = max(1, round(1000.0 / per_second))

    async def wait(self) -> None:
        """Return when the next event may happen."""
        delay_ms = int(await self._redis.eval(_RATE_SCRIPT, 1, self._key, self._interval_ms))
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000.0)


@dataclass
class SendStats:
    """What one pass of a sender did."""

    sent: int = 0
    failed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    sids: list[str] = field(default_factory=list)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Sender:
    """Sends queued texts with the number's throughput, never to an opted-out number.

    Args:
        db: Connection pool.
        settings: Twilio credentials, sender, public URL (status callbacks).
        profile: Dealership profile (texting settings, what texts say).
        redis: Redis client for the shared rate limit; a per-process limit without it.
        conninfo: Connection string for ``LISTEN sms_outbox``; polling only without it.
        clock: Returns the current instant (tests); real time by default.
        poll_seconds: Pause between passes when nothing wakes the sender.
        messages_per_second: Overrides ``[texting] messages_per_second``.
    """

    def __init__(
        self,
        db: AsyncConnectionPool,
        *,
        settings: Settings,
        profile: DealershipProfile,
        redis: Any = None,
        conninfo: str | None = None,
        clock: Callable[[], datetime] | None = None,
        poll_seconds: float = 5.0,
        messages_per_second: float | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.profile = profile
        rate = messages_per_second or profile.texting.messages_per_second
        self.limiter: LocalRateLimiter | RedisRateLimiter = (
            RedisRateLimiter(
                redis, key=f"voice_agent:sms:rate:{sender_identity(settings)}", per_second=rate
            )
            if redis is not None
            else LocalRateLimiter(rate)
        )
        self._conninfo = conninfo
        self._clock = clock or _utcnow
        self.poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._stopping = False
        #: Counts since start (no MessageSids: a long-running process keeps no list).
        self.total = SendStats()

    def now(self) -> datetime:
        """The sender's clock."""
        return self._clock()

    def wake(self) -> None:
        """Look at the outbox now (something was queued)."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the text in hand, then leave :meth:`run`."""
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """Send until :meth:`stop` (or cancellation)."""
        listener = asyncio.create_task(self._listen()) if self._conninfo else None
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    await self.drain()
                except (psycopg.Error, OSError) as exc:
                    logger.warning(f"text sender pass failed: {type(exc).__name__}")
                except Exception as exc:
                    logger.opt(exception=exc).error(f"text sender pass: {type(exc).__name__}")
                if self._stopping:
                    break
                # asyncio.timeout, not wait_for: no helper task per wait.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._wake.wait()
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _listen(self) -> None:
        """Wake the sender on ``NOTIFY sms_outbox``; reconnect after errors."""
        assert self._conninfo is not None
        while not self._stopping:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await crm.listen_outbox(conn)
                    self._wake.set()  # whatever was queued while not listening
                    while not self._stopping:
                        async for _ in conn.notifies(timeout=30.0):
                            self._wake.set()
            except (psycopg.Error, OSError) as exc:
                logger.warning(f"text sender: outbox listener lost ({type(exc).__name__})")
                await asyncio.sleep(self.poll_seconds)

    async def drain(self) -> SendStats:
        """One pass: settle what must not go out, then send every sendable due text."""
        stats = SendStats()
        async with self.db.connection() as conn:
            stats.skipped = await crm.sweep_outbox(conn, now=self.now(), stale_after=STALE_SENDING)
        if stats.skipped:
            logger.info(f"text outbox: {stats.skipped}")
        while not self._stopping:
            async with self.db.connection() as conn:
                claimed = await crm.claim_next(conn, now=self.now())
            if claimed is None:
                break
            await self._send(claimed, stats)
        self.total.sent += stats.sent
        self.total.failed += stats.failed
        for key, count in stats.skipped.items():
            self.total.skipped[key] = self.total.skipped.get(key, 0) + count
        return stats

    async def _body(self, claimed: crm.ClaimedText) -> str | None:
        if claimed.body is not None:
            return scrub(claimed.body)
        async with self.db.connection() as conn:
            facts = await crm.text_facts(conn, claimed.id)
        return render(facts, self.profile) if facts is not None else None

    async def _send(self, claimed: crm.ClaimedText, stats: SendStats) -> None:
        try:
            body = await self._body(claimed)
        except Exception as exc:
            logger.opt(exception=exc).error(f"text {claimed.id}: body failed: {type(exc).__name__}")
            body = None
        if not body:
            async with self.db.connection() as conn:
                await crm.mark_send_failed(
                    conn, message_id=claimed.id, code=None, error="no body", now=self.now()
                )
            stats.failed += 1
            return
        await self.limiter.wait()
        async with self.db.connection() as conn:
            if not await crm.still_sendable(conn, message_id=claimed.id, now=self.now()):
                await crm.release_claim(
                    conn, message_id=claimed.id, reason="opted out", now=self.now()
                )
                stats.skipped["opted out"] = stats.skipped.get("opted out", 0) + 1
                return
        try:
            sent = await send_sms(self.settings, to=claimed.phone, body=body)
        except SmsSendError as exc:
            stats.failed += 1
            async with self.db.connection() as conn:
                result = await crm.mark_send_failed(
                    conn, message_id=claimed.id, code=exc.code, error=str(exc), now=self.now()
                )
                if result is not None:
                    await _after_failure(
                        conn, result, profile=self.profile, now=self.now(), transient=exc.transient
                    )
            return
        except Exception as exc:
            stats.failed += 1
            logger.opt(exception=exc).error(f"text {claimed.id}: {type(exc).__name__}")
            async with self.db.connection() as conn:
                await crm.mark_send_failed(
                    conn,
                    message_id=claimed.id,
                    code=None,
                    error=f"{type(exc).__name__} while sending",
                    now=self.now(),
                )
            return
        stats.sent += 1
        stats.sids.append(sent.sid)
        async with self.db.connection() as conn:
            early = await crm.mark_sent(
                conn,
                message_id=claimed.id,
                sid=sent.sid,
                twilio_status=sent.status,
                body=body,
                now=self.now(),
            )
            if early is not None:
                await _after_failure(conn, early, profile=self.profile, now=self.now())
        logger.info(
            f"text {claimed.id} ({claimed.kind}) to {mask_phone(claimed.phone)} sent as {sent.sid}"
        )


async def _after_failure(
    conn: psycopg.AsyncConnection,
    result: crm.StatusResult,
    *,
    profile: DealershipProfile,
    now: datetime,
    transient: bool | None = None,
) -> int | None:
    """Follow a failed or undelivered text up: opt-out on 21610, one retry if transient.

    Returns:
        The id of the retry queued, if any.
    """
    if result.status not in ("failed", "undelivered"):
        return None
    if result.error_code == UNSUBSCRIBED_CODE:
        await crm.opt_out(conn, phone=result.phone, keyword="twilio-21610")
    retry_id = None
    retryable = transient if transient is not None else is_transient(result.error_code)
    if retryable and result.retry_of is None:
        retry_id = await crm.queue_retry(
            conn,
            message_id=result.id,
            not_before=now + timedelta(minutes=profile.texting.retry_after_minutes),
        )
    logger.warning(
        f"text {result.id} ({result.kind}) to {mask_phone(result.phone)}: {result.status}, "
        f"error {result.error_code}" + (f"; retry {retry_id} queued" if retry_id else "")
    )
    return retry_id


async def record_delivery_status(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    sid: str,
    status: str,
    error_code: int | None,
    now: datetime | None = None,
) -> crm.StatusResult | None:
    """Apply a Twilio message status callback (once), and follow a failure up.

    Args:
        db: Connection pool.
        profile: Dealership profile (retry delay).
        sid: MessageSid.
        status: ``MessageStatus`` (queued, sent, delivered, undelivered, failed...).
        error_code: ``ErrorCode``, if any.
        now: The current instant (tests).

    Returns:
        The message when the callback changed it, else ``None``.
    """
    now = now or _utcnow()
    async with db.connection() as conn:
        result = await crm.apply_status_callback(
            conn, sid=sid, status=status, error_code=error_code, now=now
        )
        if result is not None:
            await _after_failure(conn, result, profile=profile, now=now)
    return result

"""The campaign worker: runs scheduled campaigns and due retries (``runner.py worker``).

Any number of workers may run; only the one holding a Postgres session advisory lock
(``pg_try_advisory_lock`` on a dedicated connection) dials. The others wait and try again,
and take over within one poll when the holder stops or its connection drops. A scheduled
slot (e.g. ``weekdays 11:00``) runs once per day: its ``campaign_runs`` row is inserted
with ``ON CONFLICT DO NOTHING`` before it runs.

On SIGTERM (or SIGINT) the worker takes no new work, lets dial requests already sent to
Twilio finish and be recorded, releases the lock and exits. Calls already connected are
the web server's: they go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from campaigns.dialer import Dialer, DialFn, DialStats, housekeeping, run_campaign, run_due_retries
from core.profile import DealershipProfile
from core.settings import Settings
from crm import campaigns as crm

#: Advisory lock key of the dialing worker ("vamc").
WORKER_LOCK_ID = 0x7661_6D63
#: Server-side TCP keepalives of the lock's connection (seconds, seconds, probes).
LOCK_KEEPALIVES = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
}


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    held_lock: bool = False
    runs: list[tuple[str, str, str]] = field(default_factory=list)
    dialed: int = 0
    retried: int = 0

    def add(self, stats: DialStats, *, retry: bool) -> None:
        """Count a batch of dials."""
        if retry:
            self.retried += stats.dialed
        else:
            self.dialed += stats.dialed


class _Lock:
    """A session advisory lock held on its own connection."""

    def __init__(self, conninfo: str, key: int) -> None:
        self._conninfo = conninfo
        self._key = key
        self._conn: psycopg.AsyncConnection | None = None
        self.held = False

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; check it is still ours if we hold it."""
        try:
            if self._conn is None or self._conn.closed:
                self.held = False
                self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                # Over TCP, let the server notice a vanished holder (a dead node) in about
                # 30 s and free the lock for a standby (no effect on unix sockets).
                for name, value in LOCK_KEEPALIVES.items():
                    await self._conn.execute(f"SET {name} = {int(value)}")
            if self.held:
                await self._conn.execute("SELECT 1")
                return True
            cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
            self.held = bool((await cur.fetchone())[0])
        except psycopg.OperationalError as exc:
            if self.held:
                logger.warning(f"worker lock connection lost ({type(exc).__name__})")
            self.held = False
            await self.close()
        return self.held

    async def close(self) -> None:
        """Release the lock (closing the session releases it too)."""
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            return
        with contextlib.suppress(psycopg.Error):
            if self.held:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self.held = False
        with contextlib.suppress(psycopg.Error):
            await conn.close()


def dialing_hours(profile: DealershipProfile, now: datetime) -> bool:
    """Whether the worker dials at ``now``: the outbound window is open, not a holiday."""
    local = now.astimezone(profile.time_zone)
    return local.date() not in profile.holidays and profile.outbound_window.contains(local.time())


def due_slots(profile: DealershipProfile, now: datetime) -> list[tuple[str, str]]:
    """``(campaign, slot label)`` of today's slots whose time has come.

    A slot is due from its time on, once the dealership's outbound window is open (a
    slot set before the window opens runs when it does); a worker that was down at the
    slot's time runs it late the same day. Nothing runs on the profile's holidays.

    Args:
        profile: Dealership profile.
        now: The current instant.

    Returns:
        Due slots, each campaign's in schedule order.
    """
    if not dialing_hours(profile, now):
        return []
    local = now.astimezone(profile.time_zone)
    return [
        (campaign, slot.label)
        for campaign, slots in profile.campaigns.slots.items()
        for slot in slots
        if slot.due_on(local.date()) and local.time() >= slot.at
    ]


async def run_worker(
    db: AsyncConnectionPool,
    *,
    conninfo: str,
    profile: DealershipProfile,
    settings: Settings | None,
    dial: DialFn | None = None,
    stop: asyncio.Event | None = None,
    poll_seconds: float = 15.0,
    clock: Callable[[], datetime] | None = None,
    hold_calls: bool = True,
) -> WorkerReport:
    """Run scheduled campaigns and due retries until ``stop`` is set.

    Args:
        db: Connection pool.
        conninfo: Connection string for the lock's dedicated connection.
        profile: Dealership profile (schedule, windows, retry and rate settings).
        settings: Settings handed to ``dial``.
        dial: Places one call (default ``telephony.twilio.place_outbound_call``).
        stop: Set it to stop the worker (SIGTERM does, under :func:`worker_main`).
        poll_seconds: Pause between passes, and between tries for the lock.
        clock: Returns the current instant (tests); real time by default.
        hold_calls: Keep a call's concurrency slot until the call ends.

    Returns:
        What the worker did.
    """
    stop = stop or asyncio.Event()
    dialer = Dialer(
        db,
        profile=profile,
        settings=settings,
        dial=dial,
        hold_calls=hold_calls,
        stop=stop,
        clock=clock,
    )
    lock = _Lock(conninfo, WORKER_LOCK_ID)
    report = WorkerReport()
    running: dict[str, asyncio.Task] = {}

    async def run_slot(campaign: str, day: date, slot: str) -> None:
        error = None
        result = None
        try:
            result = await run_campaign(
                db, profile=profile, settings=settings, campaign=campaign, dialer=dialer
            )
            report.add(result.stats, retry=False)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            logger.opt(exception=exc).error(f"{campaign} run {slot} failed")
        async with db.connection() as conn:
            await crm.finish_run(
                conn,
                campaign=campaign,
                local_date=day,
                slot=slot,
                planned=result.planned if result else 0,
                dialed=result.stats.dialed if result else 0,
                error=error,
            )

    async def retry_pass() -> None:
        try:
            report.add(await run_due_retries(dialer), retry=True)
        except Exception as exc:
            logger.opt(exception=exc).error("campaign retry pass failed")

    try:
        while not stop.is_set():
            if await lock.try_acquire():
                if not report.held_lock:
                    logger.info("campaign worker holds the dialing lock")
                report.held_lock = True
                try:
                    await _pass(
                        db,
                        profile=profile,
                        dialer=dialer,
                        running=running,
                        report=report,
                        run_slot=run_slot,
                        retry_pass=retry_pass,
                    )
                except (psycopg.Error, OSError) as exc:
                    logger.warning(f"campaign worker pass failed: {type(exc).__name__}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_seconds)
        logger.info(f"campaign worker stopping; waiting for {len(running)} task(s) in flight")
        if running:
            await asyncio.gather(*running.values(), return_exceptions=True)
    finally:
        stop.set()
        for task in running.values():
            if not task.done():
                task.cancel()
        await lock.close()
    return report


async def _pass(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    dialer: Dialer,
    running: dict[str, asyncio.Task],
    report: WorkerReport,
    run_slot: Callable[[str, date, str], Awaitable[None]],
    retry_pass: Callable[[], Awaitable[None]],
) -> None:
    """One pass of the lock holder: clean up, start due slots and a retry pass."""
    for key in [k for k, task in running.items() if task.done()]:
        del running[key]
    now = dialer.now()
    campaign_running = any(key != "retries" for key in running)
    counts = await housekeeping(db, profile=profile, now=now, requeue_planned=not campaign_running)
    if any(counts.values()):
        logger.info(f"campaign housekeeping: {counts}")
    local_day = now.astimezone(profile.time_zone).date()
    for campaign, slot in due_slots(profile, now):
        if campaign in running:
            continue  # its previous slot is still dialing; this one waits for it
        async with db.connection() as conn:
            claimed = await crm.claim_run(conn, campaign=campaign, local_date=local_day, slot=slot)
        if claimed:
            logger.info(f"campaign {campaign}: running slot {slot} of {local_day}")
            report.runs.append((campaign, local_day.isoformat(), slot))
            running[campaign] = asyncio.create_task(run_slot(campaign, local_day, slot))
    if "retries" not in running and dialing_hours(profile, now):
        running["retries"] = asyncio.create_task(retry_pass())


async def worker_command(settings: Settings, *, dial: DialFn | None = None) -> int:
    """``runner.py worker``: run until SIGTERM/SIGINT.

    Args:
        settings: Settings.
        dial: Fake dialer (tests); Twilio by default.

    Returns:
        Process exit code.
    """
    from core.profile import ProfileError
    from core.resources import StartupError, open_resources
    from core.settings import MissingSettingError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if dial is None:
            settings.require(
                "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "PUBLIC_BASE_URL"
            )
        async with open_resources(settings, seed_demo=False) as resources:
            report = await run_worker(
                resources.db,
                conninfo=resources.database_url,
                profile=resources.profile,
                settings=settings,
                dial=dial,
                stop=stop,
                poll_seconds=settings.campaign_poll_secs,
            )
    except (MissingSettingError, StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info(
        f"campaign worker stopped: {len(report.runs)} run(s), {report.dialed} dialed, "
        f"{report.retried} retried"
    )
    return 0


def worker_main(*, settings: Settings | None = None) -> int:
    """Entry point of ``runner.py worker``; settings from the environment when omitted."""
    from core.settings import get_settings

    return asyncio.run(worker_command(settings or get_settings()))

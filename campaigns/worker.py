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
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import psycopg
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from campaigns.dialer import Dialer, DialFn, DialStats, housekeeping, run_campaign, run_due_retries
from campaigns.reminders import queue_reminders
from core.profile import DealershipProfile
from core.settings import Settings
from crm import campaigns as crm
from messaging.sender import Sender

#: Advisory lock key of the dialing worker ("vamc").
WORKER_LOCK_ID = 0x7661_6D63


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    held_lock: bool = False
    runs: list[tuple[str, str, str]] = field(default_factory=list)
    dialed: int = 0
    retried: int = 0
    reminders: int = 0

    def add(self, stats: DialStats, *, retry: bool) -> None:
        """Count a batch of dials."""
        if retry:
            self.retried += stats.dialed
        else:
            self.dialed += stats.dialed


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
    sender: Sender | None = None,
) -> WorkerReport:
    """Run scheduled campaigns, due retries and reminder texts until ``stop`` is set.

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
        sender: Text sender run alongside (reminders are queued by the lock holder and
            sent by any sender; none: the web server's sender sends them).

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
    lock = crm.AdvisoryLock(conninfo, WORKER_LOCK_ID)
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

    sender_task = asyncio.create_task(sender.run(), name="sms-sender") if sender else None
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
                report.reminders += await _reminder_pass(
                    db, profile=profile, now=dialer.now(), sender=sender
                )
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
        if sender is not None and sender_task is not None:
            sender.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender_task, timeout=20)
        await lock.close()
    return report


async def _reminder_pass(
    db: AsyncConnectionPool, *, profile: DealershipProfile, now: datetime, sender: Sender | None
) -> int:
    """Queue the reminder texts due now (lock holder only) and wake the sender."""
    try:
        queued = await queue_reminders(db, profile=profile, now=now)
    except (psycopg.Error, OSError) as exc:
        logger.warning(f"reminder pass failed: {type(exc).__name__}")
        return 0
    if queued and sender is not None:
        sender.wake()
    return queued


async def _pass(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    dialer: Dialer,
    running: dict[str, asyncio.Task],
    report: WorkerReport,
    run_slot: Callable[[str, date, str], Coroutine[Any, Any, None]],
    retry_pass: Callable[[], Coroutine[Any, Any, None]],
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

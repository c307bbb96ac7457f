"""Outbound campaigns: plan, dial with bounded concurrency and rate, follow call outcomes.

``runner.py campaign service-due|confirmations`` (:func:`cli_main`) plans a campaign and,
unless ``--dry-run``, dials it. The worker (``campaigns/worker.py``) runs the same code on the
profile's schedule, plus due retries.

Never twice: planning inserts one attempt row per (campaign, customer, dealership day)
with ``ON CONFLICT DO NOTHING RETURNING`` and only the rows an insert returned are dialed;
each dial first claims its row atomically, re-checking do-not-call and both calling
windows at that moment. Outcomes arrive through Twilio status callbacks
(:func:`record_call_status`) and the bot (:func:`record_call_outcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time as time_mod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from aiolimiter import AsyncLimiter
from loguru import logger
from psycopg_pool import AsyncConnectionPool

from core.pii import mask_phone
from core.profile import CampaignSettings, DealershipProfile
from core.settings import Settings
from crm import campaigns as crm
from telephony.twilio import place_outbound_call

if TYPE_CHECKING:
    pass

#: Wait before looking again at an attempt that could not be claimed (window closed...).
DEFER_MINUTES = 15
#: A planned or dialing row this old belongs to a run that died.
STALE_AFTER = timedelta(minutes=15)
#: CLI campaign names -> campaign.
CLI_CAMPAIGNS = {"service-due": "service_due", "confirmations": "confirmation"}
#: Outcome of the bot's ``calls`` row -> campaign attempt outcome.
CALL_OUTCOMES = {
    "booked": "booked",
    "rescheduled": "booked",
    "confirmed": "confirmed",
    "voicemail": "voicemail",
    "opted_out": "opted_out",
    "failed": "failed",
}


class DialFn(Protocol):
    """Places one outbound call and returns its CallSid.

    See ``telephony.twilio.place_outbound_call``. ``settings`` is what the dialer was
    given: ``None`` only suits a dial function that needs none (a test's fake).
    """

    def __call__(
        self,
        settings: Settings | None,
        *,
        to: str,
        scenario: str,
        customer_id: int | None,
        campaign_attempt_id: int | None = None,
    ) -> Awaitable[str]: ...


async def _dial_with_twilio(
    settings: Settings | None,
    *,
    to: str,
    scenario: str,
    customer_id: int | None,
    campaign_attempt_id: int | None = None,
) -> str:
    """The default :class:`DialFn`: ``telephony.twilio.place_outbound_call``.

    Raises:
        ValueError: No settings were given (Twilio needs its credentials).
    """
    if settings is None:
        raise ValueError("placing a Twilio call needs settings")
    return await place_outbound_call(
        settings,
        to=to,
        scenario=scenario,
        customer_id=customer_id,
        campaign_attempt_id=campaign_attempt_id,
    )


def call_rules(profile: DealershipProfile) -> crm.CallRules:
    """The calling rules of a dealership profile."""
    c = profile.campaigns
    return crm.CallRules(
        dealer_time_zone=str(profile.time_zone),
        dealer_window=(profile.outbound_window.start, profile.outbound_window.end),
        customer_window=(profile.customer_call_window.start, profile.customer_call_window.end),
        due_within_days=c.due_within_days,
        recent_attempt_days=c.recent_attempt_days,
        default_miles_per_day=c.default_miles_per_day,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


def planned_call_view(call: crm.PlannedCall) -> dict[str, Any]:
    """What ops may see of a planned call: no number beyond its last 4 digits."""
    return {
        "customer_id": call.customer_id,
        "reason": call.reason,
        "local_time": call.local_time.isoformat(timespec="minutes"),
        "time_zone": call.time_zone,
        "phone": mask_phone(call.phone),
    }


async def plan_campaign(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    campaign: str,
    now: datetime | None = None,
    limit: int | None = None,
) -> list[crm.PlannedCall]:
    """Who ``campaign`` would call now; writes nothing (the dry run).

    Args:
        db: Connection pool.
        profile: Dealership profile (windows, thresholds).
        campaign: ``service_due`` or ``confirmation``.
        now: The current instant (timezone-aware); defaults to the clock.
        limit: At most this many calls, most urgent first.

    Returns:
        Planned calls (customer id, number, reason, customer-local time).
    """
    async with db.connection() as conn:
        return await crm.plan_calls(
            conn, campaign=campaign, now=now or _utcnow(), rules=call_rules(profile), limit=limit
        )


@dataclass
class DialStats:
    """What a batch of dials did."""

    dialed: int = 0
    deferred: int = 0
    failed: int = 0
    call_sids: list[str] = field(default_factory=list)

    def add(self, other: DialStats) -> None:
        """Fold another batch's counts into this one."""
        self.dialed += other.dialed
        self.deferred += other.deferred
        self.failed += other.failed
        self.call_sids.extend(other.call_sids)


class Dialer:
    """Dials attempt rows with at most ``max_concurrent`` calls in flight and a rate cap.

    A call is in flight from its claim through the Twilio request and, with
    ``hold_calls``, until the attempt leaves ``dialing``/``in_progress`` (status callbacks)
    or ``max_call_minutes`` pass. One dialer is shared by every campaign run and retry
    pass of a process, so the cap holds across them.

    Args:
        db: Connection pool.
        profile: Dealership profile.
        settings: Settings handed to ``dial``.
        dial: Places a call; ``telephony.twilio.place_outbound_call`` by default.
        max_concurrent: Overrides the profile's ``campaigns.max_concurrent``.
        calls_per_second: Overrides the profile's ``campaigns.calls_per_second``.
        hold_calls: Keep a call's slot until the call ends.
        poll_seconds: How often a held call's attempt row is looked at.
        stop: When set, no new call starts; held calls are let go.
        now: The start instant (``--now``); the dialer's clock runs on from it.
        clock: Returns the current instant (overrides ``now``; tests).
    """

    def __init__(
        self,
        db: AsyncConnectionPool,
        *,
        profile: DealershipProfile,
        settings: Settings | None,
        dial: DialFn | None = None,
        max_concurrent: int | None = None,
        calls_per_second: float | None = None,
        hold_calls: bool = True,
        poll_seconds: float = 2.0,
        stop: asyncio.Event | None = None,
        now: datetime | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.db = db
        self.profile = profile
        self.settings = settings
        self.dial: DialFn = dial or _dial_with_twilio
        self.rules = call_rules(profile)
        self.cfg: CampaignSettings = profile.campaigns
        self.max_concurrent = max_concurrent or self.cfg.max_concurrent
        self._semaphore = asyncio.Semaphore(self.max_concurrent)
        # A bucket of one call that drains at ``calls_per_second``: calls start at least
        # 1 / calls_per_second seconds apart, with no burst.
        self._limiter = AsyncLimiter(1, 1 / (calls_per_second or self.cfg.calls_per_second))
        self.hold_calls = hold_calls
        self.poll_seconds = poll_seconds
        self.stop = stop or asyncio.Event()
        self._start = now
        self._start_mono = time_mod.monotonic()
        self._clock = clock

    def now(self) -> datetime:
        """The dialer's clock: real time, or ``now`` given at start plus time elapsed."""
        if self._clock is not None:
            return self._clock()
        if self._start is None:
            return _utcnow()
        return self._start + timedelta(seconds=time_mod.monotonic() - self._start_mono)

    async def dial_attempts(
        self, attempt_ids: Iterable[int], *, from_statuses: Sequence[str]
    ) -> DialStats:
        """Claim and dial each attempt; returns when every call is dialed (and let go).

        Args:
            attempt_ids: Attempt rows to dial, in order.
            from_statuses: Statuses a row may be claimed from.

        Returns:
            Counts of dialed, deferred and failed attempts.
        """
        stats = DialStats()
        ids = list(attempt_ids)
        results = await asyncio.gather(
            *(self._dial_one(i, from_statuses, stats) for i in ids), return_exceptions=True
        )
        for attempt_id, result in zip(ids, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                # The row stays where it was; housekeeping closes or requeues it.
                stats.failed += 1
                logger.opt(exception=result).error(
                    f"campaign attempt {attempt_id}: {type(result).__name__} while dialing"
                )
        return stats

    async def _dial_one(
        self, attempt_id: int, from_statuses: Sequence[str], stats: DialStats
    ) -> None:
        async with self._semaphore:
            if self.stop.is_set():
                return
            await self._limiter.acquire()
            if self.stop.is_set():
                return
            now = self.now()
            async with self.db.connection() as conn:
                claimed = await crm.claim_attempt(
                    conn,
                    attempt_id=attempt_id,
                    now=now,
                    rules=self.rules,
                    from_statuses=from_statuses,
                )
                if claimed is None:
                    if await crm.defer_attempt(
                        conn,
                        attempt_id=attempt_id,
                        until=now + timedelta(minutes=DEFER_MINUTES),
                        reason="not callable when its turn came",
                    ):
                        stats.deferred += 1
                    return
            try:
                call_sid = await self.dial(
                    self.settings,
                    to=claimed.phone,
                    scenario=claimed.campaign,
                    customer_id=claimed.customer_id,
                    campaign_attempt_id=claimed.id,
                )
            except Exception as exc:
                stats.failed += 1
                async with self.db.connection() as conn:
                    status = await crm.record_dial_error(
                        conn,
                        attempt_id=claimed.id,
                        error=f"{type(exc).__name__}: {exc}",
                        now=self.now(),
                        max_retries=self.cfg.max_retries,
                        backoff_minutes=self.cfg.retry_backoff_minutes,
                    )
                logger.warning(
                    f"campaign attempt {claimed.id} to {mask_phone(claimed.phone)}: dial "
                    f"failed ({type(exc).__name__}); now {status}"
                )
                return
            async with self.db.connection() as conn:
                await crm.record_dialed(conn, attempt_id=claimed.id, call_sid=call_sid)
            stats.dialed += 1
            stats.call_sids.append(call_sid)
            logger.info(
                f"{claimed.campaign} attempt {claimed.id} (try {claimed.attempt_count}): "
                f"dialed {mask_phone(claimed.phone)} as {call_sid}"
            )
            if self.hold_calls:
                await self._hold(claimed.id, call_sid)

    async def _hold(self, attempt_id: int, call_sid: str) -> None:
        deadline = time_mod.monotonic() + self.cfg.max_call_minutes * 60
        while time_mod.monotonic() < deadline and not self.stop.is_set():
            async with self.db.connection() as conn:
                status = await crm.attempt_status(conn, attempt_id)
                final = await crm.final_status_event(conn, call_sid=call_sid)
            if status not in ("dialing", "in_progress"):
                return
            if final is not None:
                # The callback came before the CallSid was stored: apply it now.
                await record_call_status(
                    self.db,
                    call_sid=call_sid,
                    status=final["status"],
                    answered_by=final["answered_by"],
                    campaign_settings=self.cfg,
                    now=self.now(),
                )
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=self.poll_seconds)


@dataclass
class RunResult:
    """What one campaign run did."""

    campaign: str
    planned: int
    inserted: int
    stats: DialStats
    calls: list[crm.PlannedCall]

    def summary(self) -> dict[str, Any]:
        """Counts for logs and the CLI (no personal data)."""
        return {
            "campaign": self.campaign,
            "planned": self.planned,
            "new_attempts": self.inserted,
            "dialed": self.stats.dialed,
            "deferred": self.stats.deferred,
            "dial_failures": self.stats.failed,
        }


async def run_campaign(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    settings: Settings | None,
    campaign: str,
    now: datetime | None = None,
    limit: int | None = None,
    max_concurrent: int | None = None,
    dial: DialFn | None = None,
    dialer: Dialer | None = None,
    hold_calls: bool = True,
) -> RunResult:
    """Plan ``campaign``, insert its attempt rows and dial the rows this run inserted.

    Args:
        db: Connection pool.
        profile: Dealership profile.
        settings: Settings handed to ``dial`` (Twilio credentials, public URL).
        campaign: ``service_due`` or ``confirmation``.
        now: The current instant; defaults to the clock.
        limit: At most this many calls.
        max_concurrent: Calls in flight at once (default: the profile's).
        dial: Places one call (default ``telephony.twilio.place_outbound_call``); tests pass a fake.
        dialer: A shared dialer (the worker's); built from the arguments above when omitted.
        hold_calls: Keep a call's concurrency slot until the call ends.

    Returns:
        Counts and the planned calls.
    """
    dialer = dialer or Dialer(
        db,
        profile=profile,
        settings=settings,
        dial=dial,
        max_concurrent=max_concurrent,
        hold_calls=hold_calls,
        now=now,
    )
    now = now or dialer.now()
    async with db.connection() as conn:
        planned = await crm.plan_calls(
            conn, campaign=campaign, now=now, rules=dialer.rules, limit=limit
        )
        inserted = await crm.insert_attempts(conn, planned=planned, now=now)
    logger.info(f"{campaign} run: {len(planned)} planned, {len(inserted)} new attempt rows")
    ordered = [inserted[p.customer_id] for p in planned if p.customer_id in inserted]
    stats = await dialer.dial_attempts(ordered, from_statuses=("planned",))
    result = RunResult(campaign, len(planned), len(inserted), stats, planned)
    logger.info(f"{campaign} run finished: {result.summary()}")
    return result


async def run_due_retries(dialer: Dialer, *, limit: int = 200) -> DialStats:
    """Dial the attempts whose retry time has come (within the calling windows).

    Args:
        dialer: The dialer (its clock, windows and concurrency).
        limit: At most this many retries in this pass.

    Returns:
        Counts of the pass.
    """
    async with dialer.db.connection() as conn:
        ids = await crm.due_retry_ids(conn, now=dialer.now(), limit=limit)
    if not ids:
        return DialStats()
    logger.info(f"retrying {len(ids)} campaign attempt(s)")
    return await dialer.dial_attempts(ids, from_statuses=("retry_pending",))


async def housekeeping(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    now: datetime | None = None,
    requeue_planned: bool = True,
) -> dict[str, int]:
    """Clean up after crashed runs, replay lost status callbacks, copy late bot outcomes.

    Args:
        db: Connection pool.
        profile: Dealership profile.
        now: The current instant.
        requeue_planned: Requeue old never-dialed ``planned`` rows as retries; pass
            ``False`` while a campaign run of this process is still working through its rows.

    Returns:
        Counts per kind of clean-up.
    """
    now = now or _utcnow()
    cfg = profile.campaigns
    async with db.connection() as conn:
        counts = await crm.close_stale_attempts(
            conn,
            now=now,
            rules=call_rules(profile),
            stale_after=STALE_AFTER,
            requeue_planned=requeue_planned,
        )
        stuck = await crm.unfinished_calls(
            conn, dialed_before=now - timedelta(minutes=cfg.max_call_minutes * 2)
        )
    counts["replayed"] = counts["abandoned"] = 0
    for row in stuck:
        if row["final_status"]:
            await record_call_status(
                db,
                call_sid=row["call_sid"],
                status=row["final_status"],
                answered_by=row["answered_by"],
                campaign_settings=cfg,
                now=now,
            )
            counts["replayed"] += 1
        else:
            async with db.connection() as conn:
                await crm.fail_attempt(
                    conn, attempt_id=row["id"], now=now, error="no final status from Twilio"
                )
            counts["abandoned"] += 1
    async with db.connection() as conn:
        counts["outcomes"] = await crm.sync_outcomes_from_calls(conn, now=now)
    return counts


async def record_call_status(
    db: AsyncConnectionPool,
    *,
    call_sid: str,
    status: str,
    answered_by: str | None = None,
    campaign_settings: CampaignSettings | None = None,
    now: datetime | None = None,
) -> dict | None:
    """Apply a Twilio status callback to the campaign attempt with this CallSid.

    ``no-answer``/``busy`` -> ``retry_pending`` after the profile's backoff (at most
    ``max_retries`` redials), then ``failed``; ``completed`` -> ``completed`` with the
    bot's outcome (``voicemail`` when a machine answered); an ``opted_out`` outcome sets
    the customer's do-not-call flag. Calls that are not campaign calls are ignored.

    Args:
        db: Connection pool.
        call_sid: Twilio CallSid.
        status: Twilio ``CallStatus``.
        answered_by: Twilio ``AnsweredBy`` (answering-machine detection), if sent.
        campaign_settings: Retry settings (``profile.campaigns``); defaults when omitted.
        now: The current instant (tests).

    Returns:
        The attempt's new ``{"id", "status", "outcome", "customer_id"}``, or ``None``.
    """
    cfg = campaign_settings or CampaignSettings()
    async with db.connection() as conn, conn.transaction():
        row = await crm.apply_call_status(
            conn,
            call_sid=call_sid,
            status=status,
            answered_by=answered_by,
            now=now or _utcnow(),
            max_retries=cfg.max_retries,
            backoff_minutes=cfg.retry_backoff_minutes,
        )
    if row is not None:
        logger.info(f"campaign attempt {row['id']}: {status} -> {row['status']} {row['outcome']}")
    return row


async def record_call_outcome(
    db: AsyncConnectionPool, *, call_sid: str, outcome: str | None
) -> dict | None:
    """The bot's outcome of a campaign call (recorded by the media-stream route at its end).

    Args:
        db: Connection pool.
        call_sid: The call.
        outcome: The ``calls.outcome`` the bot set; outcomes campaigns do not track are
            ignored.

    Returns:
        The attempt's ``{"id", "status", "outcome", "customer_id"}``, or ``None``.
    """
    mapped = CALL_OUTCOMES.get(outcome or "")
    if mapped is None:
        return None
    async with db.connection() as conn, conn.transaction():
        return await crm.set_attempt_outcome(conn, call_sid=call_sid, outcome=mapped)


def next_window_opening(profile: DealershipProfile, now: datetime) -> datetime | None:
    """When the dealership's outbound window next opens, or ``None`` while it is open.

    The window is a time of day in dealership time (``outbound.window``), as the planner
    applies it.

    Args:
        profile: Dealership profile.
        now: The current instant (timezone-aware).

    Returns:
        The next opening in dealership time, or ``None`` when ``now`` is inside the window.
    """
    local = now.astimezone(profile.time_zone)
    window = profile.outbound_window
    if window.contains(local.time()):
        return None
    day = local.date() if local.time() < window.start else local.date() + timedelta(days=1)
    return datetime.combine(day, window.start, tzinfo=profile.time_zone)

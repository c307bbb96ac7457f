"""The command line of the campaigns: ``runner.py campaign`` and ``runner.py worker``.

``campaign`` plans (``--dry-run``) or runs one campaign now; ``worker`` runs the
profile's ``[schedule]``, the retries and the text reminders until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from loguru import logger

from campaigns.dialer import (
    CLI_CAMPAIGNS,
    DialFn,
    next_window_opening,
    plan_campaign,
    planned_call_view,
    run_campaign,
)
from campaigns.worker import run_worker
from core.resources import AppResources
from core.settings import Settings
from crm import campaigns as crm
from messaging.sender import Sender


def _parse_now(text: str | None) -> datetime | None:
    if not text:
        return None
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        raise ValueError("--now needs a UTC offset, e.g. 2026-11-30T10:00:00-06:00")
    return value


def add_campaign_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``runner.py campaign``."""
    parser.add_argument("campaign", choices=tuple(CLI_CAMPAIGNS))
    parser.add_argument("--dry-run", action="store_true", help="print the plan, dial nobody")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--limit", type=int, help="at most N calls, most urgent first")
    parser.add_argument("--max-concurrent", type=int, help="at most K calls in flight")
    parser.add_argument("--now", help="fixed current time, ISO 8601 with offset")


def _print_plan(calls: Sequence[crm.PlannedCall], *, as_json: bool, out=sys.stdout) -> None:
    if as_json:
        for call in calls:
            print(json.dumps(planned_call_view(call)), file=out)
        return
    print(
        f"{'customer':>9}  {'phone':<12}  {'local time':<16}  {'time zone':<22}  reason", file=out
    )
    for call in calls:
        v = planned_call_view(call)
        print(
            f"{v['customer_id']:>9}  {v['phone']:<12}  {v['local_time']:<16}  "
            f"{v['time_zone']:<22}  {v['reason']}",
            file=out,
        )
    print(f"{len(calls)} call(s) planned", file=out)


async def _closed_window_notice(
    resources: AppResources, *, campaign: str, now: datetime, limit: int | None
) -> str | None:
    """A sentence for a run outside the calling window: closed until when, how many due."""
    profile = resources.profile
    opens = next_window_opening(profile, now)
    if opens is None:
        return None
    due = await plan_campaign(
        resources.db, profile=profile, campaign=campaign, now=opens, limit=limit
    )
    local = now.astimezone(profile.time_zone)
    window = profile.outbound_window
    return (
        f"The calling window is closed: it is {local:%a %Y-%m-%d %H:%M %Z} at the dealership "
        f"(window {window.start:%H:%M}-{window.end:%H:%M}). It opens "
        f"{opens:%a %Y-%m-%d %H:%M %Z}; {len(due)} customer(s) due would be called then. "
        "Nobody was called."
    )


async def campaign_command(
    settings: Settings,
    args: argparse.Namespace,
    *,
    dial: DialFn | None = None,
    out=sys.stdout,
) -> int:
    """``runner.py campaign ...``: dry-run or run one campaign now.

    Args:
        settings: Settings.
        args: Parsed ``campaign`` arguments.
        dial: Fake dialer (tests); Twilio by default.
        out: Where the plan and the summary go.

    Returns:
        Process exit code.
    """
    from core.profile import ProfileError
    from core.resources import StartupError, open_resources
    from core.settings import MissingSettingError
    from crm.migrate import apply_migrations

    campaign = CLI_CAMPAIGNS[args.campaign]
    try:
        now = _parse_now(args.now)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if (args.limit is not None and args.limit < 0) or (args.max_concurrent or 1) < 1:
        print("--limit must be >= 0 and --max-concurrent >= 1", file=sys.stderr)
        return 2
    try:
        if not args.dry_run and dial is None:
            settings.require(
                "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "PUBLIC_BASE_URL"
            )
        async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
            # Outside the window nobody is planned: say so (and until when) instead of
            # printing an empty plan. With --json, stdout stays JSON lines: it goes to stderr.
            notice = await _closed_window_notice(
                resources, campaign=campaign, now=now or datetime.now(UTC), limit=args.limit
            )
            if notice is not None:
                print(notice, file=sys.stderr if args.json else out)
            if args.dry_run:
                calls = await plan_campaign(
                    resources.db,
                    profile=resources.profile,
                    campaign=campaign,
                    now=now,
                    limit=args.limit,
                )
                _print_plan(calls, as_json=args.json, out=out)
                return 0
            result = await run_campaign(
                resources.db,
                profile=resources.profile,
                settings=settings,
                campaign=campaign,
                now=now,
                limit=args.limit,
                max_concurrent=args.max_concurrent,
                dial=dial,
            )
    except (MissingSettingError, StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        for call in result.calls:
            print(json.dumps(planned_call_view(call)), file=out)
    print(json.dumps(result.summary()), file=out)
    return 0


def cli_main(args: argparse.Namespace, *, settings: Settings | None = None) -> int:
    """Entry point of ``runner.py campaign``.

    Args:
        args: Parsed arguments (:func:`add_campaign_arguments`).
        settings: Settings; read from the environment when omitted.

    Returns:
        Process exit code.
    """
    from core.settings import get_settings

    return asyncio.run(campaign_command(settings or get_settings(), args))


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
    from crm.migrate import apply_migrations
    from telephony.sms import sms_configured

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if dial is None:
            settings.require(
                "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "PUBLIC_BASE_URL"
            )
        async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
            sender = None
            if resources.profile.texting.enabled and sms_configured(settings):
                sender = Sender(
                    resources.db,
                    settings=settings,
                    profile=resources.profile,
                    redis=resources.redis,
                    conninfo=resources.database_url,
                )
            report = await run_worker(
                resources.db,
                conninfo=resources.database_url,
                profile=resources.profile,
                settings=settings,
                dial=dial,
                stop=stop,
                poll_seconds=settings.campaign_poll_secs,
                sender=sender,
            )
    except (MissingSettingError, StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    logger.info(
        f"campaign worker stopped: {len(report.runs)} run(s), {report.dialed} dialed, "
        f"{report.retried} retried, {report.reminders} reminder text(s) queued"
    )
    return 0


def worker_main(*, settings: Settings | None = None) -> int:
    """Entry point of ``runner.py worker``; settings from the environment when omitted."""
    from core.settings import get_settings

    return asyncio.run(worker_command(settings or get_settings()))

"""Tool console: drive the bot's tools from JSON lines, exactly as the bot would.

``python runner.py tools --caller +15551234567`` reads ``{"name": ..., "arguments": {...}}``
lines on stdin and runs them in ONE call session for that caller, printing one JSON line
per call with the result the model would see.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from datetime import datetime
from typing import TextIO

from app.call_session import CallSession
from app.resources import AppResources
from scheduling.calendar import Calendar, PostgresCalendar
from tools.customers import identify_caller
from tools.registry import ToolContext, run_tool


def make_calendar(resources: AppResources) -> Calendar:
    """The calendar backend the settings ask for (Google when configured)."""
    if resources.settings.google_calendar_enabled:
        from scheduling.google_calendar import GoogleCalendar

        return GoogleCalendar.from_settings(resources.settings, resources.profile, resources.db)
    return PostgresCalendar()


def make_tool_context(
    resources: AppResources, session: CallSession, *, now: datetime | None = None
) -> ToolContext:
    """Tool context for one call session.

    Args:
        resources: Process resources.
        session: The call's session.
        now: Fixed "now" for reproducible runs (tests, demos); real time when omitted.

    Returns:
        The context the tools run with.
    """
    return ToolContext(
        session=session,
        db=resources.db,
        redis=resources.redis,
        profile=resources.profile,
        calendar=make_calendar(resources),
        now=(lambda: now) if now else None,
        pending=resources.pending,
    )


async def run_console(
    resources: AppResources,
    *,
    caller: str,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
    now: datetime | None = None,
) -> int:
    """Run tool calls from ``stdin`` for one caller session.

    Args:
        resources: Process resources.
        caller: The caller's number (E.164), as caller ID would report it.
        stdin: JSON lines input.
        stdout: JSON lines output.
        now: Fixed current time (aware), for reproducible runs.

    Returns:
        Exit code: 0, or 1 when an input line was not valid JSON.
    """
    session = CallSession(call_sid=f"console-{uuid.uuid4().hex[:12]}", caller_phone=caller)
    ctx = make_tool_context(resources, session, now=now)
    matched = await identify_caller(ctx)
    print(
        json.dumps({"session": session.call_sid, "caller_id_matched": matched}),
        file=stdout,
        flush=True,
    )
    status = 0
    while True:
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            break
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            name = request["name"]
            arguments = request.get("arguments") or {}
        except (json.JSONDecodeError, KeyError, TypeError):
            print(json.dumps({"ok": False, "error": "bad_input_line"}), file=stdout, flush=True)
            status = 1
            continue
        result = await run_tool(ctx, name, arguments)
        print(json.dumps({"name": name, "result": result}, default=str), file=stdout, flush=True)
    return status

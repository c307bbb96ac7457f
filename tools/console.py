"""Tool console: drive the bot's tools from JSON lines, exactly as the bot would.

``python runner.py tools --caller +15551234567`` reads ``{"name": ..., "arguments": {...}}``
lines on stdin and runs them in ONE call session for that caller, printing one JSON line
per call with the result the model would see.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from datetime import datetime
from typing import Any, TextIO

from core.resources import AppResources
from tools.context import CallSession, make_tool_context
from tools.customers import identify_caller
from tools.registry import run_tool


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
        Exit code: 0, or 1 when an input line was not a tool call (each such line is
        answered with a ``bad_input_line`` JSON line and the console keeps going).
    """
    session = CallSession(call_sid=f"console-{uuid.uuid4().hex[:12]}", caller_phone=caller)
    ctx = make_tool_context(resources, session, now=now)
    matched = await identify_caller(ctx)
    print(
        json.dumps({"session": session.call_sid, "caller_id_matched": matched}),
        file=stdout,
        flush=True,
    )
    if isinstance(stdin, io.TextIOWrapper):
        stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 make a bad line
    status = 0
    while True:
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            break
        if not line.strip():
            continue
        request, problem = parse_request(line)
        if request is None:
            _reply(stdout, {"ok": False, "error": "bad_input_line", "message": problem})
            status = 1
            continue
        name, arguments = request
        result = await run_tool(ctx, name, arguments)
        _reply(stdout, {"name": name, "result": result})
    return status


def parse_request(line: str) -> tuple[tuple[str, dict[str, Any]] | None, str]:
    """Parse one console input line.

    Args:
        line: ``{"name": "<tool>", "arguments": {...}}`` (arguments optional).

    Returns:
        ``((name, arguments), "")``, or ``(None, <why, one line>)``.
    """
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None, 'not JSON; expected {"name": "<tool>", "arguments": {...}}'
    if not isinstance(request, dict):
        return None, 'expected a JSON object: {"name": "<tool>", "arguments": {...}}'
    name = request.get("name")
    if not isinstance(name, str) or not name:
        return None, '"name" must be a tool name (a string)'
    arguments = request.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return None, '"arguments" must be a JSON object'
    return (name, arguments), ""


def _reply(stdout: TextIO, payload: dict[str, Any]) -> None:
    print(json.dumps(payload, default=str), file=stdout, flush=True)

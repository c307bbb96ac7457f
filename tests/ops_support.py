"""Helpers shared by the ops console tests: rows in the database, a logged-in HTTP client."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

ADMIN_TOKEN = "ops-console-secret"
CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')

#: A transcript with a date of birth, a phone number and a VIN in it.
PII_TRANSCRIPT = [
    {"role": "bot", "text": "Hi, this is the AI assistant. How can I help?", "interrupted": False},
    {"role": "caller", "text": "My birthday is April twelfth, nineteen eighty-five."},
    {"role": "caller", "text": "Call me back at +1 (555) 555-0100 or 312-555-0199."},
    {"role": "caller", "text": "The VIN is 1HGCM82633A004352 and I was born 1985-04-12."},
    {"role": "bot", "text": "Thanks, let me look that up for", "interrupted": True},
    {"role": "caller", "text": "<img src=x onerror=alert(1)><script>alert(2)</script>"},
]
TURN_METRICS = [
    {
        "turn": 1,
        "started_at": "2026-11-30T15:00:00+00:00",
        "voice_to_voice_secs": 0.84,
        "stt_final_at_secs": 0.31,
        "llm_first_token_at_secs": 0.52,
        "tts_first_audio_at_secs": 0.71,
        "transport_first_audio_at_secs": 0.84,
        "tools": [{"name": "verify_customer", "secs": 0.012, "status": "ok"}],
    },
    {
        "turn": 2,
        "started_at": "2026-11-30T15:00:09+00:00",
        "voice_to_voice_secs": 1.31,
        "stt_final_at_secs": 0.30,
        "llm_first_token_at_secs": 0.95,
        "tts_first_audio_at_secs": 1.12,
        "transport_first_audio_at_secs": 1.31,
        "tools": [],
    },
]
TOOL_CALLS = [
    {
        "name": "verify_customer",
        "arguments": {"date_of_birth": "[date]"},
        "result": {"ok": True, "verified": True},
        "secs": 0.012,
        "status": "ok",
        "at_secs": 8.5,
    }
]


def insert_call(
    database_url: str,
    *,
    call_sid: str,
    started_at: datetime | None = None,
    direction: str = "inbound",
    scenario: str = "inbound",
    outcome: str | None = "info",
    customer_id: int | None = None,
    transcript: list[dict[str, Any]] | None = None,
    turn_metrics: list[dict[str, Any]] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    appointment_ids: list[int] | None = None,
    ended: bool = True,
) -> int:
    """Insert a finished call row; returns its id."""
    started_at = started_at or datetime.now(UTC)
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            """
            INSERT INTO calls (call_sid, direction, scenario, outcome, customer_id, verified,
                               started_at, ended_at, transcript, turn_metrics, tool_calls,
                               appointment_ids, summary)
            VALUES (%(sid)s, %(dir)s, %(scn)s, %(outcome)s, %(cid)s, %(verified)s, %(start)s,
                    %(end)s, %(transcript)s, %(metrics)s, %(tools)s, %(appts)s, %(summary)s)
            RETURNING id
            """,
            {
                "sid": call_sid,
                "dir": direction,
                "scn": scenario,
                "outcome": outcome,
                "cid": customer_id,
                "verified": customer_id is not None,
                "start": started_at,
                "end": started_at + timedelta(minutes=2) if ended else None,
                "transcript": Jsonb(transcript or []),
                "metrics": Jsonb(turn_metrics or []),
                "tools": Jsonb(tool_calls or []),
                "appts": appointment_ids or [],
                "summary": f"{direction} {scenario} call; outcome {outcome}",
            },
        ).fetchone()
    assert row is not None
    return int(row[0])


def insert_callback(
    database_url: str,
    *,
    call_sid: str,
    customer_id: int | None,
    phone: str | None,
    reason: str,
    source: str = "after_hours",
) -> int:
    """Insert an open callback request; returns its id."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO callback_requests (call_sid, customer_id, phone, reason, source) "
            "VALUES (%s, %s, %s, %s, %s) RETURNING id",
            (call_sid, customer_id, phone, reason, source),
        ).fetchone()
    assert row is not None
    return int(row[0])


def query(database_url: str, sql: str, params: Any = None) -> list[tuple]:
    """Rows of a query."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def csrf_of(html: str) -> str:
    """The first CSRF token in a page."""
    match = CSRF_INPUT.search(html)
    assert match, "no csrf_token field in the page"
    return match.group(1)


async def log_in(
    client: httpx.AsyncClient, *, username: str = "admin", password: str = ADMIN_TOKEN
) -> httpx.Response:
    """Log in through the form (GET for the form token, then POST)."""
    form = await client.get("/ops/login")
    assert form.status_code == 200, form.text
    return await client.post(
        "/ops/login",
        data={
            "username": username,
            "password": password,
            "csrf_token": csrf_of(form.text),
            "next": "/ops/live",
        },
    )

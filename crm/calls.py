"""Call records and callback requests.

Every write here is idempotent (keyed by the CallSid) and takes its timestamps from the
caller, so a write that waited in :class:`core.pending.PendingWrites` while Postgres was
down lands exactly as it would have at the time.
"""

from __future__ import annotations

import re
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

#: What ``callback_requests.phone`` accepts (the same pattern as its CHECK constraint).
E164 = re.compile(r"\+[1-9][0-9]{7,14}")


def callback_number(phone: str | None) -> str | None:
    """``phone`` when it is a number we can call back (E.164), else ``None``.

    Carriers report withheld caller ID as ``Anonymous``, ``Restricted``, ``Unknown`` or an
    empty string; those become ``None`` (stored as NULL) instead of failing the insert.

    Args:
        phone: Caller ID as reported, or a number the caller gave (already normalised).

    Returns:
        The E.164 number, or ``None``.
    """
    if phone is None:
        return None
    phone = phone.strip()
    return phone if E164.fullmatch(phone) else None


async def add_callback_request(
    conn: AsyncConnection,
    *,
    call_sid: str,
    customer_id: int | None,
    phone: str | None,
    reason: str,
    requested_at: datetime | None = None,
    source: str = "after_hours",
) -> int:
    """Record that the caller wants a call back (one per call).

    A repeat for the same call updates the reason and fills in a number or customer that
    the first request did not have (a caller with withheld caller ID who then says a
    number). A request without any number is still recorded: it tells the advisors that
    someone needed them, and the customer's CRM record may have a number.

    Args:
        conn: Database connection.
        call_sid: The call asking.
        customer_id: Verified or identified customer, if any.
        phone: Number to call back; anything that is not E.164 is stored as NULL.
        reason: Why, in short.
        requested_at: When it was asked (default: now; a delayed write passes the time).
        source: Where the request comes from: ``after_hours`` (no advisor reachable),
            ``transfer_failed``, ``service_failure`` or ``reschedule_reply``.

    Returns:
        The callback request id.
    """
    cur = await conn.execute(
        """
        INSERT INTO callback_requests (call_sid, customer_id, phone, reason, requested_at,
                                       source)
        VALUES (%(call_sid)s, %(customer_id)s, %(phone)s, %(reason)s,
                COALESCE(%(requested_at)s, now()), %(source)s)
        ON CONFLICT (call_sid) DO UPDATE SET
            reason = EXCLUDED.reason,
            source = EXCLUDED.source,
            phone = COALESCE(EXCLUDED.phone, callback_requests.phone),
            customer_id = COALESCE(EXCLUDED.customer_id, callback_requests.customer_id)
        RETURNING id
        """,
        {
            "call_sid": call_sid,
            "customer_id": customer_id,
            "phone": callback_number(phone),
            "reason": reason,
            "requested_at": requested_at,
            "source": source,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def start_call(
    conn: AsyncConnection,
    *,
    call_sid: str,
    direction: str,
    scenario: str,
    started_at: datetime | None = None,
) -> None:
    """Create the ``calls`` row when a call connects (idempotent).

    Args:
        conn: Database connection.
        call_sid: The call.
        direction: ``inbound`` or ``outbound``.
        scenario: Call scenario.
        started_at: When the call started (default: now).
    """
    await conn.execute(
        """
        INSERT INTO calls (call_sid, direction, scenario, started_at)
        VALUES (%(sid)s, %(dir)s, %(scn)s, COALESCE(%(started_at)s, now()))
        ON CONFLICT (call_sid) DO NOTHING
        """,
        {"sid": call_sid, "dir": direction, "scn": scenario, "started_at": started_at},
    )


async def record_voicemail(conn: AsyncConnection, *, call_sid: str, scenario: str) -> None:
    """Record an outbound call that reached a voicemail (an answering machine or a fax).

    Creates the ``calls`` row if needed and marks it ended with the ``voicemail`` outcome.

    Args:
        conn: Database connection.
        call_sid: The call.
        scenario: Call scenario.
    """
    await start_call(conn, call_sid=call_sid, direction="outbound", scenario=scenario)
    await conn.execute(
        "UPDATE calls SET outcome = 'voicemail', ended_at = now() WHERE call_sid = %(sid)s",
        {"sid": call_sid},
    )


async def finish_call(
    conn: AsyncConnection,
    *,
    call_sid: str,
    direction: str,
    scenario: str,
    started_at: datetime,
    ended_at: datetime,
    customer_id: int | None,
    verified: bool,
    outcome: str,
    transcript: list[dict],
    turn_metrics: list[dict],
    summary: str,
    appointment_ids: list[int],
    tool_calls: list[dict] | None = None,
) -> None:
    """Write the end-of-call facts onto the ``calls`` row, creating it if it is missing.

    The row is missing when Postgres was down as the call started; the end-of-call write
    then creates it whole. ``ended_at`` never precedes the stored ``started_at`` (the
    application's and the database's clocks may differ slightly).

    Args:
        conn: Database connection.
        call_sid: The call.
        direction: ``inbound`` or ``outbound`` (used when the row is created here).
        scenario: Call scenario (used when the row is created here).
        started_at: When the call started (used when the row is created here).
        ended_at: When the call ended.
        customer_id: Customer the call was about, if any.
        verified: Whether the caller was verified.
        outcome: Call outcome.
        transcript: Turns of the conversation.
        turn_metrics: Per-turn latency figures.
        summary: One-line summary.
        appointment_ids: Appointments booked, moved or cancelled.
        tool_calls: The call's tool calls, masked (see
            :class:`processors.tool_calls.ToolCallRecorder`); left as it is when ``None``.
    """
    await conn.execute(
        """
        INSERT INTO calls (call_sid, direction, scenario, started_at, customer_id, verified,
                           outcome, ended_at, transcript, turn_metrics, summary,
                           appointment_ids, tool_calls)
        VALUES (%(sid)s, %(direction)s, %(scenario)s, %(started_at)s, %(customer_id)s,
                %(verified)s, %(outcome)s, GREATEST(%(ended_at)s, %(started_at)s),
                %(transcript)s, %(metrics)s, %(summary)s, %(appointment_ids)s,
                COALESCE(%(tool_calls)s, '[]'::jsonb))
        ON CONFLICT (call_sid) DO UPDATE SET
            customer_id = EXCLUDED.customer_id, verified = EXCLUDED.verified,
            outcome = EXCLUDED.outcome,
            ended_at = GREATEST(%(ended_at)s, calls.started_at),
            transcript = EXCLUDED.transcript, turn_metrics = EXCLUDED.turn_metrics,
            summary = EXCLUDED.summary, appointment_ids = EXCLUDED.appointment_ids,
            tool_calls = COALESCE(%(tool_calls)s, calls.tool_calls),
            updated_at = now()
        """,
        {
            "sid": call_sid,
            "direction": direction,
            "scenario": scenario,
            "started_at": started_at,
            "ended_at": ended_at,
            "customer_id": customer_id,
            "verified": verified,
            "outcome": outcome,
            "transcript": Jsonb(transcript),
            "metrics": Jsonb(turn_metrics),
            "summary": summary,
            "appointment_ids": appointment_ids,
            "tool_calls": Jsonb(tool_calls) if tool_calls is not None else None,
        },
    )


async def record_status_callback(
    conn: AsyncConnection, *, call_sid: str, call_status: str, sequence: int, payload: dict
) -> bool:
    """Record a Twilio status callback once; returns whether it was new."""
    cur = await conn.execute(
        """
        INSERT INTO call_status_events (call_sid, call_status, sequence_number, payload)
        VALUES (%(sid)s, %(status)s, %(seq)s, %(payload)s)
        ON CONFLICT DO NOTHING
        """,
        {"sid": call_sid, "status": call_status, "seq": sequence, "payload": Jsonb(payload)},
    )
    if cur.rowcount:
        await conn.execute(
            "UPDATE calls SET twilio_status = %(status)s, updated_at = now() "
            "WHERE call_sid = %(sid)s",
            {"sid": call_sid, "status": call_status},
        )
    return bool(cur.rowcount)

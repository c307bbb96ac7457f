"""Call records and callback requests."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb


async def add_callback_request(
    conn: AsyncConnection,
    *,
    call_sid: str,
    customer_id: int | None,
    phone: str | None,
    reason: str,
    source: str = "after_hours",
) -> int:
    """Record that the caller wants a call back (one per call; a repeat updates the reason).

    Args:
        conn: Database connection.
        call_sid: The call asking.
        customer_id: Verified or identified customer, if any.
        phone: Number to call back (E.164).
        reason: Why, in short.
        source: Where the request comes from: ``after_hours`` (no advisor reachable),
            ``transfer_failed``, ``service_failure`` or ``reschedule_reply``.

    Returns:
        The callback request id.
    """
    cur = await conn.execute(
        """
        INSERT INTO callback_requests (call_sid, customer_id, phone, reason, source)
        VALUES (%(call_sid)s, %(customer_id)s, %(phone)s, %(reason)s, %(source)s)
        ON CONFLICT (call_sid) DO UPDATE SET reason = EXCLUDED.reason, source = EXCLUDED.source
        RETURNING id
        """,
        {
            "call_sid": call_sid,
            "customer_id": customer_id,
            "phone": phone,
            "reason": reason,
            "source": source,
        },
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def start_call(
    conn: AsyncConnection, *, call_sid: str, direction: str, scenario: str
) -> None:
    """Create the ``calls`` row when a call connects (idempotent)."""
    await conn.execute(
        """
        INSERT INTO calls (call_sid, direction, scenario) VALUES (%(sid)s, %(dir)s, %(scn)s)
        ON CONFLICT (call_sid) DO NOTHING
        """,
        {"sid": call_sid, "dir": direction, "scn": scenario},
    )


async def finish_call(
    conn: AsyncConnection,
    *,
    call_sid: str,
    customer_id: int | None,
    verified: bool,
    outcome: str,
    transcript: list[dict],
    turn_metrics: list[dict],
    summary: str,
    appointment_ids: list[int],
    tool_calls: list[dict] | None = None,
) -> None:
    """Write the end-of-call facts onto the ``calls`` row.

    ``tool_calls`` (masked, see :class:`processors.tool_calls.ToolCallRecorder`) is left as
    it is when ``None``.
    """
    await conn.execute(
        """
        UPDATE calls SET customer_id = %(customer_id)s, verified = %(verified)s,
               outcome = %(outcome)s, ended_at = now(), transcript = %(transcript)s,
               turn_metrics = %(metrics)s, summary = %(summary)s,
               appointment_ids = %(appointment_ids)s,
               tool_calls = COALESCE(%(tool_calls)s, tool_calls), updated_at = now()
        WHERE call_sid = %(sid)s
        """,
        {
            "sid": call_sid,
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

"""Data of the phone features: warm transfers, recordings, answering machines, languages,
call summaries (migration ``0050_phone_features.sql``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

#: Twilio ``DialCallStatus`` -> ``calls.transfer_status``.
DIAL_STATUSES = {
    "completed": "connected",
    "answered": "connected",
    "busy": "busy",
    "no-answer": "no-answer",
    "failed": "failed",
    "canceled": "canceled",
}
#: Twilio ``AnsweredBy`` values (async AMD with ``DetectMessageEnd``, and ``Enable``).
ANSWERED_BY = (
    "human",
    "machine_start",
    "machine_end_beep",
    "machine_end_silence",
    "machine_end_other",
    "fax",
    "unknown",
)


@dataclass(frozen=True)
class CustomerPhoneProfile:
    """What a call needs to know about a customer before it starts talking."""

    id: int
    first_name: str
    last_name: str
    preferred_language: str
    do_not_record: bool


async def customer_phone_profile(
    conn: AsyncConnection, customer_id: int
) -> CustomerPhoneProfile | None:
    """Name, preferred language and do-not-record flag of one customer.

    Args:
        conn: Database connection.
        customer_id: Customer id.

    Returns:
        The profile, or ``None`` when there is no such customer.
    """
    async with conn.cursor(row_factory=class_row(CustomerPhoneProfile)) as cur:
        await cur.execute(
            "SELECT id, first_name, last_name, preferred_language, do_not_record "
            "FROM customers WHERE id = %(id)s",
            {"id": customer_id},
        )
        return await cur.fetchone()


@dataclass(frozen=True)
class AppointmentBrief:
    """An appointment as a summary or a whisper mentions it."""

    id: int
    status: str
    service_codes: list[str]
    starts_at: datetime
    confirmation_code: str
    year: int
    make: str
    model: str


async def appointments_brief(
    conn: AsyncConnection, *, customer_id: int | None, appointment_ids: list[int]
) -> list[AppointmentBrief]:
    """Appointments of one customer by id, with their vehicle, in id order.

    Args:
        conn: Database connection.
        customer_id: Owner (rows of anyone else are never returned); ``None`` gives none.
        appointment_ids: Appointment ids.

    Returns:
        The appointments found.
    """
    if customer_id is None or not appointment_ids:
        return []
    async with conn.cursor(row_factory=class_row(AppointmentBrief)) as cur:
        await cur.execute(
            """
            SELECT a.id, a.status, a.service_codes, a.starts_at, a.confirmation_code,
                   v.year, v.make, v.model
            FROM appointments a JOIN vehicles v ON v.id = a.vehicle_id
            WHERE a.customer_id = %(customer)s AND a.id = ANY(%(ids)s)
            ORDER BY a.id
            """,
            {"customer": customer_id, "ids": list(appointment_ids)},
        )
        return await cur.fetchall()


async def set_call_language(conn: AsyncConnection, *, call_sid: str, language: str) -> None:
    """Record the language a call is served in (``en``, ``es``)."""
    await conn.execute(
        "UPDATE calls SET language = %(language)s, updated_at = now() WHERE call_sid = %(sid)s",
        {"sid": call_sid, "language": language},
    )


# --- warm transfer ------------------------------------------------------------------------


async def start_transfer(
    conn: AsyncConnection,
    *,
    call_sid: str,
    customer_id: int | None,
    reason: str,
    whisper: str,
    number: str,
) -> None:
    """Record that a call is being handed to an advisor (status ``dialing``).

    Args:
        conn: Database connection.
        call_sid: The caller's call.
        customer_id: The identified customer, if any.
        reason: Why the caller wants a person (the bot's words).
        whisper: What the advisor hears before being connected.
        number: The advisor line dialed.
    """
    await conn.execute(
        """
        UPDATE calls SET transfer_reason = %(reason)s, transfer_whisper = %(whisper)s,
               transfer_number = %(number)s, transfer_status = 'dialing',
               transfer_started_at = now(), transfer_finished_at = NULL,
               customer_id = COALESCE(%(customer)s, customer_id), updated_at = now()
        WHERE call_sid = %(sid)s
        """,
        {
            "sid": call_sid,
            "reason": reason[:500],
            "whisper": whisper[:600],
            "number": number,
            "customer": customer_id,
        },
    )


async def update_transfer_whisper(conn: AsyncConnection, *, call_sid: str, whisper: str) -> bool:
    """Replace the whisper of a transfer that is still ringing; whether it was replaced."""
    cur = await conn.execute(
        "UPDATE calls SET transfer_whisper = %(whisper)s, updated_at = now() "
        "WHERE call_sid = %(sid)s AND transfer_status = 'dialing'",
        {"sid": call_sid, "whisper": whisper[:600]},
    )
    return bool(cur.rowcount)


async def claim_whisper(conn: AsyncConnection, *, call_sid: str) -> tuple[str, str] | None:
    """The whisper of a ringing transfer, once: ``(whisper, language)``.

    The transfer moves from ``dialing`` to ``whispered``, so a replayed request gets
    nothing.

    Returns:
        ``(whisper, call language)``, or ``None`` when no transfer of the call is ringing.
    """
    cur = await conn.execute(
        """
        UPDATE calls SET transfer_status = 'whispered', updated_at = now()
        WHERE call_sid = %(sid)s AND transfer_status = 'dialing'
        RETURNING transfer_whisper, language
        """,
        {"sid": call_sid},
    )
    row = await cur.fetchone()
    return (row[0] or "", row[1]) if row else None


@dataclass(frozen=True)
class TransferResult:
    """A transfer after Twilio reported how the advisor's leg ended.

    Attributes:
        new: Whether this report changed the transfer (``False`` for a replay).
        status: ``connected``, ``no-answer``, ``busy``, ``failed`` or ``canceled``.
        customer_id: The identified customer.
        language: The call's language.
        reason: The transfer reason.
        whisper: What the advisor would have heard (the summary so far).
    """

    new: bool
    status: str
    customer_id: int | None
    language: str
    reason: str | None
    whisper: str | None


async def finish_transfer(
    conn: AsyncConnection, *, call_sid: str, dial_call_status: str, dial_call_sid: str | None
) -> TransferResult | None:
    """Apply Twilio's ``<Dial action>`` report to the call's transfer (idempotent).

    Args:
        conn: Database connection.
        call_sid: The caller's call.
        dial_call_status: Twilio ``DialCallStatus`` (a key of :data:`DIAL_STATUSES`).
        dial_call_sid: The advisor leg's CallSid, if Twilio sent one.

    Returns:
        The transfer, or ``None`` when the call had no transfer.
    """
    status = DIAL_STATUSES[dial_call_status]
    params = {"sid": call_sid, "status": status, "dial_sid": dial_call_sid}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            UPDATE calls SET transfer_status = %(status)s, transfer_finished_at = now(),
                   transfer_dial_call_sid = COALESCE(%(dial_sid)s, transfer_dial_call_sid),
                   updated_at = now()
            WHERE call_sid = %(sid)s AND transfer_status IN ('dialing', 'whispered')
            RETURNING true AS new, transfer_status AS status, customer_id, language,
                      transfer_reason AS reason, transfer_whisper AS whisper
            """,
            params,
        )
        row = await cur.fetchone()
        if row is None:
            await cur.execute(
                """
                SELECT false AS new, transfer_status AS status, customer_id, language,
                       transfer_reason AS reason, transfer_whisper AS whisper
                FROM calls WHERE call_sid = %(sid)s AND transfer_status IS NOT NULL
                """,
                params,
            )
            row = await cur.fetchone()
    return TransferResult(**row) if row else None


# --- recordings ---------------------------------------------------------------------------


async def recording_started(
    conn: AsyncConnection, *, call_sid: str, recording_sid: str, channels: int | None
) -> None:
    """Record the recording Twilio started for a call (status ``in-progress``)."""
    await conn.execute(
        """
        UPDATE calls SET recording_sid = %(re)s, recording_status = 'in-progress',
               recording_channels = %(channels)s, updated_at = now()
        WHERE call_sid = %(sid)s
        """,
        {"sid": call_sid, "re": recording_sid, "channels": channels},
    )


async def set_recording_status(
    conn: AsyncConnection, *, call_sid: str, recording_sid: str, status: str
) -> None:
    """Record a pause, resume or stop the server asked Twilio for."""
    await conn.execute(
        """
        UPDATE calls SET recording_status = %(status)s, updated_at = now()
        WHERE call_sid = %(sid)s AND recording_sid = %(re)s
          AND recording_status IN ('in-progress', 'paused')
        """,
        {"sid": call_sid, "re": recording_sid, "status": status},
    )


async def record_recording_callback(
    conn: AsyncConnection,
    *,
    call_sid: str,
    recording_sid: str,
    status: str,
    duration_secs: int | None,
    url: str | None,
    channels: int | None,
) -> bool:
    """Apply a Twilio recording status callback to the call's row (idempotent).

    The recording must be the call's own (or the call has none recorded yet). A final
    status (``completed``, ``absent``, ``failed``) is never moved back to in-progress by a
    late or replayed callback.

    Returns:
        Whether a call row matched.
    """
    cur = await conn.execute(
        """
        UPDATE calls SET recording_sid = %(re)s,
               recording_status = CASE
                   WHEN recording_status IN ('completed', 'absent', 'failed')
                        AND %(status)s = 'in-progress' THEN recording_status
                   ELSE %(status)s END,
               recording_duration_secs = COALESCE(%(duration)s, recording_duration_secs),
               recording_url = COALESCE(%(url)s, recording_url),
               recording_channels = COALESCE(%(channels)s, recording_channels),
               updated_at = now()
        WHERE call_sid = %(sid)s AND (recording_sid IS NULL OR recording_sid = %(re)s)
        """,
        {
            "sid": call_sid,
            "re": recording_sid,
            "status": status,
            "duration": duration_secs,
            "url": url,
            "channels": channels,
        },
    )
    return bool(cur.rowcount)


@dataclass(frozen=True)
class CallRecording:
    """The recording of a call."""

    recording_sid: str
    recording_status: str | None
    recording_duration_secs: int | None
    recording_channels: int | None


async def recording_of_call(conn: AsyncConnection, call_sid: str) -> CallRecording | None:
    """The call's recording, if one was started."""
    async with conn.cursor(row_factory=class_row(CallRecording)) as cur:
        await cur.execute(
            "SELECT recording_sid, recording_status, recording_duration_secs, "
            "recording_channels FROM calls "
            "WHERE call_sid = %(sid)s AND recording_sid IS NOT NULL",
            {"sid": call_sid},
        )
        return await cur.fetchone()


# --- answering machines -------------------------------------------------------------------


async def record_answered_by(
    conn: AsyncConnection, *, call_sid: str, scenario: str, answered_by: str
) -> bool:
    """Record Twilio's answering-machine verdict of an outbound call, once.

    Creates the ``calls`` row when the verdict arrives before the media stream. A
    machine's call becomes a voicemail (trigger ``calls_outcome_follows_twilio``).

    Returns:
        Whether this was the call's first verdict (``False`` for a replay).
    """
    cur = await conn.execute(
        """
        INSERT INTO calls (call_sid, direction, scenario, answered_by)
        VALUES (%(sid)s, 'outbound', %(scenario)s, %(answered_by)s)
        ON CONFLICT (call_sid) DO UPDATE SET answered_by = EXCLUDED.answered_by,
               updated_at = now()
            WHERE calls.answered_by IS NULL
        """,
        {"sid": call_sid, "scenario": scenario, "answered_by": answered_by},
    )
    return bool(cur.rowcount)


async def end_voicemail_call(conn: AsyncConnection, *, call_sid: str) -> None:
    """Close the row of a call that went to a voicemail (outcome ``voicemail``)."""
    await conn.execute(
        "UPDATE calls SET outcome = 'voicemail', ended_at = COALESCE(ended_at, now()), "
        "updated_at = now() WHERE call_sid = %(sid)s",
        {"sid": call_sid},
    )


# --- summaries ----------------------------------------------------------------------------


async def save_summary(
    conn: AsyncConnection, *, call_sid: str, text: str, data: dict[str, Any], source: str
) -> None:
    """Store a call's summary: the paragraph, the structured fields and their source.

    Args:
        conn: Database connection.
        call_sid: The call.
        text: One-paragraph summary.
        data: Structured summary (reason, outcome, appointments, follow-ups, sentiment).
        source: ``llm`` or ``template``.
    """
    await conn.execute(
        """
        UPDATE calls SET summary = %(text)s, summary_data = %(data)s, summary_source = %(source)s,
               updated_at = now()
        WHERE call_sid = %(sid)s
        """,
        {"sid": call_sid, "text": text, "data": Jsonb(data), "source": source},
    )


async def attach_callback_summary(conn: AsyncConnection, *, call_sid: str, summary: str) -> bool:
    """Put the call summary on the call's callback request, if it has one."""
    cur = await conn.execute(
        "UPDATE callback_requests SET summary = %(summary)s WHERE call_sid = %(sid)s",
        {"sid": call_sid, "summary": summary[:2000]},
    )
    return bool(cur.rowcount)


async def call_record(conn: AsyncConnection, call_sid: str) -> dict[str, Any] | None:
    """The facts of one call for the ops console (no transcript, no caller number)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT call_sid, direction, scenario, language, customer_id, verified, outcome,
                   started_at, ended_at, answered_by, summary, summary_data, summary_source,
                   transfer_reason, transfer_whisper, transfer_status, transfer_started_at,
                   transfer_finished_at, recording_sid, recording_status,
                   recording_duration_secs, appointment_ids
            FROM calls WHERE call_sid = %(sid)s
            """,
            {"sid": call_sid},
        )
        return await cur.fetchone()

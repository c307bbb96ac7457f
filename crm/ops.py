"""Queries and writes of the service manager's console (``ops/``).

Call history is keyset-paginated on ``(started_at, id)`` (newest first) over the
``calls_history_*`` indexes, so a deep page costs the same as the first one. Console
actions (a callback marked done or assigned) write their row and their audit row in one
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, LiteralString

from psycopg import AsyncConnection
from psycopg.rows import class_row, dict_row
from psycopg.types.json import Jsonb

OUTCOMES = (
    "booked",
    "rescheduled",
    "cancelled",
    "confirmed",
    "transferred",
    "info",
    "callback_requested",
    "abandoned",
    "failed",
    "voicemail",
    "opted_out",
)
DIRECTIONS = ("inbound", "outbound")
SCENARIOS = ("inbound", "service_due", "confirmation")
CALLBACK_SOURCES = ("after_hours", "transfer_failed", "service_failure", "reschedule_reply")
AUDIT_ACTIONS = ("login", "logout", "callback_done", "callback_assigned")


# --- call history ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HistoryFilter:
    """Filters of the call history; ``None`` means no filter.

    Attributes:
        started_from: Calls that started at or after this instant.
        started_before: Calls that started before this instant.
        outcome: One of :data:`OUTCOMES`, or ``"none"`` for calls without one.
        direction: One of :data:`DIRECTIONS`.
        scenario: One of :data:`SCENARIOS`.
        customer_id: One customer's calls.
        name_prefixes: ``(first or last name prefix,)`` or ``(first prefix, last prefix)``.
        phone_digits: Calls of customers whose phone ends with these digits (4 or more).
        call_sid: One call by its SID.
    """

    started_from: datetime | None = None
    started_before: datetime | None = None
    outcome: str | None = None
    direction: str | None = None
    scenario: str | None = None
    customer_id: int | None = None
    name_prefixes: tuple[str, ...] = ()
    phone_digits: str | None = None
    call_sid: str | None = None


@dataclass(frozen=True)
class CallListRow:
    """One row of the call history."""

    id: int
    call_sid: str
    direction: str
    scenario: str
    outcome: str | None
    started_at: datetime
    ended_at: datetime | None
    verified: bool
    customer_id: int | None
    first_name: str | None
    last_name: str | None
    turns: int
    appointments: int
    summary: str | None


def _like_prefix(text: str) -> str:
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def _history_where(flt: HistoryFilter) -> tuple[list[LiteralString], dict[str, Any]]:
    """WHERE fragments (fixed text) and their parameters for ``flt``."""
    where: list[LiteralString] = []
    params: dict[str, Any] = {}
    if flt.started_from is not None:
        where.append("c.started_at >= %(started_from)s")
        params["started_from"] = flt.started_from
    if flt.started_before is not None:
        where.append("c.started_at < %(started_before)s")
        params["started_before"] = flt.started_before
    if flt.outcome == "none":
        where.append("c.outcome IS NULL")
    elif flt.outcome is not None:
        where.append("c.outcome = %(outcome)s")
        params["outcome"] = flt.outcome
    if flt.direction is not None:
        where.append("c.direction = %(direction)s")
        params["direction"] = flt.direction
    if flt.scenario is not None:
        where.append("c.scenario = %(scenario)s")
        params["scenario"] = flt.scenario
    if flt.customer_id is not None:
        where.append("c.customer_id = %(customer_id)s")
        params["customer_id"] = flt.customer_id
    if flt.call_sid is not None:
        where.append("c.call_sid = %(call_sid)s")
        params["call_sid"] = flt.call_sid
    if len(flt.name_prefixes) == 1:
        where.append(
            "c.customer_id IN (SELECT id FROM customers WHERE lower(last_name) LIKE %(n1)s "
            "OR lower(first_name) LIKE %(n1)s)"
        )
        params["n1"] = _like_prefix(flt.name_prefixes[0])
    elif len(flt.name_prefixes) >= 2:
        where.append(
            "c.customer_id IN (SELECT id FROM customers WHERE lower(first_name) LIKE %(n1)s "
            "AND lower(last_name) LIKE %(n2)s)"
        )
        params["n1"] = _like_prefix(flt.name_prefixes[0])
        params["n2"] = _like_prefix(flt.name_prefixes[-1])
    if flt.phone_digits is not None:
        where.append(
            "c.customer_id IN (SELECT id FROM customers WHERE right(phone, 4) = %(last4)s "
            "AND phone LIKE %(phone_like)s)"
        )
        params["last4"] = flt.phone_digits[-4:]
        params["phone_like"] = "%" + flt.phone_digits
    return where, params


async def list_calls(
    conn: AsyncConnection,
    *,
    flt: HistoryFilter,
    after: tuple[datetime, int] | None = None,
    before: tuple[datetime, int] | None = None,
    limit: int = 50,
) -> list[CallListRow]:
    """One page of the call history, newest first.

    Args:
        conn: Database connection.
        flt: Filters.
        after: Keyset cursor ``(started_at, id)`` of the last row of the previous page:
            the page holds the calls older than it.
        before: Keyset cursor of the first row of the next page: the page holds the calls
            newer than it (a "newer" link). Ignored when ``after`` is given.
        limit: Rows to return (the caller asks one more to know whether a next page exists).

    Returns:
        Up to ``limit`` rows, newest first.
    """
    where, params = _history_where(flt)
    order = "DESC"
    if after is not None:
        where.append("(c.started_at, c.id) < (%(cursor_at)s, %(cursor_id)s)")
        params["cursor_at"], params["cursor_id"] = after
    elif before is not None:
        where.append("(c.started_at, c.id) > (%(cursor_at)s, %(cursor_id)s)")
        params["cursor_at"], params["cursor_id"] = before
        order = "ASC"
    params["limit"] = limit
    sql = f"""
        SELECT c.id, c.call_sid, c.direction, c.scenario, c.outcome, c.started_at,
               c.ended_at, c.verified, c.customer_id, cu.first_name, cu.last_name,
               jsonb_array_length(c.transcript) AS turns,
               cardinality(c.appointment_ids) AS appointments, c.summary
        FROM calls c LEFT JOIN customers cu ON cu.id = c.customer_id
        {"WHERE " + " AND ".join(where) if where else ""}
        ORDER BY c.started_at {order}, c.id {order}
        LIMIT %(limit)s
    """
    async with conn.cursor(row_factory=class_row(CallListRow)) as cur:
        await cur.execute(sql, params)
        rows = await cur.fetchall()
    return rows if order == "DESC" else rows[::-1]


@dataclass(frozen=True)
class CallDetail:
    """Everything the console shows about one call."""

    id: int
    call_sid: str
    direction: str
    scenario: str
    outcome: str | None
    twilio_status: str | None
    started_at: datetime
    ended_at: datetime | None
    verified: bool
    customer_id: int | None
    first_name: str | None
    last_name: str | None
    customer_phone: str | None
    transcript: list[dict[str, Any]]
    turn_metrics: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    summary: str | None
    appointment_ids: list[int]
    recording_url: str | None


async def get_call(conn: AsyncConnection, *, call_sid: str) -> CallDetail | None:
    """One call by SID, with its customer and (when Twilio recorded it) the recording URL."""
    async with conn.cursor(row_factory=class_row(CallDetail)) as cur:
        await cur.execute(
            """
            SELECT c.id, c.call_sid, c.direction, c.scenario, c.outcome, c.twilio_status,
                   c.started_at, c.ended_at, c.verified, c.customer_id, cu.first_name,
                   cu.last_name, cu.phone AS customer_phone, c.transcript, c.turn_metrics,
                   c.tool_calls, c.summary, c.appointment_ids,
                   (SELECT e.payload ->> 'RecordingUrl' FROM call_status_events e
                    WHERE e.call_sid = c.call_sid AND e.payload ? 'RecordingUrl'
                    ORDER BY e.sequence_number DESC, e.received_at DESC LIMIT 1)
                       AS recording_url
            FROM calls c LEFT JOIN customers cu ON cu.id = c.customer_id
            WHERE c.call_sid = %(sid)s
            """,
            {"sid": call_sid},
        )
        return await cur.fetchone()


@dataclass(frozen=True)
class AppointmentView:
    """An appointment as the console shows it."""

    id: int
    starts_at: datetime
    ends_at: datetime
    bay_id: str
    status: str
    service_codes: list[str]
    source: str
    call_sid: str | None
    advisor: str | None
    transportation: str
    confirmation_code: str
    first_name: str
    last_name: str
    year: int
    make: str
    model: str


_APPOINTMENT_VIEW = """
    SELECT a.id, a.starts_at, a.ends_at, a.bay_id, a.status, a.service_codes, a.source,
           a.call_sid, a.advisor, a.transportation, a.confirmation_code, cu.first_name,
           cu.last_name, v.year, v.make, v.model
    FROM appointments a
    JOIN customers cu ON cu.id = a.customer_id
    JOIN vehicles v ON v.id = a.vehicle_id
"""


async def appointments_by_ids(conn: AsyncConnection, ids: list[int]) -> list[AppointmentView]:
    """The appointments with these ids (a call's bookings), by start time."""
    if not ids:
        return []
    async with conn.cursor(row_factory=class_row(AppointmentView)) as cur:
        await cur.execute(
            _APPOINTMENT_VIEW + " WHERE a.id = ANY(%(ids)s) ORDER BY a.starts_at, a.id",
            {"ids": list(ids)},
        )
        return await cur.fetchall()


async def appointments_between(
    conn: AsyncConnection, *, start: datetime, end: datetime
) -> list[AppointmentView]:
    """Active appointments overlapping ``[start, end)`` (cancelled and no-shows left out)."""
    async with conn.cursor(row_factory=class_row(AppointmentView)) as cur:
        await cur.execute(
            _APPOINTMENT_VIEW
            + """
            WHERE a.status NOT IN ('cancelled', 'no_show')
              AND a.starts_at >= %(start)s - interval '1 day' AND a.starts_at < %(end)s
              AND a.ends_at > %(start)s
            ORDER BY a.bay_id, a.starts_at, a.id
            """,
            {"start": start, "end": end},
        )
        return await cur.fetchall()


# --- callbacks and the audit log ------------------------------------------------------------


@dataclass(frozen=True)
class CallbackRow:
    """A callback request in the queue."""

    id: int
    call_sid: str
    customer_id: int | None
    first_name: str | None
    last_name: str | None
    phone: str | None
    reason: str
    source: str
    status: str
    requested_at: datetime
    handled_at: datetime | None
    handled_by: str | None
    assigned_to: str | None
    assigned_at: datetime | None


_CALLBACK_VIEW = """
    SELECT r.id, r.call_sid, r.customer_id, cu.first_name, cu.last_name,
           COALESCE(r.phone, cu.phone) AS phone, r.reason, r.source, r.status,
           r.requested_at, r.handled_at, r.handled_by, r.assigned_to, r.assigned_at
    FROM callback_requests r LEFT JOIN customers cu ON cu.id = r.customer_id
"""


async def open_callbacks(conn: AsyncConnection, *, limit: int = 200) -> list[CallbackRow]:
    """Open callback requests, oldest first."""
    async with conn.cursor(row_factory=class_row(CallbackRow)) as cur:
        await cur.execute(
            _CALLBACK_VIEW
            + " WHERE r.status = 'open' ORDER BY r.requested_at, r.id LIMIT %(limit)s",
            {"limit": limit},
        )
        return await cur.fetchall()


async def closed_callbacks(conn: AsyncConnection, *, limit: int = 50) -> list[CallbackRow]:
    """Callback requests handled most recently, newest first."""
    async with conn.cursor(row_factory=class_row(CallbackRow)) as cur:
        await cur.execute(
            _CALLBACK_VIEW
            + " WHERE r.status <> 'open' ORDER BY r.handled_at DESC, r.id DESC LIMIT %(limit)s",
            {"limit": limit},
        )
        return await cur.fetchall()


async def add_audit(
    conn: AsyncConnection,
    *,
    actor: str,
    action: str,
    target_kind: str | None = None,
    target_id: str | None = None,
    details: dict[str, Any] | None = None,
    client_ip: str | None = None,
) -> None:
    """Append a row to the console's audit log."""
    await conn.execute(
        """
        INSERT INTO ops_audit_log (actor, action, target_kind, target_id, details, client_ip)
        VALUES (%(actor)s, %(action)s, %(kind)s, %(target)s, %(details)s, %(ip)s)
        """,
        {
            "actor": actor,
            "action": action,
            "kind": target_kind,
            "target": target_id,
            "details": Jsonb(details or {}),
            "ip": client_ip,
        },
    )


async def mark_callback_done(
    conn: AsyncConnection, *, callback_id: int, actor: str, client_ip: str | None
) -> bool:
    """Close an open callback request and audit it, in one transaction.

    Returns:
        False when there is no open request with this id (already done, or unknown).
    """
    async with conn.transaction():
        cur = await conn.execute(
            """
            UPDATE callback_requests
            SET status = 'done', handled_at = now(), handled_by = %(actor)s
            WHERE id = %(id)s AND status = 'open'
            RETURNING call_sid
            """,
            {"id": callback_id, "actor": actor},
        )
        row = await cur.fetchone()
        if row is None:
            return False
        await add_audit(
            conn,
            actor=actor,
            action="callback_done",
            target_kind="callback_request",
            target_id=str(callback_id),
            details={"call_sid": row[0]},
            client_ip=client_ip,
        )
    return True


async def assign_callback(
    conn: AsyncConnection,
    *,
    callback_id: int,
    advisor: str,
    actor: str,
    client_ip: str | None,
) -> bool:
    """Assign an open callback request to an advisor and audit it, in one transaction.

    Returns:
        False when there is no open request with this id.
    """
    async with conn.transaction():
        cur = await conn.execute(
            """
            UPDATE callback_requests SET assigned_to = %(advisor)s, assigned_at = now()
            WHERE id = %(id)s AND status = 'open'
            RETURNING call_sid
            """,
            {"id": callback_id, "advisor": advisor},
        )
        row = await cur.fetchone()
        if row is None:
            return False
        await add_audit(
            conn,
            actor=actor,
            action="callback_assigned",
            target_kind="callback_request",
            target_id=str(callback_id),
            details={"call_sid": row[0], "advisor": advisor},
            client_ip=client_ip,
        )
    return True


@dataclass(frozen=True)
class AuditRow:
    """One audit log entry."""

    id: int
    at: datetime
    actor: str
    action: str
    target_kind: str | None
    target_id: str | None
    details: dict[str, Any] = field(default_factory=dict)


async def recent_audit(conn: AsyncConnection, *, limit: int = 20) -> list[AuditRow]:
    """The latest audit log entries, newest first."""
    async with conn.cursor(row_factory=class_row(AuditRow)) as cur:
        await cur.execute(
            "SELECT id, at, actor, action, target_kind, target_id, details FROM ops_audit_log "
            "ORDER BY at DESC, id DESC LIMIT %(limit)s",
            {"limit": limit},
        )
        return await cur.fetchall()


# --- console users --------------------------------------------------------------------------


async def user_password_hash(conn: AsyncConnection, *, username: str) -> str | None:
    """The stored password hash of an enabled console user, if any."""
    cur = await conn.execute(
        "SELECT password_hash FROM ops_users WHERE username = %(u)s AND NOT disabled",
        {"u": username},
    )
    row = await cur.fetchone()
    return row[0] if row else None


async def set_user(
    conn: AsyncConnection, *, username: str, password_hash: str, disabled: bool = False
) -> None:
    """Create a console user or replace their password (and enable/disable them)."""
    await conn.execute(
        """
        INSERT INTO ops_users (username, password_hash, disabled)
        VALUES (%(u)s, %(h)s, %(d)s)
        ON CONFLICT (username) DO UPDATE
        SET password_hash = EXCLUDED.password_hash, disabled = EXCLUDED.disabled
        """,
        {"u": username, "h": password_hash, "d": disabled},
    )


async def disable_user(conn: AsyncConnection, *, username: str) -> bool:
    """Disable a console user; False when there is no such user."""
    cur = await conn.execute(
        "UPDATE ops_users SET disabled = true WHERE username = %(u)s", {"u": username}
    )
    return bool(cur.rowcount)


# --- campaigns ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CampaignDay:
    """The attempts of one campaign planned on one dealership day, counted."""

    campaign: str
    local_date: date
    planned: int
    dialed: int
    answered: int
    booked: int
    confirmed: int
    voicemail: int
    no_answer: int
    failed: int
    opted_out: int
    open: int
    attempts: int
    max_attempts: int


async def campaign_days(conn: AsyncConnection, *, since: date) -> list[CampaignDay]:
    """Counts per (campaign, day) for the days since ``since``, newest first."""
    async with conn.cursor(row_factory=class_row(CampaignDay)) as cur:
        await cur.execute(
            """
            SELECT campaign, local_date,
                   count(*)::int AS planned,
                   count(*) FILTER (WHERE dialed_at IS NOT NULL)::int AS dialed,
                   count(*) FILTER (
                       WHERE outcome IN ('booked', 'confirmed', 'opted_out')
                          OR (status = 'completed' AND outcome IS NULL))::int AS answered,
                   count(*) FILTER (WHERE outcome = 'booked')::int AS booked,
                   count(*) FILTER (WHERE outcome = 'confirmed')::int AS confirmed,
                   count(*) FILTER (WHERE outcome = 'voicemail')::int AS voicemail,
                   count(*) FILTER (WHERE outcome IN ('no_answer', 'busy'))::int AS no_answer,
                   count(*) FILTER (WHERE outcome = 'failed')::int AS failed,
                   count(*) FILTER (WHERE outcome = 'opted_out')::int AS opted_out,
                   count(*) FILTER (WHERE status IN ('planned', 'dialing', 'in_progress',
                                                     'retry_pending'))::int AS open,
                   COALESCE(sum(attempt_count), 0)::int AS attempts,
                   COALESCE(max(attempt_count), 0)::int AS max_attempts
            FROM campaign_attempts
            WHERE local_date >= %(since)s
            GROUP BY campaign, local_date
            ORDER BY local_date DESC, campaign
            """,
            {"since": since},
        )
        return await cur.fetchall()


@dataclass(frozen=True)
class AttemptView:
    """One customer's attempt in a campaign run."""

    id: int
    customer_id: int
    first_name: str
    last_name: str
    phone: str
    reason: str
    status: str
    outcome: str | None
    attempt_count: int
    dialed_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    call_sid: str | None
    last_error: str | None


async def campaign_attempts(
    conn: AsyncConnection, *, campaign: str, local_date: date, limit: int = 500
) -> list[AttemptView]:
    """The attempts of one campaign run (one dealership day), most attempts first."""
    async with conn.cursor(row_factory=class_row(AttemptView)) as cur:
        await cur.execute(
            """
            SELECT a.id, a.customer_id, cu.first_name, cu.last_name, cu.phone, a.reason,
                   a.status, a.outcome, a.attempt_count, a.dialed_at, a.finished_at,
                   a.next_attempt_at, a.call_sid, a.last_error
            FROM campaign_attempts a JOIN customers cu ON cu.id = a.customer_id
            WHERE a.campaign = %(campaign)s AND a.local_date = %(day)s
            ORDER BY a.attempt_count DESC, a.id
            LIMIT %(limit)s
            """,
            {"campaign": campaign, "day": local_date, "limit": limit},
        )
        return await cur.fetchall()


async def scheduled_runs(conn: AsyncConnection, *, since: date, limit: int = 50) -> list[dict]:
    """The worker's scheduled runs (``campaign_runs``) since a day, newest first."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT campaign, local_date, slot, started_at, finished_at, planned, dialed, error
            FROM campaign_runs WHERE local_date >= %(since)s
            ORDER BY started_at DESC LIMIT %(limit)s
            """,
            {"since": since, "limit": limit},
        )
        return await cur.fetchall()


# --- health ---------------------------------------------------------------------------------

_TURNS_SINCE = """
    FROM calls c, jsonb_array_elements(
        CASE WHEN jsonb_typeof(c.turn_metrics) = 'array' THEN c.turn_metrics
             ELSE '[]'::jsonb END) t
    WHERE c.ended_at >= %(since)s
      AND jsonb_typeof(t -> 'voice_to_voice_secs') = 'number'
      AND t ->> 'started_at' ~ '^\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d'
      AND (t ->> 'started_at')::timestamptz >= %(since)s
"""


async def voice_to_voice_since(
    conn: AsyncConnection, *, since: datetime, bucket_minutes: int = 5
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Voice-to-voice p50/p95 of the turns since ``since`` (finished calls).

    Returns:
        ``({"turns", "p50", "p95"}, [{"bucket", "turns", "p50", "p95"}, ...])``; seconds.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""
            SELECT count(*)::int AS turns,
                   percentile_cont(0.5) WITHIN GROUP (
                       ORDER BY (t ->> 'voice_to_voice_secs')::float8) AS p50,
                   percentile_cont(0.95) WITHIN GROUP (
                       ORDER BY (t ->> 'voice_to_voice_secs')::float8) AS p95
            {_TURNS_SINCE}
            """,
            {"since": since},
        )
        total = await cur.fetchone() or {"turns": 0, "p50": None, "p95": None}
        await cur.execute(
            f"""
            SELECT date_bin(make_interval(mins => %(minutes)s),
                            (t ->> 'started_at')::timestamptz, %(since)s) AS bucket,
                   count(*)::int AS turns,
                   percentile_cont(0.5) WITHIN GROUP (
                       ORDER BY (t ->> 'voice_to_voice_secs')::float8) AS p50,
                   percentile_cont(0.95) WITHIN GROUP (
                       ORDER BY (t ->> 'voice_to_voice_secs')::float8) AS p95
            {_TURNS_SINCE}
            GROUP BY 1 ORDER BY 1
            """,
            {"since": since, "minutes": bucket_minutes},
        )
        buckets = await cur.fetchall()
    return total, buckets


async def tool_stats_since(conn: AsyncConnection, *, since: datetime) -> list[dict[str, Any]]:
    """Per tool, the calls, errors and p95 duration of calls that ended since ``since``."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT t ->> 'name' AS tool, count(*)::int AS calls,
                   count(*) FILTER (WHERE t ->> 'status' = 'error')::int AS errors,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY (t ->> 'secs')::float8)
                       FILTER (WHERE jsonb_typeof(t -> 'secs') = 'number') AS p95_secs
            FROM calls c, jsonb_array_elements(
                CASE WHEN jsonb_typeof(c.tool_calls) = 'array' THEN c.tool_calls
                     ELSE '[]'::jsonb END) t
            WHERE c.ended_at >= %(since)s AND jsonb_typeof(t -> 'name') = 'string'
            GROUP BY 1 ORDER BY errors DESC, calls DESC, tool
            """,
            {"since": since},
        )
        return await cur.fetchall()


async def outcomes_since(conn: AsyncConnection, *, since: datetime) -> dict[str, int]:
    """Calls that ended since ``since``, counted by outcome."""
    cur = await conn.execute(
        "SELECT COALESCE(outcome, 'none'), count(*)::int FROM calls "
        "WHERE ended_at >= %(since)s GROUP BY 1 ORDER BY 2 DESC",
        {"since": since},
    )
    return {row[0]: row[1] for row in await cur.fetchall()}

"""Outbound campaigns in SQL: who to call, attempt rows, and their status machine.

Planning is one query per campaign. Time zone math happens in Postgres
(``now AT TIME ZONE zone``) over the few hundred zones of ``pg_timezone_names``, joined to
customers by name, so planning stays a handful of hash joins on 100,000 customers.

A customer's calling zone is ``customers.time_zone`` when Postgres knows it; otherwise every
zone of the customer's ``state`` (all of them must be inside the window, so a Texas customer
is only called when both Central and Mountain time allow it); otherwise the dealership's.

Attempt rows are claimed for dialing by an atomic status change that re-checks the do-not-
call flags and the calling windows at that moment: a rate-limited run that drifts past the
end of a window stops dialing, and two processes never dial the same row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import LiteralString, cast

import psycopg
from loguru import logger
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from core.profile import LEGAL_CALL_WINDOW

CAMPAIGNS = ("service_due", "confirmation")
#: Statuses of an attempt that is not finished.
OPEN_STATUSES = ("planned", "dialing", "in_progress", "retry_pending")
#: Appointment statuses that count as an upcoming visit (service-due calls skip them).
_UPCOMING = ("requested", "scheduled", "confirmed")
_IN_SHOP = ("checked_in", "in_progress")

#: Time zones of US states and territories; the first is the main one (reported local
#: time). States split across zones list every zone: the window must hold in all of them.
STATE_TIME_ZONES: dict[str, tuple[str, ...]] = {
    "AK": ("America/Anchorage", "America/Adak"),
    "AL": ("America/Chicago",),
    "AR": ("America/Chicago",),
    "AS": ("Pacific/Pago_Pago",),
    "AZ": ("America/Phoenix", "America/Denver"),
    "CA": ("America/Los_Angeles",),
    "CO": ("America/Denver",),
    "CT": ("America/New_York",),
    "DC": ("America/New_York",),
    "DE": ("America/New_York",),
    "FL": ("America/New_York", "America/Chicago"),
    "GA": ("America/New_York",),
    "GU": ("Pacific/Guam",),
    "HI": ("Pacific/Honolulu",),
    "IA": ("America/Chicago",),
    "ID": ("America/Boise", "America/Los_Angeles"),
    "IL": ("America/Chicago",),
    "IN": ("America/Indiana/Indianapolis", "America/Chicago"),
    "KS": ("America/Chicago", "America/Denver"),
    "KY": ("America/New_York", "America/Chicago"),
    "LA": ("America/Chicago",),
    "MA": ("America/New_York",),
    "MD": ("America/New_York",),
    "ME": ("America/New_York",),
    "MI": ("America/Detroit", "America/Menominee"),
    "MN": ("America/Chicago",),
    "MO": ("America/Chicago",),
    "MP": ("Pacific/Saipan",),
    "MS": ("America/Chicago",),
    "MT": ("America/Denver",),
    "NC": ("America/New_York",),
    "ND": ("America/Chicago", "America/Denver"),
    "NE": ("America/Chicago", "America/Denver"),
    "NH": ("America/New_York",),
    "NJ": ("America/New_York",),
    "NM": ("America/Denver",),
    "NV": ("America/Los_Angeles",),
    "NY": ("America/New_York",),
    "OH": ("America/New_York",),
    "OK": ("America/Chicago",),
    "OR": ("America/Los_Angeles", "America/Boise"),
    "PA": ("America/New_York",),
    "PR": ("America/Puerto_Rico",),
    "RI": ("America/New_York",),
    "SC": ("America/New_York",),
    "SD": ("America/Chicago", "America/Denver"),
    "TN": ("America/Chicago", "America/New_York"),
    "TX": ("America/Chicago", "America/Denver"),
    "UT": ("America/Denver",),
    "VA": ("America/New_York",),
    "VI": ("America/St_Thomas",),
    "VT": ("America/New_York",),
    "WA": ("America/Los_Angeles",),
    "WI": ("America/Chicago",),
    "WV": ("America/New_York",),
    "WY": ("America/Denver",),
}


@dataclass(frozen=True)
class CallRules:
    """Who may be called, and when.

    Attributes:
        dealer_time_zone: IANA zone of the dealership.
        dealer_window: Dealership-local ``[start, end)`` in which calls may be placed.
        customer_window: Customer-local ``[start, end)``; clamped to 08:00-21:00.
        due_within_days: Service-due look-ahead for ``next_service_due_date``.
        recent_attempt_days: A customer attempted for a campaign this recently is skipped.
        default_miles_per_day: Mileage rate when a vehicle's history cannot give one.
    """

    dealer_time_zone: str
    dealer_window: tuple[time, time] = (time(9, 0), time(19, 0))
    customer_window: tuple[time, time] = (time(9, 0), time(20, 0))
    due_within_days: int = 7
    recent_attempt_days: int = 14
    default_miles_per_day: float = 35.0

    def params(self, now: datetime) -> dict[str, object]:
        """Query parameters shared by planning and claiming."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        start = max(self.customer_window[0], LEGAL_CALL_WINDOW[0])
        end = min(self.customer_window[1], LEGAL_CALL_WINDOW[1])
        states = sorted(STATE_TIME_ZONES)
        return {
            "now": now,
            "dtz": self.dealer_time_zone,
            "dw_start": self.dealer_window[0],
            "dw_end": self.dealer_window[1],
            "cw_start": start,
            "cw_end": end,
            "state_codes": [s for s in states for _ in STATE_TIME_ZONES[s]],
            "state_zones": [z for s in states for z in STATE_TIME_ZONES[s]],
            "due_days": self.due_within_days,
            "recent_days": self.recent_attempt_days,
            "miles_per_day": float(self.default_miles_per_day),
        }


@dataclass(frozen=True)
class PlannedCall:
    """One customer a campaign run would call."""

    campaign: str
    customer_id: int
    phone: str
    reason: str
    local_time: datetime
    time_zone: str
    local_date: date
    vehicle_id: int | None = None
    appointment_id: int | None = None


@dataclass(frozen=True)
class ClaimedAttempt:
    """An attempt row this process now owns for one dial."""

    id: int
    campaign: str
    customer_id: int
    phone: str
    attempt_count: int


# Calling windows. ``zones``: local time and window check of every zone Postgres knows;
# ``state_zones``: per state, whether all of its zones are inside the window; ``clock``:
# the dealership's local time, today, and whether its own window is open.
_WINDOW_CTES = """
zones AS MATERIALIZED (
    SELECT z.name,
           (%(now)s::timestamptz AT TIME ZONE z.name) AS local_ts,
           (%(now)s::timestamptz AT TIME ZONE z.name)::time >= %(cw_start)s::time
           AND (%(now)s::timestamptz AT TIME ZONE z.name)::time < %(cw_end)s::time AS ok
    FROM pg_timezone_names z
),
state_zones AS MATERIALIZED (
    SELECT s.state,
           bool_and(z.ok) AS ok,
           (array_agg(z.name ORDER BY s.ord))[1] AS zone,
           (array_agg(z.local_ts ORDER BY s.ord))[1] AS local_ts
    FROM unnest(%(state_codes)s::text[], %(state_zones)s::text[])
         WITH ORDINALITY AS s(state, tz, ord)
    JOIN zones z ON z.name = s.tz
    GROUP BY s.state
),
clock AS MATERIALIZED (
    SELECT z.name AS zone, z.local_ts, z.ok,
           z.local_ts::date AS today,
           z.local_ts::time >= %(dw_start)s::time AND z.local_ts::time < %(dw_end)s::time
               AS dealer_open
    FROM zones z WHERE z.name = %(dtz)s
)"""

# Joins resolving customer ``c``'s zone; needs ``clock k`` in the FROM list.
_ZONE_JOINS = """
    LEFT JOIN zones cz ON cz.name = c.time_zone
    LEFT JOIN state_zones sz ON sz.state = upper(c.state)"""
_ZONE_NAME = "COALESCE(cz.name, sz.zone, k.zone)"
_LOCAL_TS = "COALESCE(cz.local_ts, sz.local_ts, k.local_ts)"
_WINDOW_OK = (
    "CASE WHEN cz.name IS NOT NULL THEN cz.ok WHEN sz.state IS NOT NULL THEN sz.ok ELSE k.ok END"
)
_CALLABLE = f"""
    k.dealer_open
    AND NOT c.do_not_call AND c.call_consent
    AND (c.verification_locked_until IS NULL OR c.verification_locked_until <= %(now)s)
    AND {_WINDOW_OK}"""
_NO_UPCOMING_VISIT = f"""
    NOT EXISTS (
        SELECT 1 FROM appointments ap
        WHERE ap.customer_id = c.id
          AND ((ap.status IN {_UPCOMING!r} AND ap.starts_at >= %(now)s)
               OR ap.status IN {_IN_SHOP!r}))"""

_SERVICE_DUE_CANDIDATES = """
rates AS (
    SELECT vehicle_id,
           regr_slope(mileage::float8, (service_date - DATE '2000-01-01')::float8) AS mpd
    FROM service_history
    WHERE mileage IS NOT NULL
    GROUP BY vehicle_id
),
vehicle_due AS (
    SELECT v.id AS vehicle_id, v.customer_id, v.next_service_due_date,
           v.next_service_due_mileage, est.rate,
           est.base_miles + greatest(k.today - est.base_date, 0) * est.rate AS est_miles
    FROM vehicles v
    CROSS JOIN clock k
    LEFT JOIN rates r ON r.vehicle_id = v.id
    CROSS JOIN LATERAL (
        SELECT COALESCE(v.current_mileage, v.last_service_mileage) AS base_miles,
               CASE WHEN v.current_mileage IS NOT NULL THEN COALESCE(v.mileage_read_at, k.today)
                    ELSE COALESCE(v.last_service_date, k.today) END AS base_date,
               CASE WHEN r.mpd > 0 AND r.mpd <= 1000 THEN r.mpd
                    ELSE %(miles_per_day)s::float8 END AS rate
    ) est
    WHERE v.next_service_due_date IS NOT NULL OR v.next_service_due_mileage IS NOT NULL
),
candidates AS (
    SELECT DISTINCT ON (d.customer_id)
           d.customer_id, d.vehicle_id, NULL::bigint AS appointment_id,
           CASE WHEN d.next_service_due_date <= k.today + %(due_days)s
                THEN format('service due %%s (vehicle %%s)', d.next_service_due_date,
                            d.vehicle_id)
                ELSE format('service due at %%s mi, estimated %%s mi (vehicle %%s)',
                            d.next_service_due_mileage, round(d.est_miles)::bigint,
                            d.vehicle_id)
           END AS reason,
           least(CASE WHEN d.next_service_due_date <= k.today + %(due_days)s
                      THEN (d.next_service_due_date - k.today)::float8 END,
                 CASE WHEN d.est_miles >= d.next_service_due_mileage
                      THEN (d.next_service_due_mileage - d.est_miles) / d.rate END) AS urgency
    FROM vehicle_due d CROSS JOIN clock k
    WHERE d.next_service_due_date <= k.today + %(due_days)s
       OR d.est_miles >= d.next_service_due_mileage
    ORDER BY d.customer_id, urgency, d.vehicle_id
)"""

_CONFIRMATION_CANDIDATES = """
candidates AS (
    SELECT DISTINCT ON (ap.customer_id)
           ap.customer_id, ap.vehicle_id, ap.id AS appointment_id,
           format('appointment %%s', to_char(ap.starts_at AT TIME ZONE %(dtz)s,
                                             'YYYY-MM-DD HH24:MI')) AS reason,
           extract(epoch FROM ap.starts_at)::float8 AS urgency
    FROM appointments ap CROSS JOIN clock k
    WHERE ap.starts_at >= ((k.today + 1)::timestamp AT TIME ZONE %(dtz)s)
      AND ap.starts_at < ((k.today + 2)::timestamp AT TIME ZONE %(dtz)s)
      AND ap.status = 'scheduled' AND ap.confirmed_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM campaign_attempts pa
                      WHERE pa.appointment_id = ap.id AND pa.campaign = 'confirmation')
    ORDER BY ap.customer_id, ap.starts_at
)"""

_PLAN_TAIL = f"""
eligible AS MATERIALIZED (
    SELECT cd.customer_id, cd.vehicle_id, cd.appointment_id, cd.reason, cd.urgency,
           c.phone, c.alt_phone, {_ZONE_NAME} AS zone, {_LOCAL_TS} AS local_ts, k.today,
           row_number() OVER (ORDER BY cd.urgency, cd.customer_id) AS rank
    FROM candidates cd
    JOIN customers c ON c.id = cd.customer_id
    CROSS JOIN clock k
    {_ZONE_JOINS}
    WHERE {_CALLABLE}
      AND (%(campaign)s <> 'service_due' OR {_NO_UPCOMING_VISIT})
      AND NOT EXISTS (
          SELECT 1 FROM campaign_attempts pa
          WHERE pa.customer_id = c.id AND pa.campaign = %(campaign)s
            AND (pa.local_date = k.today
                 OR (%(campaign)s = 'service_due'
                     AND pa.planned_at > %(now)s - make_interval(days => %(recent_days)s))))
),
attempted_today AS MATERIALIZED (
    SELECT c.phone, c.alt_phone
    FROM campaign_attempts pa
    JOIN customers c ON c.id = pa.customer_id
    CROSS JOIN clock k
    WHERE pa.campaign = %(campaign)s AND pa.local_date = k.today
)
SELECT e.customer_id, e.vehicle_id, e.appointment_id, e.reason, e.phone, e.zone,
       e.local_ts, e.today
FROM eligible e
WHERE NOT EXISTS (SELECT 1 FROM eligible o WHERE o.phone = e.alt_phone AND o.rank < e.rank)
  AND NOT EXISTS (SELECT 1 FROM eligible o WHERE o.alt_phone = e.phone AND o.rank < e.rank)
  AND NOT EXISTS (SELECT 1 FROM attempted_today t WHERE t.phone = e.alt_phone)
  AND NOT EXISTS (SELECT 1 FROM attempted_today t WHERE t.alt_phone = e.phone)
ORDER BY e.rank
LIMIT %(limit)s"""

PLAN_SQL: dict[str, LiteralString] = {  # composed from this module's constant fragments
    "service_due": cast(
        LiteralString, f"WITH {_WINDOW_CTES},{_SERVICE_DUE_CANDIDATES},{_PLAN_TAIL}"
    ),
    "confirmation": cast(
        LiteralString, f"WITH {_WINDOW_CTES},{_CONFIRMATION_CANDIDATES},{_PLAN_TAIL}"
    ),
}


def _check_campaign(campaign: str) -> None:
    if campaign not in CAMPAIGNS:
        raise ValueError(f"unknown campaign {campaign!r} (known: {', '.join(CAMPAIGNS)})")


async def plan_calls(
    conn: AsyncConnection,
    *,
    campaign: str,
    now: datetime,
    rules: CallRules,
    limit: int | None = None,
) -> list[PlannedCall]:
    """Customers a campaign would call at ``now``; writes nothing.

    Service-due: a vehicle due by date (within ``due_within_days``) or by estimated
    mileage, no upcoming or in-shop appointment, not attempted for the campaign in the
    last ``recent_attempt_days``. Confirmation: appointments starting tomorrow (dealership
    time), ``scheduled`` and unconfirmed. Always excluded: do-not-call, no call consent,
    verification lock, outside either calling window, and households: a customer whose
    phone is another planned (or already attempted today) customer's alternate phone, or
    the other way round, is left for a later run.

    Args:
        conn: Database connection.
        campaign: ``service_due`` or ``confirmation``.
        now: The current instant (timezone-aware); ``--now`` makes runs reproducible.
        rules: Windows and thresholds.
        limit: At most this many calls, most urgent first.

    Returns:
        The planned calls, most urgent first.
    """
    _check_campaign(campaign)
    params = rules.params(now) | {"campaign": campaign, "limit": limit}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(PLAN_SQL[campaign], params)
        rows = await cur.fetchall()
    return [
        PlannedCall(
            campaign=campaign,
            customer_id=row["customer_id"],
            phone=row["phone"],
            reason=row["reason"],
            local_time=row["local_ts"],
            time_zone=row["zone"],
            local_date=row["today"],
            vehicle_id=row["vehicle_id"],
            appointment_id=row["appointment_id"],
        )
        for row in rows
    ]


async def insert_attempts(
    conn: AsyncConnection, *, planned: Sequence[PlannedCall], now: datetime
) -> dict[int, int]:
    """Insert ``planned`` attempt rows; rows that already exist are left alone.

    Args:
        conn: Database connection.
        planned: Calls from :func:`plan_calls`.
        now: Planning instant (``planned_at``).

    Returns:
        ``{customer_id: attempt_id}`` of the rows this call inserted: only these may be
        dialed by the caller.
    """
    if not planned:
        return {}
    cur = await conn.execute(
        """
        INSERT INTO campaign_attempts (campaign, customer_id, vehicle_id, appointment_id,
                                       local_date, reason, planned_at)
        SELECT p.campaign, p.customer_id, p.vehicle_id, p.appointment_id, p.local_date,
               p.reason, %(now)s
        FROM unnest(%(campaign)s::text[], %(customer_id)s::bigint[], %(vehicle_id)s::bigint[],
                    %(appointment_id)s::bigint[], %(local_date)s::date[], %(reason)s::text[])
             AS p(campaign, customer_id, vehicle_id, appointment_id, local_date, reason)
        ON CONFLICT (campaign, customer_id, local_date) DO NOTHING
        RETURNING customer_id, id
        """,
        {
            "now": now,
            "campaign": [p.campaign for p in planned],
            "customer_id": [p.customer_id for p in planned],
            "vehicle_id": [p.vehicle_id for p in planned],
            "appointment_id": [p.appointment_id for p in planned],
            "local_date": [p.local_date for p in planned],
            "reason": [p.reason for p in planned],
        },
    )
    return {int(cid): int(aid) for cid, aid in await cur.fetchall()}


_CLAIM_SQL = cast(
    LiteralString,
    f"""
WITH {_WINDOW_CTES}
UPDATE campaign_attempts a
SET status = 'dialing', attempt_count = a.attempt_count + 1, dialed_at = %(now)s,
    next_attempt_at = NULL, outcome = NULL, call_sid = NULL, last_error = NULL
FROM customers c
CROSS JOIN clock k
{_ZONE_JOINS}
WHERE a.id = %(id)s AND a.status = ANY(%(from_statuses)s) AND c.id = a.customer_id
  AND {_CALLABLE}
  AND (a.campaign <> 'service_due' OR {_NO_UPCOMING_VISIT})
  AND (a.campaign <> 'confirmation' OR EXISTS (
          SELECT 1 FROM appointments ap
          WHERE ap.id = a.appointment_id AND ap.status = 'scheduled'
            AND ap.confirmed_at IS NULL AND ap.starts_at > %(now)s))
RETURNING a.id, a.campaign, a.customer_id, c.phone, a.attempt_count""",
)


async def claim_attempt(
    conn: AsyncConnection,
    *,
    attempt_id: int,
    now: datetime,
    rules: CallRules,
    from_statuses: Sequence[str] = ("planned",),
) -> ClaimedAttempt | None:
    """Take an attempt for one dial, if it is still callable right now.

    Atomic (one ``UPDATE``): of two processes claiming the same row, one wins. The
    customer's flags, both calling windows and the reason for the call (appointment still
    unconfirmed, no visit booked since) are checked again.

    Args:
        conn: Database connection (autocommit, or commit before dialing).
        attempt_id: The attempt row.
        now: The current instant.
        rules: Calling windows.
        from_statuses: Statuses the row may be claimed from.

    Returns:
        The claimed attempt with the number to dial, or ``None`` when it is not callable
        now (the row is left as it was).
    """
    params = rules.params(now) | {"id": attempt_id, "from_statuses": list(from_statuses)}
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_CLAIM_SQL, params)
        row = await cur.fetchone()
    return ClaimedAttempt(**row) if row else None


async def record_dialed(conn: AsyncConnection, *, attempt_id: int, call_sid: str) -> None:
    """Store the CallSid Twilio gave the attempt's call."""
    await conn.execute(
        "UPDATE campaign_attempts SET call_sid = %(sid)s WHERE id = %(id)s",
        {"sid": call_sid, "id": attempt_id},
    )


async def record_dial_error(
    conn: AsyncConnection,
    *,
    attempt_id: int,
    error: str,
    now: datetime,
    max_retries: int,
    backoff_minutes: Sequence[int],
) -> str:
    """The dial request itself failed: retry later, or give up after ``max_retries``.

    Returns:
        The attempt's new status.
    """
    cur = await conn.execute(
        """
        UPDATE campaign_attempts
        SET status = CASE WHEN attempt_count <= %(max_retries)s THEN 'retry_pending'
                          ELSE 'failed' END,
            outcome = 'failed', last_error = left(%(error)s, 500),
            next_attempt_at = CASE WHEN attempt_count <= %(max_retries)s
                                   THEN %(now)s + make_interval(mins => (%(backoff)s::int[])[
                                        least(attempt_count, cardinality(%(backoff)s::int[]))])
                              END,
            finished_at = CASE WHEN attempt_count > %(max_retries)s THEN %(now)s END
        WHERE id = %(id)s AND status = 'dialing'
        RETURNING status
        """,
        {
            "id": attempt_id,
            "error": error,
            "now": now,
            "max_retries": max_retries,
            "backoff": list(backoff_minutes) or [30],
        },
    )
    row = await cur.fetchone()
    return row[0] if row else "unknown"


async def defer_attempt(
    conn: AsyncConnection, *, attempt_id: int, until: datetime, reason: str
) -> bool:
    """An attempt could not be claimed now (window closed, flags changed): look again later.

    Only a ``planned`` or ``retry_pending`` row moves (to ``retry_pending`` at ``until``);
    one another process claimed meanwhile is left alone.
    """
    cur = await conn.execute(
        """
        UPDATE campaign_attempts
        SET status = 'retry_pending', next_attempt_at = %(until)s, last_error = %(reason)s
        WHERE id = %(id)s AND status IN ('planned', 'retry_pending')
        """,
        {"id": attempt_id, "until": until, "reason": reason},
    )
    return bool(cur.rowcount)


async def unfinished_calls(conn: AsyncConnection, *, dialed_before: datetime) -> list[dict]:
    """Attempts still ``dialing``/``in_progress`` with a CallSid, dialed before a cutoff.

    Each row has the last final Twilio status recorded for the call (if any), so a
    status callback that arrived before the CallSid was stored can be replayed.

    Returns:
        ``{"id", "call_sid", "final_status", "answered_by"}`` rows.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT a.id, a.call_sid, ev.call_status AS final_status,
                   ev.payload ->> 'AnsweredBy' AS answered_by
            FROM campaign_attempts a
            LEFT JOIN LATERAL (
                SELECT e.call_status, e.payload FROM call_status_events e
                WHERE e.call_sid = a.call_sid
                  AND e.call_status IN ('completed', 'busy', 'no-answer', 'failed', 'canceled')
                ORDER BY e.sequence_number DESC, e.received_at DESC
                LIMIT 1
            ) ev ON true
            WHERE a.status IN ('dialing', 'in_progress') AND a.call_sid IS NOT NULL
              AND a.dialed_at < %(before)s
            ORDER BY a.id
            """,
            {"before": dialed_before},
        )
        return await cur.fetchall()


async def final_status_event(conn: AsyncConnection, *, call_sid: str) -> dict | None:
    """The last final Twilio status recorded for a call (``{"status", "answered_by"}``)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            SELECT call_status AS status, payload ->> 'AnsweredBy' AS answered_by
            FROM call_status_events
            WHERE call_sid = %(sid)s
              AND call_status IN ('completed', 'busy', 'no-answer', 'failed', 'canceled')
            ORDER BY sequence_number DESC, received_at DESC
            LIMIT 1
            """,
            {"sid": call_sid},
        )
        return await cur.fetchone()


async def fail_attempt(
    conn: AsyncConnection, *, attempt_id: int, now: datetime, error: str
) -> None:
    """Give up on an open attempt (e.g. Twilio never reported how its call ended)."""
    await conn.execute(
        """
        UPDATE campaign_attempts
        SET status = 'failed', outcome = COALESCE(outcome, 'failed'), finished_at = %(now)s,
            last_error = %(error)s
        WHERE id = %(id)s AND status IN ('dialing', 'in_progress')
        """,
        {"id": attempt_id, "now": now, "error": error},
    )


async def attempt_status(conn: AsyncConnection, attempt_id: int) -> str | None:
    """The current status of an attempt row."""
    cur = await conn.execute(
        "SELECT status FROM campaign_attempts WHERE id = %(id)s", {"id": attempt_id}
    )
    row = await cur.fetchone()
    return row[0] if row else None


# Outcome of the ``calls`` row (set by the bot) -> attempt outcome.
_CALL_OUTCOME = """
    CASE cl.outcome
        WHEN 'booked' THEN 'booked' WHEN 'rescheduled' THEN 'booked'
        WHEN 'confirmed' THEN 'confirmed' WHEN 'voicemail' THEN 'voicemail'
        WHEN 'opted_out' THEN 'opted_out'
    END"""


async def apply_call_status(
    conn: AsyncConnection,
    *,
    call_sid: str,
    status: str,
    answered_by: str | None,
    now: datetime,
    max_retries: int,
    backoff_minutes: Sequence[int],
) -> dict | None:
    """Move the attempt of ``call_sid`` along after a Twilio status callback.

    ``in-progress`` -> in_progress; ``no-answer``/``busy`` -> retry_pending after a
    backoff while ``attempt_count <= max_retries``, else failed; ``failed``/``canceled`` ->
    failed; ``completed`` -> completed, with the outcome the bot recorded (on the attempt
    or on the ``calls`` row) or ``voicemail`` when a machine answered. An ``opted_out``
    outcome sets the customer's do-not-call flag. Finished attempts are not moved again.

    Returns:
        ``{"id", "status", "outcome", "customer_id"}`` of the updated attempt, or ``None``
        when no open attempt has this CallSid.
    """
    machine = bool(answered_by) and (answered_by.startswith("machine") or answered_by == "fax")
    params = {
        "sid": call_sid,
        "now": now,
        "max_retries": max_retries,
        "backoff": list(backoff_minutes) or [30],
        "machine": machine,
    }
    if status in ("queued", "initiated", "ringing"):
        return None
    if status == "in-progress":
        sql = """
            UPDATE campaign_attempts SET status = 'in_progress'
            WHERE call_sid = %(sid)s AND status = 'dialing'
            RETURNING id, status, outcome, customer_id"""
    elif status in ("no-answer", "busy"):
        params["outcome"] = "busy" if status == "busy" else "no_answer"
        sql = """
            UPDATE campaign_attempts
            SET outcome = %(outcome)s,
                status = CASE WHEN attempt_count <= %(max_retries)s THEN 'retry_pending'
                              ELSE 'failed' END,
                next_attempt_at = CASE WHEN attempt_count <= %(max_retries)s
                    THEN %(now)s + make_interval(mins => (%(backoff)s::int[])[
                         least(attempt_count, cardinality(%(backoff)s::int[]))]) END,
                finished_at = CASE WHEN attempt_count > %(max_retries)s THEN %(now)s END
            WHERE call_sid = %(sid)s AND status IN ('dialing', 'in_progress')
            RETURNING id, status, outcome, customer_id"""
    elif status in ("failed", "canceled"):
        params["error"] = f"twilio status {status}"
        sql = """
            UPDATE campaign_attempts
            SET status = 'failed', outcome = 'failed', finished_at = %(now)s,
                last_error = %(error)s
            WHERE call_sid = %(sid)s AND status IN ('dialing', 'in_progress')
            RETURNING id, status, outcome, customer_id"""
    elif status == "completed":
        sql = f"""
            UPDATE campaign_attempts a
            SET status = 'completed', finished_at = %(now)s,
                outcome = COALESCE(a.outcome,
                                   (SELECT {_CALL_OUTCOME} FROM calls cl
                                    WHERE cl.call_sid = a.call_sid),
                                   CASE WHEN %(machine)s THEN 'voicemail' END)
            WHERE a.call_sid = %(sid)s AND a.status IN ('dialing', 'in_progress')
            RETURNING a.id, a.status, a.outcome, a.customer_id"""
    else:
        return None
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        row = await cur.fetchone()
    if row and row["outcome"] == "opted_out":
        await mark_do_not_call(conn, customer_id=row["customer_id"])
    return row


async def set_attempt_outcome(conn: AsyncConnection, *, call_sid: str, outcome: str) -> dict | None:
    """The bot's outcome for the attempt of ``call_sid`` (it wins over the status callback).

    Returns:
        ``{"id", "status", "outcome", "customer_id"}``, or ``None`` for no such attempt.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            """
            UPDATE campaign_attempts SET outcome = %(outcome)s
            WHERE call_sid = %(sid)s
            RETURNING id, status, outcome, customer_id
            """,
            {"sid": call_sid, "outcome": outcome},
        )
        row = await cur.fetchone()
    if row and row["outcome"] == "opted_out":
        await mark_do_not_call(conn, customer_id=row["customer_id"])
    return row


async def sync_outcomes_from_calls(conn: AsyncConnection, *, now: datetime) -> int:
    """Copy outcomes the bot wrote on ``calls`` after the ``completed`` callback arrived.

    Returns:
        Number of attempts updated.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"""
            UPDATE campaign_attempts a SET outcome = {_CALL_OUTCOME}
            FROM calls cl
            WHERE cl.call_sid = a.call_sid AND a.status = 'completed' AND a.outcome IS NULL
              AND a.finished_at > %(now)s::timestamptz - interval '2 days'
              AND {_CALL_OUTCOME} IS NOT NULL
            RETURNING a.customer_id, a.outcome
            """,
            {"now": now},
        )
        rows = await cur.fetchall()
    for row in rows:
        if row["outcome"] == "opted_out":
            await mark_do_not_call(conn, customer_id=row["customer_id"])
    return len(rows)


async def mark_do_not_call(conn: AsyncConnection, *, customer_id: int) -> None:
    """Record do-not-call for a customer who opted out on a campaign call."""
    await conn.execute(
        "UPDATE customers SET do_not_call = true, call_consent = false "
        "WHERE id = %(id)s AND NOT (do_not_call AND NOT call_consent)",
        {"id": customer_id},
    )


async def due_retry_ids(conn: AsyncConnection, *, now: datetime, limit: int = 500) -> list[int]:
    """Attempts waiting for a retry whose time has come, oldest first."""
    cur = await conn.execute(
        """
        SELECT id FROM campaign_attempts
        WHERE status = 'retry_pending' AND next_attempt_at <= %(now)s
        ORDER BY next_attempt_at, id
        LIMIT %(limit)s
        """,
        {"now": now, "limit": limit},
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def close_stale_attempts(
    conn: AsyncConnection,
    *,
    now: datetime,
    rules: CallRules,
    stale_after: timedelta,
    requeue_planned: bool = True,
) -> dict[str, int]:
    """Clean up after crashed runs and expired retries.

    * ``planned`` rows older than ``stale_after`` were never dialed (the run died before
      claiming them): they become ``retry_pending`` now, so a retry dials them once. Pass
      ``requeue_planned=False`` while a run of this process may still be dialing them.
    * ``dialing`` rows older than ``stale_after`` without a CallSid may or may not have
      reached Twilio: they are marked failed and never dialed again.
    * ``retry_pending`` rows planned on an earlier dealership day, or whose customer has
      since opted out, are marked failed.

    Returns:
        Counts per kind of clean-up.
    """
    params = {"now": now, "cutoff": now - stale_after, "dtz": rules.dealer_time_zone}
    counts = {}
    cur = await conn.execute(
        """
        UPDATE campaign_attempts SET status = 'retry_pending', next_attempt_at = %(now)s,
               last_error = 'run interrupted before dialing'
        WHERE status = 'planned' AND planned_at < %(cutoff)s AND %(requeue)s
        """,
        params | {"requeue": requeue_planned},
    )
    counts["requeued"] = cur.rowcount
    cur = await conn.execute(
        """
        UPDATE campaign_attempts SET status = 'failed', outcome = 'failed',
               finished_at = %(now)s, last_error = 'interrupted while dialing; not redialed'
        WHERE status = 'dialing' AND call_sid IS NULL AND dialed_at < %(cutoff)s
        """,
        params,
    )
    counts["interrupted"] = cur.rowcount
    cur = await conn.execute(
        """
        UPDATE campaign_attempts a SET status = 'failed', finished_at = %(now)s,
               last_error = 'retry expired'
        FROM customers c
        WHERE a.status = 'retry_pending' AND c.id = a.customer_id
          AND (a.local_date < (%(now)s::timestamptz AT TIME ZONE %(dtz)s)::date
               OR c.do_not_call OR NOT c.call_consent)
        """,
        params,
    )
    counts["expired"] = cur.rowcount
    return counts


async def claim_run(conn: AsyncConnection, *, campaign: str, local_date: date, slot: str) -> bool:
    """Record that a scheduled slot runs; ``False`` when it already ran (or is running)."""
    _check_campaign(campaign)
    cur = await conn.execute(
        """
        INSERT INTO campaign_runs (campaign, local_date, slot) VALUES (%(c)s, %(d)s, %(s)s)
        ON CONFLICT DO NOTHING
        """,
        {"c": campaign, "d": local_date, "s": slot},
    )
    return bool(cur.rowcount)


async def finish_run(
    conn: AsyncConnection,
    *,
    campaign: str,
    local_date: date,
    slot: str,
    planned: int,
    dialed: int,
    error: str | None = None,
) -> None:
    """Store a scheduled run's counts."""
    await conn.execute(
        """
        UPDATE campaign_runs SET finished_at = now(), planned = %(p)s, dialed = %(n)s,
               error = %(e)s
        WHERE campaign = %(c)s AND local_date = %(d)s AND slot = %(s)s
        """,
        {"c": campaign, "d": local_date, "s": slot, "p": planned, "n": dialed, "e": error},
    )


#: Server-side TCP keepalives of a lock's connection (seconds, seconds, probes): over TCP
#: the server notices a vanished holder (a dead node) in about 30 s and frees its lock.
LOCK_KEEPALIVES = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
}


class AdvisoryLock:
    """A Postgres session advisory lock held on its own connection (one dialer at a time).

    Args:
        conninfo: Connection string; the lock lives as long as this connection.
        key: The advisory lock key.
    """

    def __init__(self, conninfo: str, key: int) -> None:
        self._conninfo = conninfo
        self._key = key
        self._conn: psycopg.AsyncConnection | None = None
        self.held = False

    async def try_acquire(self) -> bool:
        """Take the lock if it is free; check it is still ours if we hold it."""
        try:
            if self._conn is None or self._conn.closed:
                self.held = False
                self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                # Over TCP, let the server notice a vanished holder (a dead node) in about
                # 30 s and free the lock for a standby (no effect on unix sockets).
                for name, value in LOCK_KEEPALIVES.items():
                    await self._conn.execute(
                        cast(LiteralString, f"SET {name} = {int(value)}")  # constant names
                    )
            if self.held:
                await self._conn.execute("SELECT 1")
                return True
            cur = await self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,))
            row = await cur.fetchone()
            self.held = bool(row and row[0])
        except psycopg.OperationalError as exc:
            if self.held:
                logger.warning(f"worker lock connection lost ({type(exc).__name__})")
            self.held = False
            await self.close()
        return self.held

    async def close(self) -> None:
        """Release the lock (closing the session releases it too)."""
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            return
        with contextlib.suppress(psycopg.Error):
            if self.held:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self.held = False
        with contextlib.suppress(psycopg.Error):
            await conn.close()

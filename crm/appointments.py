"""Appointment queries and writes. The database is the final arbiter of bay conflicts.

Every write is one transaction. A booking that collides with another active appointment
on the same bay fails on the ``EXCLUDE`` constraint and surfaces as :class:`SlotTaken`;
a repeated booking with the same idempotency key returns the existing row.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from psycopg import AsyncConnection, errors
from psycopg.rows import class_row

CODE_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY3479"  # no look-alikes (0/O, 1/I, 5/S, 8/B, 2/Z)
ACTIVE_STATUSES = ("requested", "scheduled", "confirmed", "checked_in", "in_progress")


class SlotTaken(Exception):
    """The bay is no longer free at that time."""


class LoanerUnavailable(Exception):
    """Every loaner car is already reserved that day."""


@dataclass(frozen=True)
class AppointmentRow:
    """An appointment as the tools need it."""

    id: int
    customer_id: int
    vehicle_id: int
    service_codes: list[str]
    status: str
    starts_at: datetime
    ends_at: datetime
    bay_id: str
    transportation: str | None
    confirmation_code: str
    rescheduled_from_id: int | None
    external_event_id: str | None
    cancel_reason: str | None


_COLUMNS = """
    id, customer_id, vehicle_id, service_codes, status, starts_at, ends_at, bay_id,
    transportation, confirmation_code, rescheduled_from_id, external_event_id, cancel_reason
"""


def idempotency_key(*, call_sid: str, bay_id: str, starts_at: datetime, vehicle_id: int) -> str:
    """A stable key for "this call books this slot for this vehicle"."""
    raw = f"{call_sid}|{bay_id}|{starts_at.isoformat()}|{vehicle_id}"
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def new_confirmation_code() -> str:
    """A 6-character code that is easy to read out and hear."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(6))


async def busy_intervals(
    conn: AsyncConnection, *, bay_ids: list[str], start: datetime, end: datetime
) -> dict[str, list[tuple[datetime, datetime]]]:
    """Active appointments per bay overlapping ``[start, end)``.

    Args:
        conn: Database connection.
        bay_ids: Bays of interest.
        start: Range start (aware).
        end: Range end (aware).

    Returns:
        Busy intervals keyed by bay id.
    """
    # Written to match the bay-overlap exclusion constraint's partial GiST index, so the
    # lookup stays an index scan however much appointment history accumulates.
    cur = await conn.execute(
        """
        SELECT bay_id, starts_at, ends_at FROM appointments
        WHERE bay_id = ANY(%(bays)s) AND status NOT IN ('cancelled', 'no_show')
          AND tstzrange(starts_at, ends_at, '[)') && tstzrange(%(start)s, %(end)s, '[)')
        """,
        {"bays": bay_ids, "start": start, "end": end},
    )
    busy: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for bay_id, starts_at, ends_at in await cur.fetchall():
        busy[bay_id].append((starts_at, ends_at))
    return busy


async def get_for_customer(
    conn: AsyncConnection, *, appointment_id: int, customer_id: int
) -> AppointmentRow | None:
    """One appointment, only if it belongs to ``customer_id``."""
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM appointments "
            "WHERE id = %(id)s AND customer_id = %(customer_id)s",
            {"id": appointment_id, "customer_id": customer_id},
        )
        return await cur.fetchone()


async def upcoming_for_customer(
    conn: AsyncConnection, customer_id: int, *, after: datetime
) -> list[AppointmentRow]:
    """The customer's active appointments starting after ``after``."""
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM appointments WHERE customer_id = %(customer_id)s "
            "AND starts_at >= %(after)s AND status = ANY(%(active)s) ORDER BY starts_at",
            {"customer_id": customer_id, "after": after, "active": list(ACTIVE_STATUSES)},
        )
        return await cur.fetchall()


async def _reserve_loaner(conn: AsyncConnection, starts_at: datetime, loaner_cars: int) -> None:
    """Lock the loaner fleet for the appointment's LOCAL day and check one car is left."""
    zone = getattr(starts_at.tzinfo, "key", "UTC")
    day = starts_at.date()
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('loaner:' || %(day)s::text))", {"day": day}
    )
    cur = await conn.execute(
        "SELECT count(*) FROM appointments WHERE loaner_reserved AND status = ANY(%(active)s) "
        "AND (starts_at AT TIME ZONE %(zone)s)::date = %(day)s",
        {"day": day, "zone": zone, "active": list(ACTIVE_STATUSES)},
    )
    row = await cur.fetchone()
    if row and row[0] >= loaner_cars:
        raise LoanerUnavailable


async def insert_appointment(
    conn: AsyncConnection,
    *,
    customer_id: int,
    vehicle_id: int,
    service_codes: list[str],
    starts_at: datetime,
    ends_at: datetime,
    bay_id: str,
    transportation: str,
    source: str,
    call_sid: str | None,
    key: str,
    notes: str | None = None,
    rescheduled_from_id: int | None = None,
    loaner_cars: int = 0,
    calendar_sync_state: str = "not_required",
) -> AppointmentRow:
    """Insert a scheduled appointment inside the caller's transaction.

    Args:
        conn: Connection with an open transaction.
        customer_id: Owner (the verified caller).
        vehicle_id: Vehicle (checked to belong to the owner).
        service_codes: Service menu codes.
        starts_at: Start (aware).
        ends_at: End (aware).
        bay_id: Bay.
        transportation: waiter, drop_off, loaner or shuttle.
        source: phone_inbound, phone_outbound, web or walk_in.
        call_sid: Call that booked it.
        key: Idempotency key.
        notes: Free-text notes from the caller.
        rescheduled_from_id: The appointment this one replaces.
        loaner_cars: Loaner fleet size, used when ``transportation`` is ``loaner``.
        calendar_sync_state: Initial external calendar sync state.

    Returns:
        The new row, or the existing row with the same idempotency key.

    Raises:
        SlotTaken: The bay is taken at that time (exclusion constraint).
        LoanerUnavailable: No loaner car left that day.
    """
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM appointments WHERE idempotency_key = %(key)s", {"key": key}
        )
        existing = await cur.fetchone()
        if existing:
            return existing
        loaner = transportation == "loaner"
        if loaner:
            await _reserve_loaner(conn, starts_at, loaner_cars)
        for _attempt in range(5):
            try:
                async with conn.transaction():
                    await cur.execute(
                        f"""
                        INSERT INTO appointments (
                            customer_id, vehicle_id, service_codes, status, starts_at, ends_at,
                            bay_id, transportation, loaner_reserved, source, call_sid,
                            idempotency_key, confirmation_code, rescheduled_from_id, notes,
                            calendar_sync_state)
                        VALUES (
                            %(customer_id)s, %(vehicle_id)s, %(service_codes)s, 'scheduled',
                            %(starts_at)s, %(ends_at)s, %(bay_id)s, %(transportation)s,
                            %(loaner)s, %(source)s, %(call_sid)s, %(key)s, %(code)s,
                            %(rescheduled_from_id)s, %(notes)s, %(sync)s)
                        ON CONFLICT (idempotency_key) DO NOTHING
                        RETURNING {_COLUMNS}
                        """,
                        {
                            "customer_id": customer_id,
                            "vehicle_id": vehicle_id,
                            "service_codes": service_codes,
                            "starts_at": starts_at,
                            "ends_at": ends_at,
                            "bay_id": bay_id,
                            "transportation": transportation,
                            "loaner": loaner,
                            "source": source,
                            "call_sid": call_sid,
                            "key": key,
                            "code": new_confirmation_code(),
                            "rescheduled_from_id": rescheduled_from_id,
                            "notes": notes,
                            "sync": calendar_sync_state,
                        },
                    )
                    row = await cur.fetchone()
            except errors.ExclusionViolation as exc:
                raise SlotTaken from exc
            except errors.UniqueViolation as exc:
                if "confirmation_code" in str(exc.diag.constraint_name or ""):
                    continue  # astronomically rare: draw another code
                raise
            if row is None:  # a concurrent twin with the same key won the race
                await cur.execute(
                    f"SELECT {_COLUMNS} FROM appointments WHERE idempotency_key = %(key)s",
                    {"key": key},
                )
                row = await cur.fetchone()
            assert row is not None
            return row
    raise RuntimeError("could not draw a unique confirmation code")


async def cancel_appointment(
    conn: AsyncConnection, *, appointment_id: int, customer_id: int, reason: str | None
) -> AppointmentRow | None:
    """Cancel an active appointment of ``customer_id``; the bay is freed at once.

    Returns:
        The cancelled row, or ``None`` when it is not the customer's or not active.
    """
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"""
            UPDATE appointments SET status = 'cancelled', cancelled_at = now(),
                   cancel_reason = %(reason)s,
                   calendar_sync_state = CASE WHEN calendar_sync_state = 'not_required'
                                              THEN 'not_required' ELSE 'pending' END
            WHERE id = %(id)s AND customer_id = %(customer_id)s
              AND status = ANY(%(cancellable)s)
            RETURNING {_COLUMNS}
            """,
            {
                "id": appointment_id,
                "customer_id": customer_id,
                "reason": reason or "cancelled by caller",
                "cancellable": ["requested", "scheduled", "confirmed"],
            },
        )
        return await cur.fetchone()


async def set_calendar_sync(
    conn: AsyncConnection,
    *,
    appointment_id: int,
    state: str,
    event_id: str | None = None,
    error: str | None = None,
) -> None:
    """Record the external calendar sync state of an appointment."""
    await conn.execute(
        """
        UPDATE appointments SET calendar_sync_state = %(state)s,
               external_event_id = COALESCE(%(event_id)s, external_event_id),
               calendar_sync_error = %(error)s
        WHERE id = %(id)s
        """,
        {"id": appointment_id, "state": state, "event_id": event_id, "error": error},
    )

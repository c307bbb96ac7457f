"""Appointment queries and writes. The database is the final arbiter of conflicts.

Every write is one transaction. A booking that collides with another active appointment
on the same bay fails on the bay ``EXCLUDE`` constraint and surfaces as :class:`SlotTaken`;
one that collides with another active appointment of the same vehicle (on any bay) fails
on the vehicle ``EXCLUDE`` constraint and surfaces as :class:`VehicleAlreadyBooked`, as
does, when asked for, a second upcoming booking of the same service for one vehicle.
Bookings of one vehicle are serialised by a row lock on the vehicle, so those checks run
before the insert and can name the appointment that is in the way. A repeated booking with
the same idempotency key returns the existing row, but only while it is live: once it is
cancelled (or rescheduled away) the same booking is made afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, LiteralString, cast

from psycopg import AsyncConnection, errors
from psycopg.rows import class_row, dict_row

CODE_ALPHABET = "ACDEFGHJKLMNPQRTUVWXY3479"  # no look-alikes (0/O, 1/I, 5/S, 8/B, 2/Z)
ACTIVE_STATUSES = ("requested", "scheduled", "confirmed", "checked_in", "in_progress")
#: A live appointment holds its bay and its vehicle: the predicate of both EXCLUDE
#: constraints and of the live-idempotency-key unique index (migrations 0001 and 0025).
_LIVE = "status NOT IN ('cancelled', 'no_show')"
VEHICLE_OVERLAP_CONSTRAINT = "appointments_no_vehicle_overlap"


class SlotTaken(Exception):
    """The bay is no longer free at that time."""


class LoanerUnavailable(Exception):
    """Every loaner car is already reserved that day."""


class VehicleAlreadyBooked(Exception):
    """The vehicle already has an appointment in the way.

    Attributes:
        reason: ``"overlap"`` (another active appointment of the vehicle overlaps that
            time) or ``"same_service"`` (the vehicle already has an upcoming appointment
            for that service at another time).
        existing: The appointment in the way, when it could be read (``None`` when a
            concurrent writer that did not take the vehicle lock hit the constraint and
            its row is not visible yet).
    """

    def __init__(self, *, reason: str, existing: AppointmentRow | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.existing = existing


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


def idempotency_key(
    *,
    call_sid: str,
    bay_id: str,
    starts_at: datetime,
    vehicle_id: int,
    service_codes: list[str],
) -> str:
    """A stable key for "this call books this service in this slot for this vehicle".

    The services are part of the key: a tire rotation asked for in the bay and minute of the
    caller's oil change is another booking (refused as a clash), not a replay of the oil
    change.
    """
    services = ",".join(sorted(service_codes))
    raw = f"{call_sid}|{bay_id}|{starts_at.isoformat()}|{vehicle_id}|{services}"
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


async def lock_vehicle(conn: AsyncConnection, *, vehicle_id: int) -> bool:
    """Serialise bookings of one vehicle until the end of the current transaction.

    Takes ``FOR NO KEY UPDATE`` on the vehicle row: concurrent bookings, reschedules and
    duplicate checks of the same vehicle wait for each other, while inserts elsewhere that
    merely reference the vehicle (foreign keys take ``KEY SHARE``) are not blocked.

    Args:
        conn: Connection with an open transaction.
        vehicle_id: The vehicle.

    Returns:
        Whether the vehicle exists.
    """
    cur = await conn.execute(
        "SELECT 1 FROM vehicles WHERE id = %(id)s FOR NO KEY UPDATE", {"id": vehicle_id}
    )
    return await cur.fetchone() is not None


async def vehicle_overlap(
    conn: AsyncConnection,
    *,
    vehicle_id: int,
    starts_at: datetime,
    ends_at: datetime,
) -> AppointmentRow | None:
    """The first active appointment of ``vehicle_id`` overlapping ``[starts_at, ends_at)``.

    Uses the same predicate as the ``appointments_no_vehicle_overlap`` constraint (and its
    GiST index).
    """
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM appointments "
            f"WHERE vehicle_id = %(vehicle_id)s AND {_LIVE} "
            "AND tstzrange(starts_at, ends_at, '[)') && tstzrange(%(start)s, %(end)s, '[)') "
            "ORDER BY starts_at, id LIMIT 1",
            {"vehicle_id": vehicle_id, "start": starts_at, "end": ends_at},
        )
        return await cur.fetchone()


async def upcoming_same_service(
    conn: AsyncConnection, *, vehicle_id: int, service_codes: list[str], after: datetime
) -> AppointmentRow | None:
    """The vehicle's next active appointment sharing a service code, ending after ``after``.

    Args:
        conn: Database connection.
        vehicle_id: The vehicle.
        service_codes: Service codes of the booking being made.
        after: Only appointments that have not ended by then count (normally now).

    Returns:
        The earliest such appointment, or ``None``.
    """
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        await cur.execute(
            f"SELECT {_COLUMNS} FROM appointments "
            "WHERE vehicle_id = %(vehicle_id)s AND status = ANY(%(active)s) "
            "AND ends_at > %(after)s AND service_codes && %(codes)s::text[] "
            "ORDER BY starts_at, id LIMIT 1",
            {
                "vehicle_id": vehicle_id,
                "active": list(ACTIVE_STATUSES),
                "after": after,
                "codes": service_codes,
            },
        )
        return await cur.fetchone()


async def _live_by_key(cur: Any, key: str) -> AppointmentRow | None:
    await cur.execute(
        f"SELECT {_COLUMNS} FROM appointments WHERE idempotency_key = %(key)s AND {_LIVE}",
        {"key": key},
    )
    return await cur.fetchone()


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
    one_per_service_after: datetime | None = None,
) -> AppointmentRow:
    """Insert a scheduled appointment inside the caller's transaction.

    Locks the vehicle (:func:`lock_vehicle`) first, so bookings of one vehicle run one at a
    time, then: returns the live row with the same idempotency key if there is one (a
    replay); refuses when another active appointment of the vehicle overlaps (checked here
    for a useful answer, guaranteed by the vehicle ``EXCLUDE`` constraint); optionally
    refuses a second upcoming booking of the same service; then inserts.

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
        one_per_service_after: When given (normally now), refuse the booking if the
            vehicle already has an active appointment for one of ``service_codes`` that
            has not ended by then. Left out when rescheduling (the old row is already
            cancelled, so the number of bookings does not grow).

    Returns:
        The new row, or the live row with the same idempotency key.

    Raises:
        SlotTaken: The bay is taken at that time (exclusion constraint).
        VehicleAlreadyBooked: The vehicle has an overlapping active appointment, or (with
            ``one_per_service_after``) an upcoming one for the same service.
        LoanerUnavailable: No loaner car left that day.
    """
    await lock_vehicle(conn, vehicle_id=vehicle_id)
    async with conn.cursor(row_factory=class_row(AppointmentRow)) as cur:
        existing = await _live_by_key(cur, key)
        if existing:
            return existing
        in_the_way = await vehicle_overlap(
            conn, vehicle_id=vehicle_id, starts_at=starts_at, ends_at=ends_at
        )
        if in_the_way:
            raise VehicleAlreadyBooked(reason="overlap", existing=in_the_way)
        if one_per_service_after is not None:
            same = await upcoming_same_service(
                conn,
                vehicle_id=vehicle_id,
                service_codes=service_codes,
                after=one_per_service_after,
            )
            if same:
                raise VehicleAlreadyBooked(reason="same_service", existing=same)
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
                        ON CONFLICT (idempotency_key)
                            WHERE status NOT IN ('cancelled', 'no_show') DO NOTHING
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
                if exc.diag.constraint_name == VEHICLE_OVERLAP_CONSTRAINT:
                    # Only a writer that skipped the vehicle lock gets here; name the
                    # appointment in the way if it is visible by now.
                    raise VehicleAlreadyBooked(
                        reason="overlap",
                        existing=await vehicle_overlap(
                            conn, vehicle_id=vehicle_id, starts_at=starts_at, ends_at=ends_at
                        ),
                    ) from exc
                raise SlotTaken from exc
            except errors.UniqueViolation as exc:
                if "confirmation_code" in str(exc.diag.constraint_name or ""):
                    continue  # astronomically rare: draw another code
                raise
            if row is None:  # a concurrent twin with the same key won the race
                row = await _live_by_key(cur, key)
                if row is None:  # ...and was cancelled since: book afresh
                    continue
            return row
    raise RuntimeError("could not insert the appointment (confirmation code or key races)")


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


@dataclass(frozen=True)
class ConfirmedAppointment:
    """What the bot reads back after confirming an appointment."""

    starts_at: datetime
    confirmation_code: str


async def confirm_scheduled(
    conn: AsyncConnection, *, appointment_id: int, customer_id: int
) -> ConfirmedAppointment | None:
    """Confirm a ``scheduled`` appointment of ``customer_id``.

    Args:
        conn: Database connection.
        appointment_id: The appointment.
        customer_id: Its owner (the verified caller).

    Returns:
        Its time and code, or ``None`` when it is not the customer's or not ``scheduled``.
    """
    async with conn.cursor(row_factory=class_row(ConfirmedAppointment)) as cur:
        await cur.execute(
            """
            UPDATE appointments SET status = 'confirmed', confirmed_at = now()
            WHERE id = %(id)s AND customer_id = %(customer_id)s AND status = 'scheduled'
            RETURNING starts_at, confirmation_code
            """,
            {"id": appointment_id, "customer_id": customer_id},
        )
        return await cur.fetchone()


@dataclass(frozen=True)
class CalendarMirror:
    """What the calendar needs to find the event of an appointment."""

    external_event_id: str | None
    confirmation_code: str
    starts_at: datetime


async def calendar_mirror(conn: AsyncConnection, appointment_id: int) -> CalendarMirror | None:
    """The calendar event id, code and time of one appointment (``None``: no such row)."""
    async with conn.cursor(row_factory=class_row(CalendarMirror)) as cur:
        await cur.execute(
            "SELECT external_event_id, confirmation_code, starts_at FROM appointments "
            "WHERE id = %(id)s",
            {"id": appointment_id},
        )
        return await cur.fetchone()


@dataclass(frozen=True)
class PendingSync:
    """An appointment whose calendar mirror is pending or failed, with what its event says."""

    appointment: AppointmentRow
    first_name: str
    vehicle: str


_SYNC_COLUMNS = ", ".join(f"a.{f.name}" for f in dataclasses.fields(AppointmentRow))


async def pending_calendar_syncs(
    conn: AsyncConnection, *, min_age: timedelta, limit: int
) -> list[PendingSync]:
    """Appointments whose calendar sync is ``pending`` or ``failed``, oldest first.

    Args:
        conn: Database connection.
        min_age: Only rows last updated at least this long ago.
        limit: At most this many rows.

    Returns:
        The appointments with the customer's first name and the vehicle's description.
    """
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            cast(  # composed from AppointmentRow's field names, no input
                LiteralString,
                f"""
            SELECT {_SYNC_COLUMNS}, c.first_name AS _first_name,
                   concat_ws(' ', v.year, v.make, v.model, v.trim) AS _vehicle
            FROM appointments a
            JOIN customers c ON c.id = a.customer_id
            JOIN vehicles v ON v.id = a.vehicle_id
            WHERE a.calendar_sync_state IN ('pending', 'failed')
              AND a.updated_at <= now() - %(min_age)s
            ORDER BY a.id
            LIMIT %(limit)s
            """,
            ),
            {"min_age": min_age, "limit": limit},
        )
        rows = await cur.fetchall()
    pending = []
    for row in rows:
        first_name = row.pop("_first_name") or ""
        vehicle = row.pop("_vehicle") or ""
        pending.append(PendingSync(AppointmentRow(**row), first_name, vehicle))
    return pending

"""Scheduling tools: availability, booking, rescheduling, cancelling.

Availability comes from the dealership profile, the appointments table and the calendar
backend's busy times. Slot ids are opaque and only valid in the call that was offered
them. Bookings run in one transaction with the database's exclusion constraint as the
final arbiter; they are idempotent per (call, slot, vehicle) while the booked row is live,
and shielded from cancellation by :func:`tools.registry.run_tool`. One vehicle gets at
most one active appointment at a time and one upcoming appointment per service; a booking
that would break either rule is answered with the appointment in the way and an offer to
move it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from loguru import logger

from crm import appointments as crm_appointments
from crm import vehicles as crm_vehicles
from scheduling.availability import Slot, candidate_slots, pick_spread, speakable
from tools.context import ToolContext
from tools.customers import require_verified
from tools.registry import ToolRefusal, tool
from tools.texting import queue_change_text
from tools.vehicles import describe_vehicle

TRANSPORTATION = ("waiter", "drop_off", "loaner", "shuttle")
MAX_RANGE_DAYS = 14


def _now(ctx: ToolContext) -> datetime:
    return ctx.now() if ctx.now else datetime.now(UTC)


def _service(ctx: ToolContext, service_type: str):
    wanted = service_type.strip().lower()
    service = ctx.profile.service(wanted.replace(" ", "_"))
    if service is None:
        service = next(
            (s for s in ctx.profile.services.values() if s.spoken_name.lower() == wanted), None
        )
    if service is None:
        names = ", ".join(s.spoken_name for s in list(ctx.profile.services.values())[:5])
        raise ToolRefusal(
            f"We don't have a service called {service_type}. We offer for example {names}.",
            code="unknown_service",
            services=sorted(ctx.profile.services),
        )
    return service


def _parse_day(value: str | None, default: date, label: str) -> date:
    if not value:
        return default
    try:
        return date.fromisoformat(value[:10])
    except ValueError as exc:
        raise ToolRefusal(f"I didn't catch the {label} date.", code="bad_date") from exc


def _slot_json(slot_id: str, slot: Slot) -> dict[str, str]:
    return {"slot_id": slot_id, "when": slot.label}


def spell_code(code: str) -> str:
    """Spell a confirmation code for speech: ``K 7 4 D 9 X``."""
    return " ".join(code)


async def _find_slots(
    ctx: ToolContext,
    *,
    service_code: str,
    date_from: date,
    date_to: date,
    part_of_day: str | None,
    limit: int,
    exclude: set[tuple[str, datetime]] = frozenset(),  # type: ignore[assignment]
) -> list[Slot]:
    service = ctx.profile.service(service_code)
    assert service is not None
    tz = ctx.profile.time_zone
    range_start = datetime.combine(date_from, time(0), tzinfo=tz)
    range_end = datetime.combine(date_to + timedelta(days=1), time(0), tzinfo=tz)
    bays = [b.id for b in ctx.profile.bays_for(service.capability)]
    async with ctx.db.connection() as conn:
        busy = await crm_appointments.busy_intervals(
            conn, bay_ids=bays, start=range_start, end=range_end
        )
    shop_busy = await ctx.calendar.busy(range_start, range_end) if ctx.calendar else []
    slots = (
        s
        for s in candidate_slots(
            profile=ctx.profile,
            service=service,
            busy_by_bay=busy,
            shop_busy=shop_busy,
            date_from=date_from,
            date_to=date_to,
            now=_now(ctx),
            part_of_day=part_of_day,
        )
        if (s.bay_id, s.starts_at) not in exclude
    )
    return pick_spread(slots, limit=limit)


@tool(
    name="check_availability",
    description=(
        "Find up to 5 open appointment slots for a service. service_type is a service code "
        "such as oil_change, tire_rotation, brake_inspection, alignment, diagnostics. Dates "
        "are YYYY-MM-DD in the dealership's time zone; default is the next 7 days. Offer the "
        "returned 'when' labels to the caller and book with the matching slot_id."
    ),
    properties={
        "service_type": {"type": "string", "description": "Service code, e.g. oil_change."},
        "date_from": {"type": "string", "description": "First day to search, YYYY-MM-DD."},
        "date_to": {"type": "string", "description": "Last day to search, YYYY-MM-DD."},
        "part_of_day": {"type": "string", "enum": ["morning", "afternoon", "evening"]},
    },
    required=["service_type"],
)
async def check_availability(
    ctx: ToolContext,
    *,
    service_type: str,
    date_from: str | None = None,
    date_to: str | None = None,
    part_of_day: str | None = None,
) -> dict[str, Any]:
    """Up to 5 open slots for a service."""
    service = _service(ctx, service_type)
    today = _now(ctx).astimezone(ctx.profile.time_zone).date()
    first = max(_parse_day(date_from, today, "start"), today)
    horizon = today + timedelta(days=ctx.profile.max_booking_days_ahead)
    if first > horizon:  # before any date arithmetic: 9999-12-31 + 6 days overflows
        raise ToolRefusal(
            f"We only book up to {ctx.profile.max_booking_days_ahead} days ahead.",
            code="too_far_ahead",
        )
    last = _parse_day(date_to, first + timedelta(days=6), "end")
    if last < first:
        last = first + timedelta(days=6)
    last = min(last, first + timedelta(days=MAX_RANGE_DAYS - 1))
    if part_of_day and part_of_day not in ("morning", "afternoon", "evening"):
        part_of_day = None
    slots = await _find_slots(
        ctx,
        service_code=service.code,
        date_from=first,
        date_to=min(last, horizon),
        part_of_day=part_of_day,
        limit=5,
    )
    if not slots:
        return {
            "ok": True,
            "slots": [],
            "say": f"I don't have any openings for a {service.spoken_name} then. "
            "Would another day work?",
        }
    return {
        "ok": True,
        "service": service.spoken_name,
        "duration_minutes": service.duration_minutes,
        "price_range": [service.price_min, service.price_max],
        "slots": [_slot_json(ctx.session.remember_slot(s), s) for s in slots],
    }


def _offered_slot(ctx: ToolContext, slot_id: str) -> Slot:
    slot = ctx.session.offered_slots.get(str(slot_id))
    if slot is None:
        raise ToolRefusal(
            "I don't have that time in front of me. Let me check availability again.",
            code="unknown_slot",
        )
    if slot.starts_at <= _now(ctx):
        raise ToolRefusal("That time has already passed.", code="slot_in_past")
    return slot


async def _alternatives(ctx: ToolContext, slot: Slot) -> list[dict[str, str]]:
    day = slot.starts_at.astimezone(ctx.profile.time_zone).date()
    alternatives = await _find_slots(
        ctx,
        service_code=slot.service_code,
        date_from=day,
        date_to=day + timedelta(days=6),
        part_of_day=None,
        limit=2,
        exclude={(slot.bay_id, slot.starts_at)},
    )
    return [_slot_json(ctx.session.remember_slot(s), s) for s in alternatives]


async def _owned_vehicle(ctx: ToolContext, conn, customer_id: int, vehicle_id: int) -> Any:
    vehicles = await crm_vehicles.list_vehicles(conn, customer_id)
    vehicle = next((v for v in vehicles if v.id == int(vehicle_id)), None)
    if vehicle is None:
        raise ToolRefusal("I don't see that vehicle on your account.", code="unknown_vehicle")
    return vehicle


def _source(ctx: ToolContext) -> str:
    return "phone_outbound" if ctx.session.direction == "outbound" else "phone_inbound"


async def _sync_calendar(ctx: ToolContext, row: crm_appointments.AppointmentRow, vehicle: str):
    if ctx.calendar is None:
        return
    try:
        await ctx.calendar.appointment_changed(
            row, first_name=ctx.session.customer_first_name or "", vehicle=vehicle
        )
    except Exception as exc:  # the booking stands; the sync state records what is left
        logger.warning(f"calendar sync for appointment {row.id} failed: {type(exc).__name__}")


def _with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _service_names(ctx: ToolContext, codes: list[str]) -> list[str]:
    return [service.spoken_name if (service := ctx.profile.service(c)) else c for c in codes]


def _already_booked(
    ctx: ToolContext,
    exc: crm_appointments.VehicleAlreadyBooked,
    *,
    customer_id: int,
    vehicle: str,
    rescheduling: bool = False,
) -> dict[str, Any]:
    """The answer when the vehicle already has an appointment in the way.

    Names the appointment in the way (day and time, service, confirmation code) only when
    it is the caller's own; a vehicle's previous owner's booking stays private.
    """
    existing = exc.existing
    vehicle = vehicle or "vehicle"
    same_time = exc.reason == "overlap"
    unchanged = " Your original appointment is unchanged." if rescheduling else ""
    result: dict[str, Any] = {
        "ok": False,
        "error": "already_booked",
        "reason": "same_time" if same_time else "same_service",
    }
    if existing is None or existing.customer_id != customer_id:
        result["say"] = (
            "That vehicle already has an appointment at that time." + unchanged
            if same_time
            else "That vehicle already has that service booked." + unchanged
        )
        return result
    when = speakable(existing.starts_at, ctx.profile.time_zone)
    services = _service_names(ctx, list(existing.service_codes))
    what = _with_article(" and ".join(services))
    if rescheduling:
        result["say"] = (
            f"Your {vehicle} already has {what} booked then, on {when}, so I can't move "
            f"this one there.{unchanged} Would you like a different time?"
        )
    elif same_time:
        result["say"] = (
            f"You already have {what} booked for your {vehicle} then, on {when}. "
            "Would you like to move it instead?"
        )
    else:
        result["say"] = (
            f"Your {vehicle} already has {what} booked for {when}. "
            "Would you like to move that appointment instead?"
        )
    result["existing_appointment"] = {
        "appointment_id": existing.id,
        "when": when,
        "services": services,
        "confirmation_code": existing.confirmation_code,
        "confirmation_code_spoken": spell_code(existing.confirmation_code),
    }
    return result


@tool(
    name="book_appointment",
    description=(
        "Book a slot from check_availability for a VERIFIED caller's vehicle. Confirm the "
        "day, time, vehicle and transportation with the caller first. Read the returned "
        "confirmation code back to the caller. If the vehicle already has that time or that "
        "service booked, the result says so and names the existing appointment: offer to "
        "move it with reschedule_appointment instead of booking again."
    ),
    properties={
        "slot_id": {"type": "string", "description": "slot_id from check_availability."},
        "vehicle_id": {"type": "integer", "description": "vehicle_id from get_vehicle_history."},
        "service_type": {"type": "string", "description": "Service code, e.g. oil_change."},
        "transportation": {"type": "string", "enum": list(TRANSPORTATION)},
        "notes": {"type": "string", "description": "Anything the technician should know."},
    },
    required=["slot_id", "vehicle_id", "service_type"],
    mutating=True,
)
async def book_appointment(
    ctx: ToolContext,
    *,
    slot_id: str,
    vehicle_id: int,
    service_type: str,
    transportation: str | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """Book an offered slot for the verified caller."""
    customer_id = require_verified(ctx)
    slot = _offered_slot(ctx, slot_id)
    service = _service(ctx, service_type)
    if service.code != slot.service_code:
        raise ToolRefusal(
            f"That time was for a different service. Let me look up {service.spoken_name} times.",
            code="slot_service_mismatch",
        )
    transportation = transportation if transportation in TRANSPORTATION else "waiter"
    key = crm_appointments.idempotency_key(
        call_sid=ctx.session.call_sid,
        bay_id=slot.bay_id,
        starts_at=slot.starts_at,
        vehicle_id=int(vehicle_id),
        service_codes=[service.code],
    )
    try:
        async with ctx.db.connection() as conn, conn.transaction():
            vehicle = await _owned_vehicle(ctx, conn, customer_id, int(vehicle_id))
            row = await crm_appointments.insert_appointment(
                conn,
                customer_id=customer_id,
                vehicle_id=vehicle.id,
                service_codes=[service.code],
                starts_at=slot.starts_at,
                ends_at=slot.ends_at,
                bay_id=slot.bay_id,
                transportation=transportation,
                source=_source(ctx),
                call_sid=ctx.session.call_sid,
                key=key,
                notes=notes,
                loaner_cars=ctx.profile.loaner_cars,
                calendar_sync_state=getattr(ctx.calendar, "initial_sync_state", "not_required"),
                one_per_service_after=_now(ctx),
            )
            text = await queue_change_text(ctx, conn, appointment_id=row.id, kind="booked")
    except crm_appointments.VehicleAlreadyBooked as exc:
        return _already_booked(ctx, exc, customer_id=customer_id, vehicle=describe_vehicle(vehicle))
    except crm_appointments.SlotTaken:
        return {
            "ok": False,
            "error": "slot_taken",
            "say": "I'm sorry, that time was just taken. I have these instead.",
            "alternatives": await _alternatives(ctx, slot),
        }
    except crm_appointments.LoanerUnavailable:
        raise ToolRefusal(
            "All our loaner cars are reserved that day. We can offer our shuttle instead.",
            code="no_loaner",
        ) from None
    if row.id not in ctx.session.appointment_ids:
        ctx.session.appointment_ids.append(row.id)
    ctx.session.outcome = "booked"
    await _sync_calendar(ctx, row, describe_vehicle(vehicle))
    return {
        "ok": True,
        "appointment_id": row.id,
        "confirmation_code": row.confirmation_code,
        "confirmation_code_spoken": spell_code(row.confirmation_code),
        "when": speakable(row.starts_at, ctx.profile.time_zone),
        "vehicle": describe_vehicle(vehicle),
        "service": service.spoken_name,
        "transportation": row.transportation,
        **text,
    }


@tool(
    name="list_appointments",
    description="For a VERIFIED caller: their upcoming appointments with ids.",
    properties={},
)
async def list_appointments(ctx: ToolContext) -> dict[str, Any]:
    """The verified caller's upcoming appointments."""
    customer_id = require_verified(ctx)
    async with ctx.db.connection() as conn:
        rows = await crm_appointments.upcoming_for_customer(conn, customer_id, after=_now(ctx))
        vehicles = {v.id: v for v in await crm_vehicles.list_vehicles(conn, customer_id)}
    return {
        "ok": True,
        "appointments": [
            {
                "appointment_id": r.id,
                "when": speakable(r.starts_at, ctx.profile.time_zone),
                "services": _service_names(ctx, list(r.service_codes)),
                "vehicle": describe_vehicle(vehicles[r.vehicle_id])
                if r.vehicle_id in vehicles
                else None,
                "status": r.status,
            }
            for r in rows
        ],
    }


async def _owned_active_appointment(ctx: ToolContext, conn, customer_id: int, appointment_id):
    row = await crm_appointments.get_for_customer(
        conn, appointment_id=int(appointment_id), customer_id=customer_id
    )
    if row is None:
        raise ToolRefusal(
            "I don't see that appointment on your account.", code="unknown_appointment"
        )
    if row.status not in ("requested", "scheduled", "confirmed"):
        raise ToolRefusal(
            f"That appointment is already {row.status.replace('_', ' ')}, so I can't change it.",
            code="not_changeable",
        )
    return row


@tool(
    name="reschedule_appointment",
    description=(
        "Move a VERIFIED caller's appointment to a slot from check_availability (search "
        "with the appointment's service first). Read the new confirmation code back."
    ),
    properties={
        "appointment_id": {"type": "integer", "description": "From list_appointments."},
        "slot_id": {"type": "string", "description": "slot_id from check_availability."},
    },
    required=["appointment_id", "slot_id"],
    mutating=True,
)
async def reschedule_appointment(
    ctx: ToolContext, *, appointment_id: int, slot_id: str
) -> dict[str, Any]:
    """Move an appointment: the old one is cancelled and linked from the new one."""
    customer_id = require_verified(ctx)
    slot = _offered_slot(ctx, slot_id)
    try:
        async with ctx.db.connection() as conn, conn.transaction():
            old = await _owned_active_appointment(ctx, conn, customer_id, appointment_id)
            if slot.service_code not in old.service_codes:
                raise ToolRefusal(
                    "That time was found for a different service. Let me check times for "
                    "this appointment's service.",
                    code="slot_service_mismatch",
                )
            # The vehicle lock comes before the appointment row lock, in the same order as
            # a booking takes them, so a concurrent booking and reschedule cannot deadlock.
            await crm_appointments.lock_vehicle(conn, vehicle_id=old.vehicle_id)
            cancelled = await crm_appointments.cancel_appointment(
                conn, appointment_id=old.id, customer_id=customer_id, reason="rescheduled"
            )
            if cancelled is None:  # changed by someone else since we read it
                raise ToolRefusal(
                    "That appointment was just changed, so I can't move it. Let me check "
                    "your appointments again.",
                    code="not_changeable",
                )
            vehicles = await crm_vehicles.list_vehicles(conn, customer_id)
            row = await crm_appointments.insert_appointment(
                conn,
                customer_id=customer_id,
                vehicle_id=old.vehicle_id,
                service_codes=list(old.service_codes),
                starts_at=slot.starts_at,
                ends_at=slot.ends_at,
                bay_id=slot.bay_id,
                transportation=old.transportation or "waiter",
                source=_source(ctx),
                call_sid=ctx.session.call_sid,
                key=f"resched:{old.id}",
                rescheduled_from_id=old.id,
                loaner_cars=ctx.profile.loaner_cars,
                calendar_sync_state=getattr(ctx.calendar, "initial_sync_state", "not_required"),
            )
            text = await queue_change_text(ctx, conn, appointment_id=row.id, kind="rescheduled")
    except crm_appointments.VehicleAlreadyBooked as exc:
        return _already_booked(
            ctx,
            exc,
            customer_id=customer_id,
            vehicle=next((describe_vehicle(v) for v in vehicles if v.id == old.vehicle_id), ""),
            rescheduling=True,
        )
    except crm_appointments.SlotTaken:
        return {
            "ok": False,
            "error": "slot_taken",
            "say": "I'm sorry, that time was just taken. Your original appointment is "
            "unchanged. I have these instead.",
            "alternatives": await _alternatives(ctx, slot),
        }
    vehicle = next((describe_vehicle(v) for v in vehicles if v.id == row.vehicle_id), "")
    for appointment_id_ in (old.id, row.id):
        if appointment_id_ not in ctx.session.appointment_ids:
            ctx.session.appointment_ids.append(appointment_id_)
    ctx.session.outcome = "rescheduled"
    await _sync_calendar(ctx, row, vehicle)
    return {
        "ok": True,
        "appointment_id": row.id,
        "confirmation_code": row.confirmation_code,
        "confirmation_code_spoken": spell_code(row.confirmation_code),
        "when": speakable(row.starts_at, ctx.profile.time_zone),
        "vehicle": vehicle,
        **text,
    }


@tool(
    name="cancel_appointment",
    description="Cancel a VERIFIED caller's appointment after they confirm they want to.",
    properties={
        "appointment_id": {"type": "integer", "description": "From list_appointments."},
        "reason": {"type": "string", "description": "Why, in the caller's words."},
    },
    required=["appointment_id"],
    mutating=True,
)
async def cancel_appointment(
    ctx: ToolContext, *, appointment_id: int, reason: str | None = None
) -> dict[str, Any]:
    """Cancel an appointment of the verified caller, keeping the reason."""
    customer_id = require_verified(ctx)
    async with ctx.db.connection() as conn, conn.transaction():
        old = await _owned_active_appointment(ctx, conn, customer_id, appointment_id)
        row = await crm_appointments.cancel_appointment(
            conn, appointment_id=old.id, customer_id=customer_id, reason=reason
        )
        assert row is not None
        text = await queue_change_text(ctx, conn, appointment_id=row.id, kind="cancelled")
    if row.id not in ctx.session.appointment_ids:
        ctx.session.appointment_ids.append(row.id)
    ctx.session.outcome = "cancelled"
    await _sync_calendar(ctx, row, "")
    return {
        "ok": True,
        "cancelled": True,
        "when": speakable(row.starts_at, ctx.profile.time_zone),
        **text,
    }

"""What a freshly verified caller's account holds, in the verification result itself.

A verified caller almost always goes on to talk about a vehicle or an appointment. When
``verify_customer`` (or a ``lookup_customer`` that completes verification) returns the
caller's vehicles and upcoming appointments, the model can answer or go straight to
``check_availability`` without another LLM round trip to ``get_vehicle_history`` or
``list_appointments`` (each round trip is a full LLM request the caller waits for).

The overview is kept small: names and ids only, no mileage or history (those stay in
``get_vehicle_history``), and never a VIN or any part of it (its last four characters are
a verification factor). This module imports no other tool module, so both the
verification tools and the vehicle and appointment tools can use it.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from core.profile import DealershipProfile
from crm import appointments as crm_appointments
from crm import vehicles as crm_vehicles
from scheduling.availability import speakable
from tools.context import ToolContext

#: Most vehicles and upcoming appointments listed in a verification result.
MAX_VEHICLES = 5
MAX_APPOINTMENTS = 3


def describe_vehicle(vehicle: crm_vehicles.VehicleSummary) -> str:
    """Spoken name of a vehicle, e.g. ``2021 Toyota Camry SE``."""
    return " ".join(str(p) for p in (vehicle.year, vehicle.make, vehicle.model, vehicle.trim) if p)


def service_names(profile: DealershipProfile, codes: list[str]) -> list[str]:
    """Spoken names of service codes (a code the profile does not know stays as it is)."""
    return [service.spoken_name if (service := profile.service(c)) else c for c in codes]


def service_due(vehicle: crm_vehicles.VehicleSummary, today: date) -> bool:
    """Whether the vehicle is due for service by date or by mileage."""
    by_date = vehicle.next_service_due_date is not None and vehicle.next_service_due_date <= today
    by_miles = bool(
        vehicle.next_service_due_mileage
        and vehicle.current_mileage
        and vehicle.current_mileage >= vehicle.next_service_due_mileage
    )
    return by_date or by_miles


async def account_overview(ctx: ToolContext, customer_id: int) -> dict[str, Any]:
    """The verified customer's vehicles and upcoming appointments, for the model.

    Args:
        ctx: Tool context of the call (the caller is verified as ``customer_id``).
        customer_id: The verified customer.

    Returns:
        ``{"vehicles": [...], "upcoming_appointments": [...]}``; each list at most
        :data:`MAX_VEHICLES` / :data:`MAX_APPOINTMENTS` long, with ``more_vehicles`` /
        ``more_appointments`` counting what was left out.
    """
    now = ctx.now() if ctx.now else datetime.now(UTC)
    today = now.astimezone(ctx.profile.time_zone).date()
    async with ctx.db.connection() as conn:
        vehicles = await crm_vehicles.list_vehicles(conn, customer_id)
        upcoming = await crm_appointments.upcoming_for_customer(conn, customer_id, after=now)
    names = {v.id: describe_vehicle(v) for v in vehicles}
    overview: dict[str, Any] = {
        "vehicles": [
            {"vehicle_id": v.id, "name": names[v.id], "service_due": service_due(v, today)}
            for v in vehicles[:MAX_VEHICLES]
        ],
        "upcoming_appointments": [
            {
                "appointment_id": a.id,
                "when": speakable(a.starts_at, ctx.profile.time_zone),
                "services": service_names(ctx.profile, list(a.service_codes)),
                "vehicle": names.get(a.vehicle_id),
                "status": a.status,
            }
            for a in upcoming[:MAX_APPOINTMENTS]
        ],
    }
    if len(vehicles) > MAX_VEHICLES:
        overview["more_vehicles"] = len(vehicles) - MAX_VEHICLES
    if len(upcoming) > MAX_APPOINTMENTS:
        overview["more_appointments"] = len(upcoming) - MAX_APPOINTMENTS
    return overview

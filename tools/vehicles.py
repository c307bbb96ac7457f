"""Vehicle tools: what the verified caller owns, its history, what is due, recalls.

Results never carry a VIN or any part of it: the last four characters are a verification
factor, and what the model sees it can read out to whoever is on the line.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from crm import vehicles as crm_vehicles
from tools.context import ToolContext
from tools.customers import require_verified
from tools.overview import describe_vehicle
from tools.registry import ToolRefusal, tool

__all__ = ["describe_vehicle", "get_vehicle_history"]


def _warranty(vehicle: crm_vehicles.VehicleSummary, today: date) -> str:
    if vehicle.warranty_end_date is None:
        return "unknown"
    expired_by_date = vehicle.warranty_end_date < today
    expired_by_miles = (
        vehicle.warranty_end_miles is not None
        and vehicle.current_mileage is not None
        and vehicle.current_mileage > vehicle.warranty_end_miles
    )
    return "expired" if expired_by_date or expired_by_miles else "active"


@tool(
    name="get_vehicle_history",
    description=(
        "For a VERIFIED caller: their vehicles with mileage, last services, what service is "
        "due, open recalls and warranty status. Pass vehicle_id to focus on one vehicle. "
        "Use the vehicle ids from this result when booking."
    ),
    properties={
        "vehicle_id": {"type": "integer", "description": "A vehicle id from a previous result."}
    },
)
async def get_vehicle_history(ctx: ToolContext, *, vehicle_id: int | None = None) -> dict[str, Any]:
    """Vehicles and recent service history of the verified caller."""
    customer_id = require_verified(ctx)
    today = ctx.now().date() if ctx.now else date.today()
    async with ctx.db.connection() as conn:
        vehicles = await crm_vehicles.list_vehicles(conn, customer_id)
        if vehicle_id is not None:
            vehicles = [v for v in vehicles if v.id == int(vehicle_id)]
            if not vehicles:
                raise ToolRefusal(
                    "I don't see that vehicle on your account.", code="unknown_vehicle"
                )
        history = await crm_vehicles.recent_history(conn, [v.id for v in vehicles])
    if not vehicles:
        return {"ok": True, "vehicles": [], "say": "I don't see any vehicles on your account."}
    result = []
    for v in vehicles:
        due = []
        if v.next_service_due_date and v.next_service_due_date <= today:
            due.append("service is due by date")
        if (
            v.next_service_due_mileage
            and v.current_mileage
            and v.current_mileage >= v.next_service_due_mileage
        ):
            due.append("service is due by mileage")
        result.append(
            {
                "vehicle_id": v.id,
                "name": describe_vehicle(v),
                "mileage": v.current_mileage,
                "last_service": (
                    {"date": v.last_service_date.isoformat(), "mileage": v.last_service_mileage}
                    if v.last_service_date
                    else None
                ),
                "next_service_due": {
                    "date": v.next_service_due_date.isoformat()
                    if v.next_service_due_date
                    else None,
                    "mileage": v.next_service_due_mileage,
                },
                "due_now": due,
                "open_recalls": list(v.open_recall_codes),
                "warranty": _warranty(v, today),
                "recent_visits": [
                    {
                        "date": h.service_date.isoformat(),
                        "mileage": h.mileage,
                        "services": list(h.services_performed),
                    }
                    for h in history
                    if h.vehicle_id == v.id
                ],
            }
        )
    return {"ok": True, "vehicles": result}

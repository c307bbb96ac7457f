"""Vehicle and service-history queries, always scoped to one customer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from psycopg import AsyncConnection
from psycopg.rows import class_row


@dataclass(frozen=True)
class VehicleSummary:
    """A vehicle as the bot talks about it.

    No VIN: its last four characters verify the caller, so they never reach a tool.
    """

    id: int
    year: int
    make: str
    model: str
    trim: str | None
    current_mileage: int | None
    warranty_end_date: date | None
    warranty_end_miles: int | None
    last_service_date: date | None
    last_service_mileage: int | None
    next_service_due_date: date | None
    next_service_due_mileage: int | None
    open_recall_codes: list[str]


@dataclass(frozen=True)
class HistoryEntry:
    """One past visit."""

    vehicle_id: int
    service_date: date
    mileage: int | None
    services_performed: list[str]
    total_cost: Decimal | None
    warranty: bool


async def list_vehicles(conn: AsyncConnection, customer_id: int) -> list[VehicleSummary]:
    """The customer's vehicles, newest first.

    Args:
        conn: Database connection.
        customer_id: Owner.

    Returns:
        Vehicles owned by the customer.
    """
    async with conn.cursor(row_factory=class_row(VehicleSummary)) as cur:
        await cur.execute(
            """
            SELECT id, year, make, model, trim, current_mileage, warranty_end_date,
                   warranty_end_miles, last_service_date, last_service_mileage,
                   next_service_due_date, next_service_due_mileage,
                   COALESCE(open_recall_codes, '{}') AS open_recall_codes
            FROM vehicles WHERE customer_id = %(customer_id)s
            ORDER BY year DESC, id
            """,
            {"customer_id": customer_id},
        )
        return await cur.fetchall()


async def recent_history(
    conn: AsyncConnection, vehicle_ids: list[int], *, per_vehicle: int = 3
) -> list[HistoryEntry]:
    """The last visits of each vehicle.

    Args:
        conn: Database connection.
        vehicle_ids: Vehicles (already checked to belong to the caller).
        per_vehicle: Visits per vehicle.

    Returns:
        History entries, newest first within each vehicle.
    """
    if not vehicle_ids:
        return []
    async with conn.cursor(row_factory=class_row(HistoryEntry)) as cur:
        await cur.execute(
            """
            SELECT vehicle_id, service_date, mileage, services_performed, total_cost, warranty
            FROM (
                SELECT h.*, row_number() OVER (
                    PARTITION BY vehicle_id ORDER BY service_date DESC, id DESC) AS rn
                FROM service_history h WHERE vehicle_id = ANY(%(ids)s)
            ) ranked
            WHERE rn <= %(per_vehicle)s
            ORDER BY vehicle_id, service_date DESC
            """,
            {"ids": vehicle_ids, "per_vehicle": per_vehicle},
        )
        return await cur.fetchall()


async def vehicle_owner(conn: AsyncConnection, vehicle_id: int) -> int | None:
    """The customer id owning a vehicle, or ``None`` when it does not exist."""
    cur = await conn.execute(
        "SELECT customer_id FROM vehicles WHERE id = %(id)s", {"id": vehicle_id}
    )
    row = await cur.fetchone()
    return row[0] if row else None

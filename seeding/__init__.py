"""Deterministic mock CRM data: the catalogue, the row builder and :func:`seed`.

``seed_data.py`` at the top of the repository is the command line; the server seeds an
empty embedded database through :func:`seed` on its first start.
"""

from __future__ import annotations

import asyncio
from datetime import date, datetime

from core.profile import DealershipProfile, load_profile
from crm.bulk_load import CrmNotEmptyError, CrmRows, load_crm
from seeding.builder import CrmBuilder, SeedError
from seeding.catalogue import DEMO_CUSTOMERS

__all__ = ["DEMO_CUSTOMERS", "CrmBuilder", "SeedError", "seed"]


async def seed(
    conninfo: str,
    *,
    customers: int,
    seed: int = 7,
    reset: bool = False,
    anchor_date: date | None = None,
    profile: DealershipProfile | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Load the demo customers plus ``customers`` generated ones into a migrated database.

    Args:
        conninfo: Postgres connection string (the migrations are applied first).
        customers: How many customers to generate besides the demo ones.
        seed: RNG seed; the same seed, count and anchor date give the same rows.
        reset: Replace existing CRM rows (otherwise a non-empty CRM is an error).
        anchor_date: "Today" for the data; default today in the dealership's time zone.
        profile: Dealership profile (hours, bays, services); default the configured one.
        progress: Show progress bars on stderr (the command line does on a terminal).

    Returns:
        Row counts per table.

    Raises:
        SeedError: The CRM already has customers and ``reset`` is false.
    """
    from crm.migrate import apply_migrations

    if profile is None:
        from core.settings import get_settings

        profile = load_profile(get_settings().dealership_profile)
    anchor = anchor_date or datetime.now(profile.time_zone).date()
    await apply_migrations(conninfo)

    def build() -> CrmBuilder:
        builder = CrmBuilder(profile=profile, seed=seed, anchor=anchor, progress=progress)
        builder.demo_customers()
        builder.generated_customers(customers)
        builder.past_appointments()
        builder.upcoming_appointments(customers)
        return builder

    builder = await asyncio.to_thread(build)
    rows = CrmRows(
        customers=builder.customers,
        vehicles=builder.vehicles,
        appointments=builder.appointments,
        history=builder.history,
    )
    try:
        await asyncio.to_thread(load_crm, conninfo, rows, reset=reset, progress=progress)
    except CrmNotEmptyError as exc:
        raise SeedError(str(exc)) from exc
    return {
        "customers": len(builder.customers),
        "vehicles": len(builder.vehicles),
        "service_history": len(builder.history),
        "appointments": len(builder.appointments),
    }

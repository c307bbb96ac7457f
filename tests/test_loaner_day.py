"""Loaner cars are counted per LOCAL day of the dealership, not per UTC day."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

from crm.appointments import LoanerUnavailable, insert_appointment
from crm.vin import make_vin

LA = ZoneInfo("America/Los_Angeles")


async def test_one_loaner_per_local_day_across_utc_midnight(migrated_db: str) -> None:
    async with await psycopg.AsyncConnection.connect(migrated_db) as conn:
        cur = await conn.execute(
            "INSERT INTO customers (first_name, last_name, phone) "
            "VALUES ('Ana', 'Lopez', '+13105550100') RETURNING id"
        )
        customer = (await cur.fetchone())[0]
        cur = await conn.execute(
            "INSERT INTO vehicles (customer_id, vin, year, make, model) "
            "VALUES (%s, %s, 2021, 'Toyota', 'Camry') RETURNING id",
            (customer, make_vin(wmi="4T1", vds="B11HK", year_code="M", plant="U", serial="555001")),
        )
        vehicle = (await cur.fetchone())[0]
        await conn.commit()

        async def book(starts_at: datetime, bay: str, key: str):
            async with conn.transaction():
                return await insert_appointment(
                    conn,
                    customer_id=customer,
                    vehicle_id=vehicle,
                    service_codes=["oil_change"],
                    starts_at=starts_at,
                    ends_at=starts_at + timedelta(minutes=45),
                    bay_id=bay,
                    transportation="loaner",
                    source="phone_inbound",
                    call_sid="CA1",
                    key=key,
                    loaner_cars=1,
                )

        # 16:30 in Los Angeles is 00:30 UTC the next day.
        late = await book(datetime(2026, 12, 1, 16, 30, tzinfo=LA), "bay-1", "k1")
        assert late.transportation == "loaner"
        with pytest.raises(LoanerUnavailable):
            await book(datetime(2026, 12, 1, 9, 0, tzinfo=LA), "bay-2", "k2")
        # The next local day has its own car, even though it shares the UTC date.
        next_day = await book(datetime(2026, 12, 2, 9, 0, tzinfo=LA), "bay-2", "k3")
        assert next_day.transportation == "loaner"

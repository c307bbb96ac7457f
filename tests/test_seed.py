"""seed_data: determinism, consistency, demo customers and edge cases, refusing to clobber."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import date
from pathlib import Path

import psycopg
import pytest

from crm.vin import is_valid_vin
from seeding import DEMO_CUSTOMERS, SeedError, seed
from tests.conftest_db import create_database, database_url, drop_database

ANCHOR = date(2026, 11, 30)
REPO = Path(__file__).resolve().parents[1]


def table_digest(conninfo: str) -> dict[str, str]:
    """md5 of every CRM table's rows (timestamps set by now() left out)."""
    digests = {}
    with psycopg.connect(conninfo) as conn:
        for table in ("customers", "vehicles", "appointments", "service_history"):
            row = conn.execute(
                f"SELECT md5(string_agg((to_jsonb(t) - 'created_at' - 'updated_at')::text, ','"
                f" ORDER BY id)) FROM {table} t"
            ).fetchone()
            digests[table] = row[0]
    return digests


async def test_same_seed_same_rows_and_other_seed_other_rows(migrated_db: str) -> None:
    await seed(migrated_db, customers=300, seed=7, anchor_date=ANCHOR)
    first = table_digest(migrated_db)
    await seed(migrated_db, customers=300, seed=7, anchor_date=ANCHOR, reset=True)
    assert table_digest(migrated_db) == first
    await seed(migrated_db, customers=300, seed=8, anchor_date=ANCHOR, reset=True)
    other = table_digest(migrated_db)
    assert other["customers"] != first["customers"]
    assert other["vehicles"] != first["vehicles"]


async def test_seeded_data_is_consistent(migrated_db: str) -> None:
    counts = await seed(migrated_db, customers=1500, seed=7, anchor_date=ANCHOR)
    assert counts["customers"] == 1500 + len(DEMO_CUSTOMERS)
    with psycopg.connect(migrated_db) as conn:
        vins = [r[0] for r in conn.execute("SELECT vin FROM vehicles")]
        assert len(vins) == counts["vehicles"] > 1500
        assert all(is_valid_vin(v) for v in vins)
        assert len(set(vins)) == len(vins)

        per_customer = dict(
            conn.execute(
                "SELECT n, count(*) FROM (SELECT c.id, count(v.id) AS n FROM customers c "
                "LEFT JOIN vehicles v ON v.customer_id = c.id GROUP BY c.id) s GROUP BY n"
            ).fetchall()
        )
        assert set(per_customer) <= {0, 1, 2, 3} and per_customer[0] > 0 and per_customer[3] > 0

        # No two active appointments overlap on a bay (the constraint guarantees it; the
        # query proves the seed did not rely on anything weaker).
        overlaps = conn.execute(
            "SELECT count(*) FROM appointments a JOIN appointments b ON a.bay_id = b.bay_id "
            "AND a.id < b.id AND tstzrange(a.starts_at, a.ends_at) && "
            "tstzrange(b.starts_at, b.ends_at) WHERE a.status NOT IN ('cancelled', 'no_show') "
            "AND b.status NOT IN ('cancelled', 'no_show')"
        ).fetchone()[0]
        assert overlaps == 0
        # Nor two of one vehicle (on any bay), and no vehicle has two upcoming appointments
        # for the same service (the booking tool refuses both).
        vehicle_overlaps = conn.execute(
            "SELECT count(*) FROM appointments a JOIN appointments b "
            "ON a.vehicle_id = b.vehicle_id AND a.id < b.id "
            "AND tstzrange(a.starts_at, a.ends_at) && tstzrange(b.starts_at, b.ends_at) "
            "WHERE a.status NOT IN ('cancelled', 'no_show') "
            "AND b.status NOT IN ('cancelled', 'no_show')"
        ).fetchone()[0]
        assert vehicle_overlaps == 0
        twice = conn.execute(
            "SELECT count(*) FROM (SELECT vehicle_id, code FROM appointments, "
            "unnest(service_codes) AS code WHERE status IN ('scheduled', 'confirmed') "
            "AND starts_at > %s GROUP BY vehicle_id, code HAVING count(*) > 1) d",
            (ANCHOR,),
        ).fetchone()[0]
        assert twice == 0

        # Mileage never goes down along a vehicle's history, nor past its odometer reading.
        backwards = conn.execute(
            "SELECT count(*) FROM (SELECT mileage, lag(mileage) OVER (PARTITION BY vehicle_id "
            "ORDER BY service_date) AS previous FROM service_history) h "
            "WHERE mileage < previous"
        ).fetchone()[0]
        assert backwards == 0
        beyond = conn.execute(
            "SELECT count(*) FROM service_history h JOIN vehicles v ON v.id = h.vehicle_id "
            "WHERE h.mileage > v.current_mileage OR h.service_date > v.mileage_read_at"
        ).fetchone()[0]
        assert beyond == 0
        history = conn.execute("SELECT count(*) FROM service_history").fetchone()[0]
        assert history > counts["vehicles"]

        # Past appointments are before the anchor, upcoming after; completed ones have history.
        past, upcoming = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'), "
            "count(*) FILTER (WHERE status IN ('scheduled', 'confirmed')) FROM appointments"
        ).fetchone()
        assert past > 0 and upcoming > 0
        assert (
            conn.execute(
                "SELECT count(*) FROM appointments WHERE status = 'completed' "
                "AND starts_at >= %s::date",
                (ANCHOR,),
            ).fetchone()[0]
            == 0
        )
        assert (
            conn.execute(
                "SELECT count(*) FROM appointments a WHERE status = 'completed' AND NOT EXISTS "
                "(SELECT 1 FROM service_history h WHERE h.appointment_id = a.id)"
            ).fetchone()[0]
            == 0
        )

        # Edge cases exist: household numbers, DNC, no consent, locked, expired warranty,
        # open recalls; every customer has a time zone.
        edge = conn.execute(
            "SELECT count(*) FILTER (WHERE alt_phone IN (SELECT phone FROM customers)), "
            "count(*) FILTER (WHERE do_not_call), count(*) FILTER (WHERE NOT call_consent), "
            "count(*) FILTER (WHERE verification_locked_until IS NOT NULL), "
            "count(*) FILTER (WHERE time_zone IS NULL) FROM customers"
        ).fetchone()
        assert edge[0] > 0 and edge[1] > 0 and edge[2] > 0 and edge[3] > 0
        assert edge[4] == 0
        expired, recalls = conn.execute(
            "SELECT count(*) FILTER (WHERE warranty_end_date < %s), "
            "count(*) FILTER (WHERE cardinality(open_recall_codes) > 0) FROM vehicles",
            (ANCHOR,),
        ).fetchone()
        assert expired > 0 and recalls > 0


async def test_demo_customers_are_there_as_the_readme_lists_them(migrated_db: str) -> None:
    await seed(migrated_db, customers=50, seed=7, anchor_date=ANCHOR)
    with psycopg.connect(migrated_db) as conn:
        for index, demo in enumerate(DEMO_CUSTOMERS, start=1):
            row = conn.execute(
                "SELECT id, first_name, date_of_birth, zip_code, do_not_call, alt_phone, "
                "verification_locked_until IS NOT NULL FROM customers WHERE phone = %s",
                (demo.phone,),
            ).fetchone()
            assert row[:5] == (
                index,
                demo.first_name,
                demo.date_of_birth,
                demo.zip_code,
                demo.do_not_call,
            )
            assert row[5] == demo.alt_phone and row[6] == demo.locked
            vins = [
                r[0]
                for r in conn.execute(
                    "SELECT vin FROM vehicles WHERE customer_id = %s ORDER BY id", (index,)
                )
            ]
            assert vins == [v.vin for v in demo.vehicles]
        # James has a tire rotation booked on the next open day (Tuesday Dec 1), unconfirmed.
        appt = conn.execute(
            "SELECT service_codes, status, confirmed_at, "
            "(starts_at AT TIME ZONE 'America/Chicago')::date FROM appointments "
            "WHERE customer_id = 2"
        ).fetchone()
        assert appt == (["tire_rotation"], "scheduled", None, date(2026, 12, 1))
    readme = (REPO / "README.md").read_text()
    for demo in DEMO_CUSTOMERS:
        assert demo.phone in readme and demo.first_name in readme


async def test_refuses_to_seed_over_existing_customers(migrated_db: str) -> None:
    await seed(migrated_db, customers=5, seed=7, anchor_date=ANCHOR)
    with pytest.raises(SeedError, match="--reset"):
        await seed(migrated_db, customers=5, seed=7, anchor_date=ANCHOR)
    counts = await seed(migrated_db, customers=5, seed=7, anchor_date=ANCHOR, reset=True)
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == counts["customers"]
        # Sequences moved past the copied ids: a new row gets the next id.
        new_id = conn.execute(
            "INSERT INTO customers (first_name, last_name, phone) "
            "VALUES ('New', 'Caller', '+13125550000') RETURNING id"
        ).fetchone()[0]
        assert new_id == counts["customers"] + 1


async def test_command_line_seeds_database_url() -> None:
    name = await create_database()
    try:
        url = database_url(name)
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "seed_data.py",
                "--customers",
                "40",
                "--seed",
                "3",
                "--anchor-date",
                "2026-11-30",
            ],
            cwd=REPO,
            env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert f"seeded {40 + len(DEMO_CUSTOMERS)} customers" in result.stdout
        again = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "seed_data.py", "--customers", "40"],
            cwd=REPO,
            env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 2
        assert "already holds" in again.stderr and "Traceback" not in again.stderr
    finally:
        await drop_database(name)

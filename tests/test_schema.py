"""The CRM schema keeps its own integrity: bay overlaps, VINs, phones, status workflow."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crm.migrate import apply_migrations, migration_files
from crm.vin import check_digit, is_valid_vin, make_vin

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
VIN = make_vin(wmi="4T1", vds="B11HK", year_code="M", plant="U", serial="123456")


@pytest.fixture
def conn(migrated_db: str):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        customer = conn.execute(
            "INSERT INTO customers (first_name, last_name, phone) "
            "VALUES ('Ana', 'Lopez', '+13125550100') RETURNING id"
        ).fetchone()[0]
        vehicle = conn.execute(
            "INSERT INTO vehicles (customer_id, vin, year, make, model) "
            "VALUES (%s, %s, 2021, 'Toyota', 'Camry') RETURNING id",
            (customer, VIN),
        ).fetchone()[0]
        conn.info_ids = (customer, vehicle)  # type: ignore[attr-defined]
        yield conn


def book(conn, *, bay: str, start: datetime, minutes: int, code: str, status: str = "scheduled"):
    customer, vehicle = conn.info_ids
    return conn.execute(
        "INSERT INTO appointments (customer_id, vehicle_id, service_codes, status, starts_at, "
        "ends_at, bay_id, confirmation_code, cancelled_at) VALUES (%s, %s, '{oil_change}', %s, "
        "%s, %s, %s, %s, CASE WHEN %s = 'cancelled' THEN now() END) RETURNING id",
        (customer, vehicle, status, start, start + timedelta(minutes=minutes), bay, code, status),
    ).fetchone()[0]


def test_overlapping_active_appointments_on_a_bay_are_rejected(conn) -> None:
    first = book(conn, bay="bay-1", start=T0, minutes=60, code="AAAAA1")
    with pytest.raises(psycopg.errors.ExclusionViolation, match="appointments_no_bay_overlap"):
        book(conn, bay="bay-1", start=T0 + timedelta(minutes=30), minutes=60, code="AAAAA2")
    # Same time on another bay, and back-to-back on the same bay, are fine.
    book(conn, bay="bay-2", start=T0, minutes=60, code="AAAAA3")
    book(conn, bay="bay-1", start=T0 + timedelta(minutes=60), minutes=30, code="AAAAA4")
    # Once the first is cancelled its time is free again.
    conn.execute(
        "UPDATE appointments SET status = 'cancelled', cancelled_at = now() WHERE id = %s",
        (first,),
    )
    book(conn, bay="bay-1", start=T0 + timedelta(minutes=15), minutes=30, code="AAAAA5")
    # ...and a cancelled appointment stays cancelled.
    with pytest.raises(psycopg.errors.DatabaseError):
        conn.execute("UPDATE appointments SET status = 'scheduled' WHERE id = %s", (first,))


def test_appointment_must_end_after_it_starts(conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        book(conn, bay="bay-1", start=T0, minutes=0, code="BBBBB1")


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (["confirmed", "checked_in", "in_progress", "completed"], True),
        (["no_show"], True),
        (["completed"], False),  # scheduled -> completed skips the work
        (["in_progress"], False),
        (["cancelled", "scheduled"], False),  # cancelled is terminal
        (["confirmed", "checked_in", "in_progress", "completed", "scheduled"], False),
    ],
)
def test_status_workflow(conn, path: list[str], ok: bool) -> None:
    appointment = book(conn, bay="bay-3", start=T0, minutes=45, code="CCCCC1")

    def walk() -> None:
        for status in path:
            conn.execute(
                "UPDATE appointments SET status = %s, cancelled_at = CASE WHEN %s = 'cancelled' "
                "THEN now() ELSE cancelled_at END WHERE id = %s",
                (status, status, appointment),
            )

    if ok:
        walk()
        final = conn.execute("SELECT status FROM appointments WHERE id = %s", (appointment,))
        assert final.fetchone()[0] == path[-1]
    else:
        with pytest.raises(psycopg.errors.CheckViolation, match="illegal appointment status"):
            walk()


def test_phone_is_unique_and_e164(conn) -> None:
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO customers (first_name, last_name, phone) "
            "VALUES ('Other', 'Person', '+13125550100')"
        )
    for bad in ("3125550100", "+0312555", "+1 312 555 0100"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO customers (first_name, last_name, phone) VALUES ('X', 'Y', %s)",
                (bad,),
            )


def test_vin_check_digit_enforced_by_database(conn) -> None:
    customer, _ = conn.info_ids
    wrong = VIN[:8] + ("0" if VIN[8] != "0" else "1") + VIN[9:]
    assert is_valid_vin(VIN) and not is_valid_vin(wrong)
    for bad in (wrong, VIN[:16], VIN[:16] + "O"):
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO vehicles (customer_id, vin, year, make, model) "
                "VALUES (%s, %s, 2021, 'Toyota', 'Camry')",
                (customer, bad),
            )
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO vehicles (customer_id, vin, year, make, model) "
            "VALUES (%s, %s, 2021, 'Toyota', 'Camry')",
            (customer, VIN),
        )


def test_known_real_vins() -> None:
    # Published examples with correct check digits.
    for vin in ("1M8GDM9AXKP042788", "11111111111111111", "1HGCM82633A004352"):
        assert is_valid_vin(vin), vin
    assert check_digit("1M8GDM9A0KP042788") == "X"
    assert not is_valid_vin("1HGCM82634A004352")


VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet=VIN_CHARS, min_size=17, max_size=17))
def test_python_and_sql_check_digit_agree(migrated_vin_conn, vin: str) -> None:
    sql = migrated_vin_conn.execute("SELECT vin_check_digit_ok(%s)", (vin,)).fetchone()[0]
    assert sql == is_valid_vin(vin)


@pytest.fixture
def migrated_vin_conn(migrated_db: str):
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        yield conn


async def test_migrations_are_idempotent_and_safe_concurrently(fresh_db: str) -> None:
    results = await asyncio.gather(*(apply_migrations(fresh_db) for _ in range(4)))
    names = [name for name, _ in migration_files()]
    # Exactly one runner applied each migration; the others found nothing to do.
    assert sorted(n for applied in results for n in applied) == sorted(names)
    assert await apply_migrations(fresh_db) == []
    with psycopg.connect(fresh_db) as conn:
        recorded = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY 1")]
        assert recorded == sorted(names)
        columns = dict(
            conn.execute(
                "SELECT table_name, count(*) FROM information_schema.columns "
                "WHERE table_schema = 'public' GROUP BY table_name"
            ).fetchall()
        )
    assert columns["customers"] >= 23
    assert columns["vehicles"] >= 20
    assert columns["appointments"] >= 25
    assert columns["service_history"] >= 13


def test_migrate_command(fresh_db: str) -> None:
    import subprocess
    import sys

    env = {"DATABASE_URL": fresh_db, "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "crm.migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(
            migration_files()
        )

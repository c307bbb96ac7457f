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
VIN2 = make_vin(wmi="2HG", vds="FC2F5", year_code="K", plant="H", serial="654321")


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
        second = conn.execute(
            "INSERT INTO vehicles (customer_id, vin, year, make, model) "
            "VALUES (%s, %s, 2019, 'Honda', 'Civic') RETURNING id",
            (customer, VIN2),
        ).fetchone()[0]
        conn.info_ids = (customer, vehicle, second)  # type: ignore[attr-defined]
        yield conn


def book(
    conn,
    *,
    bay: str,
    start: datetime,
    minutes: int,
    code: str,
    status: str = "scheduled",
    vehicle: int | None = None,
):
    customer, first_vehicle, _ = conn.info_ids
    vehicle = vehicle or first_vehicle
    return conn.execute(
        "INSERT INTO appointments (customer_id, vehicle_id, service_codes, status, starts_at, "
        "ends_at, bay_id, confirmation_code, cancelled_at) VALUES (%s, %s, '{oil_change}', %s, "
        "%s, %s, %s, %s, CASE WHEN %s = 'cancelled' THEN now() END) RETURNING id",
        (customer, vehicle, status, start, start + timedelta(minutes=minutes), bay, code, status),
    ).fetchone()[0]


def test_overlapping_active_appointments_on_a_bay_are_rejected(conn) -> None:
    first = book(conn, bay="bay-1", start=T0, minutes=60, code="AAAAA1")
    with pytest.raises(psycopg.errors.ExclusionViolation, match="appointments_no_bay_overlap"):
        book(
            conn,
            bay="bay-1",
            start=T0 + timedelta(minutes=30),
            minutes=60,
            code="AAAAA2",
            vehicle=conn.info_ids[2],
        )
    # Same time on another bay (for another vehicle), and back-to-back on the same bay, are
    # fine.
    book(conn, bay="bay-2", start=T0, minutes=60, code="AAAAA3", vehicle=conn.info_ids[2])
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


def test_overlapping_active_appointments_of_a_vehicle_are_rejected(conn) -> None:
    _, vehicle, other = conn.info_ids
    first = book(conn, bay="bay-1", start=T0, minutes=60, code="VVVVV1")
    # The same vehicle on another bay at an overlapping time: refused by the database.
    for start, minutes in (
        (T0, 60),
        (T0 + timedelta(minutes=59), 30),
        (T0 - timedelta(hours=1), 61),
    ):
        with pytest.raises(
            psycopg.errors.ExclusionViolation, match="appointments_no_vehicle_overlap"
        ):
            book(conn, bay="bay-2", start=start, minutes=minutes, code="VVVVV2")
    # Another vehicle at the same time, and the same vehicle back to back, are fine.
    book(conn, bay="bay-2", start=T0, minutes=60, code="VVVVV3", vehicle=other)
    book(conn, bay="bay-3", start=T0 + timedelta(minutes=60), minutes=30, code="VVVVV4")
    # Cancelled and no-show appointments release the vehicle: a new booking at the same
    # time is allowed (on a free bay).
    conn.execute(
        "UPDATE appointments SET status = 'cancelled', cancelled_at = now() WHERE id = %s",
        (first,),
    )
    again = book(conn, bay="bay-4", start=T0, minutes=60, code="VVVVV5")
    conn.execute("UPDATE appointments SET status = 'no_show' WHERE id = %s", (again,))
    book(conn, bay="bay-5", start=T0, minutes=60, code="VVVVV6")
    # Born cancelled next to a live one is fine too; completed still holds the vehicle.
    book(conn, bay="bay-6", start=T0, minutes=60, code="VVVVV7", status="cancelled")
    live = conn.execute(
        "SELECT count(*) FROM appointments WHERE vehicle_id = %s "
        "AND status NOT IN ('cancelled', 'no_show')",
        (vehicle,),
    ).fetchone()[0]
    assert live == 2  # VVVVV4 and VVVVV6


def test_idempotency_key_is_unique_among_live_appointments_only(conn) -> None:
    def keyed(code: str, start: datetime, status: str = "scheduled") -> int:
        customer, vehicle, _ = conn.info_ids
        return conn.execute(
            "INSERT INTO appointments (customer_id, vehicle_id, service_codes, status, "
            "starts_at, ends_at, bay_id, confirmation_code, idempotency_key, cancelled_at) "
            "VALUES (%s, %s, '{oil_change}', %s, %s, %s, 'bay-1', %s, 'K1', "
            "CASE WHEN %s = 'cancelled' THEN now() END) RETURNING id",
            (customer, vehicle, status, start, start + timedelta(hours=1), code, status),
        ).fetchone()[0]

    first = keyed("KKKKK1", T0)
    with pytest.raises(psycopg.errors.UniqueViolation, match="appointments_live_idempotency_key"):
        keyed("KKKKK2", T0 + timedelta(hours=3))
    conn.execute(
        "UPDATE appointments SET status = 'cancelled', cancelled_at = now() WHERE id = %s",
        (first,),
    )
    keyed("KKKKK3", T0)  # the cancelled row no longer holds the key
    keyed("KKKKK4", T0 + timedelta(hours=5), status="cancelled")


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
    customer, _, _ = conn.info_ids
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


async def test_migration_0025_refuses_existing_vehicle_overlaps_and_changes_nothing(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRM that already holds double bookings stops at 0025 with a count, untouched."""
    import subprocess
    import sys

    import crm.migrate

    everything = migration_files()
    older = [(name, sql) for name, sql in everything if name < "0025"]
    monkeypatch.setattr(crm.migrate, "migration_files", lambda: older)
    await apply_migrations(fresh_db)
    monkeypatch.undo()
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        customer = conn.execute(
            "INSERT INTO customers (first_name, last_name, phone) "
            "VALUES ('Ana', 'Lopez', '+13125550100') RETURNING id"
        ).fetchone()[0]
        a, b = (
            conn.execute(
                "INSERT INTO vehicles (customer_id, vin, year, make, model) "
                "VALUES (%s, %s, 2021, 'Toyota', 'Camry') RETURNING id",
                (customer, vin),
            ).fetchone()[0]
            for vin in (VIN, VIN2)
        )
        rows = [  # vehicle, bay, start offset (minutes), status
            (a, "bay-1", 0, "scheduled"),
            (a, "bay-2", 30, "confirmed"),  # overlaps the first: pair 1
            (a, "bay-3", 60, "scheduled"),  # overlaps the second only: pair 2
            (a, "bay-4", 0, "cancelled"),  # cancelled: not counted
            (b, "bay-5", 0, "scheduled"),
            (b, "bay-6", 0, "scheduled"),  # pair 3
            (b, "bay-5", 60, "completed"),  # back to back with both: not counted
        ]
        ids = [
            conn.execute(
                "INSERT INTO appointments (customer_id, vehicle_id, service_codes, status, "
                "starts_at, ends_at, bay_id, confirmation_code, idempotency_key, cancelled_at) "
                "VALUES (%s, %s, '{oil_change}', %s, %s, %s, %s, %s, %s, "
                "CASE WHEN %s = 'cancelled' THEN now() END) RETURNING id",
                (
                    customer,
                    vehicle,
                    status,
                    T0 + timedelta(minutes=offset),
                    T0 + timedelta(minutes=offset + 60),
                    bay,
                    f"MIGRT{i}",
                    f"key-{i}",
                    status,
                ),
            ).fetchone()[0]
            for i, (vehicle, bay, offset, status) in enumerate(rows)
        ]
        before = conn.execute("SELECT id, status FROM appointments ORDER BY id").fetchall()

    with pytest.raises(psycopg.errors.ExclusionViolation) as refused:
        await apply_migrations(fresh_db)
    message = str(refused.value)
    assert "0025_vehicle_overlap" in message and "3 pair(s)" in message
    assert f"{ids[0]}/{ids[1]}" in message and f"{ids[4]}/{ids[5]}" in message
    assert "Nothing was changed" in (refused.value.diag.message_hint or "")

    env = {"DATABASE_URL": fresh_db, "PATH": "/usr/bin:/bin"}
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "crm.migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1
    assert "3 pair(s)" in cli.stderr and "Traceback" not in cli.stderr

    def state() -> tuple:
        with psycopg.connect(fresh_db) as conn:
            return (
                [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY 1")],
                sorted(
                    r[0]
                    for r in conn.execute(
                        "SELECT conname FROM pg_constraint "
                        "WHERE conrelid = 'appointments'::regclass AND contype IN ('x', 'u')"
                    )
                ),
                conn.execute("SELECT id, status FROM appointments ORDER BY id").fetchall(),
            )

    # Not half-migrated: no record, no new constraint, the old key constraint still there,
    # and not one appointment touched.
    assert state() == (
        [name for name, _ in older],
        sorted(
            [
                "appointments_confirmation_code_key",
                "appointments_idempotency_key_key",
                "appointments_no_bay_overlap",
            ]
        ),
        before,
    )

    # Staff resolve the pairs; the migration then applies.
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(
            "UPDATE appointments SET status = 'cancelled', cancelled_at = now() WHERE id = ANY(%s)",
            ([ids[1], ids[5]],),
        )
    assert await apply_migrations(fresh_db) == ["0025_vehicle_overlap.sql"] + [
        name for name, _ in everything if name > "0025_vehicle_overlap.sql"
    ]
    assert "appointments_no_vehicle_overlap" in state()[1]

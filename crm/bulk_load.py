"""Bulk load of CRM rows with ``COPY`` (the mock-data seed; explicit ids)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, LiteralString, cast

import psycopg
from tqdm import tqdm


class CrmNotEmptyError(RuntimeError):
    """The database already holds customers and a reset was not asked for."""


@dataclass(frozen=True)
class CrmRows:
    """Rows for each CRM table (values in the order of the ``*_COLUMNS`` constants)."""

    customers: Sequence[Sequence[Any]]
    vehicles: Sequence[Sequence[Any]]
    appointments: Sequence[Sequence[Any]]
    history: Sequence[Sequence[Any]]


CUSTOMER_COLUMNS = (
    "id, first_name, last_name, phone, alt_phone, email, address_line1, city, state, zip_code, "
    "date_of_birth, preferred_language, preferred_contact_method, call_consent, sms_consent, "
    "marketing_consent, do_not_call, verification_failed_attempts, verification_locked_until, "
    "last_verified_at, customer_since, time_zone"
)
VEHICLE_COLUMNS = (
    "id, customer_id, vin, year, make, model, trim, engine, colour, plate, current_mileage, "
    "mileage_read_at, warranty_end_date, warranty_end_miles, last_service_date, "
    "last_service_mileage, next_service_due_date, next_service_due_mileage, open_recall_codes"
)
APPOINTMENT_COLUMNS = (
    "id, customer_id, vehicle_id, service_codes, status, starts_at, ends_at, bay_id, advisor, "
    "transportation, loaner_reserved, source, confirmation_code, confirmed_at, cancelled_at, "
    "cancel_reason, created_at"
)
HISTORY_COLUMNS = (
    "id, vehicle_id, appointment_id, service_date, mileage, services_performed, technician, "
    "advisor, labour_hours, parts, labour_cost, parts_cost, total_cost, warranty, notes"
)
CRM_TABLES = ("customers", "vehicles", "appointments", "service_history")


def load_crm(conninfo: str, rows: CrmRows, *, reset: bool, progress: bool = False) -> None:
    """COPY the rows in one transaction, then move each id sequence past them.

    Blocking: run it in a thread.

    Args:
        conninfo: Postgres connection string of a migrated database.
        rows: The rows of each CRM table, in the column order of ``*_COLUMNS``.
        reset: Replace the existing CRM rows; otherwise a CRM with customers is refused.
        progress: Show a progress bar on stderr.

    Raises:
        CrmNotEmptyError: The CRM already has customers and ``reset`` is false.
    """
    with psycopg.connect(conninfo) as conn:
        with conn.transaction():
            if reset:
                conn.execute(
                    "TRUNCATE customers, vehicles, appointments, service_history "
                    "RESTART IDENTITY CASCADE"
                )
            else:
                existing = conn.execute("SELECT count(*) FROM customers").fetchone()
                if existing and existing[0]:
                    raise CrmNotEmptyError(
                        f"the database already holds {existing[0]} customers; pass --reset "
                        "to replace the CRM data"
                    )
            tables = (
                ("customers", CUSTOMER_COLUMNS, rows.customers),
                ("vehicles", VEHICLE_COLUMNS, rows.vehicles),
                ("appointments", APPOINTMENT_COLUMNS, rows.appointments),
                ("service_history", HISTORY_COLUMNS, rows.history),
            )
            total = sum(len(table_rows) for _, _, table_rows in tables)
            bar = tqdm(total=total, desc="rows", disable=not progress, leave=False)
            with conn.cursor() as cur, bar:
                for table, columns, table_rows in tables:
                    # Table and column names are this module's constants.
                    statement = cast(LiteralString, f"COPY {table} ({columns}) FROM STDIN")
                    with cur.copy(statement) as copy:
                        for row in table_rows:
                            copy.write_row(row)
                            bar.update()
                for table in CRM_TABLES:
                    cur.execute(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT COALESCE(max(id), 0) + 1 FROM {table}), false)"
                    )
        conn.execute("ANALYZE customers, vehicles, appointments, service_history")


CALL_COLUMNS = (
    "call_sid, direction, scenario, customer_id, verified, outcome, twilio_status, started_at, "
    "ended_at, transcript, turn_metrics, tool_calls, summary, appointment_ids"
)


def load_calls(conninfo: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """COPY ``calls`` rows (the console benchmark's history) in one transaction, then ANALYZE.

    Blocking: run it in a thread.

    Args:
        conninfo: Postgres connection string of a migrated database.
        rows: Tuples in the order of :data:`CALL_COLUMNS` (JSON columns as ``Jsonb``).
    """
    with psycopg.connect(conninfo) as conn:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY calls ({CALL_COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        conn.execute("ANALYZE calls")

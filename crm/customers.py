"""Customer queries: caller-ID match, lookup, verification facts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from psycopg import AsyncConnection
from psycopg.rows import class_row


@dataclass(frozen=True)
class CustomerIdentity:
    """What identification and verification need from a customer row."""

    id: int
    first_name: str
    last_name: str
    phone: str
    zip_code: str | None
    date_of_birth: date | None
    do_not_call: bool
    verification_locked_until: datetime | None


_IDENTITY_COLUMNS = """
    id, first_name, last_name, phone, zip_code, date_of_birth, do_not_call,
    verification_locked_until
"""


async def find_by_phone(conn: AsyncConnection, phone: str) -> CustomerIdentity | None:
    """The customer whose primary phone is ``phone`` (E.164), if any.

    Args:
        conn: Database connection.
        phone: E.164 number.

    Returns:
        The customer or ``None``.
    """
    async with conn.cursor(row_factory=class_row(CustomerIdentity)) as cur:
        await cur.execute(
            f"SELECT {_IDENTITY_COLUMNS} FROM customers WHERE phone = %(phone)s",
            {"phone": phone},
        )
        return await cur.fetchone()


async def search_customers(
    conn: AsyncConnection,
    *,
    phone: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    zip_code: str | None = None,
    limit: int = 5,
) -> list[CustomerIdentity]:
    """Customers matching every given criterion (phone matches primary or alternate).

    Args:
        conn: Database connection.
        phone: E.164 number.
        first_name: First name, case-insensitive.
        last_name: Last name, case-insensitive.
        zip_code: ZIP code (first 5 digits compared).
        limit: Maximum rows.

    Returns:
        Matching customers, at most ``limit``.
    """
    clauses = []
    params: dict[str, object] = {"limit": limit}
    if phone:
        clauses.append("(phone = %(phone)s OR alt_phone = %(phone)s)")
        params["phone"] = phone
    if first_name:
        clauses.append("lower(first_name) = lower(%(first_name)s)")
        params["first_name"] = first_name.strip()
    if last_name:
        clauses.append("lower(last_name) = lower(%(last_name)s)")
        params["last_name"] = last_name.strip()
    if zip_code:
        clauses.append("left(zip_code, 5) = left(%(zip_code)s, 5)")
        params["zip_code"] = zip_code.strip()
    if not clauses:
        return []
    async with conn.cursor(row_factory=class_row(CustomerIdentity)) as cur:
        await cur.execute(
            f"SELECT {_IDENTITY_COLUMNS} FROM customers WHERE {' AND '.join(clauses)} "
            "ORDER BY id LIMIT %(limit)s",
            params,
        )
        return await cur.fetchall()


async def get_identity(conn: AsyncConnection, customer_id: int) -> CustomerIdentity | None:
    """Identity facts of one customer by id."""
    async with conn.cursor(row_factory=class_row(CustomerIdentity)) as cur:
        await cur.execute(
            f"SELECT {_IDENTITY_COLUMNS} FROM customers WHERE id = %(id)s", {"id": customer_id}
        )
        return await cur.fetchone()


async def vin_last4_matches(conn: AsyncConnection, customer_id: int, last4: str) -> bool:
    """Whether one of the customer's vehicles has a VIN ending in ``last4``."""
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM vehicles WHERE customer_id = %(id)s "
        "AND right(vin, 4) = upper(%(last4)s))",
        {"id": customer_id, "last4": last4},
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def record_verification(
    conn: AsyncConnection, customer_id: int, *, success: bool, locked_until: datetime | None
) -> None:
    """Mirror a verification outcome onto the customer row (attempts, lock, last verified).

    Args:
        conn: Database connection.
        customer_id: Customer id.
        success: Whether the attempt succeeded.
        locked_until: New lock expiry after a lockout, else ``None``.
    """
    if success:
        await conn.execute(
            "UPDATE customers SET verification_failed_attempts = 0, "
            "verification_locked_until = NULL, last_verified_at = now() WHERE id = %(id)s",
            {"id": customer_id},
        )
    else:
        await conn.execute(
            "UPDATE customers SET verification_failed_attempts = "
            "verification_failed_attempts + 1, verification_locked_until = "
            "COALESCE(%(locked_until)s, verification_locked_until) WHERE id = %(id)s",
            {"id": customer_id, "locked_until": locked_until},
        )

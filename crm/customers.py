"""Customer queries: caller-ID match, lookup, verification facts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

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
    limit: int = 5,
) -> list[CustomerIdentity]:
    """Customers matching every given criterion (phone matches primary or alternate).

    No ZIP code criterion: the ZIP is a verification factor, compared only after an
    attempt was claimed (see :func:`claim_verification_attempt`).

    Args:
        conn: Database connection.
        phone: E.164 number.
        first_name: First name, case-insensitive.
        last_name: Last name, case-insensitive.
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


#: The fictional 555-01xx numbers of area code 555: the seed gives them to the demo
#: customers (``seeding.catalogue.DEMO_CUSTOMERS``) and to no generated customer.
DEMO_PHONE_FIRST = "+15555550100"
DEMO_PHONE_LAST = "+15555550199"


@dataclass(frozen=True)
class DemoCaller:
    """A demo customer someone may play on the browser test page: no more than the page
    needs (it shows the first name and a masked number)."""

    id: int
    first_name: str
    phone: str


_DEMO_WHERE = "phone BETWEEN %(first)s AND %(last)s AND length(phone) = 12"


async def demo_callers(conn: AsyncConnection, *, limit: int = 20) -> list[DemoCaller]:
    """The demo customers (numbers +1 555 555-0100..0199), by id.

    Args:
        conn: Database connection.
        limit: Most customers returned.

    Returns:
        Their id, first name and phone.
    """
    async with conn.cursor(row_factory=class_row(DemoCaller)) as cur:
        await cur.execute(
            f"SELECT id, first_name, phone FROM customers WHERE {_DEMO_WHERE} "
            "ORDER BY id LIMIT %(limit)s",
            {"first": DEMO_PHONE_FIRST, "last": DEMO_PHONE_LAST, "limit": limit},
        )
        return await cur.fetchall()


async def demo_caller(conn: AsyncConnection, customer_id: int) -> DemoCaller | None:
    """One demo customer by id; None when there is none with that id (or it is not a demo
    customer).

    Args:
        conn: Database connection.
        customer_id: The customer's id.

    Returns:
        The customer, or None.
    """
    async with conn.cursor(row_factory=class_row(DemoCaller)) as cur:
        await cur.execute(
            f"SELECT id, first_name, phone FROM customers WHERE id = %(id)s AND {_DEMO_WHERE}",
            {"id": customer_id, "first": DEMO_PHONE_FIRST, "last": DEMO_PHONE_LAST},
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


@dataclass(frozen=True)
class VerificationFailure:
    """The customer row after a failed comparison was recorded."""

    failed_attempts: int
    locked_until: datetime | None


async def claim_verification_attempt(
    conn: AsyncConnection, customer_id: int, *, max_attempts: int, window: timedelta
) -> bool:
    """Claim one verification comparison for a customer, atomically, before comparing.

    One UPDATE: it appends ``now()`` to ``verification_attempts`` only while fewer than
    ``max_attempts`` attempts are younger than ``window`` and no lock is in force. Postgres
    serialises concurrent updates of the row and re-checks the WHERE clause against the
    newest version, so parallel sessions can never claim more than ``max_attempts``
    between them. The claim must be committed before the comparison runs (use a
    connection block of its own).

    Args:
        conn: Database connection.
        customer_id: Customer id.
        max_attempts: Comparisons allowed per ``window``.
        window: Length of the sliding window.

    Returns:
        Whether a comparison may run; ``False`` when locked, out of attempts or unknown.
    """
    cur = await conn.execute(
        """
        UPDATE customers
        SET verification_attempts =
                verification_attempts_since(verification_attempts, now() - %(window)s) || now()
        WHERE id = %(id)s
          AND (verification_locked_until IS NULL OR verification_locked_until <= now())
          AND cardinality(verification_attempts_since(verification_attempts, now() - %(window)s))
              < %(max)s
        RETURNING id
        """,
        {"id": customer_id, "window": window, "max": max_attempts},
    )
    return await cur.fetchone() is not None


async def record_verification_failure(
    conn: AsyncConnection, customer_id: int, *, max_failures: int, window: timedelta
) -> VerificationFailure | None:
    """Count a failed comparison on the customer row; the last allowed one locks it.

    Failures form a run while each follows the previous within ``window``; the failure
    that brings the run to ``max_failures`` sets ``verification_locked_until`` to
    ``now() + window`` (never shortening a lock already in force). One statement whose SET
    reads the row's newest version (Postgres serialises concurrent updates of the row),
    so concurrent failures are all counted.

    Args:
        conn: Database connection.
        customer_id: Customer id.
        max_failures: Failures in a run that lock verification.
        window: Run gap and lock length.

    Returns:
        The failure count and lock after this failure, or ``None`` for an unknown customer.
    """
    async with conn.cursor(row_factory=class_row(VerificationFailure)) as cur:
        await cur.execute(
            """
            UPDATE customers
            SET verification_failed_attempts = CASE
                    WHEN verification_last_failed_at > now() - %(window)s
                    THEN verification_failed_attempts + 1 ELSE 1 END,
                verification_last_failed_at = now(),
                verification_locked_until = CASE
                    WHEN (CASE WHEN verification_last_failed_at > now() - %(window)s
                               THEN verification_failed_attempts + 1 ELSE 1 END) >= %(max)s
                    THEN greatest(verification_locked_until, now() + %(window)s)
                    ELSE verification_locked_until END
            WHERE id = %(id)s
            RETURNING verification_failed_attempts AS failed_attempts,
                      verification_locked_until AS locked_until
            """,
            {"id": customer_id, "window": window, "max": max_failures},
        )
        return await cur.fetchone()


async def record_verification_success(conn: AsyncConnection, customer_id: int) -> None:
    """Note a successful verification; failures and locks are left as they are.

    A success must not wipe failures: they may be another, concurrent caller's guesses.

    Args:
        conn: Database connection.
        customer_id: Customer id.
    """
    await conn.execute(
        "UPDATE customers SET last_verified_at = now() WHERE id = %(id)s", {"id": customer_id}
    )


async def opt_out_of_calls(conn: AsyncConnection, phone: str) -> int:
    """Record "do not call" for every customer whose primary phone is ``phone``.

    Args:
        conn: Database connection.
        phone: E.164 number the person asked us to stop calling.

    Returns:
        How many customers were updated.
    """
    cur = await conn.execute(
        "UPDATE customers SET do_not_call = true, call_consent = false WHERE phone = %(phone)s",
        {"phone": phone},
    )
    return cur.rowcount

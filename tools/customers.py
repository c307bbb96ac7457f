"""Caller identification and verification tools.

Before verification a tool reveals at most the caller's first name and whether a record
exists. Verified means caller ID matched the customer's phone plus one factor (date of
birth, ZIP code or last 4 of a VIN), or two factors when caller ID did not match.

Guessing is bounded in Postgres, the single source of truth: every comparison (one
``verify_customer`` call that checks the given factors, right or wrong) first claims one of
3 attempts per customer per sliding 15 minutes with one atomic UPDATE of the customer row,
committed before the comparison runs. So parallel calls together get at most 3
comparisons per 15 minutes, a success never frees a slot or wipes another call's failures,
and 3 failures in a row also set ``verification_locked_until`` for 15 minutes (the row
shows the failures and the lock). Redis holds no verification state: one store, read and
written in one statement, cannot disagree with itself.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from loguru import logger

from core.pii import mask_phone
from crm import customers as crm_customers
from tools.context import ToolContext
from tools.overview import account_overview
from tools.registry import ToolRefusal, run_tool, tool

#: Comparisons allowed per customer per :data:`ATTEMPT_WINDOW` (the CHECK constraint
#: ``customers_verification_attempts_max`` holds the same bound).
MAX_ATTEMPTS = 3
#: Failures in a run that lock verification for :data:`ATTEMPT_WINDOW`.
MAX_FAILED_ATTEMPTS = 3
ATTEMPT_WINDOW = timedelta(minutes=15)
#: Verified = caller ID plus one factor, or two factors (caller ID counts as one).
FACTORS_NEEDED = 2
LOCKED_SAY = (
    "I'm sorry, I can't verify your identity on this call right now. "
    "Let me transfer you to a service advisor who can help."
)

_DATE_FORMATS = (
    "%Y-%m-%d",
    "%m/%d/%Y",
    "%m-%d-%Y",
    "%B %d, %Y",
    "%B %d %Y",
    "%b %d, %Y",
    "%b %d %Y",
    "%d %B %Y",
)


def normalize_phone(raw: str) -> str | None:
    """Normalise a spoken or typed North American number to E.164.

    Args:
        raw: Digits with any punctuation, optionally with a leading ``+``.

    Returns:
        ``+1XXXXXXXXXX`` (or the given ``+`` number), or ``None`` when it is not a number.
    """
    digits = re.sub(r"\D", "", raw or "")
    if raw.strip().startswith("+") and 8 <= len(digits) <= 15:
        return "+" + digits
    if len(digits) == 10:
        return "+1" + digits
    if len(digits) == 11 and digits.startswith("1"):
        return "+" + digits
    return None


def parse_spoken_date(raw: str) -> date | None:
    """Parse a date of birth as the model passes it (ISO preferred)."""
    text = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", raw.strip(), flags=re.IGNORECASE)
    for fmt in _DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


async def identify_caller(ctx: ToolContext) -> bool:
    """Match the carrier-reported caller ID to a customer at call start.

    Args:
        ctx: Tool context of the call.

    Returns:
        Whether a customer matched the caller's number.
    """
    phone = ctx.session.caller_phone
    if not phone:
        return False
    async with ctx.db.connection() as conn:
        customer = await crm_customers.find_by_phone(conn, phone)
    if customer is None:
        logger.info(f"caller {mask_phone(phone)} not in CRM")
        return False
    ctx.session.match_customer(
        customer_id=customer.id, first_name=customer.first_name, caller_id=True
    )
    logger.info(f"caller {mask_phone(phone)} matched customer {customer.id}")
    return True


@tool(
    name="lookup_customer",
    description=(
        "Find the caller's customer record when caller ID did not identify them. Pass the "
        "phone number on their account, or their first and last name, and their ZIP code "
        "if they gave it (it then counts as one verification detail). Returns only whether "
        "a record exists and the first name; the caller must then be verified with "
        "verify_customer."
    ),
    properties={
        "phone": {"type": "string", "description": "Phone number on the account, digits."},
        "first_name": {"type": "string", "description": "Caller's first name."},
        "last_name": {"type": "string", "description": "Caller's last name."},
        "zip_code": {"type": "string", "description": "ZIP code of the account address."},
    },
    mutating=True,  # a ZIP code is compared like a verification factor: attempts are written
)
async def lookup_customer(
    ctx: ToolContext,
    *,
    phone: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    zip_code: str | None = None,
) -> dict[str, Any]:
    """Find the caller's record; reveals at most the first name.

    A ZIP code is a verification factor, so it never filters the search: it is compared
    with each record the phone or name found, and each such comparison claims one of that
    customer's verification attempts first (an unbounded lookup would be a ZIP oracle).
    """
    normalized = normalize_phone(phone) if phone else None
    if phone and not normalized:
        raise ToolRefusal("That phone number doesn't look complete. Could you repeat it?")
    if not normalized and not last_name:
        raise ToolRefusal(
            "I need the phone number on your account, or your first and last name.",
            code="missing_argument",
        )
    zip5 = _parse_factors(date_of_birth=None, zip_code=zip_code, vin_last4=None).zip_code
    async with ctx.db.connection() as conn:
        matches = await crm_customers.search_customers(
            conn, phone=normalized, first_name=first_name, last_name=last_name
        )
    if matches and zip5 is not None:
        matches = await _compare_zip(ctx, matches, zip5)
    if not matches:
        return {
            "ok": True,
            "found": False,
            "say": "I couldn't find an account with those details.",
        }
    if len(matches) > 1:
        return {
            "ok": True,
            "found": True,
            "unique": False,
            "say": "I found more than one account. Could you also give me your first name "
            "and ZIP code?",
        }
    match = matches[0]
    session = ctx.session
    session.match_customer(
        customer_id=match.id,
        first_name=match.first_name,
        caller_id=bool(session.caller_phone) and match.phone == session.caller_phone,
    )
    if zip5 is not None:  # compared (and claimed) above: it counts as a passed factor
        session.factors.add("zip_code")
        if len(session.factors) >= FACTORS_NEEDED:
            session.verified = True
            async with ctx.db.connection() as conn:
                await crm_customers.record_verification_success(conn, match.id)
            return await _verified_result(ctx, match.id, found=True)
    return {
        "ok": True,
        "found": True,
        "first_name": match.first_name,
        "needs": "verification",
        "factors_needed": FACTORS_NEEDED - len(session.factors),
    }


async def _compare_zip(
    ctx: ToolContext, candidates: list[crm_customers.CustomerIdentity], zip5: str
) -> list[crm_customers.CustomerIdentity]:
    """The candidates whose ZIP code is ``zip5``, each comparison claimed first.

    A candidate out of attempts (or locked) is not compared. When none of the compared
    ones matches, the ZIP was a wrong guess for each of them and counts as a failure.
    """
    compared = []
    for candidate in candidates:
        async with ctx.db.connection() as conn:
            if await crm_customers.claim_verification_attempt(
                conn, candidate.id, max_attempts=MAX_ATTEMPTS, window=ATTEMPT_WINDOW
            ):
                compared.append(candidate)
    if not compared:
        raise ToolRefusal(LOCKED_SAY, code="locked", transfer=True)
    matched = [c for c in compared if c.zip_code and c.zip_code[:5] == zip5]
    if not matched:
        for candidate in compared:
            async with ctx.db.connection() as conn:
                await crm_customers.record_verification_failure(
                    conn, candidate.id, max_failures=MAX_FAILED_ATTEMPTS, window=ATTEMPT_WINDOW
                )
    return matched


@tool(
    name="verify_customer",
    description=(
        "Verify the caller's identity before discussing vehicles, history or appointments. "
        "Ask for ONE of: date of birth, ZIP code, or the last 4 characters of a vehicle's "
        "VIN (two of them if caller ID did not match). Never read any of these back. Once "
        "verified, the result lists the caller's vehicles (with the vehicle_id to book with) "
        "and upcoming appointments (with the appointment_id to change). If the caller has "
        "already said which service they want, pass its code as service_type: the result "
        "then also carries the next open slots for it (as check_availability returns them), "
        "so you can offer a time without another lookup."
    ),
    properties={
        "date_of_birth": {"type": "string", "description": "Date of birth as YYYY-MM-DD."},
        "zip_code": {"type": "string", "description": "5-digit ZIP code of the account."},
        "vin_last4": {"type": "string", "description": "Last 4 characters of a VIN."},
        "service_type": {
            "type": "string",
            "description": "Service code the caller asked for, e.g. oil_change (optional).",
        },
    },
    mutating=True,  # records attempts: a barge-in must not cut the failure count short
)
async def verify_customer(
    ctx: ToolContext,
    *,
    date_of_birth: str | None = None,
    zip_code: str | None = None,
    vin_last4: str | None = None,
    service_type: str | None = None,
) -> dict[str, Any]:
    """Check verification factors for the matched customer.

    Once verified, the result carries the caller's account overview and, when
    ``service_type`` is given, the next open slots for that service: one tool round trip
    where a booking call would otherwise need two (verify, then check availability).
    """
    session = ctx.session
    if session.customer_id is None:
        raise ToolRefusal(
            "I need to find your account first. What's the phone number on the account?",
            code="no_customer",
        )
    if session.verified:
        return await _verified_result(ctx, session.customer_id, service_type=service_type)
    customer_id = session.customer_id
    if not (date_of_birth or zip_code or vin_last4):
        raise ToolRefusal(
            "Could you tell me your date of birth, ZIP code, or the last four of your VIN?",
            code="missing_argument",
        )
    given = _parse_factors(date_of_birth=date_of_birth, zip_code=zip_code, vin_last4=vin_last4)
    # The claim is committed (its own connection block) before anything is compared, so
    # a crash or a cancelled call after the comparison still counts the attempt.
    async with ctx.db.connection() as conn:
        claimed = await crm_customers.claim_verification_attempt(
            conn, customer_id, max_attempts=MAX_ATTEMPTS, window=ATTEMPT_WINDOW
        )
    if not claimed:
        raise ToolRefusal(LOCKED_SAY, code="locked", transfer=True)
    async with ctx.db.connection() as conn:
        identity = await crm_customers.get_identity(conn, customer_id)
        if identity is None:
            raise ToolRefusal("I couldn't find that account anymore.", code="no_customer")
        passed, failed = await _check_factors(conn, identity, given)
    if failed:
        async with ctx.db.connection() as conn:
            row = await crm_customers.record_verification_failure(
                conn, customer_id, max_failures=MAX_FAILED_ATTEMPTS, window=ATTEMPT_WINDOW
            )
        if row is not None and row.failed_attempts >= MAX_FAILED_ATTEMPTS:
            logger.info(f"verification locked for customer {customer_id}")
            raise ToolRefusal(LOCKED_SAY, code="locked", transfer=True)
        raise ToolRefusal(
            "That doesn't match what I have on file. Could you try again?", code="mismatch"
        )
    session.factors.update(passed)  # type: ignore[arg-type]
    if len(session.factors) >= FACTORS_NEEDED:
        session.verified = True
        async with ctx.db.connection() as conn:
            await crm_customers.record_verification_success(conn, customer_id)
        return await _verified_result(ctx, customer_id, service_type=service_type)
    return {
        "ok": True,
        "verified": False,
        "say": "Thanks. I need one more detail: your date of birth, ZIP code, or the last "
        "four of your VIN.",
    }


async def _verified_result(
    ctx: ToolContext, customer_id: int, *, service_type: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The result of a completed verification: the first name, plus the caller's vehicles
    and upcoming appointments (:func:`tools.overview.account_overview`), so the model needs
    no second round trip before talking about them, and with ``service_type`` the open
    slots for that service (``check_availability``'s own result, its slots remembered for
    booking), looked up at the same time. No verification factor is in it.

    The verification stands even when the overview or the slots cannot be read (the
    database failing right after it, a service code the dealership does not know): the
    result then says so, and the model falls back on the other tools."""
    result: dict[str, Any] = {
        "ok": True,
        **extra,
        "verified": True,
        "first_name": ctx.session.customer_first_name,
    }

    async def overview() -> dict[str, Any] | None:
        try:
            return await account_overview(ctx, customer_id)
        except Exception as exc:
            logger.warning(
                f"account overview of customer {customer_id} failed: {type(exc).__name__}"
            )
            return None

    if service_type:
        # Through run_tool: the same argument checks, refusals and error handling as when
        # the model calls check_availability itself (and no import cycle).
        accounts, slots = await asyncio.gather(
            overview(), run_tool(ctx, "check_availability", {"service_type": service_type})
        )
        result["availability"] = slots
    else:
        accounts = await overview()
    if accounts is None:
        result["account_details"] = "unavailable"
    else:
        result.update(accounts)
    return result


@dataclass(frozen=True)
class _Factors:
    """Factors as given by the caller, normalised for comparison."""

    date_of_birth: date | None
    zip_code: str | None
    vin_last4: str | None


def _parse_factors(
    *, date_of_birth: str | None, zip_code: str | None, vin_last4: str | None
) -> _Factors:
    """Normalise the given factors; one that cannot be a value is asked for again.

    Nothing is compared here and no attempt is used: a date that is not a date says
    nothing about the record.
    """
    dob = None
    if date_of_birth:
        dob = parse_spoken_date(date_of_birth)
        if dob is None:
            raise ToolRefusal(
                "I didn't catch that date of birth. Could you say the month, day and year?",
                code="bad_arguments",
            )
    zip5 = None
    if zip_code:
        digits = re.sub(r"\D", "", zip_code)
        if len(digits) not in (5, 9):
            raise ToolRefusal(
                "I didn't catch that ZIP code. Could you say the five digits again?",
                code="bad_arguments",
            )
        zip5 = digits[:5]
    last4 = None
    if vin_last4:
        chars = re.sub(r"[^A-Za-z0-9]", "", vin_last4).upper()
        if len(chars) < 4 or len(chars) > 17:
            raise ToolRefusal(
                "I didn't catch the last four characters of the VIN. Could you repeat them?",
                code="bad_arguments",
            )
        last4 = chars[-4:]
    return _Factors(date_of_birth=dob, zip_code=zip5, vin_last4=last4)


async def _check_factors(
    conn, identity: crm_customers.CustomerIdentity, given: _Factors
) -> tuple[set[str], bool]:
    """Which given factors match the record, and whether any given factor failed."""
    passed: set[str] = set()
    failed = False
    if given.date_of_birth is not None:
        if given.date_of_birth == identity.date_of_birth:
            passed.add("date_of_birth")
        else:
            failed = True
    if given.zip_code is not None:
        if identity.zip_code and given.zip_code == identity.zip_code[:5]:
            passed.add("zip_code")
        else:
            failed = True
    if given.vin_last4 is not None:
        if await crm_customers.vin_last4_matches(conn, identity.id, given.vin_last4):
            passed.add("vin_last4")
        else:
            failed = True
    return passed, failed


def require_verified(ctx: ToolContext) -> int:
    """The verified customer id of the call, or a refusal the bot can say.

    Args:
        ctx: Tool context of the call.

    Returns:
        The verified customer's id.

    Raises:
        ToolRefusal: The caller is not verified yet.
    """
    if ctx.session.customer_id is None or not ctx.session.verified:
        raise ToolRefusal(
            "Before I can get into your account, I need to verify your identity.",
            code="not_verified",
        )
    return ctx.session.customer_id

"""Caller identification and verification tools.

Before verification a tool reveals at most the caller's first name and whether a record
exists. Verified means caller ID matched the customer's phone plus one factor (date of
birth, ZIP code or last 4 of a VIN), or two factors when caller ID did not match. Three
failed attempts lock verification for that customer for 15 minutes, counted atomically
in Redis across concurrent calls and mirrored onto the customer row.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from loguru import logger

from core.pii import mask_phone
from crm import customers as crm_customers
from tools.registry import ToolContext, ToolRefusal, tool

MAX_FAILED_ATTEMPTS = 3
#: Verified = caller ID plus one factor, or two factors (caller ID counts as one).
FACTORS_NEEDED = 2
LOCK_SECONDS = 15 * 60
LOCKED_SAY = (
    "I'm sorry, I can't verify your identity on this call right now. "
    "Let me transfer you to a service advisor who can help."
)

# KEYS: fail counter, lock flag. ARGV: lock ms, max attempts. Returns the new count.
_FAIL_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
  redis.call('DEL', KEYS[1])
end
return n
"""

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


def _keys(ctx: ToolContext, customer_id: int) -> tuple[str, str]:
    return (
        f"{ctx.key_prefix}:verify:fail:{customer_id}",
        f"{ctx.key_prefix}:verify:lock:{customer_id}",
    )


async def is_locked(ctx: ToolContext, customer_id: int) -> bool:
    """Whether verification is locked for the customer (Redis, or the CRM row)."""
    _, lock_key = _keys(ctx, customer_id)
    if await ctx.redis.exists(lock_key):
        return True
    async with ctx.db.connection() as conn:
        identity = await crm_customers.get_identity(conn, customer_id)
    return bool(
        identity
        and identity.verification_locked_until
        and identity.verification_locked_until > datetime.now(UTC)
    )


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
        "if they gave it. Returns only whether a record exists and the first name; the "
        "caller must then be verified with verify_customer."
    ),
    properties={
        "phone": {"type": "string", "description": "Phone number on the account, digits."},
        "first_name": {"type": "string", "description": "Caller's first name."},
        "last_name": {"type": "string", "description": "Caller's last name."},
        "zip_code": {"type": "string", "description": "ZIP code of the account address."},
    },
)
async def lookup_customer(
    ctx: ToolContext,
    *,
    phone: str | None = None,
    first_name: str | None = None,
    last_name: str | None = None,
    zip_code: str | None = None,
) -> dict[str, Any]:
    """Find the caller's record; reveals at most the first name."""
    normalized = normalize_phone(phone) if phone else None
    if phone and not normalized:
        raise ToolRefusal("That phone number doesn't look complete. Could you repeat it?")
    if not normalized and not last_name:
        raise ToolRefusal(
            "I need the phone number on your account, or your first and last name.",
            code="missing_argument",
        )
    async with ctx.db.connection() as conn:
        matches = await crm_customers.search_customers(
            conn, phone=normalized, first_name=first_name, last_name=last_name, zip_code=zip_code
        )
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
    ctx.session.match_customer(
        customer_id=match.id,
        first_name=match.first_name,
        caller_id=bool(ctx.session.caller_phone) and match.phone == ctx.session.caller_phone,
    )
    return {
        "ok": True,
        "found": True,
        "first_name": match.first_name,
        "needs": "verification",
        "factors_needed": 1 if ctx.session.caller_id_matched else 2,
    }


@tool(
    name="verify_customer",
    description=(
        "Verify the caller's identity before discussing vehicles, history or appointments. "
        "Ask for ONE of: date of birth, ZIP code, or the last 4 characters of a vehicle's "
        "VIN (two of them if caller ID did not match). Never read any of these back."
    ),
    properties={
        "date_of_birth": {"type": "string", "description": "Date of birth as YYYY-MM-DD."},
        "zip_code": {"type": "string", "description": "5-digit ZIP code of the account."},
        "vin_last4": {"type": "string", "description": "Last 4 characters of a VIN."},
    },
)
async def verify_customer(
    ctx: ToolContext,
    *,
    date_of_birth: str | None = None,
    zip_code: str | None = None,
    vin_last4: str | None = None,
) -> dict[str, Any]:
    """Check verification factors for the matched customer."""
    session = ctx.session
    if session.customer_id is None:
        raise ToolRefusal(
            "I need to find your account first. What's the phone number on the account?",
            code="no_customer",
        )
    if session.verified:
        return {"ok": True, "verified": True, "first_name": session.customer_first_name}
    customer_id = session.customer_id
    if await is_locked(ctx, customer_id):
        raise ToolRefusal(LOCKED_SAY, code="locked", transfer=True)
    if not (date_of_birth or zip_code or vin_last4):
        raise ToolRefusal(
            "Could you tell me your date of birth, ZIP code, or the last four of your VIN?",
            code="missing_argument",
        )
    refusal: ToolRefusal | None = None
    async with ctx.db.connection() as conn:
        identity = await crm_customers.get_identity(conn, customer_id)
        if identity is None:
            raise ToolRefusal("I couldn't find that account anymore.", code="no_customer")
        passed, failed = await _check_factors(
            conn,
            identity,
            date_of_birth=date_of_birth,
            zip_code=zip_code,
            vin_last4=vin_last4,
        )
        if failed:
            count = await _record_failure(ctx, customer_id)
            locked_until = (
                datetime.now(UTC) + timedelta(seconds=LOCK_SECONDS)
                if count >= MAX_FAILED_ATTEMPTS
                else None
            )
            await crm_customers.record_verification(
                conn, customer_id, success=False, locked_until=locked_until
            )
            if locked_until:
                logger.info(f"verification locked for customer {customer_id}")
                refusal = ToolRefusal(LOCKED_SAY, code="locked", transfer=True)
            else:
                refusal = ToolRefusal(
                    "That doesn't match what I have on file. Could you try again?",
                    code="mismatch",
                )
        else:
            session.factors.update(passed)  # type: ignore[arg-type]
            if len(session.factors) >= FACTORS_NEEDED:
                session.verified = True
                await crm_customers.record_verification(
                    conn, customer_id, success=True, locked_until=None
                )
    # Raised only after the block, so the attempt above is committed, not rolled back.
    if refusal is not None:
        raise refusal
    if session.verified:
        fail_key, _ = _keys(ctx, customer_id)
        await ctx.redis.delete(fail_key)
        return {"ok": True, "verified": True, "first_name": session.customer_first_name}
    return {
        "ok": True,
        "verified": False,
        "say": "Thanks. I need one more detail: your date of birth, ZIP code, or the last "
        "four of your VIN.",
    }


async def _check_factors(
    conn,
    identity: crm_customers.CustomerIdentity,
    *,
    date_of_birth: str | None,
    zip_code: str | None,
    vin_last4: str | None,
) -> tuple[set[str], bool]:
    """Which given factors match the record, and whether any given factor failed."""
    passed: set[str] = set()
    failed = False
    if date_of_birth:
        parsed = parse_spoken_date(date_of_birth)
        if parsed is not None and parsed == identity.date_of_birth:
            passed.add("date_of_birth")
        else:
            failed = True
    if zip_code:
        given = re.sub(r"\D", "", zip_code)[:5]
        if identity.zip_code and given == identity.zip_code[:5]:
            passed.add("zip_code")
        else:
            failed = True
    if vin_last4:
        last4 = re.sub(r"[^A-Za-z0-9]", "", vin_last4)[-4:].upper()
        if len(last4) == 4 and await crm_customers.vin_last4_matches(conn, identity.id, last4):
            passed.add("vin_last4")
        else:
            failed = True
    return passed, failed


async def _record_failure(ctx: ToolContext, customer_id: int) -> int:
    fail_key, lock_key = _keys(ctx, customer_id)
    return int(
        await ctx.redis.eval(
            _FAIL_SCRIPT, 2, fail_key, lock_key, LOCK_SECONDS * 1000, MAX_FAILED_ATTEMPTS
        )
    )


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

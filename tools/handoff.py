"""Hand-off tools: transfer to a human advisor, or end the call.

This is the business side: whether an advisor is reachable now (opening hours), the
callback request after hours, and the reason recorded. The telephony side (the one
sentence, then a Twilio REST redirect to ``<Dial>``) is done by the bot when it sees
``session.pending_action``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from core.profile import DealershipProfile
from crm import calls as crm_calls
from tools.context import ToolContext
from tools.customers import normalize_phone
from tools.registry import tool

#: Longest callback number argument taken as a number (digits, spaces, dashes, "+1").
MAX_SPOKEN_NUMBER_CHARS = 40


def is_open(profile: DealershipProfile, moment: datetime) -> bool:
    """Whether the service department is open at ``moment``."""
    local = moment.astimezone(profile.time_zone)
    return any(r.contains(local.time()) for r in profile.opening_hours(local.date()))


@tool(
    name="transfer_to_advisor",
    description=(
        "Hand the caller to a human service advisor: when they ask for a person, when "
        "verification is locked, when something fails, or for anything you cannot do. "
        "After hours this records a callback request instead; if it asks for a callback "
        "number, ask the caller and call it again with callback_number."
    ),
    properties={
        "reason": {"type": "string", "description": "Short reason for the advisor."},
        "callback_number": {
            "type": "string",
            "description": "After hours only: the number the caller gave for the call back.",
        },
    },
    required=["reason"],
)
async def transfer_to_advisor(
    ctx: ToolContext, *, reason: str, callback_number: str | None = None
) -> dict[str, Any]:
    """Transfer during opening hours, otherwise take a callback request.

    After hours the request is always recorded, also without a usable number (caller ID
    withheld): the advisors see that someone needed them, and the customer's record may
    have a number. Without any way to call back, the tool asks the model to get a number
    from the caller; a second call with ``callback_number`` adds it to the same request.
    When Postgres is down the request is queued (``ctx.pending``) and written once it is
    back, so the sentence is still true.
    """
    now = ctx.now() if ctx.now else datetime.now(UTC)
    session = ctx.session
    reason = str(reason)[:500]
    if is_open(ctx.profile, now):
        session.pending_action = "transfer"
        session.transfer_reason = reason[:200]  # the advisor's whisper and the call summary
        session.outcome = "transferred"
        return {
            "ok": True,
            "transferring": True,
            "say": "I'll connect you with a service advisor now. One moment please.",
        }
    # Longer than any way of saying a number: not one. Cut to length instead, it could
    # become a different, valid-looking number (found by the fault tests' hypothesis).
    spoken = str(callback_number) if callback_number else ""
    given = (
        crm_calls.callback_number(normalize_phone(spoken))
        if spoken and len(spoken) <= MAX_SPOKEN_NUMBER_CHARS
        else None
    )
    caller_id = crm_calls.callback_number(session.caller_phone)
    phone = given or caller_id
    request_id = await _record_callback(ctx, phone=phone, reason=reason, now=now)
    session.outcome = "callback_requested"
    result: dict[str, Any] = {"ok": True, "transferring": False, "recorded": True}
    if request_id is not None:
        result["callback_request_id"] = request_id
    if callback_number and given is None:
        result["needs_callback_number"] = True
        result["say"] = (
            "Sorry, I didn't catch a full phone number. Could you say it again, with the area code?"
        )
    elif phone is not None:
        where = "on the number you gave me" if given else "on this number"
        result["say"] = (
            f"Our advisors are away right now, so I've asked one to call you back {where} "
            "when we open."
        )
    elif session.customer_id is not None and session.verified:
        result["say"] = (
            "Our advisors are away right now, so I've asked one to call you back on the "
            "number on your account when we open."
        )
    else:
        result["needs_callback_number"] = True
        result["say"] = (
            "Our advisors are away right now, and I've noted that you'd like a call back. "
            "What number should they call you on?"
        )
    return result


async def _record_callback(
    ctx: ToolContext, *, phone: str | None, reason: str, now: datetime
) -> int | None:
    """Write the callback request; its id, or ``None`` when it was queued for later."""
    session = ctx.session
    ids: list[int] = []

    async def write(conn: Any) -> None:
        ids.append(
            await crm_calls.add_callback_request(
                conn,
                call_sid=session.call_sid,
                customer_id=session.customer_id,
                phone=phone,
                reason=reason,
                requested_at=now,
            )
        )

    if ctx.pending is not None:
        await ctx.pending.write(call_sid=session.call_sid, what="callback request", write=write)
        return ids[0] if ids else None
    async with ctx.db.connection() as conn:
        await write(conn)
    return ids[0]


@tool(
    name="end_call",
    description="End the call after saying goodbye, when the caller has nothing else.",
    properties={"reason": {"type": "string", "description": "Why the call ends."}},
)
async def end_call(ctx: ToolContext, *, reason: str | None = None) -> dict[str, Any]:
    """Ask the telephony layer to hang up after the goodbye is spoken."""
    session = ctx.session
    session.pending_action = "end"
    if session.outcome is None:
        session.outcome = "info"
    return {
        "ok": True,
        "ending": True,
        "say": f"Thank you for calling {ctx.profile.name}. Goodbye!",
    }

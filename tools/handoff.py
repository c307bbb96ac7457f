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
from tools.registry import ToolContext, tool


def is_open(profile: DealershipProfile, moment: datetime) -> bool:
    """Whether the service department is open at ``moment``."""
    local = moment.astimezone(profile.time_zone)
    return any(r.contains(local.time()) for r in profile.opening_hours(local.date()))


@tool(
    name="transfer_to_advisor",
    description=(
        "Hand the caller to a human service advisor: when they ask for a person, when "
        "verification is locked, when something fails, or for anything you cannot do. "
        "After hours this records a callback request instead."
    ),
    properties={"reason": {"type": "string", "description": "Short reason for the advisor."}},
    required=["reason"],
)
async def transfer_to_advisor(ctx: ToolContext, *, reason: str) -> dict[str, Any]:
    """Transfer during opening hours, otherwise take a callback request."""
    now = ctx.now() if ctx.now else datetime.now(UTC)
    session = ctx.session
    if is_open(ctx.profile, now):
        session.pending_action = "transfer"
        session.transfer_reason = reason[:200]
        session.outcome = "transferred"
        return {
            "ok": True,
            "transferring": True,
            "say": "I'll connect you with a service advisor now. One moment please.",
        }
    async with ctx.db.connection() as conn:
        request_id = await crm_calls.add_callback_request(
            conn,
            call_sid=session.call_sid,
            customer_id=session.customer_id,
            phone=session.caller_phone,
            reason=reason[:500],
        )
    session.outcome = "callback_requested"
    return {
        "ok": True,
        "transferring": False,
        "callback_request_id": request_id,
        "say": "Our advisors are away right now, so I've asked one to call you back on this "
        "number when we open.",
    }


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
    session.end_reason = (reason or "caller finished")[:200]
    return {
        "ok": True,
        "ending": True,
        "say": f"Thank you for calling {ctx.profile.name}. Goodbye!",
    }

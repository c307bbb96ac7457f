"""Tools for outbound calls: confirm an appointment, honour "stop calling me"."""

from __future__ import annotations

from typing import Any

from loguru import logger

from crm import appointments as crm_appointments
from crm import customers as crm_customers
from scheduling.availability import speakable
from tools.context import ToolContext
from tools.customers import require_verified
from tools.registry import ToolRefusal, tool


@tool(
    name="confirm_appointment",
    description="For a VERIFIED customer: confirm they will come to their appointment.",
    properties={"appointment_id": {"type": "integer", "description": "From list_appointments."}},
    required=["appointment_id"],
    mutating=True,
)
async def confirm_appointment(ctx: ToolContext, *, appointment_id: int) -> dict[str, Any]:
    """Mark a scheduled appointment of the verified customer as confirmed."""
    customer_id = require_verified(ctx)
    async with ctx.db.connection() as conn:
        row = await crm_appointments.confirm_scheduled(
            conn, appointment_id=int(appointment_id), customer_id=customer_id
        )
    if row is None:
        raise ToolRefusal(
            "I couldn't confirm that appointment; it may already be confirmed or changed.",
            code="not_confirmable",
        )
    if int(appointment_id) not in ctx.session.appointment_ids:
        ctx.session.appointment_ids.append(int(appointment_id))
    ctx.session.outcome = "confirmed"
    return {
        "ok": True,
        "confirmed": True,
        "when": speakable(row.starts_at, ctx.profile.time_zone),
        "confirmation_code": row.confirmation_code,
    }


@tool(
    name="opt_out",
    description=(
        "The person asked not to be called again. Records do-not-call for the number "
        "this call was placed to, then ends the call politely."
    ),
    properties={},
)
async def opt_out(ctx: ToolContext) -> dict[str, Any]:
    """Set ``do_not_call`` for the customer(s) on the called number."""
    phone = ctx.session.caller_phone
    if not phone:
        raise ToolRefusal("I'll make a note of that.", code="no_number")
    async with ctx.db.connection() as conn:
        updated = await crm_customers.opt_out_of_calls(conn, phone)
    logger.info(f"opt-out recorded for {updated} customer(s) on call {ctx.session.call_sid}")
    ctx.session.outcome = "opted_out"
    ctx.session.pending_action = "end"
    return {
        "ok": True,
        "ending": True,
        "say": "Understood. We won't call you again. Have a good day.",
    }

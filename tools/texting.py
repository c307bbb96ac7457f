"""Text confirmations from the call: queue the text after a change, ask for consent once.

After a booking, reschedule or cancellation the booking tool queues the confirmation text
in its own transaction (:func:`queue_change_text`); the senders send it, never on the
voice path. When the CRM has no answer about texts, the tool result says
``"text": "ask_consent"`` (once per call) and the bot asks "Can I text you the
confirmation?"; :func:`record_text_consent` stores the answer with its time and the call
sid, which releases (or drops) the waiting text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from psycopg import AsyncConnection

from crm import messages as crm_messages
from tools.context import ToolContext
from tools.customers import require_verified
from tools.registry import tool

#: How long a confirmation text waits for the caller's consent answer (the call usually
#: ends sooner; the text is dropped when it does without a yes).
CONSENT_HOLD = timedelta(minutes=30)
#: A confirmation text that could not be sent within this is not sent at all.
CHANGE_TEXT_EXPIRY = timedelta(hours=6)

ChangeKind = Literal["booked", "rescheduled", "cancelled"]


def _now(ctx: ToolContext) -> datetime:
    return ctx.now() if ctx.now else datetime.now(UTC)


async def queue_change_text(
    ctx: ToolContext, conn: AsyncConnection, *, appointment_id: int, kind: ChangeKind
) -> dict[str, str]:
    """Queue the text about a change made on this call; say whether to ask for consent.

    Args:
        ctx: The call's tool context (verified caller).
        conn: The connection of the change's transaction.
        appointment_id: The booked, new or cancelled appointment.
        kind: ``booked``, ``rescheduled`` or ``cancelled``.

    Returns:
        Fields for the tool result: ``{"text": "will_text" | "ask_consent" | "none"}``, or
        nothing when texting is off.
    """
    if not ctx.profile.texting.enabled or ctx.session.customer_id is None:
        return {}
    await crm_messages.queue_appointment_text(
        conn,
        appointment_id=appointment_id,
        kind=kind,
        call_sid=ctx.session.call_sid,
        now=_now(ctx),
        hold=CONSENT_HOLD,
        expires_after=CHANGE_TEXT_EXPIRY,
    )
    state = await crm_messages.consent_state(conn, ctx.session.customer_id)
    if state is None or state.opted_out:
        return {"text": "none"}
    if state.consent:
        return {"text": "will_text"}
    if state.known or ctx.session.text_consent_asked:
        return {"text": "none"}
    ctx.session.text_consent_asked = True
    return {"text": "ask_consent"}


@tool(
    name="record_text_consent",
    description=(
        "Record a VERIFIED caller's answer when you asked 'Can I text you the "
        "confirmation?' (ask only when a booking, reschedule or cancellation result has "
        "text: ask_consent, and only once). answer: true for yes, false for no."
    ),
    properties={"answer": {"type": "boolean", "description": "Whether they agreed."}},
    required=["answer"],
    mutating=True,
)
async def record_text_consent(ctx: ToolContext, *, answer: bool) -> dict[str, Any]:
    """Store the caller's consent to texts, with its time and this call's sid.

    The registry has already turned the answer into a bool ("yes"/"no" included) or
    answered ``bad_arguments``.
    """
    customer_id = require_verified(ctx)
    consent = answer
    async with ctx.db.connection() as conn, conn.transaction():
        await crm_messages.record_consent(
            conn,
            customer_id=customer_id,
            consent=consent,
            call_sid=ctx.session.call_sid,
            now=_now(ctx),
        )
        state = await crm_messages.consent_state(conn, customer_id)
    ctx.session.text_consent_asked = True
    if consent and state is not None and state.opted_out:
        return {
            "ok": True,
            "text_consent": True,
            "say": "Thanks. Your number had opted out of our texts, so please text START "
            "to our number to get them again.",
        }
    return {
        "ok": True,
        "text_consent": consent,
        "say": "Great, I'll text you the confirmation."
        if consent
        else "No problem, I won't send texts.",
    }

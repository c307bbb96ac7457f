"""Answers to inbound texts: confirm, reschedule, opt out and back in, help.

The text is matched to a customer by number (their own or their alternate phone; a
household sharing a number: the one with the nearest upcoming appointment). Each inbound
text is acted on once (MessageSid unique); the answer goes through the sender like every
other text, so the opt-out and the rate limit hold for it too. STOP and START get no
answer of ours: Twilio's standard opt-out handling confirms them to the customer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from loguru import logger
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from core.pii import mask_phone
from core.profile import DealershipProfile
from crm import calls as crm_calls
from crm import campaigns as crm_campaigns
from crm import messages as crm
from messaging.bodies import service_names, spoken_number, when
from messaging.keywords import classify

_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
_SID = re.compile(r"^[A-Za-z0-9]{2,64}$")
#: Longest inbound text stored (Twilio joins at most 10 segments, 1600 characters).
MAX_INBOUND_CHARS = 1600


@dataclass(frozen=True)
class InboundResult:
    """What an inbound text did.

    Attributes:
        action: ``ignored`` (not a usable number or sid), ``duplicate`` (a webhook retry),
            ``opted_out``, ``opted_in``, ``help``, ``confirmed``, ``already_confirmed``,
            ``no_appointment``, ``callback_bot``, ``callback_advisor`` or ``options``.
        reply_id: The answer queued for the sender, if any.
        customer_id: The customer the text was matched to.
        appointment_id: The appointment acted on.
    """

    action: str
    reply_id: int | None = None
    customer_id: int | None = None
    appointment_id: int | None = None


def clean_body(body: str) -> str:
    """An inbound body as stored: no NUL (Postgres text cannot hold it), capped length."""
    return body.replace("\x00", "")[:MAX_INBOUND_CHARS]


def help_text(profile: DealershipProfile) -> str:
    """The answer to HELP: who we are and how to reach a person."""
    address = f" {profile.address}." if profile.address else ""
    return (
        f"{profile.name} service: {spoken_number(profile.phone_number)}.{address} "
        "Reply C to confirm your appointment, R to reschedule, STOP to opt out. "
        "Msg & data rates may apply."
    )


def options_text(profile: DealershipProfile) -> str:
    """The answer to anything we do not understand."""
    return (
        f"{profile.name} service: reply C to confirm your appointment, R to reschedule, "
        f"HELP for help, STOP to opt out. Or call {spoken_number(profile.phone_number)}."
    )


def call_rules(profile: DealershipProfile) -> crm_campaigns.CallRules:
    """The calling windows of the profile, for the bot's callback."""
    return crm_campaigns.CallRules(
        dealer_time_zone=str(profile.time_zone),
        dealer_window=(profile.outbound_window.start, profile.outbound_window.end),
        customer_window=(profile.customer_call_window.start, profile.customer_call_window.end),
    )


async def handle_inbound(
    db: AsyncConnectionPool,
    *,
    profile: DealershipProfile,
    message_sid: str,
    from_number: str,
    body: str,
    now: datetime,
) -> InboundResult:
    """Act on one inbound text and queue our answer.

    Args:
        db: Connection pool.
        profile: Dealership profile.
        message_sid: Twilio's MessageSid (acted on once).
        from_number: The sender's number (untrusted form field).
        body: The text (untrusted: any length, any characters).
        now: The current instant.

    Returns:
        What was done.
    """
    phone = from_number.strip()
    if not _E164.match(phone) or not _SID.match(message_sid):
        return InboundResult("ignored")
    text = clean_body(body)
    intent, keyword = classify(text)
    async with db.connection() as conn, conn.transaction():
        target = await crm.reply_target(conn, phone=phone, now=now)
        customer_id = target.customer_id if target else None
        if (
            await crm.record_inbound(
                conn, sid=message_sid, phone=phone, body=text, customer_id=customer_id
            )
            is None
        ):
            return InboundResult("duplicate", customer_id=customer_id)
        if intent == "opt_out":
            await crm.opt_out(conn, phone=phone, keyword=keyword)
            logger.info(f"text opt-out ({keyword.upper()}) from {mask_phone(phone)}")
            return InboundResult("opted_out", customer_id=customer_id)
        if intent == "opt_in":
            await crm.opt_in(conn, phone=phone)
            logger.info(f"text opt-in ({keyword.upper()}) from {mask_phone(phone)}")
            return InboundResult("opted_in", customer_id=customer_id)
        action, reply, appointment_id = await _act(
            conn,
            intent=intent,
            target=target,
            profile=profile,
            now=now,
            sid=message_sid,
            phone=phone,
        )
        reply_id = await crm.queue_reply(
            conn, phone=phone, customer_id=customer_id, body=reply, now=now
        )
    logger.info(f"text from {mask_phone(phone)}: {intent} -> {action}")
    return InboundResult(action, reply_id, customer_id, appointment_id)


async def _act(
    conn: AsyncConnection,
    *,
    intent: str,
    target: crm.ReplyTarget | None,
    profile: DealershipProfile,
    now: datetime,
    sid: str,
    phone: str,
) -> tuple[str, str, int | None]:
    """``(action, answer, appointment id)`` for help, confirm, reschedule and the rest."""
    if intent == "help":
        return "help", help_text(profile), None
    if intent not in ("confirm", "reschedule"):
        return "options", options_text(profile), None
    if target is None or target.appointment_id is None or target.starts_at is None:
        return (
            "no_appointment",
            f"{profile.name} service: we couldn't find an upcoming appointment for this "
            f"number. Please call {spoken_number(profile.phone_number)}.",
            None,
        )
    what = service_names(target.service_codes, profile)
    at = when(target.starts_at, profile)
    if intent == "confirm":
        if await crm.confirm_by_text(conn, appointment_id=target.appointment_id, now=now):
            return (
                "confirmed",
                f"{profile.name} service: thanks, your {what} on {at} is confirmed. See you then!",
                target.appointment_id,
            )
        return (
            "already_confirmed",
            f"{profile.name} service: your {what} on {at} is already confirmed. See you then!",
            target.appointment_id,
        )
    reason = f"text reply R: reschedule appointment {target.appointment_id}"
    attempt = None
    if now.astimezone(profile.time_zone).date() not in profile.holidays:
        attempt = await crm.queue_reschedule_call(
            conn,
            customer_id=target.customer_id,
            appointment_id=target.appointment_id,
            now=now,
            rules=call_rules(profile),
            reason=reason,
        )
    if attempt is not None:
        return (
            "callback_bot",
            f"{profile.name} service: we'll call you shortly to find a new time for your "
            f"{what} on {at}.",
            target.appointment_id,
        )
    await crm_calls.add_callback_request(
        conn, call_sid=sid, customer_id=target.customer_id, phone=phone, reason=reason
    )
    return (
        "callback_advisor",
        f"{profile.name} service: a service advisor will call you to find a new time for "
        f"your {what} on {at}.",
        target.appointment_id,
    )

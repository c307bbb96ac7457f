"""Warm transfer: the advisor hears who is calling and why before being connected.

How (``<Dial><Number url>``, not a conference): the live call is redirected to TwiML that
plays a hold message to the caller and dials the advisor line with
``<Dial action timeout><Number url>``. When the advisor answers, Twilio fetches the
``<Number url>`` (our signed whisper route, :mod:`api.phone`) and plays its ``<Say>`` to the
advisor only, then bridges the two; the caller hears ringback meanwhile. When the dial ends
Twilio posts ``DialCallStatus`` to the ``<Dial action>`` route: no answer, busy or a failure
gets the caller an apology, a callback request with the summary and a polite hang-up.
This needs one REST request and two webhooks and nothing to clean up, where a conference
needs a conference, a participant request for the advisor, hold music, and a conference
that outlives a lost webhook; the bot leaves the call at the redirect either way.

The whisper ("Maria Garcia, 2021 Camry, wants to move Tuesday's oil change; verified") is
written to the call's row before the redirect from the CRM and the bot's reason, and
replaced by the LLM's "summary so far" when that arrives while the line rings.
"""

from __future__ import annotations

import asyncio
import contextlib

from loguru import logger

from bot.i18n import text
from bot.summary import call_facts, llm_available, llm_summary
from core.resources import AppResources
from crm import phone as crm_phone
from crm import vehicles as crm_vehicles
from telephony import twilio as tw
from telephony.twiml import cold_transfer_twiml, warm_transfer_twiml
from tools.context import CallSession

#: Seconds the "summary so far" may take; after that the advisor hears the CRM whisper.
WHISPER_SUMMARY_TIMEOUT_SECS = 8.0
DEFAULT_REASON = "asked for a service advisor"


class AdvisorHandover:
    """The telephony side of ``transfer_to_advisor`` for a Twilio call.

    Implements ``bot.pipeline.CallControl``.

    Args:
        resources: Process resources.
        session: The call's session.
        twilio: REST control of the live call.
    """

    def __init__(
        self, *, resources: AppResources, session: CallSession, twilio: tw.TwilioCallControl
    ) -> None:
        self.resources = resources
        self.session = session
        self.twilio = twilio
        self._tasks: set[asyncio.Task] = set()

    async def transfer(self, number: str) -> None:
        """Hand the caller to the advisor line (warm unless the profile says otherwise).

        Raises:
            Exception: The redirect failed (the bot apologises and ends the call).
        """
        session = self.session
        await tw.mark_handed_off(self.resources.redis, session.call_sid)
        try:
            await self._redirect(number)
        except BaseException:
            await tw.clear_handed_off(self.resources.redis, session.call_sid)
            raise

    async def redirect(self, twiml: str) -> None:
        """Hand the call to other TwiML (the failure policy's Twilio ``<Say>``)."""
        await self.twilio.redirect(twiml)

    async def _redirect(self, number: str) -> None:
        session = self.session
        settings = self.resources.settings
        if not self.resources.profile.phone.warm_transfer:
            await self.twilio.redirect(cold_transfer_twiml(number))
            logger.info(f"call {session.call_sid} redirected to the advisor line (cold)")
            return
        reason = (session.transfer_reason or DEFAULT_REASON).strip()[:200]
        whisper = await self._crm_whisper(reason)
        try:
            async with self.resources.db.connection() as conn:
                await crm_phone.start_transfer(
                    conn,
                    call_sid=session.call_sid,
                    customer_id=session.customer_id,
                    reason=reason,
                    whisper=whisper,
                    number=number,
                )
        except Exception as exc:  # the caller still gets a person, without the whisper
            logger.error(f"call {session.call_sid}: transfer not recorded: {type(exc).__name__}")
            await self.twilio.redirect(cold_transfer_twiml(number))
            return
        twiml = warm_transfer_twiml(
            number=number,
            hold_message=text("hold", session.language),
            whisper_url=tw.public_url(
                settings, f"/twilio/transfer/whisper?call_sid={session.call_sid}"
            ),
            action_url=tw.public_url(settings, "/twilio/transfer/status"),
            ring_secs=self.resources.profile.phone.transfer_ring_secs,
            language=session.language,
        )
        await self.twilio.redirect(twiml)
        logger.info(f"call {session.call_sid} redirected to the advisor line (warm)")
        if llm_available(self.resources):
            task = asyncio.create_task(
                self._summary_whisper(), name=f"whisper-summary-{session.call_sid}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _crm_whisper(self, reason: str) -> str:
        """``<name>, <vehicle>, <reason>; verified`` from the session and the CRM."""
        session = self.session
        name = session.customer_first_name
        vehicle = None
        if session.customer_id is not None:
            try:
                async with self.resources.db.connection() as conn:
                    person = await crm_phone.customer_phone_profile(conn, session.customer_id)
                    if person is not None:
                        name = f"{person.first_name} {person.last_name}"
                    touched = await crm_phone.appointments_brief(
                        conn,
                        customer_id=session.customer_id,
                        appointment_ids=list(session.appointment_ids),
                    )
                    if touched:
                        vehicle = f"{touched[-1].year} {touched[-1].model}"
                    else:
                        owned = await crm_vehicles.list_vehicles(conn, session.customer_id)
                        if len(owned) == 1:
                            vehicle = f"{owned[0].year} {owned[0].model}"
            except Exception as exc:
                logger.warning(f"call {session.call_sid}: whisper facts: {type(exc).__name__}")
        return whisper_text(
            name=name,
            vehicle=vehicle,
            reason=reason,
            verified=session.verified,
            language=session.language,
        )

    async def _summary_whisper(self) -> None:
        session = self.session
        try:
            facts = await call_facts(self.resources, session, so_far=True)
            assert self.resources.clients is not None
            summary = await llm_summary(
                self.resources.clients.openai(),
                model=self.resources.settings.openai_model,
                facts=facts,
                profile=self.resources.profile,
                timeout=WHISPER_SUMMARY_TIMEOUT_SECS,
            )
            whisper = await self._crm_whisper(summary.reason.rstrip(". "))
            async with self.resources.db.connection() as conn:
                await crm_phone.update_transfer_whisper(
                    conn, call_sid=session.call_sid, whisper=whisper
                )
        except Exception as exc:  # the CRM whisper stays
            logger.warning(f"call {session.call_sid}: no summary whisper ({type(exc).__name__})")

    async def wait(self, timeout: float = WHISPER_SUMMARY_TIMEOUT_SECS + 2) -> None:  # noqa: ASYNC109
        """Wait for the summary whisper (then cancel it)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def whisper_text(
    *, name: str | None, vehicle: str | None, reason: str, verified: bool, language: str
) -> str:
    """The sentence the advisor hears before being connected.

    Args:
        name: The customer's full (or first) name, if identified.
        vehicle: ``2021 Camry``, if known.
        reason: What the caller wants.
        verified: Whether the caller passed verification.
        language: The call's language.

    Returns:
        E.g. ``Maria Garcia, 2021 Camry, wants to move Tuesday's oil change; verified.``
    """
    parts = [name or "Unidentified caller"]
    if vehicle:
        parts.append(vehicle)
    parts.append(reason.rstrip(". ") or DEFAULT_REASON)
    sentence = ", ".join(parts) + ("; verified." if verified else "; not verified.")
    if language == "es":
        sentence += " The caller speaks Spanish."
    return sentence[:600]

"""What a caller hears when something fails, and how the call then ends.

The rule: in every failure the caller hears words within about two seconds, and the call
ends in a transfer to an advisor (opening hours), a recorded callback request (after
hours, or when the transfer itself fails) or a goodbye. Words come from our own TTS when
it works, and from Twilio's ``<Say>`` (a REST redirect of the live call) when the TTS is
what failed.

Records the failure leaves behind (callback requests) go through
:class:`core.pending.PendingWrites`, so a database outage delays them instead of losing
them or silencing the caller; the sentence is always queued before any database write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol
from xml.sax.saxutils import escape

from loguru import logger
from pipecat.frames.frames import EndFrame, TTSSpeakFrame

from core.pending import PendingWrites
from core.profile import DealershipProfile
from crm import calls as crm_calls
from tools.context import CallSession
from tools.handoff import is_open

APOLOGY = "I'm sorry, I'm having trouble on my side right now."
TRANSFER_SENTENCE = "I'll connect you with a service advisor now. One moment please."
CALLBACK_AFTER_HOURS = (
    "I'm sorry, I'm having trouble on my side right now, and our advisors are away. "
    "I've asked one to call you back when we open. Goodbye."
)
CALL_BACK_AFTER_HOURS = (
    "I'm sorry, I'm having trouble on my side right now, and our advisors are away. "
    "Please call us back when we open. Goodbye."
)
OUTBOUND_CALL_AGAIN = (
    "I'm sorry, I'm having trouble on my side right now, so we'll call you another time. Goodbye."
)
TRANSFER_FAILED_CALLBACK = (
    "I'm sorry, I couldn't reach an advisor just now. I've asked one to call you back "
    "as soon as possible. Goodbye."
)
TRANSFER_FAILED_CALL_BACK = (
    "I'm sorry, I couldn't reach an advisor just now. Please call us back in a few "
    "minutes. Goodbye."
)
#: How long a dropped TTS socket may take to come back before Twilio speaks instead.
TTS_RECOVERY_SECS = 0.8


class CallRedirect(Protocol):
    """The telephony side a rescue needs (``telephony.twilio.TwilioCallControl``)."""

    async def transfer(self, number: str) -> None:
        """Redirect the live call to ``<Dial>`` the number."""
        ...

    async def redirect(self, twiml: str) -> None:
        """Replace the live call's TwiML; the media stream then ends, with no hang-up."""
        ...


def say_twiml(text: str, *, dial: str | None = None) -> str:
    """TwiML that says ``text`` with Twilio's voice, then dials ``dial`` or hangs up.

    Args:
        text: What to say.
        dial: Number to dial afterwards (E.164); hang up when ``None``.

    Returns:
        The TwiML document.
    """
    then = f"<Dial>{escape(dial)}</Dial>" if dial else "<Hangup/>"
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Say>{escape(text)}</Say>{then}</Response>"
    )


def reachable(session: CallSession) -> bool:
    """Whether an advisor can call this caller back: a real caller ID, or a verified
    customer (whose record has a number)."""
    return crm_calls.callback_number(session.caller_phone) is not None or (
        session.customer_id is not None and session.verified
    )


async def record_callback(
    *,
    pending: PendingWrites | None,
    session: CallSession,
    reason: str,
    now: datetime,
    source: str = "service_failure",
) -> bool:
    """Record a callback request for the call now, or once Postgres is back.

    Args:
        pending: The process's pending writes (``None``: one direct try, errors logged).
        session: The call.
        reason: Why, in short.
        now: When it was asked.
        source: Where it comes from, for the ops console (see ``crm.calls``).

    Returns:
        True when written now, False when queued (or, without ``pending``, lost).
    """

    async def write(conn: Any) -> None:
        await crm_calls.add_callback_request(
            conn,
            call_sid=session.call_sid,
            customer_id=session.customer_id,
            phone=session.caller_phone,
            reason=reason,
            requested_at=now,
            source=source,
        )

    if pending is not None:
        return await pending.write(call_sid=session.call_sid, what="callback request", write=write)
    logger.error(f"call {session.call_sid}: no pending-write queue; callback request not kept")
    return False


class CallRescue:
    """The failure policy of one call.

    Args:
        session: The call.
        profile: Dealership profile (hours, advisor line).
        pending: Pending database writes of the process.
        clock: Current time.
        queue_frames: Queues frames into the call's pipeline.
        transfer_node: Moves the conversation to the transfer node (sentence + redirect).
        call_control: Telephony control, or ``None`` without telephony (browser calls).
        incidents: Where to note what happened (it goes into the call's summary).
    """

    def __init__(
        self,
        *,
        session: CallSession,
        profile: DealershipProfile,
        pending: PendingWrites | None,
        clock: Callable[[], datetime],
        queue_frames: Callable[[list[Any]], Awaitable[None]],
        transfer_node: Callable[[], Awaitable[None]],
        call_control: CallRedirect | None,
        incidents: list[str],
    ) -> None:
        self.session = session
        self.profile = profile
        self.pending = pending
        self.clock = clock
        self._queue_frames = queue_frames
        self._transfer_node = transfer_node
        self.call_control = call_control
        self.incidents = incidents
        self.rescued = False

    @property
    def open_now(self) -> bool:
        """Whether advisors are reachable now."""
        return is_open(self.profile, self.clock())

    async def service_failed(
        self, *, what: str, tts_alive: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """A service failed mid-call (speech recognition, LLM, TTS, a processor).

        Args:
            what: Which service, for the summary and logs.
            tts_alive: For a TTS failure: waits briefly and says whether the TTS is back.
        """
        if self.rescued:
            return
        self.rescued = True
        self.session.outcome = "failed"
        self.incidents.append(f"{what} failed")
        if tts_alive is not None and not await tts_alive():
            await self._say_with_twilio(what)
            return
        if self.open_now:
            # The apology first, then the transfer node's own sentence and the redirect.
            await self._queue_frames([TTSSpeakFrame(APOLOGY)])
            await self._transfer_node()
            return
        # The reason is what the advisors read in their callback list.
        await self._goodbye_after_hours(reason="service failure during call")

    async def database_down_at_start(self, *, hello: str) -> None:
        """Postgres was unreachable as the call started: no CRM, so no conversation.

        Args:
            hello: The greeting's first sentence ("Thanks for calling … service."), or
                "" when it was already said while the database was awaited.
        """
        self.rescued = True
        self.session.outcome = "failed"
        self.incidents.append("database unreachable at call start")
        hello = f"{hello} " if hello else ""
        if self.session.direction == "outbound":
            # We called them; an apology and a goodbye (the campaign tries again later).
            await self._queue_frames([TTSSpeakFrame(hello + OUTBOUND_CALL_AGAIN), EndFrame()])
            return
        if self.open_now:
            await self._queue_frames([TTSSpeakFrame(hello + APOLOGY)])
            await self._transfer_node()
            return
        await self._goodbye_after_hours(
            reason="database unreachable when the call started", hello=hello
        )

    async def transfer_failed(self) -> None:
        """The redirect to the advisor line failed (Twilio REST down): take a callback."""
        self.rescued = True
        self.incidents.append("transfer failed")
        if reachable(self.session):
            self.session.outcome = "callback_requested"
            text = TRANSFER_FAILED_CALLBACK
        else:
            self.session.outcome = "failed"
            text = TRANSFER_FAILED_CALL_BACK
        await self._queue_frames([TTSSpeakFrame(text), EndFrame()])
        await record_callback(
            pending=self.pending,
            session=self.session,
            reason="transfer to an advisor failed",
            now=self.clock(),
            source="transfer_failed",
        )

    async def _goodbye_after_hours(self, *, reason: str, hello: str = "") -> None:
        if reachable(self.session):
            self.session.outcome = "callback_requested"
            text = CALLBACK_AFTER_HOURS
        else:
            text = CALL_BACK_AFTER_HOURS
        await self._queue_frames([TTSSpeakFrame(hello + text), EndFrame()])
        await record_callback(
            pending=self.pending, session=self.session, reason=reason, now=self.clock()
        )

    async def _say_with_twilio(self, what: str) -> None:
        """Our TTS is down: Twilio says the sentence, then dials the advisor or hangs up."""
        sid = self.session.call_sid
        if self.call_control is None:
            logger.error(f"call {sid}: {what} failed and there is no telephony to speak; ending")
            await self._queue_frames([EndFrame()])
            return
        self.incidents.append("sentence said by Twilio")
        if self.open_now:
            twiml = say_twiml(
                f"{APOLOGY} {TRANSFER_SENTENCE}", dial=self.profile.advisor_transfer_number
            )
            self.session.outcome = "transferred"
        else:
            callback = reachable(self.session)
            self.session.outcome = "callback_requested" if callback else "failed"
            twiml = say_twiml(CALLBACK_AFTER_HOURS if callback else CALL_BACK_AFTER_HOURS)
        try:
            await self.call_control.redirect(twiml)
            logger.warning(f"call {sid}: {what} down; Twilio speaks the apology")
        except Exception as exc:
            logger.error(f"call {sid}: could not hand the call to Twilio: {type(exc).__name__}")
            self.session.outcome = "failed"
        if not self.open_now:
            await record_callback(
                pending=self.pending,
                session=self.session,
                reason="service failure during call",
                now=self.clock(),
            )
        await self._queue_frames([EndFrame()])


async def wait_for(event: asyncio.Event, timeout: float) -> bool:  # noqa: ASYNC109
    """Whether ``event`` is set within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True

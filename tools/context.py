"""The per-call context: the session (who is calling, who they proved to be, what the call
has offered) and the tool context (the session plus the process resources a tool may use).

One session per call, created by the telephony layer (or the tool console) with the
caller's number from the carrier, never from the model. Tools read and update it; the
model never supplies a customer id.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from psycopg_pool import AsyncConnectionPool

from core.pending import PendingWrites
from core.profile import DealershipProfile
from core.resources import AppResources
from scheduling.availability import Slot
from scheduling.calendar import Calendar, PostgresCalendar

Direction = Literal["inbound", "outbound"]
VerificationFactor = Literal["caller_id", "date_of_birth", "zip_code", "vin_last4"]


@dataclass
class CallSession:
    """State of one call, shared by the tools, the flow and the processors.

    Attributes:
        call_sid: Twilio CallSid (or a generated id for console/WebRTC sessions).
        caller_phone: The caller's number as reported by the carrier (E.164).
        direction: ``inbound`` or ``outbound``.
        scenario: ``inbound``, ``service_due`` or ``confirmation``.
        customer_id: The CRM customer matched for this call (by caller ID or lookup).
        customer_first_name: First name of the matched customer.
        caller_id_trusted: Whether ``caller_phone`` comes from the carrier and may count
            as a verification factor. False for browser calls, where the caller picks the
            number: it still selects the record, but verification then needs two factors.
        caller_id_matched: Whether the carrier number matched the customer's phone (never
            when ``caller_id_trusted`` is False).
        verified: Whether the caller proved to be ``customer_id``.
        factors: Verification factors that passed so far.
        offered_slots: Slots offered in this call, by opaque slot id.
        appointment_ids: Appointments booked, moved or cancelled in this call.
        outcome: Call outcome for the ``calls`` row.
        flow_node: Current conversation-flow node name (in the call's Redis snapshot).
        transcript: Turns of the conversation, ``{"role": ..., "text": ...}``.
        late_results: Results of writes that finished after the caller interrupted them.
        turn_metrics: Per-turn latency figures for the ``calls`` row.
        pending_action: What the telephony layer must do after the bot's next sentence.
        started_at: When the call started.
        text_consent_asked: Whether the bot was told to ask "Can I text you?" on this call.
        transfer_reason: Why the caller asked for an advisor (whisper, summary).
        language: Language the call is served in (``en``, ``es``).
        do_not_record: The matched customer asked not to be recorded.
    """

    call_sid: str
    caller_phone: str | None
    direction: Direction = "inbound"
    scenario: str = "inbound"
    customer_id: int | None = None
    customer_first_name: str | None = None
    caller_id_trusted: bool = True
    caller_id_matched: bool = False
    verified: bool = False
    factors: set[VerificationFactor] = field(default_factory=set)
    offered_slots: dict[str, Slot] = field(default_factory=dict)
    appointment_ids: list[int] = field(default_factory=list)
    outcome: str | None = None
    flow_node: str | None = None
    transcript: list[dict[str, str]] = field(default_factory=list)
    late_results: list[dict] = field(default_factory=list)
    turn_metrics: list[dict] = field(default_factory=list)
    pending_action: Literal["transfer", "end"] | None = None
    transfer_reason: str | None = None
    language: str = "en"
    do_not_record: bool = False
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    text_consent_asked: bool = False

    def remember_slot(self, slot: Slot) -> str:
        """Store an offered slot and return its opaque id for the model."""
        for slot_id, known in self.offered_slots.items():
            if known == slot:
                return slot_id
        slot_id = f"slot-{secrets.token_hex(3)}"
        self.offered_slots[slot_id] = slot
        return slot_id

    def match_customer(self, *, customer_id: int, first_name: str, caller_id: bool) -> None:
        """Record the CRM customer this call is about; resets verification if it changes.

        Args:
            customer_id: The matched customer.
            first_name: Their first name.
            caller_id: Whether the call's number is the customer's phone; it counts as a
                verification factor only when the session's caller ID is trusted.
        """
        if self.customer_id != customer_id:
            self.verified = False
            self.factors = set()
        self.customer_id = customer_id
        self.customer_first_name = first_name
        self.caller_id_matched = caller_id and self.caller_id_trusted
        if self.caller_id_matched:
            self.factors.add("caller_id")


@dataclass
class ToolContext:
    """What a tool may use: the call's session and the process resources.

    Attributes:
        session: The call's session.
        db: The process's connection pool.
        profile: The dealership's profile.
        calendar: The calendar backend (``None``: no calendar, e.g. in some tests).
        now: Fixed clock for reproducible runs; real time when ``None``.
        pending: Writes that wait out a database outage (``None``: none are queued).
    """

    session: CallSession
    db: AsyncConnectionPool
    profile: DealershipProfile
    calendar: Calendar | None = None
    now: Callable[[], datetime] | None = None
    pending: PendingWrites | None = None


def make_calendar(resources: AppResources) -> Calendar:
    """The calendar backend the settings ask for (Google when configured)."""
    if resources.settings.google_calendar_enabled:
        from scheduling.google_calendar import GoogleCalendar

        return GoogleCalendar.from_settings(resources.settings, resources.profile, resources.db)
    return PostgresCalendar()


def make_tool_context(
    resources: AppResources, session: CallSession, *, now: datetime | None = None
) -> ToolContext:
    """Tool context for one call session.

    Args:
        resources: Process resources.
        session: The call's session.
        now: Fixed "now" for reproducible runs (tests, demos); real time when omitted.

    Returns:
        The context the tools run with.
    """
    return ToolContext(
        session=session,
        db=resources.db,
        profile=resources.profile,
        calendar=make_calendar(resources),
        now=(lambda: now) if now else None,
        pending=resources.pending,
    )

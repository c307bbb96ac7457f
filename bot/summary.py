"""Structured call summaries: reason, outcome, appointments, follow-ups, sentiment, text.

After a call (never on the voice path) :func:`summarize` asks the LLM for one short JSON
completion when the profile allows it (``[phone] llm_summary``) and an OpenAI key is
configured; any failure (an error, a timeout, JSON of the wrong shape) falls back to
:func:`template_summary`, built from the call's facts alone. The same function gives the
warm-transfer whisper its "summary so far" while the advisor line rings.

The model sees the call's facts and transcript (which never holds keypad digits) and is
told to leave out dates of birth, ZIP codes, VINs and phone numbers; nothing of the
summary is logged.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.profile import DealershipProfile
from core.resources import AppResources
from crm import phone as crm_phone
from crm.phone import AppointmentBrief
from scheduling.availability import speakable
from tools.context import CallSession

#: Seconds a post-call summary may take before the template is used.
SUMMARY_TIMEOUT_SECS = 12.0
#: Transcript turns (the latest) and characters per turn the model is shown.
MAX_TURNS = 60
MAX_TURN_CHARS = 500

SCENARIO_REASONS = {
    "inbound": "Inbound call to the service department.",
    "service_due": "Service reminder call: a vehicle is due for service.",
    "confirmation": "Call to confirm an upcoming service appointment.",
}
OUTCOMES = {
    "booked": "An appointment was booked.",
    "rescheduled": "An appointment was moved.",
    "cancelled": "An appointment was cancelled.",
    "confirmed": "The appointment was confirmed.",
    "transferred": "The caller was transferred to a service advisor.",
    "callback_requested": "A callback by an advisor was requested.",
    "info": "The caller got information; nothing was changed.",
    "abandoned": "The caller hung up before anything was done.",
    "failed": "The call failed on our side.",
    "voicemail": "A voicemail was left.",
    "opted_out": "The customer asked not to be called again.",
}


class CallSummary(BaseModel):
    """A call summary (what the LLM must answer, and what the template builds)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    reason: str = Field(min_length=1, max_length=300)
    outcome: str = Field(min_length=1, max_length=300)
    appointments: list[str] = Field(default_factory=list, max_length=10)
    follow_ups: list[str] = Field(default_factory=list, max_length=10)
    sentiment: Literal["positive", "neutral", "negative", "unknown"] = "unknown"
    text: str = Field(min_length=1, max_length=1500)


@dataclass(frozen=True)
class SummaryFacts:
    """What a summary is made of.

    Attributes:
        direction: ``inbound`` or ``outbound``.
        scenario: Call scenario.
        language: Call language.
        outcome: Call outcome (``None`` while the call runs).
        verified: Whether the caller was verified.
        first_name: The identified customer's first name.
        appointments: Appointments booked, moved or cancelled in the call.
        transfer_reason: Why the caller asked for a person.
        callback_requested: Whether an advisor must call back.
        transcript: The conversation's turns.
        so_far: The call is still running (a transfer is ringing).
    """

    direction: str
    scenario: str
    language: str
    outcome: str | None
    verified: bool
    first_name: str | None
    appointments: list[AppointmentBrief]
    transfer_reason: str | None
    callback_requested: bool
    transcript: list[dict[str, Any]]
    so_far: bool = False


def _appointment_line(item: AppointmentBrief, profile: DealershipProfile) -> str:
    services = ", ".join(
        (profile.service(code).spoken_name if profile.service(code) else code)  # type: ignore[union-attr]
        for code in item.service_codes
    )
    return (
        f"{services} for the {item.year} {item.make} {item.model} on "
        f"{speakable(item.starts_at, profile.time_zone)} ({item.status}, "
        f"code {item.confirmation_code})"
    )


def template_summary(facts: SummaryFacts, profile: DealershipProfile) -> CallSummary:
    """A summary from the call's facts alone (no model).

    Args:
        facts: The call's facts.
        profile: Dealership profile (service names, time zone).

    Returns:
        The summary.
    """
    reason = facts.transfer_reason or SCENARIO_REASONS.get(facts.scenario, "Phone call.")
    if facts.so_far:
        outcome = "In progress: the caller is being transferred to an advisor."
    else:
        outcome = OUTCOMES.get(facts.outcome or "", f"Outcome: {facts.outcome}.")
    appointments = [_appointment_line(a, profile) for a in facts.appointments]
    follow_ups = ["Call the customer back."] if facts.callback_requested else []
    who = facts.first_name or "an unidentified caller"
    parts = [
        f"{facts.direction.capitalize()} {facts.scenario.replace('_', ' ')} call with {who} "
        f"({'verified' if facts.verified else 'not verified'}"
        f"{', in Spanish' if facts.language == 'es' else ''}).",
        reason if reason.endswith(".") else reason + ".",
        outcome,
    ]
    if appointments:
        parts.append("Appointments: " + "; ".join(appointments) + ".")
    if follow_ups:
        parts.append("Follow-up: " + " ".join(follow_ups))
    return CallSummary(
        reason=reason[:300],
        outcome=outcome,
        appointments=appointments,
        follow_ups=follow_ups,
        sentiment="unknown",
        text=" ".join(parts)[:1500],
    )


_INSTRUCTIONS = (
    "You summarise phone calls between a car dealership's AI service assistant and a "
    "customer, for the service advisors. Answer with one JSON object with exactly these "
    'keys: "reason" (why the customer called, one short sentence), "outcome" (what '
    'happened, one short sentence), "appointments" (a list: each appointment made or '
    'changed, one short phrase each, empty if none), "follow_ups" (a list: what staff must '
    'still do, empty if nothing), "sentiment" ("positive", "neutral", "negative" or '
    '"unknown": how the customer felt), "text" (one paragraph of at most four sentences). '
    "Write in English whatever the call's language. Use only the facts and the transcript "
    "given. Never include dates of birth, ZIP codes, VINs or phone numbers."
)
_SO_FAR = (
    " The call is still in progress: the customer is being transferred to an advisor right "
    'now. Summarise the call so far; "reason" is what the advisor hears before picking up, '
    "so it says what the customer wants in at most fifteen words, starting with a verb "
    '(e.g. "wants to move Tuesday\'s oil change").'
)


def _facts_json(facts: SummaryFacts, profile: DealershipProfile) -> str:
    turns = [
        {"role": t.get("role"), "text": str(t.get("text", ""))[:MAX_TURN_CHARS]}
        for t in facts.transcript[-MAX_TURNS:]
        if isinstance(t, dict)
    ]
    return json.dumps(
        {
            "direction": facts.direction,
            "scenario": facts.scenario,
            "language": facts.language,
            "outcome": None if facts.so_far else facts.outcome,
            "customer_verified": facts.verified,
            "customer_first_name": facts.first_name,
            "appointments_made_or_changed": [
                _appointment_line(a, profile) for a in facts.appointments
            ],
            "transfer_reason": facts.transfer_reason,
            "callback_requested": facts.callback_requested,
            "transcript": turns,
        },
        ensure_ascii=False,
    )


async def llm_summary(
    client: Any,
    *,
    model: str,
    facts: SummaryFacts,
    profile: DealershipProfile,
    timeout: float = SUMMARY_TIMEOUT_SECS,  # noqa: ASYNC109
) -> CallSummary:
    """Ask the LLM for the summary (one non-streaming JSON completion, no retries).

    Args:
        client: ``AsyncOpenAI`` client.
        model: Chat Completions model.
        facts: The call's facts.
        profile: Dealership profile.
        timeout: Seconds before giving up.

    Returns:
        The summary.

    Raises:
        Exception: Any failure (HTTP, timeout, JSON, shape); callers fall back.
    """
    instructions = _INSTRUCTIONS + (_SO_FAR if facts.so_far else "")
    completion = await asyncio.wait_for(
        client.with_options(max_retries=0, timeout=timeout).chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": instructions},
                {"role": "user", "content": _facts_json(facts, profile)},
            ],
            response_format={"type": "json_object"},
            temperature=0.2,
            max_tokens=500,
            stream=False,
        ),
        timeout,
    )
    content = completion.choices[0].message.content or ""
    return CallSummary.model_validate(json.loads(content))


async def call_facts(
    resources: AppResources,
    session: CallSession,
    *,
    so_far: bool = False,
    callback_requested: bool = False,
) -> SummaryFacts:
    """The facts of a call for its summary (appointments read from the CRM)."""
    appointments: list[AppointmentBrief] = []
    if session.appointment_ids and session.verified:
        try:
            async with resources.db.connection() as conn:
                appointments = await crm_phone.appointments_brief(
                    conn,
                    customer_id=session.customer_id,
                    appointment_ids=list(session.appointment_ids),
                )
        except Exception as exc:
            logger.warning(f"call {session.call_sid}: appointments unread: {type(exc).__name__}")
    return SummaryFacts(
        direction=session.direction,
        scenario=session.scenario,
        language=session.language,
        outcome=session.outcome,
        verified=session.verified,
        first_name=session.customer_first_name if session.customer_id else None,
        appointments=appointments,
        transfer_reason=session.transfer_reason,
        callback_requested=callback_requested or session.outcome == "callback_requested",
        transcript=list(session.transcript),
        so_far=so_far,
    )


def llm_available(resources: AppResources) -> bool:
    """Whether summaries may use the LLM (profile switch and an OpenAI key)."""
    return bool(
        resources.profile.phone.llm_summary
        and resources.settings.openai_api_key is not None
        and resources.clients is not None
    )


async def summarize(
    resources: AppResources,
    facts: SummaryFacts,
    *,
    call_sid: str,
    timeout: float = SUMMARY_TIMEOUT_SECS,  # noqa: ASYNC109
) -> tuple[CallSummary, str]:
    """The call's summary and its source (``llm``, or ``template`` on any failure).

    Args:
        resources: Process resources (shared OpenAI client, settings, profile).
        facts: The call's facts.
        call_sid: The call (for the log).
        timeout: Seconds the LLM may take.

    Returns:
        ``(summary, source)``.
    """
    profile = resources.profile
    if llm_available(resources):
        assert resources.clients is not None
        try:
            summary = await llm_summary(
                resources.clients.openai(),
                model=resources.settings.openai_model,
                facts=facts,
                profile=profile,
                timeout=timeout,
            )
            return summary, "llm"
        except (TimeoutError, ValidationError, ValueError, KeyError, IndexError) as exc:
            logger.warning(f"call {call_sid}: LLM summary unusable ({type(exc).__name__})")
        except Exception as exc:  # the API failed: the template will do
            logger.warning(f"call {call_sid}: LLM summary failed ({type(exc).__name__})")
    return template_summary(facts, profile), "template"

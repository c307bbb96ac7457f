"""System prompt templates for the three call scenarios, and the fixed greetings.

Templates are plain text with ``$name`` placeholders (:class:`string.Template`), rendered
with the dealership profile and the call's facts. The greeting is fixed text, not model
output, so the AI disclosure (and the recording notice) is always said.
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from string import Template

from core.profile import WEEKDAYS, DealershipProfile
from tools.context import CallSession

SCENARIOS = ("inbound", "service_due", "confirmation")


def _hours(profile: DealershipProfile) -> str:
    parts = []
    for day in WEEKDAYS:
        ranges = profile.hours.get(day, ())
        if ranges:
            spans = " and ".join(f"{r.start:%-I:%M %p} to {r.end:%-I:%M %p}" for r in ranges)
            parts.append(f"{day.capitalize()} {spans}")
        else:
            parts.append(f"{day.capitalize()} closed")
    return "; ".join(parts)


def render_system_prompt(
    scenario: str, *, profile: DealershipProfile, session: CallSession, now: datetime
) -> str:
    """Render the system prompt of a scenario.

    Args:
        scenario: ``inbound``, ``service_due`` or ``confirmation``.
        profile: Dealership profile.
        session: The call's session (first name only, when caller ID matched).
        now: Current time (aware).

    Returns:
        The prompt text.

    Raises:
        ValueError: Unknown scenario.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    text = resources.files("bot.prompts").joinpath(f"{scenario}.md").read_text(encoding="utf-8")
    local = now.astimezone(profile.time_zone)
    if session.caller_id_matched and session.customer_first_name:
        caller_line = (
            f"Caller ID matches the customer record of {session.customer_first_name}; "
            "they still need one verification factor."
        )
    else:
        caller_line = "Caller ID did not match a customer record; find them with lookup_customer."
    services = ", ".join(
        f"{s.spoken_name} ({s.code}, about {s.duration_minutes} minutes"
        + (f", ${s.price_min} to ${s.price_max})" if s.price_max else ", no charge)")
        for s in profile.services.values()
    )
    return Template(text).substitute(
        dealership=profile.name,
        today=f"{local:%A}, {local:%B} {local.day}, {local.year}",
        time_now=f"{local:%-I:%M %p}",
        time_zone=str(profile.time_zone),
        caller_line=caller_line,
        services=services,
        hours=_hours(profile),
    )


def greeting(scenario: str, *, profile: DealershipProfile, session: CallSession) -> str:
    """The fixed first sentence(s) of a call, with the AI (and recording) disclosure.

    Args:
        scenario: Call scenario.
        profile: Dealership profile.
        session: The call's session.

    Returns:
        Text for the TTS.
    """
    recorded = " This call is recorded." if profile.recording_enabled else ""
    name = session.customer_first_name if session.caller_id_matched else None
    if scenario == "inbound":
        hello = f"Hi {name}, thanks" if name else "Thanks"
        return (
            f"{hello} for calling {profile.name} service. I'm the dealership's AI "
            f"assistant.{recorded} How can I help you today?"
        )
    who = f"Hi, this is the AI assistant from {profile.name} service.{recorded}"
    if name:
        return f"{who} Am I speaking with {name}?"
    return f"{who} Who am I speaking with?"

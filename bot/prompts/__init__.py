"""System prompt templates for the three call scenarios, and the fixed greetings.

Templates are plain text with ``$name`` placeholders (:class:`string.Template`), rendered
with the dealership profile and the call's facts, in the call's language
(``<scenario>.md`` in English, ``<scenario>.es.md`` in Spanish). The greeting is fixed
text, not model output, so the AI disclosure (and the recording notice) is always said.
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from string import Template

from bot.i18n import text
from core.profile import WEEKDAYS, DealershipProfile
from tools.context import CallSession

SCENARIOS = ("inbound", "service_due", "confirmation")
_SPANISH_WEEKDAYS = ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo")
_SPANISH_MONTHS = (
    "enero",
    "febrero",
    "marzo",
    "abril",
    "mayo",
    "junio",
    "julio",
    "agosto",
    "septiembre",
    "octubre",
    "noviembre",
    "diciembre",
)


def _hours(profile: DealershipProfile, language: str = "en") -> str:
    parts = []
    for index, day in enumerate(WEEKDAYS):
        ranges = profile.hours.get(day, ())
        if language == "es":
            name = _SPANISH_WEEKDAYS[index]
            if ranges:
                spans = " y ".join(f"de {r.start:%H:%M} a {r.end:%H:%M}" for r in ranges)
                parts.append(f"{name} {spans}")
            else:
                parts.append(f"{name} cerrado")
        elif ranges:
            spans = " and ".join(f"{r.start:%-I:%M %p} to {r.end:%-I:%M %p}" for r in ranges)
            parts.append(f"{day.capitalize()} {spans}")
        else:
            parts.append(f"{day.capitalize()} closed")
    return "; ".join(parts)


def _today(local: datetime, language: str) -> str:
    if language == "es":
        return (
            f"{_SPANISH_WEEKDAYS[local.weekday()]} {local.day} de "
            f"{_SPANISH_MONTHS[local.month - 1]} de {local.year}"
        )
    return f"{local:%A}, {local:%B} {local.day}, {local.year}"


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
    language = session.language if session.language in ("en", "es") else "en"
    suffix = "" if language == "en" else f".{language}"
    template = (
        resources.files("bot.prompts")
        .joinpath(f"{scenario}{suffix}.md")
        .read_text(encoding="utf-8")
    )
    local = now.astimezone(profile.time_zone)
    if session.caller_id_matched and session.customer_first_name:
        caller_line = (
            f"Caller ID matches the customer record of {session.customer_first_name}; "
            "they still need one verification factor."
        )
        if language == "es":
            caller_line = (
                f"El número coincide con el registro de {session.customer_first_name}; "
                "aún falta un dato de verificación."
            )
    elif language == "es":
        caller_line = "El número no coincide con ningún cliente; búscalo con lookup_customer."
    else:
        caller_line = "Caller ID did not match a customer record; find them with lookup_customer."
    services = ", ".join(
        f"{s.spoken_name} ({s.code}, about {s.duration_minutes} minutes"
        + (f", ${s.price_min} to ${s.price_max})" if s.price_max else ", no charge)")
        for s in profile.services.values()
    )
    time_now = f"{local:%-I:%M %p}" if language == "en" else f"{local:%H:%M}"
    return Template(template).substitute(
        dealership=profile.name,
        today=_today(local, language),
        time_now=time_now,
        time_zone=str(profile.time_zone),
        caller_line=caller_line,
        services=services,
        hours=_hours(profile, language),
    )


def greeting(scenario: str, *, profile: DealershipProfile, session: CallSession) -> str:
    """The fixed first sentence(s) of a call, with the AI (and recording) disclosure.

    In the call's language. The recording notice is said when the call will be recorded
    (the profile records and the customer matched by caller ID is not on the do-not-record
    list); an English inbound greeting offers Spanish on key 9 when the profile offers it.

    Args:
        scenario: Call scenario.
        profile: Dealership profile.
        session: The call's session.

    Returns:
        Text for the TTS.
    """
    language = session.language if session.language in ("en", "es") else "en"
    records = profile.recording_enabled and not session.do_not_record
    recorded = text("recorded", language) if records else ""
    name = session.customer_first_name if session.caller_id_matched else None
    if language == "es":
        if scenario == "inbound":
            hello = f"Hola {name}, gracias" if name else "Gracias"
            return (
                f"{hello} por llamar al servicio de {profile.name}. Soy el asistente de "
                f"inteligencia artificial del concesionario.{recorded} ¿En qué le puedo ayudar?"
            )
        who = (
            f"Hola, le habla el asistente de inteligencia artificial del servicio de "
            f"{profile.name}.{recorded}"
        )
        return f"{who} ¿Hablo con {name}?" if name else f"{who} ¿Con quién hablo?"
    if scenario == "inbound":
        hello = f"Hi {name}, thanks" if name else "Thanks"
        offer = text("spanish_offer", "en") if "es" in profile.phone.languages else ""
        return (
            f"{hello} for calling {profile.name} service. I'm the dealership's AI "
            f"assistant.{recorded} How can I help you today?{offer}"
        )
    who = f"Hi, this is the AI assistant from {profile.name} service.{recorded}"
    if name:
        return f"{who} Am I speaking with {name}?"
    return f"{who} Who am I speaking with?"

"""The bot's fixed sentences in each language, and Spanish read-backs of tool results.

English is the language of the code: tools and the flow produce English sentences and
``when`` labels (``Tuesday, November 25 at 9:00 AM``). A call served in Spanish gets the
Spanish version of every fixed sentence (:func:`translator`, used by the TTS-side
:class:`processors.fixed_speech.FixedSpeechTranslator`) and Spanish date and time labels
in the tool results the model reads back (:func:`localize_result`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from core.profile import DealershipProfile

#: Language code -> the language's own name (used in prompts and logs).
LANGUAGE_NAMES = {"en": "English", "es": "español"}

_TEXTS: dict[str, dict[str, str]] = {
    "hold": {
        "en": "Please hold while I connect you with a service advisor.",
        "es": "Por favor, espere mientras le comunico con un asesor de servicio.",
    },
    "transfer": {
        "en": "I'll connect you with a service advisor now. One moment please.",
        "es": "Le comunico ahora con un asesor de servicio. Un momento, por favor.",
    },
    "no_answer": {
        "en": "I'm sorry, no advisor could take your call right now. I've asked one to call "
        "you back on this number. Goodbye.",
        "es": "Lo siento, ningún asesor pudo atender su llamada en este momento. Le pedí a "
        "uno que le devuelva la llamada a este número. Adiós.",
    },
    "voicemail": {
        "en": "Hi, this is the AI assistant from {name} service, calling about your vehicle. "
        "Please call us back at {number}. Again, that's {number}. Thank you.",
        "es": "Hola, le habla el asistente de inteligencia artificial del servicio de {name}, "
        "sobre su vehículo. Por favor, devuélvanos la llamada al {number}. Repito, "
        "{number}. Gracias.",
    },
    "recorded": {"en": " This call is recorded.", "es": " Esta llamada se graba."},
    "spanish_offer": {"en": " Para español, oprima nueve.", "es": ""},
    "switched": {
        "en": "Sure, I'll continue in English.{recorded} How can I help you?",
        "es": "Con gusto le atiendo en español.{recorded} ¿En qué le puedo ayudar?",
    },
    "apology_transfer": {
        "en": "I'm sorry, I'm having trouble on my side right now.",
        "es": "Lo siento, estoy teniendo problemas técnicos en este momento.",
    },
    "apology_callback": {
        "en": "I'm sorry, I'm having trouble on my side right now, and our advisors are away. "
        "I've asked one to call you back when we open. Goodbye.",
        "es": "Lo siento, estoy teniendo problemas técnicos y nuestros asesores no están "
        "disponibles. Le pedí a uno que le devuelva la llamada cuando abramos. Adiós.",
    },
    "call_back_after_hours": {
        "en": "I'm sorry, I'm having trouble on my side right now, and our advisors are away. "
        "Please call us back when we open. Goodbye.",
        "es": "Lo siento, estoy teniendo problemas técnicos y nuestros asesores no están "
        "disponibles. Por favor, llámenos cuando abramos. Adiós.",
    },
    "outbound_call_again": {
        "en": "I'm sorry, I'm having trouble on my side right now, so we'll call you another "
        "time. Goodbye.",
        "es": "Lo siento, estoy teniendo problemas técnicos, así que le llamaremos en otro "
        "momento. Adiós.",
    },
    "transfer_failed_callback": {
        "en": "I'm sorry, I couldn't reach an advisor just now. I've asked one to call you "
        "back as soon as possible. Goodbye.",
        "es": "Lo siento, no pude comunicarle con un asesor. Le pedí a uno que le devuelva "
        "la llamada lo antes posible. Adiós.",
    },
    "transfer_failed_call_back": {
        "en": "I'm sorry, I couldn't reach an advisor just now. Please call us back in a few "
        "minutes. Goodbye.",
        "es": "Lo siento, no pude comunicarle con un asesor. Por favor, llámenos en unos "
        "minutos. Adiós.",
    },
    "one_moment": {"en": "One moment, please.", "es": "Un momento, por favor."},
    "tool_ack": {"en": "Let me check.", "es": "Déjeme revisar."},
    "idle_prompt": {"en": "Are you still there?", "es": "¿Sigue ahí?"},
    "idle_goodbye": {
        "en": "I haven't heard anything, so I'll let you go. Please call back any time. Goodbye.",
        "es": "No le escucho, así que voy a colgar. Llámenos cuando quiera. Adiós.",
    },
    "goodbye": {
        "en": "Thank you for calling {name}. Goodbye!",
        "es": "Gracias por llamar a {name}. ¡Adiós!",
    },
    "opted_out": {
        "en": "Understood. We won't call you again. Have a good day.",
        "es": "Entendido. No le volveremos a llamar. Que tenga un buen día.",
    },
    "keypad_not_understood": {
        "en": "Sorry, I didn't get that entry.",
        "es": "Perdón, no entendí lo que marcó.",
    },
}


def text(key: str, language: str, **values: str) -> str:
    """A fixed sentence in ``language`` (English when there is no translation).

    Args:
        key: Sentence key (e.g. ``hold``).
        language: ``en`` or ``es``.
        **values: Placeholder values (``name``, ``number``).

    Returns:
        The sentence.
    """
    versions = _TEXTS[key]
    return versions.get(language, versions["en"]).format(**values)


#: Fixed English sentences the pipeline, the flow and the tools speak word for word (the
#: keys of :func:`translator`), by the key of their translation.
FIXED_SENTENCES = (
    "transfer",
    "apology_transfer",
    "apology_callback",
    "call_back_after_hours",
    "outbound_call_again",
    "transfer_failed_callback",
    "transfer_failed_call_back",
    "one_moment",
    "tool_ack",
    "idle_prompt",
    "idle_goodbye",
    "goodbye",
    "opted_out",
)


def translator(
    profile: DealershipProfile, language: Callable[[], str]
) -> Callable[[str], str | None]:
    """The translation of a fixed English sentence into the call's current language.

    Args:
        profile: Dealership profile (its name is in some sentences).
        language: The call's current language.

    Returns:
        ``translate(text)``: the translation, or ``None`` to speak ``text`` as it is.
    """
    catalog = {key: text(key, "en", name=profile.name) for key in FIXED_SENTENCES}
    by_text = {english.strip(): key for key, english in catalog.items()}

    def translate(spoken: str) -> str | None:
        current = language()
        if current == "en":
            return None
        key = by_text.get(spoken.strip())
        return text(key, current, name=profile.name) if key else None

    return translate


# --- Spanish read-backs of dates and times -------------------------------------------------

_DAYS = {
    "Monday": "lunes",
    "Tuesday": "martes",
    "Wednesday": "miércoles",
    "Thursday": "jueves",
    "Friday": "viernes",
    "Saturday": "sábado",
    "Sunday": "domingo",
}
_MONTHS = {
    "January": "enero",
    "February": "febrero",
    "March": "marzo",
    "April": "abril",
    "May": "mayo",
    "June": "junio",
    "July": "julio",
    "August": "agosto",
    "September": "septiembre",
    "October": "octubre",
    "November": "noviembre",
    "December": "diciembre",
}
_WHEN_RE = re.compile(
    r"(?P<day>[A-Z][a-z]+), (?P<month>[A-Z][a-z]+) (?P<date>\d{1,2}) at "
    r"(?P<hour>\d{1,2}):(?P<minute>\d{2}) (?P<ampm>AM|PM)"
)


def spanish_when(label: str) -> str:
    """``Tuesday, November 25 at 9:00 AM`` -> ``martes 25 de noviembre a las 9:00 de la
    mañana`` (labels of another shape are returned unchanged)."""

    def one(match: re.Match[str]) -> str:
        day = _DAYS.get(match["day"])
        month = _MONTHS.get(match["month"])
        if day is None or month is None:
            return match[0]
        hour12 = int(match["hour"])
        hour24 = hour12 % 12 + (12 if match["ampm"] == "PM" else 0)
        part = "de la mañana" if hour24 < 12 else "de la tarde" if hour24 < 19 else "de la noche"
        article = "a la" if hour12 == 1 else "a las"
        return f"{day} {match['date']} de {month} {article} {hour12}:{match['minute']} {part}"

    return _WHEN_RE.sub(one, label)


def localize_result(result: Any, language: str) -> Any:
    """A tool result with its ``when`` labels in ``language`` (a copy; English unchanged).

    Args:
        result: The tool's JSON result (dicts and lists).
        language: The call's language.

    Returns:
        The result to give the model.
    """
    if language != "es":
        return result
    if isinstance(result, dict):
        return {
            key: spanish_when(value)
            if key == "when" and isinstance(value, str)
            else localize_result(value, language)
            for key, value in result.items()
        }
    if isinstance(result, list):
        return [localize_result(item, language) for item in result]
    return result

"""The phone feature processors: language detection, verification watch, fixed speech."""

from __future__ import annotations

from pipecat.frames.frames import (
    FunctionCallResultFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TextFrame,
    TranscriptionFrame,
    TTSSpeakFrame,
)
from pipecat.tests.utils import run_test
from pipecat.transcriptions.language import Language

from bot.i18n import FIXED_SENTENCES, localize_result, spanish_when, text, translator
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from processors.fixed_speech import FixedSpeechTranslator
from processors.language_detect import LanguageDetector, base_language
from processors.verification_watch import VerificationWatcher

PROFILE = load_profile(DEFAULT_PROFILE)


def heard(text_: str, language: Language | str | None) -> TranscriptionFrame:
    return TranscriptionFrame(text_, "caller", "2026-11-30T10:00:00Z", language)


async def test_the_first_words_decide_the_language_once() -> None:
    switched: list[str] = []
    state = {"language": "en"}

    async def on_language(language: str):
        switched.append(language)
        state["language"] = language
        return [TextFrame("settings for " + language)]

    detector = LanguageDetector(
        on_language=on_language, current=lambda: state["language"], offered=("en", "es")
    )
    frames = [
        heard("Sí", Language.ES),  # one word decides nothing
        heard("Hola, necesito una cita", Language.ES),
        heard("The Camry, please", Language.EN),  # later turns never switch back
    ]
    down, _ = await run_test(detector, frames_to_send=frames)
    assert switched == ["es"] and detector.decided == "es"
    texts = [f.text for f in down if isinstance(f, TextFrame)]
    assert texts == ["Sí", "settings for es", "Hola, necesito una cita", "The Camry, please"]


async def test_no_switch_to_a_language_not_offered_or_already_spoken() -> None:
    calls: list[str] = []

    async def on_language(language: str):
        calls.append(language)
        return None

    for first in (heard("Bonjour, je voudrais", "fr"), heard("Hello there, hi", Language.EN_US)):
        detector = LanguageDetector(
            on_language=on_language, current=lambda: "en", offered=("en", "es")
        )
        await run_test(detector, frames_to_send=[first, heard("Hola, buenos días", "es")])
    assert calls == []
    assert base_language(Language.ES_US) == "es" and base_language("es-419") == "es"
    assert base_language(None) is None and base_language("") is None


async def test_factor_prompts_and_verify_results_are_noticed() -> None:
    events: list[object] = []
    verified = {"value": False}

    async def on_prompt():
        events.append("prompt")

    async def on_result(result):
        events.append(result)

    watcher = VerificationWatcher(
        on_factor_prompt=on_prompt, on_verify_result=on_result, active=lambda: not verified["value"]
    )

    def reply(*pieces: str):
        return [LLMFullResponseStartFrame(), *map(LLMTextFrame, pieces), LLMFullResponseEndFrame()]

    frames = [
        *reply("Sure, what's your ", "ZIP", " code or date of ", "birth?"),  # one event
        *reply("Happy to help with your oil change."),
        *reply("¿Me da su fecha de ", "nacimiento?"),
        FunctionCallResultFrame(
            function_name="verify_customer",
            tool_call_id="call_1",
            arguments={},
            result={"ok": True, "verified": True},
        ),
        FunctionCallResultFrame(
            function_name="check_availability", tool_call_id="call_2", arguments={}, result={}
        ),
    ]
    down, _ = await run_test(watcher, frames_to_send=frames)
    assert events == ["prompt", "prompt", {"ok": True, "verified": True}]
    assert len([f for f in down if isinstance(f, LLMTextFrame)]) == 7
    # Once verified, asking about a VIN is not a verification prompt.
    verified["value"] = True
    events.clear()
    await run_test(watcher, frames_to_send=reply("The VIN ends in the same four."))
    assert events == []


async def test_fixed_sentences_are_spoken_in_the_calls_language() -> None:
    state = {"language": "es"}
    translate = translator(PROFILE, lambda: state["language"])
    speaker = FixedSpeechTranslator(translate=translate)
    frames = [
        TTSSpeakFrame(text("transfer", "en")),
        TTSSpeakFrame("Thank you for calling Riverside Motors. Goodbye!"),
        TTSSpeakFrame("Something the model said."),
    ]
    down, _ = await run_test(speaker, frames_to_send=frames)
    spoken = [f.text for f in down if isinstance(f, TTSSpeakFrame)]
    assert spoken == [
        "Le comunico ahora con un asesor de servicio. Un momento, por favor.",
        "Gracias por llamar a Riverside Motors. ¡Adiós!",
        "Something the model said.",
    ]
    state["language"] = "en"
    assert translate(text("transfer", "en")) is None


def test_the_catalog_matches_the_sentences_the_code_speaks() -> None:
    from bot import call, failures
    from processors import dead_air
    from tools import handoff, outbound

    english = {text(key, "en", name=PROFILE.name) for key in FIXED_SENTENCES}
    assert {
        failures.APOLOGY,
        failures.TRANSFER_SENTENCE,
        failures.CALLBACK_AFTER_HOURS,
        failures.CALL_BACK_AFTER_HOURS,
        failures.OUTBOUND_CALL_AGAIN,
        failures.TRANSFER_FAILED_CALLBACK,
        failures.TRANSFER_FAILED_CALL_BACK,
        call.IDLE_PROMPT,
        call.IDLE_GOODBYE,
    } <= english
    assert dead_air.HOLD_PHRASE in english
    import inspect

    for module in (handoff, outbound):
        source = inspect.getsource(module)
        spoken = [s for s in english if s.replace(PROFILE.name, "{ctx.profile.name}") in source]
        assert spoken, module.__name__
    assert all(
        text(key, "es", name=PROFILE.name) != text(key, "en", name=PROFILE.name)
        for key in FIXED_SENTENCES
    )


def test_spanish_read_backs_of_dates_and_times() -> None:
    assert spanish_when("Tuesday, November 25 at 9:00 AM") == (
        "martes 25 de noviembre a las 9:00 de la mañana"
    )
    assert spanish_when("Saturday, January 3 at 1:30 PM") == (
        "sábado 3 de enero a la 1:30 de la tarde"
    )
    assert spanish_when("tomorrow") == "tomorrow"
    result = {
        "ok": True,
        "slots": [{"slot_id": "slot-1", "when": "Friday, May 1 at 7:00 PM"}],
        "say": "Pick one.",
    }
    assert localize_result(result, "es") == {
        "ok": True,
        "slots": [{"slot_id": "slot-1", "when": "viernes 1 de mayo a las 7:00 de la noche"}],
        "say": "Pick one.",
    }
    assert localize_result(result, "en") is result

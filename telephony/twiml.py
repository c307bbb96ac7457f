"""TwiML documents of the phone features, built with the twilio library's ``VoiceResponse``.

* Warm transfer: the caller hears a hold message, then ringback while the advisor line is
  dialed with ``<Dial action=... timeout=...><Number url=...>``. When the advisor
  answers, Twilio fetches the ``<Number url>`` (our signed whisper route) and plays its
  TwiML to the advisor only, before bridging the two. When the dial ends, Twilio posts
  ``DialCallStatus`` to the ``<Dial action>`` URL and plays what it answers to the caller.
* Voicemail: a message and a hang-up, after the beep (asynchronous AMD redirects the
  live call to it).
"""

from __future__ import annotations

from twilio.twiml.voice_response import Dial, VoiceResponse

#: Call language -> ``<Say language>``.
SAY_LANGUAGES = {"en": "en-US", "es": "es-MX"}


def say_language(language: str) -> str:
    """The ``<Say language>`` of a call language (English for anything unknown)."""
    return SAY_LANGUAGES.get(language, "en-US")


def warm_transfer_twiml(
    *,
    number: str,
    hold_message: str,
    whisper_url: str,
    action_url: str,
    ring_secs: int,
    language: str = "en",
) -> str:
    """Hold message, then dial the advisor with a whisper and an action callback.

    Args:
        number: Advisor line (E.164).
        hold_message: What the caller hears before the ringback.
        whisper_url: Signed route whose TwiML Twilio plays to the advisor on answer.
        action_url: Route Twilio posts ``DialCallStatus`` to when the dial ends.
        ring_secs: Seconds the advisor line may ring (``<Dial timeout>``).
        language: Call language (of the hold message).

    Returns:
        The TwiML document.
    """
    response = VoiceResponse()
    response.say(hold_message, language=say_language(language))
    # Built here rather than by response.dial(), which the twilio library leaves
    # unannotated (its return type is inferred as TwiML | str).
    dial = Dial(action=action_url, method="POST", timeout=ring_secs)
    dial.number(number, url=whisper_url, method="POST")
    response.append(dial)
    return str(response)


def cold_transfer_twiml(number: str) -> str:
    """A plain ``<Dial>`` of the advisor line (``[phone] warm_transfer = false``)."""
    response = VoiceResponse()
    response.dial(number)
    return str(response)


def say_twiml(text: str, *, language: str = "en", hang_up: bool = False) -> str:
    """``<Say>`` a text (to whoever the TwiML runs for), optionally then ``<Hangup/>``.

    Args:
        text: What to say.
        language: Call language.
        hang_up: End the call after the text.

    Returns:
        The TwiML document.
    """
    response = VoiceResponse()
    response.say(text, language=say_language(language))
    if hang_up:
        response.hangup()
    return str(response)


def hang_up_twiml() -> str:
    """``<Hangup/>``."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def spoken_digits(number: str) -> str:
    """A North American number read digit by digit, in groups: ``5 5 5, 5 5 5, 0 1 9 9``.

    Args:
        number: E.164 number (``+1`` is dropped for NANP numbers).

    Returns:
        The digits separated by spaces, groups by commas (a pause on the phone).
    """
    digits = "".join(ch for ch in number if ch.isdigit())
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    groups = [digits[:3], digits[3:6], digits[6:]] if len(digits) == 10 else [digits]
    return ", ".join(" ".join(group) for group in groups if group)

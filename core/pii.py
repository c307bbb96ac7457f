"""Masking helpers: no phone number, name, date of birth or VIN goes into log text as is."""

from __future__ import annotations

import re
from typing import Any


def mask_phone(phone: str | None) -> str:
    """Mask a phone number, keeping the country code and the last 4 digits.

    Args:
        phone: A phone number, ideally E.164.

    Returns:
        e.g. ``+1***…4567``; ``<none>`` for an empty value.
    """
    if not phone:
        return "<none>"
    digits = phone.strip()
    if digits.startswith("+1") and len(digits) > 6:
        return f"+1***…{digits[-4:]}"
    if digits.startswith("+") and len(digits) > 6:
        return f"{digits[:2]}***…{digits[-4:]}"
    return "***"


def mask_vin(vin: str | None) -> str:
    """Mask a VIN down to its last 4 characters (``…1234``)."""
    return f"…{vin[-4:]}" if vin else "<none>"


def mask_name(name: str | None) -> str:
    """Mask a name down to its initial (``J.``)."""
    return f"{name.strip()[0]}." if name and name.strip() else "<none>"


# --- free text and structured values (the ops console, stored tool calls) ------------------

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_UNIT = r"(?:one|two|three|four|five|six|seven|eight|nine)"
_TEEN = r"(?:ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|eighteen|nineteen)"
_TENS = r"(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)"
_ORDINAL_UNIT = r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth)"
_DAY_WORD = (
    rf"(?:{_ORDINAL_UNIT}|tenth|eleventh|twelfth|thirteenth|fourteenth|fifteenth|sixteenth|"
    rf"seventeenth|eighteenth|nineteenth|twentieth|thirtieth|(?:twenty|thirty)[\s-]+"
    rf"{_ORDINAL_UNIT}|{_UNIT}|{_TEEN}|twenty(?:[\s-]+{_UNIT})?|thirty(?:[\s-]+one)?)"
)
_DAY = rf"(?:\d{{1,2}}(?:st|nd|rd|th)?|{_DAY_WORD})"
#: A year said in words: "nineteen eighty-five", "two thousand three", "twenty twenty".
_YEAR_WORDS = (
    rf"(?:(?:nineteen|twenty)[\s-]+(?:oh[\s-]+{_UNIT}|{_TEEN}|{_TENS}(?:[\s-]+{_UNIT})?|"
    rf"hundred)|two[\s-]+thousand(?:[\s-]+(?:and[\s-]+)?(?:{_TEEN}|{_UNIT}|twenty(?:[\s-]+"
    rf"{_UNIT})?))?)"
)
_YEAR = rf"(?:(?:19|20)\d{{2}}|{_YEAR_WORDS})"
_DATE_PATTERNS = (
    # 1985-04-12, 1985/4/12
    r"\b(?:19|20)\d{2}[-/.]\d{1,2}[-/.]\d{1,2}\b",
    # 04/12/1985, 4-12-85
    r"\b\d{1,2}[-/.]\d{1,2}[-/.](?:(?:19|20)\d{2}|\d{2})\b",
    # April 12th, 1985 / April twelfth nineteen eighty-five / April the 12th of 1985
    rf"\b{_MONTH}\s+(?:the\s+)?{_DAY},?\s+(?:of\s+)?{_YEAR}\b",
    # 12 April 1985 / the twelfth of April, nineteen eighty-five
    rf"\b(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH},?\s+{_YEAR}\b",
)
_DATE_RE = re.compile("|".join(f"(?:{p})" for p in _DATE_PATTERNS), re.IGNORECASE)
_VIN_RE = re.compile(r"\b[A-HJ-NPR-Z0-9]{17}\b", re.IGNORECASE)
#: Ten or more digits, possibly with the usual separators: a phone number.
_PHONE_RE = re.compile(r"(?<![\w])\+?\d(?:[\s().-]{0,2}\d){9,14}(?![\w])")
#: A seven-digit local number (555-0100).
_LOCAL_PHONE_RE = re.compile(r"\b\d{3}[-.\s]\d{4}\b")

#: Keys whose values are masked whatever they hold.
_DATE_KEYS = ("birth", "dob")
_PHONE_KEYS = ("phone", "caller", "from_number", "to_number")
_VIN_KEYS = ("vin",)


def _mask_phone_match(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return f"***…{digits[-4:]}"


def redact_text(text: str | None) -> str:
    """Mask dates with a year (dates of birth), VINs and phone numbers inside free text.

    Meant for transcripts and tool results shown to people: ``"April twelfth, nineteen
    eighty-five"`` and ``"1985-04-12"`` become ``[date]``, a 17-character VIN becomes
    ``…1234``, ``+1 (555) 555-0100`` becomes ``***…0100``. Dates without a year (the day of
    an appointment) are kept.

    Args:
        text: Any text.

    Returns:
        The masked text (empty for ``None``).
    """
    if not text:
        return ""
    text = _DATE_RE.sub("[date]", text)
    text = _VIN_RE.sub(
        lambda m: mask_vin(m.group(0)) if _has_digit(m.group(0)) else m.group(0), text
    )
    text = _PHONE_RE.sub(_mask_phone_match, text)
    return _LOCAL_PHONE_RE.sub(_mask_phone_match, text)


def _has_digit(value: str) -> bool:
    return any(c.isdigit() for c in value)


def redact_value(value: Any, *, key: str = "") -> Any:
    """Mask personal data in a JSON-like value (tool arguments and results).

    Values under keys naming a date of birth, a phone number or a full VIN are masked
    whatever they hold; every other string goes through :func:`redact_text`.

    Args:
        value: A JSON-like value (dict, list, str, number, bool, None).
        key: The key ``value`` is stored under (for key-based masking).

    Returns:
        A masked copy.
    """
    lowered = key.lower()
    if isinstance(value, dict):
        return {str(k): redact_value(v, key=str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, key=key) for v in value]
    if isinstance(value, str):
        if any(k in lowered for k in _DATE_KEYS):
            return "[date]"
        if any(k in lowered for k in _PHONE_KEYS):
            if value.strip().startswith("+"):
                return mask_phone(value)
            digits = re.sub(r"\D", "", value)
            return f"***…{digits[-4:]}" if len(digits) >= 4 else "***"
        if lowered == "vin" or (
            any(k in lowered for k in _VIN_KEYS) and _VIN_RE.fullmatch(value.strip())
        ):
            return mask_vin(value.strip())
        return redact_text(value)
    return value

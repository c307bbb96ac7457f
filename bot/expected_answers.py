"""What the bot just asked for, and whether a caller's words already answer it completely.

A phone caller reading out a date of birth, a ZIP code or the last four of a VIN pauses
between groups ("April twelfth ... nineteen eighty five"), and a turn model trained on
conversational speech often judges such a turn unfinished, so the bot waits out its long
fallback in silence. When the bot has just asked for one of these, the words themselves
say whether the answer is complete: "April 12, 1985" is, "April twelfth" is not.

:func:`expected_answers` reads the bot's last utterance and names the answers it asked for
(:class:`AnswerKind`); :func:`is_complete_answer` says whether a transcript already holds
one of them in full. Both are pure functions of text (English and Spanish), with no model
and no I/O. They decide only *when* a turn ends, never what it means: the LLM and the
tools still judge the answer itself.
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "AnswerKind",
    "AnswerState",
    "answer_state",
    "ends_mid_sentence",
    "expected_answers",
    "is_complete_answer",
    "words_to_digits",
]


class AnswerKind(StrEnum):
    """A kind of short factual answer the bot can ask for."""

    DATE_OF_BIRTH = "date_of_birth"
    ZIP_CODE = "zip_code"
    VIN_LAST4 = "vin_last4"
    TIME_CHOICE = "time_choice"
    YES_NO = "yes_no"


#: Phrases in the bot's question that ask for each kind (lower-case text).
_ASKS: dict[AnswerKind, re.Pattern[str]] = {
    AnswerKind.DATE_OF_BIRTH: re.compile(
        r"date of birth|birth ?date|birthday|when were you born|fecha de nacimiento|"
        r"nacimiento|cumplea"
    ),
    AnswerKind.ZIP_CODE: re.compile(r"\bzip\b|postal code|c[oó]digo postal"),
    AnswerKind.VIN_LAST4: re.compile(
        r"last (four|4)\b|\bvin\b|[uú]ltimos cuatro|n[uú]mero de identificaci[oó]n"
    ),
    AnswerKind.TIME_CHOICE: re.compile(
        r"which (time|one|day|slot) |what time|which works|would (either|one) of|"
        r"works (better|best) for you|do you prefer|would you prefer|qu[eé] hora|"
        r"cu[aá]l (le|te) (queda|conviene|funciona)|prefiere"
    ),
}
#: A closed question: the last sentence asks and starts with an auxiliary verb.
_YES_NO_QUESTION = re.compile(
    r"(?:^|[.!?]\s+)(?:so\s+|and\s+|okay,?\s+|great,?\s+)?"
    r"(is|are|was|do|does|did|shall|should|would|could|can|will|may|have|has)\b[^.!?]*\?\s*$"
)

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan", "enero"),
            ("february", "feb", "febrero"),
            ("march", "mar", "marzo"),
            ("april", "apr", "abril"),
            ("may", "mayo"),
            ("june", "jun", "junio"),
            ("july", "jul", "julio"),
            ("august", "aug", "agosto"),
            ("september", "sep", "sept", "septiembre", "setiembre"),
            ("october", "oct", "octubre"),
            ("november", "nov", "noviembre"),
            ("december", "dec", "diciembre"),
        ),
        start=1,
    )
    for name in names
}
_UNITS = {
    "zero": 0, "oh": 0, "o": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19,
    "cero": 0, "uno": 1, "una": 1, "dos": 2, "tres": 3, "cuatro": 4, "cinco": 5, "seis": 6,
    "siete": 7, "ocho": 8, "nueve": 9, "diez": 10, "once": 11, "doce": 12, "trece": 13,
    "catorce": 14, "quince": 15, "dieciséis": 16, "dieciseis": 16, "diecisiete": 17,
    "dieciocho": 18, "diecinueve": 19,
}  # fmt: skip
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
    "veinte": 20, "treinta": 30, "cuarenta": 40, "cincuenta": 50, "sesenta": 60,
    "setenta": 70, "ochenta": 80, "noventa": 90,
}  # fmt: skip
_ORDINALS = {
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
    "eighth": 8, "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17,
    "eighteenth": 18, "nineteenth": 19, "twentieth": 20, "thirtieth": 30,
    "primero": 1,
}  # fmt: skip
_WEEKDAYS = re.compile(
    r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday|today|tomorrow|"
    r"lunes|martes|mi[eé]rcoles|jueves|viernes|s[aá]bado|domingo|hoy|mañana)\b"
)
_CLOCK = re.compile(
    r"\b\d{1,2}(:\d{2})?\s*(a\.?m\.?|p\.?m\.?|o'?clock)?\b|\bnoon\b|\bmediod[ií]a\b"
)
_PICK = re.compile(
    r"\b(first|second|third|last|earlier|later|earliest|latest|morning|afternoon|"
    r"that one|either|the one|works|primer[oa]?|segund[oa]|[uú]ltim[oa]|ma[ñn]ana|tarde)\b"
)
_YES_NO = re.compile(
    r"^(yes|yeah|yep|yup|sure|correct|right|ok|okay|no|nope|nah|not really|of course|"
    r"please|please do|go ahead|that's right|that is right|that's correct|absolutely|"
    r"definitely|s[ií]|claro|correcto|por favor|no gracias|no, thanks?|no thank you|"
    r"yes please|yes, please|no, that's it|that's all|that's it)\b"
)
_WORD = re.compile(r"[a-záéíóúñü]+|\d+")


def expected_answers(bot_text: str) -> frozenset[AnswerKind]:
    """The kinds of answer the bot's last utterance asks for.

    Args:
        bot_text: What the bot last said (its last assistant message).

    Returns:
        The kinds asked for; empty when the bot asked nothing this module knows. Only the
        last two sentences count, so a greeting that mentions a ZIP code in passing does
        not make every later turn a ZIP code turn.
    """
    sentences = re.split(r"(?<=[.!?])\s+", bot_text.strip().lower())
    tail = " ".join(sentences[-2:])
    kinds = {kind for kind, pattern in _ASKS.items() if pattern.search(tail)}
    if not kinds and tail.endswith("?") and _YES_NO_QUESTION.search(tail):
        kinds.add(AnswerKind.YES_NO)
    return frozenset(kinds)


def words_to_digits(text: str) -> list[str]:
    """Tokens of ``text`` with number words turned into digit strings.

    "nineteen eighty five" becomes ``["1985"]`` when read as a year (a 10-99 pair after
    a teen or tens word), "six oh six one four" ``["6", "0", "6", "1", "4"]``, "twelfth"
    ``["12"]``, "twenty one" ``["21"]``; other words stay as they are (lower-case).

    Args:
        text: A transcript.

    Returns:
        The tokens, in order.
    """
    raw = [t for t in _WORD.findall(text.lower().replace("-", " ")) if t not in ("and", "y")]
    out: list[str] = []
    i = 0
    while i < len(raw):
        word = raw[i]
        value = _small_number(raw, i)
        if value is not None:
            number, used = value
            # "nineteen eighty five", "twenty twenty", "nineteen oh five": years, read as
            # two pairs of words (digits and ordinals are never joined).
            century = number in (19, 20) and word in _UNITS | _TENS
            nxt = _small_number(raw, i + used)
            if century and nxt is not None and nxt[0] >= 10 and not raw[i + used].isdigit():
                out.append(f"{number}{nxt[0]:02d}")
                i += used + nxt[1]
                continue
            if century and i + used < len(raw) and raw[i + used] in ("oh", "o"):
                after = _small_number(raw, i + used + 1)
                if after is not None and after[0] < 10:
                    out.append(f"{number}0{after[0]}")
                    i += used + 1 + after[1]
                    continue
            if number in (1, 2) and i + used < len(raw) and raw[i + used] == "thousand":
                rest = _small_number(raw, i + used + 1)
                extra, skip = rest if rest is not None else (0, 0)
                out.append(str(number * 1000 + extra))
                i += used + 1 + skip
                continue
            out.append(str(number))
            i += used
            continue
        out.append(word)
        i += 1
    return out


def _small_number(tokens: list[str], i: int) -> tuple[int, int] | None:
    """A number 0-99 (cardinal or ordinal word, or digits) at ``tokens[i]``, and its length."""
    if i >= len(tokens):
        return None
    word = tokens[i]
    if word.isdigit():
        return int(word), 1
    ordinal = re.fullmatch(r"(\d+)(st|nd|rd|th)", word)
    if ordinal:
        return int(ordinal.group(1)), 1
    if word in _UNITS:
        return _UNITS[word], 1
    if word in _ORDINALS:
        return _ORDINALS[word], 1
    if word in _TENS:
        if i + 1 < len(tokens):
            nxt = tokens[i + 1]
            unit = _UNITS.get(nxt, _ORDINALS.get(nxt))
            if unit is not None and 1 <= unit <= 9:
                return _TENS[word] + unit, 2
        return _TENS[word], 1
    return None


def _has_date_of_birth(tokens: list[str]) -> bool:
    """A month (name or number), a day and a four-digit year, in any common order."""
    years = [t for t in tokens if t.isdigit() and len(t) == 4 and 1900 <= int(t) <= 2030]
    if not years:
        return False
    has_month_name = any(t in _MONTHS for t in tokens)
    small = [int(t) for t in tokens if t.isdigit() and len(t) <= 2]
    if has_month_name:
        return any(1 <= n <= 31 for n in small)
    # All numbers: month and day before the year (04 12 1985).
    return len(small) >= 2 and 1 <= small[0] <= 12 and 1 <= small[1] <= 31


def _digits(tokens: list[str]) -> str:
    return "".join(t for t in tokens if t.isdigit())


class AnswerState(StrEnum):
    """How far the caller's words answer what the bot asked."""

    COMPLETE = "complete"  # a whole answer: end the turn now
    PARTIAL = "partial"  # the start of one ("April twelfth"): wait for the rest
    UNKNOWN = "unknown"  # neither, or ambiguous: leave it to the turn model


#: Words a finished sentence does not end on: a caller who stops after one of them is
#: pausing mid-sentence ("It makes a noise when I ...", "I'll, um, ...").
_DANGLING = frozenset(
    {
        "a", "an", "the", "and", "but", "or", "because", "when", "if", "than", "to", "for",
        "with", "of", "from", "my", "your", "our", "i", "i'm", "um", "uh", "er", "erm",
        "y", "o", "de", "del", "que", "con", "para", "por", "mi", "su", "el", "la", "los",
        "las", "un", "una", "pero", "porque", "cuando", "eh",
    }
)  # fmt: skip


def ends_mid_sentence(text: str) -> bool:
    """Whether ``text`` stops on a word no finished sentence ends on (see ``_DANGLING``).

    Args:
        text: The caller's words in this turn so far.

    Returns:
        True for "It makes a noise when I", "I think I will, um,"; False for "Yes." and
        "I need an oil change.".
    """
    words = re.findall(r"[a-záéíóúñü']+", text.lower())
    return bool(words) and words[-1] in _DANGLING


def answer_state(text: str, kinds: frozenset[AnswerKind]) -> AnswerState:
    """How far ``text`` answers one of ``kinds``.

    Args:
        text: The caller's words in this turn so far.
        kinds: What the bot asked for (:func:`expected_answers`).

    Returns:
        COMPLETE when the words answer in full (a date with day, month and year; five
        digits of a ZIP code; four characters of a VIN; a day, a time or a pick among
        offered slots; a yes or no); PARTIAL when they are the start of such an answer
        ("April twelfth", "six oh six") and nothing else; UNKNOWN otherwise, and when one
        kind is complete while another is still partial (four digits when both a ZIP code
        and a VIN's last four were asked for).
    """
    text = text.strip().lower()
    if not text or not kinds:
        return AnswerState.UNKNOWN
    tokens = words_to_digits(text)
    states = {_state(kind, text, tokens) for kind in kinds}
    if AnswerState.COMPLETE in states:
        return AnswerState.UNKNOWN if AnswerState.PARTIAL in states else AnswerState.COMPLETE
    if AnswerState.PARTIAL in states:
        return AnswerState.PARTIAL
    return AnswerState.UNKNOWN


def is_complete_answer(text: str, kinds: frozenset[AnswerKind]) -> bool:
    """Whether ``text`` already holds a complete answer (:func:`answer_state` COMPLETE)."""
    return answer_state(text, kinds) is AnswerState.COMPLETE


def _state(kind: AnswerKind, text: str, tokens: list[str]) -> AnswerState:
    digits = _digits(tokens)
    # A month name means a date is being read: its digits are no ZIP code or VIN.
    reading_a_date = any(t in _MONTHS and t not in ("may", "mar") for t in tokens)
    if kind is AnswerKind.DATE_OF_BIRTH:
        if re.search(r"\b\d{1,2}[/-]\d{1,2}[/-]\d{4}\b", text) or _has_date_of_birth(tokens):
            return AnswerState.COMPLETE
        numbers = [t for t in tokens if t.isdigit()]
        # "April twelfth", "four twelve": a month, or a month and a day, so far.
        if reading_a_date or (0 < len(numbers) <= 2 and all(len(n) <= 2 for n in numbers)):
            return AnswerState.PARTIAL
    elif kind is AnswerKind.ZIP_CODE and not reading_a_date:
        if len(digits) in (5, 9):
            return AnswerState.COMPLETE
        if 1 <= len(digits) <= 8:
            return AnswerState.PARTIAL
    elif kind is AnswerKind.VIN_LAST4 and not reading_a_date:
        letters = [t for t in tokens if len(t) == 1 and t.isalpha() and t not in ("a", "o", "i")]
        heard = len(digits) + len(letters)
        if len(digits) == 4 or (heard == 4 and len(digits) >= 2):
            return AnswerState.COMPLETE
        if 1 <= heard <= 3 and digits:
            return AnswerState.PARTIAL
    elif kind is AnswerKind.TIME_CHOICE:
        spoken = " ".join(tokens)
        if _WEEKDAYS.search(text) or _CLOCK.search(spoken) or _PICK.search(text):
            return AnswerState.COMPLETE
        if _YES_NO.match(text):
            return AnswerState.COMPLETE
    elif kind is AnswerKind.YES_NO:
        if _YES_NO.match(text) and len(tokens) <= 6:
            return AnswerState.COMPLETE
    return AnswerState.UNKNOWN

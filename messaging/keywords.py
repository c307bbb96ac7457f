"""What an inbound text asks for.

Carrier keywords match the whole message, case-insensitively, the way Twilio's standard
opt-out handling matches them (``STOP``, not "stop texting me"): STOP, STOPALL,
UNSUBSCRIBE, CANCEL, END, QUIT, OPTOUT, REVOKE opt out; START, UNSTOP, YES opt back in;
HELP, INFO ask for help. ``C``/``CONFIRM`` and ``R``/``RESCHEDULE`` act on the nearest
upcoming appointment. Anything else gets a short answer with the options.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

Intent = Literal["opt_out", "opt_in", "help", "confirm", "reschedule", "other"]

OPT_OUT = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "optout", "revoke"})
OPT_IN = frozenset({"start", "unstop", "yes"})
HELP = frozenset({"help", "info"})
CONFIRM = frozenset({"c", "confirm", "confirmed"})
RESCHEDULE = frozenset({"r", "reschedule"})
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


def normalize(body: str) -> str:
    """The message as a keyword: NFKC, case-folded, without surrounding punctuation."""
    text = unicodedata.normalize("NFKC", body.replace("\x00", ""))
    return _EDGES.sub("", text.strip().casefold())


def classify(body: str) -> tuple[Intent, str]:
    """What the text asks for, and the keyword it used (``""`` for ``other``)."""
    word = normalize(body)
    if len(word) > 20:
        return "other", ""
    for intent, words in (
        ("opt_out", OPT_OUT),
        ("opt_in", OPT_IN),
        ("help", HELP),
        ("confirm", CONFIRM),
        ("reschedule", RESCHEDULE),
    ):
        if word in words:
            return intent, word  # type: ignore[return-value]
    return "other", ""

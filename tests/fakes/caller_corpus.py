"""A caller corpus: utterances that behave like people on the phone, as 8 kHz mu-law audio.

Callers pause in the middle of a sentence, trail off with "um", read a date of birth, a
ZIP code or VIN digits in groups, and answer with one word ("yes", "Tuesday"). Each
:class:`Utterance` is spoken by espeak-ng (Debian's ``espeak-ng``; :func:`ensure_speech_tools`
installs it, and ``sox``, when missing) and resampled to the phone's 8 kHz mu-law with
sox; the parts of an utterance are joined by ``pause_secs`` of silence. Nothing is
downloaded. Pipecat 1.14 ships no recorded speech besides keypad tones, so espeak-ng is
the only voice here.

Each utterance also carries the question the bot asks before it (:attr:`Utterance.bot_asks`)
and what the fake STT hears for each part, so a scripted call can replay the corpus
turn by turn (``benchmarks/voice_to_voice.py`` and ``tests/test_caller_corpus.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakes.audio import silence_ulaw
from tests.fakes.openai_chat import Step, say
from tests.system_packages import apt_install

#: Where generated audio is cached (per user, per text; regenerated when missing).
CACHE = Path(tempfile.gettempdir()) / "va-caller-corpus"


@dataclass(frozen=True)
class Utterance:
    """One caller turn of the corpus.

    Attributes:
        kind: What it exercises ("plain", "date_in_groups", "zip_in_groups",
            "vin_in_groups", "mid_sentence_pause", "trailing_um", "short_yes",
            "short_day", "date_at_once").
        bot_asks: What the bot says just before it (its question).
        parts: The spoken parts, in order; silence of ``pause_secs`` between them.
        pause_secs: The caller's pause between parts (0 for one part).
    """

    kind: str
    bot_asks: str
    parts: tuple[str, ...]
    pause_secs: float = 0.0

    @property
    def text(self) -> str:
        """The whole utterance as one transcript."""
        return " ".join(self.parts)

    @property
    def has_pause(self) -> bool:
        """Whether the caller pauses mid-turn (a turn end there is a false one)."""
        return len(self.parts) > 1


#: The corpus, in the order of a call: each bot question follows from the last answer.
CORPUS: tuple[Utterance, ...] = (
    Utterance("plain", "", ("Hi, I need an oil change for my Camry.",)),
    Utterance(
        "date_in_groups",
        "I can help with that. Can you confirm your date of birth?",
        ("April twelfth,", "nineteen eighty five."),
        pause_secs=0.6,
    ),
    Utterance(
        "zip_in_groups",
        "Thank you. And what is the ZIP code on your account?",
        ("six oh six,", "one four."),
        pause_secs=0.6,
    ),
    Utterance(
        "mid_sentence_pause",
        "Got it. What is going on with the car?",
        ("It makes a noise when I", "press the brakes on the highway."),
        pause_secs=0.6,
    ),
    Utterance(
        "short_day",
        "I have Tuesday at nine or Wednesday at ten thirty. Which one works for you?",
        ("Tuesday.",),
    ),
    Utterance(
        "trailing_um",
        "Great. Will you wait there, or would you like a loaner?",
        ("I think I will, um,", "wait there."),
        pause_secs=0.7,
    ),
    Utterance("short_yes", "Shall I book Tuesday at nine for you?", ("Yes.",)),
    Utterance(
        "vin_in_groups",
        "Booked. For the warranty check, could you read me the last four of your VIN?",
        ("four five,", "two one."),
        pause_secs=0.6,
    ),
    Utterance(
        "date_at_once",
        "Thanks. And your date of birth once more, please?",
        ("April twelfth nineteen eighty five.",),
    ),
)


def ensure_speech_tools() -> None:
    """Install Debian's espeak-ng and sox with apt-get when missing; raise if impossible.

    Raises:
        RuntimeError: A tool is still missing afterwards (with apt-get's output).
    """
    missing = [name for name in ("espeak-ng", "sox") if not shutil.which(name)]
    if not missing:
        return
    log = apt_install(missing, installed=lambda: all(shutil.which(b) for b in missing))
    if all(shutil.which(b) for b in missing):
        return
    raise RuntimeError(
        f"the caller corpus needs {', '.join(missing)} and apt-get could not install them:\n"
        + "\n".join(log)
    )


@functools.cache
def speak_ulaw(text: str, *, voice: str = "en-us", words_per_minute: int = 165) -> bytes:
    """``text`` spoken by espeak-ng as 8 kHz mono mu-law bytes (cached on disk).

    Args:
        text: What to say.
        voice: espeak-ng voice.
        words_per_minute: Speaking rate.

    Returns:
        Raw mu-law audio, 8000 bytes per second, with espeak's own leading and trailing
        silence trimmed to 50 ms so pauses are the corpus's, not the synthesizer's.
    """
    ensure_speech_tools()
    key = hashlib.sha256(f"{voice}|{words_per_minute}|{text}".encode()).hexdigest()[:24]
    out = CACHE / f"{key}.ulaw"
    if out.exists():
        return out.read_bytes()
    CACHE.mkdir(parents=True, exist_ok=True)
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "--stdout", text],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    ulaw = subprocess.run(
        [
            "sox", "-t", "wav", "-", "-r", "8000", "-c", "1", "-e", "mu-law", "-b", "8",
            "-t", "raw", "-", "silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02",
            "0.5%", "reverse", "pad", "0.05", "0.05",
        ],
        input=wav,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout  # fmt: skip
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(ulaw)
    tmp.replace(out)
    return ulaw


def utterance_audio(utterance: Utterance) -> list[bytes]:
    """The audio of each part of ``utterance`` (mu-law, 8 kHz), without the pauses."""
    return [speak_ulaw(part) for part in utterance.parts]


def pause_audio(utterance: Utterance) -> bytes:
    """The silence between two parts of ``utterance``."""
    return silence_ulaw(utterance.pause_secs)


def corpus_replies(body: dict[str, Any]) -> Step:
    """The LLM side of a corpus call: after each utterance, the question leading to the next.

    The reply is picked from the caller's last words, so a turn cut in the middle (a false
    turn-end) gets a neutral "Okay." and the call stays in step.
    """
    if not body.get("stream"):
        return say("{}")
    users = [m for m in body["messages"] if m.get("role") == "user"]
    heard = str(users[-1]["content"]).strip().lower() if users else ""
    for index, utterance in enumerate(CORPUS):
        if heard.endswith(utterance.parts[-1].lower()):
            nxt = CORPUS[index + 1].bot_asks if index + 1 < len(CORPUS) else "Thanks, goodbye."
            return say(nxt)
    if not users or "introduce yourself" in heard:
        return say("Thanks for calling. How can I help you today?")
    return say("Okay.")


@dataclass
class CorpusTurn:
    """What the phone saw on one utterance of a replayed corpus.

    Attributes:
        kind: The utterance's kind.
        v2v: The caller's last audio frame to the first bot audio after it (None: no
            bot audio within the wait).
        false_turn_end: The utterance was cut into two turns: its first part, up to the
            caller's pause, is a user turn of its own in the LLM context (the bot took
            the pause for the end). A reply started speculatively during the pause and
            withdrawn when the caller went on is no cut: it never reaches the context.
    """

    kind: str
    v2v: float | None
    false_turn_end: bool


async def replay_corpus(
    client: Any,
    *,
    llm_requests: list[dict[str, Any]],
    utterances: tuple[Utterance, ...] = CORPUS,
    reply_wait_secs: float = 8.0,
) -> list[CorpusTurn]:
    """Speak ``utterances`` into a connected call, each after the bot's previous reply.

    Args:
        client: A connected ``TwilioMediaClient`` whose greeting has finished.
        llm_requests: The OpenAI fake's ``requests``: the context of the last reply
            shows which utterances were cut into two turns.
        utterances: What to say, in order (the fake STT must be scripted with every part).
        reply_wait_secs: How long to wait for bot audio after each utterance.

    Returns:
        One :class:`CorpusTurn` per utterance.
    """
    turns: list[CorpusTurn] = []
    for utterance in utterances:
        audio = utterance_audio(utterance)
        end = 0.0
        for i, part in enumerate(audio):
            if i:
                await client.send_audio(pause_audio(utterance))
            end = await client.send_audio(part)
        first = None
        with contextlib.suppress(TimeoutError, AssertionError):
            await client.wait_for_bot_audio(min_seconds=0.1, timeout=reply_wait_secs, since=end)
            first = client.first_bot_audio_after(end)
        turns.append(
            CorpusTurn(
                kind=utterance.kind,
                v2v=None if first is None else first - end,
                false_turn_end=False,
            )
        )
        await client.wait_for_bot_silence(silence_secs=0.7, timeout=30)
        await asyncio.sleep(0.3)
    replies = [r for r in llm_requests if r.get("stream")]
    users = {
        _normalized(str(m.get("content")))
        for m in (replies[-1]["messages"] if replies else [])
        if m.get("role") == "user"
    }
    for turn, utterance in zip(turns, utterances, strict=True):
        turn.false_turn_end = utterance.has_pause and _normalized(utterance.parts[0]) in users
    return turns


def _normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))

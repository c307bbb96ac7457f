"""The caller corpus through the real server: no turn cut short, no dead air, fast answers.

A call replays ``tests/fakes/caller_corpus.py`` (espeak-ng speech: mid-sentence pauses, a
trailing "um", a date of birth, ZIP code and VIN digits read in groups, one-word answers),
each utterance after the bot question that leads to it, with the fakes answering at once.
Counted: false turn-ends (an utterance cut into two turns in the LLM context) and dead
air (no bot audio within 1.5 s of the caller's last word). The server's own endpointing
of each turn (``calls`` row turn metrics) shows complete spoken answers ending the turn
without smart-turn's long wait.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from seeding import seed
from tests.fakes.caller_corpus import (
    CORPUS,
    corpus_replies,
    ensure_speech_tools,
    replay_corpus,
    utterance_audio,
)
from tests.fakes.deepgram_stt import FakeDeepgramSTT
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI
from tests.harness import running_agent

PROFILE = load_profile(DEFAULT_PROFILE)
#: Spoken answers the bot asked for, complete when the caller stops.
ANSWER_KINDS = {"date_in_groups", "zip_in_groups", "short_day", "short_yes", "vin_in_groups"}


@pytest.fixture(scope="module")
def corpus_audio() -> None:
    """espeak-ng and sox (installed with apt-get when missing), and the corpus synthesized."""
    ensure_speech_tools()
    for utterance in CORPUS:
        assert all(len(a) > 2000 for a in utterance_audio(utterance)), utterance.kind


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=5, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


async def test_caller_corpus_has_no_false_turn_ends_or_dead_air(
    corpus_audio: None, crm_db: str, redis_server_url: str
) -> None:
    llm = FakeOpenAI([corpus_replies] * 100)
    async with running_agent(database_url=crm_db, redis_url=redis_server_url, llm=llm) as agent:
        agent.stt.script([part for utterance in CORPUS for part in utterance.parts])
        client = await agent.inbound_call("+15555550123")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.7, timeout=20)
        turns = await replay_corpus(client, llm_requests=llm.requests)
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)

    assert [t.kind for t in turns if t.false_turn_end] == []
    # Every utterance is answered; none waits out smart-turn's fallback (dead air) except
    # the trailing "um", which smart-turn judges unfinished (known, README: Turn taking).
    # Timings here are functional bounds, far from the figures: those are the benchmark's.
    assert [t.kind for t in turns if t.v2v is None] == []
    dead_air = [t.kind for t in turns if t.v2v is not None and t.v2v > 1.5]
    assert set(dead_air) <= {"trailing_um"}, dead_air
    # Every utterance was one user turn, answered in step with the corpus.
    last_reply = [r for r in llm.requests if r.get("stream")][-1]
    heard = [m["content"] for m in last_reply["messages"] if m["role"] == "user"]
    assert heard[-len(CORPUS) :] == [u.text for u in CORPUS]
    # Complete spoken answers ended the turn on the words, never after smart-turn's 1.2 s
    # fallback (the figure itself, 0.45 s with a 250 ms STT, is the benchmark's).
    metrics = row["turn_metrics"]
    assert len(metrics) >= len(CORPUS)
    endpointing = {
        utterance.kind: turn.get("user_turn_secs")
        for utterance, turn in zip(CORPUS, metrics[-len(CORPUS) :], strict=True)
    }
    slow = {k: v for k, v in endpointing.items() if k in ANSWER_KINDS and (v is None or v >= 1.0)}
    assert slow == {}, endpointing


async def test_speculative_replies_are_never_heard_when_withdrawn(
    corpus_audio: None, crm_db: str, redis_server_url: str
) -> None:
    """With ``SPECULATIVE_REPLIES``, the reply starts at the VAD's stop on the STT's last
    interim. Here the recognizer revises the last word in every final (the interim says
    "please" instead), so every speculative reply (the fake's "Okay.") answers words the caller did
    not end on: each is withdrawn, and neither the phone (the TTS) nor the context ever
    gets it; each turn is answered by a fresh reply to the final transcript."""
    utterances = tuple(u for u in CORPUS if u.kind in ("plain", "short_day", "date_at_once"))
    stt = FakeDeepgramSTT(
        final_delay=0.25,
        end_interim_delay=0.1,
        end_interim_text=lambda text: " ".join([*text.split()[:-1], "please"]),
    )
    tts = FakeDeepgramTTS(secs_per_char=0.01)
    llm = FakeOpenAI([corpus_replies] * 100, first_token_delay=0.3)
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        stt=stt,
        tts=tts,
        llm=llm,
        env={"SPECULATIVE_REPLIES": "true"},
    ) as agent:
        stt.script([part for utterance in utterances for part in utterance.parts])
        client = await agent.inbound_call("+15555550123")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.7, timeout=20)
        turns = await replay_corpus(client, llm_requests=llm.requests, utterances=utterances)
        await client.hang_up()
        await agent.wait_for_call_row(client.call_sid)

    assert [t.kind for t in turns if t.v2v is None] == []
    streamed = [r for r in llm.requests if r.get("stream")]
    said = [str(r["messages"][-1]["content"]) for r in streamed]
    wholes = {u.text for u in utterances}
    # Replies were started on the interims ...
    guesses = [s for s in said if s not in wholes]
    assert len(guesses) >= 2, said
    # ... and withdrawn: never sent to the TTS, never in the context.
    assert not any("Okay." in text for text in tts.texts), tts.texts
    # (each request's history: its last message is the words it answers)
    contexts = [m for r in streamed for m in r["messages"][:-1]]
    assert not any(m.get("content") == "Okay." for m in contexts)
    assert not any(m.get("role") == "user" and m.get("content") in guesses for m in contexts)
    # Every utterance was answered, by a fresh reply to its final transcript.
    heard_on_the_phone = " ".join(tts.texts)
    for index, utterance in enumerate(CORPUS[:-1]):
        if utterance in utterances:
            question = CORPUS[index + 1].bot_asks.split(". ")[-1]
            assert question in heard_on_the_phone, (utterance.kind, tts.texts)

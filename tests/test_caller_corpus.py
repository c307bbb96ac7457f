"""The caller corpus through the real server: no turn cut short, no dead air, fast answers.

A call replays ``tests/fakes/caller_corpus.py`` (espeak-ng speech: mid-sentence pauses, a
trailing "um", a date of birth, ZIP code and VIN digits read in groups, one-word answers),
each utterance after the bot question that leads to it, with the fakes answering at once.
Counted at the phone: false turn-ends (the server asked the LLM for a reply while the
caller was still in the middle of an utterance) and dead air (no bot audio within 1.5 s
of the caller's last word). The server's own endpointing of each turn (``calls`` row turn
metrics) shows complete spoken answers ending the turn without smart-turn's long wait.
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
        turns = await replay_corpus(client, llm_request_times=llm.request_times)
        await client.hang_up()
        row = await agent.wait_for_call_row(client.call_sid)

    by_kind = {t.kind: t for t in turns}
    assert [t.kind for t in turns if t.false_turn_end] == []
    assert [t.kind for t in turns if t.v2v is None or t.v2v > 1.5] == []
    # Every utterance was one user turn, answered in step with the corpus.
    last_reply = [r for r in llm.requests if r.get("stream")][-1]
    heard = [m["content"] for m in last_reply["messages"] if m["role"] == "user"]
    assert heard[-len(CORPUS) :] == [u.text for u in CORPUS]
    # Complete spoken answers ended the turn without smart-turn's 1.2 s fallback.
    metrics = row["turn_metrics"]
    assert len(metrics) >= len(CORPUS)
    endpointing = {
        utterance.kind: turn.get("user_turn_secs")
        for utterance, turn in zip(CORPUS, metrics[-len(CORPUS) :], strict=True)
    }
    slow = {k: v for k, v in endpointing.items() if k in ANSWER_KINDS and (v is None or v > 0.4)}
    assert slow == {}, endpointing
    assert by_kind["short_yes"].v2v is not None

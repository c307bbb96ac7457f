"""Deepgram Flux as the speech recognizer (``DEEPGRAM_STT_MODEL=flux-general-en``).

Flux decides the turns itself (``StartOfTurn`` / ``EndOfTurn``); with
``SPECULATIVE_REPLIES`` its ``EagerEndOfTurn`` starts the reply, which a ``TurnResumed``
withdraws. The fake speaks Flux's wire protocol on ``/v2/listen``; the production code
reaches it through ``DEEPGRAM_STT_URL`` only.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import pytest
import websockets
from deepgram.listen.v2.types import ListenV2Connected, ListenV2TurnInfo
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    EagerTranscriptionFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    ProposedUserStartedSpeakingFrame,
    ProposedUserStoppedSpeakingFrame,
    TranscriptionFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.services.deepgram.flux.stt import DeepgramFluxSTTService
from pipecat.tests.utils import SleepFrame, run_test

from bot.pipeline import flux_listen_url, is_flux_model
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from seeding import seed
from tests.fakes.audio import silence_pcm16, silence_ulaw, speech_pcm16, speech_ulaw
from tests.fakes.deepgram_stt import FakeDeepgramSTT
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI, Step, say
from tests.harness import running_agent

PROFILE = load_profile(DEFAULT_PROFILE)
FLUX = {"DEEPGRAM_STT_MODEL": "flux-general-en"}
RATE = 8000


def _paused_speech() -> bytes:
    """0.8 s of speech, a 0.5 s pause, 0.8 s of speech, then 1.2 s of silence (PCM)."""
    return (
        speech_pcm16(0.8, sample_rate=RATE)
        + silence_pcm16(0.5, RATE)
        + speech_pcm16(0.8, sample_rate=RATE, seed=1)
        + silence_pcm16(1.2, RATE)
    )


# --- settings ----------------------------------------------------------------------------


def test_flux_is_chosen_by_model_name_and_reaches_v2_listen_under_the_base_url() -> None:
    assert is_flux_model("flux-general-en") and is_flux_model("flux-general-multi")
    assert not is_flux_model("nova-3") and not is_flux_model("nova-3-general")
    assert flux_listen_url(None) == "wss://api.deepgram.com/v2/listen"
    assert flux_listen_url("") == "wss://api.deepgram.com/v2/listen"
    assert flux_listen_url("ws://127.0.0.1:9000/") == "ws://127.0.0.1:9000/v2/listen"
    assert flux_listen_url("https://dg.example.com") == "wss://dg.example.com/v2/listen"
    assert flux_listen_url("http://dg.local:8080/v1/listen") == "ws://dg.local:8080/v2/listen"


# --- the fake's wire protocol ------------------------------------------------------------


async def test_fake_speaks_flux_messages_as_deepgram_documents_them() -> None:
    """Every message validates against the Deepgram SDK's own ``/v2/listen`` models, in the
    documented order: Connected, StartOfTurn, Updates, EagerEndOfTurn, TurnResumed,
    EagerEndOfTurn, EndOfTurn (whose transcript matches the eager one before it)."""
    async with FakeDeepgramSTT(silence_secs=0.9, eager_silence_secs=0.2) as fake:
        fake.script([["I need an oil change", "for my Camry."]])
        url = (
            f"{fake.url}/v2/listen?model=flux-general-en&sample_rate={RATE}"
            "&encoding=linear16&eager_eot_threshold=0.5"
        )
        received: list[dict[str, Any]] = []
        async with websockets.connect(url, additional_headers={"Authorization": "Token k"}) as ws:
            audio = _paused_speech()
            for i in range(0, len(audio), 320):
                await ws.send(audio[i : i + 320])
            async with asyncio.timeout(5):
                while not received or received[-1].get("event") != "EndOfTurn":
                    received.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "CloseStream"}))

    connected = ListenV2Connected.model_validate(received[0])
    infos = [ListenV2TurnInfo.model_validate(m) for m in received[1:]]
    assert [m["sequence_id"] for m in received] == list(range(len(received)))
    assert {i.request_id for i in infos} == {connected.request_id}
    events = [i.event for i in infos if i.event != "Update"]
    assert events == ["StartOfTurn", "EagerEndOfTurn", "TurnResumed", "EagerEndOfTurn", "EndOfTurn"]
    assert any(i.event == "Update" for i in infos)
    eager = [i.transcript for i in infos if i.event == "EagerEndOfTurn"]
    assert eager == ["I need an oil change", "I need an oil change for my Camry."]
    end = infos[-1]
    assert end.transcript == eager[-1] and end.trigger == "model" and end.turn_index == 0
    assert [w.word for w in end.words] == end.transcript.split()
    assert all(0.0 <= i.end_of_turn_confidence <= 1.0 for i in infos)
    assert all(i.audio_window_start <= i.audio_window_end for i in infos)


async def test_pipecat_flux_service_turns_the_fake_into_turn_frames() -> None:
    """Pipecat's own Flux service, against the fake: the turn start and stop proposals,
    interim transcripts, the eager guess and its withdrawal, and the final transcript."""
    async with FakeDeepgramSTT(silence_secs=0.9, eager_silence_secs=0.2) as fake:
        fake.script([["I need an oil change", "for my Camry."]])
        stt = DeepgramFluxSTTService(
            api_key="k",
            url=flux_listen_url(fake.url),
            sample_rate=RATE,
            enable_eager_end_of_turn=True,
        )
        audio = _paused_speech()
        chunks = [audio[i : i + 320] for i in range(0, len(audio), 320)]
        frames = [SleepFrame(sleep=0.3)]
        frames += [InputAudioRawFrame(audio=c, sample_rate=RATE, num_channels=1) for c in chunks]
        frames.append(SleepFrame(sleep=1.0))
        down, _ = await run_test(
            stt,
            frames_to_send=frames,
            pipeline_params=PipelineParams(audio_in_sample_rate=RATE),
        )
    assert fake.last_query["model"] == "flux-general-en"
    assert fake.last_query["eager_eot_threshold"] == "0.5"
    kinds = [
        type(f)
        for f in down
        if isinstance(
            f,
            (
                ProposedUserStartedSpeakingFrame,
                EagerTranscriptionFrame,
                EagerEndOfTurnCancelFrame,
                TranscriptionFrame,
                ProposedUserStoppedSpeakingFrame,
            ),
        )
    ]
    assert kinds == [
        ProposedUserStartedSpeakingFrame,
        EagerTranscriptionFrame,
        EagerEndOfTurnCancelFrame,
        EagerTranscriptionFrame,
        TranscriptionFrame,
        ProposedUserStoppedSpeakingFrame,
    ]
    assert any(isinstance(f, InterimTranscriptionFrame) for f in down)
    final = next(f for f in down if type(f) is TranscriptionFrame)
    assert final.text == "I need an oil change for my Camry." and final.finalized


# --- calls through the server ------------------------------------------------------------


@pytest.fixture
async def crm_db(migrated_db: str) -> str:
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=5, seed=7, anchor_date=today, profile=PROFILE)
    return migrated_db


def _streamed(llm: FakeOpenAI) -> list[dict[str, Any]]:
    return [r for r in llm.requests if r.get("stream")]


async def test_flux_call_is_answered_on_flux_turns(crm_db: str, redis_server_url: str) -> None:
    """A call with Flux: the caller speaks, the bot answers on the phone, and the user turn
    in the LLM's context is Flux's EndOfTurn transcript."""
    llm = FakeOpenAI([say("I can help with that. Which day works for you?")])
    async with running_agent(
        database_url=crm_db, redis_url=redis_server_url, llm=llm, env=FLUX
    ) as agent:
        agent.stt.script(["Hi, I need an oil change for my Camry."])
        client = await agent.inbound_call("+15555550123")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        end = await client.send_audio(speech_ulaw(1.0))
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=end)
        await client.hang_up()
        await agent.wait_for_call_row(client.call_sid)

    assert agent.stt.last_query["model"] == "flux-general-en"
    events = [m["event"] for m in agent.stt.flux_messages if m["type"] == "TurnInfo"]
    assert "StartOfTurn" in events and "EndOfTurn" in events
    assert "EagerEndOfTurn" not in events  # only asked for with speculative replies
    answered = _streamed(llm)[-1]
    users = [m["content"] for m in answered["messages"] if m["role"] == "user"]
    assert users[-1] == "Hi, I need an oil change for my Camry."
    assert "Which day works for you?" in " ".join(agent.tts.texts)


async def test_withdrawn_flux_guess_is_never_heard_nor_in_the_context(
    crm_db: str, redis_server_url: str
) -> None:
    """With ``SPECULATIVE_REPLIES``, Flux's EagerEndOfTurn on "I need an oil change" starts
    a reply; the caller goes on ("for my Camry tomorrow."), Flux sends TurnResumed, and
    that reply is withdrawn: it never reaches the TTS or the phone, and no later request
    holds it. The turn is answered once, on the EndOfTurn's whole utterance."""
    guess, whole = "I need an oil change", "I need an oil change for my Camry tomorrow."
    guessed_reply = "GUESSED What kind of oil would you like?"

    def reply(body: dict[str, Any]) -> Step:
        said = body["messages"][-1]["content"]
        if said == guess:
            return say(guessed_reply)
        if said == whole:
            return say("Tomorrow morning works. Anything else?")
        return say("Goodbye.") if said == "No thanks." else say("Hello, how can I help?")

    stt = FakeDeepgramSTT(silence_secs=0.9, eager_silence_secs=0.2)
    llm = FakeOpenAI([reply] * 20)
    tts = FakeDeepgramTTS(secs_per_char=0.01)
    async with running_agent(
        database_url=crm_db,
        redis_url=redis_server_url,
        stt=stt,
        tts=tts,
        llm=llm,
        env={**FLUX, "SPECULATIVE_REPLIES": "true"},
    ) as agent:
        stt.script([["I need an oil change", "for my Camry tomorrow."], "No thanks."])
        client = await agent.inbound_call("+15555550123")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        first = await client.send_audio(speech_ulaw(0.8))
        await client.send_audio(silence_ulaw(0.5))  # a pause: Flux guesses the end
        end = await client.send_audio(speech_ulaw(0.8, seed=1))
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20, since=end)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        second = await client.send_audio(speech_ulaw(0.6, seed=2))
        await client.wait_for_bot_audio(min_seconds=0.2, timeout=20, since=second)
        await client.hang_up()
        await agent.wait_for_call_row(client.call_sid)

    infos = [(m["event"], m["transcript"]) for m in stt.flux_messages if m["type"] == "TurnInfo"]
    turn = [e for e in infos if e[0] != "Update"]
    assert turn[:5] == [
        ("StartOfTurn", ""),
        ("EagerEndOfTurn", guess),
        ("TurnResumed", guess),
        ("EagerEndOfTurn", whole),
        ("EndOfTurn", whole),
    ]
    streamed = _streamed(llm)
    said = [r["messages"][-1]["content"] for r in streamed]
    assert guess in said  # the guess was answered speculatively ...
    # ... and never spoken: not sent to the TTS, no bot audio during the caller's turn.
    assert not any("GUESSED" in text for text in tts.texts), tts.texts
    end_of_turn_at = stt.final_sent_at[0]
    assert (client.first_bot_audio_after(first) or 0.0) >= end_of_turn_at
    assert "Tomorrow morning works." in " ".join(tts.texts)
    # The turn was answered once, on the whole utterance; the later request's history has
    # that utterance once, the real reply, and nothing of the guess.
    assert said.count(whole) == 1
    later = next(r for r in streamed if r["messages"][-1]["content"] == "No thanks.")
    history = later["messages"][:-1]
    users = [m["content"] for m in history if m["role"] == "user"]
    assert users.count(whole) == 1 and guess not in users
    assert not any("GUESSED" in str(m.get("content")) for r in streamed for m in r["messages"])
    assert any("Tomorrow morning works." in str(m.get("content")) for m in history)

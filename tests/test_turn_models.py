"""Turn-taking models: loaded once per process, per-call state, phone tuning."""

from __future__ import annotations

import threading

from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState

from bot.turn_models import (
    PHONE_SMART_TURN_PARAMS,
    load_turn_models,
    new_turn_analyzer,
    new_vad_analyzer,
)
from tests.fakes.audio import silence_ulaw, speech_ulaw, ulaw_to_pcm16


def test_models_are_shared_but_call_state_is_not() -> None:
    load_turn_models()
    a, b = new_vad_analyzer(), new_vad_analyzer()
    assert a._model.session is b._model.session  # one ONNX session per process
    assert a._model is not b._model  # recurrent state per call
    t1, t2 = new_turn_analyzer(), new_turn_analyzer()
    assert t1._session is t2._session
    assert PHONE_SMART_TURN_PARAMS.stop_secs <= 1.5  # not the stock 3 s of dead air


def test_phone_vad_tells_speech_from_silence_per_call() -> None:
    speaking, idle = new_vad_analyzer(), new_vad_analyzer()
    speaking.set_sample_rate(8000)
    idle.set_sample_rate(8000)
    speech = ulaw_to_pcm16(speech_ulaw(1.0))
    quiet = ulaw_to_pcm16(silence_ulaw(1.0))
    frame = speaking.num_frames_required() * 2
    confidences_speech = [
        speaking.voice_confidence(speech[i : i + frame])
        for i in range(0, len(speech) - frame, frame)
    ]
    confidences_quiet = [
        idle.voice_confidence(quiet[i : i + frame]) for i in range(0, len(quiet) - frame, frame)
    ]
    assert max(confidences_speech) > 0.7
    assert max(confidences_quiet) < 0.3


async def test_vad_runs_on_the_event_loop_with_the_same_states() -> None:
    """Every 20 ms frame of a call is analyzed inline: no thread per call, same answers."""
    inline, stock = new_vad_analyzer(), new_vad_analyzer()
    for vad in (inline, stock):
        vad.set_sample_rate(8000)
    audio = ulaw_to_pcm16(silence_ulaw(0.5) + speech_ulaw(1.0) + silence_ulaw(0.8))
    threads_before = threading.active_count()
    inline_states, stock_states = [], []
    for i in range(0, len(audio), 320):  # Twilio's 20 ms frames
        frame = audio[i : i + 320]
        inline_states.append(await inline.analyze_audio(frame))
        stock_states.append(await VADAnalyzer.analyze_audio(stock, frame))  # Pipecat's way
    assert inline_states == stock_states
    assert VADState.SPEAKING in inline_states and inline_states[-1] == VADState.QUIET
    assert not inline._executor._threads  # type: ignore[attr-defined]
    assert stock._executor._threads  # type: ignore[attr-defined]
    assert threading.active_count() <= threads_before + 1  # the stock one's thread only

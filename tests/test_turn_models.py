"""Turn-taking models: loaded once per process, per-call state, phone tuning."""

from __future__ import annotations

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

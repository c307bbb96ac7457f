"""Turn-taking models: loaded once per process, per-call state, phone tuning."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADState

from bot.turn_models import (
    PHONE_SMART_TURN_PARAMS,
    PHONE_VAD_PARAMS,
    SharedSileroVADAnalyzer,
    load_turn_models,
    new_turn_analyzer,
    new_vad_analyzer,
)
from tests.fakes.audio import silence_pcm16, silence_ulaw, speech_ulaw, ulaw_to_pcm16
from tests.fakes.caller_corpus import ensure_speech_tools, speak_ulaw


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
    speech_states = _vad_states(speaking, ulaw_to_pcm16(speech_ulaw(1.0)))
    quiet_states = _vad_states(idle, ulaw_to_pcm16(silence_ulaw(1.0)))
    assert VADState.SPEAKING in speech_states
    assert set(quiet_states) == {VADState.QUIET}


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


def _vad_states(vad: VADAnalyzer, pcm: bytes) -> list[VADState]:
    vad.set_sample_rate(8000)
    return [vad._run_analyzer(pcm[i : i + 320]) for i in range(0, len(pcm), 320)]


def _noise_pcm16(seconds: float, *, rms: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, rms, int(8000 * seconds))).astype("<i2").tobytes()


def _with_noise(pcm: bytes, *, rms: float, seed: int) -> bytes:
    noise = np.frombuffer(_noise_pcm16(len(pcm) / 16000, rms=rms, seed=seed), "<i2")
    mixed = np.frombuffer(pcm, "<i2").astype(np.int32) + noise
    return np.clip(mixed, -32768, 32767).astype("<i2").tobytes()


SPOKEN = (
    "Hi, I need to book an oil change for my truck.",
    "Yes, Tuesday morning works for me.",
    "My date of birth is April twelfth, nineteen eighty.",
)


def words_pcm() -> bytes:
    """:data:`SPOKEN` said by espeak-ng, each after 1.5 s of silence, as 8 kHz PCM."""
    ensure_speech_tools()
    spoken = b"".join(silence_pcm16(1.5) + ulaw_to_pcm16(speak_ulaw(w)) for w in SPOKEN)
    return spoken + silence_pcm16(1.5)


@pytest.mark.parametrize(
    ("noise_rms", "skipped_at_least"), [(0, 0.3), (8, 0.3), (40, 0.3), (80, 0.1)]
)
def test_quiet_windows_skip_the_model_with_the_same_speech_segments(
    noise_rms: float, skipped_at_least: float
) -> None:
    """Below ``min_volume`` the model is not run, yet the VAD finds the same speech.

    Real speech (espeak-ng) between stretches of a quiet line (digital silence, line
    noise, a louder hiss), against Pipecat's stock Silero analyzer with its own model:
    the same SPEAKING segments, each edge within two 20 ms frames, and most quiet
    windows never reach the model.
    """
    pcm = _with_noise(words_pcm(), rms=noise_rms, seed=7)
    gated = new_vad_analyzer()
    stock = SileroVADAnalyzer(params=PHONE_VAD_PARAMS)
    gated_states, stock_states = _vad_states(gated, pcm), _vad_states(stock, pcm)

    def segments(states: list[VADState]) -> list[tuple[int, int]]:
        out, start = [], None
        for i, state in enumerate(states):
            if state == VADState.SPEAKING and start is None:
                start = i
            elif state == VADState.QUIET and start is not None:
                out.append((start, i))
                start = None
        return out

    ours, theirs = segments(gated_states), segments(stock_states)
    assert len(theirs) >= len(SPOKEN)  # the fixture has speech the stock VAD finds
    assert len(ours) == len(theirs)
    for (a0, a1), (b0, b1) in zip(ours, theirs, strict=True):
        assert abs(a0 - b0) <= 1 and abs(a1 - b1) <= 1
    assert isinstance(gated, SharedSileroVADAnalyzer)
    windows = len(pcm) // (gated.num_frames_required() * 2)
    assert gated.skipped_windows > windows * skipped_at_least  # 6 s of ~13 s are quiet


def test_a_loud_line_is_never_skipped() -> None:
    """Loud noise is above the volume gate: every window reaches the model."""
    vad = new_vad_analyzer()
    assert isinstance(vad, SharedSileroVADAnalyzer)
    _vad_states(vad, _noise_pcm16(2.0, rms=6000.0, seed=3))
    # Only while the first 400 ms volume block fills and the smoothed volume ramps up.
    assert vad.skipped_windows <= 20 < (2.0 / 0.032) - 20


async def test_calls_share_one_smart_turn_thread() -> None:
    """Every call's end-of-turn inference runs on the process's one smart-turn thread,
    and one call's clean-up does not stop it for the others."""
    import asyncio

    first, second = new_turn_analyzer(), new_turn_analyzer()
    names: list[str] = []
    for analyzer in (first, second):
        analyzer.set_sample_rate(8000)
        speech = ulaw_to_pcm16(speech_ulaw(0.6))
        for i in range(0, len(speech), 320):
            analyzer.append_audio(speech[i : i + 320], is_speech=True)
        original = analyzer._process_speech_segment

        def recording(buffer, original=original):
            names.append(threading.current_thread().name)
            return original(buffer)

        analyzer._process_speech_segment = recording  # type: ignore[method-assign]
    assert first._model_executor is second._model_executor
    await asyncio.gather(first.analyze_end_of_turn(), second.analyze_end_of_turn())
    await first.cleanup()
    await second.analyze_end_of_turn()
    assert len(names) == 3 and len(set(names)) == 1 and names[0].startswith("smart-turn")

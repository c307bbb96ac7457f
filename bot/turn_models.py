"""Turn-taking models (Silero VAD, smart-turn v3), loaded once per process.

Both ONNX models ship inside the pipecat wheel; nothing is downloaded. Loading them takes
0.1-0.2 s of CPU, so doing it per call on the event loop would stall every other call on
the process. :func:`load_turn_models` loads one ONNX session of each (call it once, off
the event loop, at startup); :func:`new_vad_analyzer` and :func:`new_turn_analyzer` then
build per-call analyzers (each call needs its own audio state) around the shared,
thread-safe inference sessions.
"""

from __future__ import annotations

import threading

import onnxruntime
from pipecat.audio.turn.smart_turn.base_smart_turn import BaseSmartTurn, SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroOnnxModel, SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADAnalyzer, VADParams, VADState

#: VAD tuned for phone audio: start quickly, stop after 0.2 s of silence.
PHONE_VAD_PARAMS = VADParams(confidence=0.7, start_secs=0.2, stop_secs=0.2, min_volume=0.6)
#: Smart-turn: when the model judges a turn incomplete, wait at most this long (the
#: stock 3 s feels like dead air on the phone).
PHONE_SMART_TURN_PARAMS = SmartTurnParams(stop_secs=1.2, pre_speech_ms=500, max_duration_secs=8)

_lock = threading.Lock()
_vad_session: onnxruntime.InferenceSession | None = None
_turn_session: onnxruntime.InferenceSession | None = None


def load_turn_models() -> None:
    """Load the VAD and smart-turn ONNX sessions once (blocking; run it in a thread)."""
    global _vad_session, _turn_session
    with _lock:
        if _vad_session is None:
            _vad_session = SileroVADAnalyzer()._model.session
        if _turn_session is None:
            _turn_session = LocalSmartTurnAnalyzerV3()._session


class _SharedSileroModel(SileroOnnxModel):
    def __init__(self, session: onnxruntime.InferenceSession) -> None:
        self.session = session
        self.reset_states()
        self.sample_rates = [8000, 16000]


class SharedSileroVADAnalyzer(SileroVADAnalyzer):
    """Silero VAD with per-call state over the process-wide ONNX session."""

    def __init__(self, *, sample_rate: int | None = None, params: VADParams | None = None):
        """Build an analyzer; :func:`load_turn_models` must have run.

        Args:
            sample_rate: Audio sample rate (8000 or 16000); set by the pipeline when None.
            params: VAD parameters.
        """
        VADAnalyzer.__init__(self, sample_rate=sample_rate, params=params)
        if _vad_session is None:
            load_turn_models()
        assert _vad_session is not None
        self._model = _SharedSileroModel(_vad_session)
        self._windows_since_reset = 0
        self._low_confidence_windows = 0

    async def analyze_audio(self, buffer: bytes) -> VADState:
        """Analyze one audio frame on the event loop, not on a thread of its own.

        Pipecat's analyzer hands every frame (50 a second on a phone call) to a
        one-thread executor of its own per call: a thread switch each time, a thread and
        a malloc arena per call. Silero's inference on a 32 ms window takes about 0.15 ms,
        less than the handoff; most frames only add to the buffer.

        Args:
            buffer: PCM audio of one input frame.

        Returns:
            The VAD state after this frame.
        """
        return self._run_analyzer(buffer)


class SharedSmartTurnAnalyzer(LocalSmartTurnAnalyzerV3):
    """Smart-turn v3 with per-call audio state over the process-wide ONNX session."""

    def __init__(self, *, params: SmartTurnParams | None = None, **kwargs) -> None:
        """Build an analyzer; :func:`load_turn_models` must have run.

        Args:
            params: Smart-turn parameters.
            **kwargs: Passed to :class:`BaseSmartTurn`.
        """
        BaseSmartTurn.__init__(self, params=params, **kwargs)
        if _turn_session is None:
            load_turn_models()
        assert _turn_session is not None
        self._log_data = False
        self._session = _turn_session


def new_vad_analyzer() -> VADAnalyzer:
    """A per-call phone-tuned VAD analyzer."""
    return SharedSileroVADAnalyzer(params=PHONE_VAD_PARAMS)


def new_turn_analyzer() -> SharedSmartTurnAnalyzer:
    """A per-call phone-tuned smart-turn analyzer."""
    return SharedSmartTurnAnalyzer(params=PHONE_SMART_TURN_PARAMS)

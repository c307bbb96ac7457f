"""Turn-taking models (Silero VAD, smart-turn v3), loaded once per process.

Both ONNX models ship inside the pipecat wheel; nothing is downloaded. Loading them takes
0.1-0.2 s of CPU, so doing it per call on the event loop would stall every other call on
the process. :func:`load_turn_models` loads one ONNX session of each (call it once, off
the event loop, at startup); :func:`new_vad_analyzer` and :func:`new_turn_analyzer` then
build per-call analyzers (each call needs its own audio state) around the shared,
thread-safe inference sessions.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor

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

#: Quiet windows the VAD keeps to warm the model up on when the volume rises again: its
#: recurrent state then matches Pipecat's (speech edges within one 20 ms frame, see
#: ``tests/test_turn_models.py``); with a cold model the start came up to 80 ms late.
WARM_UP_WINDOWS = 8
_lock = threading.Lock()
_vad_session: onnxruntime.InferenceSession | None = None
_turn_session: onnxruntime.InferenceSession | None = None
_turn_executor: ThreadPoolExecutor | None = None


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
        self._window_volume: float | None = None  # this window's volume, measured first
        self._model_idle = False  # windows were skipped: the model's state is stale
        self.skipped_windows = 0
        self._recent: collections.deque[bytes] = collections.deque(maxlen=WARM_UP_WINDOWS)

    def voice_confidence(self, buffer: bytes) -> float:
        """Score one window, without running the model on a window too quiet to be speech.

        Pipecat's analyzer calls speech ``confidence >= threshold and volume >=
        min_volume``: below ``min_volume`` the model's answer cannot change the VAD state.
        The volume is measured first (the same smoothed measure, read back by
        :meth:`_get_smoothed_volume`), and a quiet window is scored 0 without inference.
        On a phone call the caller is quiet while the bot talks and while it thinks, so
        this skips most of the windows on a quiet line (the inference is about 0.1 ms of
        CPU, 31 windows a second per call; measuring the volume is needed anyway). When
        the volume rises again the model is reset and run over the last
        :data:`WARM_UP_WINDOWS` quiet windows first, so it scores the loud one in the
        state Pipecat's analyzer would have it in.

        Args:
            buffer: One window of PCM audio.

        Returns:
            Speech confidence between 0 and 1.
        """
        volume = super()._get_smoothed_volume(buffer)
        self._window_volume = volume
        if volume < self._params.min_volume:
            self._model_idle = True
            self.skipped_windows += 1
            self._recent.append(buffer)
            return 0.0
        if self._model_idle:
            self._model.reset_states()
            self._windows_since_reset = 0
            self._low_confidence_windows = 0
            self._model_idle = False
            for window in self._recent:
                super().voice_confidence(window)
            self._recent.clear()
        return super().voice_confidence(buffer)

    def _get_smoothed_volume(self, audio: bytes) -> float:
        volume, self._window_volume = self._window_volume, None
        if volume is None:  # not measured by voice_confidence (not expected)
            volume = super()._get_smoothed_volume(audio)
        return volume

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

    @property
    def _model_executor(self) -> ThreadPoolExecutor:
        """The process's one smart-turn thread, instead of a thread per call.

        An inference takes about 50 ms of CPU. With a thread per call, as many run at once
        as callers have just stopped talking, each competing for the cores with the event
        loop that paces every call's audio (one worker process per core). One thread
        runs them one at a time beside the loop; at 24 calls a worker sees about five
        turn ends a second, so an end of turn rarely waits for another.
        """
        global _turn_executor
        with _lock:
            if _turn_executor is None:
                _turn_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")
            return _turn_executor


def new_vad_analyzer() -> VADAnalyzer:
    """A per-call phone-tuned VAD analyzer."""
    return SharedSileroVADAnalyzer(params=PHONE_VAD_PARAMS)


def new_turn_analyzer() -> SharedSmartTurnAnalyzer:
    """A per-call phone-tuned smart-turn analyzer."""
    return SharedSmartTurnAnalyzer(params=PHONE_SMART_TURN_PARAMS)

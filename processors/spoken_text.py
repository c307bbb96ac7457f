"""Keep the bot's spoken text behind the audio that speaks it.

Pipecat trims an interrupted assistant turn to what was played by queueing each sentence's
``TTSTextFrame`` behind its audio in the output transport: an interruption drops the queued
audio and text together, so unplayed sentences never reach the assistant context. That
holds for TTS services that return a sentence's audio before its text (HTTP services) or
report word timestamps.

Deepgram's speak WebSocket does neither: Pipecat sends each sentence as a ``Speak`` message
and pushes its ``TTSTextFrame`` at once, and the audio of the whole response arrives later
(Deepgram allows only 20 ``Flush`` messages a minute, so flushing per sentence to learn
where each sentence's audio ends is not an option). Every sentence's text would then sit
ahead of all the audio, and an interrupted turn would be remembered as fully said.

:class:`SpokenTextAligner` sits between the TTS service and the transport output. It holds
each ``TTSTextFrame`` and releases it right after the audio frame that ends the sentence,
estimated from the sentence's length and the voice's speaking rate (characters per second
of audio, learned from every completed utterance of the call). A sentence counts as said
once its estimated audio has been played, the same rule Pipecat applies to HTTP TTS.

The frames that make the assistant aggregator commit a turn (``LLMFullResponseEndFrame``,
``LLMAssistantPushAggregationFrame``) stay behind the held text, so the turn is written
to the context with the text that was played, and in order.
"""

from __future__ import annotations

from collections import deque

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMAssistantPushAggregationFrame,
    LLMFullResponseEndFrame,
    OutputAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

#: Aura voices speak about 15 characters (2.5 words) a second.
DEFAULT_CHARS_PER_SEC = 15.0
MIN_CHARS_PER_SEC = 5.0
MAX_CHARS_PER_SEC = 60.0


class SpokenTextAligner(FrameProcessor):
    """Release each TTS sentence's text after the audio that speaks it.

    Args:
        chars_per_sec: Initial speaking-rate estimate (characters per second of audio).
        learn: Update the estimate from each completed utterance (weighted average).
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(
        self, *, chars_per_sec: float = DEFAULT_CHARS_PER_SEC, learn: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.chars_per_sec = chars_per_sec
        self._learn = learn
        self._held: deque[tuple[float, Frame]] = deque()
        self._audio_secs = 0.0  # audio passed on in the current utterance
        self._text_secs = 0.0  # estimated audio end of the text seen so far
        self._chars = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Hold text frames; pass everything else through in order."""
        await super().process_frame(frame, direction)
        if direction is FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
            return
        if isinstance(frame, InterruptionFrame | CancelFrame):
            # The unplayed rest is dropped downstream; its text must not be said either.
            self._reset()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSTextFrame):
            self._chars += len(frame.text)
            self._text_secs += len(frame.text) / self.chars_per_sec
            self._held.append((self._text_secs, frame))
        elif (
            isinstance(frame, LLMFullResponseEndFrame | LLMAssistantPushAggregationFrame)
            and self._held
        ):
            # Commits the assistant turn: it must not overtake the text it commits.
            self._held.append((self._text_secs, frame))
        elif isinstance(frame, OutputAudioRawFrame):
            await self.push_frame(frame, direction)
            bytes_per_sec = frame.sample_rate * frame.num_channels * 2
            if bytes_per_sec:
                self._audio_secs += len(frame.audio) / bytes_per_sec
            await self._release(up_to=self._audio_secs)
        elif isinstance(frame, TTSStoppedFrame | EndFrame):
            await self._release(up_to=None)
            self._finish_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStartedFrame):
            await self._release(up_to=None)
            self._finish_utterance()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _release(self, *, up_to: float | None) -> None:
        while self._held and (up_to is None or self._held[0][0] <= up_to + 1e-6):
            _, held = self._held.popleft()
            await self.push_frame(held)

    def _finish_utterance(self) -> None:
        if self._learn and self._chars >= 20 and self._audio_secs >= 0.5:
            observed = self._chars / self._audio_secs
            rate = 0.5 * self.chars_per_sec + 0.5 * observed
            self.chars_per_sec = min(MAX_CHARS_PER_SEC, max(MIN_CHARS_PER_SEC, rate))
        self._reset()

    def _reset(self) -> None:
        self._held.clear()
        self._audio_secs = 0.0
        self._text_secs = 0.0
        self._chars = 0

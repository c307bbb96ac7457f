"""Dead-air guard: a short holding phrase when the bot is slow to answer.

When the caller has finished a turn and nothing of the answer has reached the TTS within
``hold_secs`` (a slow or stalled LLM, a tool waiting on a database that is down), the
guard says "One moment, please." once, so the caller never sits in silence wondering
whether anyone is there. It sits between the LLM and the TTS, so it speaks even while
the LLM is stuck on a request.

Wiring (``bot.pipeline``): place it right after the LLM service and call :meth:`arm` when
the user aggregator reports the end of a user turn.
"""

from __future__ import annotations

import asyncio

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMTextFrame,
    TTSSpeakFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

HOLD_PHRASE = "One moment, please."


class DeadAirGuard(FrameProcessor):
    """Says :data:`HOLD_PHRASE` once per user turn when the answer is late.

    Args:
        hold_secs: Seconds after the end of the caller's turn; 0 turns the guard off.
        phrase: What to say.
        **kwargs: Passed to :class:`FrameProcessor`.

    Attributes:
        fired: How many times the phrase was said.
    """

    def __init__(self, *, hold_secs: float, phrase: str = HOLD_PHRASE, **kwargs) -> None:
        super().__init__(**kwargs)
        self._hold_secs = hold_secs
        self._phrase = phrase
        self._timer: asyncio.Task | None = None
        self._closed = False
        self.fired = 0

    async def arm(self) -> None:
        """Start waiting for the answer to the turn that just ended."""
        if self._hold_secs <= 0 or self._closed:
            return
        await self.disarm()
        self._timer = self.create_task(self._hold(), "dead_air_hold")

    async def disarm(self) -> None:
        """The answer (or something else worth hearing) is on its way: stop waiting."""
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.cancel_task(timer)

    async def _hold(self) -> None:
        await asyncio.sleep(self._hold_secs)
        self._timer = None
        self.fired += 1
        logger.info(f"{self}: no answer {self._hold_secs:.1f} s after the caller's turn; holding")
        await self.push_frame(TTSSpeakFrame(self._phrase, append_to_context=False))

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Disarm when the answer starts (or the caller talks, or the call ends)."""
        await super().process_frame(frame, direction)
        if isinstance(frame, (EndFrame, CancelFrame)):
            self._closed = True
            await self.disarm()
        elif isinstance(
            frame,
            (
                LLMTextFrame,
                TTSSpeakFrame,
                BotStartedSpeakingFrame,
                UserStartedSpeakingFrame,
                InterruptionFrame,
            ),
        ):
            await self.disarm()
        await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        """Stop the timer."""
        await super().cleanup()
        self._closed = True
        await self.disarm()

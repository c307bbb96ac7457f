"""The calls live in this process, so that something outside a call can end it politely.

:func:`bot.pipeline.run_call` registers each call's pipeline worker while the call runs;
the graceful drain (``api/drain.py``) ends the calls still live at its deadline with
:func:`end_all`: the bot speaks a goodbye, then the pipeline ends (Twilio hangs up after
the audio has played) and the call is recorded as usual.

Only this process's calls are here; other processes and hosts are visible through the
Redis session snapshots instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from loguru import logger
from pipecat.frames.frames import (
    BotSpeakingFrame,
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    EndFrame,
    TTSSpeakFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.worker import PipelineWorker

from tools.context import CallSession

#: What a caller hears when the server has to end a call that is still going on.
DRAIN_GOODBYE = (
    "I'm sorry, I have to end our call now for a system update. Please call us back in a "
    "minute and we'll pick up where we left off. Goodbye."
)


#: Longest wait for the bot to finish what it is saying before the goodbye.
FINISH_SENTENCE_SECS = 15.0


class SpeechWatch(BaseObserver):
    """Whether the bot is speaking. Added to a call's pipeline only when the call is to be
    ended (an observer sees every frame of every hop; no call pays for it before)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_speaking: float | None = None
        self.stopped = False
        self.changed = asyncio.Event()

    async def on_push_frame(self, data: FramePushed) -> None:
        """Follow the transport's bot speaking frames."""
        frame = data.frame
        if isinstance(frame, BotStartedSpeakingFrame | BotSpeakingFrame):
            self.last_speaking = time.monotonic()
            self.stopped = False
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self.stopped = True
            self.changed.set()

    @property
    def speaking(self) -> bool:
        """The bot spoke within the last half second and has not stopped since."""
        recent = self.last_speaking is not None and time.monotonic() - self.last_speaking < 0.5
        return recent and not self.stopped

    async def wait_silent(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the bot is not speaking (at most ``timeout`` seconds)."""
        await asyncio.sleep(0.5)  # BotSpeakingFrame comes at least this often while it speaks
        try:
            async with asyncio.timeout(timeout):
                while self.speaking:
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 0.25)
        except TimeoutError:
            return False
        return True


@dataclass
class LiveCall:
    """One call in progress in this process."""

    session: CallSession
    worker: PipelineWorker
    ending: bool = False


_calls: dict[str, LiveCall] = {}


def register(session: CallSession, worker: PipelineWorker) -> None:
    """Record a call whose pipeline is about to run (pair with :func:`unregister`)."""
    _calls[session.call_sid] = LiveCall(session=session, worker=worker)


def unregister(call_sid: str) -> None:
    """Forget a call whose pipeline has ended."""
    _calls.pop(call_sid, None)


def live() -> list[LiveCall]:
    """The calls in progress in this process."""
    return list(_calls.values())


async def end_politely(call: LiveCall, text: str = DRAIN_GOODBYE) -> bool:
    """Have the bot say ``text`` and end the call after it (once per call).

    Args:
        call: The live call.
        text: The goodbye.

    Returns:
        Whether the goodbye was queued now (``False`` if it already was).
    """
    if call.ending:
        return False
    call.ending = True
    sid = call.session.call_sid
    logger.info(f"call {sid}: ending it with a goodbye (server draining)")
    # Let the bot finish its sentence (a goodbye queued in the middle of a reply is lost),
    # then the goodbye, not interruptible, with the end right behind it: the transport
    # plays the goodbye before it hangs up, and nothing the caller says now is answered.
    speech = SpeechWatch()
    call.worker.add_observer(speech)
    if not await speech.wait_silent(FINISH_SENTENCE_SECS):
        logger.warning(f"call {sid}: the bot is still speaking; saying goodbye anyway")
    goodbye = TTSSpeakFrame(text, append_to_context=False)
    goodbye.interruptible = False
    await call.worker.queue_frames([goodbye, EndFrame()])
    return True


async def end_all(text: str = DRAIN_GOODBYE) -> int:
    """End every call live in this process with a goodbye.

    Returns:
        How many calls were asked to end.
    """
    results = await asyncio.gather(
        *(end_politely(call, text) for call in live()), return_exceptions=True
    )
    return sum(1 for r in results if r is True)

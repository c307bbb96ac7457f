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
from dataclasses import dataclass

from loguru import logger
from pipecat.frames.frames import EndFrame, TTSSpeakFrame
from pipecat.pipeline.worker import PipelineWorker

from tools.context import CallSession

#: What a caller hears when the server has to end a call that is still going on.
DRAIN_GOODBYE = (
    "I'm sorry, I have to end our call now for a system update. Please call us back in a "
    "minute and we'll pick up where we left off. Goodbye."
)


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
    logger.info(f"call {call.session.call_sid}: ending it with a goodbye (server draining)")
    await call.worker.queue_frames([TTSSpeakFrame(text), EndFrame()])
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

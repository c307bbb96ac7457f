"""Keypad (DTMF) input: single-key commands, and digit entries in place of speech.

Pipecat's Twilio serializer turns the media stream's ``dtmf`` messages into
``InputDTMFFrame``s. :class:`KeypadProcessor` consumes every one of them, so a key press
never reaches the user aggregator, the transcript, the model or a log line:

* While no entry is expected (``armed()`` is false), each key is a command on its own and
  is handed over at once (``0``: an advisor, ``9``: Spanish; the caller of the processor
  decides what a key means).
* While an entry is expected (the bot asked for a date of birth, ZIP code or VIN), keys
  are collected until ``#``, a pause of ``timeout_secs`` or ``max_digits`` keys; ``*``
  starts over. The collected digits are handed over in one piece.

The callback may return frames to push downstream right away, ahead of anything the
caller says next (e.g. the settings frames of a language switch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from pipecat.frames.frames import CancelFrame, EndFrame, Frame, InputDTMFFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

EntryCallback = Callable[[str], Awaitable[list[Frame] | None]]

DEFAULT_TIMEOUT_SECS = 3.0
DEFAULT_MAX_DIGITS = 12


class KeypadProcessor(FrameProcessor):
    """Turn key presses into commands and digit entries; drop the DTMF frames.

    Args:
        on_entry: Called with a single key (not armed) or the collected digits (armed).
        armed: Whether the bot is waiting for a digit entry right now.
        timeout_secs: Pause after the last key that ends an entry.
        max_digits: Keys that end an entry without ``#``.
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(
        self,
        *,
        on_entry: EntryCallback,
        armed: Callable[[], bool],
        timeout_secs: float = DEFAULT_TIMEOUT_SECS,
        max_digits: int = DEFAULT_MAX_DIGITS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._on_entry = on_entry
        self._armed = armed
        self._timeout_secs = timeout_secs
        self._max_digits = max_digits
        self._digits = ""
        self._timer: asyncio.Task | None = None
        #: Entries handed over (counted, never recorded).
        self.entries = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Consume key presses; pass every other frame on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            await self._on_key(str(frame.button.value))
            return
        if isinstance(frame, EndFrame | CancelFrame):
            await self._stop_timer()
            self._digits = ""
        await self.push_frame(frame, direction)

    async def _on_key(self, key: str) -> None:
        if not self._digits and not self._armed():
            await self._emit(key)
            return
        if key == "#":
            await self._flush()
            return
        await self._stop_timer()
        if key == "*":
            self._digits = ""
            return
        self._digits += key
        if len(self._digits) >= self._max_digits:
            await self._flush()
            return
        self._timer = self.create_task(self._flush_later(), name="keypad-entry-timeout")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._timeout_secs)
        self._timer = None  # this task is ending: _flush must not cancel it
        await self._flush()

    async def _flush(self) -> None:
        await self._stop_timer()
        digits, self._digits = self._digits, ""
        if digits:
            await self._emit(digits)

    async def _emit(self, entry: str) -> None:
        self.entries += 1
        frames = await self._on_entry(entry)
        for frame in frames or []:
            await self.push_frame(frame)

    async def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            await self.cancel_task(timer)

    async def cleanup(self) -> None:
        """Stop a pending entry timer."""
        await super().cleanup()
        await self._stop_timer()

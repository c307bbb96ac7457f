"""Notice when the bot asks for a verification factor, and when the check returns.

Sits between the LLM and the TTS. It reads the bot's replies as they stream
(``LLMTextFrame``s between ``LLMFullResponseStartFrame`` and ``LLMFullResponseEndFrame``)
and calls ``on_factor_prompt`` once per reply that asks for a date of birth, a ZIP code or
(the last four of) a VIN, in English or Spanish, while ``active()`` (the caller is not
verified yet). It calls ``on_verify_result`` with the result of every ``verify_customer``
call the model makes (``FunctionCallResultFrame``). The recording is paused and the
keypad armed on the first, the recording resumed on the second. Frames pass unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pipecat.frames.frames import (
    Frame,
    FunctionCallResultFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

#: Phrases that ask for a verification factor.
FACTOR_PROMPT = re.compile(
    r"date of birth|birth ?date|birthday|\bborn\b|\bzip\b|postal code|\bvin\b|"
    r"last (?:four|4)|fecha de nacimiento|naci[óo]|c[óo]digo postal|[úu]ltimos (?:cuatro|4)",
    re.IGNORECASE,
)
VERIFY_TOOL = "verify_customer"


class VerificationWatcher(FrameProcessor):
    """Call back when a reply asks for a verification factor and when the check returns.

    Args:
        on_factor_prompt: Called (at most once per reply) when a reply asks for a factor.
        on_verify_result: Called with each ``verify_customer`` result.
        active: Whether factor prompts matter now (the caller is not verified).
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(
        self,
        *,
        on_factor_prompt: Callable[[], Awaitable[None]],
        on_verify_result: Callable[[Any], Awaitable[None]],
        active: Callable[[], bool],
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._on_factor_prompt = on_factor_prompt
        self._on_verify_result = on_verify_result
        self._active = active
        self._reply = ""
        self._prompted = False

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Watch replies and verification results; pass everything on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMFullResponseStartFrame):
            self._reply = ""
            self._prompted = False
        elif isinstance(frame, LLMTextFrame) and direction == FrameDirection.DOWNSTREAM:
            # Only the tail can complete a phrase split across tokens; keep the reply short.
            self._reply = (self._reply + frame.text)[-400:]
            if not self._prompted and self._active() and FACTOR_PROMPT.search(self._reply):
                self._prompted = True
                await self._on_factor_prompt()
        elif isinstance(frame, LLMFullResponseEndFrame):
            self._reply = ""
        elif (
            isinstance(frame, FunctionCallResultFrame)
            and direction == FrameDirection.DOWNSTREAM
            and frame.function_name == VERIFY_TOOL
        ):
            await self._on_verify_result(frame.result)
        await self.push_frame(frame, direction)

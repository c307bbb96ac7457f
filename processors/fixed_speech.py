"""Speak the bot's fixed sentences in the call's language.

Fixed sentences (apologies, the transfer sentence, goodbyes, the idle prompts) are queued
as ``TTSSpeakFrame``s in English by the pipeline, the flow and the tools. Placed before the
TTS, :class:`FixedSpeechTranslator` replaces the text of each one that ``translate`` knows
with its translation into the call's current language (the frame is otherwise untouched,
so what is added to the context is what was said). Model replies pass unchanged: the
model already speaks the call's language.
"""

from __future__ import annotations

from collections.abc import Callable

from pipecat.frames.frames import Frame, TTSSpeakFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


class FixedSpeechTranslator(FrameProcessor):
    """Translate the text of known fixed ``TTSSpeakFrame``s.

    Args:
        translate: The translation of a fixed sentence, or ``None`` to keep it.
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(self, *, translate: Callable[[str], str | None], **kwargs) -> None:
        super().__init__(**kwargs)
        self._translate = translate

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Rewrite a known sentence; pass every frame on."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSSpeakFrame) and direction == FrameDirection.DOWNSTREAM:
            translated = self._translate(frame.text)
            if translated is not None:
                frame.text = translated
        await self.push_frame(frame, direction)

"""Serve the caller in the language they speak, decided on their first words.

Deepgram's multilingual model (``language=multi``) tags each result with the languages it
heard (``channel.alternatives[0].languages``); Pipecat's Deepgram service puts the first one
on ``TranscriptionFrame.language``. :class:`LanguageDetector` looks at the caller's first
final transcripts: the first one with at least ``min_words`` words and a language decides.
When that language is offered and is not the call's current one, ``on_language`` is
called before the transcript goes on, and the frames it returns (the voice and prompt
settings of the new language) are pushed ahead of the transcript, so the reply to it is
already in the new language. Later turns never switch the language (a customer quoting an
English model name in a Spanish call stays in Spanish).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pipecat.frames.frames import Frame, TranscriptionFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

LanguageCallback = Callable[[str], Awaitable[list[Frame] | None]]


def base_language(language: object) -> str | None:
    """``es`` for ``Language.ES_US``, ``"es-419"``, ``"es"``; ``None`` for nothing."""
    if language is None:
        return None
    value = getattr(language, "value", language)
    if not isinstance(value, str) or not value:
        return None
    return value.split("-")[0].lower() or None


class LanguageDetector(FrameProcessor):
    """Switch the call's language once, on the caller's first words.

    Args:
        on_language: Called with the detected language when it should become the call's.
        current: The call's current language.
        offered: Languages the dealership offers.
        min_words: Words a transcript needs to decide (a lone "okay" decides nothing).
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(
        self,
        *,
        on_language: LanguageCallback,
        current: Callable[[], str],
        offered: tuple[str, ...],
        min_words: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._on_language = on_language
        self._current = current
        self._offered = offered
        self._min_words = min_words
        self.decided: str | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Decide on the first final transcript that carries a language."""
        await super().process_frame(frame, direction)
        if isinstance(frame, TranscriptionFrame) and self.decided is None:
            language = base_language(frame.language)
            if language is not None and len(frame.text.split()) >= self._min_words:
                self.decided = language
                if language in self._offered and language != self._current():
                    for extra in await self._on_language(language) or []:
                        await self.push_frame(extra, direction)
        await self.push_frame(frame, direction)

    def decide(self, language: str) -> None:
        """The language was chosen another way (keypad, CRM): no detection any more."""
        self.decided = language

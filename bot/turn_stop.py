"""End the caller's turn as soon as a complete spoken answer is in, when one was asked for.

Smart-turn judges "April twelfth nineteen eighty five" (or a ZIP code read in groups)
unfinished often enough that the bot waits out its long fallback in silence. When the
bot's last utterance asked for a date of birth, a ZIP code, the last four of a VIN, a
time among offered slots or a yes/no (:mod:`bot.expected_answers`), and the caller's
transcript already parses as a complete answer, :class:`ExpectedAnswerUserTurnStopStrategy`
ends the turn at once; a partial answer ("April twelfth...") keeps smart-turn's verdict
and its longer wait. On every other turn it is Pipecat's
:class:`~pipecat.turns.user_stop.TurnAnalyzerUserTurnStopStrategy`, unchanged.

The early stop only ever happens after the VAD has reported the caller silent and with a
transcript in hand, the same conditions Pipecat's strategy needs; it never cuts a caller
who is still speaking.
"""

from __future__ import annotations

from collections.abc import Callable

from loguru import logger
from pipecat.audio.turn.base_turn_analyzer import BaseTurnAnalyzer
from pipecat.frames.frames import Frame, TranscriptionFrame, VADUserStoppedSpeakingFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy

from bot.expected_answers import AnswerKind, expected_answers, is_complete_answer

__all__ = ["ExpectedAnswerUserTurnStopStrategy", "last_bot_utterance"]


def last_bot_utterance(context: LLMContext) -> str:
    """The text of the last assistant message in ``context`` ("" when there is none)."""
    for message in reversed(context.get_messages()):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        # An assistant message with only tool calls asks nothing: look further back.
    return ""


class ExpectedAnswerUserTurnStopStrategy(TurnAnalyzerUserTurnStopStrategy):
    """Pipecat's turn-analyzer stop strategy, ending at once on a complete expected answer.

    Event handlers and frames are those of the parent class. ``early_stops`` counts the
    turns this strategy ended before the turn analyzer would have.
    """

    def __init__(
        self,
        *,
        turn_analyzer: BaseTurnAnalyzer,
        expected: Callable[[], frozenset[AnswerKind]],
        **kwargs,
    ) -> None:
        """Build the strategy.

        Args:
            turn_analyzer: The per-call smart-turn analyzer.
            expected: Returns what the bot's last utterance asked for; called when the
                caller stops speaking (cheap: a few regular expressions).
            **kwargs: Passed to :class:`TurnAnalyzerUserTurnStopStrategy`.
        """
        super().__init__(turn_analyzer=turn_analyzer, **kwargs)
        self._expected = expected
        self._heard: list[str] = []
        self.early_stops = 0

    @classmethod
    def for_context(
        cls, *, turn_analyzer: BaseTurnAnalyzer, context: LLMContext
    ) -> ExpectedAnswerUserTurnStopStrategy:
        """A strategy that reads the expected answer off the call's LLM context."""
        return cls(
            turn_analyzer=turn_analyzer,
            expected=lambda: expected_answers(last_bot_utterance(context)),
        )

    async def _reset(self) -> None:
        await super()._reset()
        self._heard = []

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Let Pipecat's strategy judge the frame, then check for a complete answer."""
        result = await super().process_frame(frame)
        if isinstance(frame, TranscriptionFrame) and frame.text.strip():
            self._heard.append(frame.text.strip())
            await self._complete_if_answered()
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            await self._complete_if_answered()
        return result

    async def _complete_if_answered(self) -> None:
        """Mark the turn complete when the caller is silent and has answered in full."""
        if self._turn_complete or self._vad_user_speaking or not self._vad_stopped:
            return
        if not self._heard:
            return
        kinds = self._expected()
        if not kinds or not is_complete_answer(" ".join(self._heard), kinds):
            return
        self.early_stops += 1
        logger.debug(f"{self}: complete {'/'.join(sorted(kinds))} answer, ending the turn")
        self._turn_complete = True
        await self._maybe_trigger_user_turn_stopped()

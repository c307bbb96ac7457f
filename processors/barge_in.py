"""Barge-in policy: which caller speech may interrupt the bot.

Built on Pipecat's own turn machinery: :class:`BargeInUserTurnStartStrategy` is a user-turn
START strategy for the user context aggregator. When it decides a turn starts it calls
``trigger_user_turn_started()``; the aggregator then broadcasts Pipecat's
``InterruptionFrame`` at once (LLM, TTS and the transport drop what is queued and the
Twilio serializer sends ``clear``), exactly as with the stock VAD strategy.

Policy:

* Bot silent: the caller's voice (VAD start) or any transcript starts a turn, like Pipecat's
  default ``[VADUserTurnStartStrategy, TranscriptionUserTurnStartStrategy]``.
* Bot speaking:

  * the opening utterance (AI / recording disclosure) cannot be interrupted: until the first
    ``BotStoppedSpeakingFrame`` nothing starts a turn and what the caller said is dropped;
  * backchannels ("uh-huh", "okay", "yeah", ... up to ``max_backchannel_words`` words) never
    interrupt; a final one is turned into Pipecat's ``UserBackchannelFrame`` (the user
    aggregator fires ``on_user_backchannel``) and kept out of the LLM context;
  * other speech interrupts once it reaches ``min_words`` words (interim transcripts count),
    or, with ``min_speech_secs``, once it has lasted that long and contains at least one word
    that is not a backchannel.

Wiring::

    from pipecat.turns.user_turn_strategies import UserTurnStrategies
    LLMUserAggregatorParams(
        vad_analyzer=...,
        user_turn_strategies=UserTurnStrategies(
            start=[BargeInUserTurnStartStrategy(min_words=2)],
            stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=...)],
        ),
    )
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TextFrame,
    TranscriptionFrame,
    UserBackchannelFrame,
    UserSpeakingFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult
from pipecat.turns.user_start.base_user_turn_start_strategy import BaseUserTurnStartStrategy

from core.metrics import BACKCHANNELS_IGNORED_TOTAL, INTERRUPTIONS_TOTAL

DEFAULT_BACKCHANNELS: tuple[str, ...] = (
    "uh-huh",
    "uh huh",
    "mm-hmm",
    "mm hmm",
    "mmhmm",
    "mhm",
    "hmm",
    "mm",
    "okay",
    "ok",
    "yeah",
    "yes",
    "yep",
    "yup",
    "right",
    "alright",
    "sure",
    "got it",
)

_TOKEN_RE = re.compile(r"[a-z0-9']+")


def _tokens(text: str) -> list[str]:
    """Lower-case word tokens; hyphens and punctuation split words."""
    return _TOKEN_RE.findall(text.lower())


class BackchannelClassifier:
    """Decides whether an utterance is only a backchannel ("uh-huh", "okay yeah").

    Args:
        phrases: Backchannel phrases; an utterance is a backchannel when it can be split
            entirely into these phrases.
        max_words: Longest utterance (in spoken words) that may count as a backchannel.
    """

    def __init__(self, phrases: Iterable[str] = DEFAULT_BACKCHANNELS, max_words: int = 3):
        """Initialize the classifier."""
        self._phrases = {tuple(_tokens(p)) for p in phrases if _tokens(p)}
        self._longest = max((len(p) for p in self._phrases), default=0)
        self._max_words = max_words

    @staticmethod
    def word_count(text: str) -> int:
        """Number of spoken words (``uh-huh`` is one word)."""
        return len(text.split())

    def is_backchannel(self, text: str) -> bool:
        """Whether ``text`` consists only of backchannel phrases (and is short enough)."""
        tokens = _tokens(text)
        if not tokens or self.word_count(text) > self._max_words:
            return False
        # reachable[i]: tokens[:i] can be split into backchannel phrases.
        reachable = [True] + [False] * len(tokens)
        for i in range(len(tokens)):
            if not reachable[i]:
                continue
            for n in range(1, min(self._longest, len(tokens) - i) + 1):
                if tuple(tokens[i : i + n]) in self._phrases:
                    reachable[i + n] = True
        return reachable[-1]

    def content_words(self, text: str) -> int:
        """Number of tokens of ``text`` that are not backchannel words."""
        words = {w for p in self._phrases for w in p}
        return sum(1 for t in _tokens(text) if t not in words)


class BargeInUserTurnStartStrategy(BaseUserTurnStartStrategy):
    """User-turn start strategy that filters barge-ins while the bot speaks.

    Use it as the only start strategy of the user aggregator (it also covers the normal,
    bot-silent case). It only *decides*; the interruption itself is Pipecat's.

    Args:
        min_words: Words of non-backchannel speech needed to interrupt the bot.
        min_speech_secs: If set, speech that has lasted this long (VAD) and contains a
            non-backchannel word also interrupts, even with fewer than ``min_words`` words.
        backchannels: Phrases that never interrupt the bot.
        max_backchannel_words: Longest utterance that can count as a backchannel.
        protect_first_utterance: Make the bot's first utterance (the disclosure)
            uninterruptible, until the first ``BotStoppedSpeakingFrame``.
        use_interim: Count words of interim transcripts (earlier barge-in).
        on_interruption: Optional callback run when a barge-in interrupts the bot.
        clock: Monotonic clock in seconds (tests).
        **kwargs: Passed to :class:`BaseUserTurnStartStrategy` (``enable_interruptions``).
    """

    def __init__(
        self,
        *,
        min_words: int = 2,
        min_speech_secs: float | None = None,
        backchannels: Iterable[str] = DEFAULT_BACKCHANNELS,
        max_backchannel_words: int = 3,
        protect_first_utterance: bool = True,
        use_interim: bool = True,
        on_interruption: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **kwargs,
    ):
        """Initialize the strategy."""
        super().__init__(**kwargs)
        self._min_words = max(1, min_words)
        self._min_speech_secs = min_speech_secs
        self._classifier = BackchannelClassifier(backchannels, max_backchannel_words)
        self._use_interim = use_interim
        self._on_interruption = on_interruption
        self._clock = clock

        self._bot_speaking = False
        self._user_turn = False
        self._protecting = protect_first_utterance
        self._pending_words = 0
        self._content_heard = False
        self._speech_started_at: float | None = None

        self.interruptions = 0
        self.backchannels_ignored = 0
        self.ignored_during_disclosure = 0

    @property
    def bot_speaking(self) -> bool:
        """Whether the bot is speaking, as seen by this strategy."""
        return self._bot_speaking

    @property
    def protecting(self) -> bool:
        """Whether the opening utterance is still protected from interruption."""
        return self._protecting

    def _reset_utterance(self) -> None:
        self._pending_words = 0
        self._content_heard = False
        self._speech_started_at = None

    async def handle_user_turn_started(self):
        """Reset the per-utterance counters when a user turn starts."""
        await super().handle_user_turn_started()
        self._user_turn = True
        self._reset_utterance()

    async def handle_user_turn_stopped(self):
        """Arm the strategy again once the user turn is over."""
        await super().handle_user_turn_stopped()
        self._user_turn = False
        self._reset_utterance()

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        """Decide whether ``frame`` starts a user turn.

        Args:
            frame: Any frame seen by the user aggregator (both directions).

        Returns:
            STOP when this strategy started a turn, CONTINUE otherwise.
        """
        if isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
            self._reset_utterance()
            return ProcessFrameResult.CONTINUE
        if isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._protecting = False
            self._reset_utterance()
            return ProcessFrameResult.CONTINUE

        if self._user_turn:
            # A turn is already under way (the controller ignores a second start).
            return ProcessFrameResult.CONTINUE
        if not self._bot_speaking:
            return await self._process_bot_silent(frame)
        return await self._process_bot_speaking(frame)

    async def _process_bot_silent(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        heard = isinstance(frame, TranscriptionFrame) or (
            isinstance(frame, InterimTranscriptionFrame) and self._use_interim
        )
        if heard and isinstance(frame, TextFrame) and frame.text.strip():
            await self.trigger_user_turn_started()
            return ProcessFrameResult.STOP
        return ProcessFrameResult.CONTINUE

    async def _process_bot_speaking(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._speech_started_at = self._clock()
            return ProcessFrameResult.CONTINUE
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_started_at = None
            return ProcessFrameResult.CONTINUE

        if self._protecting:
            if isinstance(frame, TranscriptionFrame) and frame.text.strip():
                # The aggregator has already appended it; keep it out of the context.
                self.ignored_during_disclosure += 1
                logger.debug(f"{self}: caller speech during the disclosure ignored")
                await self.trigger_reset_aggregation()
            return ProcessFrameResult.CONTINUE

        if isinstance(frame, TranscriptionFrame):
            return await self._handle_transcript(frame, final=True)
        if isinstance(frame, InterimTranscriptionFrame) and self._use_interim:
            return await self._handle_transcript(frame, final=False)
        if isinstance(frame, (UserSpeakingFrame, InputAudioRawFrame)):
            if self._long_enough():
                return await self._interrupt("duration")
        return ProcessFrameResult.CONTINUE

    def _long_enough(self) -> bool:
        return (
            self._min_speech_secs is not None
            and self._speech_started_at is not None
            and self._content_heard
            and self._clock() - self._speech_started_at >= self._min_speech_secs
        )

    async def _handle_transcript(
        self, frame: TranscriptionFrame | InterimTranscriptionFrame, *, final: bool
    ) -> ProcessFrameResult:
        text = frame.text.strip()
        if not text:
            return ProcessFrameResult.CONTINUE

        if self._classifier.is_backchannel(text):
            if final:
                self.backchannels_ignored += 1
                BACKCHANNELS_IGNORED_TOTAL.inc()
                logger.debug(f"{self}: backchannel ignored while the bot speaks")
                if self._pending_words == 0:
                    await self.trigger_reset_aggregation()
                await self.push_frame(
                    UserBackchannelFrame(
                        text=text, user_id=frame.user_id, timestamp=frame.timestamp
                    )
                )
            return ProcessFrameResult.CONTINUE

        self._content_heard = True
        words = self._pending_words + self._classifier.word_count(text)
        if words >= self._min_words:
            return await self._interrupt("words")
        if self._long_enough():
            return await self._interrupt("duration")
        if final:
            # Too short to interrupt; stays in the aggregation for the next user turn.
            self._pending_words = words
        return ProcessFrameResult.CONTINUE

    async def _interrupt(self, reason: str) -> ProcessFrameResult:
        self.interruptions += 1
        INTERRUPTIONS_TOTAL.inc()
        logger.info(f"{self}: caller barge-in ({reason}), interrupting the bot")
        if self._on_interruption is not None:
            self._on_interruption()
        await self.trigger_user_turn_started()
        return ProcessFrameResult.STOP

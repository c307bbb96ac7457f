"""A short spoken acknowledgement as soon as a reply turns out to need tools.

A reply that starts with a tool call keeps the caller waiting for the tool and for at
least one more LLM request (often two or three: verify, then look something up, then
answer). Placed right after the LLM service, :class:`ToolAcknowledgement` watches each
LLM response: when the response called a tool from its ``tools`` set (the ones that do
real I/O, not ``end_call`` or a transfer) and the bot has said nothing since the caller's
turn began, it speaks its phrase ("Let me check.") right away, so the caller hears
something about when a plain reply would have started.

* At most once per user turn: the second and third tool round trips of the same turn stay
  silent; a new user turn (``UserStartedSpeakingFrame``) re-arms it.
* Never when the bot already said something in the turn (model text before the tool call,
  a fixed sentence, the dead-air phrase): the caller is not left in silence then.
* Never in the context: the phrase is a ``TTSSpeakFrame`` with ``append_to_context=False``,
  so the assistant aggregator does not record it and the model never takes it for an
  answer it gave. It stays interruptible like any other bot speech.

When it is said, and why not a moment earlier: Pipecat announces a response's tool calls
with a ``FunctionCallsStartedFrame`` (a system frame, handled on arrival, possibly ahead of
the response's queued text) before the response's ``LLMFullResponseEndFrame``. The
decision waits for that end frame, which comes in order behind the response's text, so
text the model said before its tool call is known by then. The phrase itself then waits
until the response's tool results have passed and the next LLM request has started (its
``LLMFullResponseStartFrame``), at most ``max_hold_secs`` after the decision: in Pipecat
1.14 frames that reach the output transport behind bot audio are held there until the
audio has played, and the assistant aggregator does not start the next LLM request while
the bot speaks. Said ahead of the results, or ahead of what Pipecat Flows sends after
them (a node transition's context update and run), the phrase would hold the next request
back for up to its own length; said as the request starts, it plays while the model thinks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    FunctionCallCancelFrame,
    FunctionCallResultFrame,
    FunctionCallsStartedFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

ACK_PHRASE = "Let me check."
#: Longest wait for the tool results before the phrase is said anyway (a slow tool).
MAX_HOLD_SECS = 0.2


class ToolAcknowledgement(FrameProcessor):
    """Says ``phrase`` once per user turn when a reply starts with an I/O tool call.

    Args:
        tools: Names of the tools that earn an acknowledgement (an explicit set: tools
            that end or hand over the call must not be in it).
        phrase: What to say, or a callable giving it (e.g. in the call's language).
        max_hold_secs: Longest wait for the response's tool results before speaking.
        **kwargs: Passed to :class:`FrameProcessor`.

    Attributes:
        spoken: How many acknowledgements were said.
    """

    def __init__(
        self,
        *,
        tools: Iterable[str],
        phrase: str | Callable[[], str] = ACK_PHRASE,
        max_hold_secs: float = MAX_HOLD_SECS,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._tools = frozenset(tools)
        self._phrase = phrase
        self._max_hold_secs = max_hold_secs
        self._acknowledged = False  # in this user turn
        self._said = False  # the bot said something since the user turn began
        self._wanted = False  # the current response called a tool of the set
        self._running: set[str] = set()  # tool calls of that response not settled yet
        self._due = False  # decided; waiting for the results (or the deadline)
        self._deadline: asyncio.Task | None = None
        self.spoken = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Track the turn, the bot's speech and the tool calls; pass every frame on."""
        await super().process_frame(frame, direction)
        downstream = direction == FrameDirection.DOWNSTREAM
        if isinstance(frame, UserStartedSpeakingFrame):
            await self._reset(new_turn=True)
        elif isinstance(frame, (InterruptionFrame, EndFrame, CancelFrame)):
            await self._reset(new_turn=False)  # the interrupted response's end is dropped
        elif isinstance(frame, FunctionCallsStartedFrame) and downstream:
            if any(call.function_name in self._tools for call in frame.function_calls):
                self._wanted = True
                self._running = {call.tool_call_id for call in frame.function_calls}
        elif isinstance(frame, LLMTextFrame):
            if frame.text.strip():
                self._said = True
        elif isinstance(frame, (TTSSpeakFrame, BotStartedSpeakingFrame)):
            self._said = True
        elif isinstance(frame, LLMFullResponseEndFrame):
            wanted, self._wanted = self._wanted, False
            if wanted and not (self._said or self._acknowledged):
                self._acknowledged = True
                self._due = True
        elif isinstance(frame, LLMFullResponseStartFrame) and downstream:
            if self._due and not self._running:
                # The next request has started: its context already holds the results,
                # so the phrase plays while the model thinks, ahead of its answer.
                await self._speak()
        await self.push_frame(frame, direction)
        if downstream and isinstance(frame, (FunctionCallResultFrame, FunctionCallCancelFrame)):
            final = not (
                isinstance(frame, FunctionCallResultFrame)
                and frame.properties is not None
                and not frame.properties.is_final
            )
            if final:
                self._running.discard(frame.tool_call_id)
        if self._due and self._deadline is None:
            self._deadline = self.create_task(self._hold(), "tool_ack_hold")

    async def _hold(self) -> None:
        await asyncio.sleep(self._max_hold_secs)
        self._deadline = None
        if self._due:
            logger.debug(f"{self}: no answer under way yet; acknowledging anyway")
            await self._speak()

    async def _speak(self) -> None:
        self._due = False
        self._said = True
        await self._stop_hold()
        self.spoken += 1
        phrase = self._phrase() if callable(self._phrase) else self._phrase
        await self.push_frame(TTSSpeakFrame(phrase, append_to_context=False))

    async def _stop_hold(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline is not asyncio.current_task():
            await self.cancel_task(deadline)

    async def _reset(self, *, new_turn: bool) -> None:
        self._wanted = False
        self._due = False
        self._running = set()
        await self._stop_hold()
        if new_turn:
            self._acknowledged = False
            self._said = False

    async def cleanup(self) -> None:
        """Stop the hold timer."""
        await super().cleanup()
        await self._stop_hold()

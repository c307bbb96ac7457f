"""One LLM run per group of parallel tool calls, whoever registered the tools.

When one LLM response calls several tools at once (GPT-4o does: "what's booked and what was
done on my car?" → ``list_appointments`` and ``get_vehicle_history``), Pipecat runs them
side by side and gives them a common ``group_id``; the assistant aggregator runs the model
again only when the last result of the group is in, so the model answers once, with every
result in its context. A result that says ``run_llm=True`` outright overrides that: the
aggregator runs the model on the first result (the other call still "in progress" in the
context), then again on the next one, and the caller hears two replies. Pipecat Flows
1.14 gives every node function's result ``run_llm=True``.

:class:`ToolResultGrouping` sits between the LLM service and the assistant aggregator and
turns a final result's ``run_llm=True`` into "no opinion" (``None``), so Pipecat's own
group rule decides: run after the last result of the group (a single call is a group of
one, so it still runs at once). ``run_llm=False`` (a Flows transition, a "no response"
function) and intermediate results of async tools pass untouched.
"""

from __future__ import annotations

import dataclasses

from pipecat.frames.frames import Frame, FunctionCallResultFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor


class ToolResultGrouping(FrameProcessor):
    """Lets Pipecat's parallel-call grouping decide when a tool result runs the LLM.

    Attributes:
        deferred: How many results had their forced ``run_llm=True`` handed back to the
            group rule.
    """

    def __init__(self, **kwargs) -> None:
        """Create the processor.

        Args:
            **kwargs: Passed to :class:`FrameProcessor`.
        """
        super().__init__(**kwargs)
        self.deferred = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Clear a final tool result's forced ``run_llm``; pass every frame on."""
        await super().process_frame(frame, direction)
        if (
            direction == FrameDirection.DOWNSTREAM
            and isinstance(frame, FunctionCallResultFrame)
            and frame.properties is not None
            and frame.properties.is_final
            and frame.properties.run_llm is True
        ):
            # A copy: the upstream twin of this broadcast frame shares the object.
            frame.properties = dataclasses.replace(frame.properties, run_llm=None)
            self.deferred += 1
        await self.push_frame(frame, direction)

"""ToolResultGrouping: parallel tool calls whose results force ``run_llm`` get one LLM run.

Pipecat's real ``OpenAILLMService`` (against the OpenAI wire fake) runs two tool calls of
one response side by side; their handlers answer as Pipecat Flows' node functions do, with
``FunctionCallResultProperties(run_llm=True)``, one quickly and one slowly. The assistant
context aggregator then decides how often the model runs, through ``run_test``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pipecat.frames.frames import FunctionCallResultProperties, LLMContextFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.tests.utils import SleepFrame, run_test

from processors.tool_result_grouping import ToolResultGrouping
from tests.fakes.openai_chat import FakeOpenAI, Step, call_tool, call_tools, say

ANSWER = "Your Camry was last serviced in August and has nothing booked."
DELAYS = {"list_appointments": 0.05, "get_vehicle_history": 0.4}


async def _converse(script: list[Step], *, grouping: bool, run_llm: bool | None = True) -> Any:
    """Runs one caller turn; returns the fake (its requests) and the context."""
    context = LLMContext(messages=[{"role": "user", "content": "What's booked, and history?"}])
    pair = LLMContextAggregatorPair(context)
    async with FakeOpenAI(script) as fake:
        llm = OpenAILLMService(
            api_key="sk-test",
            base_url=fake.base_url,
            settings=OpenAILLMService.Settings(model="gpt-4o"),
        )

        async def handler(params: FunctionCallParams) -> None:
            await asyncio.sleep(DELAYS.get(params.function_name, 0.0))
            await params.result_callback(
                {"ok": True, "tool": params.function_name},
                properties=FunctionCallResultProperties(run_llm=run_llm),
            )

        for name in (*DELAYS, "verify_customer"):
            llm.register_function(name, handler)
        processors: list[FrameProcessor] = [llm, pair.assistant()]
        if grouping:
            processors.insert(1, ToolResultGrouping())
        await run_test(
            Pipeline(processors),
            frames_to_send=[LLMContextFrame(context), SleepFrame(sleep=1.5)],
        )
    return fake, context


def _answers(context: LLMContext) -> list[str]:
    return [
        str(m["content"])
        for m in context.get_messages()
        if m.get("role") == "assistant" and m.get("content")
    ]


PARALLEL: list[Step] = [
    call_tools([("list_appointments", {}), ("get_vehicle_history", {})]),
    say(ANSWER),
]


async def test_forced_results_of_a_parallel_group_run_the_model_once() -> None:
    fake, context = await _converse(list(PARALLEL), grouping=True)
    assert len(fake.requests) == 2  # the calls, then one answer
    # The one answer request held both results, none still "in progress".
    tool_messages = [m for m in fake.requests[1]["messages"] if m["role"] == "tool"]
    assert len(tool_messages) == 2
    assert all("IN_PROGRESS" not in str(m["content"]) for m in tool_messages)
    assert _answers(context) == [ANSWER]


async def test_without_it_the_forced_results_run_the_model_twice() -> None:
    """The defect the processor exists for, so the test above can fail."""
    fake, context = await _converse(list(PARALLEL), grouping=False)
    assert len(fake.requests) == 3
    assert len(_answers(context)) == 2  # the caller hears two replies


async def test_a_single_call_still_runs_the_model_at_once() -> None:
    script: list[Step] = [call_tool("list_appointments", {}), say(ANSWER)]
    fake, context = await _converse(script, grouping=True)
    assert len(fake.requests) == 2
    assert _answers(context) == [ANSWER]


async def test_run_llm_false_is_left_alone() -> None:
    """A Flows transition (or "no response") result still runs nothing by itself."""
    fake, context = await _converse(list(PARALLEL), grouping=True, run_llm=False)
    assert len(fake.requests) == 1
    assert _answers(context) == []

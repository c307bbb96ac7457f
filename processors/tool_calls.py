"""The tool calls of a call, for the ``calls`` row: name, arguments, result, duration, status.

:class:`ToolCallRecorder` is a Pipecat observer (``observe_every_push=False``: each frame
once, when first pushed) that pairs ``FunctionCallInProgressFrame`` with its
``FunctionCallResultFrame`` (or ``FunctionCallCancelFrame``) by ``tool_call_id``.
Arguments and results are masked with :func:`core.pii.redact_value` before they are kept
(no date of birth, full phone number or VIN is stored or shown), and cut to a bounded size.

Wiring::

    tool_log = ToolCallRecorder()
    worker = PipelineWorker(pipeline, observers=[latency, tool_log])
    ...
    finish_call(..., tool_calls=tool_log.to_json())
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

from pipecat.frames.frames import (
    FunctionCallCancelFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed

from core.pii import redact_value

#: Tool result ``error`` codes that count as errors (domain refusals do not).
DEFAULT_ERROR_CODES: tuple[str, ...] = ("internal", "unknown_tool", "bad_arguments")
#: Most tool calls kept per call (a runaway model must not grow the row without bound).
MAX_CALLS = 200
#: Longest JSON text of one argument object or result; longer ones are kept as a preview.
MAX_JSON_CHARS = 4000


def _bounded(value: Any) -> Any:
    """``value`` masked; a preview string when its JSON is longer than the limit."""
    masked = redact_value(value)
    try:
        text = json.dumps(masked, default=str)
    except (TypeError, ValueError):
        return {"preview": str(masked)[:MAX_JSON_CHARS]}
    if len(text) <= MAX_JSON_CHARS:
        return json.loads(text)
    return {"preview": text[:MAX_JSON_CHARS] + "…", "truncated": True}


class ToolCallRecorder(BaseObserver):
    """Records each tool call of a call with its masked arguments and result.

    Args:
        clock: Monotonic seconds (``time.monotonic``).
        error_codes: ``result["error"]`` values that make a call an error.
        **kwargs: Passed to :class:`BaseObserver`.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        error_codes: Iterable[str] = DEFAULT_ERROR_CODES,
        **kwargs: Any,
    ) -> None:
        """Initialize the recorder."""
        super().__init__(observe_every_push=False, **kwargs)
        self._clock = clock
        self._error_codes = set(error_codes)
        self._started = clock()
        self._open: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []

    async def on_push_frame(self, data: FramePushed) -> None:
        """Pair the start of each tool call with its result or cancellation."""
        frame = data.frame
        if isinstance(frame, FunctionCallInProgressFrame):
            if frame.tool_call_id in self._open or len(self.calls) >= MAX_CALLS:
                return
            now = self._clock()
            entry = {
                "name": str(frame.function_name)[:100],
                "arguments": _bounded(frame.arguments),
                "result": None,
                "secs": None,
                "status": "running",
                "at_secs": round(now - self._started, 3),
            }
            self._open[frame.tool_call_id] = {"entry": entry, "started": now}
            self.calls.append(entry)
        elif isinstance(frame, FunctionCallResultFrame):
            self._close(frame.tool_call_id, status=self._status(frame), result=frame.result)
        elif isinstance(frame, FunctionCallCancelFrame):
            self._close(frame.tool_call_id, status="cancelled", result=None)

    def _status(self, frame: FunctionCallResultFrame) -> str:
        result = frame.result
        if frame.error or (isinstance(result, dict) and result.get("error") in self._error_codes):
            return "error"
        if isinstance(result, dict) and result.get("error"):
            return "refused"
        return "ok"

    def _close(self, tool_call_id: str, *, status: str, result: Any) -> None:
        opened = self._open.pop(tool_call_id, None)
        if opened is None:
            return
        entry = opened["entry"]
        entry["secs"] = round(max(0.0, self._clock() - opened["started"]), 3)
        entry["status"] = status
        entry["result"] = _bounded(result)

    def to_json(self) -> list[dict[str, Any]]:
        """The recorded calls, JSON-ready; calls still open are marked ``unfinished``."""
        out = []
        for entry in self.calls:
            item = dict(entry)
            if item["status"] == "running":
                item["status"] = "unfinished"
            out.append(item)
        return out

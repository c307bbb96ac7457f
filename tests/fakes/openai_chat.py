"""A local, scripted OpenAI Chat Completions server (streaming SSE) on 127.0.0.1.

Example::

    async with FakeOpenAI([say("Hello!"), call_tool("book", {"slot": "9am"})]) as fake:
        llm = OpenAILLMService(api_key="sk-test", base_url=fake.base_url, ...)
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_REPLY = "Is there anything else?"


@dataclass
class Say:
    """A step that streams an assistant text reply.

    Attributes:
        text: The reply text.
    """

    text: str


@dataclass
class ToolCall:
    """One function call inside a :class:`ToolCalls` step.

    Attributes:
        name: Function name.
        arguments: JSON-serialisable arguments.
        id: Tool call id; generated when None.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass
class ToolCalls:
    """A step that streams one or more tool calls (``finish_reason`` "tool_calls").

    Attributes:
        calls: The calls, streamed in order with increasing ``index``.
        text: Optional assistant text streamed before the calls.
    """

    calls: list[ToolCall]
    text: str | None = None


@dataclass
class Fail:
    """A step that answers with an OpenAI error JSON.

    Attributes:
        status: HTTP status code.
        message: Error message.
        times: How many consecutive requests this step answers (the openai SDK retries
            429/5xx twice by default, and each retry is a new request).
        retryable: When False the response carries ``x-should-retry: false`` so the
            openai SDK does not retry.
    """

    status: int = 500
    message: str = "The server had an error while processing your request."
    times: int = 1
    retryable: bool = True
    retry_after: float | None = None


@dataclass
class Stall:
    """A step that hangs: the model never answers within ``secs`` (an overloaded API).

    Attributes:
        secs: How long the request hangs before it is answered with ``then``.
        before_headers: Hang before the response headers (else after them, before the
            first chunk, which is what a stalled stream looks like).
        then: What to answer once the stall is over (a text reply by default).
    """

    secs: float = 60.0
    before_headers: bool = False
    then: Say | ToolCalls | None = None


Step = Say | ToolCalls | Fail | Stall | Callable[[dict[str, Any]], "Step | Awaitable[Step]"]
"""A script step: a fixed answer, or a callable that picks one from the request JSON."""


def say(text: str) -> Say:
    """Builds a text-reply step.

    Args:
        text: The reply.

    Returns:
        The step.
    """
    return Say(text)


def call_tool(
    name: str, arguments: dict[str, Any] | None = None, *, text: str | None = None
) -> ToolCalls:
    """Builds a step with a single tool call.

    Args:
        name: Function name.
        arguments: Function arguments.
        text: Optional assistant text before the call.

    Returns:
        The step.
    """
    return ToolCalls([ToolCall(name, dict(arguments or {}))], text=text)


def call_tools(
    calls: Iterable[tuple[str, dict[str, Any]]], *, text: str | None = None
) -> ToolCalls:
    """Builds a step with several (parallel) tool calls.

    Args:
        calls: ``(name, arguments)`` pairs.
        text: Optional assistant text before the calls.

    Returns:
        The step.
    """
    return ToolCalls([ToolCall(n, dict(a)) for n, a in calls], text=text)


def fail(
    status: int = 500,
    message: str = "The server had an error while processing your request.",
    *,
    times: int = 1,
    retryable: bool = True,
    retry_after: float | None = None,
) -> Fail:
    """Builds an error step.

    Args:
        status: HTTP status code.
        message: Error message.
        times: Number of consecutive requests to fail.
        retryable: False adds ``x-should-retry: false`` so the SDK gives up at once.
        retry_after: Seconds for a ``Retry-After`` header (as OpenAI sends with 429).

    Returns:
        The step.
    """
    return Fail(status, message, times, retryable, retry_after)


def stall(
    secs: float = 60.0, *, before_headers: bool = False, then: Say | ToolCalls | None = None
) -> Stall:
    """Builds a step that hangs for ``secs`` before answering.

    Args:
        secs: Length of the stall.
        before_headers: Hang before the response headers instead of before the first chunk.
        then: The answer after the stall (default: the default reply).

    Returns:
        The step.
    """
    return Stall(secs, before_headers, then)


def _split_words(text: str) -> list[str]:
    """Splits text into streaming pieces that concatenate back to ``text``."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        if ch == " " and current.strip():
            pieces.append(current)
            current = ""
        current += ch
    if current:
        pieces.append(current)
    return pieces


def _split_n(text: str, size: int) -> list[str]:
    """Splits text into pieces of ``size`` characters (at least one piece)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tokens(text: str) -> int:
    """A rough token count (4 characters a token)."""
    return max(1, len(text) // 4)


class FakeOpenAI:
    """Scripted OpenAI-compatible Chat Completions server.

    Each POST to ``/v1/chat/completions`` takes the next step of the script. When the
    script is empty it answers ``"Is there anything else?"``.

    Attributes:
        base_url: ``http://127.0.0.1:PORT/v1`` once started.
        requests: Every request body (parsed JSON), in arrival order.
        request_times: Monotonic arrival time of each request.
        responses: The step served for each request, in order.
        disconnects: Stalled requests whose client went away during the stall.
        first_token_delay: Seconds between the response headers and the first chunk.
        chunk_delay: Seconds between later chunks.
        api_key: When set, requests must carry ``Authorization: Bearer <api_key>``.
    """

    def __init__(
        self,
        script: Iterable[Step] | None = None,
        *,
        first_token_delay: float = 0.0,
        chunk_delay: float = 0.0,
        api_key: str | None = None,
    ) -> None:
        """Initialises the server (not started yet).

        Args:
            script: Initial steps.
            first_token_delay: Seconds before the first streamed chunk.
            chunk_delay: Seconds between later chunks.
            api_key: Expected bearer token; None accepts any.
        """
        self._script: list[Step] = list(script or [])
        self._fail_served = 0
        self.first_token_delay = first_token_delay
        self.chunk_delay = chunk_delay
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.responses: list[Say | ToolCalls | Fail | Stall] = []
        self.disconnects = 0
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    def script(self, steps: Iterable[Step]) -> None:
        """Appends steps to the script.

        Args:
            steps: Steps to serve to the following requests, in order.
        """
        self._script.extend(steps)

    @property
    def pending(self) -> int:
        """Number of script steps not served yet."""
        return len(self._script)

    async def start(self) -> None:
        """Starts listening on 127.0.0.1 on a free port."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        """Stops the server."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        """Starts the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops the server."""
        await self.stop()

    async def _next_step(self, body: dict[str, Any]) -> Say | ToolCalls | Fail | Stall:
        """Pops (and resolves) the step for one request."""
        if not self._script:
            return Say(DEFAULT_REPLY)
        step = self._script[0]
        if isinstance(step, Fail):
            self._fail_served += 1
            if self._fail_served >= step.times:
                self._script.pop(0)
                self._fail_served = 0
            return step
        self._script.pop(0)
        while callable(step) and not isinstance(step, Say | ToolCalls | Fail | Stall):
            result = step(body)
            step = await result if inspect.isawaitable(result) else result
        assert isinstance(step, Say | ToolCalls | Fail | Stall), f"bad script step: {step!r}"
        return step

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        """Serves one chat completion request."""
        if self.api_key is not None and request.headers.get("Authorization") != (
            f"Bearer {self.api_key}"
        ):
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        body: dict[str, Any] = await request.json()
        self.requests.append(body)
        self.request_times.append(time.monotonic())
        step = await self._next_step(body)
        self.responses.append(step)
        stalled_after_headers = 0.0
        if isinstance(step, Stall):
            if step.before_headers:
                if not await self._stall(request, step.secs):
                    raise ConnectionResetError("client went away during the stall")
            else:
                stalled_after_headers = step.secs
            step = step.then or Say(DEFAULT_REPLY)
        if isinstance(step, Fail):
            headers = {} if step.retryable else {"x-should-retry": "false"}
            if step.retry_after is not None:
                headers["retry-after"] = f"{step.retry_after:g}"
            return web.json_response(
                {
                    "error": {
                        "message": step.message,
                        "type": "server_error" if step.status >= 500 else "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=step.status,
                headers=headers,
            )
        model = str(body.get("model") or "gpt-4o")
        if not body.get("stream"):
            return web.json_response(self._completion(step, model, body))
        return await self._stream(request, step, model, body, stall=stalled_after_headers)

    async def _stall(self, request: web.Request, secs: float) -> bool:
        """Waits ``secs`` unless the client goes away first (counted in ``disconnects``).

        Returns:
            Whether the client is still connected.
        """
        deadline = time.monotonic() + secs
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                self.disconnects += 1
                return False
            await asyncio.sleep(0.02)
        return True

    def _completion(self, step: Say | ToolCalls, model: str, body: dict[str, Any]) -> dict:
        """Builds a non-streaming ``chat.completion`` object."""
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if isinstance(step, Say):
            message["content"] = step.text
            finish = "stop"
            out = step.text
        else:
            message["content"] = step.text
            message["tool_calls"] = [
                {
                    "id": c.id or f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for c in step.calls
            ]
            finish = "tool_calls"
            out = json.dumps([c.arguments for c in step.calls])
        prompt = _tokens(json.dumps(body.get("messages", [])))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": _tokens(out),
                "total_tokens": prompt + _tokens(out),
            },
        }

    async def _stream(
        self,
        request: web.Request,
        step: Say | ToolCalls,
        model: str,
        body: dict[str, Any],
        *,
        stall: float = 0.0,
    ) -> web.StreamResponse:
        """Streams ``chat.completion.chunk`` events for one step."""
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        if stall > 0 and not await self._stall(request, stall):
            raise ConnectionResetError("client went away during the stall")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_id = f"chatcmpl-{uuid.uuid4().hex[:29]}"
        created = int(time.time())
        first = True

        async def send(delta: dict[str, Any], finish: str | None = None) -> None:
            nonlocal first
            await asyncio.sleep(self.first_token_delay if first else self.chunk_delay)
            first = False
            chunk: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                chunk["usage"] = None
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        out_text = ""
        if isinstance(step, Say):
            await send({"role": "assistant", "content": "", "refusal": None})
            for piece in _split_words(step.text):
                await send({"content": piece})
            out_text = step.text
            finish = "stop"
        else:
            await send({"role": "assistant", "content": step.text or None, "refusal": None})
            out_text = step.text or ""
            for index, call in enumerate(step.calls):
                call_id = call.id or f"call_{uuid.uuid4().hex[:24]}"
                await send(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": call_id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": ""},
                            }
                        ]
                    }
                )
                args = json.dumps(call.arguments)
                out_text += args
                for piece in _split_n(args, 8):
                    await send({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            finish = "tool_calls"
        await send({}, finish)
        if include_usage:
            prompt = _tokens(json.dumps(body.get("messages", [])))
            completion = _tokens(out_text)
            usage_chunk = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                    "completion_tokens_details": {
                        "reasoning_tokens": 0,
                        "audio_tokens": 0,
                        "accepted_prediction_tokens": 0,
                        "rejected_prediction_tokens": 0,
                    },
                },
            }
            await response.write(f"data: {json.dumps(usage_chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

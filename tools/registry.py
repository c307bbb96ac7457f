"""Tool registry: the one path from a model's function call to a business function.

Each tool is a plain async function ``fn(ctx, **arguments) -> dict`` plus a Pipecat
:class:`FunctionSchema` written for the model. :func:`run_tool` is used by the bot (via
:func:`bot.tools.register_tools`), the tool console and the tests alike, so all three see
exactly the same results.

Results are short, speakable JSON. Domain errors (:class:`ToolRefusal`) become
``{"ok": false, "say": "<sentence>"}``; unexpected errors are logged (without PII) and
become a generic apology, never a stack trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema

from app.call_session import CallSession
from app.profile import DealershipProfile

ToolFn = Callable[..., Awaitable[dict[str, Any]]]


class ToolRefusal(Exception):
    """A domain error or refusal; ``say`` is a short sentence the bot can speak."""

    def __init__(self, say: str, *, code: str = "refused", **extra: Any) -> None:
        super().__init__(say)
        self.say = say
        self.code = code
        self.extra = extra

    def result(self) -> dict[str, Any]:
        """The JSON result the model sees."""
        return {"ok": False, "error": self.code, "say": self.say, **self.extra}


@dataclass
class ToolContext:
    """What a tool may use: the call's session and the process resources."""

    session: CallSession
    db: Any  # psycopg_pool.AsyncConnectionPool
    redis: Any  # redis.asyncio.Redis
    profile: DealershipProfile
    calendar: Any = None  # scheduling.calendar.Calendar
    now: Callable[[], Any] | None = None
    durations: list[tuple[str, float, bool]] = field(default_factory=list)
    pending: Any = None  # app.pending.PendingWrites: writes that wait out a DB outage


@dataclass(frozen=True)
class Tool:
    """A registered tool: schema for the model, function for the business."""

    schema: FunctionSchema
    fn: ToolFn
    mutating: bool = False


TOOLS: dict[str, Tool] = {}
GENERIC_APOLOGY = (
    "I'm sorry, something went wrong on my side. I can transfer you to a service advisor."
)


def tool(
    *,
    name: str,
    description: str,
    properties: dict[str, Any],
    required: list[str] | None = None,
    mutating: bool = False,
) -> Callable[[ToolFn], ToolFn]:
    """Register a function as an LLM tool.

    Args:
        name: Tool name (a contract with prompts and flows).
        description: What the tool does, written for the model.
        properties: JSON-schema properties of the arguments.
        required: Names of required arguments.
        mutating: Whether the tool writes; writes are shielded from cancellation.

    Returns:
        A decorator that registers and returns the function unchanged.
    """

    def decorator(fn: ToolFn) -> ToolFn:
        schema = FunctionSchema(
            name=name, description=description, properties=properties, required=required or []
        )
        TOOLS[name] = Tool(schema=schema, fn=fn, mutating=mutating)
        return fn

    return decorator


def _clean_arguments(tool_: Tool, arguments: dict[str, Any] | None) -> dict[str, Any]:
    allowed = tool_.schema.properties.keys()
    cleaned = {k: v for k, v in (arguments or {}).items() if k in allowed and v not in (None, "")}
    missing = [k for k in tool_.schema.required if k not in cleaned]
    if missing:
        raise ToolRefusal(
            f"I still need the {missing[0].replace('_', ' ')}.", code="missing_argument"
        )
    return cleaned


async def run_tool(ctx: ToolContext, name: str, arguments: dict[str, Any] | None) -> dict:
    """Run one tool call for the call in ``ctx`` and return what the model sees.

    Writes run inside :func:`asyncio.shield`: if the caller interrupts and the handler is
    cancelled, the write still completes (or fails) as a whole. The awaiting coroutine is
    cancelled, but the outcome is recorded in the session so the bot can learn it.

    Args:
        ctx: The call's tool context.
        name: Tool name from the model.
        arguments: Arguments from the model (untrusted).

    Returns:
        A JSON-serialisable dict, ``ok`` true or false.
    """
    tool_ = TOOLS.get(name)
    if tool_ is None:
        return {"ok": False, "error": "unknown_tool", "say": "I can't do that."}
    started = time.perf_counter()
    ok = True
    try:
        kwargs = _clean_arguments(tool_, arguments)
        if tool_.mutating:
            task = asyncio.ensure_future(tool_.fn(ctx, **kwargs))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                result = await _finish_in_background(task)
                ctx.session.late_results.append({"tool": name, "result": result})
                raise
        return await tool_.fn(ctx, **kwargs)
    except ToolRefusal as refusal:
        return refusal.result()
    except TypeError as exc:
        ok = False
        logger.warning(f"tool {name}: bad arguments ({type(exc).__name__})")
        return {"ok": False, "error": "bad_arguments", "say": "Sorry, I didn't get that."}
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        ok = False
        logger.opt(exception=exc).error(f"tool {name} failed: {type(exc).__name__}")
        return {"ok": False, "error": "internal", "say": GENERIC_APOLOGY}
    finally:
        ctx.durations.append((name, time.perf_counter() - started, ok))


async def _finish_in_background(task: asyncio.Future) -> dict[str, Any]:
    try:
        return await task
    except ToolRefusal as refusal:
        return refusal.result()
    except Exception as exc:
        logger.opt(exception=exc).error(f"shielded tool failed: {type(exc).__name__}")
        return {"ok": False, "error": "internal", "say": GENERIC_APOLOGY}

"""Tool registry: the one path from a model's function call to a business function.

Each tool is a plain async function ``fn(ctx, **arguments) -> dict`` plus a Pipecat
:class:`FunctionSchema` written for the model. :func:`run_tool` is used by the bot (via
:func:`bot.tools.register_tools`), the tool console and the tests alike, so all three see
exactly the same results.

Results are short, speakable JSON. Domain errors (:class:`ToolRefusal`) become
``{"ok": false, "error": "<code>", "say": "<sentence>"}``; unexpected errors are logged
(without PII) and become a generic apology, never a stack trace.

Arguments come from the model and are hostile. :func:`validate_arguments` checks them
against each tool's declared JSON-schema properties before the tool runs, so every tool
gets values of its declared types: ``string`` (numbers become digits; no NUL bytes, no
unpaired surrogates, at most ``maxLength`` or :data:`MAX_STRING_CHARS` characters;
``enum`` matched case- and spacing-insensitively), ``integer`` (integral numbers and
digit strings such as ``"12"``, within ``minimum``/``maximum`` or Postgres ``bigint``),
``number`` and ``boolean``. ``null`` and empty strings mean "not given"; undeclared keys
are dropped (a tool never takes anything it did not declare, e.g. a customer id). Any
other value (a list, an object, ``"abc"`` for an integer) is answered with
``bad_arguments`` and a sentence naming the argument, without running the tool.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from pipecat.adapters.llm.schemas.function_schema import FunctionSchema

from tools.context import ToolContext

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
#: Longest string argument accepted when a property declares no ``maxLength``.
MAX_STRING_CHARS = 500
#: Integer arguments must fit a Postgres ``bigint`` unless the property narrows them.
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
SUPPORTED_TYPES = ("string", "integer", "number", "boolean")
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]{1,19}", re.ASCII)
_NUMBER_TEXT = re.compile(r"[+-]?[0-9]{1,15}(\.[0-9]{1,15})?", re.ASCII)


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

    for prop, spec in properties.items():
        if spec.get("type") not in SUPPORTED_TYPES:
            raise ValueError(f"tool {name}: property {prop} needs a type in {SUPPORTED_TYPES}")
    unknown_required = set(required or []) - properties.keys()
    if unknown_required:
        raise ValueError(f"tool {name}: required {sorted(unknown_required)} not declared")

    def decorator(fn: ToolFn) -> ToolFn:
        schema = FunctionSchema(
            name=name, description=description, properties=properties, required=required or []
        )
        TOOLS[name] = Tool(schema=schema, fn=fn, mutating=mutating)
        return fn

    return decorator


def _spoken(name: str) -> str:
    return name.replace("_", " ")


def _bad(name: str, say: str | None = None) -> ToolRefusal:
    return ToolRefusal(
        say or f"Sorry, I didn't catch the {_spoken(name)}. Could you say it again?",
        code="bad_arguments",
        argument=name,
    )


def _string(name: str, spec: dict[str, Any], value: Any) -> str | None:
    if isinstance(value, bool):
        raise _bad(name)
    if isinstance(value, int):
        value = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(name)
        value = str(int(value)) if value.is_integer() else repr(value)
    elif not isinstance(value, str):
        raise _bad(name)
    value = value.strip()
    if not value:
        return None
    if "\x00" in value:
        raise _bad(name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(name) from None
    if len(value) > int(spec.get("maxLength", MAX_STRING_CHARS)):
        raise _bad(
            name, f"Sorry, the {_spoken(name)} was too long for me. Could you say it more briefly?"
        )
    options = spec.get("enum")
    if options is not None:
        wanted = re.sub(r"[\s-]+", "_", value.lower())
        if wanted not in options:
            spoken = [_spoken(str(o)) for o in options]
            listed = ", ".join(spoken[:-1]) + f" or {spoken[-1]}" if len(spoken) > 1 else spoken[0]
            raise _bad(name, f"Sorry, I didn't catch the {_spoken(name)}. It can be {listed}.")
        value = wanted
    return value


def _integer(name: str, spec: dict[str, Any], value: Any) -> int:
    if isinstance(value, bool):
        raise _bad(name)
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise _bad(name)
        value = int(value)
    elif isinstance(value, str):
        if not _INTEGER_TEXT.fullmatch(value.strip()):
            raise _bad(name)
        value = int(value.strip())
    elif not isinstance(value, int):
        raise _bad(name)
    low = max(int(spec.get("minimum", BIGINT_MIN)), BIGINT_MIN)
    high = min(int(spec.get("maximum", BIGINT_MAX)), BIGINT_MAX)
    if not low <= value <= high:
        raise _bad(name)
    return value


def _number(name: str, spec: dict[str, Any], value: Any) -> float:
    if isinstance(value, bool):
        raise _bad(name)
    if isinstance(value, str):
        if not _NUMBER_TEXT.fullmatch(value.strip()):
            raise _bad(name)
        value = float(value.strip())
    elif isinstance(value, int):
        if abs(value) > 2**53:
            raise _bad(name)
        value = float(value)
    elif not isinstance(value, float):
        raise _bad(name)
    if not math.isfinite(value):
        raise _bad(name)
    if "minimum" in spec and value < spec["minimum"]:
        raise _bad(name)
    if "maximum" in spec and value > spec["maximum"]:
        raise _bad(name)
    return value


_TRUE_WORDS = frozenset({"true", "yes", "y"})
_FALSE_WORDS = frozenset({"false", "no", "n"})


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE_WORDS or word in _FALSE_WORDS:
        return word in _TRUE_WORDS
    raise _bad(name)


def validate_arguments(tool_: Tool, arguments: Any) -> dict[str, Any]:
    """Check a tool call's arguments against the tool's declared properties.

    Args:
        tool_: The tool called.
        arguments: Arguments from the model (untrusted, any JSON value).

    Returns:
        The declared arguments that were given, as values of their declared types.

    Raises:
        ToolRefusal: ``bad_arguments`` for a value that cannot be of its type, or
            ``missing_argument`` for a required one not given.
    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ToolRefusal("Sorry, I didn't get that.", code="bad_arguments")
    properties: dict[str, dict[str, Any]] = tool_.schema.properties
    cleaned: dict[str, Any] = {}
    for name, spec in properties.items():
        value = arguments.get(name)
        if value is None:
            continue
        kind = spec["type"]
        if kind == "string":
            value = _string(name, spec, value)
        elif kind == "integer":
            value = _integer(name, spec, value)
        elif kind == "number":
            value = _number(name, spec, value)
        else:
            value = _boolean(name, value)
        if value is not None:
            cleaned[name] = value
    missing = [k for k in tool_.schema.required if k not in cleaned]
    if missing:
        raise ToolRefusal(
            f"I still need the {_spoken(missing[0])}.", code="missing_argument", argument=missing[0]
        )
    return cleaned


async def run_tool(ctx: ToolContext, name: str, arguments: Any) -> dict:
    """Run one tool call for the call in ``ctx`` and return what the model sees.

    Writes run inside :func:`asyncio.shield`: if the caller interrupts and the handler is
    cancelled, the write still completes (or fails) as a whole. The awaiting coroutine is
    cancelled, but the outcome is recorded in the session so the bot can learn it.

    Args:
        ctx: The call's tool context.
        name: Tool name from the model (untrusted).
        arguments: Arguments from the model (untrusted, any JSON value); checked by
            :func:`validate_arguments` before the tool runs.

    Returns:
        A JSON-serialisable dict, ``ok`` true or false.
    """
    tool_ = TOOLS.get(name) if isinstance(name, str) else None
    if tool_ is None:
        return {"ok": False, "error": "unknown_tool", "say": "I can't do that."}
    try:
        kwargs = validate_arguments(tool_, arguments)
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
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.opt(exception=exc).error(f"tool {name} failed: {type(exc).__name__}")
        return {"ok": False, "error": "internal", "say": GENERIC_APOLOGY}


async def _finish_in_background(task: asyncio.Future) -> dict[str, Any]:
    try:
        return await task
    except ToolRefusal as refusal:
        return refusal.result()
    except Exception as exc:
        logger.opt(exception=exc).error(f"shielded tool failed: {type(exc).__name__}")
        return {"ok": False, "error": "internal", "say": GENERIC_APOLOGY}

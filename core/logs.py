"""One log format for the whole process.

Everything goes through loguru: the app's own logs, and the standard library's loggers
(uvicorn's start-up and access lines, Python warnings, libraries' warnings) through
:class:`InterceptHandler`. ``LOG_FORMAT=text`` (the default) is loguru's readable line;
``LOG_FORMAT=json`` writes one JSON object per line for log shippers, with ``time``,
``level``, ``message``, ``module``, ``function``, ``line``, every bound value (``call_sid``
when a call binds it) and ``exception`` when there is one.

Importing this module also imports the ``pipecat`` package with its logs switched off:
Pipecat logs a version banner when it is first imported, which is noise on every command
line (``--help`` included). Import this module before anything that imports Pipecat.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Literal

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message

LogFormat = Literal["text", "json"]

#: Standard library loggers that get their own level (the app's); others stay at WARNING.
_APP_LEVEL_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def _import_pipecat_quietly() -> None:
    """Import ``pipecat`` (its ``__init__`` is small) without its version banner."""
    logger.disable("pipecat")
    try:
        import pipecat  # noqa: F401
    finally:
        logger.enable("pipecat")


_import_pipecat_quietly()


class InterceptHandler(logging.Handler):
    """Hands standard library log records to loguru (the recipe from loguru's docs)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Log ``record`` through loguru at the same level, from the original caller."""
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame = frame.f_back
            depth += 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


def _json_line(message: Message) -> None:
    """Loguru sink: the record as one JSON object on one line of stderr."""
    record = message.record
    entry = {
        **record["extra"],
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "module": record["name"],
        "function": record["function"],
        "line": record["line"],
    }
    if record["exception"] is not None:
        error = record["exception"]
        entry["exception"] = "".join(
            traceback.format_exception(error.type, error.value, error.traceback)
        ).rstrip()
    sys.stderr.write(json.dumps(entry, default=str, ensure_ascii=False) + "\n")
    sys.stderr.flush()


def setup_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every log record of the process to stderr, in one format, from ``level`` up.

    Tracebacks are logged without variable values (``diagnose=False``): those would put
    tool arguments such as dates of birth and phone numbers into the log. Standard library
    loggers other than uvicorn's stay at WARNING, so libraries that log requests at INFO
    (with phone numbers in them) stay quiet, as before.

    Args:
        level: Loguru level name (``LOG_LEVEL``).
        log_format: ``text`` for people, ``json`` for log shippers (``LOG_FORMAT``).
    """
    logger.remove()
    if log_format == "json":
        logger.add(_json_line, level=level, format="{message}", diagnose=False, backtrace=False)
    else:
        logger.add(sys.stderr, level=level, diagnose=False, backtrace=False)
    logging.basicConfig(handlers=[InterceptHandler()], level=logging.WARNING, force=True)
    logging.captureWarnings(True)
    for name in _APP_LEVEL_LOGGERS:
        std_logger = logging.getLogger(name)
        std_logger.handlers.clear()
        std_logger.propagate = True
    logging.getLogger("uvicorn").setLevel(logger.level(level).no)

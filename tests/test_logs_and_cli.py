"""What the command lines and the server print: help without banner or markup, one log
format (JSON lines with LOG_FORMAT=json), no stray prints, seed progress on a terminal."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]
#: Sphinx/RST markup that has no place in a terminal: ``literal``, :func:`x`, :data:`y`.
MARKUP = re.compile(r"``|:[a-z]+:`")
LOGURU_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \| [A-Z]+ +\| \S+:\S+:\d+ - ")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without settings that would change the output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOG_", "HOST"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def test_help_has_no_banner_and_no_markup(tmp_path: Path) -> None:
    commands = [
        ["runner.py", "--help"],
        ["runner.py", "tools", "--help"],
        ["runner.py", "campaign", "--help"],
        ["runner.py", "worker", "--help"],
        ["runner.py", "call", "--help"],
        ["seed_data.py", "--help"],
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / script), *args],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, *args in commands
    ]
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (command, err)
        assert out.startswith("usage: "), (command, out)
        assert err == "", (command, err)  # no Pipecat banner, no log line
        assert "Pipecat" not in out and not MARKUP.search(out), (command, out)


LOG_SCRIPT = """
import logging, sys, warnings
from loguru import logger
import runner
from core.settings import get_settings

settings = get_settings()
runner.configure_logging(settings.log_level, settings.log_format)
app = runner.create_app(settings)  # HOST is loopback: mounts /client
runner.uvicorn_config(app, settings)  # what the server does before serving
logger.bind(call_sid="CA123").info("app line")
logging.getLogger("uvicorn.error").info("Uvicorn running")
logging.getLogger("uvicorn.access").info(
    '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200
)
logging.getLogger("twilio.http_client").info("-- BEGIN Twilio API Request -- To=+15555550100")
warnings.warn("library warning")
if "--exception" in sys.argv:
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("it broke")
"""


def run_log_script(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOG_SCRIPT, *args],
        cwd=tmp_path,  # no .env
        env=clean_env(HOST="127.0.0.1", LOG_LEVEL="INFO", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    result = run_log_script(tmp_path, "--exception", LOG_FORMAT="json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # nothing printed past the logs (the /client mount included)
    lines = result.stderr.splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    for record in records:
        assert {"time", "level", "message", "module"} <= record.keys(), record
    by_message = {r["message"]: r for r in records}
    app_line = by_message["app line"]
    assert app_line["call_sid"] == "CA123" and app_line["level"] == "INFO"
    assert app_line["module"] == "__main__"
    assert by_message["Uvicorn running"]["level"] == "INFO"
    assert '127.0.0.1:5000 - "GET /health HTTP/1.1" 200' in by_message
    assert any("library warning" in r["message"] and r["level"] == "WARNING" for r in records)
    broke = by_message["it broke"]
    assert broke["level"] == "ERROR" and "ZeroDivisionError" in broke["exception"]
    # Libraries that log requests at INFO (Twilio's has the numbers in it) stay quiet.
    assert "+15555550100" not in result.stderr and "Twilio API Request" not in result.stderr


def test_text_logs_have_one_format(tmp_path: Path) -> None:
    result = run_log_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(LOGURU_LINE.match(line) for line in lines), lines
    assert any(line.endswith(" - Uvicorn running") for line in lines), lines
    assert any(line.endswith('"GET /health HTTP/1.1" 200') for line in lines), lines
    assert any("UserWarning: library warning" in line for line in lines), lines


def run_seed(url: str, *args: str, tty: bool) -> tuple[int, str]:
    """Run ``seed_data.py`` with stderr on a pseudo-terminal or a pipe; (code, stderr)."""
    command = [sys.executable, str(REPO / "seed_data.py"), "--anchor-date", "2026-11-30", *args]
    env = clean_env(DATABASE_URL=url)
    if not tty:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        return result.returncode, result.stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


@pytest.mark.timeout(300)
async def test_seed_shows_progress_on_a_terminal_only(fresh_db: str) -> None:
    code, terminal = await asyncio.to_thread(run_seed, fresh_db, "--customers", "50", tty=True)
    assert code == 0, terminal
    assert re.search(r"customers: +\d+%\|", terminal), terminal
    assert re.search(r"rows: +\d+%\|", terminal), terminal
    code, piped = await asyncio.to_thread(
        run_seed, fresh_db, "--customers", "50", "--reset", tty=False
    )
    assert code == 0, piped
    assert "%|" not in piped and "customers:" not in piped


def test_log_format_setting() -> None:
    assert Settings(_env_file=None).log_format == "text"
    assert Settings(_env_file=None, LOG_FORMAT=" JSON ").log_format == "json"
    assert Settings(_env_file=None, LOG_FORMAT="").log_format == "text"
    with pytest.raises(ValidationError, match="LOG_FORMAT"):
        Settings(_env_file=None, LOG_FORMAT="xml")

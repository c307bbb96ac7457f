"""Debian packages the tests need (chromium, espeak-ng, sox), installed when missing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable


def apt_install(
    packages: list[str], *, installed: Callable[[], bool], timeout: float = 900
) -> list[str]:
    """``apt-get install`` ``packages``, then ``apt-get update`` and again, until ``installed()``.

    Args:
        packages: Debian package names.
        installed: Whether what the caller needs is there now.
        timeout: Longest wait for each apt-get command, seconds.

    Returns:
        What each command printed (the tail of its stderr), for the caller's failure
        message when ``installed()`` is still False.
    """
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log: list[str] = []
    for command in (
        ["apt-get", "install", "-y", "-q", *packages],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", *packages],
    ):
        if installed():
            break
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            log.append(f"$ {' '.join(command)} -> {done.returncode}\n{done.stderr[-1500:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.append(f"$ {' '.join(command)} -> {exc}")
    return log

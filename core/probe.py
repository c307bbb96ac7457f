"""``python -m core.probe [PATH]``: exit 0 when this host's server answers ``PATH`` with 200.

The container image's ``HEALTHCHECK`` (``/health``) and anything else that must probe
the server from inside its own container without curl. It reads ``HOST`` and ``PORT``
like the server (a wildcard ``HOST`` is probed on the loopback address).
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from core.settings import get_settings

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
TIMEOUT_SECS = 4.0


def probe_url(path: str) -> str:
    """The URL of ``path`` on this host's server."""
    settings = get_settings()
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/{path.lstrip('/')}"


def main(argv: list[str]) -> int:
    """Probe once.

    Args:
        argv: ``[PATH]``; ``/health`` when empty.

    Returns:
        0 on HTTP 200, 1 otherwise.
    """
    url = probe_url(argv[0] if argv else "/health")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECS) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        print(f"{url}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

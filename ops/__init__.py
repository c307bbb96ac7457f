"""The service manager's console: server-rendered pages under ``/ops``.

:func:`mount_console` adds the pages (``ops.routes``), their static files and the security
headers of every console response to the web app.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Headers of every console response: no framing, no inline or foreign scripts, no caching.
SECURITY_HEADERS = {
    b"content-security-policy": (
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; media-src 'self' https:; frame-ancestors 'none'; "
        b"form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"same-origin",
}


class ConsoleHeaders:
    """ASGI middleware: security headers (and ``no-store`` on pages) under ``/ops``."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap ``app``."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the headers to responses of console paths."""
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path == "/ops" or path.startswith("/ops/")):
            await self.app(scope, receive, send)
            return
        static = path.startswith("/ops/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() not in SECURITY_HEADERS
                ]
                headers.extend(SECURITY_HEADERS.items())
                if not static:
                    headers = [(k, v) for k, v in headers if k.lower() != b"cache-control"]
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_console(app: FastAPI) -> None:
    """Add the console to ``app``: static files, pages and the response headers."""
    from ops.routes import router

    app.mount("/ops/static", StaticFiles(directory=STATIC_DIR), name="ops-static")
    app.include_router(router)
    app.add_middleware(ConsoleHeaders)

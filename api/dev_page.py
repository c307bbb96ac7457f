"""The browser test page's HTML: the call page, its login and refusal pages, and the
"disabled" page served at ``/client`` when ``WEBRTC_DEV`` is off.

Server-rendered Jinja2 templates (``api/templates``) in the ops console's look (its
``/ops/static/console.css`` plus ``/client/static/dev_page.css``); the call page's script is
``/client/static/dev_page.js``. No CDN, no inline script or style: every page carries a
strict Content-Security-Policy.

This module imports no WebRTC code, so the disabled page costs nothing to mount.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from core.profile import ProfileError, load_profile
from core.settings import Settings

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
#: Headers of every page under ``/client``: no framing, only this server's scripts and
#: styles, no caching (the page shows who may be called and the server's settings).
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob:; frame-ancestors 'none'; "
        "form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=()",
    "Cache-Control": "no-store",
}
FALLBACK_NAME = "Service department"


@functools.lru_cache(maxsize=4)
def _profile_name(path: str) -> str:
    try:
        return load_profile(path).name
    except ProfileError:
        return FALLBACK_NAME


def dealership_name(request: Request) -> str:
    """The dealership's name for the page header: the running server's profile, else the
    profile file the settings name (the app's resources are not open yet)."""
    resources = getattr(request.app.state, "resources", None)
    if resources is not None:
        return resources.profile.name
    settings: Settings | None = getattr(request.app.state, "settings", None)
    if settings is None:
        return FALLBACK_NAME
    return _profile_name(str(settings.dealership_profile))


def render(
    request: Request, template: str, context: dict[str, Any], *, status: int
) -> HTMLResponse:
    """A page of the browser test page.

    Args:
        request: The request (its app gives the dealership's name).
        template: Template file under ``api/templates``.
        context: Template values (``title`` at least).
        status: HTTP status.

    Returns:
        The rendered page with :data:`PAGE_HEADERS`.
    """
    return TEMPLATES.TemplateResponse(
        request,
        template,
        {"dealership": dealership_name(request), **context},
        status_code=status,
        headers=PAGE_HEADERS,
    )


def message_page(request: Request, *, status: int, title: str, **context: Any) -> HTMLResponse:
    """A page that says one thing (login, refusal, disabled): ``dev_message.html``.

    Args:
        request: The request.
        status: HTTP status.
        title: The page's heading.
        **context: ``kind`` (``login``, ``disabled``, ``bad_caller``, ``not_found``) and
            what that kind shows.
    """
    return render(request, "dev_message.html", {"title": title, **context}, status=status)


def disabled_page(request: Request) -> HTMLResponse:
    """404: the browser test page is off on this server, and how to turn it on."""
    return message_page(
        request, status=404, title="The browser test page is disabled", kind="disabled"
    )


def mount_disabled_page(app: FastAPI) -> None:
    """Answer ``/client`` (and anything under it) with :func:`disabled_page`.

    Only the page: the signalling routes (``/start``, ``/api/offer``, ...) do not exist
    when ``WEBRTC_DEV`` is off.
    """

    async def disabled(request: Request) -> HTMLResponse:
        return disabled_page(request)

    for path in ("/client", "/client/{rest:path}"):
        app.add_api_route(
            path, disabled, methods=["GET", "HEAD"], include_in_schema=False, name=None
        )

"""FastAPI dependencies shared by the routes (``Annotated[..., Depends(...)]``).

* :data:`SettingsDep`: the settings the app was created with.
* :data:`ResourcesDep`: the process resources (pool, Redis, profile) the lifespan opened.
* :data:`AdminDep`: ``Authorization: Bearer <ADMIN_TOKEN>`` (503 without a token set,
  401 for a missing or wrong one).
* :data:`TwilioFormDep` (calls) and :data:`TwilioTextFormDep` (texts, a larger body):
  the url-encoded form of a Twilio webhook whose ``X-Twilio-Signature`` is valid: 503
  naming the missing settings, 415 / 413 / 400 for a body of the wrong type, size or
  shape, 403 for a missing or wrong signature. Its refusals are :class:`BadWebhook`
  errors, answered in plain text by :func:`bad_webhook_response` (installed by
  ``runner.create_app``).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from starlette.requests import ClientDisconnect, HTTPConnection

from core.resources import AppResources
from core.settings import Settings
from core.tokens import bearer_token, token_matches
from telephony import twilio as tw

#: Twilio's call webhook forms are a few dozen short fields.
MAX_WEBHOOK_BODY_BYTES = 64 * 1024
#: An inbound text's form carries its body (any text the sender typed, percent-encoded):
#: the texts' routes take up to 1 MiB, as Starlette's own form parsing did.
MAX_TEXT_WEBHOOK_BODY_BYTES = 1024 * 1024
MAX_WEBHOOK_FIELDS = 200


class BadWebhook(Exception):
    """A webhook request that gets a clear 4xx (or 503) answer.

    Args:
        status: HTTP status of the answer.
        message: Short plain-text body (no request content echoed).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        """The plain-text answer."""
        return PlainTextResponse(self.message, status_code=self.status)


async def bad_webhook_response(_request: Request, exc: Exception) -> Response:
    """Exception handler: a :class:`BadWebhook` raised by a dependency, in plain text."""
    assert isinstance(exc, BadWebhook)
    return exc.response()


def get_settings_dep(conn: HTTPConnection) -> Settings:
    """The settings the app was created with."""
    return conn.app.state.settings


def get_resources(conn: HTTPConnection) -> AppResources:
    """The process resources opened by the app's lifespan."""
    return conn.app.state.resources


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
ResourcesDep = Annotated[AppResources, Depends(get_resources)]


async def require_admin(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    """Require ``Authorization: Bearer <ADMIN_TOKEN>``.

    Without ``ADMIN_TOKEN`` the admin routes are disabled: 503 with a message saying how to
    enable them. A missing or wrong token (any bytes, non-ASCII included) is a 401.
    """
    if settings.admin_token is None:
        raise HTTPException(
            status_code=503,
            detail="admin routes are disabled: set ADMIN_TOKEN (in the environment or "
            ".env) and restart the server to enable them",
        )
    if not token_matches(bearer_token(authorization), settings.admin_token.get_secret_value()):
        raise HTTPException(
            status_code=401,
            detail="admin token required",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Annotated[None, Depends(require_admin)]


async def read_form(request: Request, *, max_bytes: int) -> dict[str, str]:
    """The webhook's url-encoded form, read with a size cap (the last value of a repeated
    field wins, as in Starlette's form parsing).

    Args:
        request: The webhook request.
        max_bytes: Largest body accepted.

    Raises:
        BadWebhook: 415 for another content type, 413 for a body over ``max_bytes``, 400
            for a malformed body or a disconnect.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("", "application/x-www-form-urlencoded"):
        raise BadWebhook(415, "expected an application/x-www-form-urlencoded body")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise BadWebhook(413, "request body too large")
    except ClientDisconnect:
        raise BadWebhook(400, "client disconnected") from None
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_WEBHOOK_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise BadWebhook(400, "malformed form body") from None
    return dict(pairs)


class TwilioForm:
    """Dependency: the form of a Twilio webhook whose ``X-Twilio-Signature`` is valid.

    Args:
        max_bytes: Largest body accepted (413 above it).
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    async def __call__(self, request: Request, resources: ResourcesDep) -> dict[str, str]:
        """The signed form.

        Raises:
            BadWebhook: 503 when the settings a signature needs are missing; see
                :func:`read_form` for the body; 403 for a missing or wrong signature.
        """
        settings = resources.settings
        missing = [
            name
            for name, value in (
                ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token),
                ("PUBLIC_BASE_URL", settings.public_base_url),
            )
            if not value
        ]
        if missing:
            raise BadWebhook(503, f"Twilio webhooks disabled: missing {', '.join(missing)}")
        form = await read_form(request, max_bytes=self.max_bytes)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if not tw.signature_is_valid(
            settings,
            url=tw.public_url(settings, path),
            params=form,
            signature=request.headers.get("X-Twilio-Signature"),
        ):
            logger.warning(f"rejected unsigned or mis-signed Twilio request to {request.url.path}")
            raise BadWebhook(403, "invalid signature")
        return form


#: A call webhook's signed form.
TwilioFormDep = Annotated[dict[str, str], Depends(TwilioForm(max_bytes=MAX_WEBHOOK_BODY_BYTES))]
#: A text webhook's signed form (a larger body: the text itself).
TwilioTextFormDep = Annotated[
    dict[str, str], Depends(TwilioForm(max_bytes=MAX_TEXT_WEBHOOK_BODY_BYTES))
]

"""Browser test calls (``WEBRTC_DEV``): Pipecat's prebuilt SmallWebRTC page on the same bot.

A developer tool, off by default. ``runner.create_app`` mounts it only with
``WEBRTC_DEV=true`` and an ``ADMIN_TOKEN``, and refuses to when the server looks
exposed (``PUBLIC_BASE_URL`` set, or a non-loopback ``HOST``) unless
``WEBRTC_DEV_FORCE=true``.

Access: every route wants the admin token. The prebuilt page cannot send an
``Authorization`` header itself, so ``GET /client?token=<ADMIN_TOKEN>`` checks the token
once and sets an HttpOnly, SameSite=Strict cookie (a value derived from the token, not the
token itself) that the page's own requests then carry (the 401 page has a form that does
the same; the token is masked in uvicorn's access log). Scripts may send
``Authorization: Bearer <ADMIN_TOKEN>`` instead. ``?caller=+1555...`` on ``/client`` picks
the demo customer to play (also accepted by ``/start``, as a query parameter or as
``{"body": {"caller": ...}}``).

Flow: ``GET /client`` serves the page; it calls ``POST /start`` (a pending session,
``{"sessionId"}``) and then ``/sessions/{id}/api/offer`` (POST for the SDP offer, PATCH
for ICE candidates). ``/api/offer`` works without a session. The server offers host
candidates only, which is all a browser on the same machine needs.

The number a browser caller gives selects a CRM record but is never credited as caller
ID: the session is built with ``caller_id_trusted=False``, so the bot does not greet by
name and verification needs two factors.

Pending sessions are bounded (:data:`MAX_PENDING_SESSIONS`, oldest evicted) and expire
after :data:`SESSION_TTL_SECS`; request bodies are capped at :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from loguru import logger
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from bot.call import run_call
from bot.pipeline import CallOptions
from core.settings import Settings
from core.tokens import bearer_token, derived_token, token_matches
from tools.context import CallSession

BROWSER_SAMPLE_RATE = 16000
DEFAULT_DEMO_CALLER = "+15555550100"
#: Settings a browser call needs (Twilio is not involved).
BROWSER_CALL_SETTINGS = ("OPENAI_API_KEY", "DEEPGRAM_API_KEY")
MAX_BODY_BYTES = 16 * 1024
MAX_PENDING_SESSIONS = 100
SESSION_TTL_SECS = 300.0
MAX_ICE_CANDIDATES = 64
AUTH_COOKIE = "voice_agent_dev"
CALLER_COOKIE = "voice_agent_dev_caller"
_COOKIE_PURPOSE = "webrtc-dev-cookie"
E164 = re.compile(r"\+[1-9][0-9]{7,14}")
#: Lines every browser offer has; without them the WebRTC stack fails later, in the background.
_REQUIRED_SDP = {
    line: re.compile(rf"^{line}", re.MULTILINE)
    for line in ("m=audio ", "a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:")
}

router = APIRouter()


class DevClientError(Exception):
    """A refusal of a browser-client route: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra or {}


def valid_caller(value: object) -> str:
    """The caller number if it is E.164 text.

    Args:
        value: What the client sent.

    Returns:
        The number.

    Raises:
        DevClientError: 422 when it is not an E.164 string.
    """
    if not isinstance(value, str) or not E164.fullmatch(value):
        raise DevClientError(422, "caller must be an E.164 phone number, e.g. +15555550100")
    return value


def caller_param(raw: str) -> str:
    """The caller of a ``?caller=`` query parameter.

    A ``+`` typed into a URL arrives as a space (form encoding), so digits alone are read
    as an E.164 number with its ``+``.

    Raises:
        DevClientError: 422 when it is not an E.164 number.
    """
    value = raw.strip()
    if value.isdigit():
        value = "+" + value
    return valid_caller(value)


class PendingSessions:
    """Sessions registered by ``/start``, waiting for their offer: bounded and expiring.

    Only the caller number is kept. Each access renews a session's lease; when the table
    is full the least recently used session is evicted.

    Args:
        max_sessions: Most sessions kept.
        ttl_secs: Seconds a session lives after its last use.
        clock: Monotonic clock (seconds).
    """

    def __init__(
        self,
        *,
        max_sessions: int = MAX_PENDING_SESSIONS,
        ttl_secs: float = SESSION_TTL_SECS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sessions = max_sessions
        self.ttl_secs = ttl_secs
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def _expire(self) -> None:
        now = self.clock()
        while self._entries:
            session_id, (expires_at, _) = next(iter(self._entries.items()))
            if expires_at > now:
                break
            del self._entries[session_id]

    def add(self, caller: str) -> str:
        """Register a session for ``caller``.

        Args:
            caller: E.164 number the browser caller plays.

        Returns:
            The new session id.
        """
        self._expire()
        while len(self._entries) >= self.max_sessions:
            self._entries.popitem(last=False)
        session_id = str(uuid.uuid4())
        self._entries[session_id] = (self.clock() + self.ttl_secs, caller)
        return session_id

    def get(self, session_id: str) -> str | None:
        """The caller of a live session (its lease renewed), or None.

        Args:
            session_id: Id returned by :meth:`add`.

        Returns:
            The caller number, or None when unknown or expired.
        """
        self._expire()
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        self._entries[session_id] = (self.clock() + self.ttl_secs, entry[1])
        self._entries.move_to_end(session_id)
        return entry[1]


class DevClient:
    """Per-app state of the browser client: access check, sessions, peer connections.

    Args:
        settings: The app's settings (``ADMIN_TOKEN`` must be set).
    """

    def __init__(self, settings: Settings) -> None:
        assert settings.admin_token is not None, "WEBRTC_DEV needs ADMIN_TOKEN"
        self._token = settings.admin_token.get_secret_value()
        self.cookie_value = derived_token(self._token, _COOKIE_PURPOSE)
        self.missing_settings = [
            name for name in settings.missing_call_settings() if name in BROWSER_CALL_SETTINGS
        ]
        self.sessions = PendingSessions()
        self.handler = SmallWebRTCRequestHandler()
        self.tasks: set[asyncio.Task] = set()

    def token_ok(self, token: str | None) -> bool:
        """Whether ``token`` is the admin token (constant time)."""
        return token_matches(token, self._token)

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the access cookie or ``Bearer <ADMIN_TOKEN>``."""
        if token_matches(request.cookies.get(AUTH_COOKIE), self.cookie_value):
            return True
        return self.token_ok(bearer_token(request.headers.get("authorization")))

    def require_calls_possible(self) -> None:
        """Raise 503 naming the missing settings when a browser call cannot work."""
        if self.missing_settings:
            raise DevClientError(
                503,
                "Browser calls are disabled until these settings are set: "
                + ", ".join(self.missing_settings)
                + " (in the environment or .env; see .env.example), then restart the server.",
                extra={"missing": self.missing_settings},
            )

    async def close(self) -> None:
        """Hang up the browser calls in progress (server shutdown).

        Peer connections are closed first so calls end (and record their outcome) on
        their own; any still running after a few seconds are cancelled.
        """
        with contextlib.suppress(Exception):
            await self.handler.close()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(list(self.tasks), timeout=5)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


def get_dev_client(request: Request) -> DevClient:
    """The app's browser-client state (mounted by :func:`mount_client`)."""
    return request.app.state.webrtc


DevClientDep = Annotated[DevClient, Depends(get_dev_client)]


async def require_access(request: Request, dev: DevClientDep) -> None:
    """Route dependency: the access cookie or ``Authorization: Bearer <ADMIN_TOKEN>``."""
    if not dev.authorized(request):
        raise DevClientError(
            401,
            "admin token required: open /client?token=<ADMIN_TOKEN> in this browser, or send "
            "Authorization: Bearer <ADMIN_TOKEN>",
        )


def browser_call_session(caller: str) -> CallSession:
    """The session of a browser call playing ``caller``.

    The number selects the CRM record but is not a carrier-verified caller ID.

    Args:
        caller: E.164 number of the demo customer to play.

    Returns:
        A new inbound session with ``caller_id_trusted=False``.
    """
    return CallSession(
        call_sid=f"webrtc-{uuid.uuid4().hex[:16]}",
        caller_phone=caller,
        caller_id_trusted=False,
    )


# --- Request bodies ------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    """The request's JSON body, at most :data:`MAX_BODY_BYTES`; None when empty.

    Raises:
        DevClientError: 413 too large, 400 not UTF-8 JSON.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise DevClientError(400, "invalid Content-Length")
        if int(declared) > MAX_BODY_BYTES:
            raise DevClientError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise DevClientError(413, f"request body over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DevClientError(400, "request body is not UTF-8 JSON") from None


_M = TypeVar("_M", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class OfferBody(_Strict):
    """``POST .../api/offer``: the browser's SDP offer."""

    sdp: str = Field(min_length=1)
    type: Literal["offer"]
    pc_id: str | None = Field(default=None, min_length=1, max_length=128)
    restart_pc: bool | None = None


class CandidateBody(_Strict):
    """One ICE candidate of a PATCH."""

    candidate: str = Field(max_length=1024)
    sdp_mid: str | None = Field(default=None, max_length=64)
    sdp_mline_index: int = Field(ge=0, le=64)


class PatchBody(_Strict):
    """``PATCH .../api/offer``: trickled ICE candidates."""

    pc_id: str = Field(min_length=1, max_length=128)
    candidates: list[CandidateBody] = Field(default_factory=list, max_length=MAX_ICE_CANDIDATES)


def _parse(model: type[_M], data: Any, what: str) -> _M:
    if not isinstance(data, dict):
        raise DevClientError(422, f"{what} must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise DevClientError(422, f"invalid {what}: {problems}") from None


def _start_caller(request: Request, data: Any) -> str:
    """The caller a ``/start`` asks for: query, then body, then the page's cookie."""
    if "caller" in request.query_params:
        return caller_param(request.query_params["caller"])
    if data is not None and not isinstance(data, dict):
        raise DevClientError(422, "start request must be a JSON object")
    data = data or {}
    inner = data.get("body")
    if inner is not None and not isinstance(inner, dict):
        raise DevClientError(422, "body must be a JSON object")
    for source in (inner or {}, data):
        if "caller" in source:
            return valid_caller(source["caller"])
    cookie = request.cookies.get(CALLER_COOKIE)
    if cookie and E164.fullmatch(cookie):
        return cookie
    return DEFAULT_DEMO_CALLER


# --- Routes --------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """Send a browser to the client page."""
    return RedirectResponse(url="/client/")


@router.post("/start", dependencies=[Depends(require_access)])
async def start(request: Request, dev: DevClientDep) -> dict[str, Any]:
    """Register a browser session; the bot starts when its WebRTC offer arrives."""
    dev.require_calls_possible()
    caller = _start_caller(request, await read_json(request))
    return {"sessionId": dev.sessions.add(caller)}


@router.api_route("/api/offer", methods=["POST", "PATCH"], dependencies=[Depends(require_access)])
async def offer(request: Request, dev: DevClientDep) -> Any:
    """SDP offer (POST) or ICE candidates (PATCH) without a session id."""
    caller = request.cookies.get(CALLER_COOKIE)
    if not caller or not E164.fullmatch(caller):
        caller = DEFAULT_DEMO_CALLER
    return await _signal(request, dev, caller)


@router.api_route(
    "/sessions/{session_id}/api/offer",
    methods=["POST", "PATCH"],
    dependencies=[Depends(require_access)],
)
async def session_offer(session_id: str, request: Request, dev: DevClientDep) -> Any:
    """SDP offer or ICE candidates of a session registered by ``/start``."""
    caller = dev.sessions.get(session_id)
    if caller is None:
        raise DevClientError(404, "unknown or expired session: start a new one")
    return await _signal(request, dev, caller)


async def _signal(request: Request, dev: DevClient, caller: str) -> Any:
    data = await read_json(request)
    if request.method == "PATCH":
        patch = _parse(PatchBody, data, "ICE candidates")
        try:
            await dev.handler.handle_patch_request(
                SmallWebRTCPatchRequest(
                    pc_id=patch.pc_id,
                    candidates=[
                        IceCandidate(
                            candidate=c.candidate,
                            sdp_mid=c.sdp_mid,  # type: ignore[arg-type]
                            sdp_mline_index=c.sdp_mline_index,
                        )
                        for c in patch.candidates
                    ],
                )
            )
        except HTTPException:
            raise
        except Exception as exc:
            logger.info(f"browser ICE candidates refused: {type(exc).__name__}")
            raise DevClientError(400, "not a usable ICE candidate") from None
        return {"status": "success"}
    sdp_offer = _parse(OfferBody, data, "offer")
    missing = [line for line, pattern in _REQUIRED_SDP.items() if not pattern.search(sdp_offer.sdp)]
    if missing:
        raise DevClientError(422, "the offer lacks " + ", ".join(missing))
    dev.require_calls_possible()

    async def on_connection(connection: SmallWebRTCConnection) -> None:
        task = asyncio.create_task(_run_browser_call(request.app, connection, caller))
        dev.tasks.add(task)
        task.add_done_callback(dev.tasks.discard)

    try:
        return await dev.handler.handle_web_request(
            request=SmallWebRTCRequest(
                sdp=sdp_offer.sdp,
                type=sdp_offer.type,
                pc_id=sdp_offer.pc_id,
                restart_pc=sdp_offer.restart_pc,
            ),
            webrtc_connection_callback=on_connection,
        )
    except HTTPException:
        raise
    except Exception as exc:
        logger.info(f"browser offer refused: {type(exc).__name__}")
        raise DevClientError(400, "not a usable WebRTC offer") from None


async def _run_browser_call(app: FastAPI, connection: SmallWebRTCConnection, caller: str) -> None:
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    )
    try:
        await run_call(
            transport=transport,
            session=browser_call_session(caller),
            resources=app.state.resources,
            options=CallOptions(sample_rate=BROWSER_SAMPLE_RATE),
        )
    except Exception as exc:
        logger.opt(exception=exc).error(f"browser call failed: {type(exc).__name__}")


# --- The page ------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;
padding:0 1rem;line-height:1.5}}code{{background:#eee;padding:0 .2em}}</style></head>
<body><h1>{title}</h1>{body}</body></html>
"""


def _page(status: int, title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=title, body=body),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def _login_page(wrong: bool) -> HTMLResponse:
    first = "That token is not this server's <code>ADMIN_TOKEN</code>." if wrong else ""
    return _page(
        401,
        "Browser test calls: admin token required",
        f"<p>{first}</p><p>Open <code>/client?token=&lt;ADMIN_TOKEN&gt;</code> once in this "
        "browser (the token from the server's <code>.env</code>), or enter it here. Add "
        "<code>&amp;caller=+15555550101</code> to play another demo customer.</p>"
        '<form method="get" action="/client/"><p><label>ADMIN_TOKEN '
        '<input type="password" name="token" autocomplete="off" required></label></p>'
        '<p><label>Customer phone (optional) <input name="caller" '
        'placeholder="+15555550100"></label></p><p><button>Open</button></p></form>',
    )


class ClientPage:
    """ASGI app at ``/client``: the access check, then Pipecat's prebuilt UI.

    ``?token=`` sets the access cookie, ``?caller=`` the customer to play (both redirect
    to ``/client/``). Without access: a 401 page that says how to get it. When browser
    calls cannot work, the page says which settings are missing instead of loading the UI.

    Args:
        dev: The app's browser-client state.
        static: The prebuilt UI's static files.
    """

    def __init__(self, dev: DevClient, static: ASGIApp) -> None:
        self.dev = dev
        self.static = static

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request under ``/client``."""
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        request = Request(scope, receive)
        response = self._gate(request)
        app = response if response is not None else self.static
        await app(scope, receive, send)

    def _gate(self, request: Request) -> Response | None:
        params = request.query_params
        token = params.get("token")
        if token is not None and not self.dev.token_ok(token):
            return _login_page(wrong=True)
        if token is None and not self.dev.authorized(request):
            return _login_page(wrong=False)
        caller = params.get("caller") or None  # the login form sends an empty field
        try:
            caller = caller_param(caller) if caller is not None else None
        except DevClientError:
            return _page(
                422,
                "Browser test calls: not a phone number",
                "<p><code>caller</code> must be an E.164 number such as "
                "<code>+15555550101</code>.</p>",
            )
        if token is not None or caller is not None:
            redirect = RedirectResponse(
                "/client/", status_code=303, headers={"Cache-Control": "no-store"}
            )
            secure = request.url.scheme == "https"
            if token is not None:
                redirect.set_cookie(
                    AUTH_COOKIE,
                    self.dev.cookie_value,
                    httponly=True,
                    samesite="strict",
                    secure=secure,
                    path="/",
                )
            if caller is not None:
                redirect.set_cookie(
                    CALLER_COOKIE, caller, httponly=True, samesite="strict", secure=secure, path="/"
                )
            return redirect
        if self.dev.missing_settings and request.url.path in (
            "/client",
            "/client/",
            "/client/index.html",
        ):
            names = ", ".join(f"<code>{n}</code>" for n in self.dev.missing_settings)
            return _page(
                503,
                "Browser test calls are not available",
                f"<p>The server is missing {names}. Set them in the environment or "
                "<code>.env</code> (see <code>.env.example</code>) and restart the "
                "server.</p>",
            )
        return None


class RedactTokenFilter(logging.Filter):
    """Hides ``token=`` query values in uvicorn's access log (the ``/client?token=`` link)."""

    _TOKEN = re.compile(r"(?<=[?&]token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the request line's token; never drops the record."""
        if isinstance(record.args, tuple) and any(
            isinstance(a, str) and "token=" in a for a in record.args
        ):
            record.args = tuple(
                self._TOKEN.sub("***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def _redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokenFilter) for f in access.filters):
        access.addFilter(RedactTokenFilter())


def mount_client(app: FastAPI, settings: Settings) -> DevClient:
    """Mount the guarded prebuilt UI at ``/client`` and the WebRTC signalling routes.

    Args:
        app: The web app.
        settings: Its settings (``ADMIN_TOKEN`` set).

    Returns:
        The client's state, also at ``app.state.webrtc``.
    """
    # The package prints where it looks for its files on import; nothing to tell anyone.
    with contextlib.redirect_stdout(io.StringIO()):
        from pipecat_ai_prebuilt.frontend import PipecatPrebuiltUI

    dev = DevClient(settings)
    app.state.webrtc = dev
    _redact_access_log()

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DevClientError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(
            {"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers
        )

    app.add_exception_handler(DevClientError, refused)
    app.include_router(router)
    app.mount("/client", ClientPage(dev, PipecatPrebuiltUI))
    return dev

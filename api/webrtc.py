"""Browser test calls (``WEBRTC_DEV``): the dealership's test page at ``/client``.

A developer tool, off by default. ``runner.create_app`` mounts it only with
``WEBRTC_DEV=true`` and an ``ADMIN_TOKEN``, and refuses to when the server looks
exposed (``PUBLIC_BASE_URL`` set, or a non-loopback ``HOST``) unless
``WEBRTC_DEV_FORCE=true``. With it off, ``/client`` is a 404 page that says how to turn
it on (:mod:`api.dev_page`) and none of the routes below exist.

The page (server-rendered, ``api/templates/dev_page.html`` and
``api/static/dev_page.js``) lists the demo customers of the CRM to call as (first name and
masked number only; ``crm.customers.demo_callers``) plus an unknown caller, a Call / Hang
up button and the call's transcript. When the speech keys are missing it says which, and
the Call button is disabled.

Access: every route wants the admin token. ``GET /client?token=<ADMIN_TOKEN>`` checks the
token once and sets an HttpOnly, SameSite=Strict cookie (a value derived from the token,
not the token itself) that the page's own requests then carry (the 401 page has a form that
does the same; the token is masked in uvicorn's access log). Scripts may send
``Authorization: Bearer <ADMIN_TOKEN>`` instead. ``?caller=+1555...`` on ``/client`` picks
the customer the page starts with.

Flow: the page calls ``POST /start`` (``{"body": {"customer_id": 1}}``, ``{"body":
{"caller": "+15555550101"}}`` or ``{"body": {"caller": "unknown"}}``; a pending session,
``{"sessionId"}``), then ``/sessions/{id}/api/offer`` (POST for the SDP offer, answered
with the SDP answer, its ``pc_id`` and the new call's ``call_sid``; PATCH for ICE
candidates). ``/api/offer`` works without a session. The server offers host candidates
only, which is all a browser on the same machine needs. The transcript comes from
``GET /client/calls/{call_sid}/transcript?after=N``: the turns of the call's session
snapshot in Redis (masked like the ops console's), polled by the page.

The number a browser caller gives selects a CRM record but is never credited as caller
ID: the session is built with ``caller_id_trusted=False``, so the bot does not greet by
name and verification needs two factors.

Pending sessions are bounded (:data:`MAX_PENDING_SESSIONS`, oldest evicted) and expire
after :data:`SESSION_TTL_SECS`; request bodies are capped at :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
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
from psycopg import Error as DatabaseError
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from api.dev_page import STATIC_DIR, message_page, render
from bot.call import run_call
from bot.pipeline import CallOptions
from core.pii import mask_phone, redact_text
from core.settings import Settings
from core.tokens import bearer_token, derived_token, token_matches
from crm import customers as crm_customers
from processors.session_snapshot import SnapshotStore
from tools.context import CallSession

BROWSER_SAMPLE_RATE = 16000
DEFAULT_DEMO_CALLER = "+15555550100"
#: What ``/start`` takes for a caller without caller ID (kept as "" in the session table).
UNKNOWN_CALLER = "unknown"
#: Demo customers listed on the page.
MAX_LISTED_CALLERS = 20
MAX_CUSTOMER_ID = 2**62
#: Longest wait for the CRM (the page's list, a ``customer_id`` of ``/start``).
DB_TIMEOUT_SECS = 5.0
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
BROWSER_CALL_SID = re.compile(r"webrtc-[0-9a-f]{16}")
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
    """The caller number if it is E.164 text; ``"unknown"`` (no caller ID) becomes ``""``.

    Args:
        value: What the client sent.

    Returns:
        The number, or ``""`` for a caller without caller ID.

    Raises:
        DevClientError: 422 when it is neither.
    """
    if value == UNKNOWN_CALLER:
        return ""
    if not isinstance(value, str) or not E164.fullmatch(value):
        raise DevClientError(
            422, 'caller must be an E.164 phone number, e.g. +15555550100, or "unknown"'
        )
    return value


def caller_param(raw: str) -> str:
    """The caller of a ``?caller=`` query parameter.

    A ``+`` typed into a URL arrives as a space (form encoding), so digits alone are read
    as an E.164 number with its ``+``.

    Raises:
        DevClientError: 422 when it is not an E.164 number (or ``unknown``).
    """
    value = raw.strip()
    if value.isdigit():
        value = "+" + value
    return valid_caller(value)


class PendingSessions:
    """Sessions registered by ``/start``, waiting for their offer: bounded and expiring.

    Only the caller number is kept (``""`` for a caller without caller ID). Each access
    renews a session's lease; when the table is full the least recently used session is
    evicted.

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
            caller: E.164 number the browser caller plays, ``""`` for no caller ID.

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
            The caller number (``""``: no caller ID), or None when unknown or expired.
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
        caller: E.164 number of the demo customer to play; ``""`` for a caller without
            caller ID (as when a phone withholds its number).

    Returns:
        A new inbound session with ``caller_id_trusted=False``.
    """
    return CallSession(
        call_sid=f"webrtc-{uuid.uuid4().hex[:16]}",
        caller_phone=caller or None,
        caller_id_trusted=False,
    )


@contextlib.asynccontextmanager
async def _crm(request: Request):
    """A CRM connection of the app, or DevClientError 503 when there is none to be had."""
    resources = getattr(request.app.state, "resources", None)
    if resources is None:
        raise DevClientError(503, "the server's database is not open yet")
    try:
        async with asyncio.timeout(DB_TIMEOUT_SECS), resources.db.connection() as conn:
            yield conn
    except (DatabaseError, PoolTimeout, OSError, TimeoutError) as exc:
        logger.warning(f"browser test page: database unavailable ({type(exc).__name__})")
        raise DevClientError(503, "the database is not answering; try again shortly") from None


async def demo_caller_list(request: Request) -> list[crm_customers.DemoCaller]:
    """The demo customers the page offers (see :func:`crm.customers.demo_callers`).

    Raises:
        DevClientError: 503 when the database is not available.
    """
    async with _crm(request) as conn:
        return await crm_customers.demo_callers(conn, limit=MAX_LISTED_CALLERS)


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


async def _start_caller(request: Request, data: Any) -> str:
    """The caller a ``/start`` asks for: query, then body (``caller`` or a demo
    ``customer_id``), then the page's cookie, then :data:`DEFAULT_DEMO_CALLER`."""
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
        if "customer_id" in source:
            return await _demo_customer_phone(request, source["customer_id"])
    return _cookie_caller(request)


def _cookie_caller(request: Request) -> str:
    """The caller the ``?caller=`` link chose (cookie), else :data:`DEFAULT_DEMO_CALLER`."""
    cookie = request.cookies.get(CALLER_COOKIE)
    if cookie == UNKNOWN_CALLER:
        return ""
    if cookie and E164.fullmatch(cookie):
        return cookie
    return DEFAULT_DEMO_CALLER


async def _demo_customer_phone(request: Request, customer_id: object) -> str:
    """The number of a demo customer the page listed, by id."""
    if (
        isinstance(customer_id, bool)
        or not isinstance(customer_id, int)
        or not 0 < customer_id < MAX_CUSTOMER_ID
    ):
        raise DevClientError(422, "customer_id must be the id of a demo customer")
    async with _crm(request) as conn:
        found = await crm_customers.demo_caller(conn, customer_id)
    if found is None:
        raise DevClientError(422, "customer_id is not one of the demo customers")
    return found.phone


# --- Routes --------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """Send a browser to the client page."""
    return RedirectResponse(url="/client/")


@router.post("/start", dependencies=[Depends(require_access)])
async def start(request: Request, dev: DevClientDep) -> dict[str, Any]:
    """Register a browser session; the bot starts when its WebRTC offer arrives."""
    dev.require_calls_possible()
    caller = await _start_caller(request, await read_json(request))
    return {"sessionId": dev.sessions.add(caller)}


@router.api_route("/api/offer", methods=["POST", "PATCH"], dependencies=[Depends(require_access)])
async def offer(request: Request, dev: DevClientDep) -> Any:
    """SDP offer (POST) or ICE candidates (PATCH) without a session id."""
    return await _signal(request, dev, _cookie_caller(request))


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
    started: list[str] = []

    async def on_connection(connection: SmallWebRTCConnection) -> None:
        session = browser_call_session(caller)
        started.append(session.call_sid)
        task = asyncio.create_task(_run_browser_call(request.app, connection, session))
        dev.tasks.add(task)
        task.add_done_callback(dev.tasks.discard)

    try:
        answer = await dev.handler.handle_web_request(
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
    if answer is not None and started:
        # The page follows the new call's transcript by this id.
        answer = {**answer, "call_sid": started[0]}
    return answer


@router.get("/client/calls/{call_sid}/transcript", dependencies=[Depends(require_access)])
async def call_transcript(
    call_sid: str, request: Request, after: Annotated[int, Query(ge=0, le=100_000)] = 0
) -> dict[str, Any]:
    """The transcript of a browser call, from its session snapshot in Redis.

    ``turns`` are the snapshot's turns numbered from 0 (``n``), those from ``after`` on,
    masked like the ops console's; the snapshot keeps the last few turns only, so a page
    polls often enough to see them all. ``found`` is False until the call's first
    snapshot; ``finished`` once the call has ended.
    """
    if not BROWSER_CALL_SID.fullmatch(call_sid):
        raise DevClientError(404, "not a browser call")
    resources = getattr(request.app.state, "resources", None)
    if resources is None:
        raise DevClientError(503, "the server's Redis is not open yet")
    store = SnapshotStore(resources.redis, prefix=resources.settings.redis_key_prefix)
    try:
        snapshot = await asyncio.wait_for(store.read(call_sid), DB_TIMEOUT_SECS)
    except (RedisError, OSError, TimeoutError) as exc:
        logger.warning(f"browser test page: Redis unavailable ({type(exc).__name__})")
        raise DevClientError(503, "the call's transcript is unavailable (Redis is down)") from None
    except ValueError:  # not JSON
        snapshot = None
    if snapshot is None:
        return {"call_sid": call_sid, "found": False, "finished": False, "turns": []}
    return {
        "call_sid": call_sid,
        "found": True,
        "finished": bool(snapshot.get("finished")),
        "verified": snapshot.get("verified_customer_id") is not None,
        "turns": [turn for turn in _numbered_turns(snapshot) if turn["n"] >= after],
    }


def _numbered_turns(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The snapshot's transcript turns, masked, each with its number in the call."""
    kept = snapshot.get("transcript")
    kept = [t for t in kept if isinstance(t, dict)] if isinstance(kept, list) else []
    total = snapshot.get("transcript_turns")
    if isinstance(total, bool) or not isinstance(total, int) or total < len(kept):
        total = len(kept)
    first = total - len(kept)
    return [
        {
            "n": first + i,
            "role": "bot" if turn.get("role") in ("bot", "assistant") else "caller",
            "text": redact_text(str(turn.get("text") or ""))[:4000],
            "interrupted": bool(turn.get("interrupted")),
        }
        for i, turn in enumerate(kept)
    ]


async def _run_browser_call(
    app: FastAPI, connection: SmallWebRTCConnection, session: CallSession
) -> None:
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    )
    try:
        await run_call(
            transport=transport,
            session=session,
            resources=app.state.resources,
            options=CallOptions(sample_rate=BROWSER_SAMPLE_RATE),
        )
    except Exception as exc:
        logger.opt(exception=exc).error(f"browser call failed: {type(exc).__name__}")


# --- The page ------------------------------------------------------------------------

#: Addresses of the call page itself (anything else under ``/client`` is a static file or
#: a 404 page).
PAGE_PATHS = ("/client", "/client/", "/client/index.html")
STATIC_PREFIX = "/client/static/"


def _login_page(request: Request, *, wrong: bool) -> Response:
    return message_page(
        request,
        status=401,
        title="Browser test calls: admin token required",
        kind="login",
        wrong=wrong,
    )


async def call_page(request: Request, dev: DevClient) -> Response:
    """The call page: demo customers to call as, Call / Hang up, the transcript.

    503 (with the page) when the speech keys are missing: it names them and the Call
    button is disabled. Without the database the list says so; an unknown caller (and the
    number of a ``?caller=`` link) can still be called.
    """
    cookie = request.cookies.get(CALLER_COOKIE)
    unknown = cookie == UNKNOWN_CALLER
    chosen = cookie if cookie and E164.fullmatch(cookie) else None
    callers: list[dict[str, Any]] = []
    callers_error = None
    try:
        rows = await demo_caller_list(request)
    except DevClientError as exc:
        rows = []
        callers_error = f"The demo customers cannot be listed: {exc.message}."
    selected = chosen if any(r.phone == chosen for r in rows) else None
    if chosen is None and rows and not unknown:
        selected = rows[0].phone
    for row in rows:
        callers.append(
            {
                "id": row.id,
                "first_name": row.first_name,
                "phone": mask_phone(row.phone),
                "selected": row.phone == selected,
            }
        )
    link_caller = mask_phone(chosen) if chosen is not None and selected != chosen else None
    return render(
        request,
        "dev_page.html",
        {
            "title": "Test call",
            "styled": True,
            "missing": dev.missing_settings,
            "callers": callers,
            "callers_error": callers_error,
            "link_caller": link_caller,
            "unknown_selected": unknown or (not rows and chosen is None),
        },
        status=503 if dev.missing_settings else 200,
    )


class ClientPage:
    """ASGI app at ``/client``: the access check, then the call page or its static files.

    ``?token=`` sets the access cookie, ``?caller=`` the customer the page starts with
    (both redirect to ``/client/``). Without access: a 401 page that says how to get it.

    Args:
        dev: The app's browser-client state.
    """

    def __init__(self, dev: DevClient) -> None:
        self.dev = dev
        self.static: ASGIApp = StaticFiles(directory=STATIC_DIR)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request under ``/client``."""
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        request = Request(scope, receive)
        response = self._gate(request)
        if response is None:
            path = request.url.path
            if path in PAGE_PATHS:
                response = await call_page(request, self.dev)
            elif path.startswith(STATIC_PREFIX):
                # StaticFiles serves the path below the mount point.
                scope = {**scope, "path": path.removeprefix("/client/static")}
                await self.static(scope, receive, send)
                return
            else:
                response = message_page(
                    request,
                    status=404,
                    title="Not found",
                    kind="not_found",
                    message="There is no such page here.",
                )
        await response(scope, receive, send)

    def _gate(self, request: Request) -> Response | None:
        params = request.query_params
        token = params.get("token")
        if token is not None and not self.dev.token_ok(token):
            return _login_page(request, wrong=True)
        if token is None and not self.dev.authorized(request):
            return _login_page(request, wrong=False)
        caller = params.get("caller") or None  # the login form sends an empty field
        try:
            caller = caller_param(caller) if caller is not None else None
        except DevClientError:
            return message_page(
                request,
                status=422,
                title="Browser test calls: not a phone number",
                kind="bad_caller",
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
            if caller is not None:  # "" (?caller=unknown): no caller ID
                redirect.set_cookie(
                    CALLER_COOKIE,
                    caller or UNKNOWN_CALLER,
                    httponly=True,
                    samesite="strict",
                    secure=secure,
                    path="/",
                )
            return redirect
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
    """Mount the guarded test page at ``/client`` and the WebRTC signalling routes.

    Args:
        app: The web app.
        settings: Its settings (``ADMIN_TOKEN`` set).

    Returns:
        The client's state, also at ``app.state.webrtc``.
    """
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
    app.mount("/client", ClientPage(dev))
    return dev

"""Local browser calls: Pipecat's prebuilt SmallWebRTC page running the same bot.

``GET /client`` serves the prebuilt UI; it calls ``POST /start`` and then
``/sessions/{id}/api/offer`` (POST for the SDP offer, PATCH for ICE candidates). The
server offers host candidates only, which is all a browser on localhost needs. The
caller is whoever ``?caller=+1555...`` (or the start body's ``caller``) says, so a
developer can act as any demo customer; this is a developer tool and is only mounted
when the server listens on a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
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

from bot.pipeline import CallOptions, run_call
from tools.context import CallSession

BROWSER_SAMPLE_RATE = 16000
DEFAULT_DEMO_CALLER = "+15555550100"

router = APIRouter()
_handler = SmallWebRTCRequestHandler()
_sessions: dict[str, dict[str, Any]] = {}
_tasks: set[asyncio.Task] = set()


def mount_client(app: FastAPI) -> None:
    """Mount the prebuilt UI at ``/client`` and the WebRTC signalling routes."""
    # The package prints where it looks for its files on import; nothing to tell anyone.
    with contextlib.redirect_stdout(io.StringIO()):
        from pipecat_ai_prebuilt.frontend import PipecatPrebuiltUI

    app.include_router(router)
    app.mount("/client", PipecatPrebuiltUI)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    """Send a browser to the client page."""
    return RedirectResponse(url="/client/")


@router.post("/start")
async def start(request: Request) -> dict[str, Any]:
    """Register a browser session; the bot starts when its WebRTC offer arrives."""
    try:
        data = await request.json()
    except Exception:
        data = {}
    session_id = str(uuid.uuid4())
    body = data.get("body") or {}
    body.setdefault("caller", request.query_params.get("caller") or DEFAULT_DEMO_CALLER)
    _sessions[session_id] = body
    return {"sessionId": session_id}


async def _run_browser_call(request: Request, connection: SmallWebRTCConnection, body: dict):
    resources = request.app.state.resources
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True),
    )
    session = CallSession(
        call_sid=f"webrtc-{uuid.uuid4().hex[:16]}",
        caller_phone=str(body.get("caller") or DEFAULT_DEMO_CALLER),
    )
    try:
        await run_call(
            transport=transport,
            session=session,
            resources=resources,
            options=CallOptions(sample_rate=BROWSER_SAMPLE_RATE),
        )
    except Exception as exc:
        logger.opt(exception=exc).error(f"browser call failed: {type(exc).__name__}")


async def _offer(request: Request, data: dict, body: dict) -> Any:
    webrtc_request = SmallWebRTCRequest(
        sdp=data["sdp"],
        type=data["type"],
        pc_id=data.get("pc_id"),
        restart_pc=data.get("restart_pc"),
        request_data=body,
    )

    async def on_connection(connection: SmallWebRTCConnection) -> None:
        task = asyncio.create_task(_run_browser_call(request, connection, body))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)

    return await _handler.handle_web_request(
        request=webrtc_request, webrtc_connection_callback=on_connection
    )


async def _patch(data: dict) -> dict[str, str]:
    await _handler.handle_patch_request(
        SmallWebRTCPatchRequest(
            pc_id=data["pc_id"],
            candidates=[IceCandidate(**c) for c in data.get("candidates", [])],
        )
    )
    return {"status": "success"}


@router.api_route("/api/offer", methods=["POST", "PATCH"])
async def offer(request: Request) -> Any:
    """SDP offer (POST) or ICE candidates (PATCH) without a session id."""
    data = await request.json()
    if request.method == "PATCH":
        return await _patch(data)
    return await _offer(request, data, {"caller": DEFAULT_DEMO_CALLER})


@router.api_route("/sessions/{session_id}/api/offer", methods=["POST", "PATCH"])
async def session_offer(session_id: str, request: Request) -> Any:
    """SDP offer or ICE candidates of a session registered by ``/start``."""
    body = _sessions.get(session_id)
    if body is None:
        return JSONResponse({"error": "unknown session"}, status_code=404)
    data = await request.json()
    if request.method == "PATCH":
        return await _patch(data)
    return await _offer(request, data, body)

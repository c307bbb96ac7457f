"""Graceful drain of one worker process, and its readiness.

On SIGTERM (sent by ``runner.py serve``'s parent, which receives it from Docker or
Kubernetes) a worker:

1. stops being ready: ``GET /ready`` answers 503 while ``GET /health`` stays 200, so the
   load balancer stops sending it new calls;
2. after ``DRAIN_GRACE_SECS`` (the load balancer's time to notice) refuses new media
   streams: the websocket handshake gets HTTP 503, which a proxy retries on another
   instance; webhooks are still answered (their stream may land anywhere);
3. lets live calls finish, until ``DRAIN_TIMEOUT_SECS`` after the signal;
4. ends the calls still going with a spoken goodbye (:mod:`bot.live_calls`), waits for
   them to be recorded, and exits 0.

:class:`DrainingServer` is the uvicorn server of a worker process; :func:`install_drain`
adds the ``/ready`` route and the media-stream gate to the app.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from loguru import logger

from bot import live_calls
from core import metrics
from core.resources import check_database, check_redis
from core.settings import Settings

#: The paths whose websockets are calls (Twilio media streams).
MEDIA_STREAM_PATHS = frozenset({"/twilio/media"})
#: After the goodbyes, how long the calls get to play them and hang up.
GOODBYE_WAIT_SECS = 60.0
#: ``Retry-After`` of a refused media stream.
RETRY_AFTER_SECS = 5

router = APIRouter()


class Drain:
    """The drain state of one worker process.

    Args:
        grace_secs: Seconds between "not ready" and refusing new media streams.
        timeout_secs: Seconds after the signal that live calls may go on.
        goodbye_wait_secs: Seconds the goodbyes get to play before the process exits.
    """

    def __init__(
        self,
        *,
        grace_secs: float,
        timeout_secs: float,
        goodbye_wait_secs: float = GOODBYE_WAIT_SECS,
    ) -> None:
        self.grace_secs = grace_secs
        self.timeout_secs = timeout_secs
        self.goodbye_wait_secs = goodbye_wait_secs
        self.began_at: float | None = None
        self.refusing_streams = False
        self.open_streams = 0
        self.goodbyes = 0
        self.task: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        """Whether the drain has begun."""
        return self.began_at is not None

    def live_calls(self) -> int:
        """Calls of this process still going: open media streams, or pipelines running
        (the browser client has no media stream)."""
        return max(self.open_streams, len(live_calls.live()))

    def begin(self, on_done: Callable[[], None] | None = None) -> asyncio.Task[None]:
        """Start draining (once); ``on_done`` runs when the calls are over.

        Returns:
            The drain task.
        """
        if self.task is None:
            self.began_at = time.monotonic()
            self.task = asyncio.create_task(self._run(on_done), name="drain")
        return self.task

    async def _run(self, on_done: Callable[[], None] | None) -> None:
        assert self.began_at is not None
        metrics.READY_WORKERS.set(0)
        logger.info(
            f"draining: not ready; {self.live_calls()} live call(s); new media streams "
            f"refused in {self.grace_secs:g} s, calls ended in {self.timeout_secs:g} s at most"
        )
        try:
            await asyncio.sleep(self.grace_secs)
            self.refusing_streams = True
            deadline = self.began_at + max(self.timeout_secs, self.grace_secs)
            await self._wait_for_calls(deadline)
            if self.live_calls():
                self.goodbyes = await live_calls.end_all()
                logger.warning(f"drain timeout: ended {self.goodbyes} live call(s) with a goodbye")
                await self._wait_for_calls(time.monotonic() + self.goodbye_wait_secs)
            left = self.live_calls()
            if left:
                logger.error(f"drain: {left} call(s) still open; closing them")
            else:
                logger.info("drained: no live call left")
        finally:
            if on_done is not None:
                on_done()

    async def _wait_for_calls(self, deadline: float) -> None:
        # Polled: the count is two things (streams, pipelines), checked 5 times a second.
        while self.live_calls() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)


class DrainGate:
    """ASGI middleware: counts the open media streams and, once the drain refuses them,
    turns new ones away with HTTP 503 at the handshake (close code 1013 where the server
    cannot send an HTTP response to a websocket)."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket" or scope.get("path") not in MEDIA_STREAM_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.refusing_streams:
            await _refuse(scope, receive, send)
            return
        self.drain.open_streams += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.open_streams -= 1


async def _refuse(scope: dict, receive: Any, send: Any) -> None:
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"retry-after", str(RETRY_AFTER_SECS).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"draining"})
    else:
        await send({"type": "websocket.close", "code": 1013})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness for the load balancer: 200 while this process takes new calls, 503 while
    it drains or while Postgres or Redis is unreachable."""
    drain: Drain = request.app.state.drain
    if drain.draining:
        return JSONResponse(
            {"status": "draining", "live_calls": drain.live_calls()}, status_code=503
        )
    resources = request.app.state.resources
    try:
        await check_database(resources.db)
        await check_redis(resources.redis)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "reason": type(exc).__name__}, status_code=503
        )
    return JSONResponse({"status": "ready"})


def install_drain(app: FastAPI, settings: Settings) -> Drain:
    """Give ``app`` its drain state, the ``/ready`` route and the media-stream gate.

    Returns:
        The drain state (also ``app.state.drain``).
    """
    drain = Drain(grace_secs=settings.drain_grace_secs, timeout_secs=settings.drain_timeout_secs)
    app.state.drain = drain
    app.include_router(router)
    app.add_middleware(DrainGate, drain=drain)
    return drain


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM starting the drain instead of closing every
    websocket at once (SIGINT keeps uvicorn's immediate shutdown).

    Args:
        config: uvicorn configuration (its app must have gone through
            :func:`install_drain`).
        drain: The app's drain state.
        on_ready: Called once the server accepts connections.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Drain,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.drain = drain
        self.on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list | None = None) -> None:
        """Start serving; then count this worker as ready."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.should_exit or self.drain.draining:
            return
        metrics.READY_WORKERS.set(1)
        if self.on_ready is not None:
            self.on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM: drain, then exit; anything else: uvicorn's behaviour."""
        if sig == signal.SIGTERM and self._loop is not None:
            if not self.drain.draining:
                self._loop.call_soon_threadsafe(self.drain.begin, self._drained)
            return
        super().handle_exit(sig, frame)

    def _drained(self) -> None:
        self.should_exit = True

    async def shutdown(self, sockets: list | None = None) -> None:
        """uvicorn's shutdown; this worker is no longer ready."""
        metrics.READY_WORKERS.set(0)
        await super().shutdown(sockets=sockets)

"""Web app and command line of the dealership voice agent.

python runner.py serves the FastAPI app on HOST/PORT. With DATABASE_URL and REDIS_URL
unset it starts embedded Postgres and Redis under DATA_DIR (.data/) and seeds demo CRM
data on first start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from loguru import logger

from core.logs import LogFormat, setup_logging  # first: silences Pipecat's import banner

# isort: split
from api import telephony as call_routes
from api.drain import DrainingServer, install_drain
from bot.turn_models import load_turn_models
from core.metrics import render_metrics
from core.pii import mask_phone
from core.profile import ProfileError, load_profile
from core.resources import AppResources, StartupError, check_database, check_redis, open_resources
from core.settings import Settings, get_settings
from processors.session_snapshot import SnapshotStore

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every log record (loguru's and the standard library's) to stderr at ``level``.

    See :func:`core.logs.setup_logging`: one format (``LOG_FORMAT``: text or JSON lines),
    tracebacks without variable values.
    """
    setup_logging(level, log_format)


def admin_guard(settings: Settings):
    """A FastAPI dependency that requires ``Authorization: Bearer <ADMIN_TOKEN>``."""

    async def require_admin(authorization: str | None = Header(default=None)) -> None:
        token = settings.admin_token.get_secret_value() if settings.admin_token else None
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not token or not authorization or not hmac.compare_digest(given, token):
            raise HTTPException(
                status_code=401,
                detail="admin token required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_admin


def create_app(
    settings: Settings | None = None, *, resources: AppResources | None = None
) -> FastAPI:
    """Build the FastAPI application.

    Args:
        settings: Settings to use; read from the environment when omitted.
        resources: Already open process resources (``python runner.py`` opens them before
            serving, so a startup failure is one clear message); when omitted the app's
            lifespan opens them (``uvicorn runner:app``, tests).

    Returns:
        The app. Its lifespan opens the database pool and the Redis client.
    """
    settings = settings or get_settings()
    require_admin = admin_guard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.resources = resources or await stack.enter_async_context(
                open_resources(settings)
            )
            await _on_started(settings, app.state.resources)
            if settings.google_calendar_enabled:
                await stack.enter_async_context(
                    _background(_calendar_catch_up(app.state.resources))
                )
            yield

    app = FastAPI(title="Dealership service voice agent", lifespan=lifespan)
    app.state.active_calls = {}
    app.include_router(call_routes.router)
    install_drain(app, settings)  # GET /ready; SIGTERM drains (api/drain.py)
    if settings.host in LOOPBACK_HOSTS:
        from api.webrtc import mount_client

        mount_client(app)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus exposition of the voice agent's metrics."""
        body, content_type = render_metrics()
        return Response(content=body, media_type=content_type)

    @app.get("/calls/active", dependencies=[Depends(require_admin)])
    async def active_calls(request: Request) -> JSONResponse:
        """Snapshots of the calls in progress (ops; bearer ``ADMIN_TOKEN``)."""
        store = SnapshotStore(request.app.state.resources.redis)
        sids = sorted(await store.active())
        snapshots = [snap for sid in sids if (snap := await store.read(sid)) is not None]
        return JSONResponse({"calls": snapshots})

    @app.get("/calls/{call_sid}", dependencies=[Depends(require_admin)])
    async def call_snapshot(call_sid: str, request: Request) -> JSONResponse:
        """Latest snapshot of one call (ops; bearer ``ADMIN_TOKEN``)."""
        snapshot = await SnapshotStore(request.app.state.resources.redis).read(call_sid)
        if snapshot is None:
            return JSONResponse({"error": "unknown call"}, status_code=404)
        return JSONResponse(snapshot)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Report each component; 503 when one is down."""
        resources: AppResources = request.app.state.resources
        components: dict[str, str] = {}
        for name, check in (
            ("db", lambda: check_database(resources.db)),
            ("redis", lambda: check_redis(resources.redis)),
        ):
            try:
                await check()
                components[name] = "ok"
            except Exception as exc:
                components[name] = f"down: {type(exc).__name__}"
        healthy = all(v == "ok" for v in components.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "components": components},
            status_code=200 if healthy else 503,
        )

    return app


async def _on_started(settings: Settings, resources: AppResources) -> None:
    """Load the turn-taking models once and say what is missing for phone calls."""
    await asyncio.to_thread(load_turn_models)
    missing = settings.missing_call_settings()
    if missing:
        logger.warning(
            "Phone calls are disabled until these settings are set: "
            + ", ".join(missing)
            + " (see .env.example)."
        )
    logger.info(f"Serving {resources.profile.name} on http://{settings.host}:{settings.port}")


@contextlib.asynccontextmanager
async def _background(coro: Any) -> AsyncIterator[asyncio.Task]:
    """Run ``coro`` as a task for the duration of the block; cancelled and awaited on exit,
    before the resources it uses are closed."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _calendar_catch_up(resources: AppResources) -> None:
    """Re-sync appointments whose Google Calendar mirror is pending or failed, every minute."""
    from scheduling.google_calendar import GoogleCalendar, sync_forever

    calendar = GoogleCalendar.from_settings(resources.settings, resources.profile, resources.db)
    await sync_forever(resources.db, calendar, interval_s=60.0)


async def _serve_async(settings: Settings, *, workers: int) -> int:
    from core.supervisor import Supervisor, metrics_dir

    # Resources first, once, in the parent: embedded servers started, migrations applied,
    # the demo seeded; an unreachable dependency is one clear message. The workers get
    # the servers' URLs and open their own pool and Redis client. Everything is closed
    # (embedded servers stopped) after the last worker has exited.
    async with open_resources(settings) as resources:
        os.environ["DATABASE_URL"] = resources.database_url
        os.environ["REDIS_URL"] = resources.redis_url
        sock = _bind(settings)
        logger.info(
            f"Serving {resources.profile.name} on http://{settings.host}:{settings.port} "
            f"with {workers} worker process(es)"
        )
        try:
            with metrics_dir() as path:
                return await Supervisor(
                    count=workers,
                    target=_worker_process,
                    sock=sock,
                    stop_timeout=settings.drain_grace_secs + settings.drain_timeout_secs + 90,
                    metrics_path=path,
                ).run()
        finally:
            sock.close()


def _bind(settings: Settings) -> Any:
    """The listening socket the workers share (uvicorn's own binding: reuse-address,
    inheritable)."""
    import uvicorn

    return uvicorn.Config(app=None, host=settings.host, port=settings.port).bind_socket()


def _worker_process(sock: Any, ready: Any, index: int) -> None:
    """One worker process of ``serve``: the app on the shared socket until drained."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    server = DrainingServer(
        uvicorn_config(app, settings), drain=app.state.drain, on_ready=ready.set
    )
    server.run(sockets=[sock])
    # Everything is closed by now (the lifespan closed the pool and the Redis client);
    # skip the interpreter's teardown of Pipecat, ONNX Runtime and friends (seconds).
    logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def uvicorn_config(app: FastAPI, settings: Settings) -> Any:
    """The uvicorn configuration the server runs with (tests use the same).

    Websocket messages are capped at :data:`api.telephony.MAX_MEDIA_MESSAGE_BYTES`: Twilio's
    media messages are well under 1 KiB, anything much larger is not Twilio.
    """
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=call_routes.MAX_MEDIA_MESSAGE_BYTES,
        # Compressing 20 ms media messages costs CPU per frame and saves little
        # (benchmarks/capacity.py profile).
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,  # uvicorn's loggers go through loguru (configure_logging)
    )


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(settings: Settings, *, workers: int | None = None) -> int:
    # A SIGTERM before the workers run (while the embedded servers start) takes the same
    # path as Ctrl-C, so they are stopped; while the workers run, the supervisor forwards
    # it to them (they drain) and returns after they have exited.
    from core.supervisor import available_cpus

    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        load_profile(settings.dealership_profile)
        count = workers or settings.workers or available_cpus()
        return asyncio.run(_serve_async(settings, workers=count))
    except (StartupError, ProfileError) as exc:
        logger.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0


async def _tools_console(settings: Settings, *, caller: str, now: str | None) -> int:
    from datetime import datetime

    from tools.console import run_console

    fixed_now = datetime.fromisoformat(now) if now else None
    if fixed_now is not None and fixed_now.tzinfo is None:
        print("--now needs a UTC offset, e.g. 2026-11-30T10:00:00-06:00", file=sys.stderr)
        return 2
    try:
        async with open_resources(settings) as resources:
            return await run_console(resources, caller=caller, now=fixed_now)
    except (StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1


async def _call(settings: Settings, *, number: str, scenario: str) -> int:
    from core.settings import MissingSettingError
    from crm.customers import find_by_phone
    from telephony.twilio import place_outbound_call
    from tools.customers import normalize_phone

    to = normalize_phone(number)
    if to is None:
        print(f"Not a phone number: {number!r} (use E.164, e.g. +15551234567)", file=sys.stderr)
        return 2
    try:
        settings.require(
            "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER", "PUBLIC_BASE_URL"
        )
        async with open_resources(settings, seed_demo=False) as resources:
            async with resources.db.connection() as conn:
                customer = await find_by_phone(conn, to)
        call_sid = await place_outbound_call(
            settings,
            to=to,
            scenario=scenario.replace("-", "_"),
            customer_id=customer.id if customer else None,
        )
    except (MissingSettingError, StartupError, ProfileError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps({"call_sid": call_sid, "to": mask_phone(to), "scenario": scenario}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python runner.py``.

    Args:
        argv: Command line arguments (without the program name).

    Returns:
        Process exit code.
    """
    parser = argparse.ArgumentParser(prog="runner.py", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    serve_cmd = sub.add_parser("serve", help="serve the web app (the default)")
    serve_cmd.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one port (default: WORKERS, else one per CPU core)",
    )
    tools_cmd = sub.add_parser(
        "tools", help="run tool calls from JSON lines on stdin in one call session"
    )
    tools_cmd.add_argument("--caller", required=True, help="caller ID, E.164 (+15551234567)")
    tools_cmd.add_argument("--now", help="fixed current time, ISO 8601 with offset")
    call_cmd = sub.add_parser("call", help="place one outbound call through Twilio")
    call_cmd.add_argument("number", help="number to call, E.164 (+15551234567)")
    call_cmd.add_argument(
        "--scenario", choices=("service-due", "confirmation"), default="service-due"
    )
    from campaigns.dialer import add_campaign_arguments

    add_campaign_arguments(sub.add_parser("campaign", help="plan (--dry-run) or run a campaign"))
    sub.add_parser("worker", help="run scheduled campaigns and retries until SIGTERM")
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except Exception as exc:  # pydantic ValidationError: show it without a traceback
        print(f"Invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command in (None, "serve"):
        workers = getattr(args, "workers", None)
        if workers is not None and not 1 <= workers <= 256:
            parser.error("--workers must be between 1 and 256")
        return _serve(settings, workers=workers)
    if args.command == "call":
        return asyncio.run(_call(settings, number=args.number, scenario=args.scenario))
    if args.command == "tools":
        return asyncio.run(_tools_console(settings, caller=args.caller, now=args.now))
    if args.command == "campaign":
        from campaigns.dialer import cli_main

        return cli_main(args, settings=settings)
    if args.command == "worker":
        from campaigns.worker import worker_main

        return worker_main(settings=settings)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

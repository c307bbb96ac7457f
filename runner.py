"""Web app and command line of the dealership voice agent.

python runner.py serves the FastAPI app on HOST/PORT. With DATABASE_URL and REDIS_URL
unset it starts embedded Postgres and Redis under DATA_DIR (.data/) and seeds demo CRM
data on first start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from fastapi import FastAPI
from loguru import logger

from core.logs import LogFormat, setup_logging  # first: silences Pipecat's import banner

# isort: split
from api import ops as ops_routes
from api import phone as phone_routes  # [phone-features hook]
from api import sms as sms_routes
from api import telephony as call_routes
from api.deps import BadWebhook, bad_webhook_response
from api.drain import DrainingServer, install_drain
from api.telephony import CallHooks
from bot.turn_models import load_turn_models
from core.pii import mask_phone
from core.profile import ProfileError, load_profile
from core.resources import AppResources, StartupError, open_resources
from core.settings import Settings, get_settings
from core.supervisor import freeze_startup_heap
from crm.migrate import apply_migrations

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Send every log record (loguru's and the standard library's) to stderr at ``level``.

    See :func:`core.logs.setup_logging`: one format (``LOG_FORMAT``: text or JSON lines),
    tracebacks without variable values.
    """
    setup_logging(level, log_format)


def webrtc_dev_refusal(settings: Settings) -> str | None:
    """Why the browser test page (``WEBRTC_DEV``) may not be enabled, or None.

    Args:
        settings: The server's settings.

    Returns:
        A message for the operator, or None when it is off or may be mounted.
    """
    if not settings.webrtc_dev:
        return None
    if settings.admin_token is None:
        return (
            "WEBRTC_DEV=true needs ADMIN_TOKEN: the browser test page is opened with "
            "/client?token=<ADMIN_TOKEN>. Set ADMIN_TOKEN to a long random value (e.g. the "
            'output of python -c "import secrets; print(secrets.token_urlsafe(24))") or '
            "unset WEBRTC_DEV."
        )
    if settings.webrtc_dev_force:
        return None
    if settings.public_base_url:
        return (
            "WEBRTC_DEV=true is refused because PUBLIC_BASE_URL is set: this server looks "
            "reachable from outside, and the browser test page lets anyone with the admin "
            "token start calls. Unset WEBRTC_DEV, or set WEBRTC_DEV_FORCE=true if you mean it."
        )
    if settings.host not in LOOPBACK_HOSTS:
        return (
            f"WEBRTC_DEV=true is refused because HOST={settings.host} is not a loopback "
            "address. Use HOST=127.0.0.1, unset WEBRTC_DEV, or set WEBRTC_DEV_FORCE=true."
        )
    return None


async def seed_demo_crm(database_url: str) -> object:
    """Seed the demo CRM (200 customers, seed 7) into a freshly initialised embedded database.

    Args:
        database_url: The embedded database.

    Returns:
        The seeding summary (logged by :func:`core.resources.open_resources`).
    """
    from seeding import seed

    return await seed(database_url, customers=200, seed=7, reset=False)


def create_app(
    settings: Settings | None = None,
    *,
    resources: AppResources | None = None,
    call_hooks: CallHooks | None = None,
) -> FastAPI:
    """Build the FastAPI application.

    Args:
        settings: Settings to use; read from the environment when omitted.
        resources: Already open process resources (``python runner.py`` opens them before
            serving, so a startup failure is one clear message); when omitted the app's
            lifespan opens them (``uvicorn runner:app``, tests).
        call_hooks: Observers and knobs of the phone calls (tests, benchmarks).

    Returns:
        The app. Its lifespan opens the database pool and the Redis client.
    """
    settings = settings or get_settings()
    refusal = webrtc_dev_refusal(settings)
    if refusal:
        raise StartupError(refusal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            app.state.resources = resources or await stack.enter_async_context(
                open_resources(settings, migrate=apply_migrations, seed_demo=seed_demo_crm)
            )
            await _on_started(settings, app.state.resources)
            await stack.enter_async_context(sms_routes.sender_running(app, app.state.resources))
            if settings.google_calendar_enabled:
                await stack.enter_async_context(
                    _background(_calendar_catch_up(app.state.resources))
                )
            if webrtc is not None:
                stack.push_async_callback(webrtc.close)  # browser calls end before resources
            yield

    app = FastAPI(title="Dealership service voice agent", lifespan=lifespan)
    app.state.settings = settings
    app.state.call_hooks = call_hooks or CallHooks()
    app.add_exception_handler(BadWebhook, bad_webhook_response)
    app.include_router(call_routes.router)
    app.include_router(sms_routes.router)
    app.include_router(ops_routes.router)
    from ops import mount_console  # the service manager's console under /ops

    mount_console(app)
    app.include_router(phone_routes.router)  # [phone-features hook]
    install_drain(app, settings)  # GET /ready; SIGTERM drains (api/drain.py)
    webrtc = None
    if settings.webrtc_dev:
        from api.webrtc import mount_client

        webrtc = mount_client(app, settings)
        logger.info(
            f"Browser test calls (WEBRTC_DEV): open http://{settings.host}:{settings.port}"
            "/client?token=<ADMIN_TOKEN>"
        )
    else:
        from api.dev_page import mount_disabled_page

        mount_disabled_page(app)  # /client says the page is off and how to turn it on

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


class PortInUseError(RuntimeError):
    """HOST:PORT cannot be listened on; the message says so and what to do."""


def bind_listener(settings: Settings) -> socket.socket:
    """Bind HOST:PORT for the server (uvicorn serves on this very socket).

    Done before anything else, so a second ``runner.py`` on a busy port stops at once,
    before it starts or joins embedded servers or opens pools.

    Args:
        settings: Settings (``HOST``, ``PORT``).

    Returns:
        The bound, not yet listening, socket.

    Raises:
        PortInUseError: The port is taken, or the host cannot be bound.
    """
    where = f"port {settings.port} on {settings.host}"
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise PortInUseError(f"Cannot listen on {where}: {exc.strerror}. Check HOST.") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                f"Cannot serve: {where} is already in use (another runner.py?). Stop that "
                "process or set PORT to a free port."
            ) from exc
        raise PortInUseError(f"Cannot listen on {where}: {exc.strerror}.") from exc
    return sock


async def _serve_async(settings: Settings, *, listener: socket.socket, workers: int) -> int:
    from core.supervisor import Supervisor, metrics_dir

    # Resources first, once, in the parent: embedded servers started, migrations applied,
    # the demo seeded; an unreachable dependency is one clear message. The workers get
    # the servers' URLs and open their own pool and Redis client. Everything is closed
    # (embedded servers left, and stopped by the last process using them) after the last
    # worker has exited.
    async with open_resources(
        settings, migrate=apply_migrations, seed_demo=seed_demo_crm
    ) as resources:
        os.environ["DATABASE_URL"] = resources.database_url
        os.environ["REDIS_URL"] = resources.redis_url
        logger.info(
            f"Serving {resources.profile.name} on http://{settings.host}:{settings.port} "
            f"with {workers} worker process(es)"
        )
        with metrics_dir() as path:
            return await Supervisor(
                count=workers,
                target=_worker_process,
                sock=listener,
                stop_timeout=settings.drain_grace_secs + settings.drain_timeout_secs + 90,
                metrics_path=path,
            ).run()


def _worker_process(sock: Any, ready: Any, index: int) -> None:
    """One worker process of ``serve``: the app on the shared socket until drained."""
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)

    def started() -> None:
        frozen = freeze_startup_heap()  # the turn models are loaded: start-up is over
        logger.info(f"worker {index}: start-up heap frozen ({frozen} objects)")
        ready.set()

    server = DrainingServer(uvicorn_config(app, settings), drain=app.state.drain, on_ready=started)
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
        listener = bind_listener(settings)  # first: a busy port stops us before anything
    except PortInUseError as exc:
        logger.error(str(exc))
        return 1
    try:
        refusal = webrtc_dev_refusal(settings)
        if refusal:
            raise StartupError(refusal)
        load_profile(settings.dealership_profile)
        count = workers or settings.workers or available_cpus()
        listener.set_inheritable(True)
        return asyncio.run(_serve_async(settings, listener=listener, workers=count))
    except (StartupError, ProfileError) as exc:
        logger.error(str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()


def _aware_datetime(text: str) -> datetime:
    """``--now``: an ISO 8601 time with a UTC offset, or a one-line usage error."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time with a UTC offset, e.g. 2026-11-30T10:00:00-06:00, "
            f"not {text[:40]!r}"
        )
    return value


async def _tools_console(settings: Settings, *, caller: str, now: datetime | None) -> int:
    from tools.console import run_console

    try:
        async with open_resources(
            settings, migrate=apply_migrations, seed_demo=seed_demo_crm
        ) as resources:
            return await run_console(resources, caller=caller, now=now)
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
        async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as resources:
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
    tools_cmd.add_argument(
        "--now", type=_aware_datetime, help="fixed current time, ISO 8601 with offset"
    )
    call_cmd = sub.add_parser("call", help="place one outbound call through Twilio")
    call_cmd.add_argument("number", help="number to call, E.164 (+15551234567)")
    call_cmd.add_argument(
        "--scenario", choices=("service-due", "confirmation"), default="service-due"
    )
    from campaigns.cli import add_campaign_arguments

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
        from campaigns.cli import cli_main

        return cli_main(args, settings=settings)
    if args.command == "worker":
        from campaigns.cli import worker_main

        return worker_main(settings=settings)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())

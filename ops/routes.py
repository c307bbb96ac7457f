"""The console's pages and actions under ``/ops`` (server-rendered Jinja2 templates).

Every route but the login form needs a session (``ops.auth``): a visit without one is
redirected to ``/ops/login``; every POST needs the session's CSRF token (403 without it).
Unexpected database or Redis trouble is a 503 page, bad parameters a 400 page: never a 500.
"""

from __future__ import annotations

import asyncio
import time as clock
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import psycopg
import redis.exceptions
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from loguru import logger
from psycopg_pool import PoolTimeout
from starlette.datastructures import FormData

from core import metrics
from core.pii import mask_phone
from core.resources import AppResources, check_database, check_redis
from crm import ops as crm_ops
from ops import charts
from ops.auth import (
    ADMIN_USER,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    LoginLimiter,
    OpsSession,
    SessionStore,
    check_credentials,
    tokens_match,
)
from ops.views import (
    PAGE_SIZE,
    BadInput,
    ago,
    duration,
    encode_cursor,
    label,
    local,
    parse_choice,
    parse_day,
    parse_history,
    parse_id,
    parse_int,
    person,
    pretty_json,
    safe_next,
    secs_text,
    transcript_view,
    valid_call_sid,
)
from processors.session_snapshot import SnapshotStore

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))
TEMPLATES.env.filters.update(
    mask_phone=mask_phone, label=label, secs=secs_text, duration=duration, pretty=pretty_json
)
#: How long one live-calls event stream stays open (the browser reconnects by itself).
STREAM_SECS = 50.0
STREAM_POLL_SECS = 1.0
LIVE_TURNS = 6
MAX_LIVE_CALLS = 100
MAX_FORM_BYTES = 64 * 1024
_USERNAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")


class NotLoggedIn(Exception):
    """The request has no valid console session."""


class ConsoleError(Exception):
    """A request the console refuses, with the status and a sentence for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _resources(request: Request) -> AppResources:
    return request.app.state.resources


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _tz(request: Request):
    return _resources(request).profile.time_zone


def _sessions(request: Request) -> SessionStore:
    resources = _resources(request)
    return SessionStore(
        resources.redis,
        ttl_secs=resources.settings.ops_session_ttl_secs,
        prefix=resources.settings.redis_key_prefix,
    )


async def _session(request: Request) -> OpsSession:
    session = await _sessions(request).get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise NotLoggedIn()
    return session


def _page(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    session: OpsSession | None,
    status: int = 200,
) -> HTMLResponse:
    resources = _resources(request)
    tz = resources.profile.time_zone
    now = datetime.now(UTC)
    base = {
        "session": session,
        "dealership": resources.profile.name,
        "path": request.url.path,
        "now": now,
        "tz": tz,
        "local": lambda moment, fmt="%a %b %-d, %H:%M": local(moment, tz, fmt),
        "ago": lambda moment: ago(moment, now),
        "person": person,
    }
    return TEMPLATES.TemplateResponse(request, template, base | context, status_code=status)


def _error_page(request: Request, status: int, message: str) -> Response:
    try:
        return _page(
            request,
            "error.html",
            {"status": status, "message": message},
            session=None,
            status=status,
        )
    except Exception:  # the template itself failed: plain text, still no traceback
        return Response(message, status_code=status, media_type="text/plain")


def _login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    query = "" if request.method != "GET" else f"?next={_quote(safe_next(target))}"
    return RedirectResponse(f"/ops/login{query}", status_code=303)


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


class ConsoleRoute(APIRoute):
    """Turns the console's exceptions into pages: login redirect, 4xx page, 503 page."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        """Wrap the handler."""
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except NotLoggedIn:
                if request.url.path == "/ops/live/stream":
                    return Response("login required", status_code=401)
                return _login_redirect(request)
            except BadInput as exc:
                return _error_page(request, 400, str(exc))
            except ConsoleError as exc:
                return _error_page(request, exc.status, exc.message)
            except (
                psycopg.Error,
                PoolTimeout,
                redis.exceptions.RedisError,
                OSError,
                TimeoutError,
            ) as exc:
                logger.error(f"ops console {request.url.path}: {type(exc).__name__}")
                return _error_page(
                    request, 503, "The database or Redis is not answering. Try again shortly."
                )

        return handler


router = APIRouter(prefix="/ops", route_class=ConsoleRoute)


async def _form(request: Request) -> FormData:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        raise ConsoleError(413, "The form is too large.")
    try:
        return await request.form(max_files=0, max_fields=20)
    except Exception as exc:  # malformed bodies: python-multipart / starlette errors
        raise ConsoleError(400, "The form could not be read.") from exc


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _same_origin(request: Request) -> bool:
    """No ``Origin`` header, or this server's (its Host header or ``PUBLIC_BASE_URL``)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    given = origin.split("://", 1)[-1].lower()
    public = (_resources(request).settings.public_base_url or "").split("://", 1)[-1]
    allowed = {request.headers.get("host", "").lower(), public.rstrip("/").lower()}
    return bool(given) and given in allowed


async def _action_session(request: Request) -> tuple[OpsSession, FormData]:
    """The session of a POST action whose CSRF token and origin check out (403 otherwise)."""
    session = await _session(request)
    form = await _form(request)
    if not tokens_match(_field(form, "csrf_token"), session.csrf) or not _same_origin(request):
        raise ConsoleError(
            403,
            "This action was refused: the form's security token is missing "
            "or wrong. Reload the page and try again.",
        )
    return session, form


# --- login ----------------------------------------------------------------------------------


def _set_cookie(
    request: Request, response: Response, name: str, value: str, *, max_age: int, path: str
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="strict",
        secure=_resources(request).settings.ops_cookie_is_secure,
    )


def _login_form(
    request: Request,
    *,
    next_path: str,
    error: str | None = None,
    status: int = 200,
    username: str | None = None,
) -> Response:
    import secrets

    token = secrets.token_urlsafe(32)
    response = _page(
        request,
        "login.html",
        {"csrf_token": token, "next": next_path, "error": error, "username": username},
        session=None,
        status=status,
    )
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, token, max_age=3600, path="/ops/login")
    return response


@router.get("/login")
async def login_page(request: Request) -> Response:
    """The login form (a logged-in user goes straight to the live calls)."""
    next_path = safe_next(request.query_params.get("next"))
    if await _sessions(request).get(request.cookies.get(SESSION_COOKIE)) is not None:
        return RedirectResponse(next_path, status_code=303)
    return _login_form(request, next_path=next_path)


@router.post("/login")
async def login(request: Request) -> Response:
    """Check the credentials; on success start a session and set its cookie."""
    resources = _resources(request)
    settings = resources.settings
    form = await _form(request)
    next_path = safe_next(_field(form, "next"))
    if not tokens_match(_field(form, "csrf_token"), request.cookies.get(LOGIN_CSRF_COOKIE)):
        return _login_form(
            request,
            next_path=next_path,
            error="The login form expired. Please try again.",
            status=403,
        )
    ip = _client_ip(request)
    limiter = LoginLimiter(
        resources.redis,
        max_failures=settings.ops_login_max_failures,
        window_secs=settings.ops_login_lockout_secs,
        prefix=settings.redis_key_prefix,
    )
    wait = await limiter.locked_for(ip)
    if wait:
        response = _login_form(
            request,
            next_path=next_path,
            error=f"Too many failed logins from this address. Try again in "
            f"{max(1, round(wait / 60))} min.",
            status=429,
        )
        response.headers["Retry-After"] = str(wait)
        return response
    username = (_field(form, "username") or "").strip().lower()
    password = _field(form, "password") or ""
    stored = None
    plausible = 0 < len(username) <= 40 and set(username) <= _USERNAME_CHARS
    plausible = plausible and 0 < len(password) <= 256
    if plausible and username != ADMIN_USER:
        async with resources.db.connection() as conn:
            stored = await crm_ops.user_password_hash(conn, username=username)
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
    ok = plausible and await check_credentials(
        username=username, password=password, admin_token=admin_token, stored_hash=stored
    )
    if not ok:
        await limiter.failed(ip)
        logger.warning(f"ops console: failed login from {ip}")
        return _login_form(
            request,
            next_path=next_path,
            error="Wrong user name or password.",
            status=401,
            username=username if plausible else None,
        )
    await limiter.succeeded(ip)
    token, _session_obj = await _sessions(request).create(username)
    async with resources.db.connection() as conn:
        await crm_ops.add_audit(conn, actor=username, action="login", client_ip=ip)
    response = RedirectResponse(next_path, status_code=303)
    _set_cookie(
        request,
        response,
        SESSION_COOKIE,
        token,
        max_age=settings.ops_session_ttl_secs * 2,
        path="/ops",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ops/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    """End the session (CSRF-checked, so a foreign page cannot log anyone out)."""
    session, _form_data = await _action_session(request)
    await _sessions(request).delete(request.cookies.get(SESSION_COOKIE))
    async with _resources(request).db.connection() as conn:
        await crm_ops.add_audit(
            conn, actor=session.user, action="logout", client_ip=_client_ip(request)
        )
    response = RedirectResponse("/ops/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ops")
    return response


@router.get("")
@router.get("/")
async def home(request: Request) -> Response:
    """The console starts on the live calls."""
    await _session(request)
    return RedirectResponse("/ops/live", status_code=303)


# --- live calls -----------------------------------------------------------------------------


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _live_view(snapshot: dict[str, Any], now: datetime) -> dict[str, Any]:
    started = None
    if isinstance(snapshot.get("started_at"), str):
        try:
            started = datetime.fromisoformat(snapshot["started_at"])
        except ValueError:
            started = None
    latency = snapshot.get("latency") if isinstance(snapshot.get("latency"), dict) else {}
    first_name = snapshot.get("customer_first_name")
    return {
        "call_sid": str(snapshot.get("call_sid") or ""),
        "caller": str(snapshot.get("caller") or "***")[:40],
        "first_name": first_name if isinstance(first_name, str) and first_name else None,
        "verified": snapshot.get("verified_customer_id") is not None,
        "flow_node": str(snapshot.get("flow_node") or "starting")[:60],
        "direction": str(snapshot.get("direction") or "inbound")[:20],
        "scenario": str(snapshot.get("scenario") or "")[:40],
        "started_at": started,
        "duration": duration((now - started).total_seconds()) if started else "–",
        "transcript": transcript_view(snapshot.get("transcript"))[-LIVE_TURNS:],
        "last_v2v": _float(latency.get("last_v2v_secs")),
        "turns": latency.get("turns") if isinstance(latency.get("turns"), int) else 0,
    }


async def _live_calls(request: Request) -> list[dict[str, Any]]:
    resources = _resources(request)
    store = SnapshotStore(resources.redis, prefix=resources.settings.redis_key_prefix)
    now = datetime.now(UTC)
    views = []
    for sid in (await store.active())[:MAX_LIVE_CALLS]:
        try:
            snapshot = await store.read(sid)
        except ValueError:  # not JSON: skip it rather than break the page
            continue
        if snapshot is not None and not snapshot.get("finished"):
            snapshot.setdefault("call_sid", sid)
            views.append(_live_view(snapshot, now))
    far_past = datetime(2000, 1, 1, tzinfo=UTC)
    views.sort(key=lambda v: (v["started_at"] or far_past, v["call_sid"]))
    return views


def _render_fragment(request: Request, calls: list[dict[str, Any]]) -> str:
    template = TEMPLATES.get_template("_live_calls.html")
    return template.render(calls=calls, updated=datetime.now(UTC), tz=_tz(request))


@router.get("/live")
async def live_page(request: Request) -> Response:
    """Calls in progress; the list updates through ``/ops/live/stream``."""
    session = await _session(request)
    calls = await _live_calls(request)
    return _page(
        request,
        "live.html",
        {"fragment": _render_fragment(request, calls), "title": "Live calls"},
        session=session,
    )


@router.get("/live/stream")
async def live_stream(request: Request) -> Response:
    """Server-sent events: the rendered list of live calls whenever it changes."""
    await _session(request)
    cookie = request.cookies.get(SESSION_COOKIE)
    sessions = _sessions(request)

    async def events() -> AsyncIterator[str]:
        yield "retry: 1000\n\n"
        last = None
        quiet_since = clock.monotonic()
        deadline = clock.monotonic() + STREAM_SECS
        checks = 0
        while clock.monotonic() < deadline:
            if await request.is_disconnected():
                return
            checks += 1
            if checks % 10 == 0 and await sessions.get(cookie) is None:
                yield "event: logout\ndata: login required\n\n"
                return
            try:
                html = _render_fragment(request, await _live_calls(request))
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning(f"ops live stream: Redis unavailable ({type(exc).__name__})")
                html = None
            if html is not None and html != last:
                last = html
                quiet_since = clock.monotonic()
                data = "\n".join(f"data: {line}" for line in html.splitlines())
                yield f"event: calls\n{data}\n\n"
            elif clock.monotonic() - quiet_since > 15:
                quiet_since = clock.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_SECS)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# --- call history ---------------------------------------------------------------------------


@router.get("/calls")
async def history_page(request: Request) -> Response:
    """Searchable, filterable call history, keyset-paginated, newest first."""
    session = await _session(request)
    tz = _tz(request)
    query = parse_history(request.query_params, tz)
    async with _resources(request).db.connection() as conn:
        rows = await crm_ops.list_calls(
            conn, flt=query.flt, after=query.after, before=query.before, limit=PAGE_SIZE + 1
        )
    if query.before is not None:
        newer = len(rows) > PAGE_SIZE
        rows = rows[-PAGE_SIZE:]
        older = bool(rows)
    else:
        older = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        newer = query.after is not None and bool(rows)
    older_link = (
        query.link(after=encode_cursor(rows[-1].started_at, rows[-1].id)) if older else None
    )
    newer_link = query.link(before=encode_cursor(rows[0].started_at, rows[0].id)) if newer else None
    return _page(
        request,
        "history.html",
        {
            "title": "Call history",
            "rows": rows,
            "form": query.form,
            "older_link": older_link,
            "newer_link": newer_link,
            "first_link": query.link() if (query.after or query.before) else None,
            "outcomes": crm_ops.OUTCOMES,
            "directions": crm_ops.DIRECTIONS,
            "scenarios": crm_ops.SCENARIOS,
            "duration_of": lambda row: (
                duration((row.ended_at - row.started_at).total_seconds())
                if row.ended_at
                else "in progress"
            ),
        },
        session=session,
    )


def _tool_calls_view(tool_calls: Any) -> list[dict[str, Any]]:
    out = []
    for item in tool_calls if isinstance(tool_calls, list) else []:
        if not isinstance(item, dict):
            continue
        out.append(
            {
                "name": str(item.get("name") or "?")[:100],
                "arguments": item.get("arguments"),
                "result": item.get("result"),
                "secs": _float(item.get("secs")),
                "at_secs": _float(item.get("at_secs")),
                "status": str(item.get("status") or "ok")[:20],
            }
        )
    return out


@router.get("/calls/{call_sid}")
async def call_page(request: Request, call_sid: str) -> Response:
    """One call: transcript, tool calls, per-turn latency, summary, appointments."""
    session = await _session(request)
    if not valid_call_sid(call_sid):
        raise ConsoleError(404, "There is no call with this id.")
    resources = _resources(request)
    async with resources.db.connection() as conn:
        call = await crm_ops.get_call(conn, call_sid=call_sid)
        if call is None:
            raise ConsoleError(404, "There is no call with this id.")
        ids = [i for i in call.appointment_ids if isinstance(i, int)]
        appointments = await crm_ops.appointments_by_ids(conn, ids)
    turns = (
        [t for t in call.turn_metrics if isinstance(t, dict)]
        if isinstance(call.turn_metrics, list)
        else []
    )
    recording = call.recording_url if (call.recording_url or "").startswith("https://") else None
    services = resources.profile.services
    return _page(
        request,
        "call.html",
        {
            "title": f"Call {call.call_sid}",
            "call": call,
            "transcript": transcript_view(call.transcript),
            "tool_calls": _tool_calls_view(call.tool_calls),
            "turns": turns,
            "chart": charts.turn_latency_chart(turns),
            "appointments": appointments,
            "service_name": lambda code: services[code].spoken_name if code in services else code,
            "recording": recording,
            "call_duration": (
                duration((call.ended_at - call.started_at).total_seconds())
                if call.ended_at
                else "in progress"
            ),
        },
        session=session,
    )


# --- callbacks ------------------------------------------------------------------------------


def _advisors(request: Request) -> dict[str, str]:
    return {a.id: a.name for a in _resources(request).profile.advisors}


@router.get("/callbacks")
async def callbacks_page(request: Request) -> Response:
    """The callback queue, the ones handled lately and the audit log of console actions."""
    session = await _session(request)
    notice = parse_choice(
        request.query_params.get("notice"), ("done", "assigned", "gone"), name="notice"
    )
    async with _resources(request).db.connection() as conn:
        open_rows = await crm_ops.open_callbacks(conn)
        closed_rows = await crm_ops.closed_callbacks(conn)
        audit = await crm_ops.recent_audit(conn, limit=25)
    return _page(
        request,
        "callbacks.html",
        {
            "title": "Callbacks",
            "open_rows": open_rows,
            "closed_rows": closed_rows,
            "audit": audit,
            "advisors": _advisors(request),
            "notice": notice,
        },
        session=session,
    )


@router.post("/callbacks/{callback_id}/done")
async def callback_done(request: Request, callback_id: str) -> Response:
    """Mark a callback request done (audited)."""
    session, _form_data = await _action_session(request)
    number = parse_id(callback_id)
    if number is None:
        raise ConsoleError(404, "There is no callback request with this id.")
    async with _resources(request).db.connection() as conn:
        changed = await crm_ops.mark_callback_done(
            conn, callback_id=number, actor=session.user, client_ip=_client_ip(request)
        )
    return RedirectResponse(
        f"/ops/callbacks?notice={'done' if changed else 'gone'}", status_code=303
    )


@router.post("/callbacks/{callback_id}/assign")
async def callback_assign(request: Request, callback_id: str) -> Response:
    """Assign a callback request to one of the profile's advisors (audited)."""
    session, form = await _action_session(request)
    number = parse_id(callback_id)
    if number is None:
        raise ConsoleError(404, "There is no callback request with this id.")
    advisors = _advisors(request)
    advisor = _field(form, "advisor")
    if advisor not in advisors:
        raise ConsoleError(400, "Choose one of the advisors in the list.")
    async with _resources(request).db.connection() as conn:
        changed = await crm_ops.assign_callback(
            conn,
            callback_id=number,
            advisor=advisor,
            actor=session.user,
            client_ip=_client_ip(request),
        )
    return RedirectResponse(
        f"/ops/callbacks?notice={'assigned' if changed else 'gone'}", status_code=303
    )


# --- campaigns ------------------------------------------------------------------------------


@router.get("/campaigns")
async def campaigns_page(request: Request) -> Response:
    """Today's and recent campaign runs with their counts; one run's attempts per customer."""
    session = await _session(request)
    params = request.query_params
    days = parse_int(params.get("days"), name="days", low=1, high=366) or 14
    campaign = parse_choice(
        params.get("campaign"), ("service_due", "confirmation"), name="campaign"
    )
    day = parse_day(params.get("day"), name="day")
    tz = _tz(request)
    today = datetime.now(tz).date()
    since = today - timedelta(days=days - 1)
    async with _resources(request).db.connection() as conn:
        runs = await crm_ops.campaign_days(conn, since=since)
        scheduled = await crm_ops.scheduled_runs(conn, since=since)
        attempts = (
            await crm_ops.campaign_attempts(conn, campaign=campaign, local_date=day)
            if campaign and day
            else []
        )
    return _page(
        request,
        "campaigns.html",
        {
            "title": "Campaigns",
            "runs": runs,
            "today": today,
            "days": days,
            "scheduled": scheduled,
            "selected": (campaign, day) if campaign and day else None,
            "attempts": attempts,
        },
        session=session,
    )


# --- today's schedule -----------------------------------------------------------------------


@router.get("/schedule")
async def schedule_page(request: Request) -> Response:
    """A day's appointments per bay on a timeline; the bot's bookings marked."""
    session = await _session(request)
    resources = _resources(request)
    profile = resources.profile
    tz = profile.time_zone
    day = parse_day(request.query_params.get("day"), name="day") or datetime.now(tz).date()
    day_start = datetime.combine(day, time(0), tz)
    day_end = datetime.combine(day + timedelta(days=1), time(0), tz)
    async with resources.db.connection() as conn:
        appointments = await crm_ops.appointments_between(conn, start=day_start, end=day_end)
    hours = profile.opening_hours(day)
    open_at = min((r.start for r in hours), default=time(7, 0))
    close_at = max((r.end for r in hours), default=time(19, 0))
    start = datetime.combine(day, open_at, tz)
    end = (
        day_end
        if close_at == time(0) or close_at.hour == 24
        else datetime.combine(day, close_at, tz)
    )
    if appointments:
        start = max(min(start, min(a.starts_at for a in appointments)), day_start)
        end = min(max(end, max(a.ends_at for a in appointments)), day_end)
    start = start.replace(minute=0)
    services = profile.services
    names = lambda codes: ", ".join(  # noqa: E731
        services[c].spoken_name if c in services else c for c in codes
    )
    items = [
        charts.TimelineItem(
            id=a.id,
            lane=a.bay_id,
            starts_at=a.starts_at,
            ends_at=a.ends_at,
            label=f"{person(a.first_name, a.last_name)} · {names(a.service_codes)}",
            title=(
                f"{local(a.starts_at, tz, '%H:%M')}–{local(a.ends_at, tz, '%H:%M')} "
                f"{person(a.first_name, a.last_name)}, {a.year} {a.make} {a.model}: "
                f"{names(a.service_codes)} ({label(a.status)})"
                + (" · booked by the AI assistant" if a.call_sid else "")
            ),
            status=a.status,
            by_bot=a.call_sid is not None,
        )
        for a in appointments
    ]
    timeline = charts.schedule_timeline(
        [b.id for b in profile.bays], items, start=start, end=end, tz=tz
    )
    return _page(
        request,
        "schedule.html",
        {
            "title": "Schedule",
            "day": day,
            "prev_day": day - timedelta(days=1),
            "next_day": day + timedelta(days=1),
            "today": datetime.now(tz).date(),
            "closed": not hours,
            "timeline": timeline,
            "appointments": appointments,
            "service_names": names,
            "by_bot": sum(1 for a in appointments if a.call_sid),
        },
        session=session,
    )


# --- health ---------------------------------------------------------------------------------


async def _component(check: Callable[[], Awaitable[None]]) -> str:
    try:
        await asyncio.wait_for(check(), timeout=3)
        return "ok"
    except Exception as exc:
        return f"down ({type(exc).__name__})"


def _tool_errors_since_start() -> list[tuple[str, int]]:
    found = []
    for family in metrics.TOOL_ERRORS_TOTAL.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                found.append((sample.labels.get("tool", "?"), int(sample.value)))
    return sorted(found, key=lambda item: -item[1])


@router.get("/health")
async def health_page(request: Request) -> Response:
    """Components, active calls, voice-to-voice p50/p95 of the last hour, tool errors."""
    session = await _session(request)
    resources = _resources(request)
    settings = resources.settings
    tz = resources.profile.time_zone
    now = datetime.now(UTC)
    since = now - timedelta(hours=1)
    db_state = await _component(lambda: check_database(resources.db))
    redis_state = await _component(lambda: check_redis(resources.redis))
    components = [
        ("Database (Postgres)", db_state, None),
        ("Redis", redis_state, None),
        (
            "Phone calls",
            "ok" if not settings.missing_call_settings() else "disabled",
            ", ".join(settings.missing_call_settings()) or None,
        ),
        (
            "Google Calendar sync",
            "ok" if settings.google_calendar_enabled else "not configured",
            None,
        ),
    ]
    active: int | None = None
    if redis_state == "ok":
        store = SnapshotStore(resources.redis, prefix=resources.settings.redis_key_prefix)
        active = len(await store.active())
    total: dict[str, Any] = {"turns": 0, "p50": None, "p95": None}
    buckets: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] = []
    outcomes: dict[str, int] = {}
    if db_state == "ok":
        async with resources.db.connection() as conn:
            total, buckets = await crm_ops.voice_to_voice_since(conn, since=since)
            tools = await crm_ops.tool_stats_since(conn, since=since)
            outcomes = await crm_ops.outcomes_since(conn, since=since)
    points = [
        charts.SeriesPoint(at=b["bucket"], p50=b["p50"], p95=b["p95"], count=b["turns"])
        for b in buckets
    ]
    return _page(
        request,
        "health.html",
        {
            "title": "Health",
            "components": components,
            "active": active,
            "process_active": int(metrics.sample("voice_agent_active_calls")),
            "total": total,
            "chart": charts.percentile_chart(points, start=since, end=now, tz=tz),
            "tools": tools,
            "tool_errors_total": _tool_errors_since_start(),
            "outcomes": outcomes,
            "since": since,
        },
        session=session,
    )


@router.get("/{rest:path}")
async def not_found(request: Request, rest: str) -> Response:
    """Any other console address: the login first, then a 404 page."""
    await _session(request)
    raise ConsoleError(404, "This page does not exist.")

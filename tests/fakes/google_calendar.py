"""A local fake of the Google Calendar API v3 (events and freeBusy) on 127.0.0.1.

Point a gcsa client at it with
``scheduling.google_calendar.build_client(calendar_id=..., credentials=AnonymousCredentials(),
api_endpoint=fake.api_endpoint)``. It keeps events per calendar in memory, answers
``events.insert/get/list/update/patch/delete`` (``list`` honours ``timeMin``, ``timeMax``,
``showDeleted`` and repeated ``privateExtendedProperty`` filters) and ``freeBusy.query``
(opaque events plus scripted busy blocks). Failures are scripted per operation with
:meth:`FakeGoogleCalendarApi.fail`.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiohttp import web

#: Operation names accepted by :meth:`FakeGoogleCalendarApi.fail`.
OPERATIONS = ("insert", "get", "list", "update", "patch", "delete", "freeBusy")


class RecordedRequest(NamedTuple):
    """One request the fake received.

    Attributes:
        operation: One of :data:`OPERATIONS`.
        method: HTTP method.
        path: URL path.
        query: Query parameters (repeated ones as lists).
        body: JSON body, or ``None``.
    """

    operation: str
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class _Failure:
    status: int
    times: int | None  # None: until cleared


@dataclass
class FakeGoogleCalendarApi:
    """In-memory Google Calendar API v3 served over HTTP.

    Attributes:
        events: Events by calendar id, then event id (deleted ones have status cancelled).
        busy_blocks: Extra busy intervals per calendar id for freeBusy.
        requests: Every request received, in order.
    """

    events: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    busy_blocks: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    _failures: dict[str, _Failure] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _port: int = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application(middlewares=[_errors])
        base = "/calendar/v3"
        app.router.add_post(base + "/calendars/{cal}/events", self._insert)
        app.router.add_get(base + "/calendars/{cal}/events", self._list)
        app.router.add_get(base + "/calendars/{cal}/events/{event_id}", self._get)
        app.router.add_put(base + "/calendars/{cal}/events/{event_id}", self._update)
        app.router.add_patch(base + "/calendars/{cal}/events/{event_id}", self._patch)
        app.router.add_delete(base + "/calendars/{cal}/events/{event_id}", self._delete)
        app.router.add_post(base + "/freeBusy", self._free_busy)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self._port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def api_endpoint(self) -> str:
        """Base URL to give googleapiclient (``client_options.api_endpoint``)."""
        return f"http://127.0.0.1:{self._port}/calendar/v3/"

    # -- scripting ---------------------------------------------------------------------

    def fail(self, operation: str, status: int = 500, *, times: int | None = 1) -> None:
        """Answer ``operation`` with an error.

        Args:
            operation: One of :data:`OPERATIONS`.
            status: HTTP status of the error.
            times: How many requests fail; ``None`` until :meth:`clear_failures`.
        """
        assert operation in OPERATIONS, operation
        self._failures[operation] = _Failure(status, times)

    def clear_failures(self) -> None:
        """Answer every operation normally again."""
        self._failures.clear()

    def live_events(self, calendar_id: str) -> list[dict[str, Any]]:
        """The calendar's events that are not deleted."""
        return [
            e for e in self.events.get(calendar_id, {}).values() if e.get("status") != "cancelled"
        ]

    def count(self, operation: str) -> int:
        """How many requests of ``operation`` were received."""
        return sum(1 for r in self.requests if r.operation == operation)

    # -- helpers -----------------------------------------------------------------------

    async def _begin(self, operation: str, request: web.Request) -> Any:
        body = None
        if request.can_read_body:
            raw = await request.read()
            body = json.loads(raw) if raw else None
        query: dict[str, list[str]] = {}
        for key, value in request.query.items():
            query.setdefault(key, []).append(value)
        self.requests.append(RecordedRequest(operation, request.method, request.path, query, body))
        failure = self._failures.get(operation)
        if failure is not None:
            if failure.times is not None:
                failure.times -= 1
                if failure.times <= 0:
                    del self._failures[operation]
            raise _error(failure.status, "Backend Error" if failure.status >= 500 else "Error")
        return body

    def _calendar(self, request: web.Request) -> dict[str, dict[str, Any]]:
        return self.events.setdefault(request.match_info["cal"], {})

    def _existing(self, request: web.Request) -> dict[str, Any]:
        event = self._calendar(request).get(request.match_info["event_id"])
        if event is None:
            raise _error(404, "Not Found")
        return event

    # -- handlers ----------------------------------------------------------------------

    async def _insert(self, request: web.Request) -> web.Response:
        body = await self._begin("insert", request)
        calendar = self._calendar(request)
        event_id = body.get("id") or secrets.token_hex(13)
        if event_id in calendar:
            raise _error(409, "The requested identifier already exists.")
        now = _rfc3339(datetime.now(UTC))
        event = {
            **body,
            "kind": "calendar#event",
            "id": event_id,
            "status": body.get("status", "confirmed"),
            "created": now,
            "updated": now,
            "etag": f'"{secrets.token_hex(8)}"',
        }
        calendar[event_id] = event
        return web.json_response(event)

    async def _get(self, request: web.Request) -> web.Response:
        await self._begin("get", request)
        return web.json_response(self._existing(request))

    async def _list(self, request: web.Request) -> web.Response:
        await self._begin("list", request)
        filters = [f.split("=", 1) for f in request.query.getall("privateExtendedProperty", [])]
        time_min = _parse(request.query["timeMin"]) if "timeMin" in request.query else None
        time_max = _parse(request.query["timeMax"]) if "timeMax" in request.query else None
        show_deleted = request.query.get("showDeleted") == "true"
        items = []
        for event in self._calendar(request).values():
            if event.get("status") == "cancelled" and not show_deleted:
                continue
            private = event.get("extendedProperties", {}).get("private", {})
            if any(private.get(key) != value for key, value in filters):
                continue
            start, end = _event_range(event)
            if time_min is not None and end <= time_min:
                continue
            if time_max is not None and start >= time_max:
                continue
            items.append(event)
        return web.json_response({"kind": "calendar#events", "items": items})

    async def _update(self, request: web.Request) -> web.Response:
        body = await self._begin("update", request)
        existing = self._existing(request)
        kept = {k: existing[k] for k in ("kind", "id", "created", "etag")}
        existing.clear()
        existing.update({**body, **kept, "status": body.get("status", "confirmed")})
        existing["updated"] = _rfc3339(datetime.now(UTC))
        return web.json_response(existing)

    async def _patch(self, request: web.Request) -> web.Response:
        body = await self._begin("patch", request)
        existing = self._existing(request)
        existing.update({k: v for k, v in body.items() if k != "id"})
        existing["updated"] = _rfc3339(datetime.now(UTC))
        return web.json_response(existing)

    async def _delete(self, request: web.Request) -> web.Response:
        await self._begin("delete", request)
        existing = self._existing(request)
        if existing.get("status") == "cancelled":
            raise _error(410, "Resource has been deleted")
        existing["status"] = "cancelled"
        return web.Response(status=204)

    async def _free_busy(self, request: web.Request) -> web.Response:
        body = await self._begin("freeBusy", request)
        time_min, time_max = _parse(body["timeMin"]), _parse(body["timeMax"])
        calendars: dict[str, Any] = {}
        for item in body.get("items", []):
            calendar_id = item["id"]
            if calendar_id not in self.events and calendar_id not in self.busy_blocks:
                calendars[calendar_id] = {
                    "errors": [{"domain": "global", "reason": "notFound"}],
                    "busy": [],
                }
                continue
            ranges = list(self.busy_blocks.get(calendar_id, []))
            for event in self.events.get(calendar_id, {}).values():
                if event.get("status") == "cancelled" or event.get("transparency") == "transparent":
                    continue
                ranges.append(_event_range(event))
            busy = [
                {"start": _rfc3339(max(s, time_min)), "end": _rfc3339(min(e, time_max))}
                for s, e in sorted(ranges)
                if s < time_max and e > time_min
            ]
            calendars[calendar_id] = {"busy": busy}
        return web.json_response(
            {
                "kind": "calendar#freeBusy",
                "timeMin": _rfc3339(time_min),
                "timeMax": _rfc3339(time_max),
                "calendars": copy.deepcopy(calendars),
            }
        )


class _ApiError(Exception):
    """An error answer in the Google API format."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> _ApiError:
    return _ApiError(status, message)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        body = {
            "error": {
                "code": exc.status,
                "message": exc.message,
                "errors": [{"domain": "global", "message": exc.message}],
            }
        }
        return web.json_response(body, status=exc.status)


def _parse(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _rfc3339(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _event_range(event: dict[str, Any]) -> tuple[datetime, datetime]:
    start, end = event["start"], event["end"]
    if "dateTime" in start:
        return _parse(start["dateTime"]), _parse(end["dateTime"])
    return _parse(start["date"]), _parse(end["date"])

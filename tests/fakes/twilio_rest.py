"""A local fake of the Twilio REST Calls API (2010-04-01) on 127.0.0.1.

Point the twilio SDK at it with ``client.api.base_url = fake.base_url`` (what
``telephony.twilio.twilio_client`` does with ``TWILIO_API_BASE_URL``), and Pipecat's
``TwilioFrameSerializer`` with ``base_url=fake.base_url``.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web

API_VERSION = "2010-04-01"


class RecordedRequest(NamedTuple):
    """One authenticated request the fake received.

    Attributes:
        method: HTTP method.
        path: URL path.
        form: Form fields (the last value of a repeated field).
    """

    method: str
    path: str
    form: dict[str, str]


@dataclass
class TwilioError:
    """A scripted Twilio error response.

    Attributes:
        status: HTTP status.
        code: Twilio error code.
        message: Error message.
    """

    status: int = 400
    code: int = 21211
    message: str = "The 'To' number is not a valid phone number."


def _now_rfc2822() -> str:
    """The current time the way Twilio formats it."""
    return format_datetime(datetime.now(UTC), usegmt=False).replace("-0000", "+0000")


def new_call_sid() -> str:
    """A random, well-formed Call SID (``CA`` + 32 hex digits)."""
    return "CA" + secrets.token_hex(16)


class FakeTwilioREST:
    """Fake Twilio REST server for the Calls resource.

    Endpoints: ``POST /2010-04-01/Accounts/{AC}/Calls.json`` (create),
    ``POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`` (update) and
    ``GET /2010-04-01/Accounts/{AC}/Calls/{CA}.json`` (fetch). Basic auth must match
    the account SID and auth token (401 otherwise).

    Attributes:
        base_url: ``http://127.0.0.1:PORT`` once started.
        account_sid: Expected account SID.
        auth_token: Expected auth token.
        create_delay: Seconds each create takes (while counted in flight).
        requests: Authenticated requests as ``(method, path, form)``.
        form_lists: Per request, every form field with all its values.
        calls: Calls by SID, as last returned (JSON dict).
        created: SIDs of created calls, in order.
        in_flight: Creates being served right now.
        max_in_flight: Highest ``in_flight`` observed.
        auth_failures: Requests rejected with 401.
    """

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "test-auth-token",
        *,
        create_delay: float = 0.0,
    ) -> None:
        """Initialises the fake (not started yet).

        Args:
            account_sid: Account SID clients must authenticate with.
            auth_token: Auth token clients must authenticate with.
            create_delay: Seconds each create request takes.
        """
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.create_delay = create_delay
        self.base_url = ""
        self.requests: list[RecordedRequest] = []
        self.form_lists: list[dict[str, list[str]]] = []
        self.calls: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_failures = 0
        self._create_failures: list[TwilioError] = []
        self._update_failures: list[TwilioError] = []
        self._runner: web.AppRunner | None = None

    def fail_next_creates(
        self,
        count: int = 1,
        *,
        status: int = 400,
        code: int = 21211,
        message: str = "The 'To' number is not a valid phone number.",
    ) -> None:
        """Makes the next ``count`` create requests fail with a Twilio error JSON.

        Args:
            count: Number of creates to fail.
            status: HTTP status.
            code: Twilio error code.
            message: Error message.
        """
        self._create_failures.extend(TwilioError(status, code, message) for _ in range(count))

    def fail_next_updates(
        self,
        count: int = 1,
        *,
        status: int = 500,
        code: int = 20500,
        message: str = "Internal Server Error",
    ) -> None:
        """Makes the next ``count`` call updates (redirects, hang-ups) fail with an error JSON.

        Args:
            count: Number of updates to fail.
            status: HTTP status.
            code: Twilio error code.
            message: Error message.
        """
        self._update_failures.extend(TwilioError(status, code, message) for _ in range(count))

    def requests_to(self, method: str, suffix: str) -> list[RecordedRequest]:
        """Recorded requests with this method whose path ends with ``suffix``.

        Args:
            method: HTTP method, e.g. "POST".
            suffix: Path suffix, e.g. "/Calls.json".

        Returns:
            Matching requests, in order.
        """
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    async def start(self) -> None:
        """Starts listening on 127.0.0.1 on a free port."""
        app = web.Application()
        base = f"/{API_VERSION}/Accounts/{{account}}/Calls"
        app.router.add_post(base + ".json", self._create)
        app.router.add_post(base + "/{call}.json", self._update)
        app.router.add_get(base + "/{call}.json", self._fetch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Stops the server."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeTwilioREST:
        """Starts the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops the server."""
        await self.stop()

    def _authorized(self, request: web.Request) -> bool:
        """Checks Basic auth against the configured credentials."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and password == self.auth_token

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        """A Twilio-style error response."""
        return web.json_response(
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            status=status,
        )

    async def _record(self, request: web.Request) -> web.Response | dict[str, str]:
        """Authenticates and records a request; returns its form or an error response."""
        if not self._authorized(request):
            self.auth_failures += 1
            return self._error(401, 20003, "Authenticate")
        pairs = parse_qsl(await request.text(), keep_blank_values=True)
        form = dict(pairs)
        lists: dict[str, list[str]] = {}
        for key, value in pairs:
            lists.setdefault(key, []).append(value)
        self.requests.append(RecordedRequest(request.method, request.path, form))
        self.form_lists.append(lists)
        if request.match_info["account"] != self.account_sid:
            return self._error(404, 20404, "The requested resource was not found")
        return form

    def _call_json(self, sid: str, form: Mapping[str, str]) -> dict[str, Any]:
        """A realistic Call resource for a new outbound call."""
        now = _now_rfc2822()
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}"
        return {
            "sid": sid,
            "date_created": now,
            "date_updated": now,
            "parent_call_sid": None,
            "account_sid": self.account_sid,
            "to": form.get("To"),
            "to_formatted": form.get("To"),
            "from": form.get("From"),
            "from_formatted": form.get("From"),
            "phone_number_sid": "PN" + "0" * 32,
            "status": "queued",
            "start_time": None,
            "end_time": None,
            "duration": None,
            "price": None,
            "price_unit": "USD",
            "direction": "outbound-api",
            "answered_by": None,
            "api_version": API_VERSION,
            "forwarded_from": None,
            "group_sid": None,
            "caller_name": None,
            "queue_time": "0",
            "trunk_sid": None,
            "uri": uri + ".json",
            "subresource_uris": {
                "notifications": uri + "/Notifications.json",
                "recordings": uri + "/Recordings.json",
                "payments": uri + "/Payments.json",
                "events": uri + "/Events.json",
                "siprec": uri + "/Siprec.json",
                "streams": uri + "/Streams.json",
                "transcriptions": uri + "/Transcriptions.json",
                "user_defined_message_subscriptions": uri + "/UserDefinedMessageSubscriptions.json",
                "user_defined_messages": uri + "/UserDefinedMessages.json",
            },
        }

    async def _create(self, request: web.Request) -> web.Response:
        """POST Calls.json: creates a queued call."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.create_delay > 0:
                await asyncio.sleep(self.create_delay)
            if self._create_failures:
                err = self._create_failures.pop(0)
                return self._error(err.status, err.code, err.message)
            missing = [k for k in ("To", "From") if not form.get(k)]
            if missing:
                return self._error(400, 21201, f"Missing required parameter {missing[0]}.")
            if not (form.get("Url") or form.get("Twiml") or form.get("ApplicationSid")):
                return self._error(400, 21205, "Url, Twiml or ApplicationSid is required.")
            sid = new_call_sid()
            call = self._call_json(sid, form)
            self.calls[sid] = call
            self.created.append(sid)
            return web.json_response(call, status=201)
        finally:
            self.in_flight -= 1

    async def _update(self, request: web.Request) -> web.Response:
        """POST Calls/{CA}.json: updates status, TwiML or URL of a call."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        if self._update_failures:
            err = self._update_failures.pop(0)
            return self._error(err.status, err.code, err.message)
        sid = request.match_info["call"]
        call = self.calls.get(sid)
        if call is None:
            # Calls created outside the fake (e.g. inbound calls in tests) are known lazily.
            call = self._call_json(sid, {})
            call["status"] = "in-progress"
            call["direction"] = "inbound"
            self.calls[sid] = call
        if call["status"] in ("completed", "canceled", "failed", "busy", "no-answer"):
            return self._error(400, 21220, "Call is not in-progress. Cannot redirect.")
        status = form.get("Status")
        if status in ("completed", "canceled"):
            call["status"] = status
            call["end_time"] = _now_rfc2822()
        elif status:
            return self._error(400, 20001, f"Invalid Status {status!r}.")
        call["date_updated"] = _now_rfc2822()
        return web.json_response(call)

    async def _fetch(self, request: web.Request) -> web.Response:
        """GET Calls/{CA}.json: the call as last known."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return self._error(404, 20404, "The requested resource was not found")
        return web.json_response(call)

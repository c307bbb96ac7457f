"""A local fake of the Twilio REST Calls and Messages APIs (2010-04-01) on 127.0.0.1.

Point the twilio SDK at it with ``client.api.base_url = fake.base_url`` (what
``telephony.twilio.twilio_client`` does with ``TWILIO_API_BASE_URL``), and Pipecat's
``TwilioFrameSerializer`` with ``base_url=fake.base_url``.

Messages: ``POST .../Messages.json`` takes the real request (``To``, ``From`` or
``MessagingServiceSid``, ``Body``, ``StatusCallback``), validates it like Twilio (error
codes 21211, 21602, 21603, 21604, 21610, 21617) and answers a Message resource;
:meth:`FakeTwilioREST.report_status` then posts a signed status callback to the message's
``StatusCallback`` the way Twilio does.

Besides the Calls resource it serves a call's Recordings (start, pause/resume/stop, the
media file) and plays Twilio's side of the callbacks the server asks for, with the
request shapes and ``X-Twilio-Signature`` Twilio uses:

* :meth:`FakeTwilioREST.send_amd_verdict`: the ``AsyncAmdStatusCallback`` of a call created
  with ``AsyncAmd=true`` (``AnsweredBy``, ``MachineDetectionDuration``).
* :meth:`FakeTwilioREST.run_dial`: the ``<Dial>`` of the TwiML a call was redirected to: on
  answer the ``<Number url>`` request of the advisor's leg (``ParentCallSid``), then the
  ``<Dial action>`` request (``DialCallStatus``, ``DialCallSid``, ``DialCallDuration``,
  ``DialBridged``).
* Recording status callbacks (``RecordingSid``, ``RecordingStatus``, ``RecordingUrl``,
  ``RecordingDuration``, ``RecordingChannels``, ...) for the events the recording was
  created with: ``in-progress`` at once, ``completed`` when the call ends.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"
_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")


class _Request(NamedTuple):
    method: str
    path: str
    form: dict[str, str]


class RecordedRequest(_Request):
    """One authenticated request the fake received (unpacks as ``method, path, form``).

    Attributes:
        method: HTTP method.
        path: URL path.
        form: Form fields (the last value of a repeated field).
        at: Monotonic time it arrived.
    """

    at: float = 0.0


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


def new_message_sid() -> str:
    """A random, well-formed Message SID (``SM`` + 32 hex digits)."""
    return "SM" + secrets.token_hex(16)


class SentText(NamedTuple):
    """A text the fake accepted.

    Attributes:
        sid: Its MessageSid.
        to: ``To``.
        sender: ``From``, or the ``MessagingServiceSid``.
        body: ``Body``.
        status_callback: ``StatusCallback`` URL, if given.
        received_at: ``time.monotonic()`` when the fake took it.
    """

    sid: str
    to: str
    sender: str
    body: str
    status_callback: str | None
    received_at: float


@dataclass
class FakeRecording:
    """A recording the fake holds.

    Attributes:
        sid: ``RE`` SID.
        call_sid: The recorded call.
        channels: 1 or 2.
        status: ``in-progress``, ``paused``, ``stopped``, ``completed`` or ``absent``.
        callback: ``RecordingStatusCallback`` URL, if any.
        events: ``RecordingStatusCallbackEvent`` values (default ``completed``).
        started: Monotonic start time.
        statuses: Every status it went through, in order.
    """

    sid: str
    call_sid: str
    channels: int
    status: str
    callback: str | None
    events: list[str]
    started: float = field(default_factory=time.monotonic)
    statuses: list[str] = field(default_factory=list)


@dataclass
class Callback:
    """A request the fake sent to the server as Twilio would.

    Attributes:
        url: Full URL requested.
        form: Form fields.
        status: HTTP status of the server's answer.
        body: The answer's body.
    """

    url: str
    form: dict[str, str]
    status: int
    body: str


class FakeTwilioREST:
    """Fake Twilio REST server for the Calls resource.

    Endpoints: ``POST /2010-04-01/Accounts/{AC}/Calls.json`` (create),
    ``POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`` (update),
    ``GET /2010-04-01/Accounts/{AC}/Calls/{CA}.json`` (fetch),
    ``POST .../Calls/{CA}/Recordings.json`` (start a recording),
    ``POST .../Calls/{CA}/Recordings/{RE}.json`` (pause, resume, stop) and
    ``GET /2010-04-01/Accounts/{AC}/Recordings/{RE}.mp3|.wav`` (media). Basic auth must
    match the account SID and auth token (401 otherwise).

    Attributes:
        base_url: ``http://127.0.0.1:PORT`` once started.
        account_sid: Expected account SID.
        auth_token: Expected auth token.
        create_delay: Seconds each create takes (while counted in flight).
        requests: Authenticated requests as ``(method, path, form)``.
        request_times: Monotonic arrival time of each of ``requests``.
        form_lists: Per request, every form field with all its values.
        calls: Calls by SID, as last returned (JSON dict).
        created: SIDs of created calls, in order.
        in_flight: Creates being served right now.
        max_in_flight: Highest ``in_flight`` observed.
        auth_failures: Requests rejected with 401.
        update_failures_served: Call updates answered with a scripted error.
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
        self.request_times: list[float] = []
        self.form_lists: list[dict[str, list[str]]] = []
        self.calls: dict[str, dict[str, Any]] = {}
        self.created: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth_failures = 0
        self.recordings: dict[str, FakeRecording] = {}
        self.callbacks: list[Callback] = []
        #: Called with the CallSid when a live call gets new TwiML (``Twiml`` or ``Url``):
        #: Twilio then ends the call's ``<Connect><Stream>``.
        self.on_redirect: Callable[[str], Any] | None = None
        #: Called with the CallSid when a call is hung up through the API.
        self.on_hang_up: Callable[[str], Any] | None = None
        self._create_failures: list[TwilioError] = []
        self._update_failures: list[TwilioError] = []
        self.update_failures_served = 0
        self._runner: web.AppRunner | None = None
        self.messages: dict[str, dict[str, Any]] = {}
        self.texts: list[SentText] = []
        self.unsubscribed: set[str] = set()
        self._message_failures: list[TwilioError] = []
        self._tasks: set[asyncio.Task] = set()

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

    def fail_next_messages(
        self,
        count: int = 1,
        *,
        status: int = 400,
        code: int = 21211,
        message: str = "Invalid 'To' Phone Number",
    ) -> None:
        """Makes the next ``count`` message creates fail with a Twilio error JSON.

        Args:
            count: Number of creates to fail.
            status: HTTP status (e.g. 500 or 429 for a transient failure).
            code: Twilio error code.
            message: Error message.
        """
        self._message_failures.extend(TwilioError(status, code, message) for _ in range(count))

    def texts_to(self, number: str) -> list[SentText]:
        """Texts accepted for ``number``, in order."""
        return [t for t in self.texts if t.to == number]

    async def report_status(self, sid: str, status: str, *, error_code: int | None = None) -> int:
        """Posts a message status callback to the message's ``StatusCallback``, signed
        with the auth token like Twilio does.

        Args:
            sid: MessageSid of a text the fake accepted.
            status: ``sent``, ``delivered``, ``undelivered`` or ``failed``.
            error_code: ``ErrorCode`` of a failure.

        Returns:
            The HTTP status the callback got.
        """
        text = next(t for t in self.texts if t.sid == sid)
        assert text.status_callback, "the text was sent without a StatusCallback"
        form = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": self.messages[sid]["from"] or "",
            "To": text.to,
            "MessageSid": sid,
            "SmsSid": sid,
            "MessageStatus": status,
            "SmsStatus": status,
        }
        if error_code is not None:
            form["ErrorCode"] = str(error_code)
        self.messages[sid]["status"] = status
        self.messages[sid]["error_code"] = error_code
        signature = RequestValidator(self.auth_token).compute_signature(text.status_callback, form)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                text.status_callback, data=form, headers={"X-Twilio-Signature": signature}
            ) as response,
        ):
            return response.status

    def fail_next_updates(
        self,
        count: int = 1,
        *,
        status: int = 500,
        code: int = 20500,
        message: str = "An internal server error has occurred",
    ) -> None:
        """Makes the next ``count`` call updates (redirects, hang-ups) fail (Twilio down).

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
        messages = f"/{API_VERSION}/Accounts/{{account}}/Messages"
        app.router.add_post(messages + ".json", self._create_message)
        app.router.add_get(messages + "/{message}.json", self._fetch_message)
        app.router.add_post(base + "/{call}/Recordings.json", self._create_recording)
        app.router.add_post(base + "/{call}/Recordings/{recording}.json", self._update_recording)
        app.router.add_get(
            f"/{API_VERSION}/Accounts/{{account}}/Recordings/{{media}}", self._recording_media
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        """Stops the server."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
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
        recorded = RecordedRequest(request.method, request.path, form)
        recorded.at = time.monotonic()
        self.requests.append(recorded)
        self.request_times.append(recorded.at)
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
            call["url"] = form.get("Url")
            call["async_amd_status_callback"] = (
                form.get("AsyncAmdStatusCallback") if form.get("AsyncAmd") == "true" else None
            )
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
            self.update_failures_served += 1
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
        if form.get("Twiml") or form.get("Url"):
            call["twiml"] = form.get("Twiml")
            await self._notify(self.on_redirect, sid)
        if status in ("completed", "canceled"):
            self.end_call(sid)
            await self._notify(self.on_hang_up, sid)
        return web.json_response(call)

    @staticmethod
    async def _notify(hook: Callable[[str], Any] | None, sid: str) -> None:
        if hook is not None:
            result = hook(sid)
            if inspect.isawaitable(result):
                await result

    async def _fetch(self, request: web.Request) -> web.Response:
        """GET Calls/{CA}.json: the call as last known."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        call = self.calls.get(request.match_info["call"])
        if call is None:
            return self._error(404, 20404, "The requested resource was not found")
        return web.json_response(call)

    def _message_json(self, sid: str, form: Mapping[str, str]) -> dict[str, Any]:
        """A realistic Message resource for a new outbound text."""
        now = _now_rfc2822()
        body = form.get("Body", "")
        service = form.get("MessagingServiceSid")
        gsm = all(ord(c) < 128 for c in body)
        per_segment = (160, 153) if gsm else (70, 67)
        segments = 1 if len(body) <= per_segment[0] else -(-len(body) // per_segment[1])
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": None if service else form.get("From"),
            "messaging_service_sid": service,
            "num_media": "0",
            "num_segments": str(segments),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "accepted" if service else "queued",
            "subresource_uris": {"media": uri + "/Media.json"},
            "to": form.get("To"),
            "uri": uri + ".json",
        }

    async def _create_message(self, request: web.Request) -> web.Response:
        """POST Messages.json: accepts a text (validated like Twilio's API)."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        if self._message_failures:
            err = self._message_failures.pop(0)
            return self._error(err.status, err.code, err.message)
        to = form.get("To", "")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not (form.get("From") or form.get("MessagingServiceSid")):
            return self._error(400, 21603, "A 'From' phone number is required.")
        if not (form.get("Body") or form.get("MediaUrl") or form.get("ContentSid")):
            return self._error(400, 21602, "Message body is required.")
        if len(form.get("Body", "")) > 1600:
            return self._error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if not _E164.match(to):
            return self._error(400, 21211, f"Invalid 'To' Phone Number: {to[:20]}")
        if to in self.unsubscribed:
            return self._error(400, 21610, "Attempt to send to unsubscribed recipient")
        sid = new_message_sid()
        message = self._message_json(sid, form)
        self.messages[sid] = message
        self.texts.append(
            SentText(
                sid=sid,
                to=to,
                sender=form.get("MessagingServiceSid") or form.get("From", ""),
                body=form.get("Body", ""),
                status_callback=form.get("StatusCallback"),
                received_at=time.monotonic(),
            )
        )
        return web.json_response(message, status=201)

    async def _fetch_message(self, request: web.Request) -> web.Response:
        """GET Messages/{SM}.json: the text as last known."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        message = self.messages.get(request.match_info["message"])
        if message is None:
            return self._error(404, 20404, "The requested resource was not found")
        return web.json_response(message)

    # --- recordings ---------------------------------------------------------------------

    def _recording_json(self, rec: FakeRecording) -> dict[str, Any]:
        """A Recording resource as Twilio returns it."""
        now = _now_rfc2822()
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{rec.call_sid}/Recordings/"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "call_sid": rec.call_sid,
            "conference_sid": None,
            "date_created": now,
            "date_updated": now,
            "start_time": now,
            "duration": None if rec.status != "completed" else str(self._duration(rec)),
            "sid": rec.sid,
            "price": None,
            "price_unit": "USD",
            "status": rec.status,
            "channels": rec.channels,
            "source": "StartCallRecordingAPI",
            "error_code": None,
            "track": "both",
            "uri": uri + rec.sid + ".json",
            "encryption_details": None,
        }

    @staticmethod
    def _duration(rec: FakeRecording) -> int:
        return max(1, round(time.monotonic() - rec.started))

    async def _create_recording(self, request: web.Request) -> web.Response:
        """POST Calls/{CA}/Recordings.json: starts recording a live call."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        sid = request.match_info["call"]
        call = self.calls.get(sid)
        if call is not None and call["status"] in ("completed", "canceled"):
            return self._error(400, 21220, "Call is not in-progress.")
        channels = {"mono": 1, "dual": 2}.get(form.get("RecordingChannels", "mono"))
        if channels is None:
            return self._error(400, 21201, "Invalid RecordingChannels.")
        events: list[str] = []
        for value in self.form_lists[-1].get("RecordingStatusCallbackEvent", ["completed"]):
            events.extend(value.split())
        if any(e not in ("in-progress", "completed", "absent") for e in events):
            return self._error(400, 13621, "Invalid 'recordingStatusCallbackEvent'")
        rec = FakeRecording(
            sid="RE" + secrets.token_hex(16),
            call_sid=sid,
            channels=channels,
            status="in-progress",
            callback=form.get("RecordingStatusCallback"),
            events=events,
        )
        rec.statuses.append("in-progress")
        self.recordings[rec.sid] = rec
        if "in-progress" in events:
            self._spawn(self._recording_callback(rec))
        return web.json_response(self._recording_json(rec), status=201)

    async def _update_recording(self, request: web.Request) -> web.Response:
        """POST Calls/{CA}/Recordings/{RE}.json: ``Status`` paused, in-progress or stopped."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        rec = self.recordings.get(request.match_info["recording"])
        if rec is None or rec.call_sid != request.match_info["call"]:
            return self._error(404, 20404, "The requested resource was not found")
        status = form.get("Status")
        if status not in ("paused", "in-progress", "stopped"):
            return self._error(400, 20001, f"Invalid Status {status!r}.")
        if rec.status not in ("in-progress", "paused"):
            return self._error(400, 21220, "Recording is not in-progress.")
        rec.status = status
        rec.statuses.append(status)
        if status == "stopped":
            self._finish_recording(rec)
        return web.json_response(self._recording_json(rec))

    async def _recording_media(self, request: web.Request) -> web.Response:
        """GET Recordings/{RE}.mp3|.wav: the media of a completed recording."""
        form = await self._record(request)
        if isinstance(form, web.Response):
            return form
        match = re.fullmatch(r"(RE[0-9a-f]{32})\.(mp3|wav)", request.match_info["media"])
        rec = self.recordings.get(match.group(1)) if match else None
        if match is None or rec is None or rec.status != "completed":
            return self._error(404, 20404, "The requested resource was not found")
        channels = request.query.get("RequestedChannels", "1")
        body = f"FAKE-{match.group(2).upper()}-{rec.sid}-channels={channels}".encode()
        content_type = "audio/mpeg" if match.group(2) == "mp3" else "audio/x-wav"
        return web.Response(body=body, content_type=content_type)

    def end_call(self, call_sid: str) -> None:
        """The call ended (the caller hung up): its recordings complete, as on Twilio."""
        call = self.calls.get(call_sid)
        if call is not None and call["status"] not in ("completed", "canceled"):
            call["status"] = "completed"
        for rec in list(self.recordings.values()):
            if rec.call_sid == call_sid and rec.status in ("in-progress", "paused"):
                self._finish_recording(rec)

    def _finish_recording(self, rec: FakeRecording) -> None:
        rec.status = "completed"
        rec.statuses.append("completed")
        if "completed" in rec.events:
            self._spawn(self._recording_callback(rec))

    async def _recording_callback(self, rec: FakeRecording) -> None:
        if not rec.callback:
            return
        status = "in-progress" if rec.status in ("in-progress", "paused") else rec.status
        form = {
            "AccountSid": self.account_sid,
            "CallSid": rec.call_sid,
            "RecordingSid": rec.sid,
            "RecordingUrl": f"{self.base_url}/{API_VERSION}/Accounts/{self.account_sid}"
            f"/Recordings/{rec.sid}",
            "RecordingStatus": status,
            "RecordingDuration": str(self._duration(rec)) if status == "completed" else "-1",
            "RecordingChannels": str(rec.channels),
            "RecordingStartTime": _now_rfc2822(),
            "RecordingSource": "StartCallRecordingAPI",
            "RecordingTrack": "both",
            "ErrorCode": "0",
        }
        await self.send_callback(rec.callback, form)

    # --- Twilio's callbacks to the server -------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until every callback the fake started has been answered."""
        async with asyncio.timeout(timeout):
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def send_callback(self, url: str, form: dict[str, str]) -> Callback:
        """POST a form to the server, signed with ``X-Twilio-Signature`` as Twilio does."""
        signature = RequestValidator(self.auth_token).compute_signature(url, form)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url,
                data=form,
                headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
            ) as response:
                body = await response.text()
                callback = Callback(url=url, form=dict(form), status=response.status, body=body)
        self.callbacks.append(callback)
        return callback

    async def send_amd_verdict(
        self, call_sid: str, answered_by: str, *, detection_ms: int = 4200
    ) -> Callback:
        """The asynchronous AMD result of a call created with ``AsyncAmd=true``.

        Args:
            call_sid: The call.
            answered_by: ``human``, ``machine_end_beep``, ``machine_end_silence``,
                ``machine_end_other``, ``fax`` or ``unknown``.
            detection_ms: ``MachineDetectionDuration``.

        Returns:
            The server's answer.
        """
        call = self.calls[call_sid]
        url = call.get("async_amd_status_callback")
        assert url, "the call was not created with AsyncAmd=true and a callback"
        form = {
            "AccountSid": self.account_sid,
            "CallSid": call_sid,
            "AnsweredBy": answered_by,
            "MachineDetectionDuration": str(detection_ms),
        }
        return await self.send_callback(url, form)

    async def run_dial(
        self,
        call_sid: str,
        *,
        outcome: str,
        caller: str = "+15555550100",
        called: str = "+15555550199",
        direction: str = "inbound",
        talk_secs: int = 42,
    ) -> dict[str, Callback]:
        """Execute the ``<Dial><Number url>`` of the TwiML the call was redirected to.

        Args:
            call_sid: The caller's call (the ``<Dial>`` runs on it).
            outcome: ``answered`` (the advisor picks up: whisper, then the bridged call
                ends), ``no-answer``, ``busy`` or ``failed``.
            caller: ``From`` of the caller's call.
            called: ``To`` of the caller's call.
            direction: ``Direction`` of the caller's call (``inbound``, ``outbound-api``).
            talk_secs: ``DialCallDuration`` of an answered dial.

        Returns:
            ``{"whisper": ..., "action": ...}``: the server's answers (no whisper unless
            answered).
        """
        twiml = (self.calls.get(call_sid) or {}).get("twiml")
        assert twiml, "the call was not redirected to TwiML"
        root = ET.fromstring(twiml)
        dial = root.find("Dial")
        assert dial is not None, twiml
        number = dial.find("Number")
        child_sid = new_call_sid()
        parent = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call_sid,
            "CallStatus": "in-progress",
            "Direction": direction,
            "From": caller,
            "To": called,
            "Caller": caller,
            "Called": called,
        }
        answers: dict[str, Callback] = {}
        if outcome == "answered" and number is not None and number.get("url"):
            child = {
                "AccountSid": self.account_sid,
                "ApiVersion": API_VERSION,
                "CallSid": child_sid,
                "ParentCallSid": call_sid,
                "CallStatus": "in-progress",
                "Direction": "outbound-dial",
                "From": called,
                "To": (number.text or "").strip(),
                "Caller": called,
                "Called": (number.text or "").strip(),
            }
            answers["whisper"] = await self.send_callback(number.get("url", ""), child)
        if dial.get("action"):
            status = "completed" if outcome == "answered" else outcome
            action = {
                **parent,
                "DialCallStatus": status,
                "DialCallSid": child_sid,
                "DialCallDuration": str(talk_secs if outcome == "answered" else 0),
                "DialBridged": "true" if outcome == "answered" else "false",
            }
            answers["action"] = await self.send_callback(dial.get("action", ""), action)
        return answers

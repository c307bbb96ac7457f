"""HTTP and websocket routes of calls: Twilio webhooks and media streams.

``POST /twilio/voice`` (inbound webhook) and ``POST /twilio/outbound`` (answered outbound
call) check ``X-Twilio-Signature`` against ``PUBLIC_BASE_URL`` + path and answer TwiML
that connects a media stream. Its parameters (caller, direction, scenario, customer and
campaign attempt) travel with a short-lived token that signs all of them together with
the CallSid (:func:`telephony.twilio.make_stream_token`). ``WS /twilio/media`` runs the bot only
for a valid token, used once, and only if no other stream of the call is live or has
ended (Redis markers, so across processes); anything else is closed with 1008.
``POST /twilio/status`` records status callbacks idempotently. Every webhook answers 503
naming the missing settings while calls are disabled, and 4xx to input of the wrong shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from redis.exceptions import RedisError
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect, WebSocketState

from api.deps import BadWebhook, ResourcesDep, TwilioFormDep
from bot.call import run_call
from bot.handover import AdvisorHandover  # [phone-features hook]
from bot.pipeline import CallOptions
from campaigns.dialer import record_call_outcome, record_call_status
from core.pii import mask_phone
from core.resources import AppResources
from core.settings import Settings
from crm import calls as crm_calls
from crm import phone as crm_phone  # [phone-features hook]
from telephony import twilio as tw
from tools.context import CallSession

router = APIRouter()
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013
#: Bytes; Twilio media messages are well under 1 KiB.
MAX_MEDIA_MESSAGE_BYTES = 16 * 1024
_CALL_STATUS_RE = re.compile(r"[a-z][a-z-]{0,31}")
_SEQUENCE_RE = re.compile(r"[0-9]{1,9}")
START_TIMEOUT_SECS = 10.0
VOICEMAIL_TEXT = (
    "Hi, this is the AI assistant from {name} service, calling about your vehicle. "
    "Please call us back at {number}. Thank you."
)


@dataclass
class CallHooks:
    """Observers and knobs of the phone calls, given to ``runner.create_app`` (tests,
    benchmarks); production passes none.

    Attributes:
        options_factory: Pipeline knobs of each new call (``None``: the phone defaults).
        active: Filled with the calls in progress, by CallSid, when given.
    """

    options_factory: Callable[[], CallOptions | None] | None = None
    active: dict[str, CallSession] | None = None


def get_call_hooks(conn: HTTPConnection) -> CallHooks:
    """The call hooks the app was created with."""
    return conn.app.state.call_hooks


CallHooksDep = Annotated[CallHooks, Depends(get_call_hooks)]


async def calls_enabled(resources: ResourcesDep) -> None:
    """503 naming the missing settings while calls are disabled."""
    missing = resources.settings.missing_call_settings()
    if missing:
        raise BadWebhook(503, f"calls disabled: missing {', '.join(missing)}")


async def call_webhook_form(
    _enabled: Annotated[None, Depends(calls_enabled)], form: TwilioFormDep
) -> dict[str, str]:
    """The signed form of a call webhook (calls enabled; no NUL characters: 400)."""
    if any("\x00" in k or "\x00" in v for k, v in form.items()):
        raise BadWebhook(400, "form fields must not contain NUL characters")
    return form


CallFormDep = Annotated[dict[str, str], Depends(call_webhook_form)]


def _call_sid(form: dict[str, str]) -> str:
    call_sid = form.get("CallSid", "")
    if not tw.is_call_sid(call_sid):
        raise BadWebhook(400, "CallSid missing or malformed")
    return call_sid


def _phone_field(form: dict[str, str], name: str) -> str:
    value = form.get(name, "")
    if not tw.is_printable_text(value, max_chars=tw.MAX_STREAM_PARAMETER_CHARS):
        raise BadWebhook(400, f"{name} malformed")
    return value


def _id_query(request: Request, name: str) -> str:
    """A decimal id query parameter (``""`` when absent); 400 when it is not one."""
    value = request.query_params.get(name, "")
    if value and tw.parse_id(value) is None:
        raise BadWebhook(400, f"{name} must be a positive integer of at most 18 digits")
    return value


def _xml(body: str) -> Response:
    return Response(content=body, media_type="application/xml")


def _calls_enabled(resources: AppResources) -> str | None:
    missing = resources.settings.missing_call_settings()
    return ", ".join(missing) if missing else None


@router.post("/twilio/voice")
async def twilio_voice(form: CallFormDep, resources: ResourcesDep) -> Response:
    """Inbound call webhook: connect the call to the media stream."""
    try:
        call_sid = _call_sid(form)
        caller = _phone_field(form, "From")
    except BadWebhook as bad:
        return bad.response()
    logger.info(f"inbound call {call_sid} from {mask_phone(caller)}")
    claims = tw.StreamClaims(call_sid=call_sid, caller=caller)
    return _xml(
        tw.connect_stream_twiml(
            tw.media_stream_url(resources.settings),
            tw.stream_parameters(resources.settings, claims),
        )
    )


@router.post("/twilio/outbound")
async def twilio_outbound(request: Request, form: CallFormDep, resources: ResourcesDep) -> Response:
    """An outbound call was answered: the bot for a person, a voicemail for a machine."""
    try:
        scenario = request.query_params.get("scenario", "service_due")
        if scenario not in ("service_due", "confirmation"):
            raise BadWebhook(400, "unknown scenario")
        customer_id = _id_query(request, "customer_id")
        attempt_id = _id_query(request, "attempt_id")
        call_sid = _call_sid(form)
        caller = _phone_field(form, "To")
    except BadWebhook as bad:
        return bad.response()
    answered_by = form.get("AnsweredBy", "")
    if answered_by.startswith("machine") or answered_by == "fax":
        logger.info(f"outbound call {call_sid} reached voicemail")
        async with resources.db.connection() as conn:
            await crm_calls.start_call(
                conn, call_sid=call_sid, direction="outbound", scenario=scenario
            )
            await crm_phone.end_voicemail_call(conn, call_sid=call_sid)  # [phone-features hook]
        profile = resources.profile
        return _xml(
            tw.voicemail_twiml(
                VOICEMAIL_TEXT.format(name=profile.name, number=_spoken(profile.phone_number))
            )
        )
    claims = tw.StreamClaims(
        call_sid=call_sid,
        caller=caller,
        direction="outbound",
        scenario=scenario,
        customer_id=customer_id,
        attempt_id=attempt_id,
    )
    return _xml(
        tw.connect_stream_twiml(
            tw.media_stream_url(resources.settings),
            tw.stream_parameters(resources.settings, claims),
        )
    )


def _spoken(number: str) -> str:
    digits = number.removeprefix("+1")
    return " ".join(digits)


@router.post("/twilio/status")
async def twilio_status(form: CallFormDep, resources: ResourcesDep) -> Response:
    """Status callbacks: recorded once per (call, status, sequence)."""
    try:
        call_sid = _call_sid(form)
        status = form.get("CallStatus") or "unknown"
        if not _CALL_STATUS_RE.fullmatch(status):
            raise BadWebhook(400, "CallStatus malformed")
        sequence_text = form.get("SequenceNumber") or "0"
        if not _SEQUENCE_RE.fullmatch(sequence_text):
            raise BadWebhook(400, "SequenceNumber must be a non-negative integer")
    except BadWebhook as bad:
        return bad.response()
    sequence = int(sequence_text)
    safe = {k: v for k, v in form.items() if k not in ("From", "To", "Caller", "Called")}
    async with resources.db.connection() as conn:
        new = await crm_calls.record_status_callback(
            conn, call_sid=call_sid, call_status=status, sequence=sequence, payload=safe
        )
    if new:
        # Campaign calls: no-answer/busy schedule a retry, completed closes the attempt.
        await record_call_status(
            resources.db,
            call_sid=call_sid,
            status=status,
            answered_by=form.get("AnsweredBy"),
            campaign_settings=resources.profile.campaigns,
        )
    return PlainTextResponse("", status_code=204)


@dataclass(frozen=True)
class StreamStart:
    """The fields of Twilio's ``start`` message the server uses.

    Attributes:
        call_sid: ``start.callSid``.
        stream_sid: ``start.streamSid``.
        parameters: ``start.customParameters`` (string values only).
    """

    call_sid: str
    stream_sid: str
    parameters: dict[str, str]


class StreamRefused(Exception):
    """A media stream that is closed before the bot runs.

    Args:
        reason: Why, for the log (never the message content: it may hold PII).
        code: Websocket close code.
    """

    def __init__(self, reason: str, code: int = WS_POLICY_VIOLATION) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def _parse_start(message: dict[str, Any]) -> StreamStart:
    start = message.get("start")
    if not isinstance(start, dict):
        raise StreamRefused("start message without a start object")
    call_sid = start.get("callSid")
    stream_sid = start.get("streamSid")
    if not isinstance(call_sid, str) or not isinstance(stream_sid, str):
        raise StreamRefused("start message without a well-formed callSid and streamSid")
    if not tw.is_call_sid(call_sid) or not tw.is_stream_sid(stream_sid):
        raise StreamRefused("start message without a well-formed callSid and streamSid")
    params = start.get("customParameters", {})
    if params is None:
        params = {}
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise StreamRefused("customParameters is not an object of strings")
    return StreamStart(call_sid=call_sid, stream_sid=stream_sid, parameters=params)


async def _read_start(websocket: WebSocket) -> StreamStart:
    """Read Twilio's ``connected`` and ``start`` messages.

    Raises:
        StreamRefused: Anything else, in any shape, or nothing in time.
    """
    for _ in range(2):
        try:
            received = await asyncio.wait_for(websocket.receive(), timeout=START_TIMEOUT_SECS)
        except TimeoutError:
            raise StreamRefused("no start message in time") from None
        if received.get("type") == "websocket.disconnect":
            raise StreamRefused("disconnected before the start message")
        raw = received.get("text")
        if not isinstance(raw, str):
            raise StreamRefused("binary message before the start message")
        if len(raw) > MAX_MEDIA_MESSAGE_BYTES:
            raise StreamRefused("start message too large")
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            raise StreamRefused("message before the start is not JSON") from None
        if not isinstance(message, dict):
            raise StreamRefused("message before the start is not a JSON object")
        event = message.get("event")
        if event == "start":
            return _parse_start(message)
        if event != "connected":
            raise StreamRefused("unexpected event before the start message")
    raise StreamRefused("no start message after connected")


async def _close(websocket: WebSocket, code: int) -> None:
    """Close the socket unless the client is already gone."""
    if websocket.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await websocket.close(code=code)


async def _admit_stream(resources: AppResources, websocket: WebSocket) -> StreamAdmission:
    """Check the start message, the token, its single use and the call's single stream.

    While Redis is unreachable the single-use and one-stream checks cannot run: the
    stream is admitted on its signed token alone (and a warning is logged).

    Raises:
        StreamRefused: The stream must be closed (1008).
    """
    settings = resources.settings
    start = await _read_start(websocket)
    token = tw.verify_stream_token(settings, call_sid=start.call_sid, parameters=start.parameters)
    if token is None:
        raise StreamRefused("missing, invalid or expired stream token")
    marker = tw.LiveCallMarker(resources.redis, start.call_sid)
    try:
        if not await tw.consume_stream_token(resources.redis, token):
            raise StreamRefused("stream token already used")
        if not await marker.acquire():
            raise StreamRefused("the call already has a live stream or has ended")
    except (RedisError, OSError) as exc:
        # Availability over replay protection while Redis is down: the token is still
        # signed, bound to this call and its parameters, and expires within minutes, and
        # a caller must never be left in silence (the fault rule). Logged, not hidden.
        logger.warning(
            f"call {start.call_sid}: stream admitted without the single-use and one-stream "
            f"checks: Redis unreachable ({type(exc).__name__})"
        )
    return StreamAdmission(start=start, claims=token.claims, marker=marker)


@dataclass(frozen=True)
class StreamAdmission:
    """An admitted media stream: its start message, verified claims and live marker."""

    start: StreamStart
    claims: tw.StreamClaims
    marker: tw.LiveCallMarker


@router.websocket("/twilio/media")
async def twilio_media(websocket: WebSocket, resources: ResourcesDep, hooks: CallHooksDep) -> None:
    """Twilio media stream: verify the per-call token, then run the bot."""
    settings = resources.settings
    await websocket.accept()
    try:
        if missing := _calls_enabled(resources):
            raise StreamRefused(f"calls disabled: missing {missing}", code=WS_TRY_AGAIN_LATER)
        admission = await _admit_stream(resources, websocket)
    except StreamRefused as refused:
        logger.warning(f"media stream refused: {refused.reason}")
        await _close(websocket, refused.code)
        return
    call_sid = admission.start.call_sid
    stream_sid = admission.start.stream_sid
    claims = admission.claims

    assert settings.twilio_auth_token is not None
    serializer = tw.DealershipTwilioSerializer(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token.get_secret_value(),
        base_url=settings.twilio_api_base_url,
        redis=resources.redis,  # [phone-features hook] no hang-up after a hand-off
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    session = CallSession(
        call_sid=call_sid,
        caller_phone=claims.caller or None,
        direction="outbound" if claims.direction == "outbound" else "inbound",
        scenario=claims.scenario,
    )
    registry = hooks.active
    if registry is not None:
        registry[call_sid] = session
    keep_alive = asyncio.create_task(admission.marker.keep_alive(), name=f"live-marker-{call_sid}")
    try:
        await run_call(
            transport=transport,
            session=session,
            resources=resources,
            call_control=AdvisorHandover(  # [phone-features hook] warm transfer
                resources=resources,
                session=session,
                twilio=tw.TwilioCallControl(settings, call_sid, serializer),
            ),
            options=hooks.options_factory() if hooks.options_factory else None,
            # Loaded by the call itself, so a database outage cannot stop it starting.
            customer_id=tw.parse_id(claims.customer_id),
        )
    except Exception as exc:
        logger.opt(exception=exc).error(f"call {call_sid} crashed: {type(exc).__name__}")
        await _hang_up_after_crash(settings, call_sid)
    finally:
        keep_alive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keep_alive
        try:
            await admission.marker.release()
        except Exception as exc:
            logger.warning(f"call {call_sid}: live-call marker not released: {type(exc).__name__}")
        if registry is not None:
            registry.pop(call_sid, None)
        if session.direction == "outbound":
            try:
                await record_call_outcome(resources.db, call_sid=call_sid, outcome=session.outcome)
            except Exception as exc:
                logger.error(
                    f"call {call_sid}: campaign outcome not recorded: {type(exc).__name__}"
                )


async def _hang_up_after_crash(settings: Settings, call_sid: str) -> None:
    try:
        account = tw.twilio_account(settings)
        await asyncio.to_thread(lambda: account.calls(call_sid).update(status="completed"))
    except Exception as exc:
        logger.error(f"could not hang up call {call_sid} after a crash: {type(exc).__name__}")

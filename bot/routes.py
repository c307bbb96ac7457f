"""HTTP and websocket routes of calls: Twilio webhooks and media streams.

``POST /twilio/voice`` (inbound webhook) and ``POST /twilio/outbound`` (answered outbound
call) check ``X-Twilio-Signature`` against ``PUBLIC_BASE_URL`` + path and answer TwiML
that connects a media stream carrying the caller's number and a short-lived per-call
token. ``WS /twilio/media`` accepts the stream only with a valid token for its CallSid.
``POST /twilio/status`` records status callbacks idempotently.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import PlainTextResponse, Response
from loguru import logger
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)
from starlette.websockets import WebSocketDisconnect

from app.call_session import CallSession
from app.campaigns import record_call_outcome, record_call_status
from app.pii import mask_phone
from app.resources import AppResources
from bot import twilio as tw
from bot.pipeline import run_call
from crm import calls as crm_calls

router = APIRouter()
WS_POLICY_VIOLATION = 1008
WS_TRY_AGAIN_LATER = 1013
#: Bytes; Twilio media messages are well under 1 KiB.
MAX_MEDIA_MESSAGE_BYTES = 16 * 1024
START_TIMEOUT_SECS = 10.0
VOICEMAIL_TEXT = (
    "Hi, this is the AI assistant from {name} service, calling about your vehicle. "
    "Please call us back at {number}. Thank you."
)


def _resources(request: Request | WebSocket) -> AppResources:
    return request.app.state.resources


async def _signed_form(request: Request) -> dict[str, str] | None:
    resources = _resources(request)
    form = {k: str(v) for k, v in (await request.form()).items()}
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    url = tw.public_url(resources.settings, path)
    if not tw.signature_is_valid(
        resources.settings,
        url=url,
        params=form,
        signature=request.headers.get("X-Twilio-Signature"),
    ):
        logger.warning(f"rejected unsigned or mis-signed Twilio request to {request.url.path}")
        return None
    return form


def _xml(body: str) -> Response:
    return Response(content=body, media_type="application/xml")


def _calls_enabled(resources: AppResources) -> str | None:
    missing = resources.settings.missing_call_settings()
    return ", ".join(missing) if missing else None


@router.post("/twilio/voice")
async def twilio_voice(request: Request) -> Response:
    """Inbound call webhook: connect the call to the media stream."""
    resources = _resources(request)
    if missing := _calls_enabled(resources):
        return PlainTextResponse(f"calls disabled: missing {missing}", status_code=503)
    form = await _signed_form(request)
    if form is None:
        return PlainTextResponse("invalid signature", status_code=403)
    call_sid = form.get("CallSid", "")
    logger.info(f"inbound call {call_sid} from {mask_phone(form.get('From'))}")
    return _xml(
        tw.connect_stream_twiml(
            tw.media_stream_url(resources.settings),
            {
                "caller": form.get("From", ""),
                "direction": "inbound",
                "scenario": "inbound",
                "token": tw.make_stream_token(resources.settings, call_sid),
            },
        )
    )


@router.post("/twilio/outbound")
async def twilio_outbound(request: Request) -> Response:
    """An outbound call was answered: the bot for a person, a voicemail for a machine."""
    resources = _resources(request)
    form = await _signed_form(request)
    if form is None:
        return PlainTextResponse("invalid signature", status_code=403)
    scenario = request.query_params.get("scenario", "service_due")
    if scenario not in ("service_due", "confirmation"):
        return PlainTextResponse("unknown scenario", status_code=400)
    call_sid = form.get("CallSid", "")
    answered_by = form.get("AnsweredBy", "")
    if answered_by.startswith("machine") or answered_by == "fax":
        logger.info(f"outbound call {call_sid} reached voicemail")
        async with resources.db.connection() as conn:
            await crm_calls.start_call(
                conn, call_sid=call_sid, direction="outbound", scenario=scenario
            )
            await conn.execute(
                "UPDATE calls SET outcome = 'voicemail', ended_at = now() WHERE call_sid = %(sid)s",
                {"sid": call_sid},
            )
        profile = resources.profile
        return _xml(
            tw.voicemail_twiml(
                VOICEMAIL_TEXT.format(name=profile.name, number=_spoken(profile.phone_number))
            )
        )
    return _xml(
        tw.connect_stream_twiml(
            tw.media_stream_url(resources.settings),
            {
                "caller": form.get("To", ""),
                "direction": "outbound",
                "scenario": scenario,
                "customer_id": request.query_params.get("customer_id", ""),
                "attempt_id": request.query_params.get("attempt_id", ""),
                "token": tw.make_stream_token(resources.settings, call_sid),
            },
        )
    )


def _spoken(number: str) -> str:
    digits = number.removeprefix("+1")
    return " ".join(digits)


@router.post("/twilio/status")
async def twilio_status(request: Request) -> Response:
    """Status callbacks: recorded once per (call, status, sequence)."""
    resources = _resources(request)
    form = await _signed_form(request)
    if form is None:
        return PlainTextResponse("invalid signature", status_code=403)
    call_sid = form.get("CallSid", "")
    status = form.get("CallStatus", "unknown")
    sequence = int(form.get("SequenceNumber", "0") or 0)
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
    hook = getattr(request.app.state, "on_call_status", None)
    if new and hook is not None:
        await hook(call_sid=call_sid, status=status, form=safe)
    return PlainTextResponse("", status_code=204)


async def _read_start(websocket: WebSocket) -> dict | None:
    """Read Twilio's ``connected`` and ``start`` messages; ``None`` if malformed."""
    for _ in range(3):
        raw = await asyncio.wait_for(websocket.receive_text(), timeout=START_TIMEOUT_SECS)
        if len(raw) > MAX_MEDIA_MESSAGE_BYTES:
            return None
        message = json.loads(raw)
        if message.get("event") == "start":
            return message
    return None


@router.websocket("/twilio/media")
async def twilio_media(websocket: WebSocket) -> None:
    """Twilio media stream: verify the per-call token, then run the bot."""
    resources = _resources(websocket)
    settings = resources.settings
    await websocket.accept()
    try:
        start = await _read_start(websocket)
    except (TimeoutError, json.JSONDecodeError, WebSocketDisconnect, KeyError):
        start = None
    info = (start or {}).get("start", {})
    call_sid = info.get("callSid", "")
    stream_sid = info.get("streamSid", "")
    params = info.get("customParameters") or {}
    if not (
        start
        and call_sid
        and stream_sid
        and tw.stream_token_is_valid(settings, call_sid, params.get("token"))
    ):
        logger.warning("media stream refused: missing or invalid stream token")
        await websocket.close(code=WS_POLICY_VIOLATION)
        return
    if _calls_enabled(resources):
        await websocket.close(code=WS_TRY_AGAIN_LATER)
        return

    assert settings.twilio_auth_token is not None
    serializer = tw.DealershipTwilioSerializer(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=settings.twilio_account_sid,
        auth_token=settings.twilio_auth_token.get_secret_value(),
        base_url=settings.twilio_api_base_url,
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
    customer_id = params.get("customer_id")
    session = CallSession(
        call_sid=call_sid,
        caller_phone=params.get("caller") or None,
        direction="outbound" if params.get("direction") == "outbound" else "inbound",
        scenario=params.get("scenario") or "inbound",
    )
    registry = getattr(websocket.app.state, "active_calls", None)
    if registry is not None:
        registry[call_sid] = session
    try:
        await run_call(
            transport=transport,
            session=session,
            resources=resources,
            call_control=tw.TwilioCallControl(settings, call_sid, serializer),
            options=_call_options(websocket),
            # Loaded by the call itself, so a database outage cannot stop it starting.
            customer_id=int(customer_id) if customer_id and customer_id.isdigit() else None,
        )
    except Exception as exc:
        logger.opt(exception=exc).error(f"call {call_sid} crashed: {type(exc).__name__}")
        await _hang_up_after_crash(settings, call_sid)
    finally:
        if registry is not None:
            registry.pop(call_sid, None)
        if session.direction == "outbound":
            try:
                await record_call_outcome(resources.db, call_sid=call_sid, outcome=session.outcome)
            except Exception as exc:
                logger.error(
                    f"call {call_sid}: campaign outcome not recorded: {type(exc).__name__}"
                )
        hook = getattr(websocket.app.state, "on_call_finished", None)
        if hook is not None:
            await hook(session)


def _call_options(websocket: WebSocket):
    factory = getattr(websocket.app.state, "call_options_factory", None)
    return factory() if factory else None


async def _hang_up_after_crash(settings, call_sid: str) -> None:
    try:
        client = tw.twilio_client(settings)
        await asyncio.to_thread(
            lambda: (
                client.api.v2010.accounts(settings.twilio_account_sid)
                .calls(call_sid)
                .update(status="completed")
            )
        )
    except Exception as exc:
        logger.error(f"could not hang up call {call_sid} after a crash: {type(exc).__name__}")

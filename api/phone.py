"""Routes of the phone features: warm-transfer webhooks, recording and answering-machine
callbacks, and the ops endpoints for recordings and call summaries.

Twilio webhooks (each checks ``X-Twilio-Signature`` over ``PUBLIC_BASE_URL`` + path +
query and the form: 403 otherwise; odd fields: 400):

* ``POST /twilio/transfer/whisper?call_sid=CA...``: the ``<Number url>`` of a warm transfer.
  Twilio fetches it when the advisor answers; the TwiML ``<Say>``s the whisper to the
  advisor only. It is served once, only while that call's transfer is ringing, and only
  for the call in the query (and its ``ParentCallSid`` when Twilio sends one).
* ``POST /twilio/transfer/status``: the ``<Dial action>``. ``DialCallStatus`` no-answer,
  busy, failed or canceled: a callback request with the summary, an apology, a hang-up.
* ``POST /twilio/recording``: the recording status callback (SID, status, duration, URL
  onto the call's row).
* ``POST /twilio/amd``: the asynchronous answering-machine verdict of an outbound call. A
  machine's greeting has ended (``machine_end_beep``, ``machine_end_silence``,
  ``machine_end_other``): the live call is redirected to the voicemail message (callback
  number digit by digit) and recorded as a voicemail.

Ops (``Authorization: Bearer $ADMIN_TOKEN``): ``GET /calls/{call_sid}/recording`` streams
the recording from Twilio with the account's credentials (which never leave the server);
``GET /calls/{call_sid}/summary`` gives the call's structured summary and phone facts.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from loguru import logger

from api.deps import AdminDep, BadWebhook, ResourcesDep
from api.telephony import CallFormDep, _call_sid, _id_query, _xml
from bot.i18n import text
from campaigns.dialer import record_call_outcome
from core.resources import AppResources
from crm import calls as crm_calls
from crm import phone as crm_phone
from telephony import rest as twilio_rest
from telephony import twilio as tw
from telephony.twiml import hang_up_twiml, say_twiml, spoken_digits

router = APIRouter()

_MACHINE_ENDS = ("machine_end_beep", "machine_end_silence", "machine_end_other")
_RECORDING_STATUSES = ("in-progress", "completed", "absent", "failed")
_DIGITS_RE = re.compile(r"-?[0-9]{1,9}")
_E164_RE = re.compile(r"\+[1-9][0-9]{7,14}")
MAX_RECORDING_URL_CHARS = 500


def _optional_int(form: dict[str, str], name: str, *, low: int, high: int) -> int | None:
    """An optional integer field; 400 when present and not an integer in ``[low, high]``.

    Negative values (Twilio sends ``-1`` for an unknown duration) count as absent.
    """
    value = form.get(name, "")
    if not value:
        return None
    if not _DIGITS_RE.fullmatch(value):
        raise BadWebhook(400, f"{name} must be an integer")
    number = int(value)
    if number < 0:
        return None
    if not low <= number <= high:
        raise BadWebhook(400, f"{name} out of range")
    return number


def _optional_call_sid(form: dict[str, str], name: str) -> str | None:
    value = form.get(name, "")
    if not value:
        return None
    if not tw.is_call_sid(value):
        raise BadWebhook(400, f"{name} malformed")
    return value


# --- warm transfer ------------------------------------------------------------------------


@router.post("/twilio/transfer/whisper")
async def transfer_whisper(
    request: Request, form: CallFormDep, resources: ResourcesDep
) -> Response:
    """The advisor answered: say the whisper to them (once), then Twilio connects."""
    try:
        call_sid = request.query_params.get("call_sid", "")
        if not tw.is_call_sid(call_sid):
            raise BadWebhook(400, "call_sid missing or malformed")
        _call_sid(form)  # the advisor's leg
        parent = _optional_call_sid(form, "ParentCallSid")
        if parent is not None and parent != call_sid:
            raise BadWebhook(403, "not this call's transfer")
    except BadWebhook as bad:
        return bad.response()
    async with resources.db.connection() as conn:
        claimed = await crm_phone.claim_whisper(conn, call_sid=call_sid)
    if claimed is None:
        return PlainTextResponse("no transfer of this call is ringing", status_code=404)
    whisper, _language = claimed
    logger.info(f"call {call_sid}: advisor answered; whisper played")
    return _xml(say_twiml(whisper, language="en"))


def _callback_phone(form: dict[str, str]) -> str | None:
    """The customer's number of the caller's leg: ``From`` inbound, ``To`` outbound."""
    direction = form.get("Direction", "")
    number = form.get("To" if direction.startswith("outbound") else "From", "")
    return number if _E164_RE.fullmatch(number) else None


@router.post("/twilio/transfer/status")
async def transfer_status(request: Request, form: CallFormDep, resources: ResourcesDep) -> Response:
    """The advisor's leg ended: connected calls hang up; the others get a callback."""
    try:
        call_sid = _call_sid(form)
        dial_status = form.get("DialCallStatus", "")
        if dial_status not in crm_phone.DIAL_STATUSES:
            raise BadWebhook(400, "DialCallStatus missing or unknown")
        dial_call_sid = _optional_call_sid(form, "DialCallSid")
    except BadWebhook as bad:
        return bad.response()
    async with resources.db.connection() as conn, conn.transaction():
        result = await crm_phone.finish_transfer(
            conn, call_sid=call_sid, dial_call_status=dial_status, dial_call_sid=dial_call_sid
        )
        if result is None:
            return PlainTextResponse("this call has no transfer", status_code=404)
        if result.status == "connected":
            return _xml(hang_up_twiml())
        if result.new:
            reason = f"advisor line {result.status} on a transfer: {result.reason or ''}"
            await crm_calls.add_callback_request(
                conn,
                call_sid=call_sid,
                customer_id=result.customer_id,
                phone=_callback_phone(form),
                reason=reason[:500],
            )
            if result.whisper:
                await crm_phone.attach_callback_summary(
                    conn, call_sid=call_sid, summary=result.whisper
                )
    if result.new:
        logger.info(f"call {call_sid}: transfer {result.status}; callback requested")
    return _xml(
        say_twiml(text("no_answer", result.language), language=result.language, hang_up=True)
    )


# --- recordings ---------------------------------------------------------------------------


@router.post("/twilio/recording")
async def recording_status(
    request: Request, form: CallFormDep, resources: ResourcesDep
) -> Response:
    """Twilio's recording status callback: SID, status, duration and URL on the call."""
    try:
        call_sid = _call_sid(form)
        recording_sid = form.get("RecordingSid", "")
        if not twilio_rest.is_recording_sid(recording_sid):
            raise BadWebhook(400, "RecordingSid missing or malformed")
        status = form.get("RecordingStatus", "")
        if status not in _RECORDING_STATUSES:
            raise BadWebhook(400, "RecordingStatus missing or unknown")
        duration = _optional_int(form, "RecordingDuration", low=0, high=10**7)
        channels = _optional_int(form, "RecordingChannels", low=1, high=2)
        url = form.get("RecordingUrl") or None
        if url is not None and (
            len(url) > MAX_RECORDING_URL_CHARS
            or not url.startswith(("https://", "http://"))
            or not tw.is_printable_text(url, max_chars=MAX_RECORDING_URL_CHARS)
        ):
            raise BadWebhook(400, "RecordingUrl malformed")
    except BadWebhook as bad:
        return bad.response()
    async with resources.db.connection() as conn:
        known = await crm_phone.record_recording_callback(
            conn,
            call_sid=call_sid,
            recording_sid=recording_sid,
            status=status,
            duration_secs=duration,
            url=url,
            channels=channels,
        )
    if not known:
        return PlainTextResponse("unknown call or recording", status_code=404)
    return PlainTextResponse("", status_code=204)


# --- answering machines -------------------------------------------------------------------


@router.post("/twilio/amd")
async def answering_machine(
    request: Request, form: CallFormDep, resources: ResourcesDep
) -> Response:
    """The async AMD verdict: after a machine's beep, leave the voicemail."""
    try:
        call_sid = _call_sid(form)
        answered_by = form.get("AnsweredBy", "")
        if answered_by not in crm_phone.ANSWERED_BY:
            raise BadWebhook(400, "AnsweredBy missing or unknown")
        _optional_int(form, "MachineDetectionDuration", low=0, high=10**7)
        scenario = request.query_params.get("scenario", "service_due")
        if scenario not in ("service_due", "confirmation"):
            raise BadWebhook(400, "unknown scenario")
        customer_id = tw.parse_id(_id_query(request, "customer_id"))
        _id_query(request, "attempt_id")
    except BadWebhook as bad:
        return bad.response()
    async with resources.db.connection() as conn:
        first = await crm_phone.record_answered_by(
            conn, call_sid=call_sid, scenario=scenario, answered_by=answered_by
        )
        person = (
            await crm_phone.customer_phone_profile(conn, customer_id)
            if first and answered_by in _MACHINE_ENDS and customer_id is not None
            else None
        )
    if not first:
        return PlainTextResponse("", status_code=204)  # Twilio retried
    logger.info(f"outbound call {call_sid}: answered by {answered_by}")
    if answered_by in _MACHINE_ENDS:
        await _leave_voicemail(request, resources, call_sid, person)
    elif answered_by == "fax":
        await tw.mark_handed_off(resources.redis, call_sid)
        try:
            await twilio_rest.hang_up_call(resources.settings, call_sid)
        except Exception as exc:
            logger.warning(f"call {call_sid}: fax not hung up: {type(exc).__name__}")
    return PlainTextResponse("", status_code=204)


async def _leave_voicemail(
    request: Request,
    resources: AppResources,
    call_sid: str,
    person: crm_phone.CustomerPhoneProfile | None,
) -> None:
    profile = resources.profile
    preferred = (person.preferred_language if person else "en").split("-")[0].lower()
    language = preferred if preferred in profile.phone.languages else "en"
    message = text(
        "voicemail", language, name=profile.name, number=spoken_digits(profile.phone_number)
    )
    session = getattr(request.app.state, "active_calls", {}).get(call_sid)
    if session is not None:
        session.outcome = "voicemail"
    await tw.mark_handed_off(resources.redis, call_sid)
    try:
        await twilio_rest.redirect_call(
            resources.settings, call_sid, say_twiml(message, language=language, hang_up=True)
        )
    except Exception as exc:  # e.g. the machine already hung up
        logger.warning(f"call {call_sid}: voicemail not left: {type(exc).__name__}")
    async with resources.db.connection() as conn:
        await crm_phone.end_voicemail_call(conn, call_sid=call_sid)
    try:
        await record_call_outcome(resources.db, call_sid=call_sid, outcome="voicemail")
    except Exception as exc:
        logger.error(f"call {call_sid}: campaign outcome not recorded: {type(exc).__name__}")


# --- ops ----------------------------------------------------------------------------------


def _checked_call_sid(call_sid: str) -> str:
    if not tw.is_call_sid(call_sid):
        raise HTTPException(status_code=404, detail="unknown call")
    return call_sid


@router.get("/calls/{call_sid}/recording")
async def call_recording(
    call_sid: str, request: Request, resources: ResourcesDep, _admin: AdminDep
) -> Response:
    """The call's recording (``?format=mp3`` or ``wav``), streamed from Twilio."""
    call_sid = _checked_call_sid(call_sid)
    media_format = request.query_params.get("format", "mp3")
    if media_format not in twilio_rest.MEDIA_TYPES:
        return PlainTextResponse("format must be mp3 or wav", status_code=400)
    async with resources.db.connection() as conn:
        recording = await crm_phone.recording_of_call(conn, call_sid)
    if recording is None:
        return JSONResponse({"error": "no recording for this call"}, status_code=404)
    if recording.recording_status != "completed":
        return JSONResponse(
            {"error": "recording not ready", "status": recording.recording_status},
            status_code=409,
        )
    try:
        media = await twilio_rest.open_recording_media(
            resources.settings, recording.recording_sid, media_format=media_format
        )
    except twilio_rest.RecordingMediaError as exc:
        logger.warning(f"call {call_sid}: Twilio did not serve the recording ({exc.status})")
        if exc.status == 404:
            return JSONResponse({"error": "recording deleted at Twilio"}, status_code=404)
        return JSONResponse({"error": "Twilio did not serve the recording"}, status_code=502)
    headers = {"Content-Disposition": f'attachment; filename="{call_sid}.{media_format}"'}
    if media.content_length and media.content_length.isdigit():
        headers["Content-Length"] = media.content_length
    return StreamingResponse(media.chunks(), media_type=media.content_type, headers=headers)


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


@router.get("/calls/{call_sid}/summary")
async def call_summary(
    call_sid: str, request: Request, resources: ResourcesDep, _admin: AdminDep
) -> Response:
    """The call's structured summary, outcome, transfer and recording facts."""
    call_sid = _checked_call_sid(call_sid)
    async with resources.db.connection() as conn:
        record = await crm_phone.call_record(conn, call_sid)
    if record is None:
        return JSONResponse({"error": "unknown call"}, status_code=404)
    return JSONResponse({key: _jsonable(value) for key, value in record.items()})

"""HTTP routes of text messages: the inbound-text webhook, delivery status, failed texts.

``POST /twilio/sms`` (the number's "A message comes in" webhook) and
``POST /twilio/sms/status`` (the status callback of every text we send) check
``X-Twilio-Signature`` against ``PUBLIC_BASE_URL`` + path (403 otherwise). Everything in
the form is untrusted: an unusable number, a huge or odd body is answered with an empty
TwiML document, never an error. ``GET /messages/failed`` (bearer ``ADMIN_TOKEN``) lists
failed and undelivered texts for ops.

:func:`sender_running` runs the web server's text sender for the app's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import psycopg
from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from loguru import logger
from psycopg_pool import PoolTimeout
from starlette.requests import HTTPConnection

from api.deps import AdminDep, ResourcesDep, TwilioTextFormDep
from core.pii import mask_phone
from core.resources import AppResources
from crm import messages as crm_messages
from messaging.replies import handle_inbound
from messaging.sender import Sender, record_delivery_status
from telephony import sms as tw_sms

_SID = re.compile(r"^[A-Za-z0-9]{2,64}$")
_STATUS = re.compile(r"^[a-z_-]{1,32}$")
router = APIRouter()
#: Form fields longer than this are cut before use (Twilio's own limit is 1600).
MAX_FIELD_CHARS = 4096


def _twiml() -> Response:
    return Response(content=tw_sms.empty_twiml(), media_type="application/xml")


def get_sender(conn: HTTPConnection) -> Sender | None:
    """The web server's text sender (``None`` while texting is off)."""
    return getattr(conn.app.state, "sms_sender", None)


SenderDep = Annotated[Sender | None, Depends(get_sender)]


@router.post("/twilio/sms")
async def inbound_sms(
    form: TwilioTextFormDep, resources: ResourcesDep, sender: SenderDep
) -> Response:
    """An inbound text: C confirms, R asks for a call back, STOP opts out, HELP helps."""
    try:
        result = await handle_inbound(
            resources.db,
            profile=resources.profile,
            message_sid=form.get("MessageSid", form.get("SmsSid", ""))[:MAX_FIELD_CHARS],
            from_number=form.get("From", "")[:MAX_FIELD_CHARS],
            body=form.get("Body", "")[:MAX_FIELD_CHARS],
            now=datetime.now(UTC),
        )
    except (psycopg.Error, PoolTimeout, OSError) as exc:
        logger.error(f"inbound text not handled: {type(exc).__name__}")
        return PlainTextResponse("temporarily unavailable", status_code=503)
    if result.action == "ignored":
        logger.info(f"inbound text from {mask_phone(form.get('From', '')[:32])} ignored")
    if sender is not None and result.reply_id is not None:
        sender.wake()
    return _twiml()


def _error_code(raw: str | None) -> int | None:
    text = (raw or "").strip()[:9]
    return int(text) if text.isdigit() else None


@router.post("/twilio/sms/status")
async def sms_status(
    form: TwilioTextFormDep, resources: ResourcesDep, sender: SenderDep
) -> Response:
    """A text's delivery status: delivered, undelivered or failed (with ``ErrorCode``)."""
    sid = form.get("MessageSid", form.get("SmsSid", ""))
    status = form.get("MessageStatus", form.get("SmsStatus", ""))
    if _SID.match(sid) and _STATUS.match(status):
        try:
            result = await record_delivery_status(
                resources.db,
                profile=resources.profile,
                sid=sid,
                status=status,
                error_code=_error_code(form.get("ErrorCode")),
            )
        except (psycopg.Error, PoolTimeout, OSError) as exc:
            logger.error(f"text status not recorded: {type(exc).__name__}")
            return PlainTextResponse("temporarily unavailable", status_code=503)
        if result is not None and sender is not None:
            sender.wake()
    return PlainTextResponse("", status_code=204)


@router.get("/messages/failed")
async def failed_messages(
    _admin: AdminDep, resources: ResourcesDep, limit: int = Query(default=100, ge=1, le=1000)
) -> JSONResponse:
    """Failed and undelivered texts, newest first, with their retry (ops; admin token)."""
    async with resources.db.connection() as conn:
        rows = await crm_messages.failed_texts(conn, limit=limit)
    return JSONResponse(
        {
            "messages": [
                {
                    "id": r.id,
                    "kind": r.kind,
                    "to": mask_phone(r.phone),
                    "customer_id": r.customer_id,
                    "appointment_id": r.appointment_id,
                    "status": r.status,
                    "error_code": r.error_code,
                    "error": r.error,
                    "twilio_sid": r.twilio_sid,
                    "retry_of": r.retry_of,
                    "retried_by": r.retried_by,
                    "retry_status": r.retry_status,
                    "created_at": r.created_at.isoformat(),
                    "updated_at": r.updated_at.isoformat(),
                }
                for r in rows
            ]
        }
    )


@contextlib.asynccontextmanager
async def sender_running(app: FastAPI, resources: AppResources) -> AsyncIterator[Sender | None]:
    """Run the web server's text sender while the app runs (when texting is configured).

    Yields:
        The sender, or ``None`` when texting is off or Twilio is not configured.
    """
    settings = resources.settings
    if not resources.profile.texting.enabled or not tw_sms.sms_configured(settings):
        if resources.profile.texting.enabled:
            logger.info("texts are not sent: Twilio credentials or sender are not set")
        yield None
        return
    sender = Sender(
        resources.db,
        settings=settings,
        profile=resources.profile,
        redis=resources.redis,
        conninfo=resources.database_url,
    )
    app.state.sms_sender = sender
    task = asyncio.create_task(sender.run(), name="sms-sender")
    try:
        yield sender
    finally:
        sender.stop()
        try:
            await asyncio.wait_for(task, timeout=20)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        app.state.sms_sender = None

"""Twilio Messaging glue: send one text through the REST API, classify Twilio's errors.

The twilio SDK blocks; :func:`send_sms` runs it in a worker thread. Texts go from
``TWILIO_MESSAGING_SERVICE_SID`` when it is set, else from ``TWILIO_PHONE_NUMBER``.
Rate limits, opt-outs and consent are the caller's business (``messaging/sender.py``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import requests
from twilio.base.exceptions import TwilioRestException

from core.settings import Settings
from telephony.twilio import public_url, twilio_account

#: Path of the message status callback on this server.
STATUS_CALLBACK_PATH = "/twilio/sms/status"

#: Delivery errors (status callback ``ErrorCode``) worth one more try, because the cause
#: usually passes: 30001 queue overflow (the sender was over its throughput), 30003
#: unreachable handset (phone off, no signal), 30005 unknown handset (also reported for
#: recently ported or briefly deregistered numbers), 30008 unknown carrier error.
TRANSIENT_DELIVERY_CODES = frozenset({30001, 30003, 30005, 30008})
#: REST errors worth one more try: 20429 too many requests, 21611 the sender's queue is
#: full. (Every 5xx answer is transient too.)
TRANSIENT_API_CODES = frozenset({20429, 21611})
#: The recipient texted STOP to this sender: Twilio refuses every text until START.
UNSUBSCRIBED_CODE = 21610
#: Delivery errors that never improve by retrying: 30004 blocked (e.g. opted out),
#: 30006 landline or unreachable carrier, 30007 filtered as spam, and 21610 above.
PERMANENT_DELIVERY_CODES = frozenset({30004, 30006, 30007, UNSUBSCRIBED_CODE})


def is_transient(code: int | None) -> bool:
    """Whether a failed text with Twilio error ``code`` is worth one retry."""
    return code is not None and (code in TRANSIENT_DELIVERY_CODES or code in TRANSIENT_API_CODES)


@dataclass(frozen=True)
class SentText:
    """Twilio accepted a text.

    Attributes:
        sid: The MessageSid (``SM...``).
        status: Twilio's status right after the request (``queued`` or ``accepted``).
    """

    sid: str
    status: str


class SmsSendError(Exception):
    """Twilio did not take the text.

    Attributes:
        code: Twilio's error code, when it gave one.
        http_status: HTTP status of the answer, ``None`` when there was no answer.
        transient: Whether one retry may succeed (and the text was surely not sent).
    """

    def __init__(
        self, message: str, *, code: int | None, http_status: int | None, transient: bool
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.transient = transient


def sms_configured(settings: Settings) -> bool:
    """Whether the settings allow sending texts (credentials and a sender)."""
    return bool(
        settings.twilio_account_sid
        and settings.twilio_auth_token
        and (settings.twilio_phone_number or settings.twilio_messaging_service_sid)
    )


def sender_identity(settings: Settings) -> str:
    """What the texts go out from: the Messaging Service SID or the phone number."""
    return settings.twilio_messaging_service_sid or settings.twilio_phone_number or "unset"


def status_callback_url(settings: Settings) -> str | None:
    """The URL Twilio posts delivery status to, when ``PUBLIC_BASE_URL`` is set."""
    return public_url(settings, STATUS_CALLBACK_PATH) if settings.public_base_url else None


async def send_sms(settings: Settings, *, to: str, body: str) -> SentText:
    """Create one outbound text (``POST /2010-04-01/Accounts/{AC}/Messages.json``).

    Args:
        settings: Credentials, sender, public URL (for the status callback).
        to: Recipient, E.164.
        body: Message text.

    Returns:
        The MessageSid and Twilio's first status.

    Raises:
        SmsSendError: Twilio refused the request or could not be reached.
    """
    account = twilio_account(settings)
    kwargs: dict[str, str] = {"to": to, "body": body}
    if settings.twilio_messaging_service_sid:
        kwargs["messaging_service_sid"] = settings.twilio_messaging_service_sid
    else:
        settings.require("TWILIO_PHONE_NUMBER")
        kwargs["from_"] = settings.twilio_phone_number or ""
    callback = status_callback_url(settings)
    if callback:
        kwargs["status_callback"] = callback
    try:
        message = await asyncio.to_thread(lambda: account.messages.create(**kwargs))
    except TwilioRestException as exc:
        code = int(exc.code) if isinstance(exc.code, int) else None
        raise SmsSendError(
            f"twilio refused the text: HTTP {exc.status} code {code}",
            code=code,
            http_status=exc.status,
            transient=exc.status >= 500 or exc.status == 429 or code in TRANSIENT_API_CODES,
        ) from None
    except requests.exceptions.ConnectionError as exc:
        # Nothing reached Twilio (refused, DNS, connect timeout): safe to try again.
        raise SmsSendError(
            f"twilio unreachable: {type(exc).__name__}", code=None, http_status=None, transient=True
        ) from None
    except requests.exceptions.RequestException as exc:
        # E.g. a read timeout: Twilio may have taken the text. Never sent twice.
        raise SmsSendError(
            f"no answer from twilio: {type(exc).__name__}",
            code=None,
            http_status=None,
            transient=False,
        ) from None
    return SentText(sid=str(message.sid), status=str(message.status or "queued"))


def empty_twiml() -> str:
    """A TwiML answer to an inbound text that sends nothing (replies go via the sender)."""
    return '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

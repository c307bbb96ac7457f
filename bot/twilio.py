"""Twilio glue: webhook signatures, per-call stream tokens, TwiML, REST call control.

The twilio SDK is blocking; every REST call here runs in a worker thread
(:func:`asyncio.to_thread`). ``TWILIO_API_BASE_URL`` points the SDK (and Pipecat's
serializer hang-up) at another Twilio-compatible host, e.g. a local fake in tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from xml.sax.saxutils import escape, quoteattr

from loguru import logger
from pipecat.serializers.twilio import TwilioFrameSerializer
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from app.settings import Settings

STREAM_TOKEN_TTL_SECS = 120


def twilio_client(settings: Settings) -> Client:
    """A twilio REST client for the configured account (and base URL override).

    Args:
        settings: Settings with ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN``.

    Returns:
        The client. Its methods block: call them through ``asyncio.to_thread``.
    """
    settings.require("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
    assert settings.twilio_auth_token is not None
    # No pooled session: REST calls are rare, and a pooled session per client would keep a
    # connection open after every transfer or hang-up.
    client = Client(
        settings.twilio_account_sid,
        settings.twilio_auth_token.get_secret_value(),
        http_client=TwilioHttpClient(pool_connections=False, timeout=15),
    )
    if settings.twilio_api_base_url:
        client.api.base_url = settings.twilio_api_base_url.rstrip("/")
    return client


def public_url(settings: Settings, path: str) -> str:
    """The URL Twilio uses to reach ``path`` on this server (``PUBLIC_BASE_URL`` + path)."""
    settings.require("PUBLIC_BASE_URL")
    assert settings.public_base_url is not None
    return settings.public_base_url.rstrip("/") + path


def media_stream_url(settings: Settings) -> str:
    """The ``wss://`` URL of the media-stream websocket."""
    base = public_url(settings, "/twilio/media")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://")
    if base.startswith("http://"):
        return "ws://" + base.removeprefix("http://")
    return base


def signature_is_valid(
    settings: Settings, *, url: str, params: dict[str, str], signature: str | None
) -> bool:
    """Check ``X-Twilio-Signature`` of a webhook request.

    Args:
        settings: Settings (auth token).
        url: Full public URL Twilio requested, query string included.
        params: POSTed form fields.
        signature: Header value.

    Returns:
        Whether the signature is valid.
    """
    if not signature or settings.twilio_auth_token is None:
        return False
    validator = RequestValidator(settings.twilio_auth_token.get_secret_value())
    return bool(validator.validate(url, params, signature))


def _token_key(settings: Settings) -> bytes:
    assert settings.twilio_auth_token is not None
    return hashlib.sha256(
        b"stream-token:" + settings.twilio_auth_token.get_secret_value().encode()
    ).digest()


def make_stream_token(
    settings: Settings, call_sid: str, *, ttl: int = STREAM_TOKEN_TTL_SECS, now: float | None = None
) -> str:
    """A short-lived token binding a media stream to its CallSid (HMAC-SHA256).

    Args:
        settings: Settings (the key derives from the auth token).
        call_sid: The CallSid the stream belongs to.
        ttl: Seconds until the token expires.
        now: Current UNIX time (tests).

    Returns:
        ``<expiry>.<hex mac>``.
    """
    expiry = int((now if now is not None else time.time()) + ttl)
    mac = hmac.new(_token_key(settings), f"{call_sid}:{expiry}".encode(), hashlib.sha256)
    return f"{expiry}.{mac.hexdigest()}"


def stream_token_is_valid(
    settings: Settings, call_sid: str, token: str | None, *, now: float | None = None
) -> bool:
    """Whether ``token`` was made for ``call_sid`` and has not expired."""
    if not token or "." not in token or settings.twilio_auth_token is None:
        return False
    expiry_text, _, mac_hex = token.partition(".")
    if not expiry_text.isdigit() or int(expiry_text) < (now if now is not None else time.time()):
        return False
    expected = hmac.new(
        _token_key(settings), f"{call_sid}:{expiry_text}".encode(), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(expected, mac_hex)


def connect_stream_twiml(stream_url: str, parameters: dict[str, str]) -> str:
    """TwiML that connects the call to our media-stream websocket.

    Args:
        stream_url: ``wss://`` URL of ``/twilio/media``.
        parameters: ``<Parameter>`` name/value pairs for the stream's ``start`` message.

    Returns:
        The TwiML document.
    """
    params = "".join(
        f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>" for k, v in parameters.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f"<Stream url={quoteattr(stream_url)}>{params}</Stream>"
        "</Connect></Response>"
    )


def dial_twiml(number: str) -> str:
    """TwiML that dials ``number`` (the advisor line)."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{escape(number)}</Dial></Response>'
    )


def voicemail_twiml(message: str) -> str:
    """TwiML that leaves a short voicemail and hangs up."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response>'
        f"<Say>{escape(message)}</Say><Hangup/></Response>"
    )


class DealershipTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, whose automatic hang-up can be switched off.

    After a transfer the call leg belongs to the advisor: the pipeline ending must not
    hang it up.
    """

    def suppress_hang_up(self) -> None:
        """Do not hang the call up when the pipeline ends."""
        self._hangup_attempted = True


class TwilioCallControl:
    """REST control of one live call.

    Args:
        settings: Settings (credentials, base URL).
        call_sid: The live call.
        serializer: The call's serializer, so a transfer can switch off its hang-up.
    """

    def __init__(
        self,
        settings: Settings,
        call_sid: str,
        serializer: DealershipTwilioSerializer | None = None,
    ) -> None:
        self._settings = settings
        self._call_sid = call_sid
        self._serializer = serializer

    async def transfer(self, number: str) -> None:
        """Redirect the call to ``<Dial>`` the advisor; the media stream then ends."""
        await self.redirect(dial_twiml(number))
        logger.info(f"call {self._call_sid} redirected to the advisor line")

    async def redirect(self, twiml: str) -> None:
        """Replace the live call's TwiML (the media stream then ends; no hang-up after)."""
        if self._serializer is not None:
            self._serializer.suppress_hang_up()
        client = twilio_client(self._settings)
        await asyncio.to_thread(
            lambda: (
                client.api.v2010.accounts(self._settings.twilio_account_sid)
                .calls(self._call_sid)
                .update(twiml=twiml)
            )
        )


async def place_outbound_call(
    settings: Settings,
    *,
    to: str,
    scenario: str,
    customer_id: int | None,
    campaign_attempt_id: int | None = None,
) -> str:
    """Create an outbound call that streams to this server once answered.

    Twilio fetches ``/twilio/outbound`` (signed) when the call is answered; answering-
    machine detection decides between the bot and a short voicemail there.

    Args:
        settings: Settings (credentials, numbers, public URL).
        to: Number to call (E.164).
        scenario: ``service_due`` or ``confirmation``.
        customer_id: CRM customer the call is about.
        campaign_attempt_id: Campaign attempt row, when placed by a campaign.

    Returns:
        The new CallSid.
    """
    settings.require("TWILIO_PHONE_NUMBER", "PUBLIC_BASE_URL")
    client = twilio_client(settings)
    query = f"scenario={scenario}"
    if customer_id is not None:
        query += f"&customer_id={customer_id}"
    if campaign_attempt_id is not None:
        query += f"&attempt_id={campaign_attempt_id}"
    url = public_url(settings, f"/twilio/outbound?{query}")
    status_url = public_url(settings, "/twilio/status")
    call = await asyncio.to_thread(
        lambda: client.api.v2010.accounts(settings.twilio_account_sid).calls.create(
            to=to,
            from_=settings.twilio_phone_number,
            url=url,
            method="POST",
            status_callback=status_url,
            status_callback_event=["initiated", "ringing", "answered", "completed"],
            machine_detection="Enable",
        )
    )
    return str(call.sid)

"""Twilio glue: webhook signatures, per-call stream tokens, TwiML, REST call control.

The twilio SDK is blocking; every REST call here runs in a worker thread
(:func:`asyncio.to_thread`). ``TWILIO_API_BASE_URL`` points the SDK (and Pipecat's
serializer hang-up) at another Twilio-compatible host, e.g. a local fake in tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

import redis.asyncio as aioredis
from loguru import logger
from pipecat.frames.frames import Frame, InputAudioRawFrame
from pipecat.serializers.twilio import TwilioFrameSerializer
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.rest.api.v2010.account import AccountContext

from core.settings import Settings

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


def twilio_account(settings: Settings) -> AccountContext:
    """The configured account's REST resources (``/2010-04-01/Accounts/{AC}``).

    Building it sends no request.

    Args:
        settings: Settings with ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN``.

    Returns:
        The account. Its methods block: call them through ``asyncio.to_thread``.
    """
    client = twilio_client(settings)
    assert settings.twilio_account_sid is not None  # twilio_client required it
    return client.api.v2010.accounts(settings.twilio_account_sid)


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


#: ``customParameters`` the media-stream route trusts. Every one of them is signed into
#: the stream token together with the CallSid and the expiry; a changed value voids it.
SIGNED_STREAM_PARAMETERS = ("caller", "direction", "scenario", "customer_id", "attempt_id")
STREAM_DIRECTIONS = ("inbound", "outbound")
STREAM_SCENARIOS = ("inbound", "service_due", "confirmation")
#: Longest value accepted for a signed parameter (a number or SIP address, a scenario
#: name, an id).
MAX_STREAM_PARAMETER_CHARS = 128
#: Longest database id accepted in ``customer_id`` / ``attempt_id`` (fits a bigint).
MAX_ID_DIGITS = 18
_TOKEN_VERSION = "v2"
_TOKEN_RE = re.compile(r"v2\.([0-9]{1,12})\.([0-9a-f]{32})\.([0-9a-f]{64})")
_CALL_SID_RE = re.compile(r"CA[0-9a-fA-F]{32}")
_STREAM_SID_RE = re.compile(r"MZ[0-9a-fA-F]{32}")
_ID_RE = re.compile(rf"[0-9]{{1,{MAX_ID_DIGITS}}}")


def is_call_sid(value: object) -> bool:
    """Whether ``value`` is a well-formed Twilio CallSid (``CA`` + 32 hex digits)."""
    return isinstance(value, str) and _CALL_SID_RE.fullmatch(value) is not None


def is_stream_sid(value: object) -> bool:
    """Whether ``value`` is a well-formed Twilio StreamSid (``MZ`` + 32 hex digits)."""
    return isinstance(value, str) and _STREAM_SID_RE.fullmatch(value) is not None


def parse_id(value: object) -> int | None:
    """A positive database id from its decimal text (at most 18 digits), else ``None``."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        return None
    return int(value) or None


def is_printable_text(value: str, *, max_chars: int) -> bool:
    """Whether ``value`` is at most ``max_chars`` long, without control characters."""
    return len(value) <= max_chars and all(ch.isprintable() for ch in value)


@dataclass(frozen=True)
class StreamClaims:
    """What a stream token vouches for: the call and every parameter the server trusts.

    Attributes:
        call_sid: The CallSid the stream belongs to.
        caller: The customer's number as the carrier reported it (``From`` inbound, ``To``
            outbound); may be empty.
        direction: ``inbound`` or ``outbound``.
        scenario: ``inbound``, ``service_due`` or ``confirmation``.
        customer_id: CRM customer id (decimal text) of an outbound call, or ``""``.
        attempt_id: Campaign attempt id (decimal text), or ``""``.
    """

    call_sid: str
    caller: str = ""
    direction: str = "inbound"
    scenario: str = "inbound"
    customer_id: str = ""
    attempt_id: str = ""

    def parameters(self) -> dict[str, str]:
        """The signed ``<Parameter>`` name/value pairs (without the token)."""
        return {name: getattr(self, name) for name in SIGNED_STREAM_PARAMETERS}

    def is_well_formed(self) -> bool:
        """Whether every field has a shape the server can act on."""
        return (
            is_call_sid(self.call_sid)
            and all(isinstance(getattr(self, n), str) for n in SIGNED_STREAM_PARAMETERS)
            and is_printable_text(self.caller, max_chars=MAX_STREAM_PARAMETER_CHARS)
            and self.direction in STREAM_DIRECTIONS
            and self.scenario in STREAM_SCENARIOS
            and (self.customer_id == "" or parse_id(self.customer_id) is not None)
            and (self.attempt_id == "" or parse_id(self.attempt_id) is not None)
        )


@dataclass(frozen=True)
class VerifiedStreamToken:
    """A stream token whose signature and expiry checked out.

    Attributes:
        claims: The call and the parameters it vouches for.
        expiry: UNIX time the token expires.
        digest: SHA-256 (hex) of the token text; the key of its single use.
    """

    claims: StreamClaims
    expiry: int
    digest: str


def _token_key(settings: Settings) -> bytes:
    assert settings.twilio_auth_token is not None
    return hashlib.sha256(
        b"stream-token:v2:" + settings.twilio_auth_token.get_secret_value().encode()
    ).digest()


def _canonical(fields: list[str]) -> bytes:
    """Netstring encoding (``<byte length>:<bytes>,`` per field): no two field lists
    share an encoding, whatever the fields contain."""
    out = bytearray()
    for field_text in fields:
        data = field_text.encode("utf-8", "surrogatepass")
        out += b"%d:%s," % (len(data), data)
    return bytes(out)


def _token_mac(settings: Settings, claims: StreamClaims, *, expiry: str, nonce: str) -> str:
    fields = [_TOKEN_VERSION, claims.call_sid, expiry, nonce]
    fields += [getattr(claims, name) for name in SIGNED_STREAM_PARAMETERS]
    return hmac.new(_token_key(settings), _canonical(fields), hashlib.sha256).hexdigest()


def make_stream_token(
    settings: Settings,
    claims: StreamClaims,
    *,
    ttl: int = STREAM_TOKEN_TTL_SECS,
    now: float | None = None,
) -> str:
    """A short-lived, single-use token binding a media stream to its call and parameters.

    The HMAC-SHA256 (key derived from the auth token) covers the CallSid, the expiry, a
    random nonce and every parameter in :data:`SIGNED_STREAM_PARAMETERS`, in a canonical
    encoding.

    Args:
        settings: Settings (the key derives from the auth token).
        claims: The call and the parameters the stream will carry.
        ttl: Seconds until the token expires.
        now: Current UNIX time (tests).

    Returns:
        ``v2.<expiry>.<nonce hex>.<mac hex>``.
    """
    expiry = str(int((now if now is not None else time.time()) + ttl))
    nonce = secrets.token_hex(16)
    mac = _token_mac(settings, claims, expiry=expiry, nonce=nonce)
    return f"{_TOKEN_VERSION}.{expiry}.{nonce}.{mac}"


def stream_parameters(
    settings: Settings, claims: StreamClaims, *, ttl: int = STREAM_TOKEN_TTL_SECS
) -> dict[str, str]:
    """The ``<Parameter>`` pairs of a media stream: the signed parameters and the token."""
    return {**claims.parameters(), "token": make_stream_token(settings, claims, ttl=ttl)}


def verify_stream_token(
    settings: Settings, *, call_sid: str, parameters: object, now: float | None = None
) -> VerifiedStreamToken | None:
    """Check the token in a stream's ``customParameters`` against the call and parameters.

    Any shape is accepted as input (it comes from the network); anything but a token made
    by :func:`make_stream_token` for exactly this CallSid and these parameter values, and
    not yet expired, gives ``None``. A signed parameter that is absent counts as ``""``.

    Args:
        settings: Settings (auth token).
        call_sid: The stream's CallSid.
        parameters: The ``start.customParameters`` object.
        now: Current UNIX time (tests).

    Returns:
        The verified token, or ``None``.
    """
    if settings.twilio_auth_token is None or not isinstance(parameters, dict):
        return None
    token = parameters.get("token")
    if not isinstance(token, str) or (match := _TOKEN_RE.fullmatch(token)) is None:
        return None
    expiry_text, nonce, mac = match.groups()
    if int(expiry_text) < (now if now is not None else time.time()):
        return None
    values = {name: parameters.get(name, "") for name in SIGNED_STREAM_PARAMETERS}
    if not all(isinstance(v, str) for v in values.values()):
        return None
    claims = StreamClaims(call_sid=call_sid, **values)
    if not claims.is_well_formed():
        return None
    expected = _token_mac(settings, claims, expiry=expiry_text, nonce=nonce)
    if not hmac.compare_digest(expected, mac):
        return None
    return VerifiedStreamToken(
        claims=claims,
        expiry=int(expiry_text),
        digest=hashlib.sha256(token.encode()).hexdigest(),
    )


STREAM_TOKEN_USED_KEY = "voice_agent:stream_token_used:{digest}"
LIVE_CALL_KEY = "voice_agent:stream_live:{call_sid}"
ENDED_CALL_KEY = "voice_agent:stream_ended:{call_sid}"
#: Seconds a live-call marker outlives a process that died without removing it; a running
#: call refreshes it every third of that.
LIVE_MARKER_TTL_SECS = 60

_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_COMPARE_AND_EXPIRE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end
return 0
"""


async def consume_stream_token(
    redis: aioredis.Redis, token: VerifiedStreamToken, *, now: float | None = None
) -> bool:
    """Use a verified token up: ``True`` the first time, ``False`` on every replay.

    The key (a hash of the token, never the token) lives as long as the token would, so
    every process of the deployment sees the use.

    Args:
        redis: The process's Redis client.
        token: A token :func:`verify_stream_token` accepted.
        now: Current UNIX time (tests).

    Returns:
        Whether this was the token's first use.
    """
    remaining = token.expiry - (now if now is not None else time.time())
    ttl = max(1, math.ceil(remaining) + 1)
    key = STREAM_TOKEN_USED_KEY.format(digest=token.digest)
    return bool(await redis.set(key, "1", nx=True, ex=ttl))


class LiveCallMarker:
    """A Redis marker saying that a call's media stream is running (one per CallSid).

    Set with ``NX`` when the pipeline starts, so a second stream for the same call is
    refused in any process; refreshed while the call runs; replaced by a short-lived
    "ended" marker when the call ends, so no stream for the call starts afterwards. The
    TTL removes the marker of a process that died mid-call.

    Args:
        redis: The process's Redis client.
        call_sid: The call.
        ttl: Seconds the marker outlives its last refresh.
    """

    def __init__(
        self, redis: aioredis.Redis, call_sid: str, *, ttl: int = LIVE_MARKER_TTL_SECS
    ) -> None:
        self._redis = redis
        self._ttl = ttl
        self._owner = secrets.token_hex(16)
        self.live_key = LIVE_CALL_KEY.format(call_sid=call_sid)
        self.ended_key = ENDED_CALL_KEY.format(call_sid=call_sid)

    async def acquire(self) -> bool:
        """Mark the call live; ``False`` when it is already live or has ended."""
        if not await self._redis.set(self.live_key, self._owner, nx=True, ex=self._ttl):
            return False
        # The ended marker is written before a live marker is removed, so a call that
        # ended just before our SET is seen here.
        if await self._redis.exists(self.ended_key):
            await self._redis.eval(_COMPARE_AND_DELETE, 1, self.live_key, self._owner)
            return False
        return True

    async def refresh(self) -> bool:
        """Extend the marker's TTL; ``False`` when it is no longer this stream's."""
        return bool(
            await self._redis.eval(
                _COMPARE_AND_EXPIRE, 1, self.live_key, self._owner, str(self._ttl)
            )
        )

    async def keep_alive(self) -> None:
        """Refresh the marker every third of its TTL until cancelled."""
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                if not await self.refresh():
                    logger.warning(f"{self.live_key}: live-call marker lost (expired)")
            except Exception as exc:
                logger.warning(
                    f"{self.live_key}: live-call marker not refreshed: {type(exc).__name__}"
                )

    async def release(self) -> None:
        """The call ended: leave an "ended" marker, then remove the live marker."""
        await self._redis.set(self.ended_key, "1", ex=STREAM_TOKEN_TTL_SECS)
        await self._redis.eval(_COMPARE_AND_DELETE, 1, self.live_key, self._owner)


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


#: Set when a live call was handed to other TwiML (an advisor, a voicemail drop): the
#: media stream ending must then not hang the call up, whichever process runs it.
HANDED_OFF_KEY = "voice_agent:call_handed_off:{call_sid}"
HANDED_OFF_TTL_SECS = 6 * 3600


async def mark_handed_off(redis: aioredis.Redis, call_sid: str) -> None:
    """Record that the call now runs other TwiML (before redirecting it)."""
    await redis.set(HANDED_OFF_KEY.format(call_sid=call_sid), "1", ex=HANDED_OFF_TTL_SECS)


async def clear_handed_off(redis: aioredis.Redis, call_sid: str) -> None:
    """The hand-off did not happen (the redirect failed): hang-ups apply again."""
    await redis.delete(HANDED_OFF_KEY.format(call_sid=call_sid))


async def is_handed_off(redis: aioredis.Redis, call_sid: str) -> bool:
    """Whether the call was handed to other TwiML (see :func:`mark_handed_off`)."""
    return bool(await redis.exists(HANDED_OFF_KEY.format(call_sid=call_sid)))


#: Twilio media messages (20 ms each) joined into one input audio frame.
INPUT_FRAMES_PER_CHUNK = 2


class DealershipTwilioSerializer(TwilioFrameSerializer):
    """Pipecat's Twilio serializer, whose automatic hang-up can be switched off, and which
    hands the pipeline the caller's audio in 40 ms frames.

    After a transfer the call leg belongs to the advisor, and after a voicemail redirect to
    the message: the pipeline ending must not hang it up. With ``redis`` the hang-up is
    also skipped when any process marked the call handed off (:func:`mark_handed_off`).

    Twilio sends the caller's audio as 50 messages a second. Every audio frame travels
    through the input transport, the STT (one websocket message to Deepgram), the keypad
    processor and the user aggregator, with an event per observer at each hop; one frame
    per ``frames_per_chunk`` messages divides that work, at the price of up to 20 ms more
    before the VAD hears the caller stop (it waits 200 ms of silence anyway). DTMF is
    never held back; the last 20 ms of a stream that ends mid-frame are dropped.

    Args:
        *args: Passed to :class:`TwilioFrameSerializer`.
        redis: The process's Redis client (optional).
        frames_per_chunk: Media messages per input audio frame (1: as Pipecat does).
        **kwargs: Passed to :class:`TwilioFrameSerializer`.
    """

    _odd_messages = 0

    def __init__(
        self,
        *args,
        redis: aioredis.Redis | None = None,
        frames_per_chunk: int = INPUT_FRAMES_PER_CHUNK,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._redis = redis
        self._frames_per_chunk = max(1, frames_per_chunk)
        self._pending_audio: list[bytes] = []

    def suppress_hang_up(self) -> None:
        """Do not hang the call up when the pipeline ends."""
        self._hangup_attempted = True

    async def _hang_up_call(self) -> None:
        if self._redis is not None and self._call_sid:
            try:
                if await is_handed_off(self._redis, self._call_sid):
                    logger.info(f"call {self._call_sid} was handed off; not hanging up")
                    return
            except Exception as exc:  # hang up as before: the stream is over anyway
                logger.warning(
                    f"call {self._call_sid}: hand-off marker unreadable: {type(exc).__name__}"
                )
        await super()._hang_up_call()

    async def deserialize(self, data: str | bytes) -> Frame | None:
        """Pipecat's deserialization, with messages of any other shape dropped.

        Pipecat's serializer raises on some shapes (``[1]``, ``"media": null``, a payload
        that is not base64), which ends the call, and logs non-JSON messages as they are.
        A message that is not one Twilio sends is dropped here with a warning that does
        not quote it (the first one, then every hundredth).
        """
        try:
            message = json.loads(data)
        except (ValueError, TypeError, RecursionError):
            message = None
        if not isinstance(message, dict):
            return self._dropped("not a Twilio message")
        event = message.get("event")
        body = message.get(event) if isinstance(event, str) and event in ("media", "dtmf") else {}
        if not isinstance(body, dict):
            return self._dropped("not a Twilio message")
        try:
            frame = await super().deserialize(data)
        except Exception as exc:
            return self._dropped(type(exc).__name__)
        if isinstance(frame, InputAudioRawFrame) and self._frames_per_chunk > 1:
            self._pending_audio.append(frame.audio)
            if len(self._pending_audio) < self._frames_per_chunk:
                return None
            audio = b"".join(self._pending_audio)
            self._pending_audio.clear()
            return InputAudioRawFrame(audio=audio, num_channels=1, sample_rate=frame.sample_rate)
        return frame

    def _dropped(self, why: str) -> None:
        self._odd_messages += 1
        if self._odd_messages % 100 == 1:
            logger.warning(
                f"call {self._call_sid}: dropped {self._odd_messages} odd media-stream "
                f"message(s) ({why})"
            )
        return None


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

    @property
    def call_sid(self) -> str:
        """The live call."""
        return self._call_sid

    @property
    def settings(self) -> Settings:
        """Settings (credentials, base URL, public URL)."""
        return self._settings

    async def redirect(self, twiml: str) -> None:
        """Hand the call to other TwiML; the media stream then ends without a hang-up."""
        if self._serializer is not None:
            self._serializer.suppress_hang_up()
        account = twilio_account(self._settings)
        await asyncio.to_thread(lambda: account.calls(self._call_sid).update(twiml=twiml))

    async def transfer(self, number: str) -> None:
        """Redirect the call to ``<Dial>`` the advisor; the media stream then ends."""
        await self.redirect(dial_twiml(number))
        logger.info(f"call {self._call_sid} redirected to the advisor line")


async def place_outbound_call(
    settings: Settings,
    *,
    to: str,
    scenario: str,
    customer_id: int | None,
    campaign_attempt_id: int | None = None,
) -> str:
    """Create an outbound call that streams to this server once answered.

    Twilio fetches ``/twilio/outbound`` (signed) as soon as the call is answered and the
    bot starts. Answering-machine detection runs asynchronously meanwhile
    (``AsyncAmd=true``, ``MachineDetection=DetectMessageEnd``): Twilio posts its verdict to
    ``/twilio/amd`` once a machine's greeting has ended (the beep), and the server then
    drops the voicemail (:mod:`api.phone`).

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
    assert settings.twilio_phone_number is not None
    from_number = settings.twilio_phone_number
    account = twilio_account(settings)
    query = f"scenario={scenario}"
    if customer_id is not None:
        query += f"&customer_id={customer_id}"
    if campaign_attempt_id is not None:
        query += f"&attempt_id={campaign_attempt_id}"
    url = public_url(settings, f"/twilio/outbound?{query}")
    status_url = public_url(settings, "/twilio/status")
    amd_url = public_url(settings, f"/twilio/amd?{query}")
    call = await asyncio.to_thread(
        lambda: account.calls.create(
            to=to,
            from_=from_number,
            url=url,
            method="POST",
            status_callback=status_url,
            status_callback_event=["initiated", "ringing", "answered", "completed"],
            machine_detection="DetectMessageEnd",
            async_amd="true",
            async_amd_status_callback=amd_url,
            async_amd_status_callback_method="POST",
        )
    )
    return str(call.sid)

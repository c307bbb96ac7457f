"""Twilio REST calls of the phone features: redirects, recordings, recording media.

Call and recording changes go through the twilio library (blocking, so in a worker
thread), exactly as :mod:`telephony.twilio` does; recording media is streamed with httpx
(the library reads responses as text). ``TWILIO_API_BASE_URL`` points both at another
Twilio-compatible host (the local fake in tests).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from core.settings import Settings
from telephony.twilio import twilio_account

TWILIO_API_URL = "https://api.twilio.com"
_RECORDING_SID_RE = re.compile(r"RE[0-9a-fA-F]{32}")
#: Recording media formats Twilio serves, and their content types.
MEDIA_TYPES = {"mp3": "audio/mpeg", "wav": "audio/x-wav"}


def is_recording_sid(value: object) -> bool:
    """Whether ``value`` is a well-formed Recording SID (``RE`` + 32 hex digits)."""
    return isinstance(value, str) and _RECORDING_SID_RE.fullmatch(value) is not None


async def redirect_call(settings: Settings, call_sid: str, twiml: str) -> None:
    """Replace what a live call executes with ``twiml`` (its media stream then ends).

    Args:
        settings: Settings (credentials, base URL).
        call_sid: The live call.
        twiml: The new TwiML document.
    """
    account = twilio_account(settings)
    await asyncio.to_thread(lambda: account.calls(call_sid).update(twiml=twiml))


async def hang_up_call(settings: Settings, call_sid: str) -> None:
    """End a live call (``Status=completed``)."""
    account = twilio_account(settings)
    await asyncio.to_thread(lambda: account.calls(call_sid).update(status="completed"))


@dataclass(frozen=True)
class StartedRecording:
    """A recording Twilio started.

    Attributes:
        sid: Recording SID (``RE...``).
        status: Its status (``in-progress``).
        channels: Channels of the final file (2 for dual).
    """

    sid: str
    status: str
    channels: int | None


async def start_recording(
    settings: Settings, call_sid: str, *, status_callback: str
) -> StartedRecording:
    """Start a dual-channel recording of a live call.

    ``POST /2010-04-01/Accounts/{AC}/Calls/{CA}/Recordings.json`` with
    ``RecordingChannels=dual`` and a status callback for ``in-progress``, ``completed``
    and ``absent``.

    Args:
        settings: Settings (credentials, base URL).
        call_sid: The live call.
        status_callback: Our signed recording-status route.

    Returns:
        The started recording.
    """
    account = twilio_account(settings)
    recording = await asyncio.to_thread(
        lambda: account.calls(call_sid).recordings.create(
            recording_channels="dual",
            recording_status_callback=status_callback,
            recording_status_callback_method="POST",
            recording_status_callback_event=["in-progress", "completed", "absent"],
        )
    )
    return StartedRecording(
        sid=str(recording.sid), status=str(recording.status), channels=recording.channels
    )


async def update_recording(
    settings: Settings, call_sid: str, recording_sid: str, *, status: str
) -> None:
    """Pause (``paused``), resume (``in-progress``) or stop (``stopped``) a recording.

    ``POST /2010-04-01/Accounts/{AC}/Calls/{CA}/Recordings/{RE}.json`` with ``Status``
    (a pause leaves silence in the file, Twilio's default ``PauseBehavior``).
    """
    account = twilio_account(settings)
    # twilio annotates ``status`` as RecordingInstance.Status, a namespace class of str
    # constants rather than an Enum: no value, not even Status.PAUSED, has that type.
    recording = account.calls(call_sid).recordings(recording_sid)
    await asyncio.to_thread(
        lambda: recording.update(status=status)  # pyright: ignore[reportArgumentType]
    )


class RecordingMediaError(Exception):
    """Twilio did not serve the recording's media.

    Args:
        status: Twilio's HTTP status (0 when Twilio was unreachable).
    """

    def __init__(self, status: int) -> None:
        super().__init__(f"Twilio answered {status}")
        self.status = status


@dataclass
class RecordingMedia:
    """An open download of a recording's media; iterate :meth:`chunks`, then it closes."""

    content_type: str
    content_length: str | None
    _response: httpx.Response
    _client: httpx.AsyncClient

    async def chunks(self) -> AsyncIterator[bytes]:
        """The media bytes, as Twilio sends them; closes the download at the end."""
        try:
            async for chunk in self._response.aiter_bytes():
                yield chunk
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the download."""
        await self._response.aclose()
        await self._client.aclose()


async def open_recording_media(
    settings: Settings, recording_sid: str, *, media_format: str = "mp3"
) -> RecordingMedia:
    """Start downloading a recording's media with the account's credentials.

    ``GET /2010-04-01/Accounts/{AC}/Recordings/{RE}.{mp3|wav}?RequestedChannels=2`` (both
    channels of a dual recording).

    Args:
        settings: Settings (credentials, base URL).
        recording_sid: The recording.
        media_format: ``mp3`` or ``wav``.

    Returns:
        The open download.

    Raises:
        RecordingMediaError: Twilio answered anything but 200, or was unreachable.
    """
    settings.require("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN")
    assert settings.twilio_auth_token is not None and settings.twilio_account_sid is not None
    if not is_recording_sid(recording_sid) or media_format not in MEDIA_TYPES:
        raise ValueError("bad recording sid or format")
    base = (settings.twilio_api_base_url or TWILIO_API_URL).rstrip("/")
    url = (
        f"{base}/2010-04-01/Accounts/{settings.twilio_account_sid}/Recordings/"
        f"{recording_sid}.{media_format}"
    )
    client = httpx.AsyncClient(
        auth=(settings.twilio_account_sid, settings.twilio_auth_token.get_secret_value()),
        timeout=httpx.Timeout(15.0, read=60.0),
        follow_redirects=True,  # Twilio redirects media downloads to its storage
    )
    try:
        request = client.build_request("GET", url, params={"RequestedChannels": "2"})
        response = await client.send(request, stream=True)
    except httpx.HTTPError:
        await client.aclose()
        raise RecordingMediaError(0) from None
    if response.status_code != 200:
        await response.aclose()
        await client.aclose()
        raise RecordingMediaError(response.status_code)
    return RecordingMedia(
        content_type=MEDIA_TYPES[media_format],
        content_length=response.headers.get("content-length"),
        _response=response,
        _client=client,
    )

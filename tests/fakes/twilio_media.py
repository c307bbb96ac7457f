"""A fake phone: a Twilio Media Streams websocket client for our ``/twilio/media`` endpoint.

It speaks Twilio's protocol: ``connected``, ``start`` (with ``customParameters``), then a
``media`` message (160 bytes of 8 kHz mu-law, base64) every 20 ms in real time, and
``stop``. When no caller audio is queued it keeps sending silence, like a real phone.
Everything the bot sends back is recorded: ``media`` payloads with their arrival time,
``clear`` and ``mark`` events (marks are echoed back once the audio before them has
"played", as Twilio does), and the close code.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.fakes._util import wait_until
from tests.fakes.audio import pcm16_rms, ulaw_to_pcm16

FRAME_BYTES = 160
FRAME_SECS = 0.02
SILENCE_FRAME = b"\xff" * FRAME_BYTES


@dataclass(frozen=True)
class BotAudio:
    """One ``media`` message received from the bot.

    Attributes:
        payload: mu-law bytes.
        at: Monotonic arrival time.
        voiced: Whether the payload is above the client's energy threshold.
    """

    payload: bytes
    at: float
    voiced: bool


def new_sid(prefix: str) -> str:
    """A random Twilio-style SID (``prefix`` + 32 hex digits).

    Args:
        prefix: Two-letter prefix, e.g. "CA" or "MZ".

    Returns:
        The SID.
    """
    return prefix + secrets.token_hex(16)


class TwilioMediaClient:
    """Twilio Media Streams client that behaves like a caller's phone.

    Attributes:
        url: Websocket URL of the media endpoint (``ws://host:port/twilio/media``).
        call_sid: ``CA...`` SID sent in ``start``.
        stream_sid: ``MZ...`` SID sent in ``start`` and every message.
        account_sid: ``AC...`` SID sent in ``start``.
        custom_parameters: ``start.customParameters`` (e.g. the stream token).
        send_silence: Whether idle time is filled with silence frames.
        energy_threshold: RMS (int16 units) above which bot audio counts as voiced.
        received: Bot ``media`` messages, in arrival order.
        clears: Monotonic arrival times of ``clear`` events.
        marks: ``(name, arrival time)`` of ``mark`` events from the bot.
        marks_echoed: Names of marks echoed back, in order.
        messages: Every JSON message received, raw.
        close_code: Websocket close code once closed (None while open).
        close_reason: Websocket close reason once closed.
        frames_sent: ``media`` messages sent (speech and silence).
        speech_sent: ``(first frame time, last frame time)`` of each ``send_audio`` call.
    """

    def __init__(
        self,
        url: str,
        *,
        call_sid: str | None = None,
        stream_sid: str | None = None,
        account_sid: str = "AC" + "0" * 32,
        custom_parameters: Mapping[str, str] | None = None,
        send_silence: bool = True,
        energy_threshold: float = 300.0,
        idle_audio: bytes | None = None,
    ) -> None:
        """Initialises the client (not connected yet).

        Args:
            url: Media endpoint websocket URL.
            call_sid: Call SID; random when None.
            stream_sid: Stream SID; random when None.
            account_sid: Account SID.
            custom_parameters: ``<Parameter>`` values delivered in ``start``.
            send_silence: Fill idle time with silence frames.
            energy_threshold: Voiced threshold for bot audio.
            idle_audio: mu-law audio sent, looped, instead of digital silence while no
                caller audio is queued (line noise); whole 20 ms frames.
        """
        self.url = url
        self.call_sid = call_sid or new_sid("CA")
        self.stream_sid = stream_sid or new_sid("MZ")
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters or {})
        self.send_silence = send_silence
        self.energy_threshold = energy_threshold
        usable = len(idle_audio or b"") // FRAME_BYTES * FRAME_BYTES
        self._idle_frames = (
            [bytes(idle_audio[i : i + FRAME_BYTES]) for i in range(0, usable, FRAME_BYTES)]
            if idle_audio
            else [SILENCE_FRAME]
        )
        self.received: list[BotAudio] = []
        self.clears: list[float] = []
        self.marks: list[tuple[str, float]] = []
        self.marks_echoed: list[str] = []
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.frames_sent = 0
        self.speech_sent: list[tuple[float, float]] = []
        self._ws: ClientConnection | None = None
        self._seq = 0
        self._outbox = bytearray()
        self._outbox_done: list[tuple[int, asyncio.Future[float]]] = []
        self._bytes_queued = 0
        self._bytes_sent = 0
        self._playback_end = 0.0
        self._pending_marks: list[tuple[float, str]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self._stopped = False

    # --- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        """Opens the websocket, sends ``connected`` and ``start``, starts streaming."""
        self._ws = await connect(self.url, max_size=2**22)
        await self._send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send_json(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.custom_parameters,
                },
                "streamSid": self.stream_sid,
            }
        )
        self._tasks = [
            asyncio.create_task(self._receiver()),
            asyncio.create_task(self._sender()),
            asyncio.create_task(self._mark_echoer()),
        ]

    async def hang_up(self) -> None:
        """Sends ``stop`` and closes the websocket (the caller hung up)."""
        if self._ws is None or self._stopped:
            return
        self._stopped = True
        if not self.closed:
            with contextlib.suppress(ConnectionClosed):
                await self._send_json(
                    {
                        "event": "stop",
                        "sequenceNumber": self._next_seq(),
                        "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                        "streamSid": self.stream_sid,
                    }
                )
        with contextlib.suppress(Exception):
            await self._ws.close()
        await self._shutdown()

    async def close(self) -> None:
        """Hangs up if still connected and stops all background tasks."""
        await self.hang_up()
        await self._shutdown()

    async def __aenter__(self) -> TwilioMediaClient:
        """Connects."""
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Hangs up."""
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether the websocket has closed (either side)."""
        return self._closed.is_set()

    async def wait_closed(self, timeout: float = 10.0) -> int | None:  # noqa: ASYNC109
        """Waits for the websocket to close (e.g. the bot hung up).

        Args:
            timeout: Seconds to wait.

        Returns:
            The close code.

        Raises:
            TimeoutError: Still open after ``timeout``.
        """
        async with asyncio.timeout(timeout):
            await self._closed.wait()
        return self.close_code

    # --- caller audio ----------------------------------------------------------------

    def queue_audio(self, ulaw: bytes) -> asyncio.Future[float]:
        """Queues caller audio behind anything already queued; returns at once.

        Args:
            ulaw: 8 kHz mu-law audio (padded with silence to whole 20 ms frames).

        Returns:
            A future resolving to the monotonic time the last frame was sent (cancelled
            if the stream closes first).
        """
        if len(ulaw) % FRAME_BYTES:
            ulaw += b"\xff" * (FRAME_BYTES - len(ulaw) % FRAME_BYTES)
        self._outbox += ulaw
        self._bytes_queued += len(ulaw)
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._outbox_done.append((self._bytes_queued, done))
        return done

    async def send_audio(self, ulaw: bytes) -> float:
        """Sends caller audio in real time (20 ms frames) and waits until it is all sent.

        Args:
            ulaw: 8 kHz mu-law audio.

        Returns:
            Monotonic time the last frame was sent (end of the caller's speech).
        """
        first_index = self._bytes_queued
        done = self.queue_audio(ulaw)
        try:
            end = await done
        except asyncio.CancelledError:
            if done.cancelled() and self.closed:
                raise ConnectionError("media stream closed before audio was sent") from None
            raise
        frames = max(1, (self._bytes_queued - first_index) // FRAME_BYTES)
        self.speech_sent.append((end - (frames - 1) * FRAME_SECS, end))
        return end

    async def send_dtmf(self, digit: str) -> None:
        """Sends a ``dtmf`` event.

        Args:
            digit: Keypad digit ("0"-"9", "*", "#").
        """
        await self._send_json(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_seq(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    # --- bot audio -------------------------------------------------------------------

    @property
    def bot_audio(self) -> bytes:
        """All bot audio received, concatenated (mu-law)."""
        return b"".join(m.payload for m in self.received)

    def bot_audio_secs(self, since: float = 0.0, voiced_only: bool = True) -> float:
        """Seconds of bot audio received after ``since``.

        Args:
            since: Monotonic time.
            voiced_only: Count only voiced payloads.

        Returns:
            Audio duration in seconds.
        """
        return (
            sum(
                len(m.payload)
                for m in self.received
                if m.at >= since and (m.voiced or not voiced_only)
            )
            / 8000
        )

    def first_bot_audio_after(self, t: float) -> float | None:
        """Arrival time of the first voiced bot audio at or after ``t``.

        Args:
            t: Monotonic time.

        Returns:
            The arrival time, or None.
        """
        return next((m.at for m in self.received if m.at >= t and m.voiced), None)

    def last_bot_audio_at(self) -> float | None:
        """Arrival time of the latest voiced bot audio, or None."""
        return next((m.at for m in reversed(self.received) if m.voiced), None)

    async def wait_for_bot_audio(
        self,
        min_seconds: float = 0.1,
        timeout: float = 10.0,  # noqa: ASYNC109
        since: float | None = None,
    ) -> float:
        """Waits until the bot has sent ``min_seconds`` of voiced audio.

        Args:
            min_seconds: Voiced audio needed.
            timeout: Seconds to wait.
            since: Count audio arriving after this monotonic time (default: now).

        Returns:
            Arrival time of the first voiced bot audio counted.

        Raises:
            TimeoutError: Not enough bot audio in time.
        """
        t0 = time.monotonic() if since is None else since
        await wait_until(lambda: self.bot_audio_secs(t0) >= min_seconds - 1e-9, timeout)
        first = self.first_bot_audio_after(t0)
        assert first is not None
        return first

    async def wait_for_bot_silence(
        self,
        silence_secs: float = 0.5,
        timeout: float = 15.0,  # noqa: ASYNC109
    ) -> float:
        """Waits until no voiced bot audio has arrived for ``silence_secs``.

        Bot audio arrives paced in real time, so this means the bot finished speaking.

        Args:
            silence_secs: Quiet time needed.
            timeout: Seconds to wait.

        Returns:
            Arrival time of the last voiced bot audio (or now if there was none).

        Raises:
            TimeoutError: The bot kept talking.
        """

        def quiet() -> bool:
            last = self.last_bot_audio_at()
            return last is None or time.monotonic() - last >= silence_secs

        await wait_until(quiet, timeout)
        return self.last_bot_audio_at() or time.monotonic()

    async def wait_for_clear(
        self,
        since: float = 0.0,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> float:
        """Waits for a ``clear`` event arriving after ``since``.

        Args:
            since: Monotonic time.
            timeout: Seconds to wait.

        Returns:
            The arrival time of the clear.

        Raises:
            TimeoutError: No clear in time.
        """
        await wait_until(lambda: any(t >= since for t in self.clears), timeout)
        return next(t for t in self.clears if t >= since)

    # --- internals -------------------------------------------------------------------

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _send_json(self, message: dict[str, Any]) -> None:
        if self._ws is None:
            raise RuntimeError("not connected")
        await self._ws.send(json.dumps(message))

    async def _sender(self) -> None:
        """Sends one 20 ms media frame per tick, on an absolute clock."""
        chunk = 0
        next_at = time.monotonic()
        try:
            while not self._stopped:
                if self._outbox:
                    frame = bytes(self._outbox[:FRAME_BYTES])
                    del self._outbox[:FRAME_BYTES]
                    self._bytes_sent += len(frame)
                elif self.send_silence:
                    frame = self._idle_frames[chunk % len(self._idle_frames)]
                else:
                    frame = b""
                if frame:
                    chunk += 1
                    await self._send_json(
                        {
                            "event": "media",
                            "sequenceNumber": self._next_seq(),
                            "media": {
                                "track": "inbound",
                                "chunk": str(chunk),
                                "timestamp": str(int((chunk - 1) * FRAME_SECS * 1000)),
                                "payload": base64.b64encode(frame).decode(),
                            },
                            "streamSid": self.stream_sid,
                        }
                    )
                    self.frames_sent += 1
                    now = time.monotonic()
                    while self._outbox_done and self._outbox_done[0][0] <= self._bytes_sent:
                        _, done = self._outbox_done.pop(0)
                        if not done.done():
                            done.set_result(now)
                next_at += FRAME_SECS
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        except ConnectionClosed:
            pass

    async def _receiver(self) -> None:
        """Records everything the bot sends until the websocket closes."""
        assert self._ws is not None
        try:
            async for raw in self._ws:
                now = time.monotonic()
                message = json.loads(raw)
                self.messages.append(message)
                event = message.get("event")
                if event == "media":
                    payload = base64.b64decode(message["media"]["payload"])
                    voiced = pcm16_rms(ulaw_to_pcm16(payload)) >= self.energy_threshold
                    self.received.append(BotAudio(payload, now, voiced))
                    self._playback_end = max(self._playback_end, now) + len(payload) / 8000
                elif event == "clear":
                    self.clears.append(now)
                    self._playback_end = now
                    for _, name in sorted(self._pending_marks):
                        await self._echo_mark(name)
                    self._pending_marks.clear()
                elif event == "mark":
                    name = str((message.get("mark") or {}).get("name", ""))
                    self.marks.append((name, now))
                    self._pending_marks.append((max(self._playback_end, now), name))
        except ConnectionClosed:
            pass
        finally:
            if self._ws is not None:
                self.close_code = self._ws.close_code
                self.close_reason = self._ws.close_reason
            self._closed.set()
            self._fail_pending()

    async def _mark_echoer(self) -> None:
        """Echoes marks back once the audio queued before them has played."""
        while not self._closed.is_set():
            now = time.monotonic()
            due = sorted(m for m in self._pending_marks if m[0] <= now)
            for item in due:
                self._pending_marks.remove(item)
                await self._echo_mark(item[1])
            await asyncio.sleep(0.01)

    async def _echo_mark(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._send_json(
                {
                    "event": "mark",
                    "sequenceNumber": self._next_seq(),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )
            self.marks_echoed.append(name)

    def _fail_pending(self) -> None:
        for _, done in self._outbox_done:
            done.cancel()
        self._outbox_done.clear()

    async def _shutdown(self) -> None:
        self._stopped = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._fail_pending()
        self._closed.set()

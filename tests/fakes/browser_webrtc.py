"""A fake browser for the WebRTC test page: an aiortc peer that talks to the server's
``/start`` + ``/sessions/{id}/api/offer`` routes like the page's script
(``api/static/dev_page.js``) does.

It sends a microphone track (silence, or queued speech-like PCM) and records the audio the
bot sends back.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from typing import Any

import av
import httpx
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from tests.fakes._util import wait_until

MIC_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz


class Microphone(MediaStreamTrack):
    """An audio track that plays queued int16 PCM (16 kHz mono) in real time, else silence."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._start: float | None = None
        self._pts = 0

    def play(self, pcm16: bytes) -> None:
        """Queue audio to be 'spoken' into the microphone."""
        self._pending += pcm16

    @property
    def playing(self) -> bool:
        """Whether queued audio is still being sent."""
        return bool(self._pending)

    async def recv(self) -> av.AudioFrame:
        """Next 20 ms frame, paced in real time."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self._pts / MIC_RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        size = FRAME_SAMPLES * 2
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        chunk = chunk.ljust(size, b"\0")
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(chunk, dtype="<i2").reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = MIC_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, MIC_RATE)
        self._pts += FRAME_SAMPLES
        return frame


class FakeBrowser:
    """One browser tab on the test page.

    Args:
        http: Client on the server (keeps the page's cookies).
    """

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.mic = Microphone()
        self.pc = RTCPeerConnection()
        self.bot_audio_frames = 0
        self._reader: asyncio.Task | None = None
        self.connected = asyncio.Event()

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                self._reader = asyncio.create_task(self._read(track))

        @self.pc.on("connectionstatechange")
        def on_state() -> None:
            if self.pc.connectionState == "connected":
                self.connected.set()

    async def _read(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
            while True:
                frame = await track.recv()
                if np.abs(frame.to_ndarray()).max() > 500:
                    self.bot_audio_frames += 1

    async def call(self, start_body: dict[str, Any] | None = None) -> httpx.Response:
        """``POST /start`` then the SDP offer, like the test page.

        Returns:
            The offer's response (the SDP answer when 200).
        """
        start = await self.http.post(
            "/start",
            json=start_body
            if start_body is not None
            else {"createDailyRoom": False, "enableDefaultIceServers": True, "transport": "webrtc"},
        )
        assert start.status_code == 200, start.text
        session_id = start.json()["sessionId"]
        self.pc.addTransceiver(self.mic, direction="sendrecv")
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = self.pc.localDescription
        answer = await self.http.post(
            f"/sessions/{session_id}/api/offer",
            json={"sdp": offer.sdp, "type": offer.type, "pc_id": None, "restart_pc": False},
        )
        if answer.status_code == 200:
            body = answer.json()
            await self.pc.setRemoteDescription(
                RTCSessionDescription(sdp=body["sdp"], type=body["type"])
            )
        return answer

    async def wait_for_bot_audio(self, frames: int = 10, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Waits until the bot has sent ``frames`` voiced 20 ms frames."""
        await wait_until(lambda: self.bot_audio_frames >= frames, timeout)

    async def say(self, pcm16: bytes, *, trailing_silence: float = 1.2) -> None:
        """Speak ``pcm16`` (16 kHz) into the microphone and wait until it was sent."""
        self.mic.play(pcm16 + b"\0" * int(trailing_silence * MIC_RATE) * 2)
        await wait_until(lambda: not self.mic.playing, timeout=len(pcm16) / MIC_RATE + 10)

    async def close(self) -> None:
        """Hang up."""
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

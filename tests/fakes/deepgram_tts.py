"""A local fake of Deepgram's streaming TTS WebSocket (``/v1/speak``) on 127.0.0.1.

Pipecat's ``DeepgramTTSService(base_url=fake.url)`` connects to
``ws://127.0.0.1:PORT/v1/speak?model=<voice>&encoding=linear16&sample_rate=8000`` with
``Authorization: Token <key>`` and sends ``{"type":"Speak","text":..}``, ``Flush`` (end of
an LLM response), ``Clear`` (interruption) and ``Close``. The fake answers each ``Flush``
with speech-like audio for the buffered text (binary, in the requested encoding and
sample rate, ~20 ms chunks) and then ``{"type":"Flushed","sequence_id":n}``.

Fault injection: :meth:`FakeDeepgramTTS.drop` closes every open socket now,
:meth:`FakeDeepgramTTS.drop_mid_utterance` closes a socket part-way through the audio of
the next flushed text, and ``refuse_connections`` answers new handshakes with HTTP 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from tests.fakes._util import wait_until
from tests.fakes.audio import encode_pcm16, speech_pcm16


@dataclass
class _Session:
    """State of one speak connection."""

    ws: ServerConnection
    query: dict[str, str]
    encoding: str
    sample_rate: int
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    pending: list[str] = field(default_factory=list)
    jobs: asyncio.Queue[tuple[int, list[str]]] = field(default_factory=asyncio.Queue)
    flush_seq: int = 0
    clear_seq: int = 0
    generation: int = 0
    worker: asyncio.Task[None] | None = None


class FakeDeepgramTTS:
    """Deepgram speak-WebSocket fake that renders text as synthetic speech.

    Attributes:
        url: ``ws://127.0.0.1:PORT`` once started (pass as ``base_url``).
        api_key: When set, the handshake must carry ``Authorization: Token <api_key>``.
        secs_per_char: Seconds of audio per character of text.
        max_secs: Cap on the audio of one Speak text.
        chunk_secs: Duration of each binary audio message.
        first_byte_delay: Seconds between a Flush and its first audio chunk.
        chunk_delay: Seconds between chunks (0 sends faster than real time, like Deepgram).
        texts: Text of every Speak message, in order.
        spoken_at: Monotonic arrival time of each Speak message (parallel to ``texts``).
        queries: Query parameters of every connection (first value each).
        control_messages: Every JSON message received.
        flushes: Flush messages received.
        clears: Clear messages received.
        connections: Connections accepted so far.
        open_connections: Connections open now.
        audio_bytes_sent: Audio bytes sent, all connections.
        flush_received_at: Monotonic time of each Flush.
        first_audio_sent_at: Monotonic time of the first chunk answering each Flush that
            had text.
        flushed_sent_at: Monotonic time each Flushed was sent.
        refuse_connections: While True, new handshakes get HTTP 503 (Deepgram down).
        refused: Handshakes refused so far.
        drops: Sockets the fake closed on purpose (``drop`` / ``drop_mid_utterance``).
        dropped_at: Monotonic time of each such close.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        secs_per_char: float = 0.06,
        max_secs: float = 10.0,
        chunk_secs: float = 0.02,
        first_byte_delay: float = 0.0,
        chunk_delay: float = 0.0,
    ) -> None:
        """Initialises the fake (not started yet).

        Args:
            api_key: Expected API key; None accepts any.
            secs_per_char: Audio duration per character.
            max_secs: Longest audio for one Speak text.
            chunk_secs: Duration of each audio message.
            first_byte_delay: Latency before the first chunk of each Flush.
            chunk_delay: Pause between chunks.
        """
        self.api_key = api_key
        self.secs_per_char = secs_per_char
        self.max_secs = max_secs
        self.chunk_secs = chunk_secs
        self.first_byte_delay = first_byte_delay
        self.chunk_delay = chunk_delay
        self.url = ""
        self.texts: list[str] = []
        self.spoken_at: list[float] = []
        self.queries: list[dict[str, str]] = []
        self.control_messages: list[dict[str, Any]] = []
        self.flushes = 0
        self.clears = 0
        self.connections = 0
        self.open_connections = 0
        self.audio_bytes_sent = 0
        self.flush_received_at: list[float] = []
        self.first_audio_sent_at: list[float] = []
        self.flushed_sent_at: list[float] = []
        self.refuse_connections = False
        self.refused = 0
        self.drops = 0
        self.dropped_at: list[float] = []
        self._drop_mid: tuple[float, bool] | None = None
        self._sessions: list[_Session] = []
        self._server: Server | None = None

    @property
    def last_query(self) -> dict[str, str]:
        """The latest connection's query parameters."""
        return self.queries[-1] if self.queries else {}

    def audio_secs(self, text: str) -> float:
        """Audio duration the fake renders for ``text``.

        Args:
            text: Speak text.

        Returns:
            Seconds of audio.
        """
        return min(self.max_secs, max(self.chunk_secs, len(text.strip()) * self.secs_per_char))

    async def wait_for_connection(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Waits until at least one connection is open.

        Args:
            timeout: Seconds to wait.

        Raises:
            TimeoutError: No connection in time.
        """
        await wait_until(lambda: bool(self._sessions), timeout)

    async def drop(self, *, code: int = 1011, refuse: bool = False) -> int:
        """Closes every open speak socket now (Deepgram dropping its connections).

        Args:
            code: Close code (1011: internal error; 1006-like abort with ``code=0``).
            refuse: Also refuse new connections from now on (TTS stays down).

        Returns:
            Number of sockets closed.
        """
        if refuse:
            self.refuse_connections = True
        sessions = list(self._sessions)
        for session in sessions:
            await self._drop_session(session, code)
        return len(sessions)

    def drop_mid_utterance(self, *, after_secs: float = 0.3, refuse: bool = False) -> None:
        """Arms a drop: the socket closes after ``after_secs`` of the next flushed audio.

        Args:
            after_secs: Seconds of audio sent before the socket closes.
            refuse: Also refuse new connections from then on.
        """
        self._drop_mid = (after_secs, refuse)

    async def _drop_session(self, session: _Session, code: int) -> None:
        self.drops += 1
        self.dropped_at.append(time.monotonic())
        with contextlib.suppress(Exception):
            if code:
                await asyncio.wait_for(session.ws.close(code, "internal error"), 1)
            else:
                session.ws.transport.abort()

    async def start(self) -> None:
        """Starts listening on 127.0.0.1 on a free port."""
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._check_request
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Closes all connections and stops the server."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeDeepgramTTS:
        """Starts the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops the server."""
        await self.stop()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Rejects wrong paths (404) and wrong keys (401) at the handshake."""
        if urlsplit(request.path).path.rstrip("/") != "/v1/speak":
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.api_key is not None and request.headers.get("Authorization") not in (
            f"Token {self.api_key}",
            f"Bearer {self.api_key}",
        ):
            return connection.respond(HTTPStatus.UNAUTHORIZED, "Invalid credentials.\n")
        if self.refuse_connections:
            self.refused += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        """Serves one speak connection."""
        raw_query = urlsplit(ws.request.path if ws.request else "").query
        query = {k: v[0] for k, v in parse_qs(raw_query).items()}
        self.queries.append(query)
        session = _Session(
            ws=ws,
            query=query,
            encoding=query.get("encoding", "linear16"),
            sample_rate=int(query.get("sample_rate", "24000")),
        )
        session.worker = asyncio.create_task(self._synthesise(session))
        self.connections += 1
        self.open_connections += 1
        self._sessions.append(session)
        try:
            await self._send(
                session,
                {
                    "type": "Metadata",
                    "request_id": session.request_id,
                    "model_name": query.get("model", "aura-2-helena-en"),
                    "model_version": "2025-01-01.0",
                    "model_uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, query.get("model", ""))),
                },
            )
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                msg = json.loads(message)
                self.control_messages.append(msg)
                kind = msg.get("type")
                if kind == "Speak":
                    text = str(msg.get("text", ""))
                    self.texts.append(text)
                    self.spoken_at.append(time.monotonic())
                    session.pending.append(text)
                elif kind == "Flush":
                    self.flushes += 1
                    self.flush_received_at.append(time.monotonic())
                    session.jobs.put_nowait((session.generation, session.pending))
                    session.pending = []
                elif kind == "Clear":
                    self.clears += 1
                    session.generation += 1
                    session.pending = []
                    while not session.jobs.empty():
                        session.jobs.get_nowait()
                    await self._send(session, {"type": "Cleared", "sequence_id": session.clear_seq})
                    session.clear_seq += 1
                elif kind == "Close":
                    await ws.close(1000)
                    break
        except Exception:
            pass
        finally:
            if session.worker is not None:
                session.worker.cancel()
            self._sessions.remove(session)
            self.open_connections -= 1

    async def _synthesise(self, session: _Session) -> None:
        """Renders flushed text, one Flush at a time, until the connection ends."""
        while True:
            generation, texts = await session.jobs.get()
            if generation != session.generation:
                continue
            if self.first_byte_delay > 0 and texts:
                await asyncio.sleep(self.first_byte_delay)
            first = True
            drop_after: float | None = None
            if self._drop_mid is not None and any(t.strip() for t in texts):
                drop_after, refuse = self._drop_mid
                self._drop_mid = None
                if refuse:
                    self.refuse_connections = True
            sent_secs = 0.0
            width = 2 if session.encoding == "linear16" else 1
            chunk_bytes = max(1, int(session.sample_rate * self.chunk_secs)) * width
            for text in texts:
                pcm = speech_pcm16(
                    self.audio_secs(text),
                    freq=180.0,
                    sample_rate=session.sample_rate,
                    seed=zlib.crc32(text.encode()),
                )
                audio = encode_pcm16(pcm, session.encoding)
                for i in range(0, len(audio), chunk_bytes):
                    if generation != session.generation:
                        break
                    if first:
                        self.first_audio_sent_at.append(time.monotonic())
                        first = False
                    if drop_after is not None and sent_secs >= drop_after:
                        await self._drop_session(session, 1011)
                        return
                    await self._send_bytes(session, audio[i : i + chunk_bytes])
                    sent_secs += self.chunk_secs
                    await asyncio.sleep(self.chunk_delay)
            if generation != session.generation:
                continue
            await self._send(session, {"type": "Flushed", "sequence_id": session.flush_seq})
            self.flushed_sent_at.append(time.monotonic())
            session.flush_seq += 1

    async def _send(self, session: _Session, message: dict[str, Any]) -> None:
        """Sends one JSON message, ignoring a closed socket."""
        with contextlib.suppress(Exception):
            await session.ws.send(json.dumps(message))

    async def _send_bytes(self, session: _Session, data: bytes) -> None:
        """Sends one audio chunk, ignoring a closed socket."""
        with contextlib.suppress(Exception):
            await session.ws.send(data)
            self.audio_bytes_sent += len(data)

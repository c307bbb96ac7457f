"""A local fake of Deepgram's live transcription WebSocket (``/v1/listen``) on 127.0.0.1.

Pipecat's ``DeepgramSTTService(base_url=fake.url)`` connects (through deepgram-sdk v7) to
``ws://127.0.0.1:PORT/v1/listen?model=..&encoding=linear16&sample_rate=8000&...`` with
``Authorization: Token <key>``, streams binary audio, and sends ``KeepAlive`` (every 5 s),
``Finalize`` (when Pipecat's VAD says the user stopped) and ``CloseStream`` JSON messages.

The fake finds speech by energy: a burst of non-silent audio followed by ``silence_secs``
of silence (measured in audio time, so pacing does not matter) is one utterance, and gets
the next scripted transcript. ``Finalize`` finalises the current burst at once
(``from_finalize: true``), as Deepgram does.

A connection to ``/v2/listen`` (Pipecat's ``DeepgramFluxSTTService``) speaks Flux instead:
``Connected`` first, then ``TurnInfo`` messages (``StartOfTurn``, ``Update``, and, when the
query asks for them with ``eager_eot_threshold``, ``EagerEndOfTurn`` / ``TurnResumed``, then
``EndOfTurn``), each with ``request_id``, ``sequence_id``, ``turn_index``,
``audio_window_start``/``_end``, ``transcript``, ``words`` and ``end_of_turn_confidence``, as
Deepgram documents them. A turn ends after ``silence_secs`` of silence; with eager end of
turn on, ``eager_silence_secs`` of silence first sends ``EagerEndOfTurn``, and speech
resuming before the end sends ``TurnResumed``: the caller paused mid-sentence. A scripted
turn given as a list of parts is transcribed part by part, one per stretch of speech
between such pauses (``["I need an oil change", "for my Camry."]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.fakes._util import wait_until
from tests.fakes.audio import decode_to_pcm16, pcm16_rms

FRAME_SECS = 0.02
MODEL_UUID = "1ed36bac-f71c-4f3f-a31f-02fd6525c489"


@dataclass
class _Burst:
    """One stretch of speech on a connection."""

    start: float
    last_speech: float
    last_speech_wall: float
    silence: float = 0.0
    text: str | None = None
    language: str | None = None
    interim_sent: bool = False
    finalized: bool = False
    end_interim_sent: bool = False


@dataclass
class _FluxTurn:
    """One Flux turn on a connection (speech stretches split by pauses)."""

    start: float
    parts: list[str]
    language: str | None = None
    heard: int = 1
    silence: float = 0.0
    last_speech: float = 0.0
    last_speech_wall: float = 0.0
    last_update: float = 0.0
    eager_sent: bool = False

    @property
    def text(self) -> str:
        """What the caller has said so far in the turn."""
        return " ".join(self.parts[: self.heard])

    @property
    def partial(self) -> str:
        """Mid-speech: the parts before this one and the start of this one."""
        return " ".join([*self.parts[: self.heard - 1], _prefix(self.parts[self.heard - 1])])


@dataclass
class _Session:
    """State of one listen connection."""

    ws: ServerConnection
    query: dict[str, list[str]]
    encoding: str
    sample_rate: int
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    buf: bytearray = field(default_factory=bytearray)
    audio_time: float = 0.0
    cursor: float = 0.0
    burst: _Burst | None = None
    flux: bool = False
    sequence_id: int = 0
    turn_index: int = 0
    turn: _FluxTurn | None = None
    outbox: asyncio.Queue[tuple[float, dict[str, Any]]] | None = None

    def q(self, name: str, default: str | None = None) -> str | None:
        """The first value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else default


class FakeDeepgramSTT:
    """Scripted Deepgram live-transcription server.

    Attributes:
        url: ``ws://127.0.0.1:PORT`` once started (pass as ``base_url``).
        api_key: When set, the handshake must carry ``Authorization: Token <api_key>``.
        energy_threshold: RMS (int16 units) above which a 20 ms frame counts as speech.
        silence_secs: Silence (audio time) that ends an utterance.
        min_speech_secs: Shorter bursts are ignored as noise.
        interim_after_secs: Speech time after which the one interim result is sent.
        final_delay: Seconds between detecting the end of speech and sending the final.
        queries: Query parameters of every connection (``keyterm`` may repeat).
        audio: Every audio byte received, as sent (in the requested encoding).
        control_messages: Every JSON message received (KeepAlive, Finalize, CloseStream).
        transcripts_sent: Non-empty final transcripts sent, in order.
        interims_sent: Interim transcripts sent, in order.
        speech_started_at: Monotonic times the first speech frame of each burst arrived.
        speech_ended_at: Monotonic times the last speech frame arrived, per final sent.
        final_sent_at: Monotonic times each non-empty final was sent.
        finalize_count: Number of ``Finalize`` messages received.
        keepalive_count: Number of ``KeepAlive`` messages received.
        connections: Connections accepted so far.
        open_connections: Connections open now.
        unscripted_bursts: Utterances that ended while the script was empty (sent as "").
        refuse_connections: While True, new handshakes get HTTP 503 (Deepgram down).
        refused: Handshakes refused so far.
        dropped_at: Monotonic time of each :meth:`drop`.
        flux_messages: Every message sent on Flux (``/v2/listen``) connections, in order.
    """

    def __init__(
        self,
        script: Iterable[str] | None = None,
        *,
        api_key: str | None = None,
        energy_threshold: float = 500.0,
        silence_secs: float = 0.3,
        min_speech_secs: float = 0.1,
        interim_after_secs: float = 0.3,
        final_delay: float = 0.0,
        send_vad_events: bool | None = None,
        send_utterance_end: bool | None = None,
        end_interim_delay: float | None = None,
        end_interim_text: Callable[[str], str] | None = None,
        eager_silence_secs: float = 0.15,
        update_secs: float = 0.25,
        eot_waits_for_all_parts: bool = False,
        eot_timeout_secs: float = 5.0,
    ) -> None:
        """Initialises the fake (not started yet).

        Args:
            script: Transcripts for the next utterances, in order.
            api_key: Expected API key; None accepts any.
            energy_threshold: Speech RMS threshold, int16 units.
            silence_secs: Trailing silence that ends an utterance.
            min_speech_secs: Minimum burst length to count as speech.
            interim_after_secs: When to send the interim result within a burst.
            final_delay: Extra latency before each final.
            send_vad_events: Send ``SpeechStarted``; None follows the ``vad_events`` query.
            send_utterance_end: Send ``UtteranceEnd`` after each final; None sends it when
                the query has ``utterance_end_ms`` (as Deepgram does).
            end_interim_delay: When set, an interim result with the burst's whole text
                follows this long (wall time) after its speech ends, unless the burst was
                finalized first: Deepgram's last interim before it endpoints. None: only
                the one early interim (``interim_after_secs``).
            end_interim_text: What that last interim says, from the burst's final text
                (default: the same text); e.g. a prefix, for a recognizer that revises
                its last words in the final.
            eager_silence_secs: Flux only: silence after which ``EagerEndOfTurn`` is sent
                (when the connection asked for it); speech after it is a resumed turn.
            update_secs: Flux only: audio time between ``Update`` messages.
            eot_waits_for_all_parts: Flux only: a turn scripted in parts does not end
                before its last part has been said (a model that hears the sentence is
                unfinished); ``eot_timeout_secs`` of silence still ends it.
            eot_timeout_secs: Flux only: silence that ends any turn (``eot_timeout_ms``).
        """
        self._script: list[ScriptItem] = list(script or [])
        self.api_key = api_key
        self.energy_threshold = energy_threshold
        self.silence_secs = silence_secs
        self.min_speech_secs = min_speech_secs
        self.interim_after_secs = interim_after_secs
        self.final_delay = final_delay
        self.send_vad_events = send_vad_events
        self.send_utterance_end = send_utterance_end
        self.end_interim_delay = end_interim_delay
        self.end_interim_text = end_interim_text
        self.eager_silence_secs = eager_silence_secs
        self.update_secs = update_secs
        self.eot_waits_for_all_parts = eot_waits_for_all_parts
        self.eot_timeout_secs = eot_timeout_secs
        self.flux_messages: list[dict[str, Any]] = []
        self.url = ""
        self.queries: list[dict[str, list[str]]] = []
        self.audio = bytearray()
        self.control_messages: list[dict[str, Any]] = []
        self.transcripts_sent: list[str] = []
        self.interims_sent: list[str] = []
        self.speech_started_at: list[float] = []
        self.speech_ended_at: list[float] = []
        self.final_sent_at: list[float] = []
        self.finalize_count = 0
        self.keepalive_count = 0
        self.connections = 0
        self.open_connections = 0
        self.unscripted_bursts = 0
        self.refuse_connections = False
        self.refused = 0
        self.dropped_at: list[float] = []
        self._sessions: list[_Session] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: Server | None = None

    # --- scripting -------------------------------------------------------------------

    def script(self, utterances: Iterable[ScriptItem]) -> None:
        """Appends transcripts for the next utterances.

        Args:
            utterances: One transcript per utterance, in order; ``(text, language)`` for
                an utterance in a given language (``"es"``): on a ``language=multi``
                connection every result carries its language, as Deepgram's multilingual
                model tags them (``languages`` on the alternative, ``language`` on each
                word; English when not given). On a Flux connection a list of strings
                is one turn said in parts, with pauses between them (module docs).
        """
        self._script.extend(utterances)

    @property
    def pending(self) -> list[str]:
        """Scripted transcripts not used yet."""
        return [_text_of(item) for item in self._script]

    @property
    def last_query(self) -> dict[str, str]:
        """The latest connection's query, one (the first) value per parameter."""
        if not self.queries:
            return {}
        return {k: v[0] for k, v in self.queries[-1].items()}

    async def send_interim(self, text: str | None = None) -> int:
        """Sends an interim result now on every open connection (for barge-in tests).

        Args:
            text: Transcript; defaults to the start of the next scripted utterance.

        Returns:
            Number of connections it was sent on.
        """
        if text is None:
            text = _prefix(_text_of(self._script[0])) if self._script else "wait"
        for session in list(self._sessions):
            await self._send_results(session, text, is_final=False)
        return len(self._sessions)

    async def send_final(self, text: str, *, speech_final: bool = True) -> int:
        """Sends a final result now on every open connection (not taken from the script).

        Args:
            text: Transcript.
            speech_final: Value of ``speech_final``.

        Returns:
            Number of connections it was sent on.
        """
        for session in list(self._sessions):
            await self._send_results(session, text, is_final=True, speech_final=speech_final)
        return len(self._sessions)

    async def drop(self, *, code: int = 1011, refuse: bool = False) -> int:
        """Closes every open listen socket now (Deepgram dropping its connections).

        Args:
            code: Close code (1011: internal error).
            refuse: Also refuse new connections from now on (STT stays down).

        Returns:
            Number of sockets closed.
        """
        if refuse:
            self.refuse_connections = True
        self.dropped_at.append(time.monotonic())
        sessions = list(self._sessions)
        for session in sessions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.ws.close(code, "internal error"), 1)
        return len(sessions)

    async def wait_for_connection(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Waits until at least one connection is open.

        Args:
            timeout: Seconds to wait.

        Raises:
            TimeoutError: No connection in time.
        """
        await wait_until(lambda: bool(self._sessions), timeout)

    async def wait_for_transcripts(
        self,
        count: int,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[str]:
        """Waits until ``count`` non-empty finals have been sent.

        Args:
            count: Number of finals.
            timeout: Seconds to wait.

        Returns:
            ``transcripts_sent``.

        Raises:
            TimeoutError: Not enough finals in time.
        """
        await wait_until(lambda: len(self.transcripts_sent) >= count, timeout)
        return self.transcripts_sent

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Starts listening on 127.0.0.1 on a free port."""
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._check_request
        )
        port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Closes all connections and stops the server."""
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeDeepgramSTT:
        """Starts the server."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops the server."""
        await self.stop()

    # --- protocol --------------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Rejects wrong paths (404) and wrong keys (401) at the handshake."""
        if urlsplit(request.path).path.rstrip("/") not in ("/v1/listen", "/v2/listen"):
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.api_key is not None and request.headers.get("Authorization") not in (
            f"Token {self.api_key}",
            f"Bearer {self.api_key}",
        ):
            response = connection.respond(HTTPStatus.UNAUTHORIZED, "")
            response.headers = Headers({"Content-Type": "application/json"})
            response.body = json.dumps(
                {
                    "err_code": "INVALID_AUTH",
                    "err_msg": "Invalid credentials.",
                    "request_id": str(uuid.uuid4()),
                }
            ).encode()
            return response
        if self.refuse_connections:
            self.refused += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "Service Unavailable\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        """Serves one listen connection."""
        query = parse_qs(urlsplit(ws.request.path).query if ws.request else "")
        self.queries.append(query)
        session = _Session(
            ws=ws,
            query=query,
            encoding=(query.get("encoding") or ["linear16"])[0],
            sample_rate=int((query.get("sample_rate") or ["16000"])[0]),
            flux=bool(ws.request and urlsplit(ws.request.path).path.rstrip("/") == "/v2/listen"),
        )
        self.connections += 1
        self.open_connections += 1
        self._sessions.append(session)
        if session.flux:
            session.outbox = asyncio.Queue()
            self._spawn(self._flux_sender(session))
            self._flux_send(session, {"type": "Connected"})
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.audio += message
                    if session.flux:
                        self._flux_audio(session, message)
                    else:
                        await self._on_audio(session, message)
                    continue
                msg = json.loads(message)
                self.control_messages.append(msg)
                kind = msg.get("type")
                if kind == "Configure" and session.flux:
                    self._flux_send(
                        session,
                        {"type": "ConfigureSuccess", "thresholds": msg.get("thresholds") or {}},
                    )
                elif kind == "KeepAlive":
                    self.keepalive_count += 1
                elif kind == "Finalize":
                    self.finalize_count += 1
                    await self._on_finalize(session)
                elif kind == "CloseStream":
                    if not session.flux:
                        await self._send_metadata(session)
                    await ws.close(1000)
                    break
        except Exception:
            pass
        finally:
            if session.outbox is not None:
                session.outbox.put_nowait((0.0, {}))
            self._sessions.remove(session)
            self.open_connections -= 1

    async def _on_audio(self, session: _Session, data: bytes) -> None:
        """Runs energy detection over 20 ms frames of new audio."""
        session.buf += data
        width = 2 if session.encoding not in ("mulaw", "alaw") else 1
        frame_bytes = int(session.sample_rate * FRAME_SECS) * width
        while len(session.buf) >= frame_bytes:
            frame = bytes(session.buf[:frame_bytes])
            del session.buf[:frame_bytes]
            session.audio_time += FRAME_SECS
            loud = pcm16_rms(decode_to_pcm16(frame, session.encoding)) >= self.energy_threshold
            burst = session.burst
            if loud:
                now = time.monotonic()
                if burst is None:
                    burst = session.burst = _Burst(
                        start=session.audio_time - FRAME_SECS,
                        last_speech=session.audio_time,
                        last_speech_wall=now,
                    )
                    self.speech_started_at.append(now)
                    if self._want_vad_events(session):
                        await self._send(
                            session,
                            {
                                "type": "SpeechStarted",
                                "channel": [0],
                                "timestamp": round(burst.start, 3),
                            },
                        )
                burst.last_speech = session.audio_time
                burst.last_speech_wall = now
                burst.silence = 0.0
                if (
                    not burst.interim_sent
                    and not burst.finalized
                    and session.q("interim_results", "true") != "false"
                    and session.audio_time - burst.start >= self.interim_after_secs
                ):
                    burst.interim_sent = True
                    text = self._burst_text(burst)
                    if text:
                        await self._send_results(
                            session, _prefix(text), is_final=False, language=burst.language
                        )
            elif burst is not None:
                if (
                    burst.silence == 0.0
                    and self.end_interim_delay is not None
                    and not burst.end_interim_sent
                    and session.q("interim_results", "true") != "false"
                ):
                    burst.end_interim_sent = True
                    self._spawn(self._end_interim(session, burst))
                burst.silence += FRAME_SECS
                if burst.silence + 1e-9 >= self.silence_secs:
                    session.burst = None
                    if burst.last_speech - burst.start < self.min_speech_secs:
                        continue
                    await self._final_for_burst(
                        session, burst, from_finalize=False, utterance_end=True
                    )

    async def _on_finalize(self, session: _Session) -> None:
        """Finalises the burst in progress, or answers with an empty final."""
        burst = session.burst
        if (
            burst is not None
            and not burst.finalized
            and burst.last_speech - burst.start >= self.min_speech_secs
        ):
            await self._final_for_burst(session, burst, from_finalize=True)
        else:
            await self._send_results(session, "", is_final=True, from_finalize=True)

    async def _final_for_burst(
        self, session: _Session, burst: _Burst, *, from_finalize: bool, utterance_end: bool = False
    ) -> None:
        """Sends the final result for a burst (and UtteranceEnd), after ``final_delay``."""
        send_final = not burst.finalized
        burst.finalized = True
        text = ""
        if send_final:
            picked = self._burst_text(burst)
            if picked is None:
                self.unscripted_bursts += 1
            text = picked or ""
            if text:
                self.speech_ended_at.append(burst.last_speech_wall)
        span = (burst.start, burst.last_speech)
        end_audio = session.audio_time

        async def emit() -> None:
            if self.final_delay > 0:
                await asyncio.sleep(self.final_delay)
            if send_final:
                await self._send_results(
                    session,
                    text,
                    is_final=True,
                    speech_final=not from_finalize,
                    from_finalize=from_finalize,
                    word_span=span,
                    end=end_audio,
                    language=burst.language,
                )
            if utterance_end and self._want_utterance_end(session):
                await self._send(
                    session,
                    {
                        "type": "UtteranceEnd",
                        "channel": [0, 1],
                        "last_word_end": round(span[1], 3),
                    },
                )

        if self.final_delay > 0:
            task = asyncio.create_task(emit())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            await emit()

    # --- Flux (/v2/listen) -----------------------------------------------------------

    def _flux_send(self, session: _Session, message: dict[str, Any], delay: float = 0.0) -> None:
        """Queues one Flux message (``request_id`` and ``sequence_id`` added) to go out
        ``delay`` seconds from now, in order behind the ones queued before it."""
        assert session.outbox is not None
        message = {**message, "request_id": session.request_id, "sequence_id": session.sequence_id}
        session.sequence_id += 1
        session.outbox.put_nowait((time.monotonic() + delay, message))

    async def _flux_sender(self, session: _Session) -> None:
        """Sends a Flux connection's queued messages, each no earlier than its time."""
        assert session.outbox is not None
        while True:
            not_before, message = await session.outbox.get()
            if not message:  # the connection closed
                return
            wait = not_before - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if session not in self._sessions:
                return
            await self._send(session, message)
            self.flux_messages.append(message)
            if message.get("event") == "EndOfTurn" and message["transcript"]:
                self.transcripts_sent.append(message["transcript"])
                self.final_sent_at.append(time.monotonic())
            elif message.get("event") == "Update" and message["transcript"]:
                self.interims_sent.append(message["transcript"])

    def _flux_turn_info(
        self, session: _Session, turn: _FluxTurn, event: str, confidence: float, delay: float = 0.0
    ) -> None:
        """Queues one ``TurnInfo`` message about ``turn``."""
        text = {"StartOfTurn": "", "Update": turn.partial}.get(event, turn.text)
        tokens = text.split()
        span = max(turn.last_speech - turn.start, FRAME_SECS)
        step = span / max(len(tokens), 1)
        message: dict[str, Any] = {
            "type": "TurnInfo",
            "event": event,
            "turn_index": session.turn_index,
            "audio_window_start": round(turn.start, 3),
            "audio_window_end": round(session.audio_time, 3),
            "transcript": text,
            "words": [
                {
                    "word": tok,
                    "confidence": 0.98,
                    "start": round(turn.start + i * step, 3),
                    "end": round(turn.start + (i + 1) * step, 3),
                }
                for i, tok in enumerate(tokens)
            ],
            "end_of_turn_confidence": confidence,
        }
        if event == "EndOfTurn":
            message["trigger"] = "model"
        if session.q("model") == "flux-general-multi" and text:
            message["languages"] = [turn.language or "en"]
        self._flux_send(session, message, delay)

    def _flux_audio(self, session: _Session, data: bytes) -> None:
        """Flux's turn detection, by energy over 20 ms frames of new audio."""
        session.buf += data
        frame_bytes = int(session.sample_rate * FRAME_SECS) * 2  # Flux takes linear16 only
        eager = session.q("eager_eot_threshold") is not None
        while len(session.buf) >= frame_bytes:
            frame = bytes(session.buf[:frame_bytes])
            del session.buf[:frame_bytes]
            session.audio_time += FRAME_SECS
            loud = pcm16_rms(frame) >= self.energy_threshold
            turn = session.turn
            if loud:
                now = time.monotonic()
                if turn is None:
                    if not self._script:
                        self.unscripted_bursts += 1
                        continue
                    item = self._script.pop(0)
                    turn = session.turn = _FluxTurn(
                        start=session.audio_time - FRAME_SECS,
                        parts=_parts_of(item),
                        language=item[1] if isinstance(item, tuple) else None,
                        last_update=session.audio_time,
                    )
                    self.speech_started_at.append(now)
                    self._flux_turn_info(session, turn, "StartOfTurn", 0.02)
                elif turn.silence + 1e-9 >= self.eager_silence_secs:
                    # Speech after a pause: a guess withdrawn (on the words it was on),
                    # then the next part of the turn.
                    if turn.eager_sent:
                        turn.eager_sent = False
                        self._flux_turn_info(session, turn, "TurnResumed", 0.1)
                    turn.heard = min(turn.heard + 1, len(turn.parts))
                turn.silence = 0.0
                turn.last_speech = session.audio_time
                turn.last_speech_wall = now
                if session.audio_time - turn.last_update + 1e-9 >= self.update_secs:
                    turn.last_update = session.audio_time
                    self._flux_turn_info(session, turn, "Update", 0.1)
                continue
            if turn is None:
                continue
            turn.silence += FRAME_SECS
            if eager and not turn.eager_sent and turn.silence + 1e-9 >= self.eager_silence_secs:
                turn.eager_sent = True
                self._flux_turn_info(session, turn, "EagerEndOfTurn", 0.6, self.final_delay)
            unfinished = self.eot_waits_for_all_parts and turn.heard < len(turn.parts)
            if turn.silence + 1e-9 >= (self.eot_timeout_secs if unfinished else self.silence_secs):
                session.turn = None
                self.speech_ended_at.append(turn.last_speech_wall)
                self._flux_turn_info(session, turn, "EndOfTurn", 0.9, self.final_delay)
                session.turn_index += 1

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_interim(self, session: _Session, burst: _Burst) -> None:
        """The burst's whole text as an interim, ``end_interim_delay`` after its speech."""
        await asyncio.sleep(self.end_interim_delay or 0.0)
        if burst.finalized:
            return
        text = self._burst_text(burst)
        if text and self.end_interim_text is not None:
            text = self.end_interim_text(text)
        if text:
            await self._send_results(session, text, is_final=False, language=burst.language)

    def _burst_text(self, burst: _Burst) -> str | None:
        """The scripted transcript of a burst, taken from the script on first use."""
        if burst.text is None and self._script:
            item = self._script.pop(0)
            burst.text = _text_of(item)
            burst.language = item[1] if isinstance(item, tuple) else None
        return burst.text

    def _want_vad_events(self, session: _Session) -> bool:
        if self.send_vad_events is not None:
            return self.send_vad_events
        return session.q("vad_events") == "true"

    def _want_utterance_end(self, session: _Session) -> bool:
        if self.send_utterance_end is not None:
            return self.send_utterance_end
        return session.q("utterance_end_ms") not in (None, "", "None")

    async def _send(self, session: _Session, message: dict[str, Any]) -> None:
        """Sends one JSON message, ignoring a closed socket."""
        with contextlib.suppress(Exception):
            await session.ws.send(json.dumps(message))

    async def _send_results(
        self,
        session: _Session,
        text: str,
        *,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
        word_span: tuple[float, float] | None = None,
        end: float | None = None,
        language: str | None = None,
    ) -> None:
        """Sends one ``Results`` message in Deepgram's shape."""
        start = session.cursor
        end = max(session.audio_time if end is None else end, start)
        if is_final:
            session.cursor = end
        w_start, w_end = word_span or (start, end)
        tokens = text.split()
        step = (w_end - w_start) / max(len(tokens), 1)
        words = [
            {
                "word": re.sub(r"[^\w']", "", tok).lower() or tok,
                "start": round(w_start + i * step, 3),
                "end": round(w_start + (i + 1) * step, 3),
                "confidence": 0.98,
                "punctuated_word": tok,
            }
            for i, tok in enumerate(tokens)
        ]
        alternative: dict[str, Any] = {
            "transcript": text,
            "confidence": 0.98 if text else 0.0,
            "words": words,
        }
        if session.q("language") == "multi" and text:
            tag = language or "en"
            alternative["languages"] = [tag]
            for word in words:
                word["language"] = tag
        message: dict[str, Any] = {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final if is_final else False,
            "channel": {"alternatives": [alternative]},
            "metadata": {
                "request_id": session.request_id,
                "model_info": {
                    "name": session.q("model", "nova-3") or "nova-3",
                    "version": "2025-01-01.0",
                    "arch": "nova-3",
                },
                "model_uuid": MODEL_UUID,
            },
            "from_finalize": from_finalize,
        }
        await self._send(session, message)
        if not text:
            return
        if is_final:
            self.transcripts_sent.append(text)
            self.final_sent_at.append(time.monotonic())
        else:
            self.interims_sent.append(text)

    async def _send_metadata(self, session: _Session) -> None:
        """Sends the closing ``Metadata`` message."""
        await self._send(
            session,
            {
                "type": "Metadata",
                "transaction_key": "deprecated",
                "request_id": session.request_id,
                "sha256": uuid.uuid4().hex * 2,
                "created": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "duration": round(session.audio_time, 3),
                "channels": 1,
                "models": [MODEL_UUID],
                "model_info": {
                    MODEL_UUID: {
                        "name": "general-nova-3",
                        "version": "2025-01-01.0",
                        "arch": "nova-3",
                    }
                },
            },
        )


#: One scripted utterance: its text, ``(text, language)``, or (Flux) a turn's parts.
ScriptItem = str | tuple[str, str] | list[str]


def _text_of(item: ScriptItem) -> str:
    """The transcript of a script item."""
    if isinstance(item, list):
        return " ".join(item)
    return item[0] if isinstance(item, tuple) else item


def _parts_of(item: ScriptItem) -> list[str]:
    """The parts of a scripted Flux turn (one unless it is a list)."""
    if isinstance(item, list):
        return list(item) or [""]
    return [_text_of(item)]


def _prefix(text: str) -> str:
    """Roughly the first half of an utterance's words (what an interim would hold)."""
    words = text.split()
    return " ".join(words[: max(1, (len(words) + 1) // 2)])

"""Offline tests proving the local vendor fakes speak the real wire protocols."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
import openai
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADState
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InterimTranscriptionFrame,
    LLMContextFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.llm_service import FunctionCallParams
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.tests.utils import SleepFrame, run_test
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner
from twilio.base.exceptions import TwilioRestException
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from core.settings import Settings
from telephony.twilio import twilio_client
from tests.fakes._util import wait_until
from tests.fakes.audio import (
    alaw_to_pcm16,
    line_noise_ulaw,
    pcm16_rms,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    silence_ulaw,
    speech_ulaw,
    ulaw_to_pcm16,
)
from tests.fakes.deepgram_stt import FakeDeepgramSTT
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI, call_tool, call_tools, fail, say
from tests.fakes.twilio_media import TwilioMediaClient
from tests.fakes.twilio_rest import FakeTwilioREST

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "fake-token"
PARAMS_8K = PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000)


# --- audio -----------------------------------------------------------------------------


def test_ulaw_round_trip() -> None:
    """Every mu-law code survives decode/encode; PCM survives within quantisation."""
    codes = bytes(range(256))
    again = pcm16_to_ulaw(ulaw_to_pcm16(codes))
    assert [i for i in range(256) if again[i] != codes[i]] == [0x7F]  # -0 encodes as +0
    assert ulaw_to_pcm16(b"\xff\x00\x80") == np.array([0, -32124, 32124], "<i2").tobytes()
    pcm = (np.sin(np.arange(800) / 5) * 20000).astype("<i2")
    back = np.frombuffer(ulaw_to_pcm16(pcm16_to_ulaw(pcm.tobytes())), "<i2")
    err = np.abs(back.astype(int) - pcm.astype(int))
    assert np.all(err <= np.abs(pcm.astype(int)) * 0.07 + 8)
    assert silence_ulaw(0.02) == b"\xff" * 160
    assert pcm16_to_alaw(alaw_to_pcm16(codes)) == codes
    assert len(speech_ulaw(1.0)) == 8000


async def test_silero_vad_detects_speech_ulaw() -> None:
    """Silero at 8 kHz goes to SPEAKING on speech_ulaw and back to QUIET on silence."""
    for freq in (110.0, 220.0):
        vad = SileroVADAnalyzer()
        vad.set_sample_rate(8000)
        audio = silence_ulaw(0.3) + speech_ulaw(1.0, freq=freq) + silence_ulaw(0.6)
        pcm = ulaw_to_pcm16(audio)
        states = [await vad.analyze_audio(pcm[i : i + 320]) for i in range(0, len(pcm), 320)]
        assert states[10] == VADState.QUIET
        assert VADState.SPEAKING in states
        assert states[-1] == VADState.QUIET


# --- OpenAI ----------------------------------------------------------------------------


async def test_openai_sdk_streams_text_tools_and_errors() -> None:
    """The official AsyncOpenAI client parses the fake's SSE chunks."""
    script = [
        say("Hi there, how can I help?"),
        call_tools([("lookup", {"phone": "+15550100"}), ("slots", {"day": "mon"})]),
        fail(500, retryable=False),
        lambda body: say(f"{len(body['messages'])} messages"),
    ]
    async with FakeOpenAI(script, api_key="sk-test") as fake:
        assert fake.base_url.endswith("/v1")
        client = openai.AsyncOpenAI(api_key="sk-test", base_url=fake.base_url)
        msgs = [{"role": "user", "content": "hello"}]

        async def collect() -> tuple[str, dict[int, dict[str, str]], list[str | None], object]:
            stream = await client.chat.completions.create(
                model="gpt-4o",
                messages=msgs,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
            )
            text, calls, finishes, usage = "", {}, [], None
            async for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    finishes.append(choice.finish_reason)
                    for tc in choice.delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                        slot["id"] += tc.id or ""
                        slot["name"] += (tc.function and tc.function.name) or ""
                        slot["args"] += (tc.function and tc.function.arguments) or ""
            return text, calls, finishes, usage

        text, calls, finishes, usage = await collect()
        assert text == "Hi there, how can I help?"
        assert finishes[-1] == "stop" and usage is not None and usage.total_tokens > 0

        text, calls, finishes, _ = await collect()
        assert finishes[-1] == "tool_calls"
        assert [c["name"] for c in calls.values()] == ["lookup", "slots"]
        assert json.loads(calls[0]["args"]) == {"phone": "+15550100"}
        assert calls[1]["id"].startswith("call_")

        with pytest.raises(openai.InternalServerError):
            await collect()
        assert (await collect())[0] == "1 messages"
        assert (await collect())[0] == "Is there anything else?"  # script exhausted

        bad = openai.AsyncOpenAI(api_key="wrong", base_url=fake.base_url, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o", messages=msgs)  # type: ignore[arg-type]
        assert len(fake.requests) == 5
        assert fake.requests[0]["stream_options"] == {"include_usage": True}


async def test_openai_fake_with_pipecat_llm_service() -> None:
    """Pipecat's OpenAILLMService streams text and runs a tool handler against the fake."""
    async with FakeOpenAI([call_tool("get_time", {"tz": "UTC"}), say("It is noon.")]) as fake:
        llm = OpenAILLMService(
            api_key="sk-test",
            base_url=fake.base_url,
            settings=OpenAILLMService.Settings(model="gpt-4o"),
        )
        got: list[dict] = []

        async def get_time(params: FunctionCallParams) -> None:
            got.append(dict(params.arguments))
            await params.result_callback({"time": "12:00"})

        llm.register_function("get_time", get_time)
        context = LLMContext(messages=[{"role": "user", "content": "What time is it?"}])
        await run_test(llm, frames_to_send=[LLMContextFrame(context)])
        assert got == [{"tz": "UTC"}]
        down, _ = await run_test(llm, frames_to_send=[LLMContextFrame(context)])
        text = "".join(f.text for f in down if isinstance(f, LLMTextFrame))
        assert text == "It is noon."
        assert fake.requests[0]["stream"] is True
        assert fake.requests[0]["model"] == "gpt-4o"


# --- Twilio REST -----------------------------------------------------------------------


def _settings(base_url: str, token: str = AUTH_TOKEN) -> Settings:
    return Settings(
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=token,
        TWILIO_API_BASE_URL=base_url,
        TWILIO_PHONE_NUMBER="+15550001111",
    )


async def test_twilio_rest_fake_with_bot_twilio_client() -> None:
    """telephony.twilio.twilio_client creates and updates calls on the fake."""
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as fake:
        client = twilio_client(_settings(fake.base_url))
        call = await asyncio.to_thread(
            client.calls.create,
            to="+15550002222",
            from_="+15550001111",
            url="https://example.test/twiml",
            status_callback="https://example.test/status",
            status_callback_event=["initiated", "answered", "completed"],
            machine_detection="Enable",
        )
        assert call.sid and call.sid.startswith("CA") and len(call.sid) == 34
        assert call.status == "queued" and call.to == "+15550002222"
        method, path, form = fake.requests[0]
        assert (method, path) == ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json")
        assert form["To"] == "+15550002222" and form["MachineDetection"] == "Enable"
        assert fake.form_lists[0]["StatusCallbackEvent"] == ["initiated", "answered", "completed"]

        updated = await asyncio.to_thread(
            client.calls(call.sid).update, twiml="<Response><Hangup/></Response>"
        )
        assert updated.sid == call.sid
        done = await asyncio.to_thread(client.calls(call.sid).update, status="completed")
        assert done.status == "completed"
        assert fake.requests[-1].form == {"Status": "completed"}

        fake.fail_next_creates(1, status=400, code=21211)
        with pytest.raises(TwilioRestException) as err:
            await asyncio.to_thread(
                client.calls.create, to="bad", from_="+15550001111", url="https://x.test/"
            )
        assert err.value.code == 21211 and err.value.status == 400

        wrong = twilio_client(_settings(fake.base_url, token="nope"))
        with pytest.raises(TwilioRestException) as err:
            await asyncio.to_thread(wrong.calls(call.sid).fetch)
        assert err.value.status == 401 and fake.auth_failures == 1


async def test_twilio_rest_fake_counts_in_flight_creates() -> None:
    """create_delay keeps creates in flight so concurrency caps can be observed."""
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN, create_delay=0.2) as fake:
        client = twilio_client(_settings(fake.base_url))

        def create() -> str:
            call = client.calls.create(to="+15550002222", from_="+15550001111", twiml="<Response/>")
            return str(call.sid)

        sids = await asyncio.gather(*(asyncio.to_thread(create) for _ in range(3)))
        assert len(set(sids)) == 3 and set(fake.created) == set(sids)
        assert fake.max_in_flight == 3 and fake.in_flight == 0


async def test_twilio_rest_fake_takes_pipecat_serializer_hang_up() -> None:
    """TwilioFrameSerializer(base_url=fake.base_url) hangs up through the fake on EndFrame."""
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as fake:
        call_sid = "CA" + "2" * 32
        serializer = TwilioFrameSerializer(
            "MZ" + "3" * 32,
            call_sid=call_sid,
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            base_url=fake.base_url,
        )
        await serializer.serialize(EndFrame())
        assert fake.requests_to("POST", f"/Calls/{call_sid}.json")[0].form == {
            "Status": "completed"
        }
        assert fake.calls[call_sid]["status"] == "completed"


# --- Deepgram STT ----------------------------------------------------------------------


def _audio_frames(ulaw: bytes) -> list[InputAudioRawFrame]:
    pcm = ulaw_to_pcm16(ulaw)
    return [InputAudioRawFrame(pcm[i : i + 320], 8000, 1) for i in range(0, len(pcm), 320)]


async def test_deepgram_stt_fake_with_pipecat_service() -> None:
    """DeepgramSTTService gets one interim and one final per scripted utterance."""
    async with FakeDeepgramSTT(["Hi, this is Maria", "I need an oil change"], api_key="dg") as fake:
        stt = DeepgramSTTService(
            api_key="dg",
            base_url=fake.url,
            settings=DeepgramSTTService.Settings(
                model="nova-3-general", keyterm=["Civic", "oil change"], utterance_end_ms=1000
            ),
        )
        audio = speech_ulaw(0.8) + silence_ulaw(0.5) + speech_ulaw(0.6, seed=3) + silence_ulaw(0.5)
        down, _ = await run_test(
            stt,
            frames_to_send=[*_audio_frames(audio), SleepFrame(sleep=0.2)],
            pipeline_params=PARAMS_8K,
        )
        got = [
            (type(f).__name__, f.text)
            for f in down
            if isinstance(f, TranscriptionFrame | InterimTranscriptionFrame)
        ]
        assert got == [
            ("InterimTranscriptionFrame", "Hi, this"),
            ("TranscriptionFrame", "Hi, this is Maria"),
            ("InterimTranscriptionFrame", "I need an"),
            ("TranscriptionFrame", "I need an oil change"),
        ]
        query = fake.last_query
        assert (query["encoding"], query["sample_rate"], query["model"]) == (
            "linear16",
            "8000",
            "nova-3-general",
        )
        assert fake.queries[0]["keyterm"] == ["Civic", "oil change"]
        assert len(fake.audio) == len(audio) * 2  # linear16
        assert fake.transcripts_sent == ["Hi, this is Maria", "I need an oil change"]
        assert len(fake.speech_ended_at) == len(fake.final_sent_at) == 2
        assert fake.control_messages[-1] == {"type": "CloseStream"}


async def test_deepgram_stt_fake_raw_protocol() -> None:
    """Finalize, SpeechStarted, UtteranceEnd and on-demand interims over a raw socket."""
    async with FakeDeepgramSTT(["book me in"]) as fake:
        url = f"{fake.url}/v1/listen?encoding=mulaw&sample_rate=8000&vad_events=true"
        async with connect(url + "&utterance_end_ms=1000") as ws:
            await ws.send(speech_ulaw(0.5))
            started = json.loads(await ws.recv())
            assert started["type"] == "SpeechStarted"
            interim = json.loads(await ws.recv())
            assert (interim["is_final"], interim["channel"]["alternatives"][0]["transcript"]) == (
                False,
                "book me",
            )
            await ws.send(json.dumps({"type": "Finalize"}))
            final = json.loads(await ws.recv())
            assert final["from_finalize"] is True and final["is_final"] is True
            assert final["channel"]["alternatives"][0]["transcript"] == "book me in"
            assert [w["word"] for w in final["channel"]["alternatives"][0]["words"]] == [
                "book",
                "me",
                "in",
            ]
            await ws.send(silence_ulaw(0.4))
            assert json.loads(await ws.recv())["type"] == "UtteranceEnd"
            await ws.send(json.dumps({"type": "Finalize"}))
            empty = json.loads(await ws.recv())
            assert empty["channel"]["alternatives"][0]["transcript"] == ""
            assert await fake.send_interim("wait") == 1
            assert json.loads(await ws.recv())["channel"]["alternatives"][0]["transcript"] == "wait"
            await ws.send(json.dumps({"type": "CloseStream"}))
            assert json.loads(await ws.recv())["type"] == "Metadata"
        assert fake.finalize_count == 2 and fake.interims_sent == ["book me", "wait"]


# --- Deepgram TTS ----------------------------------------------------------------------


async def test_deepgram_tts_fake_with_pipecat_service() -> None:
    """DeepgramTTSService receives audio sized by text length, then Flushed."""
    async with FakeDeepgramTTS(api_key="dg", first_byte_delay=0.05) as fake:
        tts = DeepgramTTSService(api_key="dg", base_url=fake.url)
        down, _ = await run_test(
            tts,
            frames_to_send=[TTSSpeakFrame("Hello there, how are you?"), SleepFrame(sleep=0.3)],
            pipeline_params=PARAMS_8K,
        )
        audio = b"".join(f.audio for f in down if isinstance(f, TTSAudioRawFrame))
        assert len(audio) == round(fake.audio_secs("Hello there, how are you? ") * 8000) * 2
        assert any(isinstance(f, TTSStoppedFrame) for f in down)
        assert fake.texts == ["Hello there, how are you? "]
        assert fake.last_query == {
            "model": "aura-2-helena-en",
            "encoding": "linear16",
            "sample_rate": "8000",
        }
        assert fake.connections == 1 and fake.open_connections == 0
        assert fake.first_audio_sent_at[0] - fake.flush_received_at[0] >= 0.05


async def test_deepgram_tts_fake_clear_and_encodings() -> None:
    """Clear drops pending audio; mulaw at 8 kHz gives one byte per sample."""
    async with FakeDeepgramTTS(chunk_delay=0.005) as fake:
        url = f"{fake.url}/v1/speak?model=aura-2-x&encoding=mulaw&sample_rate=8000"
        async with connect(url) as ws:
            assert json.loads(await ws.recv())["type"] == "Metadata"
            await ws.send(json.dumps({"type": "Speak", "text": "x" * 100}))
            await ws.send(json.dumps({"type": "Flush"}))
            assert isinstance(await ws.recv(), bytes)
            await ws.send(json.dumps({"type": "Clear"}))
            while isinstance(msg := await ws.recv(), bytes):
                pass
            assert json.loads(msg) == {"type": "Cleared", "sequence_id": 0}
            await ws.send(json.dumps({"type": "Speak", "text": "Hi."}))
            await ws.send(json.dumps({"type": "Flush"}))
            audio = b""
            while isinstance(msg := await ws.recv(), bytes):
                audio += msg
            assert json.loads(msg) == {"type": "Flushed", "sequence_id": 0}
            assert len(audio) == round(fake.audio_secs("Hi.") * 8000)
            await ws.send(json.dumps({"type": "Close"}))
        assert fake.clears == 1 and fake.texts == ["x" * 100, "Hi."]


# --- Twilio media stream client --------------------------------------------------------


class _Echo(FrameProcessor):
    """Plays caller audio straight back, as bot audio."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(frame.audio, frame.sample_rate, frame.num_channels)
            )
        elif isinstance(frame, InputDTMFFrame):
            await self.push_interruption_task_frame_and_wait()
        else:
            await self.push_frame(frame, direction)


async def _serve_pipecat_echo(starts: list[dict]) -> tuple[uvicorn.Server, asyncio.Task, str]:
    """A FastAPI /twilio/media endpoint running Pipecat's Twilio transport around _Echo."""
    app = FastAPI()

    @app.websocket("/twilio/media")
    async def media(websocket: WebSocket) -> None:
        await websocket.accept()
        _, call = await parse_telephony_websocket(websocket)
        starts.append({"stream": call.stream_id, "call": call.call_id, "body": call.body})
        serializer = TwilioFrameSerializer(
            stream_sid=call.stream_id,
            call_sid=call.call_id,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
        )
        transport = FastAPIWebsocketTransport(
            websocket,
            FastAPIWebsocketParams(
                audio_in_enabled=True, audio_out_enabled=True, serializer=serializer
            ),
        )
        worker = PipelineWorker(
            Pipeline([transport.input(), _Echo(), transport.output()]),
            params=PARAMS_8K,
            enable_rtvi=False,
        )

        @transport.event_handler("on_client_disconnected")
        async def _gone(*_: object) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, 5.0)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, task, f"ws://127.0.0.1:{port}/twilio/media"


async def test_twilio_media_client_with_pipecat_twilio_transport() -> None:
    """Pipecat's Twilio serializer parses the client's start/media; bot audio is recorded."""
    starts: list[dict] = []
    server, task, url = await _serve_pipecat_echo(starts)
    try:
        client = TwilioMediaClient(url, custom_parameters={"token": "t0k", "customer_id": "42"})
        async with client:
            await asyncio.sleep(0.3)
            assert client.received and not any(m.voiced for m in client.received)  # silence
            spoke_at = time.monotonic()
            end = await client.send_audio(speech_ulaw(0.6))
            assert 0.5 <= end - spoke_at <= 1.5  # paced in real time
            first = await client.wait_for_bot_audio(min_seconds=0.4, timeout=5, since=spoke_at)
            assert first == client.first_bot_audio_after(spoke_at)
            await client.wait_for_bot_silence(silence_secs=0.2, timeout=5)
            await client.send_dtmf("1")
            await client.wait_for_clear(since=end, timeout=5)
        assert starts == [
            {
                "stream": client.stream_sid,
                "call": client.call_sid,
                "body": {"token": "t0k", "customer_id": "42"},
            }
        ]
        assert client.stream_sid.startswith("MZ") and client.call_sid.startswith("CA")
        assert client.closed and client.frames_sent >= 40
    finally:
        server.should_exit = True
        await task


async def test_twilio_media_client_protocol_and_marks() -> None:
    """Message shapes, mark echo after playback, and the server's close code."""
    got: list[dict] = []
    waited: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        for _ in range(4):
            got.append(json.loads(await ws.recv()))
        stream = got[1]["streamSid"]
        speech = base64.b64encode(speech_ulaw(0.2)).decode()
        await ws.send(
            json.dumps({"event": "media", "streamSid": stream, "media": {"payload": speech}})
        )
        await ws.send(json.dumps({"event": "mark", "streamSid": stream, "mark": {"name": "m1"}}))
        sent_mark = time.monotonic()
        while (msg := json.loads(await ws.recv()))["event"] != "mark":
            pass
        waited.append(time.monotonic() - sent_mark)
        got.append(msg)
        await ws.close(4000, "bye")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = TwilioMediaClient(f"ws://127.0.0.1:{port}", custom_parameters={"a": "b"})
        await client.connect()
        assert await client.wait_closed(timeout=5) == 4000
        await client.close()
    connected, start, media1, media2, echoed = got
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    assert start["start"]["customParameters"] == {"a": "b"}
    assert (media1["media"]["chunk"], media2["media"]["chunk"]) == ("1", "2")
    assert (media1["media"]["timestamp"], media2["media"]["timestamp"]) == ("0", "20")
    assert len(base64.b64decode(media1["media"]["payload"])) == 160
    assert int(media2["sequenceNumber"]) == int(media1["sequenceNumber"]) + 1
    assert echoed["mark"] == {"name": "m1"} and client.marks_echoed == ["m1"]
    assert waited[0] >= 0.15  # echoed once the 0.2 s of audio before it had played
    assert client.marks[0][0] == "m1" and client.bot_audio_secs() == pytest.approx(0.2)
    assert client.close_reason == "bye"


@pytest.mark.parametrize("dbfs", [-60.0, -50.0])
async def test_idle_caller_sends_line_noise_at_its_level(dbfs: float) -> None:
    """``idle_audio``: the client's idle frames are the line noise, looped, at its level."""
    noise = line_noise_ulaw(0.1, dbfs=dbfs, seed=1)
    got: list[bytes] = []

    async def handler(ws: ServerConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg["event"] == "media":
                got.append(base64.b64decode(msg["media"]["payload"]))
            if len(got) == 12:
                await ws.close()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = TwilioMediaClient(f"ws://127.0.0.1:{port}", idle_audio=noise)
        await client.connect()
        await client.wait_closed(timeout=5)
        await client.close()
    assert len(got) == 12 and set(got) <= {noise[i : i + 160] for i in range(0, 800, 160)}
    assert len(set(got)) == 5  # all five frames of the 0.1 s, looped
    rms_dbfs = 20 * np.log10(pcm16_rms(ulaw_to_pcm16(b"".join(got))) / 32768)
    assert rms_dbfs == pytest.approx(dbfs, abs=1.5)

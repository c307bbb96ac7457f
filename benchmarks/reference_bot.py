"""The reference of ``benchmarks/capacity.py``: a phone bot assembled the way Pipecat's
``twilio-chatbot`` example assembles it, on the same wire-protocol fakes.

Per call: Twilio serializer and FastAPI websocket transport, Deepgram STT, a stock
``SileroVADAnalyzer()`` and ``LocalSmartTurnAnalyzerV3()`` built for the call (the example
does that: each call loads its own ONNX sessions), OpenAI LLM, Deepgram TTS, the
universal context aggregators, ``PipelineWorker`` + ``WorkerRunner``; none of this
project's processors, flows, tools, database or Redis.

Run: ``python benchmarks/reference_bot.py --port 8100 --workers 2`` with
``OPENAI_BASE_URL``, ``DEEPGRAM_STT_URL``, ``DEEPGRAM_TTS_URL`` pointing at the fakes.
``POST /twilio/voice`` answers the TwiML of a stream to ``/ws``, so the benchmark drives
both servers with the same client.
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.services.deepgram.stt import DeepgramSTTService
from pipecat.services.deepgram.tts import DeepgramTTSService
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.turns.user_stop import TurnAnalyzerUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies
from pipecat.workers.runner import WorkerRunner

SYSTEM = (
    "You are a friendly assistant on a phone call. Keep your answers short; your output "
    "is converted to audio."
)

# The benchmark runs both servers at WARNING (Pipecat's DEBUG logs cost CPU).
logger.remove()
logger.add(sys.stderr, level="WARNING")

app = FastAPI()


@app.post("/twilio/voice")
async def twilio_voice(request: Request) -> Response:
    """TwiML connecting the call to ``/ws`` (the example's TwiML bin)."""
    host = request.headers.get("host", "127.0.0.1")
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="ws://{host}/ws"></Stream></Connect></Response>'
    )
    return Response(content=twiml, media_type="application/xml")


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    """One call, as the example runs it."""
    await websocket.accept()
    _, call = await parse_telephony_websocket(websocket)
    serializer = TwilioFrameSerializer(
        stream_sid=call.stream_id,
        call_sid=call.call_id,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=False),
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    stt = DeepgramSTTService(
        api_key=os.environ["DEEPGRAM_API_KEY"], base_url=os.environ["DEEPGRAM_STT_URL"]
    )
    tts = DeepgramTTSService(
        api_key=os.environ["DEEPGRAM_API_KEY"],
        base_url=os.environ["DEEPGRAM_TTS_URL"],
        encoding="linear16",
    )
    llm = OpenAILLMService(
        api_key=os.environ["OPENAI_API_KEY"],
        base_url=os.environ["OPENAI_BASE_URL"],
        settings=OpenAILLMService.Settings(model="gpt-4o", system_instruction=SYSTEM),
    )
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(
        context,
        user_params=LLMUserAggregatorParams(
            vad_analyzer=SileroVADAnalyzer(),
            user_turn_strategies=UserTurnStrategies(
                stop=[TurnAnalyzerUserTurnStopStrategy(turn_analyzer=LocalSmartTurnAnalyzerV3())]
            ),
        ),
    )
    pipeline = Pipeline(
        [
            transport.input(),
            stt,
            aggregators.user(),
            llm,
            tts,
            transport.output(),
            aggregators.assistant(),
        ]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=8000,
            audio_out_sample_rate=8000,
            enable_metrics=True,
            enable_usage_metrics=True,
        ),
    )

    @transport.event_handler("on_client_connected")
    async def on_client_connected(_transport, _client) -> None:
        context.add_message({"role": "user", "content": "Say hello and introduce yourself."})
        await worker.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(_transport, _client) -> None:
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


@app.get("/health")
async def health() -> dict[str, str]:
    """Liveness for the benchmark."""
    return {"status": "ok"}


def main() -> int:
    """Serve the reference bot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(
        "benchmarks.reference_bot:app",
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

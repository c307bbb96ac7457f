"""Latency observer: one scripted turn → one TurnLatency, one observation per histogram."""

from __future__ import annotations

import json
import time

from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.worker import PipelineParams
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from core.metrics import call_finished, call_started, render_metrics, sample
from processors.latency import LatencyObserver, TurnLatency

HISTOGRAMS = (
    "voice_agent_voice_to_voice_seconds",
    "voice_agent_stt_seconds",
    "voice_agent_llm_ttft_seconds",
    "voice_agent_tts_ttfb_seconds",
)


class Passthrough(FrameProcessor):
    """Stands in for the pipeline; the observer sees every push."""

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def _ttfb(processor: str, value: float) -> MetricsFrame:
    return MetricsFrame(data=[TTFBMetricsData(processor=processor, value=value)])


def _scripted_turn(tool_result: dict) -> list:
    return [
        VADUserStartedSpeakingFrame(),
        SleepFrame(sleep=0.05),
        VADUserStoppedSpeakingFrame(stop_secs=0.2, timestamp=time.time() + 0.05),
        SleepFrame(sleep=0.05),
        TranscriptionFrame(text="I need an oil change", user_id="caller", timestamp="now"),
        _ttfb("DeepgramSTTService#0", 0.12),
        LLMFullResponseStartFrame(),
        SleepFrame(sleep=0.05),
        _ttfb("OpenAILLMService#0", 0.34),
        FunctionCallInProgressFrame(
            function_name="find_slots", tool_call_id="call-1", arguments={}
        ),
        SleepFrame(sleep=0.05),
        FunctionCallResultFrame(
            function_name="find_slots", tool_call_id="call-1", arguments={}, result=tool_result
        ),
        LLMTextFrame(text="Sure"),
        SleepFrame(sleep=0.05),
        _ttfb("DeepgramTTSService#0", 0.15),
        TTSAudioRawFrame(audio=b"\x00\x00" * 160, sample_rate=8000, num_channels=1),
        SleepFrame(sleep=0.05),
        BotStartedSpeakingFrame(),
        SleepFrame(sleep=0.2),
    ]


async def test_scripted_turn_breakdown_and_histograms() -> None:
    before = {h: sample(f"{h}_count") for h in HISTOGRAMS}
    tool_before = sample("voice_agent_tool_seconds_count", {"tool": "find_slots"})
    errors_before = sample("voice_agent_tool_errors_total", {"tool": "find_slots"})
    seen: list[TurnLatency] = []
    observer = LatencyObserver(call_sid="CA-test", on_turn=seen.append)

    await run_test(
        Passthrough(),
        frames_to_send=_scripted_turn({"ok": True, "slots": []}),
        observers=[observer],
        pipeline_params=PipelineParams(enable_metrics=True),
    )

    assert len(observer.turns) == 1 and seen == observer.turns
    turn = observer.turns[0]
    for h in HISTOGRAMS:
        assert sample(f"{h}_count") == before[h] + 1, h
    assert sample("voice_agent_tool_seconds_count", {"tool": "find_slots"}) == tool_before + 1
    assert sample("voice_agent_tool_errors_total", {"tool": "find_slots"}) == errors_before

    assert turn.stt_secs == 0.12 and turn.llm_ttft_secs == 0.34 and turn.tts_ttfb_secs == 0.15
    # Caller silence started 0.2 s (stop_secs) before the VAD decided.
    stt, llm, tts, out = (
        turn.stt_final_at_secs,
        turn.llm_first_token_at_secs,
        turn.tts_first_audio_at_secs,
        turn.transport_first_audio_at_secs,
    )
    assert stt is not None and llm is not None and tts is not None and out is not None
    assert 0.15 < stt < llm < tts < out == turn.voice_to_voice_secs
    assert 0.35 < turn.voice_to_voice_secs < 1.5
    assert [(t.name, t.status) for t in turn.tools] == [("find_slots", "ok")]
    assert 0.04 < turn.tools[0].secs < 0.5

    data = json.loads(json.dumps(observer.to_json()))
    assert data[0]["turn"] == 1 and data[0]["tools"][0]["name"] == "find_slots"
    assert observer.summary()["turns"] == 1
    line = turn.log_line()
    assert "oil change" not in line and "v2v=" in line and "find_slots" in line


async def test_tool_error_counted_and_greeting_is_not_a_turn() -> None:
    errors_before = sample("voice_agent_tool_errors_total", {"tool": "find_slots"})
    observer = LatencyObserver()
    await run_test(
        Passthrough(),
        frames_to_send=[
            BotStartedSpeakingFrame(),  # greeting: no caller turn before it
            SleepFrame(sleep=0.05),
            *_scripted_turn({"ok": False, "error": "internal", "say": "Sorry."}),
        ],
        observers=[observer],
        pipeline_params=PipelineParams(enable_metrics=True),
    )
    assert len(observer.turns) == 1
    assert observer.turns[0].tools[0].status == "error"
    assert sample("voice_agent_tool_errors_total", {"tool": "find_slots"}) == errors_before + 1


def test_render_metrics_exposes_the_names() -> None:
    call_started()
    call_finished("inbound", "booked")
    body, content_type = render_metrics()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in (
        *HISTOGRAMS,
        "voice_agent_tool_seconds",
        "voice_agent_calls_total",
        "voice_agent_interruptions_total",
        "voice_agent_tool_errors_total",
        "voice_agent_active_calls",
        "voice_agent_snapshot_failures_total",
    ):
        assert f"# TYPE {name} " in text, name
    assert 'voice_agent_calls_total{direction="inbound",outcome="booked"}' in text
    assert 'le="0.05"' in text and 'le="5.0"' in text

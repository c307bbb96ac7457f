"""SpokenTextAligner: sentence text travels right behind the audio that speaks it."""

from __future__ import annotations

from pipecat.frames.frames import (
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.tests.utils import SleepFrame, run_test

from processors.spoken_text import SpokenTextAligner

RATE = 8000


def audio(secs: float) -> TTSAudioRawFrame:
    return TTSAudioRawFrame(b"\x00\x00" * int(RATE * secs), RATE, 1)


def order(frames) -> list[str]:
    """Frames as 'a' (100 ms of audio) or the text, in arrival order."""
    out = []
    for f in frames:
        if isinstance(f, TTSTextFrame):
            out.append(f.text)
        elif isinstance(f, TTSAudioRawFrame):
            out.append("a")
    return out


async def test_text_is_released_after_its_estimated_audio() -> None:
    # 10 chars/s: "One two." (8 chars) ends at 0.8 s, "Three four five." (16) at 2.4 s.
    aligner = SpokenTextAligner(chars_per_sec=10.0, learn=False)
    frames = [
        TTSStartedFrame(),
        TTSTextFrame("One two.", text_type="sentence"),
        TTSTextFrame("Three four five.", text_type="sentence"),
        *[audio(0.1) for _ in range(30)],
        TTSStoppedFrame(),
    ]
    down, _ = await run_test(aligner, frames_to_send=frames)
    got = order(down)
    assert got.index("One two.") == 8  # after the 8th 100 ms audio frame
    assert got.index("Three four five.") == 25  # 24 audio frames + the first text
    assert got.count("a") == 30


async def test_an_interruption_drops_the_unplayed_text() -> None:
    aligner = SpokenTextAligner(chars_per_sec=10.0, learn=False)
    frames = [
        TTSStartedFrame(),
        TTSTextFrame("One two.", text_type="sentence"),
        TTSTextFrame("Three four five.", text_type="sentence"),
        *[audio(0.1) for _ in range(12)],
        SleepFrame(sleep=0.2),  # let the queued frames through before the system frame
        InterruptionFrame(),
        TTSStoppedFrame(),
    ]
    down, _ = await run_test(aligner, frames_to_send=frames)
    texts = [f.text for f in down if isinstance(f, TTSTextFrame)]
    assert texts == ["One two."]


async def test_rest_of_the_text_goes_out_with_the_end_of_the_utterance() -> None:
    # The estimate is too slow for this voice: the last sentence still goes out, before
    # TTSStoppedFrame, and the next utterance uses the learnt, faster rate.
    aligner = SpokenTextAligner(chars_per_sec=5.0)
    frames = [
        TTSStartedFrame(),
        TTSTextFrame("A first sentence of some length.", text_type="sentence"),
        *[audio(0.1) for _ in range(20)],
        TTSStoppedFrame(),
    ]
    down, _ = await run_test(aligner, frames_to_send=frames)
    kinds = [type(f).__name__ for f in down if not isinstance(f, TTSAudioRawFrame)]
    assert kinds.index("TTSTextFrame") < kinds.index("TTSStoppedFrame")
    assert aligner.chars_per_sec > 5.0  # 32 chars in 2 s = 16 chars/s observed


async def test_the_turn_is_committed_after_its_text() -> None:
    from pipecat.frames.frames import LLMFullResponseEndFrame

    aligner = SpokenTextAligner(chars_per_sec=10.0, learn=False)
    frames = [
        TTSStartedFrame(),
        TTSTextFrame("One two.", text_type="sentence"),
        LLMFullResponseEndFrame(),
        *[audio(0.1) for _ in range(10)],
        TTSStoppedFrame(),
    ]
    down, _ = await run_test(aligner, frames_to_send=frames)
    kinds = [type(f).__name__ for f in down]
    assert kinds.index("TTSTextFrame") < kinds.index("LLMFullResponseEndFrame")
    assert kinds.index("LLMFullResponseEndFrame") < kinds.index("TTSStoppedFrame")

"""The Twilio serializer: the caller's audio in 40 ms frames, nothing lost or reordered."""

from __future__ import annotations

import audioop
import base64
import json
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame

from telephony.twilio import INPUT_FRAMES_PER_CHUNK, DealershipTwilioSerializer

FRAME_ULAW = 160  # one 20 ms Twilio media message at 8 kHz


async def _serializer(frames_per_chunk: int = INPUT_FRAMES_PER_CHUNK) -> DealershipTwilioSerializer:
    serializer = DealershipTwilioSerializer(
        stream_sid="MZ" + "0" * 32,
        frames_per_chunk=frames_per_chunk,
        params=DealershipTwilioSerializer.InputParams(auto_hang_up=False),
    )
    await serializer.setup(SimpleNamespace(audio_in_sample_rate=8000))  # as the transport does
    return serializer


def _media(payload: bytes) -> str:
    return json.dumps({"event": "media", "media": {"payload": base64.b64encode(payload).decode()}})


def _dtmf(digit: str) -> str:
    return json.dumps({"event": "dtmf", "dtmf": {"digit": digit}})


messages = st.lists(
    st.one_of(
        st.binary(min_size=FRAME_ULAW, max_size=FRAME_ULAW).map(lambda b: ("media", b)),
        st.sampled_from("0123456789*#").map(lambda d: ("dtmf", d)),
        st.sampled_from(['{"event": "media", "media": null}', "[1]", "not json", "{}"]).map(
            lambda raw: ("odd", raw)
        ),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(messages)
async def test_audio_arrives_whole_in_order_in_40_ms_frames(sequence) -> None:
    serializer = await _serializer()
    audio_frames: list[InputAudioRawFrame] = []
    digits: list[str] = []
    for kind, value in sequence:
        raw = _media(value) if kind == "media" else _dtmf(value) if kind == "dtmf" else value
        frame = await serializer.deserialize(raw)
        if isinstance(frame, InputAudioRawFrame):
            audio_frames.append(frame)
        elif isinstance(frame, InputDTMFFrame):
            digits.append(frame.button.value)
        else:
            assert frame is None
    payloads = [value for kind, value in sequence if kind == "media"]
    whole = len(payloads) // INPUT_FRAMES_PER_CHUNK * INPUT_FRAMES_PER_CHUNK
    expected = audioop.ulaw2lin(b"".join(payloads[:whole]), 2)
    assert b"".join(f.audio for f in audio_frames) == expected
    assert all(len(f.audio) == 2 * FRAME_ULAW * INPUT_FRAMES_PER_CHUNK for f in audio_frames)
    assert all(f.sample_rate == 8000 and f.num_channels == 1 for f in audio_frames)
    # Keypad digits are never held back behind audio.
    assert digits == [value for kind, value in sequence if kind == "dtmf"]


@pytest.mark.parametrize("frames_per_chunk", [1, 3])
async def test_frames_per_chunk_is_honoured(frames_per_chunk: int) -> None:
    serializer = await _serializer(frames_per_chunk)
    out = [await serializer.deserialize(_media(bytes([i]) * FRAME_ULAW)) for i in range(6)]
    frames = [f for f in out if f is not None]
    assert len(frames) == 6 // frames_per_chunk
    assert all(len(f.audio) == 2 * FRAME_ULAW * frames_per_chunk for f in frames)

"""KeypadProcessor: key presses become commands or digit entries and never go further."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.frames.frames import DTMFFrame, InputDTMFFrame, TextFrame, TranscriptionFrame
from pipecat.tests.utils import SleepFrame, run_test

from bot.features import keyed_factor
from processors.keypad import KeypadProcessor


def keys(text: str) -> list[InputDTMFFrame]:
    return [InputDTMFFrame(button=KeypadEntry(ch)) for ch in text]


class Recorder:
    """The entries handed over, and an ``armed`` switch."""

    def __init__(self, armed: bool = False) -> None:
        self.armed = armed
        self.entries: list[str] = []

    async def on_entry(self, entry: str):
        self.entries.append(entry)
        return None


async def test_unarmed_keys_are_single_key_commands_and_never_pass_on() -> None:
    rec = Recorder(armed=False)
    keypad = KeypadProcessor(on_entry=rec.on_entry, armed=lambda: rec.armed)
    down, up = await run_test(keypad, frames_to_send=[*keys("09"), TextFrame("hello")])
    assert rec.entries == ["0", "9"]
    assert not [f for f in down + up if isinstance(f, DTMFFrame)]
    assert [f.text for f in down if isinstance(f, TextFrame)] == ["hello"]


async def test_armed_digits_end_with_pound_and_star_starts_over() -> None:
    rec = Recorder(armed=True)
    keypad = KeypadProcessor(on_entry=rec.on_entry, armed=lambda: rec.armed)
    down, _ = await run_test(keypad, frames_to_send=keys("12*60614#0414#"))
    assert rec.entries == ["60614", "0414"]
    assert not [f for f in down if isinstance(f, DTMFFrame)]


async def test_armed_digits_end_after_a_pause_or_at_the_longest_entry() -> None:
    rec = Recorder(armed=True)
    keypad = KeypadProcessor(
        on_entry=rec.on_entry, armed=lambda: rec.armed, timeout_secs=0.2, max_digits=8
    )
    frames = [*keys("0414"), SleepFrame(sleep=0.5), *keys("04121985"), *keys("6")]
    await run_test(keypad, frames_to_send=[*frames, SleepFrame(sleep=0.5)])
    assert rec.entries == ["0414", "04121985", "6"]


async def test_the_callback_can_push_frames_ahead_of_what_follows() -> None:
    async def on_entry(entry: str):
        return [TranscriptionFrame(f"switched by {len(entry)} key", "caller", "now")]

    keypad = KeypadProcessor(on_entry=on_entry, armed=lambda: False)
    down, _ = await run_test(keypad, frames_to_send=[*keys("9"), TextFrame("after")])
    texts = [f.text for f in down if isinstance(f, TextFrame)]
    assert texts == ["switched by 1 key", "after"]


def test_keyed_factors_by_length() -> None:
    assert keyed_factor("04121985") == ("date of birth", {"date_of_birth": "1985-04-12"})
    assert keyed_factor("19850412") == ("date of birth", {"date_of_birth": "1985-04-12"})
    assert keyed_factor("60614") == ("ZIP code", {"zip_code": "60614"})
    assert keyed_factor("606141234") == ("ZIP code", {"zip_code": "60614"})
    assert keyed_factor("0001") == ("VIN's last four", {"vin_last4": "0001"})
    for junk in ("", "1", "123", "13451985", "99999999", "1234567", "12345678901", "12#4"):
        assert keyed_factor(junk) is None, junk


@given(digits=st.text("0123456789*#", max_size=30))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_keyed_factor_never_raises_and_yields_only_verify_arguments(digits: str) -> None:
    factor = keyed_factor(digits)
    if factor is not None:
        _label, arguments = factor
        assert set(arguments) <= {"date_of_birth", "zip_code", "vin_last4"}
        assert all(isinstance(v, str) and v for v in arguments.values())

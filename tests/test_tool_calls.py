"""Tool calls stored on the calls row (masked), and the callback a failed transfer leaves."""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipecat.frames.frames import (
    FunctionCallCancelFrame,
    FunctionCallInProgressFrame,
    FunctionCallResultFrame,
)
from pipecat.observers.base_observer import FramePushed
from pipecat.processors.frame_processor import FrameDirection

from bot.failures import TRANSFER_FAILED_CALLBACK
from core.pii import redact_text, redact_value
from core.profile import load_profile
from core.settings import DEFAULT_PROFILE
from processors.tool_calls import MAX_JSON_CHARS, ToolCallRecorder
from seeding import seed
from tests.fakes.audio import speech_ulaw
from tests.fakes.openai_chat import FakeOpenAI, call_tool
from tests.harness import running_agent

PROFILE = load_profile(DEFAULT_PROFILE)


def _pushed(frame) -> FramePushed:
    return FramePushed(
        source=None,  # type: ignore[arg-type]
        destination=None,  # type: ignore[arg-type]
        frame=frame,
        direction=FrameDirection.DOWNSTREAM,
        timestamp=0,
    )


async def test_tool_calls_are_paired_timed_and_masked() -> None:
    now = {"t": 100.0}
    recorder = ToolCallRecorder(clock=lambda: now["t"])
    start = FunctionCallInProgressFrame(
        function_name="verify_customer",
        tool_call_id="call-1",
        arguments={"date_of_birth": "1985-04-12", "vin_last4": "0001"},
    )
    await recorder.on_push_frame(_pushed(start))
    await recorder.on_push_frame(_pushed(start))  # the same start seen again: one entry
    now["t"] = 100.25
    await recorder.on_push_frame(
        _pushed(
            FunctionCallResultFrame(
                function_name="verify_customer",
                tool_call_id="call-1",
                arguments={},
                result={"ok": True, "caller": "+15555550100", "note": "VIN 1HGCM82633A004352"},
            )
        )
    )
    await recorder.on_push_frame(
        _pushed(
            FunctionCallInProgressFrame(
                function_name="check_availability", tool_call_id="call-2", arguments={}
            )
        )
    )
    now["t"] = 101.0
    await recorder.on_push_frame(
        _pushed(
            FunctionCallResultFrame(
                function_name="check_availability",
                tool_call_id="call-2",
                arguments={},
                result={"error": "internal", "say": "Sorry."},
            )
        )
    )
    await recorder.on_push_frame(
        _pushed(FunctionCallInProgressFrame(function_name="book", tool_call_id="c3", arguments={}))
    )
    await recorder.on_push_frame(
        _pushed(FunctionCallCancelFrame(function_name="book", tool_call_id="c3"))
    )
    await recorder.on_push_frame(
        _pushed(
            FunctionCallInProgressFrame(
                function_name="lookup", tool_call_id="c4", arguments={"phone": "+15555550100"}
            )
        )
    )
    calls = recorder.to_json()
    assert [c["name"] for c in calls] == ["verify_customer", "check_availability", "book", "lookup"]
    first = calls[0]
    assert first["arguments"] == {"date_of_birth": "[date]", "vin_last4": "0001"}
    assert first["result"] == {"ok": True, "caller": "+1***…0100", "note": "VIN …4352"}
    assert first["secs"] == 0.25 and first["status"] == "ok" and first["at_secs"] == 0.0
    assert calls[1]["status"] == "error" and calls[1]["secs"] == 0.75
    assert calls[2]["status"] == "cancelled"
    assert calls[3]["status"] == "unfinished" and calls[3]["arguments"] == {"phone": "+1***…0100"}


async def test_huge_results_are_cut_to_a_preview() -> None:
    recorder = ToolCallRecorder()
    await recorder.on_push_frame(
        _pushed(FunctionCallInProgressFrame(function_name="x", tool_call_id="1", arguments={}))
    )
    await recorder.on_push_frame(
        _pushed(
            FunctionCallResultFrame(
                function_name="x",
                tool_call_id="1",
                arguments={},
                result={"slots": ["slot"] * 10_000},
            )
        )
    )
    result = recorder.to_json()[0]["result"]
    assert result["truncated"] is True and len(result["preview"]) <= MAX_JSON_CHARS + 1


@settings(max_examples=300, deadline=None)
@given(
    year=st.integers(1920, 2010),
    month=st.integers(1, 12),
    day=st.integers(1, 28),
    style=st.sampled_from(["iso", "us", "words", "digits-words"]),
    prefix=st.text(alphabet="abc ,.", max_size=10),
)
def test_dates_of_birth_never_survive_redaction(
    year: int, month: int, day: int, style: str, prefix: str
) -> None:
    moment = datetime(year, month, day)
    text = {
        "iso": moment.strftime("%Y-%m-%d"),
        "us": moment.strftime("%m/%d/%Y"),
        "words": moment.strftime("%B %d, %Y"),
        "digits-words": moment.strftime("%d %B %Y"),
    }[style]
    masked = redact_text(f"{prefix} born {text}.")
    assert str(year) not in masked and "[date]" in masked


@settings(max_examples=300, deadline=None)
@given(
    number=st.from_regex(r"\+1[2-9]\d{2}[2-9]\d{6}", fullmatch=True),
    style=st.sampled_from(["e164", "dashes", "parens", "spaces"]),
)
def test_phone_numbers_never_survive_redaction(number: str, style: str) -> None:
    d = number[2:]
    text = {
        "e164": number,
        "dashes": f"{d[:3]}-{d[3:6]}-{d[6:]}",
        "parens": f"+1 ({d[:3]}) {d[3:6]}-{d[6:]}",
        "spaces": f"{d[:3]} {d[3:6]} {d[6:]}",
    }[style]
    masked = redact_text(f"call me at {text} please")
    assert d[:6] not in masked.replace(" ", "").replace("-", "") and d[-4:] in masked
    assert redact_value({"phone": text})["phone"].endswith(d[-4:])


ALWAYS_OPEN = "\n".join(
    f'{day} = ["00:00-24:00"]'
    for day in ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
)


@pytest.fixture
def always_open_profile(tmp_path) -> str:
    text = DEFAULT_PROFILE.read_text()
    start = text.index("[hours]")
    end = text.index("[", start + len("[hours]"))
    text = text[:start] + "[hours]\n" + ALWAYS_OPEN + "\n\n" + text[end:]
    holidays = text.index("holidays = [")
    text = text[:holidays] + "holidays = []" + text[text.index("]", holidays) + 1 :]
    path = tmp_path / "always_open.toml"
    path.write_text(text)
    return str(path)


async def test_a_failed_transfer_leaves_a_callback_request(
    migrated_db: str, redis_server_url: str, always_open_profile: str
) -> None:
    today = datetime.now(PROFILE.time_zone).date()
    await seed(migrated_db, customers=20, seed=7, anchor_date=today, profile=PROFILE)
    llm = FakeOpenAI([call_tool("transfer_to_advisor", {"reason": "caller asked for a person"})])
    async with running_agent(
        database_url=migrated_db,
        redis_url=redis_server_url,
        llm=llm,
        env={"DEALERSHIP_PROFILE": always_open_profile},
    ) as agent:
        agent.stt.script(["Can I talk to a real person please?"])
        agent.twilio.fail_next_updates(1)  # the redirect to the advisor fails
        client = await agent.inbound_call("+15555550100")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=20)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=20)
        await client.send_audio(speech_ulaw(0.8))
        row = await agent.wait_for_call_row(client.call_sid, timeout=30)
        assert TRANSFER_FAILED_CALLBACK in " ".join(agent.tts.texts)
        callbacks = agent.query(
            "SELECT customer_id, phone, reason, source, status FROM callback_requests "
            "WHERE call_sid = %s",
            (client.call_sid,),
        )
        assert callbacks == [
            {
                "customer_id": 1,
                "phone": "+15555550100",
                "reason": "transfer to an advisor failed",
                "source": "transfer_failed",
                "status": "open",
            }
        ]
        assert row["outcome"] == "callback_requested"  # the caller was told an advisor calls back
        tools = row["tool_calls"]
        assert [t["name"] for t in tools] == ["transfer_to_advisor"]
        assert tools[0]["status"] == "ok" and tools[0]["secs"] is not None

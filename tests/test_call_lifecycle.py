"""bot.call.Call, one lifecycle method at a time: the idle policy and the call's record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from pipecat.frames.frames import EndFrame, Frame, TTSSpeakFrame
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.transports.base_transport import BaseTransport

from bot.call import IDLE_GOODBYE, IDLE_PROMPT, Call
from core.resources import AppResources, open_resources
from core.settings import Settings
from crm.migrate import apply_migrations
from tools.context import CallSession


class NoTransport(BaseTransport):
    """A transport with the events a call listens to and nothing behind it."""

    def __init__(self) -> None:
        super().__init__()
        self._register_event_handler("on_client_connected")
        self._register_event_handler("on_client_disconnected")
        self._in, self._out = FrameProcessor(), FrameProcessor()

    def input(self) -> FrameProcessor:
        return self._in

    def output(self) -> FrameProcessor:
        return self._out


class Queued:
    """Stands in for the worker's queue: what the call asked to say or do."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []

    async def queue_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    async def queue_frames(self, frames: list[Frame]) -> None:
        self.frames.extend(frames)


@pytest.fixture
async def resources(migrated_db: str, redis_server_url: str) -> AsyncIterator[AppResources]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=migrated_db,
        REDIS_URL=redis_server_url,
        OPENAI_API_KEY="sk-test",
        DEEPGRAM_API_KEY="dg-test",
    )
    async with open_resources(settings, migrate=apply_migrations, seed_demo=None) as opened:
        yield opened


def new_call(resources: AppResources, sid: str) -> tuple[Call, Queued]:
    call = Call(
        transport=NoTransport(),
        session=CallSession(call_sid=sid, caller_phone="+15555550123"),
        resources=resources,
    )
    queued = Queued()
    call.pipeline.worker = queued  # type: ignore[assignment]
    return call, queued


async def test_a_silent_caller_is_asked_once_then_told_goodbye(resources: AppResources) -> None:
    call, queued = new_call(resources, "CAidle0000000000000000000000000001")
    await call.on_idle()
    assert [type(f) for f in queued.frames] == [TTSSpeakFrame]
    assert queued.frames[0].text == IDLE_PROMPT  # type: ignore[attr-defined]
    assert call.session.outcome is None
    await call.on_idle()
    assert [type(f) for f in queued.frames[1:]] == [TTSSpeakFrame, EndFrame]
    assert queued.frames[1].text == IDLE_GOODBYE  # type: ignore[attr-defined]
    assert call.session.outcome == "abandoned"


async def _row(database_url: str, sid: str) -> dict[str, Any] | None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT direction, outcome, ended_at IS NOT NULL AS ended, summary FROM calls "
            "WHERE call_sid = %s",
            (sid,),
        )
        row = await cur.fetchone()
    if row is None:
        return None
    return dict(zip(("direction", "outcome", "ended", "summary"), row, strict=True))


async def test_the_calls_row_is_written_at_start_and_at_the_end(resources: AppResources) -> None:
    sid = "CArecord00000000000000000000000001"
    call, _ = new_call(resources, sid)
    assert await call.record_start() is True
    assert await _row(resources.database_url, sid) == {
        "direction": "inbound",
        "outcome": None,
        "ended": False,
        "summary": None,
    }
    call.session.outcome = "booked"
    call.incidents.append("llm failure")
    await call.record_end()
    row = await _row(resources.database_url, sid)
    assert row is not None and row["outcome"] == "booked" and row["ended"] is True
    assert row["summary"].endswith("; incidents: llm failure")

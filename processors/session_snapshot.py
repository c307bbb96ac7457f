"""Redis snapshots of a live call, written after each bot turn.

:class:`SnapshotStore` keeps one hash per call at ``<prefix>:call:{call_sid}`` (fields
``version``, ``data`` (JSON), ``finished``) with a TTL, and the set
``<prefix>:calls:active``; the prefix is ``REDIS_KEY_PREFIX`` (``voice_agent``). Writes
go through a Lua script that compares versions inside Redis, so a stale writer can never
overwrite a newer snapshot.

:class:`SessionSnapshotProcessor` is a pass-through processor placed after
``transport.output()``: on each ``BotStoppedSpeakingFrame`` it takes a snapshot from a
per-call provider callable and hands it to a background writer (latest wins). Frames never
wait on Redis. While Redis is down, snapshots are skipped with one warning and counted in
``voice_agent_snapshot_failures_total``; the writer retries with backoff and resumes when
Redis is back. At ``EndFrame``/``CancelFrame`` it writes a last snapshot and removes the
call from the active set.

Wiring::

    store = SnapshotStore(resources.redis, prefix=settings.redis_key_prefix)
    snapshots = SessionSnapshotProcessor(
        call_sid=session.call_sid,
        store=store,
        provider=lambda: session_snapshot(session, latency),
    )
    CallOptions(extra_processors_after_output=[snapshots])
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from loguru import logger
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    StartFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from core.metrics import SNAPSHOT_FAILURES_TOTAL
from core.pii import mask_phone
from core.settings import DEFAULT_REDIS_KEY_PREFIX

KEY_PREFIX = DEFAULT_REDIS_KEY_PREFIX  # REDIS_KEY_PREFIX; the app passes its setting
DEFAULT_TTL_SECS = 24 * 3600

# KEYS[1] call hash, KEYS[2] active set; ARGV: version, data, ttl, call_sid.
# Returns 1 when written, 0 when a newer (or equal) version is already stored.
_WRITE_LUA = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
if redis.call('HGET', KEYS[1], 'finished') ~= '1' then
  redis.call('SADD', KEYS[2], ARGV[4])
end
return 1
"""

# KEYS[1] call hash, KEYS[2] active set; ARGV: ttl, call_sid.
_FINISH_LUA = """
redis.call('HSET', KEYS[1], 'finished', '1')
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""


class SnapshotStore:
    """Versioned call snapshots in Redis.

    Args:
        redis: An asyncio Redis client (``decode_responses`` either way).
        ttl_secs: Lifetime of a call's snapshot, renewed by each write.
        prefix: Key prefix.
    """

    def __init__(
        self, redis: aioredis.Redis, *, ttl_secs: int = DEFAULT_TTL_SECS, prefix: str = KEY_PREFIX
    ):
        """Initialize the store."""
        self._redis = redis
        self._ttl = int(ttl_secs)
        self._prefix = prefix
        self._write = redis.register_script(_WRITE_LUA)
        self._finish = redis.register_script(_FINISH_LUA)

    @property
    def active_key(self) -> str:
        """Key of the set of active call sids."""
        return f"{self._prefix}:calls:active"

    def key(self, call_sid: str) -> str:
        """Key of one call's snapshot hash."""
        return f"{self._prefix}:call:{call_sid}"

    async def write(self, call_sid: str, version: int, data: dict[str, Any]) -> bool:
        """Store ``data`` as the call's snapshot unless a newer version is stored.

        Args:
            call_sid: The call.
            version: Monotonically increasing version of this snapshot.
            data: JSON-serializable snapshot.

        Returns:
            True when written, False when the stored snapshot is newer (or the same).
        """
        payload = json.dumps(data, default=str, separators=(",", ":"))
        written = await self._write(
            keys=[self.key(call_sid), self.active_key],
            args=[int(version), payload, self._ttl, call_sid],
        )
        return bool(int(written))

    async def read(self, call_sid: str) -> dict[str, Any] | None:
        """The call's latest snapshot (with ``version`` and ``finished``), or None."""
        raw = await self._redis.hgetall(self.key(call_sid))
        if not raw:
            return None
        fields = {_s(k): _s(v) for k, v in raw.items()}
        if "data" not in fields:
            return None
        data = json.loads(fields["data"])
        data["version"] = int(fields["version"])
        data["finished"] = fields.get("finished") == "1"
        return data

    async def active(self) -> list[str]:
        """Sids of calls in progress (sorted)."""
        return sorted(_s(m) for m in await self._redis.smembers(self.active_key))

    async def finish(self, call_sid: str) -> None:
        """Mark the call finished and remove it from the active set (snapshot kept to TTL)."""
        await self._finish(keys=[self.key(call_sid), self.active_key], args=[self._ttl, call_sid])


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def session_snapshot(session: Any, latency: Any | None = None, *, last_turns: int = 6) -> dict:
    """Snapshot dict of a :class:`~tools.context.CallSession`-like object.

    Args:
        session: The call session (``flow_node``, ``customer_id``, ``verified``,
            ``appointment_ids``, ``transcript``, ``direction``, ``scenario``,
            ``caller_phone``, ``customer_first_name``, ``started_at``).
        latency: Optional :class:`~processors.latency.LatencyObserver` (its ``summary()``).
        last_turns: How many transcript turns to keep.

    Returns:
        A JSON-ready dict. The caller's number is masked (``caller``); the customer's first
        name is there only once the caller is verified. ``transcript`` holds the last
        ``last_turns`` turns, ``transcript_turns`` the number of turns so far.
    """
    customer_id = getattr(session, "customer_id", None)
    verified = bool(getattr(session, "verified", False))
    transcript = list(getattr(session, "transcript", []) or [])
    started_at = getattr(session, "started_at", None)
    return {
        "caller": mask_phone(getattr(session, "caller_phone", None)),
        "customer_first_name": getattr(session, "customer_first_name", None) if verified else None,
        "started_at": started_at.isoformat() if isinstance(started_at, datetime) else None,
        "direction": getattr(session, "direction", None),
        "scenario": getattr(session, "scenario", None),
        "flow_node": getattr(session, "flow_node", None),
        "customer_id": customer_id,
        "verified_customer_id": customer_id if verified else None,
        "appointment_ids": list(getattr(session, "appointment_ids", []) or []),
        "transcript": transcript[-last_turns:] if last_turns > 0 else [],
        # How many turns the call has had: the number of the first kept turn follows.
        "transcript_turns": len(transcript),
        "latency": latency.summary() if latency is not None else None,
        "outcome": getattr(session, "outcome", None),
    }


class SessionSnapshotProcessor(FrameProcessor):
    """Writes a call snapshot to Redis after each bot turn, never blocking frames.

    Args:
        call_sid: The call.
        store: Where snapshots go.
        provider: Returns the snapshot dict (called on the pipeline's loop; keep it cheap).
        retry_initial_secs: First backoff after a failed write.
        retry_max_secs: Longest backoff.
        write_timeout_secs: Limit of one Redis write.
        flush_timeout_secs: How long the end of the call waits for the last write.
        snapshot_on_start: Also write a snapshot when the pipeline starts, so the call is
            listed as active before the bot's first turn ends.
        **kwargs: Passed to :class:`FrameProcessor`.
    """

    def __init__(
        self,
        *,
        call_sid: str,
        store: SnapshotStore,
        provider: Callable[[], dict[str, Any]],
        retry_initial_secs: float = 0.5,
        retry_max_secs: float = 10.0,
        write_timeout_secs: float = 2.0,
        flush_timeout_secs: float = 2.0,
        snapshot_on_start: bool = False,
        **kwargs,
    ):
        """Initialize the processor."""
        super().__init__(**kwargs)
        self._snapshot_on_start = snapshot_on_start
        self._call_sid = call_sid
        self._store = store
        self._provider = provider
        self._retry_initial = retry_initial_secs
        self._retry_max = retry_max_secs
        self._write_timeout = write_timeout_secs
        self._flush_timeout = flush_timeout_secs

        self._last_version = 0
        self._pending: tuple[int, dict[str, Any]] | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._failing = False
        self._finished = False

        self.written_versions: list[int] = []
        self.failures = 0

    def _next_version(self) -> int:
        # Wall-clock based, so a restarted writer still beats what it wrote before.
        self._last_version = max(self._last_version + 1, time.time_ns())
        return self._last_version

    def snapshot_now(self) -> None:
        """Queue a snapshot of the call now (latest wins); returns immediately."""
        try:
            data = dict(self._provider())
        except Exception as exc:
            logger.error(f"call {self._call_sid}: snapshot provider failed: {type(exc).__name__}")
            return
        data["call_sid"] = self._call_sid
        data["updated_at"] = datetime.now(UTC).isoformat()
        self._pending = (self._next_version(), data)
        self._wakeup.set()

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        """Pass every frame on; snapshot after bot turns and at the end of the call."""
        await super().process_frame(frame, direction)

        if isinstance(frame, StartFrame):
            self._start_writer()
            if self._snapshot_on_start:
                self.snapshot_now()
        elif isinstance(frame, BotStoppedSpeakingFrame) and direction == FrameDirection.DOWNSTREAM:
            self.snapshot_now()
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._finish_call()

        await self.push_frame(frame, direction)

    async def cleanup(self):
        """Stop the background writer."""
        await super().cleanup()
        await self._stop_writer()

    def _start_writer(self) -> None:
        if self._task is None:
            self._task = self.create_task(self._writer(), "snapshot_writer")

    async def _stop_writer(self) -> None:
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None

    async def _writer(self) -> None:
        backoff = self._retry_initial
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            pending = self._pending
            if pending is None:
                continue
            if await self._try_write(*pending):
                if self._pending is pending:
                    self._pending = None
                backoff = self._retry_initial
                continue
            # Retry the latest snapshot after a backoff; a newer one replaces it meanwhile.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._retry_max)
            self._wakeup.set()

    async def _try_write(self, version: int, data: dict[str, Any]) -> bool:
        try:
            await asyncio.wait_for(
                self._store.write(self._call_sid, version, data), self._write_timeout
            )
        except Exception as exc:
            self.failures += 1
            SNAPSHOT_FAILURES_TOTAL.inc()
            if not self._failing:
                self._failing = True
                logger.warning(
                    f"call {self._call_sid}: session snapshots unavailable "
                    f"({type(exc).__name__}); the call goes on, retrying in the background"
                )
            return False
        if self._failing:
            self._failing = False
            logger.info(f"call {self._call_sid}: session snapshots resumed")
        self.written_versions.append(version)
        return True

    async def _finish_call(self) -> None:
        if self._finished:
            return
        self._finished = True
        await self._stop_writer()
        self.snapshot_now()
        pending = self._pending

        async def flush() -> None:
            if pending is not None:
                await self._store.write(self._call_sid, pending[0], pending[1])
            await self._store.finish(self._call_sid)

        try:
            await asyncio.wait_for(flush(), self._flush_timeout)
            self._pending = None
        except Exception as exc:
            self.failures += 1
            SNAPSHOT_FAILURES_TOTAL.inc()
            logger.warning(
                f"call {self._call_sid}: final session snapshot not written ({type(exc).__name__})"
            )

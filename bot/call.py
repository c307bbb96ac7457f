"""The lifecycle of one call: its record, its greeting, its idle and failure policies.

:func:`run_call` is the one entry point of the Twilio route, the WebRTC route and the
tests. It builds a :class:`Call`, which assembles the pipeline (:mod:`bot.pipeline`) and
then owns what happens to the call:

* :meth:`Call.open` writes the ``calls`` row and finds the customer while the pipeline
  starts; :meth:`Call.start` greets the caller once that is done (or apologises when
  Postgres is down, see :mod:`bot.failures`).
* :meth:`Call.on_idle` asks "Are you still there?" once, then says goodbye.
* :meth:`Call.on_error` hands a service failure to the call's :class:`CallRescue`.
* :meth:`Call.transfer` sends the caller to an advisor.
* :meth:`Call.finish` writes the end-of-call facts.

The ``calls`` table is written in one place, :meth:`Call.write_record` (through
:mod:`crm.calls`, queued in :class:`core.pending.PendingWrites` while Postgres is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pipecat.frames.frames import EndFrame, LLMUpdateSettingsFrame, TTSSpeakFrame
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner
from psycopg import AsyncConnection

from bot import live_calls
from bot.failures import TTS_RECOVERY_SECS, CallRescue
from bot.features import CallFeatures  # [phone-features hook]
from bot.pipeline import CallControl, CallOptions, CallPipeline, build_call_pipeline
from bot.prompts import greeting, render_system_prompt
from core import metrics
from core.pii import mask_phone
from core.resources import AppResources
from crm import calls as crm_calls
from crm.customers import get_identity
from processors.session_snapshot import SnapshotStore
from tools.context import CallSession, make_tool_context
from tools.customers import identify_caller

IDLE_PROMPT = "Are you still there?"
IDLE_GOODBYE = "I haven't heard anything, so I'll let you go. Please call back any time. Goodbye."
#: How long the greeting waits for the call's database work before its first sentence is
#: said anyway (the rest follows once the database answers or gives up).
OPENING_WAIT_SECS = 0.4
#: Seconds a finished call keeps being taken out of Redis's active set while Redis is down.
SNAPSHOT_FINISH_RETRY_SECS = 600.0
#: Seconds the rescues still running at hang-up get to finish (their writes then queue).
RESCUE_GRACE_SECS = 5

RecordWrite = Callable[[AsyncConnection], Awaitable[None]]


@dataclass
class CallState:
    """What the lifecycle tracks about a call beside its session.

    Attributes:
        idle_prompts: "Are you still there?" prompts since the caller last spoke.
        flow_started: Whether the conversation flow has its first node (the greeting's or
            the transfer's).
        failing: Whether a service failure is being handled (later errors are ignored).
    """

    idle_prompts: int = 0
    flow_started: bool = False
    failing: bool = False


async def run_call(
    *,
    transport: BaseTransport,
    session: CallSession,
    resources: AppResources,
    call_control: CallControl | None = None,
    options: CallOptions | None = None,
    now: Callable[[], datetime] | None = None,
    customer_id: int | None = None,
) -> CallSession:
    """Assemble and run the pipeline of one call until it ends.

    Failures never silence the caller (see :mod:`bot.failures`): with Postgres down at
    the start the caller hears an apology and is transferred (or told what happens next
    after hours) while the call record waits in :class:`core.pending.PendingWrites`; a
    service failing mid-call gets an apology and a transfer or callback.

    Args:
        transport: Transport of the call (Twilio websocket, SmallWebRTC, test transport).
        session: The call's session (caller number from the telephony layer).
        resources: Process resources (pool, Redis, profile, settings).
        call_control: Telephony control for transfers; without it a transfer ends the call
            after the transfer sentence.
        options: Pipeline knobs.
        now: Clock for prompts and tools (tests); real time when omitted.
        customer_id: The CRM customer an outbound call is for (loaded as the call starts;
            the session's caller-ID match is decided against its phone).

    Returns:
        The session, with outcome and transcript filled in.
    """
    call = Call(
        transport=transport,
        session=session,
        resources=resources,
        call_control=call_control,
        options=options,
        now=now,
        customer_id=customer_id,
    )
    return await call.run()


class Call:
    """One call, from its first frame to its record. See the module docstring.

    Args:
        transport: Transport of the call.
        session: The call's session.
        resources: Process resources.
        call_control: Telephony control for transfers (``None``: a transfer ends the call).
        options: Pipeline knobs.
        now: Clock for prompts and tools; real time when omitted.
        customer_id: The CRM customer an outbound call is for.
    """

    def __init__(
        self,
        *,
        transport: BaseTransport,
        session: CallSession,
        resources: AppResources,
        call_control: CallControl | None = None,
        options: CallOptions | None = None,
        now: Callable[[], datetime] | None = None,
        customer_id: int | None = None,
    ) -> None:
        self.session = session
        self.resources = resources
        self.profile = resources.profile
        self.call_control = call_control
        self.options = options or CallOptions()
        self.customer_id = customer_id
        self.clock: Callable[[], datetime] = now or (lambda: datetime.now(UTC))
        self.state = CallState()
        self.incidents: list[str] = []
        self.ctx = make_tool_context(resources, session)
        if now is not None:
            self.ctx.now = now
        self.prompt_session = dataclasses.replace(session)  # who we know before the lookup
        self.features = CallFeatures.create(  # [phone-features hook]
            resources=resources,
            session=session,
            ctx=self.ctx,
            call_control=call_control,
            now=self.clock,
        )
        self.pipeline: CallPipeline = build_call_pipeline(
            transport=transport,
            resources=resources,
            ctx=self.ctx,
            options=self.options,
            system_prompt=render_system_prompt(
                session.scenario,
                profile=self.profile,
                session=self.prompt_session,
                now=self.clock(),
            ),
            transfer=self.transfer,
            features=self.features,
        )
        self.features.bind(  # [phone-features hook]
            worker=self.pipeline.worker, manager=self.pipeline.manager, flow=self.pipeline.flow
        )
        self.rescue = CallRescue(
            session=session,
            profile=self.profile,
            pending=resources.pending,
            clock=self.clock,
            queue_frames=self.pipeline.worker.queue_frames,
            transfer_node=self.to_transfer_node,
            call_control=call_control,
            incidents=self.incidents,
        )
        self._tasks: set[asyncio.Task] = set()  # cancelled when the caller hangs up
        self._rescues: set[asyncio.Task] = set()  # finished (bounded) even after a hang-up
        self._opening: asyncio.Future[bool] | None = None
        self._listen(transport)
        self._tts_health = _TTSHealth(self.pipeline.tts)

    def _listen(self, transport: BaseTransport) -> None:
        aggregators = self.pipeline.aggregators
        transport.add_event_handler("on_client_connected", self._on_connected)
        transport.add_event_handler("on_client_disconnected", self._on_disconnected)
        aggregators.user().add_event_handler("on_user_turn_stopped", self._on_user_turn)
        aggregators.assistant().add_event_handler("on_assistant_turn_stopped", self._on_bot_turn)
        aggregators.user().add_event_handler("on_user_turn_idle", self._on_user_idle)
        self.pipeline.worker.add_event_handler("on_pipeline_error", self._on_pipeline_error)

    async def run(self) -> CallSession:
        """Run the call until it ends, then write its record.

        Returns:
            The session, with outcome and transcript filled in.
        """
        worker = self.pipeline.worker
        if self.options.on_worker is not None:
            maybe = self.options.on_worker(worker)
            if maybe is not None:
                await maybe
        runner = WorkerRunner(handle_sigint=False)
        metrics.call_started()
        # The call's row and the caller ID lookup run while the pipeline starts (Deepgram
        # sockets); the flow waits for them before the greeting. With Postgres down they
        # give up after DB_TIMEOUT_SECS and the caller hears the apology instead.
        self._opening = asyncio.ensure_future(self.open())
        live_calls.register(self.session, worker)  # a draining server ends it with a goodbye
        try:
            await runner.add_workers(worker)
            await runner.run()
        finally:
            live_calls.unregister(self.session.call_sid)
            await self._settle()
            await self.finish()
            await self.features.close(incidents=self.incidents)  # [phone-features hook]
        return self.session

    # -- the record ------------------------------------------------------------------

    async def write_record(self, *, what: str, write: RecordWrite) -> bool:
        """Write to the call's ``calls`` row: the one place the lifecycle does.

        Args:
            what: What is written, for the logs ("call start", "call record").
            write: The write, given a connection.

        Returns:
            True when written now; False when queued in the process's pending writes
            (Postgres is down) or, without them, lost (logged).
        """
        pending = self.resources.pending
        if pending is not None:
            return await pending.write(call_sid=self.session.call_sid, what=what, write=write)
        try:
            async with asyncio.timeout(self.resources.settings.db_timeout_secs):
                async with self.resources.db.connection() as conn:
                    await write(conn)
        except Exception as exc:
            logger.error(f"call {self.session.call_sid}: {what} not recorded: {type(exc).__name__}")
            return False
        return True

    async def record_start(self) -> bool:
        """Create the ``calls`` row; False (and the write queued) when Postgres is down."""
        session = self.session

        async def write(conn: AsyncConnection) -> None:
            await crm_calls.start_call(
                conn,
                call_sid=session.call_sid,
                direction=session.direction,
                scenario=session.scenario,
                started_at=session.started_at,
            )

        return await self.write_record(what="call start", write=write)

    async def record_end(self) -> None:
        """Write the end-of-call facts (outcome, transcript, metrics, summary)."""
        session = self.session
        outcome = session.outcome or "info"
        summary = (
            f"{session.direction} {session.scenario} call; outcome {outcome}; "
            f"verified={session.verified}; appointments={session.appointment_ids}"
        )
        if self.incidents:
            summary += "; incidents: " + ", ".join(self.incidents)
        ended_at = datetime.now(UTC)

        async def write(conn: AsyncConnection) -> None:
            await crm_calls.finish_call(
                conn,
                call_sid=session.call_sid,
                direction=session.direction,
                scenario=session.scenario,
                started_at=session.started_at,
                ended_at=ended_at,
                customer_id=session.customer_id,
                verified=session.verified,
                outcome=outcome,
                transcript=session.transcript,
                turn_metrics=session.turn_metrics,
                summary=summary,
                appointment_ids=session.appointment_ids,
                tool_calls=tool_calls,
            )

        tool_calls = self.pipeline.tool_log.to_json()  # masked, for the ops console
        await self.write_record(what="call record", write=write)

    # -- start -----------------------------------------------------------------------

    async def open(self) -> bool:
        """Record the call's start and find the customer; False when Postgres is down."""
        session = self.session
        if not await self.record_start():
            return False
        try:
            async with asyncio.timeout(self.resources.settings.db_timeout_secs):
                if self.customer_id is not None:
                    await self._load_customer(self.customer_id)
                elif session.customer_id is None:
                    await identify_caller(self.ctx)
        except Exception as exc:
            # The caller can still be found and verified by the tools later.
            logger.warning(f"call {session.call_sid}: customer lookup failed: {type(exc).__name__}")
        return True

    async def _load_customer(self, customer_id: int) -> None:
        """The customer an outbound call is for; caller ID matches when we dialled them."""
        async with self.resources.db.connection() as conn:
            identity = await get_identity(conn, customer_id)
        if identity is not None:
            self.session.match_customer(
                customer_id=identity.id,
                first_name=identity.first_name,
                caller_id=identity.phone == self.session.caller_phone,
            )

    async def start(self) -> None:
        """Greet the caller once the call is opened (its first sentence sooner if slow)."""
        assert self._opening is not None, "start() runs once run() opened the call"
        session, profile = self.session, self.profile
        worker, flow = self.pipeline.worker, self.pipeline.flow
        # The greeting's first sentence is the same whoever calls; when the database is
        # slow to answer it is said while we wait, so the caller never hears silence.
        hello = _first_sentence(
            greeting(session.scenario, profile=profile, session=_anonymous(session))
        )
        said_hello = False
        try:
            database_up = await asyncio.wait_for(asyncio.shield(self._opening), OPENING_WAIT_SECS)
        except TimeoutError:
            await worker.queue_frame(TTSSpeakFrame(hello))
            said_hello = True
            database_up = await self._opening
        logger.info(
            f"call {session.call_sid} {session.direction}/{session.scenario} from "
            f"{mask_phone(session.caller_phone)} starting"
            + ("" if database_up else " without the database")
        )
        if not database_up:
            await self.rescue.database_down_at_start(hello="" if said_hello else hello)
            return
        switch = await self.features.apply_customer()  # [phone-features hook] CRM preferences
        if switch:
            await worker.queue_frames(switch)
        if session.customer_id != self.prompt_session.customer_id:
            await self._update_prompt()
        flow.greeting = greeting(session.scenario, profile=profile, session=session)
        if said_hello:
            rest = flow.greeting.removeprefix(hello)
            if rest == flow.greeting:  # personalised ("Hi Maria, thanks..."): the plain one
                rest = greeting(
                    session.scenario, profile=profile, session=_anonymous(session)
                ).removeprefix(hello)
            flow.greeting = rest.strip()
        if self.state.flow_started:  # a failure already moved the call to the transfer
            return
        self.state.flow_started = True
        await self.pipeline.manager.initialize(flow.initial_node())
        session.flow_node = self.pipeline.manager.current_node
        await self.features.on_greeting_played()  # [phone-features hook]

    async def _update_prompt(self) -> None:
        """The lookup found the caller: the prompt says whom caller ID matched."""
        prompt = render_system_prompt(
            self.session.scenario, profile=self.profile, session=self.session, now=self.clock()
        )
        await self.pipeline.worker.queue_frame(
            LLMUpdateSettingsFrame(
                delta=OpenAILLMService.Settings(system_instruction=prompt),
                service=self.pipeline.llm,
            )
        )

    # -- idle, transfer, failures ----------------------------------------------------

    async def on_idle(self) -> None:
        """The caller said nothing for a while: ask once, then say goodbye and hang up."""
        self.state.idle_prompts += 1
        worker = self.pipeline.worker
        if self.state.idle_prompts == 1:
            await worker.queue_frame(TTSSpeakFrame(IDLE_PROMPT))
        elif self.state.idle_prompts == 2:
            if self.session.outcome is None:
                self.session.outcome = "abandoned"
            await worker.queue_frames([TTSSpeakFrame(IDLE_GOODBYE), EndFrame()])

    async def transfer(self) -> None:
        """Send the caller to an advisor (without telephony control the call just ends)."""
        session = self.session
        if self.call_control is None:
            logger.info(f"call {session.call_sid}: no telephony for transfer; ending")
            await self.pipeline.worker.queue_frame(EndFrame())
            return
        try:
            await self.call_control.transfer(self.profile.advisor_transfer_number)
            session.outcome = "transferred"
        except Exception as exc:
            logger.error(f"call {session.call_sid}: transfer failed: {type(exc).__name__}")
            await self.rescue.transfer_failed()

    async def to_transfer_node(self) -> None:
        """Move the conversation to the transfer node (its first node if none yet)."""
        manager, flow = self.pipeline.manager, self.pipeline.flow
        if self.state.flow_started:
            await manager.set_node_from_config(flow.transfer_node())
        else:
            self.state.flow_started = True
            await manager.initialize(flow.transfer_node())

    async def on_error(self, *, source: object, error: object) -> None:
        """A service failed mid-call (LLM, STT or TTS socket, database).

        The caller hears an apology and goes to a person. Pipecat's Deepgram STT says it
        will reconnect after a dropped socket, but that is not guaranteed to happen in
        time, and a caller who cannot be heard must not be left talking to nobody. When
        the TTS is what failed and does not come back at once, Twilio says the sentence.

        Args:
            source: The processor that reported the error, if known.
            error: The error's description.
        """
        if self.rescue.rescued or self.state.failing:
            return
        self.state.failing = True
        tts = self.pipeline.tts
        what = self.pipeline.service_name(source)
        logger.error(f"call {self.session.call_sid}: {what} failure: {error}")
        await self.pipeline.dead_air.disarm()
        alive = self._tts_health.alive if source is tts else None
        if source is tts:
            self._tts_health.mark_failed()
        self._spawn(self.rescue.service_failed(what=what, tts_alive=alive), "rescue", self._rescues)

    # -- the end ---------------------------------------------------------------------

    async def finish(self) -> None:
        """Write the call's record, count it, and take it out of Redis's active set."""
        session = self.session
        session.turn_metrics = self.pipeline.latency.to_json()
        if session.outcome is None:
            session.outcome = "abandoned" if not session.transcript else "info"
        await self.record_end()
        logger.info(f"call {session.call_sid} ended: {session.outcome}")
        metrics.call_finished(session.direction, session.outcome)
        if self.pipeline.snapshots.failures:
            # Redis was down at some point: make sure the call leaves the active set.
            _finish_snapshot_later(self.pipeline.snapshot_store, session.call_sid)

    async def _settle(self) -> None:
        """Stop what the call started: the opening, the greeting; let rescues finish."""
        opening = self._opening
        if opening is not None:
            if not opening.done():
                opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._rescues:
            # Bounded: their database writes time out and queue instead.
            await asyncio.wait(list(self._rescues), timeout=RESCUE_GRACE_SECS)

    # -- event handlers --------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str, group: set[asyncio.Task]) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{name}-{self.session.call_sid}")
        group.add(task)
        task.add_done_callback(group.discard)

    async def _on_connected(self, _transport: object, _client: object) -> None:
        # Setting the first node waits until the greeting has been played. It runs as
        # its own task so a caller hanging up during the greeting is not stuck behind it
        # (the transport waits for its event handlers before it can shut down).
        self._spawn(self.start(), "flow-start", self._tasks)

    async def _on_disconnected(self, _transport: object, _client: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.pipeline.worker.cancel(reason="caller disconnected")

    async def _on_user_turn(self, _agg: object, _strategy: object, message: Any) -> None:
        if getattr(message, "content", None):
            self.session.transcript.append({"role": "caller", "text": message.content})
            self.pipeline.snapshots.snapshot_now()  # the ops console shows the words at once
        self.state.idle_prompts = 0
        if not self.rescue.rescued:
            await self.pipeline.dead_air.arm()

    async def _on_bot_turn(self, _agg: object, message: Any) -> None:
        if message.content:
            self.session.transcript.append(
                {"role": "bot", "text": message.content, "interrupted": message.interrupted}
            )
        self.session.flow_node = self.pipeline.manager.current_node
        self.pipeline.snapshots.snapshot_now()

    async def _on_user_idle(self, _agg: object) -> None:
        await self.on_idle()

    async def _on_pipeline_error(self, _worker: object, frame: Any) -> None:
        await self.on_error(source=getattr(frame, "processor", None), error=frame.error)


#: Background tasks that take finished calls out of Redis's active set once Redis is back.
_SNAPSHOT_FINISHERS: set[asyncio.Task] = set()


def _finish_snapshot_later(store: SnapshotStore, call_sid: str) -> None:
    """Mark the call finished in Redis, retrying in the background while Redis is down.

    The snapshot processor's own last write gives up after a couple of seconds; without
    this a call that ended during a Redis outage stayed in ``voice_agent:calls:active``.
    """

    async def finish() -> None:
        delay = 0.5
        deadline = time.monotonic() + SNAPSHOT_FINISH_RETRY_SECS
        while True:
            try:
                await asyncio.wait_for(store.finish(call_sid), 2)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    logger.error(
                        f"call {call_sid}: still listed as active in Redis, which stayed "
                        f"unreachable ({type(exc).__name__})"
                    )
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    task = asyncio.ensure_future(finish())
    task.set_name(f"snapshot-finish-{call_sid}")
    _SNAPSHOT_FINISHERS.add(task)
    task.add_done_callback(_SNAPSHOT_FINISHERS.discard)


class _TTSHealth:
    """Whether the TTS socket came back after an error (Pipecat reconnects it at once).

    Args:
        tts: The call's TTS service.
    """

    def __init__(self, tts: Any) -> None:
        self._tts = tts
        self._refused_at = 0.0
        self._failed_at = 0.0
        tts.add_event_handler("on_connection_error", self._on_connection_error)

    async def _on_connection_error(self, _service: object, _error: object) -> None:
        self._refused_at = time.monotonic()

    def mark_failed(self) -> None:
        """An error came from the TTS (its reconnect may already have been refused)."""
        self._failed_at = time.monotonic()

    def _socket_open(self) -> bool:
        # Pipecat 1.14 keeps the socket in ``_websocket``; a new, open one means the
        # reconnect after the drop worked.
        from websockets.protocol import State

        ws = getattr(self._tts, "_websocket", None)
        return ws is not None and getattr(ws, "state", None) is State.OPEN

    async def alive(self) -> bool:
        """Wait briefly for the TTS to reconnect; False when it is refused or too slow."""
        deadline = time.monotonic() + TTS_RECOVERY_SECS
        await asyncio.sleep(0.05)  # the error is reported before the reconnect starts
        while time.monotonic() < deadline:
            # A refusal within a second before the error reached us belongs to this drop
            # (the reconnect is tried, and refused, before the error is handled).
            if self._refused_at > self._failed_at - 1.0:
                return False
            if self._socket_open():
                return True
            await asyncio.sleep(0.02)
        return False


def _anonymous(session: CallSession) -> CallSession:
    """A copy of the session that knows nothing about the caller (for the plain greeting)."""
    return CallSession(
        call_sid=session.call_sid,
        caller_phone=session.caller_phone,
        direction=session.direction,
        scenario=session.scenario,
    )


def _first_sentence(text: str) -> str:
    end = text.find(". ")
    return text[: end + 1] if end >= 0 else text

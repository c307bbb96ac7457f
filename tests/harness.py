"""End-to-end harness: the real server (runner.create_app under uvicorn) on a real port,
with Deepgram, OpenAI and Twilio replaced by the wire-protocol fakes in ``tests/fakes``.

The production code reaches the fakes only through its configured URLs
(``DEEPGRAM_STT_URL``, ``DEEPGRAM_TTS_URL``, ``OPENAI_BASE_URL``, ``TWILIO_API_BASE_URL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from html import unescape
from typing import Any, TypeVar

import httpx
import psycopg
import redis.asyncio as aioredis
import uvicorn
from loguru import logger
from psycopg.rows import dict_row
from twilio.request_validator import RequestValidator

from api.telephony import CallHooks
from core.settings import Settings
from runner import create_app, uvicorn_config
from tests.conftest_db import delete_keys, new_name
from tests.fakes.deepgram_stt import FakeDeepgramSTT
from tests.fakes.deepgram_tts import FakeDeepgramTTS
from tests.fakes.openai_chat import FakeOpenAI, Step, call_tool, fail, say
from tests.fakes.twilio_media import TwilioMediaClient, new_sid
from tests.fakes.twilio_rest import FakeTwilioREST

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "e2e-auth-token"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    """``X-Twilio-Signature`` for a webhook POST, as Twilio computes it."""
    return RequestValidator(token).compute_signature(url, params)


def parse_stream_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    """``(stream url, parameters)`` of a ``<Connect><Stream>`` TwiML document."""
    url = re.search(r'<Stream url="([^"]+)"', twiml)
    assert url, twiml
    params = dict(re.findall(r'<Parameter name="([^"]+)" value="([^"]*)"', twiml))
    return unescape(url.group(1)), {k: unescape(v) for k, v in params.items()}


def last_tool_result(body: dict[str, Any], name: str) -> dict[str, Any]:
    """The latest result of tool ``name`` in an OpenAI request's messages."""
    calls = {}
    for message in body["messages"]:
        for call in message.get("tool_calls") or []:
            calls[call["id"]] = call["function"]["name"]
    for message in reversed(body["messages"]):
        if message.get("role") == "tool" and calls.get(message.get("tool_call_id")) == name:
            content = message["content"]
            return json.loads(content) if isinstance(content, str) else content
    raise AssertionError(f"no {name} result in the request: {body['messages']}")


#: What demo customer Maria says in the scripted booking call, one item per utterance.
BOOKING_UTTERANCES = [
    "Hi, I need an oil change for my Camry.",
    "April twelfth, nineteen eighty-five.",
    "The first one, I'll wait there.",
    "No, that's all. Thanks!",
]


def booking_script() -> list[Step]:
    """The LLM side of the scripted booking call: verify, look up the vehicle, offer two
    slots, book the first, read back the confirmation code, end the call."""

    def offer_slots(body: dict[str, Any]) -> Step:
        slots = last_tool_result(body, "check_availability")["slots"]
        return say(f"I have {slots[0]['when']} or {slots[1]['when']}. Which works?")

    def book_first(body: dict[str, Any]) -> Step:
        slot = last_tool_result(body, "check_availability")["slots"][0]
        vehicle = last_tool_result(body, "get_vehicle_history")["vehicles"][0]
        return call_tool(
            "book_appointment",
            {
                "slot_id": slot["slot_id"],
                "vehicle_id": vehicle["vehicle_id"],
                "service_type": "oil_change",
                "transportation": "waiter",
            },
        )

    def read_back(body: dict[str, Any]) -> Step:
        code = last_tool_result(body, "book_appointment")["confirmation_code_spoken"]
        return say(f"You're all set. Your confirmation code is {code}. Anything else?")

    return [
        say("I can help with that. Can you confirm your date of birth?"),
        call_tool("verify_customer", {"date_of_birth": "1985-04-12"}),
        call_tool("get_vehicle_history", {}),
        call_tool("check_availability", {"service_type": "oil_change"}),
        offer_slots,
        book_first,
        read_back,
        call_tool("end_call", {"reason": "caller is done"}),
    ]


def with_summaries(
    conversation: list[Step],
    *,
    so_far: dict[str, Any] | Step | None = None,
    final: dict[str, Any] | Step | None = None,
) -> list[Step]:
    """An LLM script for a call whose summaries are also asked of the LLM.

    The conversation's requests (streamed) take ``conversation`` in order, then the fake's
    default reply; the summary requests (one non-streamed JSON completion each) get
    ``so_far`` (the warm-transfer "summary so far") or ``final`` (after the call): a dict is
    answered as JSON, a step as that step, ``None`` with a non-retryable 500.
    """
    steps = list(conversation)

    def respond(body: dict[str, Any]) -> Step:
        if not body.get("stream"):
            system = str(body["messages"][0]["content"])
            reply = so_far if "still in progress" in system else final
            if reply is None:
                return fail(500, retryable=False)
            return say(json.dumps(reply)) if isinstance(reply, dict) else reply
        return steps.pop(0) if steps else say("Is there anything else?")

    return [respond] * 200


@dataclass
class Agent:
    """The running server and its fakes."""

    base_url: str
    settings: Settings
    stt: FakeDeepgramSTT
    tts: FakeDeepgramTTS
    llm: FakeOpenAI
    twilio: FakeTwilioREST
    database_url: str
    app: Any
    http: httpx.AsyncClient
    #: The app's call hooks: the calls in progress, per-call pipeline knobs.
    call_hooks: CallHooks = field(default_factory=CallHooks)
    clients: list[TwilioMediaClient] = field(default_factory=list)
    #: Where the test reads the database (the agent's own URL may go through a proxy).
    observe_database_url: str | None = None

    async def post_signed(self, path: str, form: dict[str, str]) -> httpx.Response:
        """POST a Twilio webhook with a valid signature."""
        url = self.settings.public_base_url.rstrip("/") + path  # type: ignore[union-attr]
        return await self.http.post(
            path, data=form, headers={"X-Twilio-Signature": sign(url, form)}
        )

    async def inbound_call(
        self, caller: str, *, call_sid: str | None = None, connect: bool = True
    ) -> TwilioMediaClient:
        """Ring the Twilio webhook like Twilio does, then open the media stream it returns."""
        call_sid = call_sid or new_sid("CA")
        form = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "From": caller,
            "To": "+15555550199",
            "CallStatus": "ringing",
            "Direction": "inbound",
        }
        response = await self.post_signed("/twilio/voice", form)
        assert response.status_code == 200, response.text
        url, params = parse_stream_twiml(response.text)
        client = TwilioMediaClient(
            url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
        )
        self.clients.append(client)
        if connect:
            await client.connect()
        return client

    async def answered_outbound_call(
        self,
        *,
        to: str,
        scenario: str,
        customer_id: int,
        call_sid: str | None = None,
        answered_by: str | None = "human",
    ) -> TwilioMediaClient:
        """An outbound call a person answered: Twilio fetches /twilio/outbound, then streams.

        ``answered_by=None`` is a call with asynchronous AMD (no ``AnsweredBy`` yet).
        """
        call_sid = call_sid or new_sid("CA")
        path = f"/twilio/outbound?scenario={scenario}&customer_id={customer_id}"
        form = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "To": to,
            "From": "+15555550199",
        }
        if answered_by is not None:
            form["AnsweredBy"] = answered_by
        response = await self.post_signed(path, form)
        assert response.status_code == 200, response.text
        url, params = parse_stream_twiml(response.text)
        client = TwilioMediaClient(
            url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
        )
        self.clients.append(client)
        await client.connect()
        return client

    async def answer_placed_call(self, call_sid: str) -> TwilioMediaClient:
        """A call the server placed (through the REST fake) is answered: Twilio fetches
        its ``Url`` (no ``AnsweredBy`` with asynchronous AMD), then streams."""
        call = self.twilio.calls[call_sid]
        url = call["url"]
        assert url and url.startswith(self.base_url), url
        form = {
            "CallSid": call_sid,
            "AccountSid": ACCOUNT_SID,
            "To": call["to"],
            "From": call["from"],
            "CallStatus": "in-progress",
            "Direction": "outbound-api",
        }
        response = await self.http.post(
            url.removeprefix(self.base_url),
            data=form,
            headers={"X-Twilio-Signature": sign(url, form)},
        )
        assert response.status_code == 200, response.text
        stream_url, params = parse_stream_twiml(response.text)
        client = TwilioMediaClient(
            stream_url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
        )
        self.clients.append(client)
        await client.connect()
        return client

    async def end_stream(self, call_sid: str) -> None:
        """Twilio ends a call's media stream (``stop``, then the socket closes), as it does
        when the call gets new TwiML."""
        for client in self.clients:
            if client.call_sid == call_sid and not client.closed:
                await client.hang_up()

    def call_updates(self, call_sid: str) -> list[Any]:
        """REST updates of a live call (``POST .../Calls/{sid}.json``), in order."""
        return self.twilio.requests_to("POST", f"/Calls/{call_sid}.json")

    def hang_ups(self, call_sid: str) -> list[Any]:
        """REST updates that hung the call up (``Status=completed``)."""
        return [r for r in self.call_updates(call_sid) if r.form.get("Status") == "completed"]

    def query(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        """Rows of a query against the agent's database."""
        url = self.observe_database_url or self.database_url
        with psycopg.connect(url, row_factory=dict_row) as conn:
            return conn.execute(sql, params).fetchall()

    async def wait_for_call_row(self, call_sid: str, timeout: float = 15.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The ``calls`` row once the call has ended (``ended_at`` set)."""
        async with asyncio.timeout(timeout):
            while True:
                rows = self.query("SELECT * FROM calls WHERE call_sid = %s", (call_sid,))
                if rows and rows[0]["ended_at"] is not None:
                    return rows[0]
                await asyncio.sleep(0.1)


async def _delete_agent_keys(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await delete_keys(client, prefix)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def running_agent(
    *,
    database_url: str,
    redis_url: str,
    stt: FakeDeepgramSTT | None = None,
    tts: FakeDeepgramTTS | None = None,
    llm: FakeOpenAI | None = None,
    env: dict[str, str] | None = None,
    observe_database_url: str | None = None,
) -> AsyncIterator[Agent]:
    """Start the fakes and the server; stop everything on exit.

    Args:
        database_url: A migrated (and usually seeded) database.
        redis_url: Redis URL.
        observe_database_url: Where the test's own queries go when ``database_url`` is a
            proxy the test cuts (default: ``database_url``).
        stt: Deepgram STT fake (default settings when omitted).
        tts: Deepgram TTS fake (a fast talker by default: 10 ms per character).
        llm: OpenAI fake.
        env: Extra settings (by environment name).

    Yields:
        The running agent. Its Redis keys sit under a fresh ``REDIS_KEY_PREFIX`` (unless
        ``env`` names one), deleted when it stops: nothing else in the Redis is touched.
    """
    stt = stt or FakeDeepgramSTT()
    tts = tts or FakeDeepgramTTS(secs_per_char=0.01)
    llm = llm or FakeOpenAI()
    twilio = FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN)
    env = {"REDIS_KEY_PREFIX": new_name(), **(env or {})}
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_delete_agent_keys, redis_url, env["REDIS_KEY_PREFIX"])
        for fake in (stt, tts, llm, twilio):
            await stack.enter_async_context(fake)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        settings = Settings(
            _env_file=None,
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            OPENAI_API_KEY="sk-e2e",
            OPENAI_BASE_URL=llm.base_url,
            DEEPGRAM_API_KEY="dg-e2e",
            DEEPGRAM_STT_URL=stt.url,
            DEEPGRAM_TTS_URL=tts.url,
            TWILIO_ACCOUNT_SID=ACCOUNT_SID,
            TWILIO_AUTH_TOKEN=AUTH_TOKEN,
            TWILIO_PHONE_NUMBER="+15555550199",
            TWILIO_API_BASE_URL=twilio.base_url,
            PUBLIC_BASE_URL=base_url,
            ADMIN_TOKEN="e2e-admin",
            LOG_LEVEL="WARNING",
            HOST="127.0.0.1",
            PORT=port,
            **env,
        )
        call_hooks = CallHooks(active={})
        app = create_app(settings, call_hooks=call_hooks)
        server = uvicorn.Server(uvicorn_config(app, settings))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        http = httpx.AsyncClient(base_url=base_url, timeout=10)
        agent = Agent(
            base_url=base_url,
            settings=settings,
            stt=stt,
            tts=tts,
            llm=llm,
            twilio=twilio,
            database_url=database_url,
            app=app,
            call_hooks=call_hooks,
            http=http,
            observe_database_url=observe_database_url,
        )
        streams_ended: set[asyncio.Task] = set()

        def redirected(call_sid: str) -> None:
            task = asyncio.ensure_future(agent.end_stream(call_sid))
            streams_ended.add(task)
            task.add_done_callback(streams_ended.discard)

        twilio.on_redirect = redirected
        try:
            yield agent
        finally:
            if streams_ended:
                await asyncio.gather(*streams_ended, return_exceptions=True)
            for client in agent.clients:
                await client.close()
            await http.aclose()
            server.should_exit = True
            await asyncio.wait_for(task, 30)


T = TypeVar("T")


@dataclass
class ThreadedAgent:
    """A running agent served from its own event loop in a background thread.

    Synchronous tests (hypothesis ``@given`` ones) talk to it over ``base_url`` with
    synchronous clients; :meth:`run` runs a coroutine on the agent's loop (e.g. to read
    the fakes' state or the database through the app's resources).
    """

    agent: Agent
    loop: asyncio.AbstractEventLoop

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the server."""
        return self.agent.base_url

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the agent's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]


@contextlib.contextmanager
def agent_in_thread(**kwargs: Any) -> Iterator[ThreadedAgent]:
    """:func:`running_agent` in a background thread with its own event loop.

    Lets one server serve a whole test module of synchronous tests (a module-scoped
    fixture), which hypothesis needs: its examples cannot share a per-test event loop.

    Args:
        **kwargs: Passed to :func:`running_agent`.

    Yields:
        The threaded agent; stopped (and the thread joined) on exit.
    """
    ready: dict[str, Any] = {}
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        try:
            async with running_agent(**kwargs) as agent:
                ready["agent"] = agent
                started.set()
                await stop.wait()
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            raise

    def main() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(BaseException):
            loop.run_until_complete(serve())
        loop.close()

    thread = threading.Thread(target=main, name="agent-in-thread", daemon=True)
    thread.start()
    started.wait(120)
    if "agent" not in ready:
        raise RuntimeError(f"the agent did not start: {ready.get('error')!r}")
    try:
        yield ThreadedAgent(agent=ready["agent"], loop=loop)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)


class LogCapture:
    """Loguru lines (WARNING and up, tracebacks included) and uvicorn's error log records,
    while active.

    Enter it after the server has started when the server is built inside the block
    (uvicorn's logging setup replaces the handlers of its loggers).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.uvicorn: list[str] = []
        self._sink: int | None = None
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self.uvicorn.append(  # type: ignore[method-assign]
            record.getMessage() + (" Traceback" if record.exc_info else "")
        )

    def __enter__(self) -> LogCapture:
        self._sink = logger.add(self.lines.append, level="WARNING", diagnose=False)
        logging.getLogger("uvicorn.error").addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._sink is not None
        logger.remove(self._sink)
        logging.getLogger("uvicorn.error").removeHandler(self._handler)

    @property
    def text(self) -> str:
        """The loguru lines, joined."""
        return "".join(self.lines)

    def assert_clean(self) -> None:
        """No traceback and no unhandled ASGI exception was logged."""
        assert "Traceback" not in self.text, self.text
        assert not any("Exception in ASGI" in m or "Traceback" in m for m in self.uvicorn), (
            self.uvicorn
        )

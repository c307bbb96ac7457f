"""Capacity benchmark: K concurrent phone calls paced in real time, for growing K, against
``runner.py serve --workers W`` and, in the same run, against a reference bot assembled
the way Pipecat's ``twilio-chatbot`` example assembles it (``benchmarks/reference_bot.py``).

Usage::

    python benchmarks/capacity.py [--workers 1,2] [--ks 1,2,4,8,12,16,24,32] [--turns 5]
                                  [--targets ours,reference] [--profile-k K]
                                  [--line-noise-dbfs -50]

Each call: the Twilio webhook, then the media stream with the project's Twilio client
(``tests/fakes/twilio_media.py``), the greeting, then ``--turns`` caller turns (0.8 s of
speech, the bot's reply, a short pause), then a hang-up; calls start ``--stagger``
seconds apart. Between turns a caller sends digital silence, or with
``--line-noise-dbfs`` a line's hiss at that level (the VAD skips its model on quiet
windows, so a noisy line costs more). The fakes add cloud-like delays (STT final 150 ms,
LLM first token 350 ms, TTS first byte 150 ms: 650 ms in all). Per K it prints: turns
measured/expected, voice-to-voice overhead p50/p95 (phone voice-to-voice minus the
injected 650 ms; what is left is endpointing plus both pipelines), server CPU % per
call, RSS per worker process and per added call, dead-air turns (no bot audio within 2
s), the load average. A level whose overhead p50 is 300 ms above the target's K=1 level,
whose dead air is 10 % of the turns above it, or with missing turns, is saturated and
ends the sweep of that target.
``--profile-k K`` records the busiest worker at that K with py-spy
(``benchmarks/results/capacity-profile-*.txt``).

Writes ``benchmarks/results/capacity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.profile import load_profile  # noqa: E402
from core.settings import DEFAULT_PROFILE  # noqa: E402
from seeding import seed  # noqa: E402
from tests.fakes.audio import line_noise_ulaw, speech_ulaw  # noqa: E402
from tests.fakes.deepgram_stt import FakeDeepgramSTT  # noqa: E402
from tests.fakes.deepgram_tts import FakeDeepgramTTS  # noqa: E402
from tests.fakes.openai_chat import FakeOpenAI  # noqa: E402
from tests.fakes.twilio_media import TwilioMediaClient, new_sid  # noqa: E402
from tests.fakes.twilio_rest import FakeTwilioREST  # noqa: E402
from tests.harness import ACCOUNT_SID, AUTH_TOKEN, free_port, parse_stream_twiml, sign  # noqa: E402

DELAYS = {"stt_final": 0.15, "llm_first_token": 0.35, "tts_first_byte": 0.15}
INJECTED = sum(DELAYS.values())
DEAD_AIR_SECS = 2.0
CALLER = "+15555550100"
RESULTS = ROOT / "benchmarks" / "results"


class ChattyCallerSTT(FakeDeepgramSTT):
    """Every utterance of every call transcribes to the same sentence (no global script:
    calls run concurrently)."""

    def _burst_text(self, burst: Any) -> str | None:
        if burst.text is None:
            burst.text = "I have a question about my car."
        return burst.text


@dataclass
class Level:
    """The measurements of one K."""

    target: str
    workers: int
    k: int
    v2v: list[float] = field(default_factory=list)
    missing: int = 0
    failed_calls: int = 0
    expected: int = 0
    cpu_secs: float = 0.0
    wall_secs: float = 0.0
    cpu_by_process: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    rss_idle_mb: list[float] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    client_cpu_secs: float = 0.0

    def summary(self) -> dict[str, Any]:
        over = sorted(v - INJECTED for v in self.v2v)
        dead = self.missing + sum(1 for v in self.v2v if v > DEAD_AIR_SECS)
        p = lambda q: over[min(len(over) - 1, int(q * len(over)))] * 1000 if over else None  # noqa: E731
        rss_total = sum(self.rss_mb)
        return {
            "target": self.target,
            "workers": self.workers,
            "k": self.k,
            "turns": len(self.v2v),
            "expected": self.expected,
            "failed_calls": self.failed_calls,
            "overhead_p50_ms": round(statistics.median(over) * 1000) if over else None,
            "overhead_p95_ms": round(p(0.95)) if over else None,
            "dead_air_turns": dead,
            "cpu_pct_total": round(100 * self.cpu_secs / self.wall_secs, 1),
            "cpu_pct_per_call": round(100 * self.cpu_secs / self.wall_secs / self.k, 2),
            "cpu_pct_by_process": [round(c, 1) for c in self.cpu_by_process],
            "rss_mb_per_process": [round(r) for r in self.rss_mb],
            "rss_mb_total": round(rss_total),
            "rss_mb_per_call_over_idle": round((rss_total - sum(self.rss_idle_mb)) / self.k, 2),
            "load_avg": [round(x, 1) for x in self.load],
            # The callers and the fakes share the machine: when this nears 100 % (one
            # core), the benchmark, not the server, is the limit.
            "client_cpu_pct": round(100 * self.client_cpu_secs / self.wall_secs, 1),
        }

    def saturated(self, baseline: Level | None) -> bool:
        """Worse than the same target's K=1 level by more than noise: overhead p50 up by
        300 ms, dead air up by 10 % of the turns, or turns missing. (p95 alone is too
        noisy here: the smart-turn model's "incomplete" verdicts make it bimodal.)"""
        s = self.summary()
        if s["overhead_p50_ms"] is None or s["turns"] < 0.95 * self.expected:
            return True
        if baseline is None or baseline is self:
            return False
        b = baseline.summary()
        dead, dead_before = s["dead_air_turns"], b["dead_air_turns"]
        return (
            s["overhead_p50_ms"] > (b["overhead_p50_ms"] or 0) + 300
            or dead / self.expected > dead_before / baseline.expected + 0.10
        )


def server_env(
    *, database_url: str, redis_url: str, stt: Any, tts: Any, llm: Any, twilio: Any
) -> dict[str, str]:
    """The environment of a server under test (ours or the reference) on these fakes."""
    return {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
        },
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": llm.base_url,
        "DEEPGRAM_API_KEY": "dg-bench",
        "DEEPGRAM_STT_URL": stt.url,
        "DEEPGRAM_TTS_URL": tts.url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_PHONE_NUMBER": "+15555550199",
        "TWILIO_API_BASE_URL": twilio.base_url,
        "ADMIN_TOKEN": "bench",
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "DRAIN_GRACE_SECS": "0",
        "DRAIN_TIMEOUT_SECS": "5",
    }


class ServerUnderTest:
    """One server subprocess (ours or the reference) and its process tree."""

    def __init__(self, target: str, workers: int, env: dict[str, str], log: Path) -> None:
        self.target = target
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {**env, "PORT": str(self.port), "PUBLIC_BASE_URL": self.base_url}
        if target == "ours":
            args = [sys.executable, str(ROOT / "runner.py"), "serve", "--workers", str(workers)]
        else:
            args = [
                sys.executable,
                str(ROOT / "benchmarks" / "reference_bot.py"),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ]
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.workers = workers

    def worker_processes(self) -> list[psutil.Process]:
        """The processes that serve calls (the workers; the parent when there is one)."""
        parent = psutil.Process(self.proc.pid)
        kids = [
            p
            for p in parent.children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline()) or "multiprocessing" in " ".join(p.cmdline())
        ]
        kids = [p for p in kids if "resource_tracker" not in " ".join(p.cmdline())]
        return kids or [parent]

    def tree(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    async def wait_ready(self) -> None:
        path = "/ready" if self.target == "ours" else "/health"
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as http:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"{self.target} exited"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(path)).status_code == 200:
                        if len(self.worker_processes()) >= self.workers:
                            await asyncio.sleep(3)  # the other workers finish starting
                            return
                await asyncio.sleep(0.5)
        raise TimeoutError(f"{self.target} not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for p in self.tree():
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
                self.proc.wait(10)
        self.log.close()


def cpu_secs(processes: list[psutil.Process]) -> list[float]:
    out = []
    for p in processes:
        try:
            t = p.cpu_times()
            out.append(t.user + t.system)
        except psutil.NoSuchProcess:
            out.append(0.0)
    return out


def rss_mb(processes: list[psutil.Process]) -> list[float]:
    out = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(p.memory_info().rss / 2**20)
    return out


async def one_call(
    server: ServerUnderTest, index: int, turns: int, level: Level, idle_audio: bytes | None
) -> None:
    call_sid = new_sid("CA")
    form = {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": CALLER,
        "To": "+15555550199",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    url = server.base_url + "/twilio/voice"
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            url, data=form, headers={"X-Twilio-Signature": sign(url, form, AUTH_TOKEN)}
        )
    response.raise_for_status()
    stream_url, params = parse_stream_twiml(response.text)
    client = TwilioMediaClient(
        stream_url,
        call_sid=call_sid,
        account_sid=ACCOUNT_SID,
        custom_parameters=params,
        idle_audio=idle_audio,
    )
    rng = random.Random(index)
    try:
        await client.connect()
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=60)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=60)
        for _ in range(turns):
            end = await client.send_audio(speech_ulaw(0.8))
            try:
                await client.wait_for_bot_audio(min_seconds=0.2, timeout=10, since=end)
            except (TimeoutError, AssertionError):
                level.missing += 1
                continue
            first = client.first_bot_audio_after(end)
            if first is None:
                level.missing += 1
                continue
            level.v2v.append(first - end)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
            await asyncio.sleep(rng.uniform(0.3, 0.8))
    except Exception as exc:  # a call that could not run counts its turns as missing
        level.failed_calls += 1
        print(f"  call {index} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await client.hang_up()
        await client.close()


async def run_level(
    server: ServerUnderTest,
    *,
    k: int,
    turns: int,
    stagger: float,
    idle_rss: list[float],
    idle_audio: bytes | None = None,
) -> Level:
    level = Level(target=server.target, workers=server.workers, k=k, expected=k * turns)
    procs = server.worker_processes()
    level.rss_idle_mb = idle_rss
    peak_rss: list[float] = list(idle_rss)
    before = cpu_secs(procs)
    me = psutil.Process()
    client_before = sum(me.cpu_times()[:2])
    started = time.monotonic()

    async def sample_rss() -> None:
        nonlocal peak_rss
        while True:
            now = rss_mb(procs)
            if len(now) == len(peak_rss):
                peak_rss = [max(a, b) for a, b in zip(peak_rss, now, strict=True)]
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample_rss())

    async def staggered(i: int) -> None:
        await asyncio.sleep(i * stagger)
        await one_call(server, i, turns, level, idle_audio)

    await asyncio.gather(*(staggered(i) for i in range(k)))
    sampler.cancel()
    level.wall_secs = time.monotonic() - started
    level.client_cpu_secs = sum(me.cpu_times()[:2]) - client_before
    after = cpu_secs(procs)
    deltas = [a - b for a, b in zip(after, before, strict=True)]
    level.cpu_secs = sum(deltas)
    level.cpu_by_process = [100 * d / level.wall_secs for d in deltas]
    level.rss_mb = peak_rss
    level.load = os.getloadavg()
    return level


def print_row(s: dict[str, Any]) -> None:
    print(
        f"{s['target']:<9} W={s['workers']} K={s['k']:>3}  "
        f"turns {s['turns']:>3}/{s['expected']:<3} "
        f"overhead p50 {s['overhead_p50_ms']!s:>5} p95 {s['overhead_p95_ms']!s:>5} ms  "
        f"dead air {s['dead_air_turns']:>2}  CPU {s['cpu_pct_total']:>5}% "
        f"({s['cpu_pct_per_call']}%/call, by process {s['cpu_pct_by_process']})  "
        f"RSS {s['rss_mb_per_process']} MB ({s['rss_mb_per_call_over_idle']} MB/call over idle)  "
        f"load {s['load_avg']}  client CPU {s['client_cpu_pct']}%",
        flush=True,
    )


async def profile_worker(server: ServerUnderTest, seconds: int, out: Path) -> None:
    """py-spy of the busiest worker while a level runs."""
    procs = server.worker_processes()
    first = cpu_secs(procs)
    await asyncio.sleep(3)
    busiest = max(zip(cpu_secs(procs), first, procs, strict=True), key=lambda t: t[0] - t[1])[2]
    spy = Path(sys.executable).parent / "py-spy"
    proc = await asyncio.create_subprocess_exec(
        str(spy),
        "record",
        "--nonblocking",  # never pause the worker (it would distort the level it samples)
        "--pid",
        str(busiest.pid),
        "--duration",
        str(seconds),
        "--format",
        "raw",
        "--rate",
        "50",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()


async def main() -> int:
    parser = argparse.ArgumentParser(description="capacity benchmark")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--ks", default="1,2,4,8,12,16,24,32")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--stagger", type=float, default=0.5)
    parser.add_argument("--targets", default="ours,reference")
    parser.add_argument(
        "--line-noise-dbfs",
        type=float,
        default=None,
        help="callers' idle audio: line noise at this RMS level (e.g. -60) instead of silence",
    )
    parser.add_argument(
        "--profile-k", type=int, default=0, help="py-spy the busiest worker at this K (0: never)"
    )
    args = parser.parse_args()
    idle_audio = (
        None
        if args.line_noise_dbfs is None
        else line_noise_ulaw(2.0, dbfs=args.line_noise_dbfs, seed=11)
    )
    RESULTS.mkdir(parents=True, exist_ok=True)

    tmp = tempfile.TemporaryDirectory(prefix="va-capacity-")
    stack: list[Any] = []
    admin_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    if not admin_url:
        from core.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres()
        await pg.astart(Path(tmp.name) / "pg")
        stack.append(pg.astop)
        admin_url = pg.url
    if not redis_url:
        from core.embedded import EmbeddedRedis

        rd = EmbeddedRedis()
        await rd.astart(Path(tmp.name) / "redis")
        stack.append(rd.astop)
        redis_url = rd.url
    name = f"va_capacity_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    database_url = make_conninfo(**params)
    from crm.migrate import apply_migrations

    await apply_migrations(database_url)
    profile = load_profile(DEFAULT_PROFILE)
    await seed(
        database_url,
        customers=50,
        seed=7,
        anchor_date=datetime.now(profile.time_zone).date(),
        profile=profile,
    )

    stt = ChattyCallerSTT(final_delay=DELAYS["stt_final"])
    tts = FakeDeepgramTTS(secs_per_char=0.05, first_byte_delay=DELAYS["tts_first_byte"])
    llm = FakeOpenAI(first_token_delay=DELAYS["llm_first_token"])
    twilio = FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN)
    summaries: list[dict[str, Any]] = []
    try:
        async with stt, tts, llm, twilio:
            env = server_env(
                database_url=database_url,
                redis_url=redis_url,
                stt=stt,
                tts=tts,
                llm=llm,
                twilio=twilio,
            )
            ks = [int(k) for k in args.ks.split(",")]
            for workers in [int(w) for w in args.workers.split(",")]:
                for target in args.targets.split(","):
                    server = ServerUnderTest(
                        target, workers, env, RESULTS / f"capacity-{target}-w{workers}.log"
                    )
                    try:
                        await server.wait_ready()
                        idle = rss_mb(server.worker_processes())
                        baseline: Level | None = None
                        for k in ks:
                            profiling = None
                            if k == args.profile_k:
                                out = RESULTS / f"capacity-profile-{target}-w{workers}.txt"
                                profiling = asyncio.create_task(profile_worker(server, 20, out))
                            level = await run_level(
                                server,
                                k=k,
                                turns=args.turns,
                                stagger=args.stagger,
                                idle_rss=idle,
                                idle_audio=idle_audio,
                            )
                            if profiling is not None:
                                await profiling
                            summary = level.summary()
                            summaries.append(summary)
                            print_row(summary)
                            baseline = baseline or level
                            if level.saturated(baseline):
                                print(f"{target} W={workers}: saturated at K={k}", flush=True)
                                break
                            await asyncio.sleep(2)
                    finally:
                        server.stop()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for stop in reversed(stack):
            await stop()
        tmp.cleanup()
    # RSS per added call: the slope of the total RSS between the first and the last level
    # of each sweep (the first call of a process also pays for lazy imports and caches).
    slopes = {}
    for key in {(s["target"], s["workers"]) for s in summaries}:
        levels = [s for s in summaries if (s["target"], s["workers"]) == key]
        if len(levels) >= 2:
            first, last = levels[0], levels[-1]
            slope = (last["rss_mb_total"] - first["rss_mb_total"]) / (last["k"] - first["k"])
            slopes[f"{key[0]} W={key[1]}"] = round(slope, 2)
            print(f"{key[0]} W={key[1]}: {slope:.2f} MB RSS per added call", flush=True)
    out = RESULTS / "capacity.json"
    out.write_text(
        json.dumps(
            {
                "fake_delays_secs": DELAYS,
                "cores": len(os.sched_getaffinity(0)),
                "turns_per_call": args.turns,
                "line_noise_dbfs": args.line_noise_dbfs,
                "levels": summaries,
                "rss_mb_per_added_call": slopes,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

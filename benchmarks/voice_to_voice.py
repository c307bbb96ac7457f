"""Benchmark: voice-to-voice latency of a scripted phone call, end to end over real sockets.

Usage::

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \
        python benchmarks/voice_to_voice.py [--runs 2]

Runs the booking call of ``tests/test_e2e_calls.py`` (greeting, verification, vehicle
lookup, availability, booking, read-back) through the real server with the wire-protocol
fakes, twice per run:

* ``zero``: the fakes answer at once; what is left is our pipeline (VAD, smart-turn
  endpointing, aggregation, tools, Postgres, pacing), the in-run baseline;
* ``cloud``: the fakes add typical cloud delays (STT final 150 ms after the speech ends,
  LLM first token 350 ms, TTS first byte 150 ms).

Voice-to-voice is measured at the phone: caller's last audio frame sent to the first voiced
bot audio frame received. The table also shows the server's own per-turn breakdown (from
the ``calls`` row). Writes ``benchmarks/results/voice_to_voice.json``.

``--turn-kinds`` measures instead, per kind of caller turn, this project against a
reference bot assembled as Pipecat's ``twilio-chatbot`` example does
(``benchmarks/reference_bot.py``), both as servers in subprocesses on the same fakes with
the issue's cloud-like delays (STT final 250 ms, LLM first token 400 ms, TTS first byte
150 ms). Each call replays the caller corpus (``tests/fakes/caller_corpus.py``: espeak-ng
speech with mid-sentence pauses, trailing "um", numbers read in groups, one-word answers),
each utterance after the bot question that leads to it. Per kind: phone voice-to-voice
p50/p95 (the caller's last audio frame to the first bot audio), overhead (that minus the
800 ms the fakes add), false turn-ends (an utterance with a pause cut into two turns in
the LLM context: the bot took the pause for the end) and dead air (no bot audio within
1.5 s). Writes ``benchmarks/results/turn_kinds.json``.

``--tool-chains`` measures turns whose reply needs tools against a plain turn of the same
call, with the same cloud-like delays: per chain, the first bot audio at the phone (the
"Let me check." acknowledgement) and when the answer was ready (its text at the TTS plus
the TTS's first-audio delay; the plain turn's reply is measured the same way), their
ratio to the plain turn, and the tool gap (the longest wait from one LLM response's first
token to the next request: the tool round trip as the pipeline adds it). Chains: verify
then check availability then answer (three LLM requests); verify with the service named,
whose result carries the slots, then answer (two); verify and check availability as two
parallel tool calls of one response, then answer (two). Writes
``benchmarks/results/tool_chains.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.profile import load_profile  # noqa: E402
from core.settings import DEFAULT_PROFILE  # noqa: E402
from seeding import seed  # noqa: E402
from tests.fakes.audio import speech_ulaw  # noqa: E402
from tests.fakes.caller_corpus import (  # noqa: E402
    CORPUS,
    corpus_replies,
    ensure_speech_tools,
    replay_corpus,
    utterance_audio,
)
from tests.fakes.deepgram_stt import FakeDeepgramSTT  # noqa: E402
from tests.fakes.deepgram_tts import FakeDeepgramTTS  # noqa: E402
from tests.fakes.openai_chat import (  # noqa: E402
    FakeOpenAI,
)
from tests.fakes.twilio_media import TwilioMediaClient, new_sid  # noqa: E402
from tests.fakes.twilio_rest import FakeTwilioREST  # noqa: E402
from tests.harness import (  # noqa: E402
    ACCOUNT_SID,
    AUTH_TOKEN,
    BOOKING_UTTERANCES,
    booking_script,
    parse_stream_twiml,
    running_agent,
    sign,
)

PROFILES = {
    "zero": {"stt_final": 0.0, "llm_first_token": 0.0, "tts_first_byte": 0.0},
    "cloud": {"stt_final": 0.15, "llm_first_token": 0.35, "tts_first_byte": 0.15},
}


async def one_call(database_url: str, redis_url: str, delays: dict[str, float]) -> dict:
    stt = FakeDeepgramSTT(final_delay=delays["stt_final"])
    tts = FakeDeepgramTTS(secs_per_char=0.01, first_byte_delay=delays["tts_first_byte"])
    llm = FakeOpenAI(booking_script(), first_token_delay=delays["llm_first_token"])
    async with running_agent(
        database_url=database_url, redis_url=redis_url, stt=stt, tts=tts, llm=llm
    ) as agent:
        stt.script(BOOKING_UTTERANCES)
        client = await agent.inbound_call("+15555550100")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=30)
        await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
        phone_v2v = []
        for index in range(len(BOOKING_UTTERANCES)):
            end = await client.send_audio(speech_ulaw(0.8))
            if index == len(BOOKING_UTTERANCES) - 1:
                await client.wait_for_bot_audio(min_seconds=0.1, timeout=30, since=end)
                phone_v2v.append(client.first_bot_audio_after(end) - end)
                break
            await client.wait_for_bot_audio(min_seconds=0.2, timeout=30, since=end)
            phone_v2v.append(client.first_bot_audio_after(end) - end)
            await client.wait_for_bot_silence(silence_secs=0.5, timeout=30)
        await client.wait_closed(timeout=30)
        row = await agent.wait_for_call_row(client.call_sid)
        return {"phone_v2v": phone_v2v, "turns": row["turn_metrics"], "outcome": row["outcome"]}


@contextlib.asynccontextmanager
async def seeded_database(prefix: str) -> AsyncIterator[tuple[str, str]]:
    """A scratch database seeded with 50 customers, and a Redis URL; dropped afterwards.

    Uses ``DATABASE_URL`` / ``REDIS_URL`` when set, embedded servers otherwise.

    Yields:
        ``(database_url, redis_url)``.
    """
    admin_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    stack: list[Any] = []
    tmp = tempfile.TemporaryDirectory(prefix=f"{prefix}-")
    try:
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
        name = f"va_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            params = conninfo_to_dict(admin_url)
            params["dbname"] = name
            database_url = make_conninfo(**params)
            profile = load_profile(DEFAULT_PROFILE)
            today = datetime.now(profile.time_zone).date()
            await seed(database_url, customers=50, seed=7, anchor_date=today, profile=profile)
            yield database_url, redis_url
        finally:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        for stop in reversed(stack):
            await stop()
        tmp.cleanup()


async def main() -> int:
    parser = argparse.ArgumentParser(description="voice-to-voice latency benchmark")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--turn-kinds", action="store_true", help="per turn kind, against the reference bot"
    )
    parser.add_argument(
        "--tool-chains", action="store_true", help="tool-chain turns against a plain turn"
    )
    parser.add_argument(
        "--targets",
        default="ours,ours-speculative,reference",
        help="for --turn-kinds: ours, ours-speculative (SPECULATIVE_REPLIES=true), ours-flux "
        "(DEEPGRAM_STT_MODEL=flux-general-en), ours-flux-speculative (both), reference",
    )
    args = parser.parse_args()
    if args.tool_chains:
        return await tool_chains_main(runs=args.runs)
    if args.turn_kinds:
        return await turn_kinds_main(runs=args.runs, targets=args.targets.split(","))

    results: dict[str, list[dict]] = {k: [] for k in PROFILES}
    async with seeded_database("va-v2v") as (database_url, redis_url):
        for _ in range(args.runs):
            for label, delays in PROFILES.items():
                with psycopg.connect(database_url, autocommit=True) as conn:
                    conn.execute("DELETE FROM appointments WHERE call_sid IS NOT NULL")
                results[label].append(await one_call(database_url, redis_url, delays))

    summary: dict[str, Any] = {"fake_delays_secs": PROFILES, "profiles": {}}
    print(
        f"{'profile':<7} {'turn':>4} {'phone v2v ms':>12} {'server v2v':>10} {'stt':>6} "
        f"{'llm ttft':>8} {'tts ttfb':>8} {'endpoint':>8} tools"
    )
    for label, runs in results.items():
        per_turn: dict[int, list[float]] = {}
        for run in runs:
            for i, v in enumerate(run["phone_v2v"]):
                per_turn.setdefault(i + 1, []).append(v)
            for t in run["turns"]:
                tools = ",".join(f"{x['name']}:{x['secs'] * 1000:.0f}ms" for x in t["tools"])
                ms = {
                    k: "-" if t.get(k) is None else f"{t[k] * 1000:.0f}"
                    for k in (
                        "voice_to_voice_secs",
                        "stt_secs",
                        "llm_ttft_secs",
                        "tts_ttfb_secs",
                        "user_turn_secs",
                    )
                }
                phone = (
                    run["phone_v2v"][t["turn"] - 1] if t["turn"] <= len(run["phone_v2v"]) else None
                )
                print(
                    f"{label:<7} {t['turn']:>4} "
                    f"{'-' if phone is None else f'{phone * 1000:.0f}':>12} "
                    f"{ms['voice_to_voice_secs']:>10} {ms['stt_secs']:>6} "
                    f"{ms['llm_ttft_secs']:>8} {ms['tts_ttfb_secs']:>8} "
                    f"{ms['user_turn_secs']:>8} {tools}"
                )
        all_v2v = [v for run in runs for v in run["phone_v2v"]]
        summary["profiles"][label] = {
            "phone_v2v_median_ms": round(statistics.median(all_v2v) * 1000),
            "phone_v2v_max_ms": round(max(all_v2v) * 1000),
            "per_turn_median_ms": {
                k: round(statistics.median(v) * 1000) for k, v in per_turn.items()
            },
            "outcomes": [r["outcome"] for r in runs],
            "runs": runs,
        }
    zero = summary["profiles"]["zero"]["phone_v2v_median_ms"]
    cloud = summary["profiles"]["cloud"]["phone_v2v_median_ms"]
    added = sum(PROFILES["cloud"].values()) * 1000
    summary["cloud_over_zero_ratio"] = round(cloud / zero, 2) if zero else None
    print(
        f"median phone v2v: zero {zero} ms, cloud {cloud} ms (fakes add {added:.0f} ms), "
        f"ratio {summary['cloud_over_zero_ratio']}"
    )
    out = ROOT / "benchmarks" / "results" / "voice_to_voice.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    return 0


# -- turn kinds, against the reference -----------------------------------------------------

TURN_DELAYS = {"stt_final": 0.25, "llm_first_token": 0.40, "tts_first_byte": 0.15}
DEAD_AIR_SECS = 1.5


@dataclass
class TurnSample:
    """One caller utterance of one call, measured at the phone."""

    target: str
    kind: str
    v2v: float | None
    false_turn_end: bool
    endpointing: float | None = None


async def corpus_call(
    server: Any, target: str, stt: Any, llm: Any, database_url: str
) -> list[TurnSample]:
    """One call replaying the corpus against ``server``; the samples of its utterances.

    For this project, each sample also gets the server's own endpointing of the turn
    (the caller's silence to the end of turn decided: ``turn_metrics`` of the ``calls``
    row), when the call has as many turns as the corpus has utterances.
    """
    call_sid = new_sid("CA")
    form = {
        "CallSid": call_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+15555550100",
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
        stream_url, call_sid=call_sid, account_sid=ACCOUNT_SID, custom_parameters=params
    )
    if target.startswith("ours-flux"):  # a Flux turn is one utterance, said in parts
        stt.script([list(utterance.parts) for utterance in CORPUS])
    else:
        stt.script([part for utterance in CORPUS for part in utterance.parts])
    try:
        await client.connect()
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=60)
        await client.wait_for_bot_silence(silence_secs=0.7, timeout=60)
        turns = await replay_corpus(client, llm_requests=llm.requests)
    finally:
        with contextlib.suppress(Exception):
            await client.hang_up()
        await client.close()
    endpointing: list[float | None] = [None] * len(turns)
    if target != "reference":
        for _ in range(40):  # the row is written when the call has ended
            with psycopg.connect(database_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT turn_metrics FROM calls WHERE call_sid = %s AND ended_at IS NOT NULL",
                    (call_sid,),
                ).fetchone()
            if row:
                metrics = row[0] or []
                if len(metrics) >= len(turns):
                    endpointing = [m.get("user_turn_secs") for m in metrics[-len(turns) :]]
                break
            await asyncio.sleep(0.25)
    return [
        TurnSample(
            target=target,
            kind=t.kind,
            v2v=t.v2v,
            false_turn_end=t.false_turn_end,
            endpointing=e,
        )
        for t, e in zip(turns, endpointing, strict=True)
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def turn_kinds_main(*, runs: int, targets: list[str]) -> int:
    """Run ``runs`` corpus calls per target and print the table per turn kind."""
    from benchmarks.capacity import ServerUnderTest, server_env

    ensure_speech_tools()
    for utterance in CORPUS:  # synthesize (and cache) before any timing
        utterance_audio(utterance)
    samples: list[TurnSample] = []
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    async with seeded_database("va-turns") as (database_url, redis_url):
        # Deepgram's last interim of an utterance comes shortly after the speech ends;
        # its final only after the Finalize the VAD's stop sends (plus the STT delay).
        stt = FakeDeepgramSTT(final_delay=TURN_DELAYS["stt_final"], end_interim_delay=0.15)
        tts = FakeDeepgramTTS(secs_per_char=0.05, first_byte_delay=TURN_DELAYS["tts_first_byte"])
        # Every request is answered from the caller's last words: any number of them.
        llm = FakeOpenAI(
            [corpus_replies] * 10_000, first_token_delay=TURN_DELAYS["llm_first_token"]
        )
        # Flux: the turn ends 0.3 s into the caller's silence, its EndOfTurn arriving with
        # the same 250 ms as Nova's final; a pause between an utterance's parts (0.6 s and
        # more, longer than espeak's 0.16 s gaps between words) is not an end of turn (a
        # Flux that hears the sentence is unfinished: the fake knows the script) but, when
        # asked for, an EagerEndOfTurn 0.25 s into it and a TurnResumed after it.
        flux_stt = FakeDeepgramSTT(
            final_delay=TURN_DELAYS["stt_final"],
            silence_secs=0.3,
            eager_silence_secs=0.25,
            eot_waits_for_all_parts=True,
        )
        twilio = FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN)
        async with stt, flux_stt, tts, llm, twilio:
            env = server_env(
                database_url=database_url,
                redis_url=redis_url,
                stt=stt,
                tts=tts,
                llm=llm,
                twilio=twilio,
            )
            for target in targets:
                kind = "reference" if target == "reference" else "ours"
                extra: dict[str, str] = {}
                if target.endswith("speculative"):
                    extra["SPECULATIVE_REPLIES"] = "true"
                if target.startswith("ours-flux"):
                    extra |= {
                        "DEEPGRAM_STT_MODEL": "flux-general-en",
                        "DEEPGRAM_STT_URL": flux_stt.url,
                    }
                target_stt = flux_stt if target.startswith("ours-flux") else stt
                server = ServerUnderTest(
                    kind, 1, {**env, **extra}, results / f"turn-kinds-{target}.log"
                )
                try:
                    await server.wait_ready()
                    for _ in range(runs):
                        samples += await corpus_call(server, target, target_stt, llm, database_url)
                        await asyncio.sleep(1.0)
                finally:
                    server.stop()

    injected = sum(TURN_DELAYS.values())
    rows = []
    header = (
        f"{'kind':<20} {'target':<16} {'n':>3} {'v2v p50':>8} {'v2v p95':>8} "
        f"{'overhead p50':>12} {'endpoint':>9} {'false ends':>10} {'dead air':>8}"
    )
    print(header)
    print("-" * len(header))
    kinds = [u.kind for u in CORPUS] + ["all"]
    for kind in kinds:
        for target in targets:
            group = [x for x in samples if x.target == target and (kind == "all" or x.kind == kind)]
            if not group:
                continue
            v2v = [x.v2v for x in group if x.v2v is not None]
            row = {
                "kind": kind,
                "target": target,
                "n": len(group),
                "v2v_p50_ms": round(statistics.median(v2v) * 1000) if v2v else None,
                "v2v_p95_ms": round(_pct(v2v, 95) * 1000) if v2v else None,
                "overhead_p50_ms": round((statistics.median(v2v) - injected) * 1000)
                if v2v
                else None,
                "endpointing_p50_ms": (
                    round(statistics.median(ends) * 1000)
                    if (ends := [x.endpointing for x in group if x.endpointing is not None])
                    else None
                ),
                "false_turn_ends": sum(x.false_turn_end for x in group),
                "dead_air": sum(x.v2v is None or x.v2v > DEAD_AIR_SECS for x in group),
            }
            rows.append(row)
            cells = [
                "-" if row[k] is None else str(row[k])
                for k in ("v2v_p50_ms", "v2v_p95_ms", "overhead_p50_ms", "endpointing_p50_ms")
            ]
            print(
                f"{kind:<20} {target:<16} {row['n']:>3} {cells[0]:>8} {cells[1]:>8} "
                f"{cells[2]:>12} {cells[3]:>9} {row['false_turn_ends']:>10} {row['dead_air']:>8}"
            )
    out = results / "turn_kinds.json"
    out.write_text(
        json.dumps(
            {
                "fake_delays_secs": TURN_DELAYS,
                "dead_air_secs": DEAD_AIR_SECS,
                "runs": runs,
                "rows": rows,
                "samples": [vars(x) for x in samples],
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


# -- tool chains, against a plain turn -------------------------------------------------------

#: The chains measured: the model's steps after the caller's words (the answer last).
CHAINS: dict[str, list[Any]] = {
    "verify > availability > answer": [
        ("verify_customer", {"date_of_birth": "1985-04-12"}),
        ("check_availability", {"service_type": "oil_change"}),
    ],
    "verify+service > answer": [
        ("verify_customer", {"date_of_birth": "1985-04-12", "service_type": "oil_change"}),
    ],
    "verify | availability > answer": [  # both in one response, run side by side
        [
            ("verify_customer", {"date_of_birth": "1985-04-12"}),
            ("check_availability", {"service_type": "oil_change"}),
        ],
    ],
}
CHAIN_ANSWER = "Thanks, Maria. I have Tuesday at nine for the oil change. Does that work?"


async def chain_call(database_url: str, redis_url: str, steps: list[Any]) -> dict[str, float]:
    """One call: a plain turn, then the tool chain; phone and TTS times of both."""
    from tests.fakes.openai_chat import call_tool, call_tools, say

    script: list[Any] = [say("Sure. Can you confirm your date of birth?")]
    for step in steps:
        script.append(call_tools(step) if isinstance(step, list) else call_tool(*step))
    script.append(say(CHAIN_ANSWER))
    stt = FakeDeepgramSTT(final_delay=TURN_DELAYS["stt_final"])
    tts = FakeDeepgramTTS(secs_per_char=0.03, first_byte_delay=TURN_DELAYS["tts_first_byte"])
    llm = FakeOpenAI(script, first_token_delay=TURN_DELAYS["llm_first_token"])
    async with running_agent(
        database_url=database_url, redis_url=redis_url, stt=stt, tts=tts, llm=llm
    ) as agent:
        stt.script(["Hi, I need an oil change for my Camry.", "April twelfth, 1985."])
        client = await agent.inbound_call("+15555550100")
        await client.wait_for_bot_audio(min_seconds=0.3, timeout=30)
        await client.wait_for_bot_silence(silence_secs=0.6, timeout=30)
        times: dict[str, float] = {}
        for label in ("plain", "chain"):
            spoken = len(tts.texts)
            end = await client.send_audio(speech_ulaw(0.8))
            await client.wait_for_bot_audio(min_seconds=0.2, timeout=30, since=end)
            await client.wait_for_bot_silence(silence_secs=0.6, timeout=30)
            said = [t.strip() for t in tts.texts[spoken:]]
            reply = next(
                i
                for i, t in enumerate(said)
                if t.startswith(("Sure", "Thanks", "Let me")) and t != "Let me check."
            )
            times[f"{label}_first_audio"] = client.first_bot_audio_after(end) - end
            times[f"{label}_answer_ready"] = (
                tts.spoken_at[spoken + reply] - end + TURN_DELAYS["tts_first_byte"]
            )
            times[f"{label}_acknowledged"] = float("Let me check." in said)
            # Between one LLM response (its first token) and the next request: the tool
            # round trip as the pipeline adds it (tool run, frames, Flows' transition).
            asked = [t for t in llm.request_times if t >= end]
            gaps = [b - a - TURN_DELAYS["llm_first_token"] for a, b in itertools.pairwise(asked)]
            times[f"{label}_tool_gap"] = max(gaps) if gaps else 0.0
            times[f"{label}_first_request"] = asked[0] - end if asked else 0.0
        await client.hang_up()
        return times


async def tool_chains_main(*, runs: int) -> int:
    """Run ``runs`` calls per chain and print first audio and answer time against plain."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in CHAINS}
    async with seeded_database("va-chains") as (database_url, redis_url):
        for _ in range(runs):
            for name, steps in CHAINS.items():
                with psycopg.connect(database_url, autocommit=True) as conn:
                    conn.execute("DELETE FROM appointments WHERE call_sid IS NOT NULL")
                samples[name].append(await chain_call(database_url, redis_url, steps))
    header = (
        f"{'chain':<32} {'LLM req':>7} {'plain v2v':>9} {'first audio':>11} "
        f"{'plain answer':>12} {'chain answer':>12} {'ratio':>6} {'tool gap':>8} {'ack':>4}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for name, runs_ in samples.items():
        med = {k: statistics.median(r[k] for r in runs_) for k in runs_[0]}
        row = {
            "chain": name,
            "llm_requests": len(CHAINS[name]) + 1,
            "plain_first_audio_ms": round(med["plain_first_audio"] * 1000),
            "chain_first_audio_ms": round(med["chain_first_audio"] * 1000),
            "plain_answer_ms": round(med["plain_answer_ready"] * 1000),
            "chain_answer_ms": round(med["chain_answer_ready"] * 1000),
            "answer_ratio": round(med["chain_answer_ready"] / med["plain_answer_ready"], 2),
            "tool_gap_ms": round(med["chain_tool_gap"] * 1000),
            "acknowledged": sum(r["chain_acknowledged"] for r in runs_) / len(runs_),
        }
        rows.append(row)
        print(
            f"{name:<32} {row['llm_requests']:>7} {row['plain_first_audio_ms']:>9} "
            f"{row['chain_first_audio_ms']:>11} {row['plain_answer_ms']:>12} "
            f"{row['chain_answer_ms']:>12} {row['answer_ratio']:>6} {row['tool_gap_ms']:>8} "
            f"{row['acknowledged']:>4}"
        )
    out = ROOT / "benchmarks" / "results" / "tool_chains.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"fake_delays_secs": TURN_DELAYS, "runs": runs, "rows": rows, "samples": samples},
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

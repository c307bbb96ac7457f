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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.profile import load_profile  # noqa: E402
from core.settings import DEFAULT_PROFILE  # noqa: E402
from seeding import seed  # noqa: E402
from tests.fakes.audio import speech_ulaw  # noqa: E402
from tests.fakes.deepgram_stt import FakeDeepgramSTT  # noqa: E402
from tests.fakes.deepgram_tts import FakeDeepgramTTS  # noqa: E402
from tests.fakes.openai_chat import FakeOpenAI  # noqa: E402
from tests.harness import BOOKING_UTTERANCES, booking_script, running_agent  # noqa: E402

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


async def main() -> int:
    parser = argparse.ArgumentParser(description="voice-to-voice latency benchmark")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    admin_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    stack: list[Any] = []
    tmp = tempfile.TemporaryDirectory(prefix="va-v2v-")
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
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    database_url = make_conninfo(**params)
    profile = load_profile(DEFAULT_PROFILE)
    results: dict[str, list[dict]] = {k: [] for k in PROFILES}
    try:
        today = datetime.now(profile.time_zone).date()
        await seed(database_url, customers=50, seed=7, anchor_date=today, profile=profile)
        for _ in range(args.runs):
            for label, delays in PROFILES.items():
                with psycopg.connect(database_url, autocommit=True) as conn:
                    conn.execute("DELETE FROM appointments WHERE call_sid IS NOT NULL")
                results[label].append(await one_call(database_url, redis_url, delays))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for stop in reversed(stack):
            await stop()
        tmp.cleanup()

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


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

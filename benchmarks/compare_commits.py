"""Compare a benchmark between an earlier commit and the working tree, in one run.

Usage::

    python benchmarks/compare_commits.py --base 551a9d9 --bench tools --rounds 2 \
        -- --customers 20000 --iterations 200
    python benchmarks/compare_commits.py --base 551a9d9 --bench voice_to_voice --rounds 2

Checks ``--base`` (and ``--head``, default: this working tree) out into temporary git
worktrees and runs ``benchmarks/<bench>.py`` in both, alternating the order every round
(base first, then head first), so both see the same machine load. Arguments after ``--``
go to both runs. Each run's JSON (``benchmarks/results/<bench>.json`` of its tree) is
collected; the table shows, per metric, the median over the rounds for each side and the
ratio head / base (1.00 is the same; shared machines are noisy, so read ratios within
about 0.8-1.25 as "unchanged").
Writes ``benchmarks/results/compare_<bench>.json``. The worktrees are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def tools_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Per-tool p50 and p99 (ms) and the SELECT 1 baseline of ``benchmarks/tools.py``."""
    metrics = {"select_1 p50_ms": result["baseline_select_1"]["p50_ms"]}
    for row in result["tools"]:
        metrics[f"{row['tool']} p50_ms"] = row["p50_ms"]
        metrics[f"{row['tool']} p99_ms"] = row["p99_ms"]
    return metrics


def voice_to_voice_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Median and worst phone voice-to-voice per delay profile of ``voice_to_voice.py``."""
    metrics: dict[str, float] = {}
    for label, profile in result["profiles"].items():
        metrics[f"{label} v2v median_ms"] = profile["phone_v2v_median_ms"]
        metrics[f"{label} v2v max_ms"] = profile["phone_v2v_max_ms"]
    return metrics


METRICS: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {
    "tools": tools_metrics,
    "voice_to_voice": voice_to_voice_metrics,
}


def run_bench(tree: Path, bench: str, extra: list[str]) -> dict[str, float]:
    """Run one benchmark in ``tree`` with this interpreter and return its metrics."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = tree / "benchmarks" / f"{bench}.py"
    print(f"--- {tree.name}: {bench} {' '.join(extra)}", flush=True)
    # A missed target exits 1 but still writes its JSON: the comparison wants the figures.
    subprocess.run([sys.executable, str(script), *extra], cwd=tree, env=env, check=False)
    result_file = tree / "benchmarks" / "results" / f"{bench}.json"
    if not result_file.exists():
        raise SystemExit(f"{script} wrote no {result_file}")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    return METRICS[bench](result)


def short_sha(ref: str) -> str:
    """The short commit id of ``ref``."""
    return subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def checkout(sha: str, where: Path, trees: list[Path]) -> Path:
    """Check ``sha`` out into a detached worktree at ``where`` (noted in ``trees``)."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(where), sha],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    trees.append(where)
    return where


def main() -> int:
    """Parse arguments, run the rounds, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="commit to compare against")
    parser.add_argument("--head", help="commit to compare (default: this working tree)")
    parser.add_argument("--bench", required=True, choices=sorted(METRICS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="arguments for both runs (after --)")
    args = parser.parse_args()

    sides: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
    trees: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="va-compare-") as tmp:
        try:
            base_sha = short_sha(args.base)
            base_tree = checkout(base_sha, Path(tmp) / f"base-{base_sha}", trees)
            head_tree = ROOT
            if args.head:
                head_sha = short_sha(args.head)
                head_tree = checkout(head_sha, Path(tmp) / f"head-{head_sha}", trees)
            for round_no in range(args.rounds):
                order = [("base", base_tree), ("this", head_tree)]
                if round_no % 2:
                    order.reverse()
                for side, tree in order:
                    sides[side].append(run_bench(tree, args.bench, args.extra))
        finally:
            for tree in trees:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
                )

    names = [m for m in sides["this"][0] if all(m in r for r in sides["base"] + sides["this"])]
    table = []
    print()
    head_label = args.head or "this tree"
    print(f"{'metric':<32} {'base ' + base_sha:>14} {head_label:>10} {'ratio':>6}")
    for name in names:
        base = statistics.median(r[name] for r in sides["base"])
        this = statistics.median(r[name] for r in sides["this"])
        ratio = round(this / base, 2) if base else None
        table.append({"metric": name, "base": base, "this": this, "ratio": ratio})
        print(f"{name:<32} {base:>14.2f} {this:>10.2f} {ratio if ratio is not None else '-':>6}")
    out = ROOT / "benchmarks" / "results" / f"compare_{args.bench}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "base": base_sha,
                "bench": args.bench,
                "rounds": args.rounds,
                "extra": args.extra,
                "table": table,
                "runs": sides,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The headline federation figures: default `fededge simulate` over seeds and label skews.

For each (alpha, seed) it runs the same code path as the CLI (embedded broker, real MQTT) and
records mean client accuracy, the local-only and centralized baselines, wall time and the share
of federation time spent outside training and evaluation. Medians over seeds go in a markdown
table (default benchmarks/results/simulate.md), pasted into BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_simulate.py --seeds 0 1 2 --alphas 0.5 0.1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from fededge.sim.simulate import SimulationOptions, run_simulation


def run(alpha: float, seed: int, rounds: int, clients: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fededge-bench-") as tmp:
        started = time.perf_counter()
        result = run_simulation(SimulationOptions(alpha=alpha, seed=seed, rounds=rounds,
                                                  clients=clients, out=Path(tmp)))
        s = result.summary
        return {"alpha": alpha, "seed": seed, "mean_accuracy": s["mean_accuracy"],
                "local_only": s["local_only_mean_accuracy"],
                "centralized": s["centralized_mean_accuracy"],
                "wall_seconds": time.perf_counter() - started,
                "overhead_share": s["overhead_share"],
                "bytes_per_client_round": s["bytes_per_client_round"],
                "students": sorted({c["student"] for c in s["clients"]})}


def table(rows: list[dict], seeds: list[int]) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| α | seed | fedmd mean acc | local-only | centralized | wall s | outside training |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']} | {r['seed']} | {pct(r['mean_accuracy'])} | "
                     f"{pct(r['local_only'])} | {pct(r['centralized'])} | "
                     f"{r['wall_seconds']:.1f} | {pct(r['overhead_share'])} |")
    for alpha in sorted({r["alpha"] for r in rows}, reverse=True):
        group = [r for r in rows if r["alpha"] == alpha]
        med = lambda key: statistics.median(r[key] for r in group)  # noqa: E731
        lines.append(f"| **{alpha}** | **median of {len(group)}** | **{pct(med('mean_accuracy'))}**"
                     f" | {pct(med('local_only'))} | {pct(med('centralized'))} | "
                     f"{med('wall_seconds'):.1f} | {pct(med('overhead_share'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.1])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/simulate.md"))
    args = ap.parse_args()
    rows = []
    for alpha in args.alphas:
        for seed in args.seeds:
            rows.append(run(alpha, seed, args.rounds, args.clients))
            print(json.dumps(rows[-1]), flush=True)
    text = (f"{table(rows, args.seeds)}\n\nMachine: {platform.processor() or platform.machine()}, "
            f"students: {', '.join(rows[0]['students'])}.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

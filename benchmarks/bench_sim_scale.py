"""One simulation with big students, timed by phase: is `fededge simulate` still practical?

Runs the CLI's code path (embedded broker, real MQTT, baselines on) once and reports where the
wall time went: preparing (split, picks), the warm-up (every device on its own data), the
rounds, the baselines' tail after the federation ended (they train in a background thread
meanwhile), and the federation's time outside training and evaluation (protocol, waiting);
the training cost of each student (from the baselines, which train every architecture), peak
RSS, and the machine's load average before and after (the machine is shared).

    .venv/bin/python benchmarks/make_datasets.py --preset hard32 --out benchmarks/data/hard32.npz
    .venv/bin/python benchmarks/bench_sim_scale.py --data benchmarks/data/hard32.npz \\
        --clients 10 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from fededge.sim.progress import Step
from fededge.sim.simulate import BASELINES_FILE, SimulationOptions, run_simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a .npz, or a built-in dataset (default digits)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    marks: dict[str, list[float]] = {}

    def on_step(step: Step) -> None:
        now = time.monotonic()
        first_last = marks.setdefault(step.phase, [now, now])
        first_last[1] = now

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fededge-bench-") as tmp:
        started = time.monotonic()
        result = run_simulation(SimulationOptions(data=args.data, clients=args.clients,
                                                  rounds=args.rounds, out=Path(tmp)), on_step)
        wall = time.monotonic() - started
        baselines = json.loads((Path(tmp) / BASELINES_FILE).read_text())
    s = result.summary
    warmup = marks["rounds"][0] - marks["warm-up"][0]
    rounds = marks["rounds"][1] - marks["rounds"][0]
    figures = {
        "data": args.data or "digits", "clients": args.clients, "rounds": args.rounds,
        "wall_s": round(wall, 1), "prepare_s": round(marks["data"][0] - started, 1),
        "warmup_s": round(warmup, 1), "rounds_s": round(rounds, 1),
        "federation_s": round(s["federation_seconds"], 1),
        "federation_compute_s": round(s["compute_seconds"], 1),
        "outside_training_share": round(s["overhead_share"], 3),
        "baselines_tail_s": round(max(0.0, marks.get("baselines", [0, 0])[1]
                                      - marks["rounds"][1]), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "mean_accuracy": s["mean_accuracy"], "local_only": s["local_only_mean_accuracy"],
        "centralized": s["centralized_mean_accuracy"],
        "students": [c["student"] for c in s["clients"]],
        "baseline_training": baselines["training"],
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Per-sample latency (and optionally logits) of one exported model, printed as JSON.

Runs unchanged on the host and inside the arm64 chroot, with fededge's own torch-free runtime,
so the emulated/native ratio compares the same code on the same model with the same thread
count (one: the host has two shared cores, and qemu-user emulates each thread separately).

    python probe.py MODEL_DIR DATA.npz [--samples N] [--logits OUT.npy]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from fededge.edge.runtime import EdgeModel, load_npz


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("data")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--logits")
    args = parser.parse_args()
    model = EdgeModel(args.model_dir, threads=1)
    X, _ = load_npz(args.data)
    if args.logits:
        np.save(args.logits, model.logits(X))
    model.latency(X, samples=10)  # warm-up: first runs pay for allocation (and qemu's JIT)
    start = time.perf_counter()
    latency = model.latency(X, samples=args.samples)
    print(json.dumps({"machine": platform.machine(), "p50_ms": latency.p50_ms,
                      "p95_ms": latency.p95_ms, "samples": latency.samples,
                      "seconds": time.perf_counter() - start,
                      "providers": model.providers}))


if __name__ == "__main__":
    main()

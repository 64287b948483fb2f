"""Run an exported fededge student on a device: ``python run.py MODEL_DIR DATA.npz [--int8]``.

Needs only numpy and onnxruntime (``pip install -r requirements.txt``). ``DATA.npz`` holds raw
features ``X`` (shaped like the manifest's input, without preprocessing) and optionally integer
labels ``y``. Prints a prediction summary, the accuracy when labels are present, and the
per-sample latency.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

try:  # the bundle ships the runtime beside this file
    import fededge_runtime as rt
except ImportError:  # running from a fededge checkout or install instead
    from fededge import runtime as rt

SHOWN = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict with an exported fededge student.")
    parser.add_argument("model_dir", help="directory holding manifest.json and model.onnx")
    parser.add_argument("data", help=".npz with raw features X and optional labels y")
    parser.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: the device profile's)")
    args = parser.parse_args(argv)
    try:
        report = rt.infer_file(args.model_dir, args.data, int8=args.int8, threads=args.threads)
    except rt.InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = report.class_names
    print(f"{report.model_file} on {', '.join(report.providers)} (threads={report.threads}): "
          f"{len(report.labels)} samples")
    for i, (label, confidence) in enumerate(zip(report.labels[:SHOWN], report.confidences)):
        print(f"  #{i}: {names[label]} ({100 * confidence:.1f}%)")
    counts = Counter(names[label] for label in report.labels)
    print("predicted classes: " + ", ".join(f"{name} x{n}" for name, n in counts.most_common()))
    if report.accuracy is not None:
        print(f"accuracy: {100 * report.accuracy:.2f}%")
    lat = report.latency
    print(f"latency per sample: p50 {lat.p50_ms:.3f} ms, p95 {lat.p95_ms:.3f} ms "
          f"({lat.samples} single-sample runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The student zoo on real input sizes: per family member at 3×32×32 and 3×96×96 its
parameters, FLOPs, fp32/int8 ONNX size, batch-1 latency in onnxruntime and PyTorch eager side by
side (one thread, medians), the int8 accuracy delta after a short training on hard32, and
the share of this machine's sustained one-thread matmul throughput batch-1 inference reaches
(what ``learn.picking.EFFICIENCY`` models); then fedmd's bytes per client per round against
FedAvg's for the largest student of a 3×32×32 federation.

    .venv/bin/python benchmarks/make_datasets.py --preset hard32 --out benchmarks/data/hard32.npz
    .venv/bin/python benchmarks/bench_zoo.py --data benchmarks/data/hard32.npz --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fededge.config import FederationConfig
from fededge.delivery.export import EvalData, StudentMeta, export_student
from fededge.edge import runtime
from fededge.learn.data import Dataset, load_dataset, split_federated
from fededge.learn.trainer import seeded_trainer
from fededge.learn.zoo import estimate_cost, zoo_for
from fededge.profiles import get_profile


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def sustained_matmul_gflops(reps: int = 20) -> float:
    """One thread, float32 512×512 matmuls: what this core keeps up on dense work."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    return 2 * 512 ** 3 / (_median_ms(lambda: a @ b, reps) / 1e3) / 1e9


def upscaled(ds: Dataset, factor: int) -> Dataset:
    """The same images at factor× the resolution (nearest neighbour), as a camera would give."""
    X = ds.X.repeat(factor, axis=2).repeat(factor, axis=3)
    return Dataset(f"{ds.name}×{factor}", X, ds.y, None, ds.num_classes, tuple(X.shape[1:]),
                   ds.class_names)


def bench_member(name: str, split, epochs: int, reps: int, workdir: Path) -> dict:
    shape, classes = tuple(split.input_shape), split.num_classes
    cost = estimate_cost(name, shape, classes)
    trainer = seeded_trainer(name, shape, classes, seed=0, batch_size=64)
    X = np.concatenate([c.X for c in split.clients])
    y = np.concatenate([c.y for c in split.clients])
    start = time.perf_counter()
    trainer.fit(X, y, epochs=epochs)
    train_s = time.perf_counter() - start
    meta = StudentMeta(device=name, profile="x86-gateway", student=name, round=0, accuracy=None,
                       input_shape=shape, num_classes=classes, class_names=split.class_names,
                       preprocessing=split.preprocessing.to_dict(), dataset="hard32")
    data = EvalData(split.raw_test_X, split.test_y, split.raw_public_X)
    out = workdir / f"{name}-{'x'.join(map(str, shape))}"
    result = export_student(trainer.model, meta, data, out, profile=get_profile("x86-gateway"),
                            quantize="int8")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(out / runtime.FP32_FILE), options,
                                   providers=["CPUExecutionProvider"])
    x = split.test_X[:1]
    model, tensor = trainer.model.eval(), torch.from_numpy(x)
    with torch.inference_mode():
        eager_ms = _median_ms(lambda: model(tensor), reps)
    ort_ms = _median_ms(lambda: session.run(None, {"input": x}), reps)
    return {"student": name, "input": "x".join(map(str, shape)), "params": cost.params,
            "mflops": cost.flops / 1e6, "fp32_kib": result.fp32_bytes / 1024,
            "int8_kib": result.int8.bytes / 1024, "ort_ms": ort_ms, "eager_ms": eager_ms,
            "eager_over_ort": eager_ms / ort_ms, "ort_gflops": cost.flops / (ort_ms / 1e3) / 1e9,
            "fp32_acc": result.accuracy, "int8_delta": result.int8.accuracy_delta,
            "train_samples_per_s": epochs * len(X) / train_s}


def traffic(split) -> dict:
    """Bytes per client per round: fedmd moves logits on the proxy set (float16, up and down),
    FedAvg the largest student's float32 weights (up and down)."""
    config = FederationConfig()
    largest = zoo_for(split.input_shape)[-1]
    params = estimate_cost(largest, split.input_shape, split.num_classes).params
    fedmd = 2 * len(split.public_X) * split.num_classes * 2
    fedavg = 2 * params * 4
    return {"proxy_rows": len(split.public_X), "largest": largest, "params": params,
            "fedmd_bytes": fedmd, "fedavg_bytes": fedavg, "ratio": fedavg / fedmd,
            "logit_dtype": config.logit_dtype}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="benchmarks/data/hard32.npz")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_zoo.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = load_dataset(args.data)
    sustained = sustained_matmul_gflops()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in (base, upscaled(base, 3)):
            split = split_federated(ds, 1, partition="iid", seed=0)
            for name in zoo_for(ds.input_shape):
                row = bench_member(name, split, args.epochs, args.reps, Path(tmp))
                row["efficiency"] = row["ort_gflops"] / sustained
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {"sustained_matmul_gflops_1thread": sustained,
              "median_efficiency": statistics.median(r["efficiency"] for r in rows),
              "members": rows,
              "traffic": traffic(split_federated(base, 10, seed=0))}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "members"}, indent=2))


if __name__ == "__main__":
    main()

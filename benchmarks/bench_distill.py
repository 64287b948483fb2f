"""``fededge distill`` on digits from a centrally trained teacher: each profile's student
against the teacher and against the same student trained on labels alone, then a sweep of α
and T on the two smallest students (where distillation has the most to give).

The teacher is zoo student cnn-l trained centrally on distill's own train split (the same
seeded split, so it never sees the test split) for ``--teacher-epochs``, with the
standardization folded in, and exported to ONNX as a user's model would be.

    .venv/bin/python benchmarks/bench_distill.py --epochs 10 --teacher-epochs 15 --out /tmp/distill
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fededge import api
from fededge.delivery.distill import DEFAULT_FINETUNE_EPOCHS, split_data
from fededge.learn.data import load_dataset
from fededge.learn.trainer import seeded_trainer

PROFILES = ["pi-zero-2w", "pi-3bplus", "pi-4-4gb", "x86-gateway"]  # cnn-xs, -s, -m, -l
SWEEP_PROFILES = ["pi-zero-2w", "pi-3bplus"]
SWEEP = [(0.5, 2.0), (0.5, 4.0), (0.9, 2.0), (0.9, 4.0)]


class Standardized(torch.nn.Module):
    """The teacher as a user ships it: raw features in, logits out."""

    def __init__(self, model: torch.nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.from_numpy(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.from_numpy(std).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def make_teacher(data: Path, out: Path, epochs: int, seed: int) -> Path:
    dataset = load_dataset(str(data))
    split = split_data(dataset, seed)
    trainer = seeded_trainer("cnn-l", dataset.input_shape, dataset.num_classes, seed=seed + 100)
    trainer.fit(split.standardizer.apply(split.train_X), split.train_y, epochs)
    model = Standardized(trainer.model.eval(), split.standardizer.mean, split.standardizer.std)
    path = out / "teacher.onnx"
    torch.onnx.export(model, (torch.zeros(2, *dataset.input_shape),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = args.out / "digits.npz"
    np.savez(data, X=(bunch.images / 16.0).astype(np.float32)[:, None], y=bunch.target)
    teacher = make_teacher(data, args.out, args.teacher_epochs, args.seed)
    results = {"epochs": args.epochs, "finetune_epochs": DEFAULT_FINETUNE_EPOCHS, "runs": []}
    for alpha, temperature in [(0.5, 2.0)] + [s for s in SWEEP if s != (0.5, 2.0)]:
        profiles = PROFILES if (alpha, temperature) == (0.5, 2.0) else SWEEP_PROFILES
        start = time.perf_counter()
        summary = api.distill(teacher, data, out=args.out / f"a{alpha}-T{temperature}",
                              profiles=profiles, alpha=alpha, temperature=temperature,
                              epochs=args.epochs, seed=args.seed)
        seconds = time.perf_counter() - start
        results["teacher"] = summary["teacher"]
        results["runs"].append({"alpha": alpha, "temperature": temperature,
                                "seconds": seconds, "students": summary["students"]})
        print(f"alpha {alpha} T {temperature} ({seconds:.0f} s): teacher "
              f"{100 * summary['teacher']['accuracy']:.1f}%", flush=True)
        for s in summary["students"]:
            print(f"  {s['profile']:<12} {s['student']:<7} {s['params']:>7,} KD "
                  f"{100 * s['accuracy']:.1f}%  labels-only {100 * s['labels_only_accuracy']:.1f}%"
                  f"  Δ {100 * (s['accuracy'] - s['labels_only_accuracy']):+.1f}", flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

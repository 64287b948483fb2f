"""``fededge distill``: the design source's classic distillation (DESIGN §3.1) as a delivery job.

*I have a model; give me one that fits each of my devices, exported and verified.* The data is
split once (seeded, stratified: train / validation / test); the teacher's logits on the train
split are computed once; every device profile picks its student (``learn.picking``), profiles
picking the same student share one training with J = (1 − α)·H(y, p_s) + α·T²·H(p_t, p_s)
(``learn.kd``), then a fine-tune on the labels; each profile's bundle is written by the same
``export_student`` as ``fededge export`` (parity check, int8, manifest). Beside each student the
same architecture, seeded alike, trains on the labels alone for as many epochs, so the summary
shows what distillation bought.

The validation split calibrates int8 (the role the proxy set has in a federation) and never
meets the test split, which every accuracy in the summary is measured on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.delivery.export import (
    QUANTIZE_CHOICES,
    EvalData,
    ExportError,
    StudentMeta,
    export_student,
)
from fededge.delivery.teacher import TEACHER_OUTPUTS, Teacher, load_teacher, teacher_logits
from fededge.edge.runtime import EdgeModel, time_calls
from fededge.files import write_file
from fededge.learn.data import Dataset, Standardizer, load_dataset
from fededge.learn.picking import NoStudentFitsError, pick_student
from fededge.learn.trainer import seeded_trainer
from fededge.profiles import DeviceProfile, get_profile, load_catalog

DEFAULT_ALPHA = 0.5
DEFAULT_TEMPERATURE = 2.0
"""α and T: the design source's worked example, confirmed on digits by benchmarks/
bench_distill.py (BENCHMARKS.md, "fededge distill")."""
DEFAULT_EPOCHS = 30
DEFAULT_FINETUNE_EPOCHS = 3
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
LATENCY_ROWS = 200
SUMMARY = "summary.json"


class DistillError(ExportError):
    """Arguments of ``fededge distill`` that cannot work; the message names the fix."""


@dataclass(frozen=True)
class DistillOptions:
    """Everything ``fededge distill`` takes (its options, one for one)."""

    teacher: Path
    data: str
    out: Path
    profiles: tuple[str, ...] | None = None
    zoo: Path | None = None
    alpha: float = DEFAULT_ALPHA
    temperature: float = DEFAULT_TEMPERATURE
    epochs: int = DEFAULT_EPOCHS
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    quantize: str | None = None
    teacher_outputs: str = "logits"
    seed: int = 0
    batch_size: int = 32

    def check(self) -> None:
        """Every range error before anything loads."""
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"--alpha {self.alpha}: must be in [0, 1] (1 = the teacher's "
                               "soft targets alone)")
        if not self.temperature > 0:
            raise DistillError(f"--temperature {self.temperature}: must be > 0; try 2-4")
        if self.epochs < 1 or self.finetune_epochs < 0:
            raise DistillError("--epochs must be >= 1 and --finetune-epochs >= 0")
        if self.teacher_outputs not in TEACHER_OUTPUTS:
            raise DistillError(f"--teacher-outputs {self.teacher_outputs!r}: use one of "
                               f"{', '.join(TEACHER_OUTPUTS)}")
        if self.quantize not in (None, *QUANTIZE_CHOICES):
            raise DistillError(f"--quantize {self.quantize!r}: use "
                               f"{' or '.join(QUANTIZE_CHOICES)}")


@dataclass(frozen=True)
class Split:
    """Raw (unstandardized) splits and the standardizer fitted on the train split."""

    train_X: np.ndarray
    train_y: np.ndarray
    val_X: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray
    standardizer: Standardizer


def split_data(dataset: Dataset, seed: int) -> Split:
    """Seeded, stratified train / validation / test split."""
    from sklearn.model_selection import train_test_split

    X, y = dataset.X.astype(np.float32), dataset.y
    rest_X, test_X, rest_y, test_y = train_test_split(
        X, y, test_size=TEST_FRACTION, random_state=seed, stratify=y)
    train_X, val_X, train_y, _ = train_test_split(
        rest_X, rest_y, test_size=VAL_FRACTION / (1 - TEST_FRACTION), random_state=seed,
        stratify=rest_y)
    return Split(train_X, train_y, val_X, test_X, test_y, Standardizer.fit(train_X))


def distill(opts: DistillOptions, progress: Callable[[str], None] = lambda line: None
            ) -> dict[str, Any]:
    """Run the whole job (module docstring); returns the summary written to OUT/summary.json."""
    opts.check()
    dataset = load_dataset(opts.data)
    shape, classes = tuple(dataset.input_shape), dataset.num_classes
    if opts.zoo is not None:
        from fededge.learn.userzoo import load_user_zoo

        load_user_zoo(opts.zoo, shape, classes)
    profiles = _profiles(opts.profiles)
    picks = _picks(profiles, shape, classes, opts.batch_size, progress,
                   explicit=bool(opts.profiles))
    teacher = load_teacher(opts.teacher, shape, classes)
    split = split_data(dataset, opts.seed)
    progress(f"teacher {teacher.path.name}: soft targets on {len(split.train_X)} training "
             "samples")
    soft = teacher_logits(teacher, split.train_X, classes, opts.teacher_outputs)
    test_logits = teacher_logits(teacher, split.test_X, classes, opts.teacher_outputs)
    trained = {}
    for student in dict.fromkeys(picks.values()):
        progress(f"{student}: distilling ({opts.epochs} + {opts.finetune_epochs} epochs) and "
                 "training on labels alone")
        trained[student] = _train_pair(student, shape, classes, split, soft, opts)
    data = EvalData(split.test_X, split.test_y.astype(np.int64), split.val_X)
    students = []
    for name, student in picks.items():
        progress(f"{name}: exporting {student}")
        model, labels_only = trained[student]
        meta = StudentMeta(device=name, profile=name, student=student, round=0,
                           accuracy=None, input_shape=shape, num_classes=classes,
                           class_names=list(dataset.class_names),
                           preprocessing=split.standardizer.to_dict(), dataset=dataset.name)
        result = export_student(model, meta, data, opts.out / name, profile=profiles[name],
                                quantize=opts.quantize)
        latency = EdgeModel(result.out_dir).latency(split.test_X, LATENCY_ROWS)
        students.append({
            "profile": name, "student": student, "params": result.params,
            "bytes": result.fp32_bytes, "accuracy": result.accuracy,
            "labels_only_accuracy": labels_only, "latency_ms": latency.p50_ms,
            "int8_accuracy": result.int8.accuracy if result.int8 else None,
            "export_dir": str(result.out_dir)})
    summary = {
        "teacher": {"path": str(teacher.path), "kind": teacher.kind,
                    "accuracy": float((test_logits.argmax(axis=1) == split.test_y).mean()),
                    "params": teacher.params, "bytes": teacher.bytes,
                    "latency_ms": _teacher_latency_ms(teacher, split.test_X)},
        "students": students,
        "settings": {"alpha": opts.alpha, "temperature": opts.temperature,
                     "epochs": opts.epochs, "finetune_epochs": opts.finetune_epochs,
                     "teacher_outputs": opts.teacher_outputs, "seed": opts.seed,
                     "dataset": dataset.name, "train": len(split.train_X),
                     "validation": len(split.val_X), "test": len(split.test_X)},
    }
    write_file(opts.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _profiles(names: tuple[str, ...] | None) -> dict[str, DeviceProfile]:
    if not names:
        return load_catalog()
    return {name: get_profile(name) for name in names}


def _picks(profiles: dict[str, DeviceProfile], shape: tuple[int, ...], classes: int,
           batch_size: int, progress: Callable[[str], None], *, explicit: bool
           ) -> dict[str, str]:
    """profile → the student it picks (as in a federation). A catalog profile nothing fits is
    skipped with a note; one the user named is an error."""
    picks = {}
    for name, profile in profiles.items():
        try:
            picks[name] = pick_student(profile, shape, classes, batch_size).student
        except NoStudentFitsError as exc:
            if explicit:
                raise
            progress(f"skipped {name}: {exc}")
    if not picks:
        raise DistillError("no device profile fits any student for this data; pass --profiles "
                           "or a --zoo with smaller students")
    return picks


def _train_pair(student: str, shape: tuple[int, ...], classes: int, split: Split,
                soft: np.ndarray, opts: DistillOptions) -> tuple[Any, float]:
    """The KD student (distilled, then fine-tuned on labels) and the labels-only accuracy of
    the same architecture from the same initial weights, trained as many epochs."""
    X = split.standardizer.apply(split.train_X)
    test_X = split.standardizer.apply(split.test_X)
    kd = seeded_trainer(student, shape, classes, seed=opts.seed, batch_size=opts.batch_size)
    kd.distill(X, soft, opts.epochs, opts.temperature, alpha=opts.alpha,
               y=split.train_y if opts.alpha < 1 else None)
    if opts.finetune_epochs:
        kd.fit(X, split.train_y, opts.finetune_epochs)
    plain = seeded_trainer(student, shape, classes, seed=opts.seed, batch_size=opts.batch_size)
    plain.fit(X, split.train_y, opts.epochs + opts.finetune_epochs)
    return kd.model, plain.accuracy(test_X, split.test_y)


def _teacher_latency_ms(teacher: Teacher, X: np.ndarray) -> float:
    """Median batch-1 latency of the teacher (onnxruntime for an ONNX teacher)."""
    rows = [X[i:i + 1] for i in range(min(LATENCY_ROWS, len(X)))]
    return float(np.median(time_calls(teacher.raw_outputs, rows))) * 1e3

"""The teacher of ``fededge distill``: a user's ONNX model or a fededge student checkpoint,
checked against the data before any student trains on its outputs.

An ONNX teacher receives the data's ``X`` exactly as stored (cast only to the dtype its input
declares), as a user's own exported model would; a checkpoint applies its own preprocessing.
Either way the teacher is judged on what it returns: wrong input shape, wrong class count, or
probabilities where logits were promised each end with one line naming the teacher and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fededge.delivery.export import ExportError, load_student
from fededge.edge import runtime
from fededge.errors import FedEdgeError

TEACHER_OUTPUTS = ("logits", "probabilities")
PROBABILITY_ATOL = 1e-3
"""Rows summing to 1 within this, with every value in [0, 1], look like probabilities."""
TEACHER_BATCH = 256
PROBABILITY_FLOOR = 1e-7
"""Probabilities are floored here before the log that turns them into logits."""


class TeacherError(FedEdgeError, ValueError):
    """A teacher that cannot teach on this data; the message names it and the fix."""


@dataclass(frozen=True)
class Teacher:
    """A model giving logits (N, classes) for raw features, with what is known of its size."""

    path: Path
    kind: str  # "onnx" or "checkpoint"
    params: int | None
    bytes: int
    raw_outputs: Callable[[np.ndarray], np.ndarray]

    def outputs(self, X: np.ndarray) -> np.ndarray:
        """The teacher's raw outputs (logits or probabilities, as it gives them), batched."""
        return np.concatenate([self.raw_outputs(X[i:i + TEACHER_BATCH])
                               for i in range(0, len(X), TEACHER_BATCH)]).astype(np.float32)


def load_teacher(path: str | Path, input_shape: tuple[int, ...], num_classes: int) -> Teacher:
    """The teacher at ``path`` (an ``.onnx`` file or a checkpoint directory with
    ``student.json``), its input shape checked against the data's."""
    path = Path(path)
    if path.is_dir():
        return _checkpoint_teacher(path, input_shape)
    if not path.is_file():
        raise TeacherError(f"{path}: no such teacher; pass an .onnx file or a fededge student "
                           "checkpoint directory (RUN/clients/<device>)")
    return _onnx_teacher(path, input_shape)


def _onnx_teacher(path: Path, input_shape: tuple[int, ...]) -> Teacher:
    import onnx

    try:
        session = runtime.create_session(path, [runtime.CPU_PROVIDER])
        params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
    except Exception as exc:  # onnxruntime and protobuf raise types of their own
        raise TeacherError(f"{path}: unreadable ONNX teacher ({_first_line(exc)}); export it "
                           "with torch.onnx.export or pass a checkpoint directory") from None
    feed = session.get_inputs()[0]
    declared = tuple(feed.shape[1:])
    fixed = all(isinstance(d, int) for d in declared)
    if len(declared) != len(input_shape) or (fixed and declared != tuple(input_shape)):
        raise TeacherError(
            f"{path}: the teacher takes inputs of shape (N, {_dims(declared)}) but the data's "
            f"X is (N, {_dims(input_shape)}); pass the data the teacher was trained on")
    dtype = np.float64 if feed.type == "tensor(double)" else np.float32

    def run(X: np.ndarray) -> np.ndarray:
        return session.run(None, {feed.name: X.astype(dtype, copy=False)})[0]

    return Teacher(path, "onnx", params, path.stat().st_size, run)


def _checkpoint_teacher(path: Path, input_shape: tuple[int, ...]) -> Teacher:
    try:
        student = load_student(path)
    except ExportError as exc:
        raise TeacherError(f"unreadable teacher checkpoint: {exc}") from None
    if tuple(student.meta.input_shape) != tuple(input_shape):
        raise TeacherError(
            f"{path}: the teacher takes inputs of shape (N, {_dims(student.meta.input_shape)}) "
            f"but the data's X is (N, {_dims(input_shape)}); pass the data the teacher was "
            "trained on")
    params = sum(p.numel() for p in student.model.parameters())
    weights = path / "student.safetensors"
    return Teacher(path, "checkpoint", params, weights.stat().st_size, student.logits)


def teacher_logits(teacher: Teacher, X: np.ndarray, num_classes: int, outputs: str) -> np.ndarray:
    """The teacher's logits on raw ``X``: its outputs checked for the class count and, when
    ``outputs`` is "logits", for looking like probabilities; "probabilities" become
    log-probabilities (valid logits: softmax(ln p / T) ∝ p^(1/T))."""
    if outputs not in TEACHER_OUTPUTS:
        raise TeacherError(f"--teacher-outputs {outputs!r}: use one of "
                           f"{', '.join(TEACHER_OUTPUTS)}")
    try:
        raw = teacher.outputs(X)
    except Exception as exc:  # onnxruntime raises its own types for a graph that cannot run
        if isinstance(exc, FedEdgeError):
            raise
        raise TeacherError(f"{teacher.path}: the teacher failed on the data's X "
                           f"({_first_line(exc)}); pass the data it was trained on") from None
    if raw.ndim != 2 or raw.shape[0] != len(X):
        raise TeacherError(f"{teacher.path}: the teacher returns outputs of shape "
                           f"{raw.shape}; it must return (N, classes) logits")
    if raw.shape[1] != num_classes:
        raise TeacherError(
            f"{teacher.path}: the teacher predicts {raw.shape[1]} classes but the data's y has "
            f"{num_classes}; pass the data the teacher was trained on")
    if not np.isfinite(raw).all():
        raise TeacherError(f"{teacher.path}: the teacher returns NaN or infinite outputs")
    if outputs == "probabilities":
        return np.log(np.maximum(raw, PROBABILITY_FLOOR)).astype(np.float32)
    if _look_like_probabilities(raw):
        raise TeacherError(
            f"{teacher.path}: the teacher's outputs look like probabilities (every row in "
            "[0, 1], summing to 1), not logits; pass --teacher-outputs probabilities or export "
            "the teacher without its final softmax")
    return raw


def _look_like_probabilities(raw: np.ndarray) -> bool:
    return bool((raw >= 0).all() and (raw <= 1).all()
                and np.allclose(raw.sum(axis=1), 1.0, atol=PROBABILITY_ATOL))


def _dims(shape: tuple) -> str:
    return ", ".join(str(d) for d in shape)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__

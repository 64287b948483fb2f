"""Torch-free inference for exported fededge students: what runs on the device.

This module imports only the standard library, numpy and onnxruntime (the ``edge`` extra), and
nothing else from fededge, because the export step copies it verbatim into every model bundle
as ``fededge_runtime.py``: a Raspberry Pi or Jetson runs the student without torch and without
fededge installed.

A model directory holds ``manifest.json`` (written by ``fededge.delivery.export``) beside ``model.onnx``
and optionally ``model.int8.onnx``. Loading one:

1. verifies the SHA-256 of every file the manifest lists, so a truncated copy or an edited
   model fails with the file's name instead of producing wrong predictions;
2. picks execution providers: the device profile's preference order, intersected with what the
   installed onnxruntime offers, with the CPU provider as the last resort;
3. at prediction time validates the input shape and applies the manifest's preprocessing, so
   callers feed raw features exactly as the dataset stores them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

try:  # inside fededge the CLI catches one base class; the copy in a bundle stands alone
    from fededge.errors import FedEdgeError
    _ERROR_BASES: tuple[type[Exception], ...] = (FedEdgeError, ValueError)
except ImportError:
    _ERROR_BASES = (ValueError,)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fededge-model/1"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CPU_PROVIDER = "CPUExecutionProvider"
LATENCY_SAMPLES = 200
"""Single-sample runs timed for the latency percentiles (the first ones of the input)."""
LATENCY_WARMUP = 10
"""Untimed runs first: the first calls allocate buffers and would inflate the p95."""


class InferenceError(*_ERROR_BASES):
    """A model directory, data file or input the runtime cannot use; the message names it
    and says how to fix it."""


# ----------------------------------------------------------------------------- building blocks


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large models need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def standardize(X: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Apply the manifest's standardization, ``(X - mean) / std`` over the channel axis of
    (N, C, H, W) images and (N, C, L) sequences or the feature axis of (N, F) tabular inputs; returns float32.

    It mirrors ``fededge.learn.data.Standardizer.apply`` (which this file may not import); the export
    step proves both agree by checking its parity through this function.
    """
    kind = preprocessing.get("kind")
    mean = np.asarray(preprocessing.get("mean"), dtype=np.float32)
    std = np.asarray(preprocessing.get("std"), dtype=np.float32)
    ranks = {"channel": (3, 4), "feature": (2,)}.get(kind)
    if (ranks is None or X.ndim not in ranks or mean.ndim != 1 or mean.shape != std.shape
            or len(mean) != X.shape[1]):
        raise InferenceError(
            f"{MANIFEST}: preprocessing (kind {kind!r}, {mean.size} means, {std.size} stds) does "
            f"not fit inputs of shape {X.shape}; re-export the model"
        )
    shape = (1, -1) + (1,) * (X.ndim - 2)
    return ((X - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32, copy=False)


def choose_providers(preferred: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """The preferred providers this onnxruntime build offers, in preference order, always
    ending with the CPU provider (the fallback for any node an accelerator cannot run)."""
    offered = set(ort.get_available_providers() if available is None else available)
    chosen = [p for p in preferred if p in offered and p != CPU_PROVIDER]
    return chosen + [CPU_PROVIDER]


def create_session(
    path: str | Path, providers: Sequence[str], threads: int | None = None
) -> ort.InferenceSession:
    """An onnxruntime session; ``threads`` sets the intra-op thread pool (None: ort's default)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def time_calls(fn: Callable[[np.ndarray], object], inputs: Sequence[np.ndarray],
               warmup: int = LATENCY_WARMUP) -> np.ndarray:
    """Seconds taken by ``fn(x)`` for each ``x`` of ``inputs``, after ``warmup`` untimed calls
    on the first input."""
    for _ in range(warmup):
        fn(inputs[0])
    seconds = np.empty(len(inputs))
    for i, x in enumerate(inputs):
        start = time.perf_counter()
        fn(x)
        seconds[i] = time.perf_counter() - start
    return seconds


def read_manifest(model_dir: str | Path) -> dict:
    """Parse ``manifest.json`` and verify every file it lists against its SHA-256."""
    root = Path(model_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise InferenceError(
            f"{root}: no {MANIFEST} here; pass a model directory written by `fededge export`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{path}: not valid JSON ({exc}); re-export the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InferenceError(
            f"{path}: not a {MANIFEST_FORMAT} manifest; re-export the model with this version "
            "of fededge"
        )
    verify_files(root, manifest.get("files", {}))
    return manifest


def verify_files(root: Path, files: dict) -> None:
    """Raise naming the first listed file that is missing or whose SHA-256 differs."""
    for name, entry in sorted(files.items()):
        path = root / name
        if not path.is_file():
            raise InferenceError(
                f"{path}: missing (listed in {MANIFEST}); copy the whole model directory"
            )
        if sha256_file(path) != entry["sha256"]:
            raise InferenceError(
                f"{path}: SHA-256 does not match {MANIFEST} (changed or corrupted); copy the "
                "model directory again or re-export it"
            )


def softmax_top(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The argmax class of each row of logits and its softmax probability."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    labels = probs.argmax(axis=1)
    return labels, probs[np.arange(len(labels)), labels]


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Latency:
    """Per-sample latency percentiles in milliseconds, over ``samples`` batch-1 runs."""

    p50_ms: float
    p95_ms: float
    samples: int


class EdgeModel:
    """An exported student, verified and ready to predict from raw features."""

    def __init__(self, model_dir: str | Path, *, int8: bool = False,
                 threads: int | None = None, providers: Sequence[str] | None = None) -> None:
        """Load ``model_dir``; ``int8`` picks ``model.int8.onnx``; ``threads`` overrides the
        profile's thread count, which is capped at this machine's cores (more threads than
        cores only adds contention); ``providers`` overrides the profile's preference order
        (the edge agent passes its own device's, which may differ from the exporting run's)."""
        self.model_dir = Path(model_dir)
        self.manifest = read_manifest(self.model_dir)
        self.model_file = INT8_FILE if int8 else FP32_FILE
        if self.model_file not in self.manifest["files"]:
            raise InferenceError(
                f"{self.model_dir}: no {INT8_FILE} in this export; drop --int8 or re-export "
                "with --quantize int8"
            )
        profile = self.manifest["profile"]
        self.threads = min(profile["threads"], os.cpu_count() or 1) if threads is None else threads
        preferred = profile["ort_providers"] if providers is None else providers
        self.session = create_session(self.model_dir / self.model_file,
                                      choose_providers(preferred), self.threads)
        self.providers: list[str] = self.session.get_providers()
        self.input_name: str = self.manifest["input"]["name"]
        self.sample_shape = tuple(self.manifest["input"]["shape"][1:])
        self.class_names: list[str] = self.manifest["class_names"]

    def prepare(self, X: np.ndarray) -> np.ndarray:
        """Validate raw features (N, *sample_shape) and return them preprocessed, float32."""
        X = np.asarray(X)
        if X.shape[1:] != self.sample_shape or X.ndim != len(self.sample_shape) + 1:
            expected = "(N, " + ", ".join(map(str, self.sample_shape)) + ")"
            hint = ("; a single sample needs a batch axis: X[None]"
                    if X.shape == self.sample_shape else "")
            raise InferenceError(f"input shape: expected {expected}, got {X.shape}{hint}")
        if X.dtype.kind not in "fiub":
            raise InferenceError(f"input dtype {X.dtype} is not numeric; pass float32 features")
        return standardize(X.astype(np.float32, copy=False), self.manifest["preprocessing"])

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for raw features X."""
        return self.session.run(None, {self.input_name: self.prepare(X)})[0]

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class indices and their softmax probabilities."""
        return softmax_top(self.logits(X))

    def latency(self, X: np.ndarray, samples: int = LATENCY_SAMPLES) -> Latency:
        """p50/p95 of predicting one raw sample at a time (preprocessing included), over the
        first ``samples`` rows of X: what a device answering single requests sees."""
        rows = [X[i : i + 1] for i in range(min(samples, len(X)))]
        ms = 1e3 * time_calls(self.logits, rows)
        return Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(rows))


# ----------------------------------------------------------------------------- files → report


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw features ``X`` and optional integer labels ``y`` from a .npz (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: no such file; pass a .npz with X (and optional y)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("X", "y") if key in npz.files}
    except (ValueError, OSError) as exc:
        raise InferenceError(
            f"{path}: cannot read it as .npz ({exc}); save with numpy.savez(path, X=X, y=y)"
        ) from None
    if "X" not in arrays:
        raise InferenceError(f"{path}: no array X; save with numpy.savez(path, X=X, y=y)")
    y = arrays.get("y")
    if y is not None and (y.shape != (len(arrays["X"]),) or y.dtype.kind not in "iu"):
        raise InferenceError(
            f"{path}: y must be integer class indices, one per sample of X; got dtype {y.dtype}, "
            f"shape {y.shape} for {len(arrays['X'])} samples"
        )
    return arrays["X"], y


@dataclass(frozen=True)
class InferenceReport:
    """What ``infer_file`` found: predictions for every sample, accuracy when labels exist."""

    labels: np.ndarray
    confidences: np.ndarray
    logits: np.ndarray
    class_names: list[str]
    accuracy: float | None
    latency: Latency
    providers: list[str]
    model_file: str
    threads: int


def infer_file(model_dir: str | Path, data_path: str | Path, *, int8: bool = False,
               threads: int | None = None,
               providers: Sequence[str] | None = None) -> InferenceReport:
    """Predict every sample of a .npz, score it when it has labels, and time single samples;
    the shared core of ``run.py`` and ``fededge infer``."""
    model = EdgeModel(model_dir, int8=int8, threads=threads, providers=providers)
    X, y = load_npz(data_path)
    logits = model.logits(X)
    labels, confidences = softmax_top(logits)
    accuracy = None if y is None else float((labels == y).mean())
    return InferenceReport(labels, confidences, logits, model.class_names, accuracy,
                           model.latency(X), model.providers, model.model_file, model.threads)

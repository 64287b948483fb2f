"""Export trained students to verified ONNX bundles a device runs with onnxruntime alone.

For each student of a run this writes, into ``RUN/export/<device>/`` by default:

* ``model.onnx`` — float32, opset ``OPSET``, input ``input`` (N, *input_shape) with a dynamic
  batch axis, output ``logits`` (N, classes), passing ``onnx.checker``'s full check;
* ``model.int8.onnx`` with ``quantize="int8"`` — static QDQ quantization calibrated on the
  public proxy set (never the test split);
* the on-device runner (``export/`` in the repository) and ``fededge_runtime.py``, a verbatim
  copy of ``fededge.edge.runtime``, so the directory is a complete, torch-free bundle;
* ``manifest.json`` — everything a device needs to feed raw features and trust the files
  (preprocessing, classes, profile, SHA-256 of every file) plus the verification figures.

Export is verified, not assumed: the exported model runs with onnxruntime on the test split,
through the same preprocessing code the device uses, and any logit further than
``PARITY_ATOL`` from PyTorch or any changed argmax fails the export.

A run is any of (``run_source``):

* a ``fededge simulate`` run directory (``summary.json``, ``clients/<id>/``, ``eval_data.npz``);
* a server kit (``KITS/server``): its state directory has the same layout once a federation
  that collects models (``[federation] collect_models = true``) has finished;
* a device kit (``KITS/<device>``): the device's own student from its state directory, with
  the test and proxy data re-derived from the kit, for federations that keep students on
  their devices.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from safetensors import SafetensorError
from safetensors.torch import load_file

from fededge import __version__
from fededge.edge import runtime
from fededge.errors import FedEdgeError
from fededge.files import write_file
from fededge.kits.kit import CLIENT_FILE, SERVER_FILE, STATE_DIR, Kit, load_kit
from fededge.learn.data import DataError, Standardizer
from fededge.learn.models import build_student
from fededge.learn.userzoo import UserZooError, load_user_zoo
from fededge.learn.zoo import USER_ZOO_FILE, UnknownStudentError, is_builtin
from fededge.profiles import DeviceProfile, ProfileError, get_profile

OPSET = 17
"""Pinned, not the exporter's default, so a torch upgrade cannot silently raise the opset past
what the onnxruntime builds on the devices (often older than the server's) can load."""
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
PARITY_ATOL = 1e-4
INT8_MAX_LOSS = 0.01
"""int8 losing more test accuracy than this (one point) is reported as a warning (the default
of ``int8_max_loss``)."""
QUANTIZE_CHOICES = ("int8",)
CALIBRATION_BATCH = 32
BUNDLE_FILES = ("run.py", "requirements.txt", "README.md")
RUNTIME_COPY = "fededge_runtime.py"


class ExportError(FedEdgeError, ValueError):
    """A run directory, device or student that cannot be exported (or failed verification);
    the message names the input and the fix."""


@dataclass(frozen=True)
class StudentMeta:
    """What ``fededge simulate`` records beside each checkpoint (``student.json``)."""

    device: str
    profile: str
    student: str
    round: int
    accuracy: float | None
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    preprocessing: dict[str, Any]
    dataset: str

    @classmethod
    def from_file(cls, path: Path) -> StudentMeta:
        """Read and check ``student.json``; a missing field names the file and the field."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"{path}: cannot read checkpoint metadata ({exc})") from None
        missing = [f for f in cls.__dataclass_fields__ if f not in raw]
        if missing:
            raise ExportError(
                f"{path}: missing field(s) {', '.join(missing)}; the checkpoint was not written "
                "by this version of `fededge simulate`"
            )
        fields = {f: raw[f] for f in cls.__dataclass_fields__}
        fields["input_shape"] = tuple(raw["input_shape"])
        return cls(**fields)


@dataclass(frozen=True)
class EvalData:
    """The run's raw (unstandardized) test split and public proxy set."""

    test_X: np.ndarray
    test_y: np.ndarray
    public_X: np.ndarray

    @classmethod
    def from_run(cls, run_dir: Path) -> EvalData:
        """Load ``RUN/eval_data.npz`` as written by ``fededge simulate``."""
        path = run_dir / "eval_data.npz"
        if not path.is_file():
            raise ExportError(
                f"{path}: missing; it holds the test and proxy data that verify and calibrate "
                f"the export; re-run `fededge simulate --out {run_dir}`"
            )
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("test_X", "test_y", "public_X") if k not in npz.files]
            if missing:
                raise ExportError(f"{path}: missing array(s) {', '.join(missing)}; re-run "
                                  f"`fededge simulate --out {run_dir}`")
            return cls(npz["test_X"].astype(np.float32), npz["test_y"].astype(np.int64),
                       npz["public_X"].astype(np.float32))


@dataclass(frozen=True)
class Int8Report:
    """The int8 model next to the float32 one, on the test split."""

    bytes: int
    size_ratio: float
    accuracy: float
    accuracy_delta: float
    """int8 minus float32 accuracy as a fraction: -0.01 is one point lost."""
    argmax_agreement: float
    quantized_layers: int
    calibration_samples: int
    max_loss: float = INT8_MAX_LOSS
    """The accuracy int8 may lose before it counts as lossy, as a fraction."""

    @property
    def lossy(self) -> bool:
        """True when int8 loses more than ``max_loss``: say so rather than hide it."""
        return self.accuracy_delta < -self.max_loss


@dataclass(frozen=True)
class ExportResult:
    """One exported student, as summarized in its manifest."""

    device: str
    out_dir: Path
    student: str
    params: int
    fp32_bytes: int
    accuracy: float
    max_abs_diff: float
    int8: Int8Report | None
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------- run directory


def export_run(
    run_dir: str | Path,
    device: str | None = None,
    all_devices: bool = False,
    quantize: str | None = None,
    out: str | Path | None = None,
    int8_max_loss: float = INT8_MAX_LOSS,
    state: str | Path | None = None,
) -> list[ExportResult]:
    """Export one device's student (``device``) or every student (``all_devices``) of a run
    (``run_source``: a simulate run, a server kit or a device kit, ``state`` its state
    directory when not ``KIT/state``).

    With neither, a run with a single device exports it. Each student goes to
    ``out/<device>/``; ``out`` defaults to ``RUN/export`` (a kit's: ``STATE/export``). An int8
    model losing more than ``int8_max_loss`` test accuracy is reported as lossy.
    """
    run_dir = Path(run_dir)
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ExportError(
            f"unknown quantization {quantize!r}; use --quantize {' or '.join(QUANTIZE_CHOICES)}"
        )
    source = run_source(run_dir, state)
    devices = _select_devices(list(source.checkpoints), device, all_devices)
    data = source.data()
    out_root = Path(out) if out is not None else source.root / "export"
    return [
        _export_checkpoint(source.checkpoints[d], data, out_root / d, quantize, int8_max_loss)
        for d in devices
    ]


@dataclass(frozen=True)
class RunSource:
    """Where a run's students and evaluation data are (see the module docstring)."""

    root: Path                        # holds the run's files; exports go to root/export
    checkpoints: dict[str, Path]      # device -> directory of its student.safetensors/.json
    data: Callable[[], EvalData]      # the raw test and proxy data, loaded when needed


def run_source(run_dir: Path, state: Path | None = None) -> RunSource:
    """The students of a simulate run, a server kit or a device kit (``state``: a kit's state
    directory when it is not ``KIT/state``)."""
    if (run_dir / SERVER_FILE).is_file() or (run_dir / CLIENT_FILE).is_file():
        kit = load_kit(run_dir)
        state = Path(state) if state is not None else kit.path(STATE_DIR)
        return _server_source(kit, state) if kit.is_server else _device_source(kit, state)
    if state is not None:
        raise ExportError(f"--state is for a kit; {run_dir} is a run directory")
    return _run_directory(run_dir)


def _run_directory(run_dir: Path, what: str = "the --out of `fededge simulate`") -> RunSource:
    summary = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run directory; pass {what}")
    if not summary.is_file():
        raise ExportError(f"{run_dir}: not a fededge run directory (no summary.json); pass {what}")
    try:
        clients = json.loads(summary.read_text())["clients"]
        checkpoints = {c["id"]: run_dir / c.get("checkpoint", f"clients/{c['id']}")
                       for c in clients}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{summary}: unreadable client list ({exc!r})") from None
    return RunSource(run_dir, checkpoints, lambda: EvalData.from_run(run_dir))


def _server_source(kit: Kit, state: Path) -> RunSource:
    """A server kit: what its federation collected, in its state directory."""
    if not (state / "summary.json").is_file():
        raise ExportError(
            f"{kit.directory}: no summary.json in {state}: the server writes it when its "
            f"federation has finished (`fededge server --kit {kit.directory}`), or pass --state "
            "with its state directory")
    source = _run_directory(state, "the server's --state directory")
    if not source.checkpoints:
        collected = json.loads((state / "summary.json").read_text()).get("collect_models")
        why = ("its federation keeps trained students on their devices (collect_models = "
               "false)" if not collected else "no device sent its trained student")
        raise ExportError(f"{kit.directory}: the server has no students to export: {why}; "
                          "export each device's own with `fededge export KITS/<device>` on "
                          "the device and install it with `fededge agent --kit KITS/<device> "
                          "--install EXPORT/<device>`")
    return source


def _device_source(kit: Kit, state: Path) -> RunSource:
    """A device kit: its own student, with the federation's test and proxy data re-derived
    from the kit (what the device trained and evaluated on)."""
    if not kit.trains:
        raise ExportError(f"{kit.file}: device {kit.device!r} is agent-only and trains no "
                          f"student; export the model of {kit.model_from!r} and deploy or "
                          "install that")

    def data() -> EvalData:
        from fededge.kits.run import kit_split

        split = kit_split(kit)[0]
        return EvalData(split.raw_test_X.astype(np.float32), split.test_y.astype(np.int64),
                        split.raw_public_X.astype(np.float32))
    return RunSource(state, {kit.device: state}, data)


def _select_devices(known: list[str], device: str | None, all_devices: bool) -> list[str]:
    valid = f"valid devices: {', '.join(known) or 'none'}"
    if device is not None and all_devices:
        raise ExportError("pass either --device ID or --all, not both")
    if all_devices:
        return known
    if device is None:
        if len(known) == 1:
            return known
        raise ExportError(f"the run has {len(known)} devices; pass --device ID or --all ({valid})")
    if device not in known:
        raise ExportError(f"no device {device!r} in this run; {valid}")
    return [device]


def _export_checkpoint(
    client_dir: Path, data: EvalData, out_dir: Path, quantize: str | None, int8_max_loss: float
) -> ExportResult:
    """Rebuild one device's student from its checkpoint and export it."""
    student = load_student(client_dir)
    return export_student(student.model, student.meta, data, out_dir, profile=student.profile,
                          quantize=quantize, int8_max_loss=int8_max_loss)


@dataclass(frozen=True)
class TrainedStudent:
    """A device's trained student as PyTorch holds it, predicting from raw features like an
    exported model does (``edge.runtime.EdgeModel``: ``logits``, ``predict``)."""

    model: torch.nn.Module
    meta: StudentMeta
    profile: DeviceProfile

    @property
    def class_names(self) -> list[str]:
        return self.meta.class_names

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Logits (N, classes) for raw features X, standardized as in training."""
        X = np.asarray(X, dtype=np.float32)
        if X.shape[1:] != self.meta.input_shape:
            shape = ", ".join(map(str, self.meta.input_shape))
            raise ExportError(f"input shape: expected (N, {shape}), got {X.shape}")
        standardized = Standardizer.from_dict(self.meta.preprocessing).apply(X)
        with torch.inference_mode():
            return self.model.eval()(torch.from_numpy(standardized)).numpy()

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted class indices and their softmax probabilities."""
        return runtime.softmax_top(self.logits(X))


def load_student(client_dir: str | Path) -> TrainedStudent:
    """A device's student from its checkpoint (``student.json`` + ``student.safetensors``)."""
    client_dir = Path(client_dir)
    meta_path, weights_path = client_dir / "student.json", client_dir / "student.safetensors"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ExportError(
                f"{path}: missing checkpoint file; the device never finished a round, so "
                "there is nothing to export"
            )
    meta = StudentMeta.from_file(meta_path)
    _load_run_zoo(client_dir, meta)
    try:
        profile = get_profile(meta.profile)
        model = build_student(meta.student, meta.input_shape, meta.num_classes)
        model.load_state_dict(load_file(str(weights_path)))
    except (ProfileError, UnknownStudentError) as exc:
        raise ExportError(f"{meta_path}: {exc}") from None
    except SafetensorError as exc:
        raise ExportError(f"{weights_path}: unreadable checkpoint ({exc})") from None
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys, shape mismatch
        last = str(exc).strip().splitlines()[-1].strip()
        raise ExportError(
            f"{weights_path}: weights do not fit student {meta.student!r} ({last})"
        ) from None
    return TrainedStudent(model, meta, profile)


def _load_run_zoo(client_dir: Path, meta: StudentMeta) -> None:
    """A user student is rebuilt from the zoo file its run or kit keeps (``zoo.py`` in the run
    directory above ``clients/<device>``, or in the kit above its ``state``)."""
    if is_builtin(meta.student, meta.input_shape):
        return
    for candidate in (client_dir.parent.parent / USER_ZOO_FILE,
                      client_dir.parent / USER_ZOO_FILE):
        if candidate.is_file():
            try:
                load_user_zoo(candidate, meta.input_shape, meta.num_classes)
            except UserZooError as exc:
                raise ExportError(str(exc)) from None
            return


# ----------------------------------------------------------------------------- one student


def export_student(
    model: torch.nn.Module,
    meta: StudentMeta,
    data: EvalData,
    out_dir: str | Path,
    *,
    profile: DeviceProfile,
    quantize: str | None = None,
    int8_max_loss: float = INT8_MAX_LOSS,
) -> ExportResult:
    """Export, verify and (optionally) quantize one student into a complete bundle; an int8
    model losing more than ``int8_max_loss`` test accuracy is reported as lossy."""
    out_dir = Path(out_dir)
    if data.test_X.shape[1:] != meta.input_shape:
        raise ExportError(
            f"test data has samples of shape {data.test_X.shape[1:]} but student "
            f"{meta.student!r} of {meta.device} takes {meta.input_shape}; export it with the "
            "run it was trained in"
        )
    try:
        standardizer = Standardizer.from_dict(meta.preprocessing)
    except DataError as exc:
        raise ExportError(f"{meta.device}: preprocessing: {exc}") from None
    preprocessing = standardizer.to_dict()
    _clear_previous_export(out_dir)
    model = model.eval()
    fp32_path = out_dir / runtime.FP32_FILE
    _export_onnx(model, meta.input_shape, fp32_path)
    with torch.inference_mode():
        reference = model(torch.from_numpy(standardizer.apply(data.test_X))).numpy()
    fp32_logits = _onnx_logits(fp32_path, data.test_X, preprocessing)
    verification = _check_parity(meta.device, reference, fp32_logits, data.test_y)
    int8 = None
    if quantize == "int8":
        int8 = _quantize_int8(fp32_path, out_dir / runtime.INT8_FILE, data, preprocessing,
                              fp32_logits, int8_max_loss)
    _copy_bundle(out_dir)
    manifest = _manifest(model, meta, profile, preprocessing, verification, int8, out_dir)
    write_file(out_dir / runtime.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return ExportResult(
        device=meta.device, out_dir=out_dir, student=meta.student,
        params=manifest["student"]["params"], fp32_bytes=fp32_path.stat().st_size,
        accuracy=verification["onnx_accuracy"], max_abs_diff=verification["max_abs_diff"],
        int8=int8, manifest=manifest,
    )


def _clear_previous_export(out_dir: Path) -> None:
    """Remove what an earlier export wrote, so a failed or int8-less re-export never leaves a
    stale manifest or int8 model beside the new float32 one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (runtime.MANIFEST, runtime.INT8_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Trace with the legacy TorchScript exporter and run the checker's full check.

    ``dynamo=False`` is deliberate: the dynamo exporter needs onnxscript and takes seconds per
    student, the legacy one tens of milliseconds, and the students are traceable layers. The
    trace uses a batch of 2 so no size-1 batch can be constant-folded into the graph.
    """
    example = torch.zeros((2, *input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter" notices
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
        )
    proto = onnx.load(str(path))
    _unshare_initializers(proto.graph)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _unshare_initializers(graph: onnx.GraphProto) -> None:
    """Give every layer its own initializers back.

    The legacy exporter stores equal tensors once and feeds the duplicates through Identity
    nodes; an untrained student's zero biases are all equal. The quantizer then finds biases
    that are not initializers and leaves those layers half-quantized, so undo the sharing.
    """
    initializers = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)


def _onnx_logits(path: Path, raw_X: np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Run a model file on raw features through the device's own preprocessing code."""
    session = runtime.create_session(path, [runtime.CPU_PROVIDER])
    return session.run(None, {INPUT_NAME: runtime.standardize(raw_X, preprocessing)})[0]


def _check_parity(
    device: str, reference: np.ndarray, logits: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch on the test split; fail loudly past the tolerance."""
    max_diff = float(np.abs(reference - logits).max())
    mismatches = int((reference.argmax(axis=1) != logits.argmax(axis=1)).sum())
    if max_diff > PARITY_ATOL or mismatches:
        raise ExportError(
            f"{device}: ONNX export does not match PyTorch on the test split: max |logit "
            f"difference| {max_diff:.3g} (tolerance {PARITY_ATOL:g}), {mismatches} of "
            f"{len(labels)} predictions differ; the model was not exported correctly"
        )
    return {
        "split": "test",
        "samples": len(labels),
        "max_abs_diff": max_diff,
        "tolerance": PARITY_ATOL,
        "argmax_mismatches": mismatches,
        "onnx_accuracy": _accuracy(logits, labels),
    }


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


# ----------------------------------------------------------------------------- int8


class _ProxyReader(CalibrationDataReader):
    """Feeds the standardized public proxy set to the calibrator in fixed-size batches."""

    def __init__(self, X: np.ndarray) -> None:
        starts = range(0, len(X), CALIBRATION_BATCH)
        self._batches = iter([{INPUT_NAME: X[i : i + CALIBRATION_BATCH]} for i in starts])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _quantize_int8(
    fp32_path: Path, int8_path: Path, data: EvalData, preprocessing: dict[str, Any],
    fp32_logits: np.ndarray, max_loss: float,
) -> Int8Report:
    """Static QDQ int8: per-channel int8 weights, uint8 activations (the u8s8 pairing every
    onnxruntime CPU build has kernels for), min/max ranges from the proxy set. The gain is
    size; speed depends on the CPU (int8 dot-product instructions: x86 VNNI, ARMv8.2 dotprod).

    The first layer (it consumes the raw input) and the last (it produces the logits) stay
    float32. They hold under 2 % of the large students' weights, but on students this small
    quantizing them cost the most: measured on digits, max |logit error| fell from 2–4 to
    about 0.2 and argmax agreement rose from 97–99 % to 99.8–100 % when they were kept float.
    """
    graph = onnx.load(str(fp32_path)).graph
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    keep_float = {weighted[0].name, weighted[-1].name}
    with _without_preprocess_hint():
        quantize_static(
            str(fp32_path), str(int8_path),
            _ProxyReader(runtime.standardize(data.public_X, preprocessing)),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(keep_float),
        )
    onnx.checker.check_model(str(int8_path), full_check=True)
    logits = _onnx_logits(int8_path, data.test_X, preprocessing)
    accuracy = _accuracy(logits, data.test_y)
    return Int8Report(
        bytes=int8_path.stat().st_size,
        size_ratio=int8_path.stat().st_size / fp32_path.stat().st_size,
        accuracy=accuracy,
        accuracy_delta=accuracy - _accuracy(fp32_logits, data.test_y),
        argmax_agreement=float((logits.argmax(axis=1) == fp32_logits.argmax(axis=1)).mean()),
        quantized_layers=len(weighted) - len(keep_float),
        calibration_samples=len(data.public_X),
        max_loss=max_loss,
    )


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocess_hint() -> Iterator[None]:
    """Silence quantize_static's root-logger advice to run ``quant_pre_process`` first: on
    these Sequential graphs it changes nothing (measured) and costs about 2 s per student."""
    hint_filter = _DropPreprocessHint()
    logging.getLogger().addFilter(hint_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(hint_filter)


# ----------------------------------------------------------------------------- bundle, manifest


def bundle_template_dir() -> Path:
    """The runner template: ``fededge/bundle`` in a wheel, else the repository's ``export/``."""
    packaged = Path(__file__).resolve().parent.parent / "bundle"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "export"


def _copy_bundle(out_dir: Path) -> None:
    """Put the torch-free runner and its runtime beside the model."""
    template = bundle_template_dir()
    for name in BUNDLE_FILES:
        shutil.copyfile(template / name, out_dir / name)
    shutil.copyfile(runtime.__file__, out_dir / RUNTIME_COPY)


def _manifest(
    model: torch.nn.Module,
    meta: StudentMeta,
    profile: DeviceProfile,
    preprocessing: dict[str, Any],
    verification: dict[str, Any],
    int8: Int8Report | None,
    out_dir: Path,
) -> dict[str, Any]:
    files = [*BUNDLE_FILES, RUNTIME_COPY, runtime.FP32_FILE]
    if int8 is not None:
        files.append(runtime.INT8_FILE)
    return {
        "format": runtime.MANIFEST_FORMAT,
        "fededge_version": __version__,
        "device": meta.device,
        "profile": {
            "name": profile.name, "description": profile.description, "arch": profile.arch,
            "accelerator": profile.accelerator, "ort_providers": list(profile.ort_providers),
            "threads": profile.threads,
        },
        "student": {
            "name": meta.student,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": [str(layer) for layer in model.children()],
            "round": meta.round,
            "accuracy": meta.accuracy,
            "dataset": meta.dataset,
        },
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": [BATCH_AXIS, *meta.input_shape],
                  "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": [BATCH_AXIS, meta.num_classes],
                   "dtype": "float32"},
        "class_names": list(meta.class_names),
        "preprocessing": preprocessing,
        "verification": verification,
        "int8": None if int8 is None else {
            "file": runtime.INT8_FILE,
            "scheme": "static QDQ, per-channel int8 weights, uint8 activations; first and "
                      "last layer float32",
            "calibration": {"set": "public proxy", "samples": int8.calibration_samples},
            "quantized_layers": int8.quantized_layers,
            "accuracy": int8.accuracy,
            "accuracy_delta": int8.accuracy_delta,
            "size_ratio": int8.size_ratio,
            "argmax_agreement": int8.argmax_agreement,
        },
        "files": {
            name: {"sha256": runtime.sha256_file(out_dir / name),
                   "bytes": (out_dir / name).stat().st_size}
            for name in files
        },
    }

"""The on-device runtime: torch-free runner and `fededge infer`, providers, error paths."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from helpers import BLOCKED_MARK, run_blocked, stdout_of
from typer.testing import CliRunner

from fededge.cli.model import infer_cmd
from fededge.delivery.export import EvalData, StudentMeta, export_student
from fededge.edge import runtime
from fededge.edge.runtime import EdgeModel, InferenceError
from fededge.learn.models import build_student
from fededge.learn.trainer import Trainer
from fededge.profiles import get_profile

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def split(digits_iid):
    return digits_iid


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, split) -> Path:
    """A quickly trained cnn-s exported with int8, for a Jetson profile (so the provider
    fallback to CPU is exercised)."""
    torch.manual_seed(0)
    model = build_student("cnn-s", split.input_shape, split.num_classes)
    Trainer(model, lr=3e-3, seed=0).fit(split.clients[0].X, split.clients[0].y, epochs=5)
    meta = StudentMeta("dev0-jetson", "jetson-orin-nano-8gb", "cnn-s", 3, None,
                       tuple(split.input_shape), split.num_classes, split.class_names,
                       split.preprocessing.to_dict(), "digits")
    out = tmp_path_factory.mktemp("bundle") / "dev0-jetson"
    export_student(model, meta, EvalData(split.raw_test_X, split.test_y, split.raw_public_X),
                   out, profile=get_profile(meta.profile), quantize="int8")
    return out


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory, split) -> Path:
    path = tmp_path_factory.mktemp("data") / "test.npz"
    np.savez(path, X=split.raw_test_X, y=split.test_y)
    return path


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle a test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


# ----------------------------------------------------------------------------- torch-free


def test_bundle_runner_needs_neither_torch_nor_fededge(bundle, data_npz, tmp_path, split):
    for extra in ([], ["--int8"]):
        out = stdout_of(run_blocked(tmp_path, ["torch", "fededge"],
                                    ["run.py", str(bundle), str(data_npz), *extra], cwd=bundle))
        assert f"{len(split.test_y)} samples" in out
        assert "accuracy: " in out and "latency per sample: p50" in out
        assert "CPUExecutionProvider" in out


def test_infer_command_needs_no_torch(bundle, data_npz, tmp_path):
    script = textwrap.dedent("""
        import typer
        from fededge.cli.model import infer_cmd
        app = typer.Typer()
        app.command()(infer_cmd)
        app()
    """)
    out = stdout_of(run_blocked(tmp_path, ["torch"], ["-c", script, str(bundle), str(data_npz)],
                                cwd=REPO))
    assert "accuracy:" in out and "p50" in out and "p95" in out
    assert "providers: CPUExecutionProvider" in out


def test_the_blocker_blocks(tmp_path):
    proc = run_blocked(tmp_path, ["torch"], ["-c", "import torch"], cwd=tmp_path)
    assert proc.returncode != 0 and BLOCKED_MARK in proc.stderr


# ----------------------------------------------------------------------------- behaviour


def test_predictions_match_export_figures(bundle, split):
    model = EdgeModel(bundle)
    labels, confidences = model.predict(split.raw_test_X)
    accuracy = float((labels == split.test_y).mean())
    assert accuracy == pytest.approx(model.manifest["verification"]["onnx_accuracy"])
    assert ((confidences > 0) & (confidences <= 1)).all()
    assert model.providers == ["CPUExecutionProvider"]  # TensorRT/CUDA are not installed here


def test_providers_keep_profile_order_and_fall_back_to_cpu():
    preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.choose_providers(preferred, ["CPUExecutionProvider", "CUDAExecutionProvider",
                                                "TensorrtExecutionProvider"]) == preferred
    assert runtime.choose_providers(preferred, ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"]
    assert runtime.choose_providers(["CUDAExecutionProvider"], ["CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_latency_percentiles(bundle, split):
    lat = EdgeModel(bundle, threads=1).latency(split.raw_test_X, samples=20)
    assert lat.samples == 20 and 0 < lat.p50_ms <= lat.p95_ms


# ----------------------------------------------------------------------------- errors


def test_wrong_input_shape(bundle, split):
    model = EdgeModel(bundle)
    with pytest.raises(InferenceError, match=r"expected \(N, 1, 8, 8\), got \(5, 8, 8\)$"):
        model.predict(split.raw_test_X[:5, 0])
    with pytest.raises(InferenceError, match=r"got \(1, 8, 8\); a single sample needs a batch"):
        model.predict(split.raw_test_X[0])


def test_missing_file(copy):
    (copy / "model.onnx").unlink()
    with pytest.raises(InferenceError, match=r"model\.onnx: missing \(listed in manifest\.json\)"):
        EdgeModel(copy)


def test_tampered_file(copy):
    blob = bytearray((copy / "model.int8.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (copy / "model.int8.onnx").write_bytes(bytes(blob))
    with pytest.raises(InferenceError, match=r"model\.int8\.onnx: SHA-256 does not match"):
        EdgeModel(copy)


def test_not_a_model_dir_and_no_int8(copy, tmp_path):
    with pytest.raises(InferenceError, match=r"no manifest\.json here"):
        EdgeModel(tmp_path)
    data = json.loads((copy / "manifest.json").read_text())
    del data["files"]["model.int8.onnx"]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InferenceError, match=r"no model\.int8\.onnx in this export"):
        EdgeModel(copy, int8=True)


def test_bad_npz(tmp_path):
    np.savez(tmp_path / "noX.npz", features=np.zeros((2, 3)))
    with pytest.raises(InferenceError, match=r"no array X"):
        runtime.load_npz(tmp_path / "noX.npz")
    np.savez(tmp_path / "y.npz", X=np.zeros((2, 3)), y=np.zeros(3))
    with pytest.raises(InferenceError, match=r"y must be integer class indices"):
        runtime.load_npz(tmp_path / "y.npz")


def test_infer_cli_errors_are_one_line(copy, data_npz, tmp_path):
    app = typer.Typer()
    app.command()(infer_cmd)
    (copy / "run.py").write_text("tampered\n")
    result = CliRunner().invoke(app, [str(copy), str(data_npz)])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ") and "run.py: SHA-256 does not match" in line

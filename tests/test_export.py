"""ONNX export: parity for every zoo member, dynamic batch, manifest, int8 bounds, errors."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import onnx
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from fededge import __version__
from fededge.cli.model import export_cmd
from fededge.delivery import export
from fededge.delivery.export import EvalData, ExportError, StudentMeta, export_run, export_student
from fededge.edge import runtime
from fededge.learn.data import load_dataset, split_federated
from fededge.learn.models import build_student
from fededge.learn.trainer import Trainer
from fededge.learn.data import Standardizer
from fededge.learn.zoo import conv_zoo, tabular_zoo, zoo_for
from fededge.profiles import get_profile

PROFILE = "pi-4-4gb"


@pytest.fixture(scope="module")
def digits(digits_iid):
    return digits_iid


@pytest.fixture(scope="module")
def wine():
    return split_federated(load_dataset("wine"), 1, partition="iid", seed=0)


def eval_data(split) -> EvalData:
    return EvalData(split.raw_test_X, split.test_y, split.raw_public_X)


def student_meta(split, name: str, device: str = "dev0", accuracy: float | None = None,
                 dataset: str = "digits") -> StudentMeta:
    return StudentMeta(device=device, profile=PROFILE, student=name, round=3, accuracy=accuracy,
                       input_shape=tuple(split.input_shape), num_classes=split.num_classes,
                       class_names=list(split.class_names),
                       preprocessing=split.preprocessing.to_dict(), dataset=dataset)


def seeded_student(split, name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_student(name, split.input_shape, split.num_classes)


def write_run(root, split, students: dict[str, str]) -> None:
    """A run directory as `fededge simulate` writes it: device id → student name."""
    clients = []
    for i, (device, name) in enumerate(students.items()):
        model = seeded_student(split, name, seed=i)
        params = sum(p.numel() for p in model.parameters())
        meta = {**student_meta(split, name, device).__dict__, "input_shape":
                list(split.input_shape), "params": params, "fededge_version": __version__}
        ckpt = root / "clients" / device
        ckpt.mkdir(parents=True)
        save_file(model.state_dict(), str(ckpt / "student.safetensors"))
        (ckpt / "student.json").write_text(json.dumps(meta))
        clients.append({"id": device, "profile": PROFILE, "student": name, "params": params,
                        "accuracy": None})
    (root / "summary.json").write_text(json.dumps({"clients": clients, "dataset": "digits",
                                                   "seed": 0}))
    np.savez_compressed(root / "eval_data.npz", test_X=split.raw_test_X, test_y=split.test_y,
                        public_X=split.raw_public_X)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("run")
    write_run(root, digits, {"dev0-pi": "cnn-xs", "dev1-pi": "cnn-s"})
    return root


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind,name", [("image", n) for n in zoo_for((1, 8, 8))]
                         + [("tabular", n) for n in tabular_zoo()])
def test_round_trip_parity_and_dynamic_batch(kind, name, digits, wine, tmp_path):
    split = digits if kind == "image" else wine
    model = seeded_student(split, name)
    result = export_student(model, student_meta(split, name, dataset=kind), eval_data(split),
                            tmp_path, profile=get_profile(PROFILE))

    assert result.max_abs_diff <= export.PARITY_ATOL
    assert result.manifest["verification"]["argmax_mismatches"] == 0
    edge = runtime.EdgeModel(tmp_path)
    standardized = split.preprocessing.apply(split.raw_test_X[:7])
    with torch.inference_mode():
        expected = model(torch.from_numpy(standardized)).numpy()
    for batch in (1, 7):
        logits = edge.logits(split.raw_test_X[:batch])
        assert logits.shape == (batch, split.num_classes)
        np.testing.assert_allclose(logits, expected[:batch], atol=export.PARITY_ATOL)


# Every family member, on the smallest inputs its family takes (residual stages need 16 per
# side): export, parity check and int8 quantization as `fededge export --quantize int8` runs them.
FAMILY_CASES = ([(n, (3, 16, 16)) for n in conv_zoo()] + [(n, (6, 16)) for n in conv_zoo()]
                + [(n, (13,)) for n in tabular_zoo()])


@pytest.mark.parametrize("name,shape", FAMILY_CASES,
                         ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in FAMILY_CASES])
def test_every_family_member_exports_verifies_and_quantizes(name, shape, tmp_path):
    rng = np.random.default_rng(0)
    test_X = rng.normal(size=(6, *shape)).astype(np.float32)
    public_X = rng.normal(size=(8, *shape)).astype(np.float32)
    test_y = np.arange(6) % 3
    std = Standardizer.fit(public_X)
    meta = StudentMeta(device="dev0", profile=PROFILE, student=name, round=1, accuracy=None,
                       input_shape=shape, num_classes=3, class_names=["a", "b", "c"],
                       preprocessing=std.to_dict(), dataset="random")
    torch.manual_seed(0)
    model = build_student(name, shape, 3)
    result = export_student(model, meta, EvalData(test_X, test_y, public_X), tmp_path,
                            profile=get_profile(PROFILE), quantize="int8")
    assert result.max_abs_diff <= export.PARITY_ATOL
    weighted = [n for n in onnx.load(str(tmp_path / runtime.FP32_FILE)).graph.node
                if n.op_type in ("Conv", "Gemm", "MatMul")]
    # every weighted layer but the first and the last (kept float, see _quantize_int8)
    assert result.int8 is not None and result.int8.quantized_layers == len(weighted) - 2
    assert result.int8.bytes < result.fp32_bytes or result.params < 20_000
    edge = runtime.EdgeModel(tmp_path)
    assert edge.logits(test_X[:2]).shape == (2, 3)


class ExportsWrong(torch.nn.Module):
    """A student whose exported graph computes other logits than PyTorch does (here 1e-3 off):
    what the parity check is there to catch."""

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student(x)
        return logits + 1e-3 if torch.onnx.is_in_onnx_export() else logits


def test_parity_failure_is_loud(digits, tmp_path):
    model = ExportsWrong(seeded_student(digits, "cnn-xs"))
    with pytest.raises(ExportError, match=r"max \|logit difference\| 0\.001 .*tolerance 0\.0001"):
        export_student(model, student_meta(digits, "cnn-xs"), eval_data(digits), tmp_path,
                       profile=get_profile(PROFILE))
    assert not (tmp_path / runtime.MANIFEST).exists()


# ----------------------------------------------------------------------------- manifest


def test_manifest_contents(run_dir, digits, tmp_path):
    [result] = export_run(run_dir, device="dev1-pi", out=tmp_path)
    out = tmp_path / "dev1-pi"
    manifest = json.loads((out / "manifest.json").read_text())

    assert result.out_dir == out and manifest == result.manifest
    assert manifest["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    assert manifest["output"]["shape"] == ["batch", 10]
    assert manifest["class_names"] == digits.class_names
    assert manifest["preprocessing"] == digits.preprocessing.to_dict()
    assert manifest["profile"]["name"] == PROFILE
    assert manifest["profile"]["ort_providers"] == ["CPUExecutionProvider"]
    student = manifest["student"]
    assert (student["name"], student["round"], student["accuracy"]) == ("cnn-s", 3, None)
    assert student["params"] == result.params == sum(
        p.numel() for p in seeded_student(digits, "cnn-s").parameters())
    assert manifest["opset"] == export.OPSET
    assert manifest["fededge_version"] == __version__
    assert manifest["int8"] is None
    verification = manifest["verification"]
    assert verification["samples"] == len(digits.test_y)
    assert verification["max_abs_diff"] <= verification["tolerance"] == export.PARITY_ATOL
    on_disk = {p.name for p in out.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk == {
        "model.onnx", "run.py", "fededge_runtime.py", "requirements.txt", "README.md"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == runtime.sha256_file(out / name)
    assert (out / "fededge_runtime.py").read_text() == open(runtime.__file__).read()


def test_all_devices_go_to_run_export(run_dir):
    results = export_run(run_dir, all_devices=True)
    assert [r.device for r in results] == ["dev0-pi", "dev1-pi"]
    assert all((run_dir / "export" / r.device / "manifest.json").is_file() for r in results)


# ----------------------------------------------------------------------------- int8


@pytest.fixture(scope="module")
def trained_large(digits):
    model = seeded_student(digits, zoo_for(digits.input_shape)[-1])
    Trainer(model, lr=3e-3, seed=0).fit(digits.clients[0].X, digits.clients[0].y, epochs=6)
    return model


def test_int8_within_bounds(trained_large, digits, tmp_path):
    name = zoo_for(digits.input_shape)[-1]
    result = export_student(trained_large, student_meta(digits, name), eval_data(digits),
                            tmp_path, profile=get_profile(PROFILE), quantize="int8")
    q = result.int8

    assert result.accuracy > 0.9, "the student should be reasonably trained"
    assert q.accuracy_delta >= -0.01 and not q.lossy
    assert q.size_ratio <= 0.35
    assert q.argmax_agreement >= 0.98
    block = result.manifest["int8"]
    assert block["calibration"] == {"set": "public proxy", "samples": len(digits.raw_public_X)}
    assert (block["accuracy"], block["size_ratio"]) == (q.accuracy, q.size_ratio)
    assert "model.int8.onnx" in result.manifest["files"]
    labels, _ = runtime.EdgeModel(tmp_path, int8=True).predict(digits.raw_test_X)
    assert (labels == digits.test_y).mean() == pytest.approx(q.accuracy)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "dev9"}, r"no device 'dev9' in this run; valid devices: dev0-pi, dev1-pi"),
    ({}, r"the run has 2 devices; pass --device ID or --all"),
    ({"device": "dev0-pi", "all_devices": True}, r"either --device ID or --all, not both"),
    ({"device": "dev0-pi", "quantize": "fp16"},
     r"unknown quantization 'fp16'; use --quantize int8"),
])
def test_bad_arguments(run_dir, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export_run(run_dir, **kwargs)


def test_missing_run_dir_and_checkpoint(run_dir, digits, tmp_path):
    with pytest.raises(ExportError, match="no such run directory"):
        export_run(tmp_path / "nope", all_devices=True)
    write_run(tmp_path, digits, {"dev0": "cnn-xs"})
    (tmp_path / "clients" / "dev0" / "student.safetensors").unlink()
    with pytest.raises(ExportError, match=r"student\.safetensors: missing checkpoint file"):
        export_run(tmp_path, device="dev0")


def test_weights_of_another_student(digits, tmp_path):
    write_run(tmp_path, digits, {"dev0": "cnn-xs"})
    meta_path = tmp_path / "clients" / "dev0" / "student.json"
    meta_path.write_text(meta_path.read_text().replace('"cnn-xs"', '"cnn-m"'))
    with pytest.raises(ExportError, match=r"weights do not fit student 'cnn-m'"):
        export_run(tmp_path)


def test_cli_table_warning_and_error(run_dir, tmp_path, monkeypatch):
    app = typer.Typer()
    app.command()(export_cmd)
    runner = CliRunner()
    # the command exports with a threshold every int8 model exceeds: each is flagged as lossy
    monkeypatch.setattr(export, "export_run", functools.partial(export_run, int8_max_loss=-1.0))

    ok = runner.invoke(app, [str(run_dir), "--device", "dev0-pi", "--quantize", "int8",
                             "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "cnn-xs" in ok.output and "warning: dev0-pi (cnn-xs) loses" in ok.output

    bad = runner.invoke(app, [str(run_dir), "--device", "nope"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "error: no device 'nope' in this run; valid devices: dev0-pi, dev1-pi"]


def test_export_from_kits_says_what_is_missing(tmp_path):
    """A server kit exports what its federation collected, a device kit its own student; each
    error says why there is nothing and what to run instead."""
    from kit_helpers import AGENT, federation_file

    from fededge.kits.provision import provision

    kits = tmp_path / "kits"
    provision(federation_file(tmp_path), kits)
    cases = [(kits / "server", "no summary.json in"),
             (kits / AGENT, "is agent-only and trains no student; export the model of "
                            "'pi5-kitchen'"),
             (kits / "gateway-1", "missing checkpoint file; the device never finished a round")]
    for kit, words in cases:
        with pytest.raises(ExportError, match=re.escape(words)):
            export_run(kit, all_devices=True)
    state = kits / "server" / "state"
    state.mkdir()
    (state / "summary.json").write_text(json.dumps({"clients": [], "collect_models": False}))
    with pytest.raises(ExportError, match=re.escape(
            "keeps trained students on their devices (collect_models = false); export each "
            "device's own with `fededge export KITS/<device>`")):
        export_run(kits / "server", all_devices=True)
    with pytest.raises(ExportError, match="--state is for a kit"):
        export_run(tmp_path, all_devices=True, state=state)

"""The zoo across the catalog, as `fededge devices --json` reports it, and students of your
own (`--zoo`): what is refused, and a zoo file whose two modules federate, export and run in
onnxruntime."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.delivery.export import export_run, load_student
from fededge.edge.runtime import EdgeModel
from fededge.learn import models, zoo
from fededge.learn.userzoo import UserZooError, load_user_zoo
from fededge.sim.simulate import SimulationOptions, run_simulation

EXAMPLE = Path(__file__).parent.parent / "examples" / "my_zoo.py"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _forget_user_students():
    yield
    zoo.forget_registered()
    models.forget_user_builders()


def _devices_json(tmp_path: Path, shape: tuple[int, ...], *extra: str) -> list[dict]:
    data = tmp_path / ("x".join(map(str, shape)) + ".npz")
    rng = np.random.default_rng(0)
    np.savez(data, X=rng.random((40, *shape), dtype=np.float32), y=np.arange(40) % 10)
    result = runner.invoke(app, ["devices", "--data", str(data), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_has_one_object_per_profile_with_the_documented_keys(tmp_path):
    rows = _devices_json(tmp_path, (3, 32, 32))
    assert len(rows) == 8
    for row in rows:
        assert {"profile", "student", "params", "flops", "train_memory_bytes", "latency_ms",
                "binding"} <= set(row)
        assert row["binding"] in ("params", "train_memory", "latency", "largest")


def test_at_32x32_the_catalog_spans_two_orders_of_magnitude(tmp_path):
    rows = _devices_json(tmp_path, (3, 32, 32))
    students = {r["student"] for r in rows}
    assert None not in students and len(students) >= 5, students
    params = [r["params"] for r in rows]
    assert max(params) >= 1_000_000 and max(params) >= 100 * min(params)


@pytest.mark.parametrize("shape", [(3, 96, 96), (1, 28, 28), (6, 128)])
def test_every_profile_gets_a_student(tmp_path, shape):
    rows = _devices_json(tmp_path, shape)
    assert len(rows) == 8 and all(r["student"] for r in rows), rows


def test_the_batch_size_changes_the_training_memory(tmp_path):
    small, large = (_devices_json(tmp_path, (3, 32, 32), "--batch-size", str(b)) for b in (8, 64))
    pi = {r["profile"]: r for r in small}["pi-zero-2w"]
    assert pi["train_memory_bytes"] < {r["profile"]: r for r in large}["pi-zero-2w"][
        "train_memory_bytes"]


# --------------------------------------------------------------------------- --zoo errors


def _zoo(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_zoo.py"
    path.write_text("import torch\nfrom torch import nn\n\n" + textwrap.dedent(body))
    return path


@pytest.mark.parametrize(("body", "match"), [
    ("x = 1\n", r"defines no function students\(input_shape, num_classes\)"),
    ("import no_such_module\n", r"importing the zoo file failed: ModuleNotFoundError"),
    ("def students(shape, k):\n    return []\n", r"must return a non-empty dict"),
    ("def students(shape, k):\n    return {'ok': 3}\n", r"student 'ok' is a int, not a torch"),
    ("def students(shape, k):\n    return {'bad name!': nn.Flatten()}\n", r"student name 'bad name!'"),
    ("def students(shape, k):\n    return {'cnn-s': nn.Sequential(nn.Flatten(), nn.Linear(64, k))}\n",
     r"'cnn-s' is a built-in student; rename it"),
    ("def students(shape, k):\n    return {'wide': nn.Sequential(nn.Flatten(), nn.Linear(64, k + 1))}\n",
     r"student 'wide' returns \(2, 11\) for a batch of 2; it must return logits of shape \(batch, 10\)"),
    ("def students(shape, k):\n"
     "    return {'mis': nn.Sequential(nn.Flatten(), nn.Linear(60, k))}\n",
     r"student 'mis' fails on input \(2, 1, 8, 8\) in layer '1' \(Linear\): RuntimeError"),
])
def test_unusable_zoo_files_are_refused_in_one_line(tmp_path, body, match):
    path = _zoo(tmp_path, body)
    with pytest.raises(UserZooError, match=match) as info:
        load_user_zoo(path, (1, 8, 8), 10)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_module_that_cannot_export_names_its_layer(tmp_path):
    path = _zoo(tmp_path, """
        class Histogram(nn.Module):  # aten::histc has no ONNX export
            def forward(self, x):
                return x * torch.histc(x, bins=4).sum()

        def students(shape, k):
            return {'opaque': nn.Sequential(nn.Flatten(), Histogram(), nn.Linear(64, k))}
        """)
    with pytest.raises(UserZooError, match=r"'opaque' cannot be exported to ONNX \(layer '1', "
                                           r"Histogram\): .*aten::histc"):
        load_user_zoo(path, (1, 8, 8), 10)


def test_the_cli_prints_the_refusal_as_one_error_line(tmp_path):
    path = _zoo(tmp_path, "x = 1\n")
    result = runner.invoke(app, ["devices", "--zoo", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "error:" in result.output
    assert "defines no function students" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- --zoo federates


def test_user_students_are_measured_and_picked_by_the_same_budgets(tmp_path):
    loaded = {s.name: s for s in load_user_zoo(EXAMPLE, (1, 8, 8), 10)}
    assert set(loaded) == {"my-sepconv", "my-mlp"}
    built = models.build_student("my-mlp", (1, 8, 8), 10)
    assert loaded["my-mlp"].figures.params == sum(p.numel() for p in built.parameters())
    assert loaded["my-mlp"].figures.flops == 2 * (64 * 256 + 256 * 128 + 128 * 10)
    ladder = zoo.zoo_for((1, 8, 8))
    assert ladder.index("cnn-xs") < ladder.index("my-sepconv") < ladder.index("cnn-s")
    assert ladder.index("cnn-m") < ladder.index("my-mlp") < ladder.index("cnn-l")
    rows = {r["profile"]: r for r in _devices_json(tmp_path, (1, 8, 8), "--zoo", str(EXAMPLE))}
    assert rows["pi-zero-2w"]["student"] == "my-sepconv"
    assert rows["pi-4-4gb"]["student"] == "my-mlp"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_zoo_of_two_modules_federates_exports_and_runs_in_onnxruntime(tmp_path):
    opts = SimulationOptions(clients=2, rounds=2, profiles=["pi-zero-2w", "pi-4-4gb"],
                             out=tmp_path / "run", baselines=False, zoo=EXAMPLE, seed=0,
                             overrides={"warmup_epochs": 5})
    result = run_simulation(opts)
    s = result.summary
    assert sorted(c["student"] for c in s["clients"]) == ["my-mlp", "my-sepconv"]
    assert s["uploads_accepted"] == s["uploads_expected"] == 4
    assert (result.out / zoo.USER_ZOO_FILE).read_text() == EXAMPLE.read_text()
    # export in a fresh registry: the run's own copy of the zoo file rebuilds the students
    zoo.forget_registered()
    models.forget_user_builders()
    exported = export_run(result.out, all_devices=True, quantize="int8")
    assert sorted(e.student for e in exported) == ["my-mlp", "my-sepconv"]
    test = np.load(result.out / "test.npz")
    for e in exported:
        assert e.max_abs_diff <= 1e-4 and e.int8 is not None
        labels, probs = EdgeModel(e.out_dir).predict(test["X"][:16])
        assert labels.shape == probs.shape == (16,) and ((probs > 0) & (probs <= 1)).all()
        torch_labels, _ = load_student(result.out / "clients" / e.device).predict(test["X"][:16])
        assert (labels == torch_labels).all()

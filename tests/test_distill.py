import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fededge.learn.kd import kd_loss, kd_objective, kd_terms, soften

LN2 = math.log(2.0)


def test_design_worked_example_objective():
    # DESIGN.md: 5 samples, alpha 0.5, T 2, H(y,p_s) = 2.2458, H(p_t,p_s) = 2.8244 (sums).
    J = kd_objective(2.2458, 2.8244, alpha=0.5, temperature=2.0)
    assert round(J, 4) == 6.7717
    means = [round(v / 5, 4) for v in (2.2458, 2.8244, J)]
    assert means == [0.4492, 0.5649, 1.3543]


def test_kd_terms_hand_computed():
    y = [[1, 0, 0], [0, 1, 0]]
    p_s = [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]
    p_t = [[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]
    h_hard, h_soft = kd_terms(np.array(y), np.array(p_t), np.array(p_s))
    # H(y,p_s) = -(ln 0.5 + ln 0.5) = 2 ln 2 = 1.386294
    assert h_hard == pytest.approx(2 * LN2)
    # sample 1: 0.5 ln 2 + 0.25 ln 4 + 0.25 ln 4 = 1.5 ln 2
    # sample 2: 0.25 ln 4 + 0.25 ln 2 + 0.5 ln 4 = 1.75 ln 2  -> total 3.25 ln 2 = 2.252728
    assert h_soft == pytest.approx(3.25 * LN2)


def test_kd_terms_zero_weight_ignores_zero_probability():
    certain = np.array([[1.0, 0.0]])
    h_hard, h_soft = kd_terms(certain, certain, certain)
    assert h_hard == 0.0 and h_soft == 0.0


def test_kd_terms_shape_mismatch():
    with pytest.raises(ValueError, match="share one"):
        kd_terms(np.eye(3), np.eye(3), np.eye(2))


def _batch(n=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, k, generator=g),
        torch.randint(0, k, (n,), generator=g),
        torch.randn(n, k, generator=g) * 2,
    )


@pytest.mark.parametrize("alpha, T", [(0.3, 2.0), (1.0, 4.0), (0.0, 1.0), (0.5, 1.0)])
def test_kd_loss_matches_kd_terms_on_softened_distributions(alpha, T):
    s, y, t = _batch()
    h_hard, h_soft = kd_terms(
        F.one_hot(y, 4).numpy(), soften(t, T).numpy(), soften(s, T).numpy()
    )
    expected = kd_objective(h_hard, h_soft, alpha, T) / len(y)
    assert kd_loss(s, y, t, alpha=alpha, temperature=T).item() == pytest.approx(expected, rel=1e-5)


def test_plain_cross_entropy_when_no_teacher():
    s, y, _ = _batch()
    loss = kd_loss(s, y, None, alpha=0.0, temperature=1.0)
    assert loss.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_pure_distillation_minimum_is_at_the_teacher():
    _, _, t = _batch()
    T = 2.0
    p_t = soften(t, T).numpy()
    _, h_self = kd_terms(p_t, p_t, p_t)
    at_teacher = t.clone().requires_grad_(True)
    loss = kd_loss(at_teacher, None, t, alpha=1.0, temperature=T)
    assert loss.item() == pytest.approx(T**2 * h_self / len(t), rel=1e-5)
    loss.backward()
    assert at_teacher.grad.abs().max().item() < 1e-6
    for seed in range(3):
        noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.5
        assert kd_loss(t + noise, None, t, alpha=1.0, temperature=T) > loss


def test_gradient_is_finite_for_extreme_logits():
    s, y, t = _batch()
    s = (s * 1e4).requires_grad_(True)
    kd_loss(s, y, t * 1e4, alpha=0.5, temperature=3.0).backward()
    assert torch.isfinite(s.grad).all()


def test_log_probabilities_are_valid_teacher_logits():
    s, y, t = _batch()
    as_logits = kd_loss(s, y, t, alpha=0.7, temperature=3.0)
    as_log_probs = kd_loss(s, y, F.log_softmax(t, dim=1), alpha=0.7, temperature=3.0)
    assert as_log_probs.item() == pytest.approx(as_logits.item(), rel=1e-6)


def test_soften_flattens_with_temperature():
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    cold, hot = soften(logits, 1.0), soften(logits, 5.0)
    assert cold.sum().item() == pytest.approx(1.0) and hot.sum().item() == pytest.approx(1.0)
    assert hot.max() < cold.max()


@pytest.mark.parametrize(
    "labels, teacher, alpha, T, expected",
    [
        (None, "t", 0.5, 2.0, "labels=None means pure distillation"),
        ("y", None, 0.5, 2.0, "teacher_logits=None means plain cross-entropy"),
        ("y", "t", 1.5, 2.0, "alpha must be in"),
        ("y", "t", 0.5, 0.0, "temperature must be > 0"),
        ("y", "short", 0.5, 2.0, "teacher logits have shape"),
    ],
)
def test_kd_loss_argument_errors(labels, teacher, alpha, T, expected):
    s, y, t = _batch()
    teachers = {"t": t, "short": t[:, :3], None: None}
    with pytest.raises(ValueError, match=expected):
        kd_loss(s, y if labels else None, teachers[teacher], alpha=alpha, temperature=T)


# ----------------------------------------------------------------------------- fededge distill
# A teacher built here with plain torch (not by fededge), exported as a user would.

import json  # noqa: E402

import onnxruntime as ort  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from fededge import api  # noqa: E402
from fededge.cli.app import app  # noqa: E402

FAST = ("--profiles", "pi-zero-2w", "--epochs", "1", "--finetune-epochs", "1")


def _digits_npz(path, flat=False):
    bunch = load_digits()
    X = (bunch.images / 16.0).astype(np.float32)[:, None]
    np.savez(path, X=X.reshape(len(X), -1) if flat else X, y=bunch.target)
    return path


def _onnx_teacher(path, classes=10, softmax=False, train=True):
    torch.manual_seed(0)
    layers = [torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
              torch.nn.Linear(64, classes)]
    model = torch.nn.Sequential(*layers, *([torch.nn.Softmax(dim=1)] if softmax else []))
    if train:
        bunch = load_digits()
        X = torch.from_numpy((bunch.images / 16.0).astype(np.float32)[:, None])
        y = torch.from_numpy(bunch.target)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model[:4](X), y).backward()
            opt.step()
    torch.onnx.export(model.eval(), (torch.zeros(2, 1, 8, 8),), str(path), dynamo=False,
                      input_names=["pixels"], output_names=["scores"],
                      dynamic_axes={"pixels": {0: "n"}, "scores": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def distill_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return {"data": _digits_npz(root / "digits.npz"), "teacher": _onnx_teacher(root / "t.onnx"),
            "root": root}


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split()), result


def test_distill_exports_a_loadable_bundle_per_profile_and_a_summary(distill_files):
    out = distill_files["root"] / "out"
    code, text, _ = _cli("distill", distill_files["teacher"], "--data", distill_files["data"],
                         *FAST, "--out", out)
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    teacher = summary["teacher"]
    assert {"accuracy", "params", "bytes"} <= set(teacher)
    assert teacher["params"] == 64 * 64 + 64 + 64 * 10 + 10 and teacher["accuracy"] > 0.8
    (student,) = summary["students"]
    assert {"profile", "student", "params", "accuracy", "labels_only_accuracy",
            "export_dir"} <= set(student)
    assert student["profile"] == "pi-zero-2w" and student["student"] in text
    bundle = out / "pi-zero-2w"
    assert student["export_dir"] == str(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    X = np.load(distill_files["data"])["X"][:5]
    mean = np.asarray(manifest["preprocessing"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(manifest["preprocessing"]["std"], np.float32).reshape(1, -1, 1, 1)
    logits = session.run(None, {"input": ((X - mean) / std).astype(np.float32)})[0]
    assert logits.shape == (5, 10)
    assert manifest["student"]["params"] == student["params"]


def _fails(files, teacher, *extra, data=None):
    code, text, result = _cli("distill", teacher, "--data", data or files["data"], *FAST,
                              *extra, "--out", files["root"] / "bad")
    assert code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), text
    assert "Traceback" not in text and text.count("error:") == 1, text
    return code, text


def test_distill_teacher_input_shape_must_match_the_data(distill_files):
    flat = _digits_npz(distill_files["root"] / "flat.npz", flat=True)
    code, text = _fails(distill_files, distill_files["teacher"], data=flat)
    assert code == 2 and "(N, 1, 8, 8)" in text and "(N, 64)" in text


def test_distill_teacher_class_count_must_match_the_data(distill_files):
    teacher = _onnx_teacher(distill_files["root"] / "five.onnx", classes=5, train=False)
    code, text = _fails(distill_files, teacher)
    assert code == 2 and "predicts 5 classes" in text and "has 10" in text


def test_distill_probabilities_where_logits_were_promised(distill_files):
    teacher = _onnx_teacher(distill_files["root"] / "soft.onnx", softmax=True, train=False)
    code, text = _fails(distill_files, teacher)
    assert code == 2 and "look like probabilities" in text
    assert "--teacher-outputs probabilities" in text


def test_distill_unreadable_teacher(distill_files):
    junk = distill_files["root"] / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    code, text = _fails(distill_files, junk)
    assert code == 2 and "junk.onnx" in text and "unreadable ONNX teacher" in text
    code, text = _fails(distill_files, distill_files["root"] / "missing.onnx")
    assert "no such teacher" in text


def test_api_distill_takes_a_probability_teacher_when_told(distill_files, tmp_path):
    teacher = _onnx_teacher(tmp_path / "soft.onnx", softmax=True)
    lines = []
    summary = api.distill(teacher, distill_files["data"], out=tmp_path / "out",
                          profiles=["pi-zero-2w"], epochs=1, finetune_epochs=0,
                          teacher_outputs="probabilities", progress=lines.append)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["teacher"]["accuracy"] > 0.8 and summary["settings"]["finetune_epochs"] == 0
    assert summary["students"][0]["profile"] == "pi-zero-2w" and lines

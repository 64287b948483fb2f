import numpy as np
import pytest
import torch
from torch import nn

from fededge.learn.data import load_dataset, split_federated
from fededge.learn.trainer import Trainer


@pytest.fixture(scope="module")
def digits_flat():
    """Digits split into train (the private pool), proxy and test, flattened to 64 features."""
    sp = split_federated(load_dataset("digits"), 1, partition="iid", seed=0)
    flat = lambda X: X.reshape(len(X), -1)  # noqa: E731
    client = sp.clients[0]
    return flat(client.X), client.y, flat(sp.public_X), flat(sp.test_X), sp.test_y


def _mlp(seed=0, inputs=64, hidden=64, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


@pytest.fixture(scope="module")
def teacher(digits_flat):
    X, y, *_ = digits_flat
    trainer = Trainer(_mlp(), seed=0)
    trainer.fit(X, y, epochs=15)
    return trainer


def test_fit_reaches_high_accuracy(teacher, digits_flat):
    *_, X_test, y_test = digits_flat
    assert teacher.accuracy(X_test, y_test) >= 0.90


def test_distill_pulls_student_towards_teacher(teacher, digits_flat):
    _, _, X_proxy, X_test, _ = digits_flat
    student = Trainer(_mlp(seed=1, hidden=32), seed=1)
    target = teacher.logits(X_test).argmax(axis=1)
    before = (student.logits(X_test).argmax(axis=1) == target).mean()
    loss = student.distill(X_proxy, teacher.logits(X_proxy), epochs=20, temperature=2.0)
    after = (student.logits(X_test).argmax(axis=1) == target).mean()
    assert np.isfinite(loss) and before < 0.5 and after > 0.85


def test_distill_mixed_with_labels(digits_flat):
    X, y, *_ = digits_flat
    trainer = Trainer(_mlp())
    soft = np.zeros((len(X), 10), np.float32)
    loss = trainer.distill(X, soft, epochs=1, temperature=2.0, alpha=0.5, y=y)
    assert np.isfinite(loss)
    with pytest.raises(ValueError, match="labels=None means pure distillation"):
        trainer.distill(X, soft, epochs=1, temperature=2.0, alpha=0.5)


def test_state_dict_round_trip_continues_identically(digits_flat):
    X, y, *_ = digits_flat
    first = Trainer(_mlp(seed=0), lr=1e-2, seed=3)
    first.fit(X[:200], y[:200], epochs=1)
    snapshot = first.state_dict()
    loss_a = first.fit(X[:200], y[:200], epochs=1)

    second = Trainer(_mlp(seed=7), lr=1e-2, seed=99)
    second.load_state_dict(snapshot)
    loss_b = second.fit(X[:200], y[:200], epochs=1)
    assert loss_a == loss_b
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_outputs_inputs_and_compute_time(digits_flat):
    X, y, *_ = digits_flat
    trainer = Trainer(_mlp())
    trainer.fit(torch.from_numpy(X[:40]), torch.from_numpy(y[:40]), epochs=1)  # torch inputs
    logits = trainer.logits(X[:10].astype(np.float64))  # any float numpy
    assert logits.shape == (10, 10) and logits.dtype == np.float32
    assert trainer.compute_seconds > 0.0
    assert 0.0 <= trainer.accuracy(X[:10], y[:10]) <= 1.0


def test_batchnorm_never_sees_a_single_sample_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    X = np.random.default_rng(0).normal(size=(33, 4)).astype(np.float32)
    trainer = Trainer(model, batch_size=32)
    assert trainer._batch_bounds(33) == [(0, 33)]
    assert trainer._batch_bounds(65) == [(0, 32), (32, 65)]
    assert np.isfinite(trainer.fit(X, np.arange(33) % 2, epochs=2))


@pytest.mark.parametrize(
    "call, expected",
    [
        (
            lambda t, X, y: t.distill(X, np.zeros((5, 10)), epochs=1, temperature=1.0),
            r"expected \(20, classes\)",
        ),
        (lambda t, X, y: t.fit(X, y[:5], epochs=1), r"y has shape \(5,\); expected \(20,\)"),
        (lambda t, X, y: t.fit(X, y, epochs=0), "epochs must be >= 1"),
        (lambda t, X, y: t.logits(X[:0]), "empty array"),
        (lambda t, X, y: t.load_state_dict({"model": {}}), "lacks generator, optimizer"),
    ],
)
def test_argument_errors(digits_flat, call, expected):
    X, y, *_ = digits_flat
    with pytest.raises(ValueError, match=expected):
        call(Trainer(_mlp()), X[:20], y[:20])


def test_constructor_errors():
    with pytest.raises(ValueError, match="lr must be > 0"):
        Trainer(_mlp(), lr=0.0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Trainer(_mlp(), batch_size=0)

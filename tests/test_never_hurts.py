"""Issue 13: a federation reports (and must not cause) devices left below training alone."""

from pathlib import Path

from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.sim.simulate import SimulationResult, below_local_only


def _client(cid: str, acc: float, local: float) -> dict:
    return {"id": cid, "profile": "pi-4-4gb", "student": "cnn-xs", "params": 1000,
            "accuracy": acc, "local_only_accuracy": local, "centralized_accuracy": 0.9}


def test_below_local_only_counts_each_client_against_its_own_baseline():
    clients = [_client("a", 0.50, 0.60), _client("b", 0.70, 0.40), _client("c", 0.30, 0.31)]
    below = below_local_only(clients)
    assert below["count"] == 2
    assert [r["id"] for r in below["clients"] if r["below"]] == ["a", "c"]
    assert abs(below["clients"][1]["delta"] - 0.30) < 1e-9


def test_simulate_warns_when_a_client_ends_below_local_only(monkeypatch, tmp_path):
    import fededge.sim.simulate

    clients = [_client("dev-a", 0.20, 0.35), _client("dev-b", 0.80, 0.60)]
    summary = {"strategy": "fedmd", "mean_accuracy": 0.5, "local_only_mean_accuracy": 0.475,
               "centralized_mean_accuracy": 0.9, "bytes_up": 10, "bytes_down": 10,
               "bytes_per_client_round": 5, "uploads_accepted": 2, "uploads_expected": 2,
               "wall_seconds": 1.0, "federation_seconds": 1.0, "overhead_share": 0.5,
               "clients": clients, "clients_below_local_only": below_local_only(clients)}

    def fake(opts, on_step, plan=None):
        return SimulationResult(summary, [], Path(opts.out))

    monkeypatch.setattr(fededge.sim.simulate, "run_simulation", fake)
    monkeypatch.setattr(fededge.sim.simulate, "prepare", lambda opts: None)
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "r")],
                                env={"COLUMNS": "200"})
    out = " ".join(result.output.split())
    assert result.exit_code == 0, out
    assert "warning: 1 of 2 clients ended below their local-only accuracy" in out
    assert "dev-a" in out.split("warning:")[1]
    summary["clients_below_local_only"] = below_local_only([clients[1]])
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "r")],
                                env={"COLUMNS": "200"})
    assert "warning" not in result.output


def _hard_run(tmp_path: Path, **overrides):
    import numpy as np

    from fededge.learn.synthetic import make_hard
    from fededge.sim.simulate import SimulationOptions, run_simulation

    X, y = make_hard("hard32", seed=0, count=HARD_IMAGES)
    np.savez(tmp_path / "hard.npz", X=X, y=y)
    opts = SimulationOptions(data=str(tmp_path / "hard.npz"), clients=8, rounds=5,
                             profiles=["pi-zero-2w", "pi-3bplus"], out=tmp_path / "run",
                             baselines=False, seed=0, overrides=overrides)
    return run_simulation(opts)


HARD_IMAGES = 600  # 75 per device: weak (~19%), disagreeing warm-up students


def test_distillation_does_not_collapse_students_on_hard_data(tmp_path):
    """The issue-13 collapse as a regression: on hard 32x32 RGB data, where warm-up students
    are weak and disagree, the federation must not end below where the students started."""
    rows = _hard_run(tmp_path).rows
    warmup, final = rows[0].mean_accuracy, rows[-1].mean_accuracy
    assert final >= warmup - 0.01, (
        f"federation ended at {final:.3f}, below its warm-up {warmup:.3f}: distillation "
        f"overwrote what the students knew (per round: "
        f"{[round(r.mean_accuracy, 3) for r in rows]})")


def _absorb_wrong_consensus(holdout_share: float):
    """A trained cnn-xs device absorbs a consensus that confidently names the wrong class of
    every proxy row; returns (held-out accuracy before, after, whether weights changed)."""
    import numpy as np
    import torch
    from helpers import small_config, small_split

    from fededge.federation.strategies.base import ClientContext
    from fededge.federation.strategies.fedmd import FedMDClient, FedMDServer, holdout_split
    from fededge.federation.wiring import learner_factory
    from fededge.learn.models import build_student
    from fededge.learn.trainer import Trainer
    from fededge.wire.codecs import codec_for
    from fededge.wire.messages import Payload

    split = small_split(2)
    config = small_config(split, holdout_share=holdout_share, distill_epochs=8,
                          distill_label_weight=0.0, revisit_ntd_weight=0.0)
    data = split.clients[0]
    torch.manual_seed(0)
    trainer = Trainer(build_student("cnn-xs", split.input_shape, split.num_classes))
    trainer.fit(data.X, data.y, epochs=15)
    ctx = ClientContext(trainer, data.X, data.y, split.public_X, learner_factory(config))
    announcement = FedMDServer(config).configure(1)
    wrong = (trainer.logits(split.public_X).argmax(axis=1) + 1) % split.num_classes
    teacher = np.full((len(split.public_X), split.num_classes), -8.0, np.float32)
    teacher[np.arange(len(wrong)), wrong] = 0.0
    consensus = Payload(tensors=codec_for(config).encode(teacher))
    _, held = holdout_split(len(data.y), holdout_share or 0.2, config.seed)
    before, weights = trainer.accuracy(data.X[held], data.y[held]), trainer.weights()
    FedMDClient(config).absorb(ctx, announcement, consensus)
    after = trainer.accuracy(data.X[held], data.y[held])
    return before, after, not np.array_equal(weights, trainer.weights())


def test_a_consensus_that_lowers_held_out_accuracy_is_not_kept():
    before, after, changed = _absorb_wrong_consensus(holdout_share=0.0)
    assert after < before - 0.05, "the control consensus was meant to harm the student"
    before, after, changed = _absorb_wrong_consensus(holdout_share=0.2)
    assert not changed and after == before, (
        f"the device kept a consensus that lowered held-out accuracy {before:.3f} -> {after:.3f}")


def test_int8_logits_are_the_default_everywhere():
    from fededge.api import simulation_options
    from fededge.config import FederationConfig

    assert FederationConfig().logit_codec == "int8"
    assert "logit_codec" not in simulation_options().overrides  # the config decides
    assert simulation_options(codec="float16").overrides["logit_codec"] == "float16"

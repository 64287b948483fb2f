"""A 3-client, 3-profile, 3-round federation over real brokers, end to end."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import requires_mosquitto

from fededge.sim.simulate import SimulationError, SimulationOptions, run_simulation

PROFILES = ["pi-zero-2w", "pi-4-4gb", "pi-5-8gb"]



def _run(tmp_path: Path, broker: str):
    opts = SimulationOptions(clients=3, rounds=3, profiles=PROFILES, out=tmp_path / "run",
                             broker=broker, seed=1, overrides={"warmup_epochs": 10})
    return run_simulation(opts)


def _check(result):
    s = result.summary
    students = {c["student"] for c in s["clients"]}
    assert len(students) == 3, f"expected 3 architectures, got {students}"
    assert s["uploads_accepted"] == s["uploads_expected"] == 9
    assert s["rejected"] == {}
    assert s["mean_accuracy"] > s["local_only_mean_accuracy"], (
        f"federation {s['mean_accuracy']:.3f} did not beat local-only "
        f"{s['local_only_mean_accuracy']:.3f}")
    assert s["bytes_up"] > 0 and s["bytes_down"] > 0
    out = result.out
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2, 3]
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("mean_accuracy", "local_only_mean_accuracy", "centralized_mean_accuracy",
                "rounds", "clients", "bytes_up", "bytes_down", "wall_seconds", "strategy",
                "bytes_per_client_round"):
        assert key in on_disk
    assert on_disk["privacy"] is None, "local DP is off, yet a privacy budget was reported"
    # the default codec is int8 (issue 13), and the default run above still learns with it
    assert on_disk["config"]["logit_codec"] == "int8"
    below = on_disk["clients_below_local_only"]
    assert [r["id"] for r in below["clients"]] == [c["id"] for c in s["clients"]]
    assert below["count"] == sum(c["accuracy"] < c["local_only_accuracy"] for c in s["clients"])
    assert (out / "rounds.png").stat().st_size > 10_000
    for c in s["clients"]:
        assert (out / "clients" / c["id"] / "student.safetensors").exists()


def test_federation_over_embedded_amqtt(tmp_path):
    _check(_run(tmp_path, "embedded"))


@requires_mosquitto
def test_federation_over_mosquitto(tmp_path):
    _check(_run(tmp_path, "mosquitto"))


def test_inference_only_profile_is_refused(tmp_path, monkeypatch):
    catalog = Path(__file__).parent.parent / "devices"
    custom = tmp_path / "devices"
    shutil.copytree(catalog, custom)
    text = (custom / "pi-zero-2w.toml").read_text().replace("can_train = true",
                                                            "can_train = false")
    (custom / "pi-zero-2w.toml").write_text(text)
    monkeypatch.setenv("FEDEDGE_DEVICES", str(custom))
    opts = SimulationOptions(clients=2, rounds=1, profiles=["pi-zero-2w"], out=tmp_path / "r")
    with pytest.raises(SimulationError, match="cannot train"):
        run_simulation(opts)


def test_a_centralized_baseline_trains_what_one_federated_device_trained():
    """Its sample budget is a device's (warm-up, revisits, distillation), not a fixed 20+
    epochs over the pooled data, which made big students' references cost more than the
    federation (hard32: res-xl alone 15-20 minutes)."""
    from fededge.config import FederationConfig
    from fededge.learn.data import load_dataset, split_federated
    from fededge.sim.baselines import centralized_epochs, federation_samples

    split = split_federated(load_dataset("digits"), 10, seed=0)
    pooled = sum(len(c.y) for c in split.clients)
    private = sum(len(c.y) for c in split.clients) / 10
    for rounds, proxy in ((10, 0), (10, 100), (1, 0)):
        config = FederationConfig(rounds=rounds, proxy_per_round=proxy)
        rows = proxy or len(split.public_X)
        device = private * (30 + 2 * rounds) + rounds * 2 * rows  # the defaults' epochs
        assert federation_samples(config, split) == int(device)
        epochs = centralized_epochs(config, split)
        assert (epochs - 1) * pooled < device <= epochs * pooled

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

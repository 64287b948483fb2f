"""The command line as a user meets it: one clear error line, exit code 2, no traceback."""

import numpy as np
from typer.testing import CliRunner

from fededge.cli.app import app

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, " ".join(result.output.split())


def test_devices_table_lists_every_profile_and_its_student():
    code, out = _invoke("devices")
    assert code == 0, out
    for name in ("pi-zero-2w", "pi-5-8gb", "jetson-agx-orin-64gb", "x86-gateway"):
        assert name in out
    assert "cnn-xs" in out and "cnn-l" in out


def test_devices_with_tabular_data_picks_mlps():
    code, out = _invoke("devices", "--data", "wine")
    assert code == 0 and "mlp-" in out and "cnn-" not in out


def test_bad_npz_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((20, 4), np.float32))
    code, out = _invoke("simulate", "--data", str(bad), "--clients", "2", "--out",
                        str(tmp_path / "run"))
    assert code == 2
    assert "error:" in out and "bad.npz" in out and "missing key(s) y" in out
    assert "Traceback" not in out


def test_nan_in_npz_is_named(tmp_path):
    bad = tmp_path / "nan.npz"
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    X[3, 1] = np.nan
    np.savez(bad, X=X, y=np.arange(40) % 2)
    code, out = _invoke("simulate", "--data", str(bad), "--out", str(tmp_path / "run"))
    assert code == 2 and "NaN" in out


def test_unknown_profile_suggests_the_closest(tmp_path):
    code, out = _invoke("simulate", "--profiles", "pi-4-4gb,pi-9", "--out", str(tmp_path / "r"))
    assert code == 2 and "pi-9" in out and "error:" in out


def test_unknown_aggregator_lists_the_valid_ones(tmp_path):
    code, out = _invoke("simulate", "--aggregator", "avg", "--out", str(tmp_path / "r"))
    assert code == 2 and "'avg'" in out and "era" in out and "trimmed-mean" in out


def test_unknown_partition_and_strategy(tmp_path):
    code, out = _invoke("simulate", "--partition", "random", "--out", str(tmp_path / "r"))
    assert code == 2 and "random" in out and "dirichlet" in out
    code, out = _invoke("simulate", "--strategy", "fedprox", "--out", str(tmp_path / "r"))
    assert code == 2 and "fedprox" in out and "fedmd" in out


def test_straggle_and_settings_reach_the_simulation(monkeypatch, tmp_path):
    import fededge.sim.simulate
    from fededge.config import ConfigError

    seen = {}

    def capture(opts, *args):
        seen["opts"] = opts
        raise ConfigError("stop here")

    monkeypatch.setattr(fededge.sim.simulate, "run_simulation", capture)
    code, out = _invoke("simulate", "--straggle", "0.5", "--set", "deadline_s=7",
                        "--out", str(tmp_path / "r"))
    assert code == 2 and "stop here" in out
    assert seen["opts"].straggle == 0.5 and seen["opts"].overrides["deadline_s"] == 7
    code, out = _invoke("simulate", "--straggle", "-1", "--out", str(tmp_path / "r"))
    assert code == 2 and "straggle" in out


def test_fedavg_kd_without_a_device_for_its_teacher_fails_before_round_1(tmp_path):
    code, out = _invoke("simulate", "--clients", "3", "--rounds", "2", "--strategy",
                        "fedavg-kd", "--profiles", "pi-zero-2w", "--out", str(tmp_path / "r"))
    assert code == 2 and "Traceback" not in out
    assert "no device can train the teacher 'cnn-l'" in out and "x86-gateway" in out
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing ran

"""What must work where torch cannot be imported: provisioning, checking kits, the server's
command line and the broker (a fedmd server from a kit runs a whole federation torch-free in
tests/test_provision.py; deploy, agent and infer in tests/test_deploy.py). Each command runs
in a Python whose ``import torch`` fails (a sitecustomize), so an accidental import anywhere on
its path fails the test instead of passing on this machine, where torch is installed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

from helpers import BLOCKED_MARK, EDGE_BLOCKED, blocked_env, run_blocked, stdout_of
from kit_helpers import REPO, federation_file

from fededge.transport.brokers import free_port, wait_for_port

NO_TORCH = ["torch"]


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_blocked(tmp_path, NO_TORCH, ["-m", "fededge.cli", *args], cwd=REPO)


def test_the_blocker_really_blocks_torch(tmp_path):
    proc = run_blocked(tmp_path, NO_TORCH, ["-c", "import torch"], cwd=REPO)
    assert proc.returncode != 0 and BLOCKED_MARK in proc.stderr


def test_provision_and_verify_kit_without_torch(tmp_path):
    kits = tmp_path / "kits"
    out = stdout_of(_cli(tmp_path, "provision", str(federation_file(tmp_path)), "--out",
                         str(kits)))
    assert "Kits of federation" in out
    for party in ("server", "broker", "pi5-kitchen", "zero-kiosk"):
        assert (kits / party / "manifest.json").is_file()
    out = stdout_of(_cli(tmp_path, "verify-kit", str(kits)))
    assert "files match the manifest" in out


def test_server_help_without_torch(tmp_path):
    out = stdout_of(_cli(tmp_path, "server", "--help"))
    assert "--kit" in out and "--join-timeout" in out


def test_the_embedded_broker_without_torch(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fededge.cli", "broker", "--embedded",
                             "--port", str(port)], cwd=REPO,
                            env=blocked_env(tmp_path, NO_TORCH), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()  # printed once the broker listens
        assert "development broker listening" in first, first + proc.stdout.read()
        assert wait_for_port("127.0.0.1", port, 10)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert "Traceback" not in output, output


def test_import_fededge_is_light_and_its_api_loads_on_first_use(tmp_path):
    code = ("import sys, fededge\n"
            "heavy = [m for m in ('torch', 'numpy', 'rich', 'fededge.api', 'fededge.sim') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert {'simulate', 'export', 'load_model'} <= set(dir(fededge))\n"
            "from fededge import load_model\n"
            "assert 'fededge.api' in sys.modules and 'torch' not in sys.modules\n"
            "print(fededge.__version__, load_model.__name__)\n")
    out = stdout_of(run_blocked(tmp_path, EDGE_BLOCKED, ["-c", code], cwd=REPO))
    assert "load_model" in out


def test_the_dashboard_of_a_server_kit_without_the_training_side(tmp_path):
    """`pip install fededge[dashboard]` on an edge install: it serves a kit's state."""
    kits = tmp_path / "kits"
    stdout_of(_cli(tmp_path, "provision", str(federation_file(tmp_path)), "--out", str(kits)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fededge.cli", "dashboard",
                             str(kits / "server"), "--port", str(port)], cwd=REPO,
                            env=blocked_env(tmp_path, EDGE_BLOCKED), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for_port("127.0.0.1", port, 30), proc.communicate(timeout=30)[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=10) as r:
            state = json.load(r)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert state["source"]["kind"] == "kit" and state["status"] == "preparing"
    assert {d["id"] for d in state["devices"]} >= {"pi5-kitchen"}
    assert all(d["status"] == "not seen" for d in state["devices"])
    assert "Traceback" not in output and "dashboard of" in output, output


def test_provision_with_a_zoo_file_without_torch_names_the_extra(tmp_path):
    """Measuring a federation's own students needs torch: refused in one line, nothing written."""
    (tmp_path / "my_zoo.py").write_text((REPO / "examples" / "my_zoo.py").read_text())
    path = federation_file(tmp_path)
    path.write_text(path.read_text().replace('name = "demo"', 'name = "demo"\nzoo = "my_zoo.py"',
                                             1))
    proc = _cli(tmp_path, "provision", str(path), "--out", str(tmp_path / "kits"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert "needs torch" in proc.stdout + proc.stderr and "fededge[train]" in proc.stdout + \
        proc.stderr
    assert not (tmp_path / "kits").exists()

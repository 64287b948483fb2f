"""The two installs, from the wheel `make wheel` builds (what devices/install.sh --from takes):
`pip install fededge` is the torch-free edge runtime and agent a device needs, `pip check` is
clean, the device commands run, and a training command says in one line which extra it needs;
the Makefile's `.[train,test]` install (this venv) is clean under `pip check` too.

The edge venv is built here from the wheel, with pip using this machine's package index and
cache as the Makefile does; only if the wheel's dependencies cannot be installed at all is the
test skipped, saying so."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from kit_helpers import EXAMPLE, REPO, federation_file

from fededge.delivery.export import EvalData, StudentMeta, export_student
from fededge.kits.provision import WHEEL, provision
from fededge.learn.models import build_student
from fededge.profiles import get_profile

pytestmark = pytest.mark.slow
UNINSTALLABLE = ("No matching distribution found", "Could not find a version that satisfies")


@pytest.fixture(scope="module")
def edge(tmp_path_factory, digits_iid):
    """A venv with nothing but `pip install <the wheel>`, a provisioned kit and an export."""
    tmp = tmp_path_factory.mktemp("edge")
    made = subprocess.run(["make", "-s", "-C", str(REPO), "wheel", f"DIST={tmp / 'dist'}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True,
                          timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    wheel = tmp / "dist" / WHEEL  # the name kits' start scripts and units give
    assert wheel.is_file(), sorted((tmp / "dist").iterdir())
    venv = tmp / "venv"  # without its own pip: this one installs into it (pip --python)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([*_pip(python), "install", "--quiet", str(wheel)],
                               capture_output=True, text=True, timeout=900)
    if installed.returncode != 0 and any(m in installed.stderr for m in UNINSTALLABLE):
        pytest.skip("the wheel's dependencies cannot be installed from this machine's index: "
                    + installed.stderr.strip().splitlines()[-1])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    kits = tmp / "kits"
    provision(federation_file(tmp), kits)
    torch.manual_seed(0)
    split = digits_iid
    meta = StudentMeta("pi5-kitchen", "pi-5-8gb", "cnn-xs", 1, None, tuple(split.input_shape),
                       split.num_classes, split.class_names, split.preprocessing.to_dict(),
                       "digits")
    export_student(build_student("cnn-xs", split.input_shape, split.num_classes), meta,
                   EvalData(split.raw_test_X, split.test_y, split.raw_public_X),
                   tmp / "export" / "pi5-kitchen", profile=get_profile("pi-5-8gb"))
    np.savez(tmp / "test.npz", X=split.raw_test_X, y=split.test_y)
    return SimpleNamespace(tmp=tmp, venv=venv, python=python, kits=kits,
                           export=tmp / "export" / "pi5-kitchen")


def _pip(python: str) -> list[str]:
    """This interpreter's pip, working on the environment of ``python``."""
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", python]


def _run(edge, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300,
                          cwd=cwd or edge.tmp, env={"PATH": f"{edge.venv / 'bin'}:/usr/bin:/bin",
                                                    "COLUMNS": "200", "HOME": str(edge.tmp)})


def test_the_edge_install_is_complete_and_has_no_torch(edge):
    check = subprocess.run([*_pip(edge.python), "check"], capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0 and "No broken requirements found" in check.stdout, \
        check.stdout + check.stderr
    found = _run(edge, edge.python, "-c", "import importlib.util as u; print(' '.join(m for m in "
                 "('torch', 'sklearn', 'scipy', 'safetensors', 'onnx', 'amqtt', 'matplotlib', "
                 "'onnxruntime', 'paho', 'cryptography', 'numpy') if u.find_spec(m)))")
    assert found.stdout.split() == ["onnxruntime", "paho", "cryptography", "numpy"], \
        found.stdout + found.stderr


def test_device_commands_run_on_the_edge_install(edge):
    fededge = str(edge.venv / "bin" / "fededge")
    verified = _run(edge, fededge, "verify-kit", str(edge.kits / "zero-kiosk"))
    assert verified.returncode == 0 and "match the manifest signed by" in verified.stdout, \
        verified.stdout + verified.stderr
    inferred = _run(edge, fededge, "infer", str(edge.export), str(edge.tmp / "test.npz"))
    assert inferred.returncode == 0 and "accuracy:" in inferred.stdout, inferred.stderr
    installed = _run(edge, fededge, "agent", "--kit", str(edge.kits / "zero-kiosk"),
                     "--install", str(edge.export))
    assert installed.returncode == 0 and "installed " in installed.stdout, \
        installed.stdout + installed.stderr
    for command in ("agent", "deploy", "broker"):
        helped = _run(edge, fededge, command, "--help")
        assert helped.returncode == 0 and "--kit" in helped.stdout, (command, helped.stderr)


@pytest.mark.parametrize("command", [
    ["simulate", "--rounds", "1"], ["devices"], ["export", "EXPORT", "--all"],
    ["provision", str(EXAMPLE), "--out", "kits2"], ["server", "--kit", "KITS/server"],
    ["client", "--kit", "KITS/pi5-kitchen"], ["broker", "--embedded", "--port", "1"],
])
def test_a_training_command_names_the_extra_it_needs(edge, command):
    args = [str(edge.kits / a[5:]) if a.startswith("KITS/") else
            str(edge.export.parent) if a == "EXPORT" else a for a in command]
    result = _run(edge, str(edge.venv / "bin" / "fededge"), *args)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.strip().splitlines() == [output.strip()] and "Traceback" not in output
    assert output.startswith(f"error: `fededge {command[0]}` needs fededge's training extra")
    assert 'pip install "fededge[train]"' in output


def test_the_training_install_is_complete():
    """This venv is what the Makefile installs: torch first, then .[train,test]."""
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    requires = metadata.requires("fededge") or []
    assert any(r.startswith("torch") and "extra == \"train\"" in r.replace("'", '"')
               for r in requires), requires
    assert not any(r.startswith("torch") and "extra" not in r for r in requires)

"""Device install assets: devices/install.sh (dry run), its requirements reader, systemd units.

The installer's choice matters most for devices that cannot train: they must get the edge
agent without torch. A dry run prints the plan and every command without changing anything,
so it is checked here on this machine for both kinds of profile and for a Jetson.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fededge.kits.kit import BrokerAccess, DatasetRef, Kit

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "devices" / "install.sh"
ASSETS = REPO / "devices" / "install"


def _load_requirements_module():
    """devices/install/requirements.py, a script beside the installer rather than a package
    module, loaded under a name that cannot clash with anything on sys.path."""
    spec = importlib.util.spec_from_file_location("fededge_install_requirements",
                                                  ASSETS / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reqs = _load_requirements_module()

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="install.sh needs bash")


def _kit(tmp: Path, profile: str, device: str = "dev-1", role: str | None = "client") -> Path:
    """A device kit's client.toml as provision writes it (no keys: a dry run reads only it);
    ``role=None`` writes one from before kits had roles."""
    kit = tmp / device
    kit.mkdir()
    spec = Kit(directory=kit, federation="demo", device=device,
               broker=BrokerAccess("127.0.0.1", 8883, device),
               dataset=DatasetRef("digits", "iid", 0.5, 0, 1, "0" * 64), config={},
               profile=profile, student="cnn-s", shard=0, role=role or "client")
    text = spec.to_toml("test kit")
    if role is None:
        text, n = re.subn(r'(?m)^role = "client"\n', "", text)
        assert n == 1
    spec.file.write_text(text)
    return kit


def _catalog_with_sensor(tmp: Path) -> Path:
    """A catalog holding a profile that cannot train (the shipped ones all can)."""
    catalog = tmp / "catalog"
    catalog.mkdir()
    text = (REPO / "devices" / "pi-zero-2w.toml").read_text()
    text, n = re.subn(r"(?m)^can_train = true.*$", "can_train = false", text)
    assert n == 1
    (catalog / "sensor-node.toml").write_text(text)
    return catalog


def _dry_run(kit: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "JETSON": "no", **env}
    return subprocess.run(["bash", str(INSTALL), "--kit", str(kit), "--dry-run", *args],
                          capture_output=True, text=True, env=full_env, timeout=60,
                          check=False)


def _plan(output: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(plan fields, requirement lines, printed commands) of a dry run's output."""
    fields, requirements, commands, in_reqs = {}, [], [], False
    for line in output.splitlines():
        if line.startswith("+ "):
            commands.append(line[2:])
        elif line.startswith("    ") and in_reqs:
            requirements.append(line.strip())
        elif m := re.match(r"  (\w[\w ,()]*?):\s*(.*)", line):
            fields[m.group(1)] = m.group(2)
            in_reqs = m.group(1).startswith("requirements")
    return fields, requirements, commands


def _names(lines: list[str]) -> set[str]:
    return {reqs.normalize(reqs.NAME.match(line).group(1)) for line in lines}


def _pyproject_group(group: str) -> set[str]:
    return _names(reqs.requirements(str(REPO / "pyproject.toml"), group))


def test_training_profile_installs_client_with_torch(tmp_path):
    result = _dry_run(_kit(tmp_path, "pi-5-8gb"))
    assert result.returncode == 0, result.stderr
    fields, requirements, commands = _plan(result.stdout)
    assert fields["mode"] == "client (kit role = client; profile pi-5-8gb has can_train = true)"
    assert fields["torch"].startswith("torch")
    # torch goes first; then fededge's own dependencies and its train extra
    assert _names(requirements) == _pyproject_group("base,train") - {"torch"}
    assert "torch" in _pyproject_group("train") and "onnx" in _names(requirements)
    pip = [c for c in commands if " -m pip " in c]
    assert "--no-deps" in pip[0] and pip[1].split()[-1].startswith("torch")
    units = [c for c in commands if c.startswith("render ")]
    assert [u.rsplit("/", 1)[1] for u in units] == ["fededge-client.service",
                                                   "fededge-agent.service"]
    assert "dry run: nothing was changed" in result.stdout


@pytest.mark.parametrize("role, why", [
    ("agent", "kit role = agent; profile sensor-node has can_train = false"),
    (None, "profile sensor-node: can_train = false"),  # a kit from before roles
])
def test_non_training_profile_installs_agent_without_torch(tmp_path, role, why):
    result = _dry_run(_kit(tmp_path, "sensor-node", role=role),
                      FEDEDGE_DEVICES=str(_catalog_with_sensor(tmp_path)))
    assert result.returncode == 0, result.stderr
    fields, requirements, commands = _plan(result.stdout)
    assert fields["mode"] == f"agent ({why})"
    assert "torch" not in fields
    assert _names(requirements) == _pyproject_group("base") and "torch" not in _names(requirements)
    assert not _pyproject_group("base") & _pyproject_group("train")  # the edge install: no torch
    pip = [c for c in commands if " -m pip " in c]
    assert "--no-deps" in pip[0] and not any("torch" in c for c in pip)
    assert any(c.endswith("fededge-agent.service") for c in commands)
    assert not any("fededge-client" in c for c in commands)


def test_agent_role_on_a_training_profile_installs_only_the_agent(tmp_path):
    """role = "agent" (an agent-only device by choice) wins over a profile that could train."""
    result = _dry_run(_kit(tmp_path, "pi-5-8gb", role="agent"))
    assert result.returncode == 0, result.stderr
    fields, requirements, _ = _plan(result.stdout)
    assert fields["mode"] == "agent (kit role = agent; profile pi-5-8gb has can_train = true)"
    assert "torch" not in _names(requirements)


def test_client_mode_on_an_agent_only_kit_is_refused(tmp_path):
    result = _dry_run(_kit(tmp_path, "pi-5-8gb", role="agent"), "--mode", "client")
    assert result.returncode == 2 and "agent-only kit" in result.stderr, result.stderr


def test_mode_override_and_offline_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    result = _dry_run(_kit(tmp_path, "pi-5-8gb"), "--mode", "agent", "--wheels", str(wheels))
    assert result.returncode == 0, result.stderr
    fields, _, commands = _plan(result.stdout)
    assert fields["mode"] == "agent (--mode agent; profile pi-5-8gb has can_train = true)"
    assert all(f"--no-index --find-links {wheels}" in c for c in commands if " -m pip " in c)


def test_jetson_without_gpu_wheel_warns_and_falls_back_to_cpu(tmp_path):
    kit = _kit(tmp_path, "jetson-orin-nano-8gb")
    result = _dry_run(kit, JETSON="yes")
    assert result.returncode == 0, result.stderr
    assert "onnxruntime-gpu is not on PyPI for aarch64" in result.stderr
    assert "Jetson_Zoo" in result.stderr and "ORT_WHEEL" in result.stderr
    fields, requirements, _ = _plan(result.stdout)
    assert fields["onnxruntime"].startswith("onnxruntime (CPU)")
    assert "onnxruntime" in _names(requirements)


def test_jetson_gpu_wheel_replaces_onnxruntime(tmp_path):
    wheel = "/tmp/onnxruntime_gpu-1.19.0-cp310-cp310-linux_aarch64.whl"
    result = _dry_run(_kit(tmp_path, "jetson-orin-nano-8gb"), "--mode", "agent", JETSON="yes",
                      ORT_WHEEL=wheel)
    assert result.returncode == 0, result.stderr
    assert "not on PyPI" not in result.stderr
    fields, requirements, commands = _plan(result.stdout)
    assert fields["onnxruntime"] == wheel
    assert "onnxruntime" not in _names(requirements)
    assert any(c.endswith(wheel) for c in commands if " -m pip " in c)


@pytest.mark.parametrize("make_kit, words", [
    (lambda tmp: tmp, "no client.toml"),
    (lambda tmp: _kit(tmp, "pi-9"), "profile 'pi-9'"),
])
def test_bad_kit_is_named(tmp_path, make_kit, words):
    result = _dry_run(make_kit(tmp_path))
    assert result.returncode == 2 and words in result.stderr, result.stderr


def test_bad_mode_is_named(tmp_path):
    result = _dry_run(_kit(tmp_path, "pi-5-8gb"), "--mode", "train")
    assert result.returncode == 2 and "--mode must be auto, client or agent" in result.stderr


# ----------------------------------------------------------------------------- requirements.py

@pytest.mark.parametrize("line, expected", [
    ("typer>=0.12", ("typer>=0.12", None)),
    ("typer>=0.12; extra == 'edge'", ("typer>=0.12", "edge")),
    ('tomli>=2.0; python_version < "3.11" and extra == "edge"',
     ('tomli>=2.0 ; python_version < "3.11"', "edge")),
    ("tomli>=2.0; python_version < '3.11'", ("tomli>=2.0; python_version < '3.11'", None)),
])
def test_split_extra(line, expected):
    assert reqs.split_extra(line) == expected


def test_requirements_from_a_wheel(tmp_path):
    wheel = tmp_path / "fededge-0.1.0-py3-none-any.whl"
    metadata = ("Metadata-Version: 2.3\nName: fededge\nRequires-Dist: torch>=2.2\n"
                "Requires-Dist: numpy>=1.24\nRequires-Dist: numpy>=1.24; extra == 'edge'\n"
                "Requires-Dist: onnxruntime>=1.17; extra == 'edge'\n"
                "Requires-Dist: pytest>=8; extra == 'test'\n\nLong description\n"
                "Requires-Dist: not-a-header\n")
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fededge-0.1.0.dist-info/METADATA", metadata)
    assert reqs.requirements(str(wheel), "edge") == ["numpy>=1.24", "onnxruntime>=1.17"]
    assert reqs.requirements(str(wheel), "base") == ["torch>=2.2", "numpy>=1.24"]
    assert reqs.requirements(str(wheel), "base,edge") == ["torch>=2.2", "numpy>=1.24",
                                                         "numpy>=1.24", "onnxruntime>=1.17"]


def test_requirements_of_the_installed_fededge():
    """What install.sh reads after `pip install --no-deps` (this venv's fededge: its metadata
    may predate a pyproject edit, so only the split is checked, not the exact lists)."""
    base, train = (_names(reqs.requirements("installed", g)) for g in ("base", "train"))
    assert "torch" in train and "torch" not in base and {"onnxruntime", "numpy"} <= base
    assert not any("extra" in line for line in reqs.requirements("installed", "base,train"))
    assert _names(reqs.requirements("installed", "base,train")) == base | train


def test_requirements_cli_errors_name_the_input(tmp_path, capsys):
    assert reqs.main([str(REPO / "pyproject.toml"), "gpu"]) == 2
    assert "no optional dependency group 'gpu'" in capsys.readouterr().err
    assert reqs.main([str(tmp_path / "nope.whl"), "edge"]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- systemd units

@pytest.mark.parametrize("role", ["client", "agent"])
def test_unit_files(tmp_path, role):
    path = ASSETS / f"fededge-{role}.service"
    unit = _parse_unit(path)
    service = unit["Service"]
    assert service["ExecStart"].startswith(f"/opt/fededge/bin/fededge {role} --kit "
                                           "/etc/fededge/kit")
    assert service["Restart"] == "on-failure" and service["User"] == "fededge"
    assert service["NoNewPrivileges"] == "true" and service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    if role == "agent":  # the agent writes its installed models below the kit, nowhere else
        assert service["ReadWritePaths"] == "/etc/fededge/kit/state"
    _systemd_verify(path, tmp_path)


def _parse_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(path.read_text())
    return unit


def _systemd_verify(path: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` has no complaint about the unit (skip where it is missing)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; the unit was parsed only")
    # verify needs an executable ExecStart: point it at this venv's fededge, as install.sh
    # points it at the device's venv.
    rendered = tmp_path / path.name
    rendered.write_text(path.read_text().replace("/opt/fededge/bin/fededge",
                                                 str(Path(sys.executable).with_name("fededge"))))
    result = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True,
                            timeout=60, check=False)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if path.name in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Path:
    from kit_helpers import federation_file

    from fededge.kits.provision import provision

    tmp = tmp_path_factory.mktemp("units")
    provision(federation_file(tmp), tmp / "kits")
    return tmp / "kits"


@pytest.mark.parametrize("kit, role", [("server", "server"), ("pi5-kitchen", "client"),
                                       ("zero-kiosk", "agent"), ("broker", "broker")])
def test_provisioned_unit_files(provisioned, tmp_path, kit, role):
    """The units `fededge provision` renders from templates/fededge.service.in, one per role."""
    path = provisioned / kit / f"fededge-{role}.service"
    service = _parse_unit(path)["Service"]
    state = " --state /var/lib/fededge" if role in ("server", "client") else ""
    assert service["ExecStart"] == f"/opt/fededge/bin/fededge {role} --kit /etc/fededge/{role}" \
        + state
    assert service["User"] == ("mosquitto" if role == "broker" else "fededge")
    assert ("ExecReload" in service) == (role == "broker")
    assert ("ReadWritePaths" in service) == (role == "agent")
    assert ("Environment=OMP_NUM_THREADS=" in path.read_text()) == (role in ("client", "agent"))
    _systemd_verify(path, tmp_path)

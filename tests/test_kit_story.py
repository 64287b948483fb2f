"""The deployment story of docs/deployment.md, end to end, as an operator runs it: provision the
example federation (three training devices, one agent-only device, collect_models on), run the
secured Mosquitto, a torch-free fedmd server and three clients as separate processes over TLS,
export every student from the server kit, deploy, install on the agent-only device with torch
unimportable, stop the broker: the agent keeps answering /predict, and reconnects by itself.
On the way: a second server is refused, and a device exports and installs its own student (the
path of a federation that keeps students on their devices)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import BLOCKED_MARK, EDGE_BLOCKED, REQUIRES_MOSQUITTO, blocked_env
from kit_helpers import AGENT, DEVICES, REPO, Processes, federation_file, http_json, poll
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.cli.output import INTERRUPTED
from fededge.edge import runtime
from fededge.edge.installs import Installs
from fededge.kits.manifest import verify_manifest
from fededge.kits.provision import provision
from fededge.transport.brokers import free_port, wait_for_port

pytestmark = [*REQUIRES_MOSQUITTO, pytest.mark.slow]

TRAINING = "\n".join(["rounds = 2", "warmup_epochs = 2", "distill_epochs = 1",
                      "revisit_epochs = 1", "proxy_per_round = 100", "deadline_s = 60.0"])
PRIVACY = "noise_multiplier = 0.5\nclip = 10.0"  # local DP on the uploaded logits
MODEL_OF_AGENT = "pi5-kitchen"  # the example's zero-kiosk runs pi5-kitchen's model


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """Provisioned kits of the example federation and its broker, running."""
    tmp = tmp_path_factory.mktemp("story")
    port = free_port()
    kits = tmp / "kits"
    provision(federation_file(tmp, port=port, settings=TRAINING, privacy=PRIVACY), kits)
    procs = Processes()
    try:
        fed = SimpleNamespace(tmp=tmp, port=port, kits=kits, procs=procs, export=tmp / "export")
        fed.broker = _start_broker(fed)
        yield fed
    finally:
        procs.stop_all()


def _start_broker(fed) -> subprocess.Popen:
    log = fed.tmp / "broker.log"
    broker = fed.procs.start("broker", "--kit", str(fed.kits / "broker"), log=log)
    assert wait_for_port("127.0.0.1", fed.port, 20), log.read_text()
    return broker


def _stop(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.wait(timeout=20)


def test_a_federation_that_collects_its_students(story):
    """Broker, torch-free server and three clients as processes; a second server is refused
    while the first runs, and does not disturb it; the server keeps every student."""
    fed, tmp = story, story.tmp
    started = time.monotonic()
    server = fed.procs.start("server", "--kit", str(fed.kits / "server"), "--join-timeout",
                             "120", log=tmp / "server.log", env=blocked_env(tmp, ["torch"]))
    clients = {d: fed.procs.start("client", "--kit", str(fed.kits / d), "--threads", "1",
                                  log=tmp / f"{d}.log") for d in DEVICES}
    deadline = time.monotonic() + 30
    while "waiting for 3 devices" not in (tmp / "server.log").read_text():
        assert time.monotonic() < deadline and server.poll() is None, \
            (tmp / "server.log").read_text()
        time.sleep(0.2)
    time.sleep(1.0)  # its claim is on the broker once it is connected
    second = _fededge(tmp, ["torch"], "server", "--kit", str(fed.kits / "server"))
    assert second.returncode == 2, second.stdout + second.stderr
    assert "another server of federation 'demo' is running: run " in second.stdout
    for proc in (server, *clients.values()):
        proc.wait(timeout=240)
    logs = {name: (tmp / f"{name}.log").read_text() for name in ("server", *DEVICES)}
    assert server.returncode == 0, logs
    assert "federation done: 2 rounds, 6 uploads accepted, 0 rejected" in logs["server"]
    for device, proc in clients.items():
        assert proc.returncode == 0, logs[device]
        assert re.search(r"final accuracy \d+\.\d%", logs[device]), logs[device]
        assert "local differential privacy: ε =" in logs[device]
    summary = json.loads((fed.kits / "server" / "state" / "summary.json").read_text())
    assert [c["id"] for c in summary["clients"]] == sorted(DEVICES)
    assert summary["collect_models"] and summary["missing_models"] == []
    assert verify_manifest(fed.kits / "server").problems == []  # state/ is not kit content
    print(f"federation of separate processes: {time.monotonic() - started:.1f} s")


def test_export_deploy_and_serve_through_a_broker_outage(story):
    """`fededge export KITS/server --all`, `fededge deploy --kit KITS/server` to the
    agent-only device, whose agent runs without torch; then the broker stops (and later comes
    back): the agent keeps serving the model, and its /health says how the broker is."""
    fed, tmp = story, story.tmp
    assert (fed.kits / "server" / "state" / "summary.json").is_file(), "needs the federation"
    exported = CliRunner().invoke(app, ["export", str(fed.kits / "server"), "--all", "--out",
                                        str(fed.export)])
    assert exported.exit_code == 0, exported.output
    assert sorted(p.name for p in fed.export.iterdir()) == sorted(DEVICES)

    http = free_port()
    env = blocked_env(tmp, EDGE_BLOCKED)
    agent = fed.procs.start("agent", "--kit", str(fed.kits / AGENT), "--http", str(http),
                            log=tmp / "agent.log", env=env)
    health, predict = f"http://127.0.0.1:{http}/health", f"http://127.0.0.1:{http}/predict"
    poll(health, lambda a: a.get("broker", {}).get("connected"), 30)
    deployed = CliRunner().invoke(app, ["deploy", str(fed.export), "--kit",
                                        str(fed.kits / "server"), "--device", AGENT, "--wait",
                                        "60"])
    assert deployed.exit_code == 0, deployed.output + (tmp / "agent.log").read_text()
    installs = Installs.of_kit(fed.kits / AGENT)
    version = installs.pointer().current
    assert (installs.path(version) / "model.onnx").read_bytes() == \
        (fed.export / MODEL_OF_AGENT / "model.onnx").read_bytes()  # model_from's student
    poll(health, lambda a: a.get("version") == version, 20)

    with np.load(fed.kits / "server" / "state" / "eval_data.npz") as data:
        X, y = data["test_X"][:200], data["test_y"][:200]
    reference = runtime.EdgeModel(fed.export / MODEL_OF_AGENT)
    labels = reference.predict(X)[0]
    assert float((labels == y).mean()) > 0.3  # a trained student (chance: 0.1)

    def predicted() -> list[int]:
        status, answer = http_json(predict, {"x": X.tolist()})
        assert status == 200 and answer["version"] == version, answer
        return answer["labels"]
    assert predicted() == labels.tolist()

    assert _stop(fed.broker) == 0
    down = poll(health, lambda a: not a["broker"]["connected"], 30)
    assert down["version"] == version and down["broker"]["problem"]
    assert predicted() == labels.tolist()  # the broker is gone; the model serves

    # SIGTERM stops an agent as Ctrl-C does: status 130, which its unit counts as success
    assert _stop(agent) == INTERRUPTED  # and an agent started while the broker is down serves too
    agent = fed.procs.start("agent", "--kit", str(fed.kits / AGENT), "--http", str(http),
                            log=tmp / "agent2.log", env=env)
    poll(health, lambda a: a.get("version") == version and not a["broker"]["connected"], 30)
    assert predicted() == labels.tolist()
    fed.broker = _start_broker(fed)
    poll(health, lambda a: a["broker"]["connected"], 45)  # reconnected, with backoff
    assert _stop(agent) == INTERRUPTED
    for log in ("agent.log", "agent2.log"):
        assert BLOCKED_MARK not in (tmp / log).read_text()


def test_a_device_exports_and_installs_its_own_student(story):
    """Where students stay on their devices: `fededge export KITS/<device>` on the device and
    `fededge agent --kit KITS/<device> --install DIR`, with the checks of a deployed bundle
    (a tampered export is refused and the installed model keeps serving)."""
    fed, tmp = story, story.tmp
    kit = fed.kits / MODEL_OF_AGENT
    own = tmp / "own"
    exported = CliRunner().invoke(app, ["export", str(kit), "--out", str(own)])
    assert exported.exit_code == 0, exported.output
    assert (own / MODEL_OF_AGENT / "model.onnx").read_bytes() == \
        (fed.export / MODEL_OF_AGENT / "model.onnx").read_bytes()  # the student it sent

    def install(directory: Path) -> subprocess.CompletedProcess:
        return _fededge(tmp, EDGE_BLOCKED, "agent", "--kit", str(kit), "--install",
                        str(directory))
    done = install(own / MODEL_OF_AGENT)
    assert done.returncode == 0 and "installed " in done.stdout, done.stdout + done.stderr
    version = Installs.of_kit(kit).pointer().current
    assert version and f"installed {version} from {own / MODEL_OF_AGENT}" in " ".join(
        done.stdout.split())
    again = install(own / MODEL_OF_AGENT)
    assert again.returncode == 0 and f"already installed {version}" in again.stdout

    tampered = tmp / "tampered"
    shutil.copytree(own / MODEL_OF_AGENT, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "model.onnx").write_bytes(bytes(data))
    refused = install(tampered)
    assert refused.returncode == 1 and "refused" in refused.stdout and "SHA-256" in \
        refused.stdout, refused.stdout
    assert Installs.of_kit(kit).pointer().current == version


def _fededge(tmp: Path, blocked: list[str], *args: str) -> subprocess.CompletedProcess:
    """``fededge ARGS`` in a Python that cannot import ``blocked``, to its end."""
    return subprocess.run([sys.executable, "-m", "fededge.cli", *args], cwd=REPO,
                          env=blocked_env(tmp, blocked), capture_output=True, text=True,
                          timeout=120)

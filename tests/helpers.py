"""Shared builders for tests: a small digits split, in-process clients, and Python
subprocesses that cannot import chosen modules (torch-free paths)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fededge.config import FederationConfig
from fededge.federation.client import DeviceIdentity, FederationClient, LocalData
from fededge.federation.wiring import build_client
from fededge.learn.data import load_dataset, split_federated
from fededge.learn.models import build_student
from fededge.learn.trainer import Trainer
from fededge.learn.zoo import estimate_cost
from fededge.transport.brokers import BrokerError, mosquitto_binary
from fededge.wire import envelope as proto

STUDENTS = ("cnn-xs", "cnn-s", "cnn-m")


def small_split(num_clients: int = 3, seed: int = 0):
    return split_federated(load_dataset("digits"), num_clients, partition="dirichlet",
                           alpha=0.5, seed=seed)


def small_config(split, **changes) -> FederationConfig:
    base = dict(rounds=3, num_classes=split.num_classes, input_shape=tuple(split.input_shape),
                proxy_sha256=split.proxy_sha256, proxy_size=len(split.public_X),
                warmup_epochs=10, distill_epochs=2, revisit_epochs=1, deadline_s=30.0)
    return FederationConfig(**{**base, **changes})


def make_client(transport, split, index: int, federation: str = "demo",
                student: str | None = None, checkpoint_dir=None) -> FederationClient:
    student = student or STUDENTS[index % len(STUDENTS)]
    params = estimate_cost(student, split.input_shape, split.num_classes).params
    data = split.clients[index]
    local = LocalData(data.X, data.y, split.public_X, split.proxy_sha256, split.test_X,
                      split.test_y)
    config = FederationConfig(federation=federation, num_classes=split.num_classes,
                              input_shape=tuple(split.input_shape))
    return build_client(transport, config,
                        DeviceIdentity(f"dev{index}", "test-profile", student, params), local,
                        seed=index, checkpoint_dir=checkpoint_dir)


def message_is(kind: str, rnd: int | None = None):
    """``when`` of a fault rule (``fededge.transport.faults``): messages of one kind, and of
    one round if ``rnd`` is given. The transport knows no message kinds; the test does."""
    def check(topic: str, payload: bytes) -> bool:
        msg = proto.decode(payload)
        return msg.kind == kind and (rnd is None or msg.round == rnd)
    return check


def local_only_accuracy(split, index: int, epochs: int) -> float:
    """The same student trained on its private data alone, for comparison."""
    torch.manual_seed(index)
    model = build_student(STUDENTS[index % len(STUDENTS)], split.input_shape, split.num_classes)
    trainer = Trainer(model, seed=index)
    data = split.clients[index]
    trainer.fit(data.X, data.y, epochs=epochs)
    return trainer.accuracy(split.test_X, split.test_y)


def mean(values) -> float:
    return float(np.mean(list(values)))


# Makes modules unimportable as if they were not installed: a finder first on sys.meta_path
# refuses them (a None entry in sys.modules would also block them, but libraries that look
# into sys.modules, such as scikit-learn's array-API checks, then crash on the None). With
# fededge too, it proves an exported bundle runs from its own files alone.
BLOCKER = """import sys


class _NotInstalled:
    blocked = {names!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""
BLOCKED_MARK = "(blocked by the test)"
EDGE_BLOCKED = ["torch", "sklearn", "safetensors", "amqtt", "scipy", "matplotlib", "onnx"]
"""What the ``edge`` extra does not install: the agent and ``infer`` must never import it."""


def blocked_env(tmp_path: Path, blocked: list[str]) -> dict[str, str]:
    """An environment whose Python cannot import ``blocked`` (via a sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(names=blocked))
    return {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
            "COLUMNS": "200"}


def run_blocked(tmp_path: Path, blocked: list[str], args: list[str],
                cwd: Path) -> subprocess.CompletedProcess:
    """Run python with `blocked` modules made unimportable by a sitecustomize."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=blocked_env(tmp_path, blocked),
                          capture_output=True, text=True, timeout=120)


def stdout_of(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def has_mosquitto() -> bool:
    try:
        mosquitto_binary()
        return True
    except BrokerError:
        return False


REQUIRES_MOSQUITTO = [pytest.mark.mosquitto,
                      pytest.mark.skipif(not has_mosquitto(),
                                         reason="mosquitto not installed (make test installs it)")]
"""``pytestmark`` of test modules that run a real Mosquitto."""


def requires_mosquitto(test):
    """The same marks on one test function."""
    for mark in REQUIRES_MOSQUITTO:
        test = mark(test)
    return test

"""The server's side of issue 15, in-process over the memory twin: collecting the trained
students after the last round (checked without torch), refusing students that do not fit, and a
restarted server with a quorum starting after a short grace instead of the whole join timeout.
The same code runs over Mosquitto in tests/test_kit_story.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from helpers import make_client, small_config, small_split
from safetensors.torch import load_file

from fededge.federation.server import FederationServer
from fededge.federation.store import Store
from fededge.federation.strategies.fedmd import FedMDServer
from fededge.learn.models import build_student
from fededge.learn.zoo import estimate_cost
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto
from fededge.wire.messages import ModelMessage, PresenceMessage

META = {"input_shape": [1, 8, 8], "num_classes": 10, "dataset": "digits"}


@pytest.fixture(scope="module")
def split():
    return small_split(3)


def test_devices_send_their_students_after_the_last_round(split, tmp_path):
    hub = MemoryHub()
    config = small_config(split, rounds=1, warmup_epochs=1, collect_models=True)
    store = Store(tmp_path / "state")
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=2, store=store, model_meta=META)
    clients = [make_client(hub.connect(f"dev{i}"), split, i) for i in range(2)]
    for client in clients:
        client.start()
    server.run()
    for client in clients:
        assert client.wait(30) and client.error is None
    assert sorted(server.collected) == ["dev0", "dev1"] and not server.rejections
    for i, client in enumerate(clients):
        folder = store.model_dir(f"dev{i}")
        meta = json.loads((folder / "student.json").read_text())
        assert {k: meta[k] for k in META} == META and meta["round"] == 1
        assert meta["student"] == client.identity.student and meta["device"] == f"dev{i}"
        # What the server stored is the student itself: torch loads it as its state_dict.
        model = build_student(meta["student"], (1, 8, 8), 10)
        model.load_state_dict(load_file(str(folder / "student.safetensors")))
        for name, tensor in client.trainer.model.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
    assert sorted(store.models()) == ["dev0", "dev1"]  # indexed, and survives a restart
    store.close()


def test_without_collect_models_no_student_leaves_its_device(split, tmp_path):
    hub = MemoryHub()
    config = small_config(split, rounds=1, warmup_epochs=1)
    seen = []
    hub.connect("spy").subscribe(proto.Topics(config.federation).all_up,
                                 lambda topic, payload: seen.append(proto.decode(payload).kind))
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=1)
    client = make_client(hub.connect("dev0"), split, 0).start()
    server.run()
    assert client.wait(30) and client.error is None
    assert "model" not in seen and "upload" in seen and server.collected == {}


def _collecting_server(split, tmp_path, **changes):
    """A server after its last round, waiting for students: dev0 announced cnn-xs."""
    config = small_config(split, rounds=1, collect_models=True, **changes)
    hub = MemoryHub()
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=1, store=Store(tmp_path), model_meta=META)
    params = estimate_cost("cnn-xs", (1, 8, 8), 10).params
    presence = PresenceMessage("dev0", "online", config.run_id, "pi-5-8gb", "cnn-xs", params, 9)
    topics = proto.Topics(config.federation)
    server._handle(topics.presence("dev0"), presence.encode())
    return server, config, topics


def _weights(student: str, dtype=np.float32) -> dict[str, np.ndarray]:
    model = build_student(student, (1, 8, 8), 10)
    return {k: v.numpy().astype(dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("change, reason", [
    ({"run_id": "another-run"}, "model from run 'another-run', not this run"),
    ({"round": 0}, "students are collected after the last round, 1"),
    ({"student": "cnn-s"}, "model of student 'cnn-s', but 'dev0' announced 'cnn-xs'"),
    ({"weights": "cnn-s"}, "weights; student 'cnn-xs' has"),
    ({"weights": "float16"}, "are not float32"),
])
def test_a_student_that_does_not_fit_is_rejected(split, tmp_path, change, reason):
    server, config, topics = _collecting_server(split, tmp_path)
    fields = {"device": "dev0", "round": 1, "run_id": config.run_id, "student": "cnn-xs",
              "weights": _weights("cnn-xs"), "accuracy": 0.5}
    if change.get("weights") == "cnn-s":
        change = {"weights": _weights("cnn-s")}
    elif change.get("weights") == "float16":
        change = {"weights": _weights("cnn-xs", np.float16)}
    server._handle(topics.up("dev0"), ModelMessage(**{**fields, **change}).encode())
    assert server.collected == {}
    [(_, _, status, why)] = server.store.submissions("model")
    assert status == "rejected" and reason in why, why
    server._handle(topics.up("dev0"), ModelMessage(**fields).encode())  # the control
    assert list(server.collected) == ["dev0"]
    assert server.store.submissions("model")[-1][2] == "accepted"


def test_a_federation_that_does_not_collect_refuses_students(split, tmp_path):
    server, config, topics = _collecting_server(split, tmp_path)
    server.config = config.replace(collect_models=False)
    server._handle(topics.up("dev0"), ModelMessage("dev0", 1, config.run_id, "cnn-xs",
                                                   _weights("cnn-xs")).encode())
    assert server.collected == {} and "does not collect" in server.store.submissions()[-1][3]


def _announce(hub: MemoryHub, config, devices: dict[str, str]) -> None:
    """Retained presences: ``online`` (this run) or a Last Will ``offline``."""
    publisher = hub.connect("presences")
    topics = proto.Topics(config.federation)
    for device, status in devices.items():
        message = (PresenceMessage(device, "online", config.run_id, "p", "cnn-xs", 1, 9)
                   if status == "online" else PresenceMessage(device, "offline"))
        publisher.publish(topics.presence(device), message.encode(), retain=True)


def test_a_restarted_server_with_a_quorum_starts_after_a_short_grace(split, tmp_path):
    """dev2 died for good (its Will says offline); dev0 and dev1 are a quorum of 3. Restarted,
    the server waits presence_grace_s for dev2, not the join timeout of 60 s."""
    config = small_config(split, quorum=0.5, presence_grace_s=1.0)
    first = Store(tmp_path)
    FederationServer(MemoryHub().connect("server"), config, FedMDServer(config),
                     expected_clients=3, store=first)
    first.close()
    hub = MemoryHub()
    _announce(hub, config, {"dev0": "online", "dev1": "online", "dev2": "offline"})
    restarted = FederationServer(hub.connect("server"), config, FedMDServer(config),
                                 expected_clients=3, store=Store(tmp_path), join_timeout=60)
    assert restarted.resumed_from_round == 1
    started = time.monotonic()
    restarted.wait_for_clients()
    waited = time.monotonic() - started
    assert 1.0 <= waited < 10, waited
    assert sorted(restarted.live) == ["dev0", "dev1"]


def test_a_fresh_server_waits_for_every_device_until_the_join_timeout(split):
    """The grace is for a resumed run: at a first start devices may still be booting."""
    config = small_config(split, quorum=0.5, presence_grace_s=0.2)
    hub = MemoryHub()
    _announce(hub, config, {"dev0": "online", "dev1": "online"})
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=3, join_timeout=2.0)
    started = time.monotonic()
    server.wait_for_clients()
    assert time.monotonic() - started >= 2.0 and server.resumed_from_round is None

"""Server and clients driven through the in-memory transport: same code as over MQTT."""

import threading

import numpy as np
import pytest
from helpers import make_client, message_is, small_config, small_split

from fededge.federation.client import FederationClient
from fededge.federation.server import FederationError, FederationServer
from fededge.federation.strategies.fedmd import FedMDServer, announced_rows
from fededge.transport.faults import Crash, FaultyTransport
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto
from fededge.wire.messages import Payload


@pytest.fixture(scope="module")
def split():
    return small_split(3)


def _run(hub, config, clients, expected=None, **server_kw):
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=expected or len(clients), **server_kw)
    for c in clients:
        c.start()
    history = server.run()
    for c in clients:
        assert c.wait(30), f"{c.identity.device_id} did not finish"
        assert c.error is None, c.error
    return server, history


def test_rounds_run_and_every_upload_is_counted(split, tmp_path):
    hub = MemoryHub()
    config = small_config(split, rounds=2)
    clients = [make_client(hub.connect(f"dev{i}", will=None), split, i,
                           checkpoint_dir=tmp_path / f"dev{i}") for i in range(3)]
    server, history = _run(hub, config, clients)
    assert [r.round for r in history] == [1, 2]
    assert all(r.accepted == ["dev0", "dev1", "dev2"] for r in history)
    assert server.accepted_uploads == 6 and not server.rejections
    assert sorted(server.metrics) == [0, 1, 2]
    assert all(len(server.metrics[r]) == 3 for r in (0, 1, 2))
    ckpt = tmp_path / "dev0"
    assert (ckpt / "student.safetensors").stat().st_size > 0
    assert '"round": 2' in (ckpt / "student.json").read_text()


def test_hostile_uploads_are_rejected_and_the_round_still_closes(split):
    hub = MemoryHub()
    config = small_config(split, rounds=1, logit_codec="float16")  # the attacks below are float16
    clients = [make_client(hub.connect(f"dev{i}"), split, i) for i in range(2)]
    attacker = hub.connect("dev9")
    topics = proto.Topics(config.federation)
    sent = threading.Event()

    def attack(topic, payload):
        msg = proto.decode(payload)
        if msg.kind != proto.KIND_ROUND or sent.is_set():
            return
        sent.set()
        rows = len(announced_rows(Payload(msg.info, msg.tensors), config.proxy_size))
        counts = np.array([5] + [0] * 9, np.int64)

        def upload(sender, rnd=1, classes=10, class_counts=counts):
            return proto.encode(proto.Message(
                proto.KIND_UPLOAD, sender, rnd, {"samples": 5, "run_id": config.run_id},
                {"logits": np.zeros((rows, classes), np.float16), "class_counts": class_counts}))
        attacker.publish(topics.up("dev9"), b"\x00garbage")
        attacker.publish(topics.up("dev1"), upload("dev0"))                  # spoofs dev0
        attacker.publish(topics.up("dev9"), upload("dev9", classes=3))       # wrong shape
        attacker.publish(topics.up("dev9"), upload("dev9", rnd=7))           # stale round
        attacker.publish(topics.up("dev9"), upload("dev9", class_counts=counts * 2))  # lies
    attacker.subscribe(topics.round, attack)
    server, history = _run(hub, config, clients)
    assert sent.is_set()
    assert history[0].accepted == ["dev0", "dev1"]
    assert sum(server.rejections.values()) == 5
    reasons = " | ".join(server.rejections)
    assert "does not match topic device" in reasons and "shape" in reasons
    assert "upload for round 7" in reasons and "do not sum to" in reasons


def test_a_client_that_dies_is_dropped_via_last_will(split):
    hub = MemoryHub()
    config = small_config(split, rounds=2, deadline_s=20)
    topics = proto.Topics(config.federation)
    transports = [hub.connect(f"dev{i}", will=FederationClient.last_will(config.federation,
                                                                         f"dev{i}"))
                  for i in range(3)]
    # dev2 dies right after reporting round 1: the hub publishes its Last Will
    fatal = Crash(topics.up("dev2"), when=message_is(proto.KIND_METRICS, 1))
    transports[2] = FaultyTransport(transports[2], fatal,
                                    on_crash=lambda: clients[2].finished.set())
    clients = [make_client(t, split, i) for i, t in enumerate(transports)]
    server, history = _run(hub, config, clients)
    assert transports[2].crashed
    assert history[0].accepted == ["dev0", "dev1", "dev2"]
    assert history[1].accepted == ["dev0", "dev1"]
    assert history[1].seconds < config.deadline_s / 2, "the round waited for a dead client"


def test_too_few_clients_is_an_error_not_a_fake_round(split):
    hub = MemoryHub()
    config = small_config(split, rounds=1, quorum=1.0)
    clients = [make_client(hub.connect("dev0"), split, 0)]
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=3, join_timeout=1.0)
    clients[0].start()
    with pytest.raises(FederationError, match="only 1 of 3 clients joined"):
        server.run()
    clients[0].stop()

"""1,100 hostile payloads thrown at a real federation over Mosquitto: every one is rejected with
a logged reason and counted in SQLite, the server keeps going, and the consensus is byte-equal
to that of the same federation without them."""

from __future__ import annotations

import json
import logging
import pickle
import struct
import threading

import killers
import numpy as np
from helpers import REQUIRES_MOSQUITTO, make_client, small_config, small_split
from safetensors.numpy import save as st_save

from fededge.federation.client import FederationClient
from fededge.federation.server import FederationServer, ServerEvents
from fededge.federation.store import Store
from fededge.federation.strategies.fedmd import FedMDServer, announced_rows
from fededge.transport.brokers import MosquittoBroker
from fededge.transport.mqtt import MqttTransport
from fededge.wire import envelope as proto
from fededge.wire.messages import Payload, PresenceMessage

N_CLIENTS = 3
MAX_PAYLOAD = 256 * 1024
HOSTILE = 1100


pytestmark = REQUIRES_MOSQUITTO


class HostilePayloads:
    """Malformed or hostile (topic, payload) pairs, none of which may ever be accepted.

    Built around a well-formed upload for the open round, each breaking exactly one rule the
    wire protocol states (DESIGN.md): size, framing, schema, kind, sender, round, run, tensor
    names/dtypes/shapes, finite values, sample and class counts; plus pickles, random bytes and
    garbage on presence topics.
    """

    def __init__(self, topics: proto.Topics, rows: int, classes: int, run_id: str,
                 seed: int = 0) -> None:
        self.topics, self.rows, self.classes, self.run_id = topics, rows, classes, run_id
        self.rng = np.random.default_rng(seed)

    def _upload(self, sender: str, *, rnd: int = 1, kind: str = "upload", schema: str = "1",
                info: dict | None = None, tensors: dict | None = None,
                drop: tuple[str, ...] = ()) -> bytes:
        counts = np.full(self.classes, 5, np.int64)
        base = {"logits": self.rng.normal(size=(self.rows, self.classes)).astype(np.float16),
                "class_counts": counts}
        tensors = {k: v for k, v in {**base, **(tensors or {})}.items() if k not in drop}
        info = {"samples": int(counts.sum()), "run_id": self.run_id, "attempt": 1,
                **(info or {})}
        meta = {"schema": schema, "kind": kind, "sender": sender, "round": str(rnd),
                "json": json.dumps(info)}
        return st_save(tensors, metadata=meta)

    def _variants(self, i: int) -> list[tuple[str, bytes]]:
        """One payload per rule for fuzzing device ``i``."""
        me = f"fuzz{i:03d}"
        up, rng, rows, k = self.topics.up(me), self.rng, self.rows, self.classes
        nan = rng.normal(size=(rows, k)).astype(np.float32)
        nan[rng.integers(rows), rng.integers(k)] = rng.choice([np.nan, np.inf, -np.inf])
        valid = self._upload(me)
        header = json.dumps({"__metadata__": {"schema": "1"}}).encode()
        return [
            (up, rng.bytes(int(rng.integers(1, 300)))),
            (up, valid[:int(rng.integers(1, len(valid) - 1))]),
            (up, pickle.dumps({"logits": [[0.1] * k] * rows, "samples": 50})),
            (up, struct.pack("<Q", 2 ** 40) + header),
            (up, struct.pack("<Q", 9) + b"[1, 2, 3]" + b"\0" * 16),
            (up, struct.pack("<Q", len(header)) + header),
            (up, self._upload(me, tensors={"logitz": np.zeros((rows, k), np.float16)},
                              drop=("logits",))),
            (up, self._upload(me, tensors={"extra": np.zeros(3, np.float32)})),
            (up, self._upload(me, drop=("class_counts",))),
            (up, self._upload(me, tensors={"logits": rng.normal(size=(rows, k))})),  # float64
            (up, self._upload(me, tensors={"logits": np.ones((rows, k), np.int32)})),
            (up, self._upload(me, tensors={"logits": np.zeros((rows + 1, k), np.float16)})),
            (up, self._upload(me, tensors={"logits": np.zeros((rows, k - 1), np.float16)})),
            (up, self._upload(me, tensors={"logits": np.zeros(rows * k, np.float16)})),
            (up, self._upload(me, tensors={"logits": nan})),
            (up, self._upload(me, rnd=int(rng.choice([0, 3, 99, 2 ** 40])))),
            (up, self._upload("dev0")),                                   # spoofs dev0
            (self.topics.up(f"dev{i % N_CLIENTS}"), self._upload(me)),    # posts as a device
            (up, self._upload(me, info={"run_id": "another-run"})),
            (up, self._upload(me, info={"samples": rng.choice([0, -5, "many", True, 1.5])})),
            (up, self._upload(me, tensors={"class_counts": np.full(k, 7, np.int64)})),  # lie
            (up, self._upload(me, tensors={"class_counts": -np.ones(k, np.int64)})),
            (up, self._upload(me, kind=str(rng.choice(["consensus", "config", "round",
                                                       "presence", "hack"])))),
            (up, self._upload(me, schema="2")),
            (up, self._upload(me, kind="metrics", info={"accuracy": 7.0})),
            (up, self._upload(me, kind="metrics", rnd=99, info={
                "bytes": {"sent_bytes": 0, "received_bytes": 0}})),
            (self.topics.presence(me), rng.bytes(int(rng.integers(1, 100)))),
            (self.topics.presence(me), PresenceMessage(me, "online", "another-run").encode()),
            (self.topics.presence(me), PresenceMessage("dev1", "offline").encode()),
        ]

    def generate(self, count: int, oversize: int = 5) -> list[tuple[str, bytes]]:
        payloads: list[tuple[str, bytes]] = []
        i = 0
        while len(payloads) < count - oversize:
            payloads.extend(self._variants(i))
            i += 1
        payloads = payloads[:count - oversize]
        payloads += [(self.topics.up(f"fuzz{j:03d}"), self.rng.bytes(MAX_PAYLOAD + 1 + j))
                     for j in range(oversize)]
        order = self.rng.permutation(len(payloads))
        return [payloads[j] for j in order]


class Fuzzer:
    """Publishes the hostile payloads from its own connection as soon as round 1 opens."""

    def __init__(self, broker: MosquittoBroker, config) -> None:
        self.config = config
        self.topics = proto.Topics(config.federation)
        self.transport = MqttTransport("fuzzer", broker.host, broker.port).connect()
        self.sent = 0
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self.transport.subscribe(self.topics.round, self._on_round)

    def _on_round(self, topic: str, payload: bytes) -> None:
        msg = proto.decode(payload)
        if msg.round == 1 and self._thread is None:
            rows = len(announced_rows(Payload(msg.info, msg.tensors), self.config.proxy_size))
            self._thread = threading.Thread(target=self._attack, args=(rows,), daemon=True)
            self._thread.start()

    def _attack(self, rows: int) -> None:
        payloads = HostilePayloads(self.topics, rows, self.config.num_classes,
                                   self.config.run_id).generate(HOSTILE)
        for topic, payload in payloads:
            self.transport.publish(topic, payload)
        # Under load 1,100 messages (five of 16 MiB) can take minutes to be acknowledged;
        # the count below is only meaningful once all of them reached the broker.
        assert self.transport.flush(600), "the broker did not acknowledge the attack"
        self.sent = len(payloads)
        self.done.set()


def _federation(split, tmp_path, attack: bool):
    config = small_config(split, rounds=2, warmup_epochs=5, deadline_s=60,
                          logit_codec="float16")  # the killer payloads are float16 uploads
    with MosquittoBroker() as broker:
        fuzzer = Fuzzer(broker, config) if attack else None

        def hold_round_1_until_the_attack_is_out(record) -> None:
            # The hostile messages are then queued for the server ahead of every round-2
            # upload, so the run cannot end before the server has judged all of them.
            if fuzzer is not None and record.round == 1:
                assert fuzzer.done.wait(600), "the fuzzer did not finish"
        transports = [MqttTransport("server", broker.host, broker.port).connect()]
        clients = []
        for i in range(N_CLIENTS):
            will = FederationClient.last_will(config.federation, f"dev{i}")
            transports.append(MqttTransport(f"dev{i}", broker.host, broker.port,
                                            will=will).connect())
            clients.append(make_client(transports[-1], split, i).start())
        store = Store(tmp_path)
        server = FederationServer(
            transports[0], config, FedMDServer(config), expected_clients=N_CLIENTS, store=store,
            events=ServerEvents(on_round_closed=hold_round_1_until_the_attack_is_out),
            max_payload=MAX_PAYLOAD)
        history = server.run()
        for c in clients:
            assert c.wait(30) and c.error is None
        for t in transports + ([fuzzer.transport] if fuzzer else []):
            t.close()
    return server, history, fuzzer


def _consensus(store: Store, rounds: int) -> list[bytes]:
    return [proto.decode(store.consensus(r)).tensors["logits"].tobytes()
            for r in range(1, rounds + 1)]


def test_hostile_payloads_are_all_rejected_and_change_nothing(tmp_path, caplog):
    split = small_split(N_CLIENTS)
    clean, _, _ = _federation(split, tmp_path / "clean", attack=False)
    with caplog.at_level(logging.WARNING, logger="fededge.federation.server"):
        attacked, history, fuzzer = _federation(split, tmp_path / "attacked", attack=True)

    assert fuzzer.sent == HOSTILE
    store = attacked.store
    assert store.count("rejected") == HOSTILE, dict(attacked.rejections)
    reasons = [reason for _, _, status, reason in store.submissions() if status == "rejected"]
    assert all(reasons), "a rejection without a reason"
    for rule in ("exceeds the", "out of bounds", "not a JSON object", "metadata lacks",
                 "schema version", "unknown message kind", "is not accepted on",
                 "does not match topic device", "tensor data is malformed", "differ from the "
                 "expected", "has dtype", "has shape", "NaN or Inf", "upload for round",
                 "not this run", "sample count", "do not sum to", "metrics accuracy",
                 "metrics for round"):
        assert any(rule in r for r in reasons), f"no payload was rejected for '{rule}'"
    logged = [r for r in caplog.records if r.getMessage().startswith("rejected message on")]
    assert len(logged) == HOSTILE
    assert [r.accepted for r in history] == [["dev0", "dev1", "dev2"]] * 2
    assert attacked.accepted_uploads == clean.accepted_uploads == 2 * N_CLIENTS
    assert _consensus(attacked.store, 2) == _consensus(clean.store, 2)


def test_killer_payloads_retained_from_a_provisioned_device_over_tls(tmp_path):
    """Issue 17's four killers, from a provisioned device's own credentials over the kit's TLS
    Mosquitto, retained: the server finishes every round, records every one as rejected with
    its reason, and its traffic table stays the server's own measure."""
    result = killers.kit_federation(tmp_path, attack=True)
    assert result["rounds"] == 3 and result["accepted"] == 9, result
    sent = result["sent"]
    assert "deep nesting on presence" in sent and sent.count("wrapping class counts") >= 3
    reasons = " | ".join(result["reasons"])
    for rule in ("nests deeper than", "round '18446744073709551616' is not an integer",
                 "JSON integer of 31 digits", "class_counts do not sum to the 7 samples"):
        assert rule in reasons, f"no rejection for '{rule}': {reasons[:2000]}"
    assert result["rejected"] >= len(sent), result
    assert all(0.5 < acc <= 1 for acc in result["accuracy"].values()), result
    per_round_up = [row["bytes_up"] for row in result["rows"]]
    assert max(per_round_up) < 10 * 1024**2, per_round_up  # not 10**30

"""The four payloads that stopped or fooled the server before issue 17, built for any device,
round and run; and a hostile provisioned device that publishes them, retained, over its kit's
TLS connection. Used by the unit tests, the live fuzz test and benchmarks/bench_hostile.py."""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
from safetensors.numpy import save as st_save

from fededge.wire import envelope as proto
from fededge.wire.codecs import Int8Codec
from fededge.wire.messages import Payload, decode_rows

DEEP = 60_000


def deep_nesting() -> bytes:
    """An 8-byte safetensors length, then 60,000 '[': RecursionError in json before."""
    return struct.pack("<Q", DEEP) + b"[" * DEEP


def _upload(device: str, rnd: int, info: dict, tensors: dict) -> bytes:
    meta = {"schema": "1", "kind": "upload", "sender": device, "round": str(rnd),
            "json": json.dumps(info)}
    return st_save(tensors, metadata=meta)


def huge_round(device: str, run_id: str, rows: int, classes: int) -> bytes:
    """An upload for round 2**64: OverflowError out of SQLite while recording it before."""
    return _upload(device, 2**64, {"samples": 7, "run_id": run_id, "attempt": 1},
                   {"logits": np.zeros((rows, classes), np.float16),
                    "class_counts": np.array([7] + [0] * (classes - 1), np.int64)})


def wrapping_counts(device: str, rnd: int, run_id: str, rows: int, classes: int,
                    attempt: int = 1, int8: bool = False) -> bytes:
    """class_counts whose int64 sum wraps around to the declared 7 samples, with confident
    logits: accepted before, it dominated the class-weighted consensus."""
    counts = np.array([2**62, 2**62, 2**62, 2**62 + 1] + [1] * (classes - 4), np.int64)
    assert int(counts.sum()) == 7 and sum(int(c) for c in counts) != 7
    logits = np.full((rows, classes), -20.0, np.float32)
    logits[:, 0] = 20.0
    # in the federation's codec (int8: the default), so only the counts can be rejected
    tensors = Int8Codec(classes).encode(logits) if int8 else {"logits": logits.astype(np.float16)}
    return _upload(device, rnd, {"samples": 7, "run_id": run_id, "attempt": attempt},
                   {**tensors, "class_counts": counts})


def lying_metrics(device: str, rnd: int, run_id: str) -> bytes:
    """Self-reported traffic of 10**30 bytes: '931322... GiB' in the server's table before."""
    return proto.encode(proto.Message(proto.KIND_METRICS, device, rnd, {
        "run_id": run_id, "accuracy": 0.5, "compute_intervals": [],
        "bytes": {"sent_bytes": 10**30, "received_bytes": 10**30}}))


class HostileDevice:
    """A provisioned device that, from its own credentials and on its own topics, publishes
    every killer retained: the deep nesting on its presence topic at once, then on its upload
    topic the huge round, the lying metrics and, for every round announced, the wrapping class
    counts. ``sent`` counts what it published."""

    def __init__(self, transport, topics: proto.Topics, device: str, proxy_size: int,
                 classes: int) -> None:
        self.transport, self.topics, self.device = transport, topics, device
        self.proxy_size, self.classes = proxy_size, classes
        self.sent: list[str] = []
        self.lock = threading.Lock()
        self._answered: set[tuple[int, int]] = set()
        self._publish(topics.presence(device), deep_nesting(), "deep nesting on presence")
        transport.subscribe(topics.round, self._on_round)

    def _publish(self, topic: str, payload: bytes, what: str) -> None:
        self.transport.publish(topic, payload, retain=True)
        with self.lock:
            self.sent.append(what)

    def _on_round(self, topic: str, payload: bytes) -> None:
        msg = proto.decode(payload)
        if (msg.info.get("done") or msg.info.get("nudge")
                or (msg.round, msg.info.get("attempt", 1)) in self._answered):
            return
        self._answered.add((msg.round, msg.info.get("attempt", 1)))
        rows = len(decode_rows(Payload(msg.info, msg.tensors).tensors, self.proxy_size))
        up, run = self.topics.up(self.device), msg.info["run_id"]
        self._publish(up, deep_nesting(), "deep nesting on upload")
        self._publish(up, huge_round(self.device, run, rows, self.classes), "round 2**64")
        self._publish(up, lying_metrics(self.device, msg.round, run), "10**30 bytes")
        self._publish(up, wrapping_counts(self.device, msg.round, run, rows, self.classes,
                                          msg.info.get("attempt", 1), int8=True),
                      "wrapping class counts")


HOSTILE = "pi4-garage"  # kit_helpers.federation_file(extra_device=True) provisions it
KIT_SETTINGS = "\n".join(["rounds = 3", "warmup_epochs = 5", "distill_epochs = 1",
                          "revisit_epochs = 1", "deadline_s = 60.0"])


def kit_federation(tmp, *, attack: bool, join_timeout: float = 60.0) -> dict:
    """A federation from provisioned kits over their TLS Mosquitto: the server (in this
    process), the example's three training devices (``fededge client`` processes) and the
    extra device ``pi4-garage``, which is hostile (``attack``) or never connects. Returns
    the server's rounds, rejections and the honest devices' final accuracies."""
    from kit_helpers import DEVICES, Processes, connect_party, federation_file

    from fededge.kits.kit import load_kit
    from fededge.kits.provision import provision
    from fededge.kits.run import kit_config, run_server
    from fededge.transport.brokers import free_port, wait_for_port

    port = free_port()
    kits = tmp / "kits"
    provision(federation_file(tmp, port=port, extra_device=True, settings=KIT_SETTINGS), kits)
    procs = Processes()
    hostile = None
    try:
        procs.start("broker", "--kit", str(kits / "broker"), log=tmp / "broker.log")
        assert wait_for_port("127.0.0.1", port, 20), (tmp / "broker.log").read_text()
        server_kit = load_kit(kits / "server")
        config = kit_config(server_kit)
        if attack:
            transport = connect_party(kits, port, HOSTILE)
            hostile = HostileDevice(transport, proto.Topics(config.federation), HOSTILE,
                                    config.proxy_size, config.num_classes)
        clients = [procs.start("client", "--kit", str(kits / d), "--threads", "1",
                               log=tmp / f"{d}.log") for d in DEVICES]
        done = run_server(server_kit, join_timeout=join_timeout)
        for proc in clients:
            proc.wait(timeout=120)
        logs = {d: (tmp / f"{d}.log").read_text() for d in DEVICES}
        assert all(proc.returncode == 0 for proc in clients), logs
        from fededge.federation.store import Store
        store = Store(kits / "server" / "state", readonly=True)
        final = store.metrics()[config.rounds]
        result = {"rounds": done.rounds, "accepted": done.accepted, "rejected": done.rejected,
                  "reasons": [r for _, _, status, r in store.submissions()
                              if status == "rejected"],
                  "accuracy": {d: final[d]["accuracy"] for d in DEVICES},
                  "sent": list(hostile.sent) if hostile else [],
                  "rows": [row.to_dict() for row in done.rows]}
        store.close()
        return result
    finally:
        if hostile is not None:
            hostile.transport.close()
        procs.stop_all()

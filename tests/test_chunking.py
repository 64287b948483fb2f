"""Chunked payloads: exact reassembly, validated frames, bounded memory, and fedavg weights
crossing a real amqtt broker in chunks."""

import struct

import numpy as np
import pytest
from helpers import make_client, small_config, small_split

from fededge.federation.server import FederationServer
from fededge.federation.strategies.fedavg import FedAvgServer
from fededge.learn.weights import flat_weights
from fededge.transport.brokers import EmbeddedBroker
from fededge.transport.chunking import (
    HEADER_BYTES,
    ChunkError,
    ChunkingTransport,
    Reassembler,
    is_chunk,
    split,
)
from fededge.transport.memory import MemoryHub
from fededge.transport.mqtt import MqttTransport

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8))


def _reassembler(**limits) -> Reassembler:
    return Reassembler(**{"max_message": 1 << 20, "max_pending": 1 << 22, "timeout_s": 60.0,
                          **limits})


def test_chunks_reassemble_in_any_order_and_survive_duplicates():
    frames = split(PAYLOAD, 1024)
    assert len(frames) == 11 and all(len(f) <= 1024 and is_chunk(f) for f in frames)
    r = _reassembler()
    order = [5, 0, 5, 10, *range(1, 5), *range(6, 10)]
    results = [r.add("t", frames[i]) for i in order]
    assert results[:-1] == [None] * (len(order) - 1) and results[-1] == PAYLOAD


def _reframe(frame: bytes, **fields) -> bytes:
    magic, digest, total, index, count = struct.unpack_from("<4s32sIII", frame)
    values = {"digest": digest, "total": total, "index": index, "count": count, **fields}
    return struct.pack("<4s32sIII", magic, values["digest"], values["total"], values["index"],
                       values["count"]) + frame[HEADER_BYTES:]


@pytest.mark.parametrize("forge, reason", [
    (lambda f: f[:20], "shorter than its header"),
    (lambda f: _reframe(f, index=99), "out of bounds"),
    (lambda f: _reframe(f, total=1 << 21), "out of bounds"),   # over max_message
    (lambda f: f + b"x", "expected"),                          # wrong slice length
])
def test_malformed_frames_are_rejected(forge, reason):
    with pytest.raises(ChunkError, match=reason):
        _reassembler().add("t", forge(split(PAYLOAD, 1024)[0]))


def test_a_tampered_chunk_fails_the_sha256():
    frames = split(PAYLOAD, 1024)
    frames[3] = frames[3][:-1] + bytes([frames[3][-1] ^ 1])
    r = _reassembler()
    for f in frames[:-1]:
        r.add("t", f)
    with pytest.raises(ChunkError, match="SHA-256"):
        r.add("t", frames[-1])


def _rest(r: Reassembler, topic: str, frames: list[bytes], now: float) -> bytes | None:
    """Add every chunk but the first; what the last one completed, if anything."""
    return [r.add(topic, f, now=now) for f in frames[1:]][-1]


def test_pending_memory_is_bounded():
    r = _reassembler(max_pending=25_000, timeout_s=10.0)
    messages = [split(PAYLOAD + bytes([n]), 1024) for n in range(3)]
    for n, frames in enumerate(messages):  # one topic holds at most two pending messages
        r.add("a", frames[0], now=float(n))
    with pytest.raises(ChunkError, match="no room"):  # 2 × 10 KB pending, budget 25 KB
        r.add("b", split(PAYLOAD, 1024)[0], now=3.0)
    assert _rest(r, "a", messages[2], now=4.0) == PAYLOAD + bytes([2])  # kept
    assert _rest(r, "a", messages[0], now=4.0) is None  # the oldest went: its first chunk too
    # at 20 s the sets of message 1 (opened at 1 s) and 0 (re-opened at 4 s) are over 10 s old:
    # they expired, so there is room for b, and message 1 can no longer complete
    assert r.add("b", split(PAYLOAD, 1024)[0], now=20.0) is None
    assert _rest(r, "b", split(PAYLOAD, 1024), now=20.0) == PAYLOAD
    assert _rest(r, "a", messages[1], now=20.0) is None


def test_chunking_transport_passes_small_payloads_and_counts_wire_bytes():
    hub = MemoryHub()
    sender = ChunkingTransport(hub.connect("a"), max_payload=1024)
    receiver = ChunkingTransport(hub.connect("b"), max_payload=1024)
    got = []
    receiver.subscribe("x/#", lambda t, p: got.append((t, p)))
    sender.publish("x/1", b"small")
    sender.publish("x/2", PAYLOAD)
    assert got == [("x/1", b"small"), ("x/2", PAYLOAD)]
    assert sender.stats.sent_messages == 12 and receiver.stats.received_messages == 12
    assert sender.stats.sent_bytes > len(PAYLOAD) + 11 * HEADER_BYTES


def test_fedavg_weights_cross_a_real_broker_in_chunks(tmp_path):
    split_ = small_split(2)
    config = small_config(split_, strategy="fedavg", student="cnn-xs", rounds=2, local_epochs=1)
    weight_bytes = 4 * FedAvgServer(config).size  # 14.8 KB, so 4 chunks of ≤ 4 KiB each
    with EmbeddedBroker() as broker:
        def connect(name: str) -> ChunkingTransport:
            return ChunkingTransport(MqttTransport(name, broker.host, broker.port).connect(),
                                     max_payload=4096)
        server_transport = connect("server")
        server = FederationServer(server_transport, config, FedAvgServer(config),
                                  expected_clients=2)
        clients = [make_client(connect(f"dev{i}"), split_, i, student="cnn-xs").start()
                   for i in range(2)]
        try:
            server.run()
            for c in clients:
                assert c.wait(30) and c.error is None, c.error
        finally:
            for t in [server_transport, *(c.transport for c in clients)]:
                t.close()
    assert not server.rejections and all(len(r.accepted) == 2 for r in server.history)
    assert np.array_equal(flat_weights(clients[0].trainer.model),
                          flat_weights(clients[1].trainer.model))
    uploads = clients[0].transport.stats.by_category["sent:up"]
    assert uploads > 2 * weight_bytes  # two rounds of weights went up, as chunk frames
    assert server_transport.stats.received_messages >= 2 * 2 * -(-weight_bytes // 4048)

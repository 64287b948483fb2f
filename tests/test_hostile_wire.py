"""Property-based fuzzing (Hypothesis) of the decoder and of the server's handlers, and retained
poison across server restarts. Structure-aware: valid safetensors framing around hostile JSON,
numbers at and beyond the int64 bounds, NaN/Inf, deep nesting, oversized headers, every message
kind and every field. Properties: ``decode`` + ``parse`` raise nothing but ``ProtocolError``;
the server records every message it is handed (accepted or rejected with a reason) and keeps
going. Bounded: a fixed number of examples, no deadline flakiness on a loaded machine."""

from __future__ import annotations

import json
import struct

import killers
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save as st_save

from fededge.config import FederationConfig
from fededge.federation.server import FederationServer
from fededge.federation.store import Store
from fededge.federation.strategies.fedmd import FedMDServer
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto
from fededge.wire import messages
from fededge.wire.topics import ProtocolError

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ROWS, CLASSES = 16, 10
CONFIG = FederationConfig(rounds=2, proxy_size=ROWS, proxy_sha256="0" * 64,
                          logit_codec="float16")  # the hostile uploads are float16
TOPICS = proto.Topics(CONFIG.federation)

EDGE_INTS = st.sampled_from([0, 1, -1, 7, 2**31 - 1, 2**31, 2**53 + 1, 2**62, 2**62 + 1,
                             2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 2**64 + 1, 10**30,
                             10**400])
NUMBERS = st.one_of(EDGE_INTS, st.integers(), st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30)
FIELDS = ("run_id", "attempt", "samples", "deadline_s", "waiting_for", "done", "final",
          "announcement", "accuracy", "bytes", "compute_intervals", "student", "profile",
          "status", "params", "phase", "temperature")


def _json(value) -> str:
    """JSON text as a hostile sender writes it: NaN, Infinity and huge numbers included."""
    return json.dumps(value, allow_nan=True)


def deep(depth: int, bracket: str = "[") -> str:
    return bracket * depth


@st.composite
def infos(draw):
    """A message's JSON part: mostly the real fields with hostile values, some raw text."""
    fields = draw(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8))
    if draw(st.booleans()):
        fields.update(run_id=CONFIG.run_id, samples=draw(EDGE_INTS), attempt=draw(EDGE_INTS))
    text = _json(fields)
    return draw(st.sampled_from([text, text, deep(draw(st.integers(0, 5000))),
                                 deep(draw(st.integers(0, 3000)), "{\"a\":"),
                                 "[" + ",".join(["1"] * draw(st.integers(0, 200_000))) + "]",
                                 "1" * draw(st.integers(1, 6000)), "NaN", "-Infinity",
                                 text[:draw(st.integers(0, len(text)))]]))


TENSORS = st.dictionaries(
    st.sampled_from(["logits", "class_counts", "rows", "weights", "x"]),
    st.sampled_from([np.zeros((ROWS, CLASSES), np.float16), np.full(CLASSES, 2**62, np.int64),
                     np.array([2**62] * 4 + [1] * 6, np.int64), -np.ones(CLASSES, np.int64),
                     np.full((ROWS, CLASSES), np.inf, np.float32), np.zeros(0, np.float32),
                     np.zeros((ROWS + 1, CLASSES), np.float16), np.ones(3, np.uint8)]),
    max_size=3)


@st.composite
def payloads(draw):
    """Valid safetensors framing around hostile metadata, or framing that lies."""
    meta = {"schema": draw(st.sampled_from(["1", "1", "2", ""])),
            "kind": draw(st.sampled_from([*proto.KINDS, "hack"])),
            "sender": draw(st.sampled_from(["dev0", "dev1", "server", "dev0\n", "a/b", "#"])),
            "round": draw(st.sampled_from(["0", "1", "2", "-1", "18446744073709551616",
                                           "1_000", " 1", "٣", "1e3", "9" * 5000])),
            "json": draw(infos())}
    drop = draw(st.lists(st.sampled_from(list(meta)), max_size=2))
    meta = {k: v for k, v in meta.items() if k not in drop}
    body = st_save(draw(TENSORS), metadata=meta)
    mutation = draw(st.sampled_from(["none", "none", "length", "truncate", "header"]))
    if mutation == "length":
        return struct.pack("<Q", draw(EDGE_INTS.filter(lambda v: 0 <= v < 2**64))) + body[8:]
    if mutation == "truncate":
        return body[:draw(st.integers(0, len(body)))]
    if mutation == "header":
        header = draw(st.sampled_from([deep(60_000).encode(), b"{" * 70_000,
                                       b'{"__metadata__":' * 100, b"\xff\xfe" * 10,
                                       _json({"__metadata__": meta, "t": {
                                           "dtype": "F32", "shape": [2**62, 2**62],
                                           "data_offsets": [0, 2**64]}}).encode()]))
        return struct.pack("<Q", len(header)) + header
    return body


@BOUNDED
@given(payloads())
def test_decode_and_parse_raise_nothing_but_protocol_errors(payload):
    try:
        messages.parse(proto.decode(payload, topic=TOPICS.up("dev0"), topics=TOPICS))
    except ProtocolError as exc:
        assert str(exc)


def _server(hub: MemoryHub, store: Store | None = None) -> FederationServer:
    return FederationServer(hub.connect("server"), CONFIG, FedMDServer(CONFIG),
                            expected_clients=2, store=store or Store())


@BOUNDED
@given(st.lists(st.tuples(st.sampled_from(["up/dev0", "up/dev1", "presence/dev0",
                                           "presence/dev1", "config", "up/dev0/x"]),
                          payloads()), min_size=1, max_size=5))
def test_the_server_judges_every_message_and_goes_on(batch):
    server = _server(MemoryHub())
    server._open = server._prepare(1)
    for topic, payload in batch:
        server._handle(f"{TOPICS.root}/{topic}", payload)
    recorded = server.store.submissions()
    for _, _, status, reason in recorded:
        assert status in ("accepted", "duplicate", "late", "rejected")
        assert status != "rejected" or reason
    # a cleared retained presence and valid presences are not recorded; everything else is
    assert len(recorded) <= len(batch)
    good = killers._upload("dev1", 1, {"samples": 10, "run_id": CONFIG.run_id, "attempt": 1},
                           {"logits": np.zeros((ROWS, CLASSES), np.float16),
                            "class_counts": np.full(CLASSES, 1, np.int64)})
    server._handle(TOPICS.up("dev1"), good)
    assert "dev1" in server._open.replies, "the server stopped accepting good uploads"


def test_retained_poison_is_rejected_on_every_restart(tmp_path):
    """Retained on presence/<device> and up/<device>, the killers reach every new server as it
    subscribes: each server rejects and records them, and starts its rounds all the same."""
    hub = MemoryHub()
    hostile = hub.connect("pi4-garage")
    poison = {TOPICS.presence("dev0"): killers.deep_nesting(),
              TOPICS.up("dev0"): killers.huge_round("dev0", CONFIG.run_id, ROWS, CLASSES),
              TOPICS.up("dev1"): killers.wrapping_counts("dev1", 1, CONFIG.run_id, ROWS,
                                                         CLASSES)}
    for topic, payload in poison.items():
        hostile.publish(topic, payload, retain=True)
    for restart in range(3):
        store = Store(tmp_path)
        server = _server(hub, store)
        server._open = server._prepare(1)
        server._drain(lambda: False)
        reasons = [r for _, _, status, r in store.submissions() if status == "rejected"]
        assert len(reasons) == 3 * (restart + 1), reasons
        assert any("nests deeper" in r for r in reasons)
        assert any("18446744073709551616" in r for r in reasons)
        assert any("class_counts do not sum" in r for r in reasons)
        server.transport.close()
        store.close()


def test_the_wrapping_class_counts_would_have_passed_an_int64_sum():
    """The guard this file relies on: numpy's int64 sum really wraps to the declared 7."""
    counts = np.array([2**62, 2**62, 2**62, 2**62 + 1, 1, 1, 1, 1, 1, 1], np.int64)
    assert int(counts.sum()) == 7


def test_an_upload_for_a_closed_round_is_still_judged_before_it_is_called_late():
    """A hostile payload is a rejection whenever it arrives: the content of an upload for a
    closed round is checked against that round's specs first; only a valid one is 'late'."""
    server = _server(MemoryHub())
    server._open = server._prepare(1)

    def upload(device: str, logits: np.ndarray) -> bytes:
        return killers._upload(device, 1, {"samples": 10, "run_id": CONFIG.run_id, "attempt": 1},
                               {"logits": logits, "class_counts": np.full(CLASSES, 1, np.int64)})
    good = np.zeros((ROWS, CLASSES), np.float16)
    for device in ("dev0", "dev1"):
        server._handle(TOPICS.up(device), upload(device, good))
    server._run_round(1)
    nan = good.copy()
    nan[3, 4] = np.nan
    server._handle(TOPICS.up("dev2"), upload("dev2", nan))
    server._handle(TOPICS.up("dev3"), upload("dev3", good[:, :-1]))
    server._handle(TOPICS.up("dev4"), upload("dev4", good))
    verdicts = [(status, reason) for _, _, status, reason in server.store.submissions()[2:]]
    assert verdicts[0][0] == "rejected" and "NaN or Inf" in verdicts[0][1], verdicts
    assert verdicts[1][0] == "rejected" and "has shape" in verdicts[1][1], verdicts
    assert verdicts[2] == ("late", None), verdicts

import json
import pickle
import struct

import numpy as np
import pytest

from fededge.wire import envelope as proto
from fededge.wire.messages import PresenceMessage

TOPICS = proto.Topics("fed1")


def _upload(sender="dev1", rnd=3, logits=None, **info):
    logits = np.ones((4, 10), np.float16) if logits is None else logits
    return proto.Message(proto.KIND_UPLOAD, sender, rnd, {"samples": 5, **info}, {"logits": logits})


def test_round_trip_keeps_everything():
    msg = _upload(extra=[1, 2])
    back = proto.decode(proto.encode(msg), topic=TOPICS.up("dev1"), topics=TOPICS)
    assert (back.kind, back.sender, back.round) == ("upload", "dev1", 3)
    assert back.info == {"samples": 5, "extra": [1, 2]}
    assert back.tensors["logits"].dtype == np.float16
    np.testing.assert_array_equal(back.tensors["logits"], msg.tensors["logits"])


def test_topics_and_device_of():
    assert TOPICS.up("a") == "fededge/fed1/up/a"
    assert TOPICS.device_of("fededge/fed1/presence/a") == "a"
    assert TOPICS.device_of(TOPICS.round) is None
    with pytest.raises(proto.ProtocolError, match="federation name"):
        proto.Topics("bad/name")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "x" * 65, "has space", "-lead"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(proto.ProtocolError, match="invalid device id"):
        proto.validate_id(bad)


def test_sender_must_match_topic():
    with pytest.raises(proto.ProtocolError, match="does not match topic device 'dev2'"):
        proto.decode(proto.encode(_upload("dev1")), topic=TOPICS.up("dev2"), topics=TOPICS)


def _raw(header: dict, body: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


META = {"schema": "1", "kind": "upload", "sender": "dev1", "round": "1", "json": "{}"}


@pytest.mark.parametrize("payload,reason", [
    (b"", "too short"),
    (b"\x00" * 7, "too short"),
    (struct.pack("<Q", 10 ** 9) + b"{}", "out of bounds"),
    (_raw({"a": 1})[:-3] + b"\xff\xfe\x00", "not JSON"),
    (pickle.dumps({"logits": [1, 2, 3]}), "out of bounds|not JSON|too short"),
    (_raw({}), "no string metadata"),
    (_raw({"__metadata__": {**META, "schema": "0"}}), "schema version"),
    (_raw({"__metadata__": {**META, "kind": "evil"}}), "unknown message kind"),
    (_raw({"__metadata__": {**META, "round": "x"}}), "not an integer"),
    (_raw({"__metadata__": {**META, "round": "-1"}}), r"not an integer in \[0, 1000000\]"),
    (_raw({"__metadata__": {**META, "round": "18446744073709551616"}}), "not an integer in"),
    (_raw({"__metadata__": {**META, "round": " 5"}}), "not an integer in"),
    (_raw({"__metadata__": {**META, "json": "[1]"}}), "not an object"),
    (_raw({"__metadata__": {**META, "sender": "../etc"}}), "invalid sender"),
    (_raw({"__metadata__": META, "t": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}},
          b"\x01"), "unsupported dtype"),
    (_raw({"__metadata__": META, "t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
          b"\x00" * 8), "malformed"),
])
def test_hostile_payloads_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(proto.ProtocolError, match=reason):
        proto.decode(payload, topic=TOPICS.up("dev1"), topics=TOPICS)


def test_non_finite_values_are_rejected_on_both_ends():
    bad = np.full((2, 3), np.nan, np.float32)
    with pytest.raises(proto.ProtocolError, match="NaN or Inf"):
        proto.encode(_upload(logits=bad))
    # a peer that skips our encoder still gets caught on decode
    from safetensors.numpy import save
    payload = save({"logits": np.array([[np.inf]], np.float32)}, metadata=META)
    with pytest.raises(proto.ProtocolError, match="NaN or Inf"):
        proto.decode(payload)


def test_size_limit():
    payload = proto.encode(_upload(logits=np.zeros((100, 10), np.float32)))
    with pytest.raises(proto.ProtocolError, match="exceeds the 1000-byte limit"):
        proto.decode(payload, max_bytes=1000)


def test_require_tensors_checks_names_dtypes_and_shapes():
    spec = [proto.TensorSpec("logits", ("F16", "F32"), (4, 10))]
    proto.require_tensors(proto.decode(proto.encode(_upload())), spec)
    with pytest.raises(proto.ProtocolError, match="shape \\(4, 9\\)"):
        proto.require_tensors(_upload(logits=np.zeros((4, 9), np.float16)), spec)
    with pytest.raises(proto.ProtocolError, match="dtype I64"):
        proto.require_tensors(_upload(logits=np.zeros((4, 10), np.int64)), spec)
    wrong_name = proto.Message("upload", "dev1", 1, {}, {"weights": np.zeros((4, 10), np.float16)})
    with pytest.raises(proto.ProtocolError, match="differ from the expected"):
        proto.require_tensors(wrong_name, spec)
    any_rows = [proto.TensorSpec("logits", ("F16",), (None, 10))]
    proto.require_tensors(_upload(logits=np.zeros((7, 10), np.float16)), any_rows)


def test_presence_message_is_small_and_decodes():
    payload = PresenceMessage("dev1", "offline").encode()
    assert len(payload) < 200
    msg = proto.decode(payload, topic=TOPICS.presence("dev1"), topics=TOPICS)
    assert msg.info == {"status": "offline"} and msg.tensors == {}

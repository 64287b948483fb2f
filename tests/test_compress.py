"""Logit codecs: round trips within their stated error bounds, exact specs, hostile input."""

import numpy as np
import pytest

from fededge.config import ConfigError, FederationConfig
from fededge.wire import envelope as proto
from fededge.wire.codecs import CODECS, bytes_per_value, codec_for


def _codec(name: str, classes: int = 10, **settings):
    return codec_for(FederationConfig(logit_codec=name, num_classes=classes, **settings))


@pytest.fixture
def logits():
    return np.random.default_rng(3).normal(0.0, 4.0, size=(400, 10)).astype(np.float32)


def _shifted(z: np.ndarray) -> np.ndarray:
    return z - z.max(axis=1, keepdims=True)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = _shifted(z.astype(np.float64))
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_float16_is_the_plain_logits(logits):
    codec = _codec("float16")
    tensors = codec.encode(logits)
    assert list(tensors) == ["logits"] and tensors["logits"].dtype == np.float16
    np.testing.assert_allclose(codec.decode(tensors), logits, rtol=2 ** -10, atol=1e-3)


def test_int8_error_is_within_half_a_step_of_the_row_scale(logits):
    codec = _codec("int8")
    decoded = codec.decode(codec.encode(logits))
    span = logits.max(axis=1) - logits.min(axis=1)
    error = np.abs(_shifted(decoded) - _shifted(logits)).max(axis=1)
    assert (error <= 0.55 * span / 127).all()
    assert (decoded.argmax(axis=1) == logits.argmax(axis=1)).mean() > 0.98  # only near-ties move


def test_topk_keeps_the_top_classes_and_the_remaining_mass(logits):
    codec = _codec("topk", logit_topk=3)
    decoded = codec.decode(codec.encode(logits))
    truth, got = _log_softmax(logits), _log_softmax(decoded)
    top = np.argsort(-truth, axis=1)[:, :3]
    np.testing.assert_allclose(np.take_along_axis(got, top, 1), np.take_along_axis(truth, top, 1),
                               atol=5e-3)
    rest = lambda lp: 1 - np.exp(np.take_along_axis(lp, top, 1)).sum(1)  # noqa: E731
    np.testing.assert_allclose(rest(got), rest(truth), atol=5e-3)
    assert (decoded.argmax(axis=1) == logits.argmax(axis=1)).all()


@pytest.mark.parametrize("name, expected", [("float16", 2.0), ("int8", 1.0), ("topk", 0.9)])
def test_bytes_per_value(name, expected):
    assert bytes_per_value(_codec(name)) == pytest.approx(expected)


@pytest.mark.parametrize("name", CODECS)
def test_specs_describe_exactly_what_encode_produces(name, logits):
    codec = _codec(name)
    msg = proto.decode(proto.encode(proto.Message(proto.KIND_UPLOAD, "dev0", 1, {},
                                                  codec.encode(logits))))
    proto.require_tensors(msg, codec.specs(len(logits)))
    with pytest.raises(proto.ProtocolError, match="shape"):
        proto.require_tensors(msg, codec.specs(len(logits) + 1))


def test_int8_row_without_one_scale_byte_is_a_protocol_error(logits):
    codec = _codec("int8")
    tensors = codec.encode(logits)
    tensors["logits"][0] = 5  # every byte of row 0 claims to be the scale
    with pytest.raises(proto.ProtocolError, match="exactly one positive"):
        codec.decode(tensors)


def _repeat_class(t):
    t["topk_classes"][0, 1] = t["topk_classes"][0, 0]


def _class_out_of_range(t):
    t["topk_classes"][0, 0] = 10


def _positive_log_probability(t):
    t["topk_logprobs"][0, 0] = 2.0


@pytest.mark.parametrize("mutate, reason", [(_repeat_class, "repeat"),
                                            (_class_out_of_range, r"in \[0, 10\)"),
                                            (_positive_log_probability, "≤ 0")])
def test_malformed_topk_is_a_protocol_error(mutate, reason, logits):
    codec = _codec("topk")
    tensors = codec.encode(logits)
    mutate(tensors)
    with pytest.raises(proto.ProtocolError, match=reason):
        codec.decode(tensors)


def test_unknown_codec_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="'logit_codec': input should be 'float16', 'int8' or 'topk'"):
        _codec("zip")

"""Logit codecs: how logits travel, on uploads and on the consensus alike.

In logit distillation the logits *are* the traffic, so their encoding sets the bytes per round.
A codec turns an (M, K) logit array into named tensors and back, and describes those tensors
as ``TensorSpec`` so the server validates a compressed upload as exactly as a plain one.

- ``float16``: the logits as they are, in ``logit_dtype``. 2 bytes per value.
- ``int8`` (default): 1 byte per value. Each row is shifted so its maximum is 0 (softmax, every
  probability-space aggregator and the KD loss are shift-invariant) and quantized with a
  per-row scale. The scale needs no extra bytes: it rides in the row maximum's own byte, the
  only positive byte of the row (every other entry is ≤ 0), which also marks the argmax.
- ``topk``: per row, the ``logit_topk`` largest log-probabilities (float16) and their classes
  (uint8); the classes left out share the remaining probability mass equally. 3k/K bytes per
  value (0.9 for k = 3 of 10 classes).

Decoding validates what arithmetic on the values needs (one scale byte per row, classes in
range and distinct, log-probabilities ≤ 0), so a malformed upload is rejected with a reason
instead of reaching an aggregate. Pure numpy, no torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from fededge.config import ConfigError, FederationConfig
from fededge.wire.envelope import ProtocolError, TensorSpec

Tensors = Mapping[str, np.ndarray]


class LogitCodec(ABC):
    """Encodes (M, K) logits as named tensors; ``decode`` returns float32 (M, K) logits (or
    log-probabilities, which are logits too)."""

    name: str

    def __init__(self, classes: int) -> None:
        self.classes = classes

    @abstractmethod
    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def decode(self, tensors: Tensors) -> np.ndarray:
        """Raises ``ProtocolError`` if the tensors cannot be an encoding of logits."""

    @abstractmethod
    def specs(self, rows: int) -> list[TensorSpec]:
        """The exact tensors ``encode`` produces for ``rows`` rows."""


class Float16Codec(LogitCodec):
    name = "float16"

    def __init__(self, classes: int, dtype: str = "float16") -> None:
        super().__init__(classes)
        self.dtype = np.dtype(dtype)

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": np.asarray(logits).astype(self.dtype)}

    def decode(self, tensors: Tensors) -> np.ndarray:
        return np.asarray(tensors["logits"], dtype=np.float32)

    def specs(self, rows: int) -> list[TensorSpec]:
        return [TensorSpec("logits", ("F16", "F32"), (rows, self.classes))]


class Int8Codec(LogitCodec):
    """Row-max-shifted logits z ≤ 0 as int8 steps of a per-row scale s, with the scale's code
    stored in the row maximum's byte. Codes 1..127 stand for s = 2^((code − 64)/8), an eighth
    of an octave apart; the encoder takes the smallest code with 127·s ≥ the row's range, so
    nothing clips unless a row spans more than ~30,000, and |error| ≤ s/2 ≤ 0.55·range/127."""

    name = "int8"
    _CODE_OFFSET, _STEPS_PER_OCTAVE = 64, 8

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        z = np.asarray(logits, dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        span = -z.min(axis=1)
        exact = np.log2(np.maximum(span / 127.0, 1e-300)) * self._STEPS_PER_OCTAVE
        code = np.clip(np.ceil(exact - 1e-9) + self._CODE_OFFSET, 1, 127)
        q = np.clip(np.rint(z / self._scale(code)[:, None]), -127, 0).astype(np.int8)
        q[np.arange(len(q)), z.argmax(axis=1)] = code.astype(np.int8)
        return {"logits": q}

    def decode(self, tensors: Tensors) -> np.ndarray:
        q = np.asarray(tensors["logits"])
        marks = q > 0
        if not (marks.sum(axis=1) == 1).all():
            raise ProtocolError("int8 logits need exactly one positive (scale) byte per row")
        top = marks.argmax(axis=1)
        rows = np.arange(len(q))
        z = q.astype(np.float32) * self._scale(q[rows, top].astype(np.float64))[:, None]
        z[rows, top] = 0.0
        return z.astype(np.float32)

    def specs(self, rows: int) -> list[TensorSpec]:
        return [TensorSpec("logits", ("I8",), (rows, self.classes))]

    def _scale(self, code: np.ndarray) -> np.ndarray:
        return np.exp2((code - self._CODE_OFFSET) / self._STEPS_PER_OCTAVE)


class TopKCodec(LogitCodec):
    """The k most likely classes per row as float16 log-probabilities plus their class ids.
    The decoder gives each left-out class an equal share of the remaining mass (at least
    ``MIN_REST`` in all, so a row whose top-k sums to 1 after rounding stays finite). k is at
    most K − 1: keeping every class would be float16 plus wasted class ids."""

    name = "topk"
    MIN_REST = 1e-8

    def __init__(self, classes: int, k: int) -> None:
        super().__init__(classes)
        self.k = min(k, classes - 1)
        self.index_dtype, self.index_code = ((np.uint8, "U8") if classes <= 256
                                             else (np.int32, "I32"))

    def encode(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        z = np.asarray(logits, dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        top = np.argsort(-log_p, axis=1, kind="stable")[:, :self.k]
        return {"topk_logprobs": np.take_along_axis(log_p, top, axis=1).astype(np.float16),
                "topk_classes": top.astype(self.index_dtype)}

    def decode(self, tensors: Tensors) -> np.ndarray:
        values = np.asarray(tensors["topk_logprobs"], dtype=np.float64)
        classes = np.asarray(tensors["topk_classes"]).astype(np.int64)
        if ((classes < 0) | (classes >= self.classes)).any():
            raise ProtocolError(f"topk class ids must be in [0, {self.classes})")
        ordered = np.sort(classes, axis=1)
        if (np.diff(ordered, axis=1) == 0).any():
            raise ProtocolError("topk class ids repeat within a row")
        if (values > 1e-3).any():
            raise ProtocolError("topk log-probabilities must be ≤ 0")
        rest = np.maximum(1.0 - np.exp(values).sum(axis=1), self.MIN_REST)
        out = np.repeat(np.log(rest / (self.classes - self.k))[:, None], self.classes, axis=1)
        np.put_along_axis(out, classes, values, axis=1)
        out -= np.log(np.exp(out).sum(axis=1, keepdims=True))  # renormalize rounding away
        return out.astype(np.float32)

    def specs(self, rows: int) -> list[TensorSpec]:
        return [TensorSpec("topk_logprobs", ("F16",), (rows, self.k)),
                TensorSpec("topk_classes", (self.index_code,), (rows, self.k))]


CODECS = ("float16", "int8", "topk")


def codec_for(config: FederationConfig) -> LogitCodec:
    """The codec a federation's settings select."""
    name, classes = config.logit_codec, config.num_classes
    if name == "float16":
        return Float16Codec(classes, config.logit_dtype)
    if name == "int8":
        return Int8Codec(classes)
    if name == "topk":
        return TopKCodec(classes, config.logit_topk)
    raise ConfigError(f"unknown logit codec {name!r}; choose one of: {', '.join(CODECS)}")


def bytes_per_value(codec: LogitCodec, rows: int = 100) -> float:
    """Tensor bytes the codec spends per logit value (headers excluded)."""
    logits = np.random.default_rng(0).normal(size=(rows, codec.classes))
    return sum(t.nbytes for t in codec.encode(logits).values()) / (rows * codec.classes)

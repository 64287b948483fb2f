"""Every message kind of a federation round as a typed record, encoded and parsed in one place.

The envelope (``envelope.py``) carries tensors plus one JSON document; this module says which
fields each kind has, of which type, and checks them when parsing, so the server and the client
never build or read a message dict by hand. A strategy's own part of a message (its phase,
temperature, weights, logits...) travels as a ``Payload`` beside these fields; the field names
below are reserved and a strategy cannot overwrite them.

    kind        topic                    fields
    config      config (retained)        the FederationConfig (with its run_id)
    round       round (retained)         round, run_id, attempt, deadline_s, waiting_for; or done
    upload      up/<device>              round, run_id, attempt, samples + the strategy's reply
    consensus   consensus (retained)     round, run_id, final, the announcement it answers + body
    metrics     up/<device>              round, run_id, accuracy, compute_intervals, bytes, ...
    presence    presence/<device> (ret.) status, run_id (absent in a Last Will), profile, ...
    model       up/<device>              round, run_id, student, accuracy + the weights
                                         (collect_models: the trained student, after the last
                                         round; the payload is itself a loadable checkpoint)

Parsing raises ``ProtocolError`` with the reason a receiver logs and records; nothing here
raises anything else for any input (numbers are checked as Python ints and floats before they
reach numpy or SQLite).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from fededge.config import ConfigError, FederationConfig
from fededge.wire.envelope import (
    KIND_CONFIG,
    KIND_CONSENSUS,
    KIND_METRICS,
    KIND_MODEL,
    KIND_PRESENCE,
    KIND_ROUND,
    KIND_UPLOAD,
    MAX_ROUND,
    Message,
    encode,
)
from fededge.wire.topics import SERVER_ID, ProtocolError

MAX_SAMPLES = 2**40
MAX_INTERVALS = 10_000
COUNTERS = ("sent_bytes", "received_bytes", "sent_messages", "received_messages")
MAX_TIME = 1e10  # seconds since the epoch (year 2286): a compute interval beyond it is a lie
ONLINE, OFFLINE = "online", "offline"
ANNOUNCED = "announced."
"""Prefix of the round announcement's tensors inside a consensus message. Carrying them makes a
consensus self-contained, so a client that restarted (and never saw the announcement) can still
absorb a round's consensus delivered as a retained message."""


@dataclass
class Payload:
    """A strategy's part of a message: its JSON fields and its tensors."""

    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------- field checks

def _int(info: Mapping[str, Any], key: str, what: str, *, low: int = 0,
         high: int = MAX_ROUND, default: int | None = None) -> int:
    value = info.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"{what} {key} {value!r:.40} is not an integer in [{low}, {high}]")
    return value


def _number(value: Any, what: str, low: float, high: float) -> float:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or not low <= value <= high):
        raise ProtocolError(f"{what} {value!r:.40} is not a number in [{low}, {high}]")
    return float(value)


def _text(info: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> str | None:
    value = info.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise ProtocolError(f"{what} {key} {value!r:.40} is not a short string")
    return value


def _run_id(info: Mapping[str, Any], what: str) -> str:
    return _text(info, "run_id", what)


def _body(info: Mapping[str, Any], reserved: frozenset[str],
          tensors: dict[str, np.ndarray]) -> Payload:
    return Payload({k: v for k, v in info.items() if k not in reserved}, tensors)


def _merge(body: Payload, fields: dict[str, Any]) -> dict[str, Any]:
    clash = sorted(set(body.info) & set(fields))
    if clash:
        raise ProtocolError(f"payload fields {clash} are reserved by the message itself")
    return {**body.info, **fields}


# ----------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class ConfigMessage:
    """The federation's settings, published retained by the server."""

    config: FederationConfig

    def encode(self) -> bytes:
        return encode(Message(KIND_CONFIG, SERVER_ID, 0, self.config.to_dict()))

    @classmethod
    def parse(cls, msg: Message) -> ConfigMessage:
        try:
            return cls(FederationConfig.from_dict(msg.info))
        except (ConfigError, TypeError, ValueError) as exc:
            raise ProtocolError(f"config is not valid: {exc}") from None


@dataclass(frozen=True)
class RoundMessage:
    """Round ``round`` is open (attempt, deadline, whom the server still waits for), or, with
    ``done``, the federation is over. A ``nudge`` is the server's periodic reminder of an open
    round: the same fields without the announcement (``body``), published without retain so the
    retained announcement stays whole; a device never answers a nudge, it only re-sends what
    the nudge shows is missing."""

    round: int
    run_id: str
    body: Payload = field(default_factory=Payload)
    attempt: int = 1
    deadline_s: float = 0.0
    waiting_for: tuple[str, ...] = ()
    done: bool = False
    nudge: bool = False

    _FIELDS = frozenset({"run_id", "attempt", "deadline_s", "waiting_for", "done", "nudge"})

    def encode(self) -> bytes:
        fields: dict[str, Any] = {"run_id": self.run_id}
        if self.done:
            fields["done"] = True
        else:
            fields.update(attempt=self.attempt, deadline_s=self.deadline_s,
                          waiting_for=list(self.waiting_for))
            if self.nudge:
                fields["nudge"] = True
        return encode(Message(KIND_ROUND, SERVER_ID, self.round, _merge(self.body, fields),
                              self.body.tensors))

    @classmethod
    def parse(cls, msg: Message) -> RoundMessage:
        info, what = msg.info, "round"
        run_id = _run_id(info, what)
        if info.get("done") is True:
            return cls(msg.round, run_id, done=True)
        waiting = info.get("waiting_for", [])
        if not isinstance(waiting, list) or not all(isinstance(d, str) for d in waiting):
            raise ProtocolError("round waiting_for is not a list of device ids")
        return cls(msg.round, run_id, _body(info, cls._FIELDS, msg.tensors),
                   attempt=_int(info, "attempt", what, low=1, default=1),
                   deadline_s=_number(info.get("deadline_s", 0.0), "round deadline_s", 0, 1e9),
                   waiting_for=tuple(waiting), nudge=info.get("nudge") is True)


@dataclass(frozen=True)
class UploadMessage:
    """A device's answer to a round: the strategy's reply plus its private sample count."""

    device: str
    round: int
    run_id: str
    samples: int
    body: Payload
    attempt: int = 1

    _FIELDS = frozenset({"run_id", "attempt", "samples"})

    def encode(self) -> bytes:
        fields = {"run_id": self.run_id, "attempt": self.attempt, "samples": self.samples}
        return encode(Message(KIND_UPLOAD, self.device, self.round, _merge(self.body, fields),
                              self.body.tensors))

    @classmethod
    def parse(cls, msg: Message) -> UploadMessage:
        info = msg.info
        run_id = _run_id(info, "upload")
        samples = info.get("samples")
        if (not isinstance(samples, int) or isinstance(samples, bool)
                or not 1 <= samples <= MAX_SAMPLES):
            raise ProtocolError(f"upload sample count {samples!r:.40} is not a positive int")
        return cls(msg.sender, msg.round, run_id, samples,
                   _body(info, cls._FIELDS, msg.tensors),
                   attempt=_int(info, "attempt", "upload", low=1, default=1))


@dataclass(frozen=True)
class ConsensusMessage:
    """A round's aggregate, with the announcement it answers (so it is self-contained) and
    whether it is the federation's last."""

    round: int
    run_id: str
    announcement: Payload
    body: Payload
    final: bool = False

    _FIELDS = frozenset({"run_id", "final", "announcement"})

    def encode(self) -> bytes:
        fields = {"run_id": self.run_id, "final": self.final,
                  "announcement": self.announcement.info}
        tensors = {**self.body.tensors,
                   **{ANNOUNCED + name: a for name, a in self.announcement.tensors.items()}}
        return encode(Message(KIND_CONSENSUS, SERVER_ID, self.round, _merge(self.body, fields),
                              tensors))

    @classmethod
    def parse(cls, msg: Message) -> ConsensusMessage:
        info = msg.info
        announcement = info.get("announcement")
        if not isinstance(announcement, dict):
            raise ProtocolError("consensus does not carry its round announcement")
        announced = {k[len(ANNOUNCED):]: v for k, v in msg.tensors.items()
                     if k.startswith(ANNOUNCED)}
        own = {k: v for k, v in msg.tensors.items() if not k.startswith(ANNOUNCED)}
        return cls(msg.round, _run_id(info, "consensus"), Payload(announcement, announced),
                   _body(info, cls._FIELDS, own), final=info.get("final") is True)


@dataclass(frozen=True)
class MetricsMessage:
    """A device's report after warm-up (round 0) and after each absorbed round."""

    device: str
    round: int
    run_id: str
    bytes: dict[str, int]
    accuracy: float | None = None
    compute_intervals: tuple[tuple[float, float], ...] = ()
    student: str = ""
    profile: str = ""

    def to_info(self) -> dict[str, Any]:
        """The JSON form, as the server stores and reports it."""
        return {"run_id": self.run_id, "accuracy": self.accuracy,
                "compute_intervals": [list(iv) for iv in self.compute_intervals],
                "bytes": dict(self.bytes), "student": self.student, "profile": self.profile}

    def encode(self) -> bytes:
        return encode(Message(KIND_METRICS, self.device, self.round, self.to_info()))

    @classmethod
    def parse(cls, msg: Message) -> MetricsMessage:
        info = msg.info
        run_id = _run_id(info, "metrics")
        accuracy = info.get("accuracy")
        if accuracy is not None:
            if (not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool)
                    or not 0 <= accuracy <= 1):
                raise ProtocolError(f"metrics accuracy {accuracy!r:.40} is not in [0, 1]")
            accuracy = float(accuracy)
        counters = info.get("bytes")
        if not isinstance(counters, dict) or not all(
                isinstance(counters.get(k), int) and not isinstance(counters.get(k), bool)
                and 0 <= counters[k] <= 2**62 for k in ("sent_bytes", "received_bytes")):
            raise ProtocolError("metrics bytes lack non-negative sent_bytes/received_bytes")
        intervals = info.get("compute_intervals", [])
        if not isinstance(intervals, list) or len(intervals) > MAX_INTERVALS or not all(
                isinstance(iv, list) and len(iv) == 2 and all(
                    isinstance(t, (int, float)) and not isinstance(t, bool)
                    and 0 <= t <= MAX_TIME for t in iv) and iv[0] <= iv[1] for iv in intervals):
            raise ProtocolError(f"metrics compute_intervals are not at most {MAX_INTERVALS} "
                                "[start, end] pairs of times with start <= end")
        kept = {k: int(v) for k, v in counters.items() if k in COUNTERS
                and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**62}
        return cls(msg.sender, msg.round, run_id, kept, accuracy,
                   tuple((float(a), float(b)) for a, b in intervals),
                   str(info.get("student", ""))[:200], str(info.get("profile", ""))[:200])


@dataclass(frozen=True)
class PresenceMessage:
    """A device is online or offline. Its Last Will is set before it knows the run, so it
    carries no ``run_id``; a goodbye at the end of a run does."""

    device: str
    status: str
    run_id: str | None = None
    profile: str = ""
    student: str = ""
    params: int = 0
    samples: int = 0

    @property
    def is_last_will(self) -> bool:
        return self.status == OFFLINE and self.run_id is None

    def to_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status}
        if self.run_id is not None:
            info["run_id"] = self.run_id
        if self.profile or self.student:
            info.update(profile=self.profile, student=self.student, params=self.params,
                        samples=self.samples)
        return info

    def encode(self) -> bytes:
        return encode(Message(KIND_PRESENCE, self.device, 0, self.to_info()))

    @classmethod
    def parse(cls, msg: Message) -> PresenceMessage:
        info = msg.info
        status = info.get("status")
        if status not in (ONLINE, OFFLINE):
            raise ProtocolError(f"presence status {status!r:.40} is not online or offline")
        return cls(msg.sender, status, _text(info, "run_id", "presence", optional=True),
                   str(info.get("profile", ""))[:200], str(info.get("student", ""))[:200],
                   _int(info, "params", "presence", high=2**62, default=0),
                   _int(info, "samples", "presence", high=MAX_SAMPLES, default=0))


@dataclass(frozen=True)
class ModelMessage:
    """A device's trained student after the last round, when the federation collects models
    (``collect_models``). Its tensors are the student's weights under their own names, so the
    payload is a safetensors file a torch loader reads as the student's ``state_dict`` (the
    envelope's metadata aside): the server checks it and stores the bytes as they came."""

    device: str
    round: int
    run_id: str
    student: str
    weights: dict[str, np.ndarray]
    accuracy: float | None = None

    def encode(self) -> bytes:
        return encode(Message(KIND_MODEL, self.device, self.round,
                              {"run_id": self.run_id, "student": self.student,
                               "accuracy": self.accuracy}, self.weights))

    @classmethod
    def parse(cls, msg: Message) -> ModelMessage:
        info, what = msg.info, "model"
        accuracy = info.get("accuracy")
        if accuracy is not None:
            accuracy = _number(accuracy, "model accuracy", 0, 1)
        if not msg.tensors:
            raise ProtocolError("model carries no weights")
        bad = sorted(name for name, array in msg.tensors.items() if array.dtype != np.float32)
        if bad:
            raise ProtocolError(f"model weights {bad[:3]} are not float32")
        return cls(msg.sender, msg.round, _run_id(info, what), _text(info, "student", what),
                   dict(msg.tensors), accuracy)

    @property
    def params(self) -> int:
        return int(sum(array.size for array in self.weights.values()))


AnyMessage = Union[ConfigMessage, RoundMessage, UploadMessage, ConsensusMessage, MetricsMessage,
                   PresenceMessage, ModelMessage]
_PARSERS = {KIND_CONFIG: ConfigMessage, KIND_ROUND: RoundMessage, KIND_UPLOAD: UploadMessage,
            KIND_CONSENSUS: ConsensusMessage, KIND_METRICS: MetricsMessage,
            KIND_PRESENCE: PresenceMessage, KIND_MODEL: ModelMessage}


def parse(msg: Message) -> AnyMessage:
    """The typed record of a decoded envelope; ``ProtocolError`` if its fields are wrong."""
    return _PARSERS[msg.kind].parse(msg)


# ----------------------------------------------------------------------------- proxy rows

def encode_rows(rows: np.ndarray, proxy_size: int) -> np.ndarray:
    """Proxy-set rows as a packed bitmask, one bit per proxy sample: 68 bytes for digits' 539
    rows, where int64 indices took 4.3 KB (sent twice per round, since the consensus carries
    its announcement)."""
    mask = np.zeros(proxy_size, dtype=bool)
    mask[rows] = True
    return np.packbits(mask)


def decode_rows(tensors: Mapping[str, np.ndarray], proxy_size: int) -> np.ndarray:
    """The proxy rows an announcement's ``rows`` bitmask selects, in order."""
    packed = tensors.get("rows")
    if packed is None or packed.dtype != np.uint8 or packed.shape != ((proxy_size + 7) // 8,):
        raise ProtocolError(f"announcement lacks a uint8 'rows' mask of {(proxy_size + 7) // 8} "
                            f"bytes for a proxy set of {proxy_size}")
    bits = np.unpackbits(packed)
    if bits[proxy_size:].any() or not bits.any():
        raise ProtocolError("announcement 'rows' mask selects no row, or rows past the proxy set")
    return np.flatnonzero(bits[:proxy_size])

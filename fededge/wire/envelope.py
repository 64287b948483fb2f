"""The wire protocol: message kinds, encode/decode and validation. No I/O.

Every payload is a safetensors blob: tensors plus string metadata. safetensors is chosen over
pickle (arbitrary code on load) and over JSON (no binary tensors): its header is a bounded JSON
document we can inspect *before* touching tensor bytes, so a hostile payload is rejected cheaply.
Structured, non-tensor fields travel as one JSON document under the metadata key ``json``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

# Topic names and ids live in ``topics`` (standard library only, for the edge agent); callers
# keep reaching them as ``protocol.Topics`` and so on.
from fededge.config import MAX_PAYLOAD
from fededge.wire import boundedjson
from fededge.wire.topics import SERVER_ID, ProtocolError, Topics, validate_id

SCHEMA_VERSION = "1"
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 64
MAX_ROUND = 1_000_000
"""Rounds, attempts and counts beyond this are refused before they reach SQLite or numpy."""
_ROUND = re.compile(r"\A(0|[1-9][0-9]{0,6})\Z")  # a round as written by ``encode``: no sign,
                                                # spaces, '_' or non-ASCII digits

KIND_CONFIG = "config"
KIND_ROUND = "round"
KIND_UPLOAD = "upload"
KIND_CONSENSUS = "consensus"
KIND_METRICS = "metrics"
KIND_PRESENCE = "presence"
KIND_MODEL = "model"
KINDS = (KIND_CONFIG, KIND_ROUND, KIND_UPLOAD, KIND_CONSENSUS, KIND_METRICS, KIND_PRESENCE,
         KIND_MODEL)

# safetensors dtype codes we accept, and the numpy dtypes they decode to.
_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "U8": np.uint8, "I8": np.int8}


@dataclass
class Message:
    """One decoded payload. ``info`` is the JSON-able structured part."""

    kind: str
    sender: str
    round: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor; ``None`` in a shape matches any length."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[int | None, ...]


def encode(msg: Message) -> bytes:
    """Serialize a message; refuses non-finite floats so we never emit what we would reject."""
    if msg.kind not in KINDS:
        raise ProtocolError(f"unknown message kind {msg.kind!r}")
    for name, arr in msg.tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError(f"tensor {name!r} holds NaN or Inf; refusing to send it")
    metadata = {
        "schema": SCHEMA_VERSION,
        "kind": msg.kind,
        "sender": msg.sender,
        "round": str(int(msg.round)),
        "json": _json(msg.info),
    }
    return st_save({k: np.ascontiguousarray(v) for k, v in msg.tensors.items()}, metadata=metadata)


def _json(info: dict[str, Any]) -> str:
    try:
        return json.dumps(info, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message fields cannot be sent: {exc}") from None


def _read_header(payload: bytes) -> dict[str, Any]:
    if len(payload) < 8:
        raise ProtocolError(f"payload of {len(payload)} bytes is too short for safetensors")
    (header_len,) = struct.unpack("<Q", payload[:8])
    if header_len > MAX_HEADER_BYTES or header_len > len(payload) - 8:
        raise ProtocolError(f"safetensors header length {header_len} is out of bounds")
    try:
        header = boundedjson.loads(bytes(payload[8:8 + header_len]), max_depth=4)
    except ProtocolError as exc:
        raise ProtocolError(f"safetensors header is not JSON within limits: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("safetensors header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise ProtocolError(f"payload holds {len(header) - 1} tensors (at most {MAX_TENSORS})")
    return header


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("payload has no string metadata block")
    missing = [k for k in ("schema", "kind", "sender", "round", "json") if k not in meta]
    if missing:
        raise ProtocolError(f"metadata lacks {', '.join(missing)}")
    if meta["schema"] != SCHEMA_VERSION:
        raise ProtocolError(f"schema version {meta['schema']!r} is not {SCHEMA_VERSION!r}")
    if meta["kind"] not in KINDS:
        raise ProtocolError(f"unknown message kind {meta['kind']!r}")
    return meta


def decode(payload: bytes, *, topic: str | None = None, topics: Topics | None = None,
           max_bytes: int = MAX_PAYLOAD) -> Message:
    """Parse and validate everything that does not depend on round state.

    Checks: size limit, header bounds, JSON within depth, size and number limits
    (``boundedjson``), schema version, known kind, well-formed sender and round (an integer in
    [0, ``MAX_ROUND``]), sender equal to the device named by the topic, accepted dtypes, finite
    floats.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    header = _read_header(payload)
    meta = _metadata(header)
    sender = meta["sender"]
    if sender != SERVER_ID:
        validate_id(sender, "sender")
    if not _ROUND.match(meta["round"]) or int(meta["round"]) > MAX_ROUND:
        raise ProtocolError(f"round {meta['round']!r:.40} is not an integer in [0, {MAX_ROUND}]")
    rnd = int(meta["round"])
    if topic is not None and topics is not None:
        owner = topics.device_of(topic)
        if owner is not None and owner != sender:
            raise ProtocolError(f"sender {sender!r} does not match topic device {owner!r}")
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
            raise ProtocolError(f"tensor {name!r} has an unsupported dtype {spec!r:.60}")
    try:
        info = boundedjson.loads(meta["json"])
    except ProtocolError as exc:
        raise ProtocolError(f"metadata json is invalid: {exc}") from None
    if not isinstance(info, dict):
        raise ProtocolError("metadata json is not an object")
    try:
        tensors = st_load(bytes(payload))
    except (SafetensorError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise ProtocolError(f"tensor data is malformed: {str(exc)[:200]}") from None
    for name, arr in tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ProtocolError(f"tensor {name!r} holds NaN or Inf")
    return Message(kind=meta["kind"], sender=sender, round=rnd, info=info, tensors=tensors)


def require_tensors(msg: Message, specs: Iterable[TensorSpec]) -> None:
    """Check a message carries exactly the expected tensors with accepted dtypes and shapes."""
    specs = list(specs)
    expected = {s.name for s in specs}
    got = set(msg.tensors)
    if got != expected:
        raise ProtocolError(f"tensors {sorted(got)} differ from the expected {sorted(expected)}")
    for spec in specs:
        arr = msg.tensors[spec.name]
        code = next(k for k, v in _DTYPES.items() if np.dtype(v) == arr.dtype)
        if code not in spec.dtypes:
            raise ProtocolError(f"tensor {spec.name!r} has dtype {code}, expected {spec.dtypes}")
        if len(arr.shape) != len(spec.shape) or any(
                want is not None and want != have for want, have in zip(spec.shape, arr.shape)):
            raise ProtocolError(f"tensor {spec.name!r} has shape {tuple(arr.shape)}, "
                                f"expected {tuple('*' if s is None else s for s in spec.shape)}")

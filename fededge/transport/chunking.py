"""Chunking: payloads larger than a broker's message limit, split and reassembled.

Weight averaging moves whole models (360 KB for cnn-l), while brokers often cap a message
(AWS IoT at 128 KB, a Mosquitto ``message_size_limit``). ``ChunkingTransport`` wraps any
``Transport``: it publishes a payload over ``max_payload`` as numbered chunks on the same topic
and reassembles them on receive, so ``server.py`` and ``client.py`` never see a chunk.

Frame (fixed binary header, no pickle, nothing parsed beyond these fields):

    magic "FEC1" | SHA-256 of the whole payload (32) | total length u32 | index u32 | count u32 |
    bytes [index * total // count, (index + 1) * total // count) of the payload

A protocol payload can never start with the magic (as a safetensors header length it would be
~826 MB), so chunks and ordinary messages share topics unambiguously. Receiving validates the
frame (length, index < count, count ≤ total ≤ ``max_message``, the exact slice length, the
same header on every chunk) and the SHA-256 of the reassembled payload. Pending sets are keyed
by (topic, SHA-256): a topic holds at most ``MAX_SETS_PER_TOPIC`` (a sender can only crowd out
its own topic), all pending sets together reserve at most ``max_pending`` bytes, and a set not
completed within ``timeout_s`` is dropped.

Retained messages: the broker keeps only the last chunk, so a subscriber arriving later gets a
fragment that expires; it receives the whole message when the publisher sends it again (the
server re-publishes its retained state while it waits). Byte counts are the inner
transport's: what actually crossed the wire, chunk headers included.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from dataclasses import dataclass, field

from fededge.config import MAX_PAYLOAD
from fededge.errors import FedEdgeError
from fededge.transport.base import Handler, Transport, TransportWrapper

log = logging.getLogger(__name__)

MAGIC = b"FEC1"
_HEADER = struct.Struct("<4s32sIII")
HEADER_BYTES = _HEADER.size  # 48
MIN_PAYLOAD = 256
MAX_SETS_PER_TOPIC = 2


class ChunkError(FedEdgeError, ValueError):
    """A chunk frame that breaks the format; the message is the logged reason."""


def _bounds(total: int, count: int, index: int) -> tuple[int, int]:
    return index * total // count, (index + 1) * total // count


def split(payload: bytes, max_payload: int) -> list[bytes]:
    """``payload`` as chunk frames of at most ``max_payload`` bytes each."""
    data = max_payload - HEADER_BYTES
    count = -(-len(payload) // data)
    digest = hashlib.sha256(payload).digest()
    return [_HEADER.pack(MAGIC, digest, len(payload), i, count) + payload[slice(*_bounds(
        len(payload), count, i))] for i in range(count)]


def is_chunk(payload: bytes) -> bool:
    return payload[:4] == MAGIC


@dataclass
class _Pending:
    header: tuple[bytes, int, int]  # digest, total, count
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects chunk frames per (topic, digest); returns the payload when a set completes."""

    def __init__(self, max_message: int, max_pending: int, timeout_s: float) -> None:
        self.max_message, self.max_pending, self.timeout_s = max_message, max_pending, timeout_s
        self._pending: dict[tuple[str, bytes], _Pending] = {}
        self._lock = threading.Lock()

    def add(self, topic: str, frame: bytes, now: float | None = None) -> bytes | None:
        """Take one frame; the reassembled payload if it completed a set, else None. Raises
        ``ChunkError`` for a malformed frame or a set that cannot be held."""
        digest, total, index, count = self._parse(frame)
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(now)
            key = (topic, digest)
            pending = self._pending.get(key)
            if pending is None:
                pending = self._open(key, (digest, total, count), now)
            elif pending.header != (digest, total, count):
                raise ChunkError("chunk header differs from earlier chunks of its message")
            pending.parts[index] = frame[HEADER_BYTES:]
            if len(pending.parts) < count:
                return None
            del self._pending[key]
        payload = b"".join(pending.parts[i] for i in range(count))
        if hashlib.sha256(payload).digest() != digest:
            raise ChunkError("reassembled payload does not match its SHA-256")
        return payload

    def _parse(self, frame: bytes) -> tuple[bytes, int, int, int]:
        if len(frame) < HEADER_BYTES:
            raise ChunkError(f"chunk of {len(frame)} bytes is shorter than its header")
        magic, digest, total, index, count = _HEADER.unpack_from(frame)
        if not 2 <= count <= total <= self.max_message or index >= count:
            raise ChunkError(f"chunk {index}/{count} of a {total}-byte message is out of bounds "
                             f"(limit {self.max_message} bytes)")
        lo, hi = _bounds(total, count, index)
        if len(frame) - HEADER_BYTES != hi - lo:
            raise ChunkError(f"chunk {index}/{count} carries {len(frame) - HEADER_BYTES} bytes, "
                             f"expected {hi - lo}")
        return digest, total, index, count

    def _expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if now - p.started > self.timeout_s]:
            log.warning("dropped an incomplete chunked message on %s after %.0f s", key[0],
                        self.timeout_s)
            del self._pending[key]

    def _open(self, key: tuple[str, bytes], header: tuple[bytes, int, int],
              now: float) -> _Pending:
        same_topic = sorted((p.started, k) for k, p in self._pending.items() if k[0] == key[0])
        for _, old in same_topic[:max(0, len(same_topic) - MAX_SETS_PER_TOPIC + 1)]:
            del self._pending[old]  # the sender moved on to a newer message
        reserved = sum(p.header[1] for p in self._pending.values())
        if reserved + header[1] > self.max_pending:
            raise ChunkError(f"{reserved} bytes of chunked messages are pending; no room for "
                             f"{header[1]} more (limit {self.max_pending})")
        pending = self._pending[key] = _Pending(header, now)
        return pending


class ChunkingTransport(TransportWrapper):
    """Any transport, with payloads over ``max_payload`` bytes sent as chunks and reassembled
    on receive (ordinary payloads pass through untouched)."""

    def __init__(self, inner: Transport, max_payload: int, *,
                 max_message: int = MAX_PAYLOAD, max_pending: int = 4 * MAX_PAYLOAD,
                 timeout_s: float = 60.0) -> None:
        if max_payload < MIN_PAYLOAD:
            raise ValueError(f"max_payload must be at least {MIN_PAYLOAD} bytes, got {max_payload}")
        super().__init__(inner)  # byte counts: the wire bytes, chunk headers included
        self.max_payload = max_payload
        self._limits = (max_message, max_pending, timeout_s)
        self.rejected = 0

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if len(payload) <= self.max_payload:
            self.inner.publish(topic, payload, retain=retain)
            return
        for frame in split(payload, self.max_payload):
            self.inner.publish(topic, frame, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        reassembler = Reassembler(*self._limits)

        def receive(topic: str, payload: bytes) -> None:
            if not is_chunk(payload):
                handler(topic, payload)
                return
            try:
                whole = reassembler.add(topic, payload)
            except ChunkError as exc:
                self.rejected += 1
                log.warning("rejected a chunk on %s: %s", topic, exc)
                return
            if whole is not None:
                handler(topic, whole)

        self.inner.subscribe(topic_filter, receive)

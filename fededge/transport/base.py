"""The Transport interface every party talks through, and what all implementations share:
byte accounting of MQTT PUBLISH packets.

Server and client code take a ``Transport`` and never learn which one they got, so unit tests
drive them through the in-memory twin (``memory.py``) and integration tests through a real
broker (``mqtt.py``) with the same code.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from fededge.errors import FedEdgeError

Handler = Callable[[str, bytes], None]


class TransportError(FedEdgeError, RuntimeError):
    """Connecting or publishing failed in a way the user must fix (address, credentials, TLS)."""


def publish_packet_size(topic: str, payload: bytes, qos: int = 1) -> int:
    """Bytes of the MQTT 3.1.1 PUBLISH packet on the wire (fixed header + topic + id + payload)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    varint = 1
    while remaining >= 128 ** varint:
        varint += 1
    return 1 + varint + remaining


def _category(topic: str) -> str:
    """Byte counts are grouped by the topic level after ``fededge/<fed>/`` (up, round, ...)."""
    parts = topic.split("/")
    return parts[2] if len(parts) > 2 else topic


@dataclass
class ByteStats:
    """Thread-safe counts of MQTT PUBLISH traffic as seen by one endpoint."""

    sent_bytes: int = 0
    received_bytes: int = 0
    sent_messages: int = 0
    received_messages: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, topic: str, payload: bytes, *, sent: bool) -> None:
        size = publish_packet_size(topic, payload)
        with self._lock:
            if sent:
                self.sent_bytes += size
                self.sent_messages += 1
            else:
                self.received_bytes += size
                self.received_messages += 1
            self.by_category[("sent:" if sent else "recv:") + _category(topic)] += size

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"sent_bytes": self.sent_bytes, "received_bytes": self.received_bytes,
                    "sent_messages": self.sent_messages,
                    "received_messages": self.received_messages}


class Transport(ABC):
    """Publish/subscribe with QoS 1; handlers run on the transport's thread and must not block."""

    def __init__(self) -> None:
        self.stats = ByteStats()

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler) -> None: ...

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every publish made so far is acknowledged; False if some still are not
        after ``timeout`` seconds. A transport that hands messages over synchronously (the
        in-memory twin) has nothing pending; one that buffers (paho, a wrapper) overrides this."""
        return True

    @abstractmethod
    def close(self) -> None:
        """Flush pending publishes and disconnect cleanly (no Last Will)."""

    @abstractmethod
    def abort(self) -> None:
        """Vanish like a killed device: no flush, no goodbye, so the broker (or hub) publishes
        the Last Will. Every transport has it, so a test or a supervisor can crash any of them."""


class TransportWrapper(Transport):
    """A transport that adds one behaviour to another (chunking, fault injection, a config
    guard): everything it does not override passes through, and byte counts are the inner
    transport's, what really crossed the wire."""

    def __init__(self, inner: Transport) -> None:
        super().__init__()
        self.inner = inner
        self.stats = inner.stats

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.inner.publish(topic, payload, retain=retain)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self.inner.subscribe(topic_filter, handler)

    def flush(self, timeout: float = 10.0) -> bool:
        return self.inner.flush(timeout)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()

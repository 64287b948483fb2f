"""An in-process broker with the same interface as MQTT: retained messages, wildcards, Last
Will, synchronous delivery. For fast unit tests of exactly the server and client code."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from fededge.transport.base import Handler, Transport


class MemoryHub:
    """An in-process broker: retained messages, wildcards, Last Will. For fast unit tests."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._retained: dict[str, bytes] = {}
        self._subs: list[tuple[str, "MemoryTransport", Handler]] = []

    def connect(self, client_id: str, will: tuple[str, bytes] | None = None) -> "MemoryTransport":
        return MemoryTransport(self, client_id, will)

    def _subscribe(self, endpoint: "MemoryTransport", topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._subs.append((topic_filter, endpoint, handler))
            retained = [(t, p) for t, p in self._retained.items()
                        if mqtt.topic_matches_sub(topic_filter, t)]
        for topic, payload in retained:
            endpoint._deliver(topic, payload, handler)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [(e, h) for f, e, h in self._subs if mqtt.topic_matches_sub(f, topic)]
        for endpoint, handler in targets:
            endpoint._deliver(topic, payload, handler)

    def _detach(self, endpoint: "MemoryTransport") -> None:
        with self._lock:
            self._subs = [s for s in self._subs if s[1] is not endpoint]


class MemoryTransport(Transport):
    """One endpoint on a ``MemoryHub``; delivery is synchronous on the publisher's thread."""

    def __init__(self, hub: MemoryHub, client_id: str, will: tuple[str, bytes] | None) -> None:
        super().__init__()
        self.client_id = client_id
        self._hub, self._will = hub, will

    def _deliver(self, topic: str, payload: bytes, handler: Handler) -> None:
        self.stats.record(topic, payload, sent=False)
        handler(topic, payload)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self._hub._subscribe(self, topic_filter, handler)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.stats.record(topic, payload, sent=True)
        self._hub._publish(topic, payload, retain)

    def close(self) -> None:
        self._hub._detach(self)

    def abort(self) -> None:
        """Vanish like a crashed device: the hub publishes the Last Will."""
        self._hub._detach(self)
        if self._will is not None:
            self._hub._publish(self._will[0], self._will[1], retain=True)

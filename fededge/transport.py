"""Moving payloads: a paho-mqtt wrapper and an in-memory twin with the same interface.

The transport knows sockets, QoS, TLS, credentials, Last Will and byte counts, but nothing of
rounds or tensors. Server and client code take a ``Transport`` and never learn which one they
got, so unit tests drive them through ``MemoryHub`` and integration tests through a real broker.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


class TransportError(RuntimeError):
    """Connecting or publishing failed in a way the user must fix (address, credentials, TLS)."""


def publish_packet_size(topic: str, payload: bytes, qos: int = 1) -> int:
    """Bytes of the MQTT 3.1.1 PUBLISH packet on the wire (fixed header + topic + id + payload)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + len(payload)
    varint = 1
    while remaining >= 128 ** varint:
        varint += 1
    return 1 + varint + remaining


def _acknowledged(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged a QoS-1 publish. A publish made while disconnected keeps
    rc NO_CONN even after paho re-sent it on reconnect, and paho's ``is_published()`` raises for
    it; its PUBACK still sets the flag read here."""
    if info.rc == mqtt.MQTT_ERR_NO_CONN:
        return bool(info._published)
    return info.is_published()


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


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the CA certificate and, for mutual TLS, this endpoint's certificate and key."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class Transport(ABC):
    """Publish/subscribe with QoS 1; handlers run on the transport's thread and must not block."""

    def __init__(self) -> None:
        self.stats = ByteStats()

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Flush pending publishes and disconnect cleanly (no Last Will)."""


class MqttTransport(Transport):
    """paho-mqtt 2.x client: QoS 1, automatic reconnect, resubscribe on every (re)connect."""

    def __init__(self, client_id: str, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, tls: TlsConfig | None = None,
                 will: tuple[str, bytes] | None = None, keepalive: int = 20,
                 clean_session: bool = True) -> None:
        super().__init__()
        self.client_id, self.host, self.port = client_id, host, port
        self._subs: list[tuple[str, Handler]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._keepalive = keepalive
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean_session, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=8)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client

    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect and wait for the broker's answer; a refusal names the likely cause."""
        try:
            self._client.connect(self.host, self.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(
                f"cannot reach MQTT broker at {self.host}:{self.port} as {self.client_id!r}: "
                f"{exc}. Is the broker running and the address right?") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._refused or time.monotonic() > deadline:
                self._client.loop_stop()
                reason = self._refused or f"no answer within {timeout:.0f} s"
                raise TransportError(f"MQTT broker {self.host}:{self.port} refused "
                                     f"{self.client_id!r}: {reason}")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            client.disconnect()
            return
        with self._lock:
            subs = list(self._subs)
        for topic_filter, _ in subs:
            client.subscribe(topic_filter, qos=1)
        self._connected.set()
        log.debug("%s connected to %s:%s", self.client_id, self.host, self.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        if reason_code.is_failure:
            log.info("%s lost its broker connection (%s); reconnecting", self.client_id,
                     reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        self.stats.record(message.topic, message.payload, sent=False)
        with self._lock:
            handlers = [h for f, h in self._subs if mqtt.topic_matches_sub(f, message.topic)]
        for handler in handlers:
            try:
                handler(message.topic, message.payload)
            except Exception:  # a handler bug must not kill paho's network thread
                log.exception("handler for %s failed", message.topic)

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._subs.append((topic_filter, handler))
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop every handler of ``topic_filter`` here and at the broker (also after a
        reconnect, which re-subscribes only what is left)."""
        with self._lock:
            self._subs = [(f, h) for f, h in self._subs if f != topic_filter]
        if self._connected.is_set():
            self._client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self.stats.record(topic, payload, sent=True)
        with self._lock:
            self._pending = [p for p in self._pending if not _acknowledged(p)]
            self._pending.append(info)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every QoS-1 publish is acknowledged; False if some are still pending."""
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        while not all(_acknowledged(p) for p in pending):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.flush()
        self._client.disconnect()
        self._client.loop_stop()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT so the broker fires the Last Will (tests)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()


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

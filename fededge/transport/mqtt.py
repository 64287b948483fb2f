"""The paho-mqtt 2.x transport: QoS 1, TLS, credentials, Last Will, reconnect, byte counts."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from fededge.transport.base import Handler, Transport, TransportError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """Paths of the CA certificate and, for mutual TLS, this endpoint's certificate and key."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


class MqttTransport(Transport):
    """paho-mqtt 2.x client: QoS 1, automatic reconnect, resubscribe on every (re)connect.

    ``connect`` waits for the broker and fails naming the cause; ``start`` connects in the
    background and keeps trying with backoff (1 s doubling to ``max_delay``) for as long as
    the broker is away, for a party that must work without it (the edge agent serves its
    installed model meanwhile). ``connected``, ``since`` and ``problem`` say how it stands,
    and ``on_connected`` callbacks run after every (re)connect.

    Acknowledgements are tracked by message id through paho's ``on_publish`` callback, not
    through the ``MQTTMessageInfo`` that ``publish()`` returns: a publish made while
    disconnected gets ``rc == MQTT_ERR_NO_CONN``, paho keeps the message and re-sends it after
    the reconnect under the same mid, but never updates that rc, so ``is_published()`` and
    ``wait_for_publish()`` raise for it even once the broker has acknowledged it. The PUBACK
    of the re-sent message still calls ``on_publish`` with that mid (paho 2.x
    ``_handle_pubackcomp`` → ``_do_on_publish``), for a first send and a re-send alike.
    """

    def __init__(self, client_id: str, host: str, port: int, *, username: str | None = None,
                 password: str | None = None, tls: TlsConfig | None = None,
                 will: tuple[str, bytes] | None = None, keepalive: int = 20,
                 clean_session: bool = True, max_delay: int = 8) -> None:
        super().__init__()
        self.client_id, self.host, self.port = client_id, host, port
        self._subs: list[tuple[str, Handler]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._background = False       # start(): a refusal is retried, not final
        self._closed_early = False     # the broker hung up before it answered the login
        self.since = time.time()       # when `connected` last changed (wall clock)
        self.problem: str | None = None  # why the last attempt failed, while not connected
        self._listeners: list[Callable[[], None]] = []
        # mids of QoS-1 publishes the broker has not acknowledged yet, and acknowledgements
        # that arrived before publish() could record their mid: paho's network thread may
        # handle the PUBACK between paho's publish() returning and our recording it.
        self._acks = threading.Condition()
        self._unacked: set[int] = set()
        self._acked_early: set[int] = set()
        self._keepalive = keepalive
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=clean_session, protocol=mqtt.MQTTv311)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(min_delay=1, max_delay=max_delay)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
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
                reason = self._refused or (
                    "the broker closed the connection before accepting the login: it refuses "
                    "this client's certificate (revoked, issued by another CA, or not a TLS "
                    "client certificate)" if self._closed_early else
                    f"no answer within {timeout:.0f} s")
                raise TransportError(f"MQTT broker {self.host}:{self.port} refused "
                                     f"{self.client_id!r}: {reason}")
        return self

    def start(self) -> "MqttTransport":
        """Connect in the background and keep trying, with backoff, whenever the broker is
        away or refuses (``problem`` says why); returns at once."""
        self._background = True
        self.problem = "connecting"
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        return self

    def on_connected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` after every (re)connect, on paho's thread: it must not block
        (publishing is fine)."""
        self._listeners.append(callback)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = self.problem = f"refused: {reason_code}"
            if not self._background:
                client.disconnect()
            return
        with self._lock:
            subs = list(self._subs)
        for topic_filter, _ in subs:
            client.subscribe(topic_filter, qos=1)
        self.problem, self.since = None, time.time()
        self._connected.set()
        log.debug("%s connected to %s:%s", self.client_id, self.host, self.port)
        for callback in self._listeners:
            try:
                callback()
            except Exception:  # a listener bug must not kill paho's network thread
                log.exception("on_connected callback of %s failed", self.client_id)

    def _on_connect_fail(self, client, userdata) -> None:
        self.problem = f"cannot reach {self.host}:{self.port}"

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set():
            self.since, self.problem = time.time(), f"connection lost ({reason_code})"
        else:
            self._closed_early = True
            if self._background and self._refused is None:
                self.problem = ("the broker closed the connection during the login (is this "
                                "certificate revoked?)")
        self._connected.clear()
        if reason_code.is_failure:
            log.info("%s lost its broker connection (%s); reconnecting", self.client_id,
                     reason_code)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now (paho reconnects on its own)."""
        return self._connected.is_set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        """The broker acknowledged the QoS-1 publish ``mid`` (runs on paho's thread, which
        holds paho's message lock: take only our own lock here, never call into paho)."""
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self._acks.notify_all()
            else:
                self._acked_early.add(mid)

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
        with self._acks:  # not held across paho's publish(): its PUBACK handler takes it
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every QoS-1 publish made before this call is acknowledged by the broker,
        also one made while disconnected or cut off by a reconnect (paho re-sends it); False
        if some still are not after ``timeout`` seconds."""
        with self._acks:
            waiting = set(self._unacked)
            return self._acks.wait_for(lambda: not waiting & self._unacked, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Wait up to ``timeout`` s for unacknowledged publishes, then disconnect cleanly."""
        self.flush(timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT so the broker fires the Last Will (tests)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()

"""An MQTT connection as a kit's party or one of its role users: TLS with that user's client
certificate (its CN is the user name the broker applies the ACL to), plus the party's password
(what a broker without certificate identities, or the loopback plain listener, checks).

Apart from ``device`` (which needs torch) so that the edge agent, ``fededge deploy`` and the
training processes all log in the same way.
"""

from __future__ import annotations

import secrets
import threading

from fededge.config import MAX_PAYLOAD
from fededge.kits.kit import CA_FILE, Kit, KitError, login_files
from fededge.transport.base import TransportError
from fededge.transport.chunking import ChunkingTransport
from fededge.transport.mqtt import MqttTransport, TlsConfig
from fededge.wire.topics import role_user

CHUNK_BYTES = 128 * 1024
"""Between a kit's server and devices, payloads above this travel as chunks (a collected
student, a large consensus): within the tightest common broker limit (AWS IoT's 128 KB)."""
BACKGROUND_MAX_DELAY = 30
"""Seconds between reconnection attempts at most, for a party that runs without the broker
(the edge agent): soon enough after an outage, and not a connection storm during one."""


def connect(kit: Kit, *, role: str | None = None, will: tuple[str, bytes] | None = None,
            timeout: float = 10.0, background: bool = False) -> MqttTransport:
    """Connect as the kit's party, or as its ``role`` user (``topics.role_user``) for a second
    process of the same party; the broker forces the client id to the user name. With
    ``background``, return at once and keep (re)connecting with backoff
    (``MqttTransport.start``) instead of failing when the broker is away."""
    user = kit.broker.username if role is None else role_user(kit.broker.username, role)
    cert, key = (kit.path(name) for name in login_files(role))
    if not cert.is_file() or not key.is_file():
        raise KitError(f"{kit.directory}: no {cert.name} and {key.name}, the certificate of MQTT "
                       f"user {user!r} (kits provisioned before each user had its own lack "
                       "it); re-run `fededge provision FEDERATION.toml --out KITS`, which adds "
                       "it and keeps every other credential, and reload the broker")
    tls = TlsConfig(str(kit.path(CA_FILE)), str(cert), str(key))
    transport = MqttTransport(user, kit.broker.host, kit.broker.port, username=user,
                              password=kit.password(), tls=tls, will=will,
                              max_delay=BACKGROUND_MAX_DELAY if background else 8)
    return transport.start() if background else transport.connect(timeout)


def connect_chunked(kit: Kit, *, will: tuple[str, bytes] | None = None,
                    timeout: float = 10.0) -> tuple[MqttTransport, ChunkingTransport]:
    """The federation connection of a kit's server or device: payloads above ``CHUNK_BYTES``
    as validated chunks (``transport.chunking``); the MQTT connection underneath, too."""
    mqtt = connect(kit, will=will, timeout=timeout)
    return mqtt, ChunkingTransport(mqtt, CHUNK_BYTES, max_message=MAX_PAYLOAD)


def read_retained(transport: MqttTransport, filters: list[str], sync_topic: str,
                  timeout: float) -> dict[str, bytes]:
    """Every non-empty retained message below ``filters``, by topic.

    The broker sends retained messages right after a SUBSCRIBE and handles one client's packets
    in order, so once a message published to ``sync_topic`` *after* subscribing comes back,
    every retained message has arrived (the user must be allowed to read and write it)."""
    seen: dict[str, bytes] = {}
    synced = threading.Event()
    marker = secrets.token_hex(8).encode()

    def on_message(topic: str, payload: bytes) -> None:
        if topic == sync_topic:
            if payload == marker:
                synced.set()
        elif payload:
            seen[topic] = payload
        else:
            seen.pop(topic, None)
    for topic_filter in (*filters, sync_topic):
        transport.subscribe(topic_filter, on_message)
    transport.publish(sync_topic, marker)
    if not synced.wait(timeout):
        raise TransportError(f"no answer from the broker within {timeout:.0f} s while reading "
                             f"{', '.join(filters)}; check that {transport.client_id} may read "
                             f"them and write {sync_topic} (re-provision the broker kit)")
    for topic_filter in (*filters, sync_topic):
        transport.unsubscribe(topic_filter)
    return seen

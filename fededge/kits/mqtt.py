"""An MQTT connection as a kit's party: TLS with its client certificate, and its password.

Apart from ``runner`` (which needs torch) so that the edge agent, ``fededge deploy`` and the
training processes all log in the same way.
"""

from __future__ import annotations

from fededge.kits.kit import CA_FILE, CERT_FILE, KEY_FILE, Kit
from fededge.transport.mqtt import MqttTransport, TlsConfig
from fededge.wire.topics import role_user


def connect(kit: Kit, *, role: str | None = None,
            will: tuple[str, bytes] | None = None, timeout: float = 10.0) -> MqttTransport:
    """Connect as the kit's party, or as its ``role`` user (``topics.role_user``) for a second
    process of the same party; the broker forces the client id to the user name."""
    user = kit.broker.username if role is None else role_user(kit.broker.username, role)
    tls = TlsConfig(str(kit.path(CA_FILE)), str(kit.path(CERT_FILE)), str(kit.path(KEY_FILE)))
    return MqttTransport(user, kit.broker.host, kit.broker.port, username=user,
                         password=kit.password(), tls=tls, will=will).connect(timeout)

"""Topic names, party ids and MQTT user names: plain strings, standard library only.

Split out of ``protocol`` (which needs numpy and safetensors for payloads) because the edge
agent runs on devices with neither: it still has to name its deploy and status topics and
check the ids it turns into topic levels and directory names.
"""

from __future__ import annotations

from dataclasses import dataclass

from fededge.errors import FedEdgeError
from fededge.names import ID_RULE, is_id

SERVER_ID = "server"
AGENT_ROLE, DEPLOY_ROLE, LOCK_ROLE = "agent", "deploy", "lock"
ROLE_SEPARATOR = "@"
"""Never part of an id, so ``<party>@<role>`` cannot collide with another party's name."""

MAX_CHUNKS = 500
"""Chunk topics of one bundle at most (``delivery`` refuses more). A subscriber gets every
retained chunk at once, and Mosquitto drops QoS-1 messages past a client's queue (at least
1000 in fededge's conf; ``mosquitto_files.queue_size``): keep a bundle well below that."""

class ProtocolError(FedEdgeError, ValueError):
    """A payload or topic that breaks the protocol; the message is the logged rejection reason."""


def validate_id(value: str, what: str = "device id") -> str:
    """Ids become MQTT topic levels and file names, so wildcards, slashes and spaces are banned."""
    if not is_id(value):
        raise ProtocolError(f"invalid {what} {value!r:.80}: use {ID_RULE}")
    return value


def role_user(party: str, role: str) -> str:
    """The MQTT user a party's second process connects as (``pi5@agent``, ``server@deploy``).

    Mosquitto forces the client id to the user name (``use_username_as_clientid``), so two
    processes sharing one user would keep disconnecting each other: a device's training client
    and its edge agent, or ``fededge deploy`` and a running server, each need their own user.
    """
    return f"{party}{ROLE_SEPARATOR}{role}"


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation; a device writes only below its own ``<device>`` level."""

    federation: str

    def __post_init__(self) -> None:
        validate_id(self.federation, "federation name")

    @property
    def root(self) -> str:
        return f"fededge/{self.federation}"

    @property
    def config(self) -> str:
        return f"{self.root}/config"

    @property
    def round(self) -> str:
        return f"{self.root}/round"

    @property
    def consensus(self) -> str:
        return f"{self.root}/consensus"

    def up(self, device: str) -> str:
        return f"{self.root}/up/{device}"

    def presence(self, device: str) -> str:
        return f"{self.root}/presence/{device}"

    @property
    def all_up(self) -> str:
        return f"{self.root}/up/+"

    @property
    def all_presence(self) -> str:
        return f"{self.root}/presence/+"

    def device_of(self, topic: str) -> str | None:
        """The device a per-device topic belongs to, or None for federation-wide topics."""
        for branch in ("up", "presence"):
            prefix = f"{self.root}/{branch}/"
            if topic.startswith(prefix):
                return topic[len(prefix):]
        return None

    # Model delivery (``fededge deploy`` → ``fededge agent``). The signed descriptor of a
    # device's current bundle sits retained on ``deploy/<device>``; each chunk is retained on
    # its own topic (a topic retains one message) below the bundle's version.

    @property
    def all_deploy(self) -> str:
        return f"{self.root}/deploy/#"

    def deploy(self, device: str) -> str:
        return f"{self.root}/deploy/{device}"

    def deploy_tree(self, device: str) -> str:
        """The descriptor and every chunk of every version for ``device``."""
        return f"{self.deploy(device)}/#"

    def deploy_chunks(self, device: str, version: str) -> str:
        return f"{self.deploy(device)}/{version}/+"

    def deploy_chunk(self, device: str, version: str, index: int) -> str:
        return f"{self.deploy(device)}/{version}/{index}"

    @property
    def deploy_sync(self) -> str:
        """A topic no device reads (ids start with a letter or digit); ``fededge deploy``
        echoes a message through it to know the broker has sent every retained message."""
        return f"{self.root}/deploy/.sync"

    @property
    def server_claim(self) -> str:
        """The running server's retained claim (``kits.lock``): one server per federation."""
        return f"{self.root}/server"

    @property
    def server_claim_sync(self) -> str:
        """Where the lock's probe echoes a marker to know the retained claim has arrived."""
        return f"{self.server_claim}/.sync"

    def agent_status(self, device: str) -> str:
        """The edge agent's retained report. One level below the device's presence topic, so
        the training client's presence (and the server, which reads ``presence/+``) never
        sees it."""
        return f"{self.presence(device)}/{AGENT_ROLE}"

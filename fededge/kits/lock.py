"""One server per federation: a retained claim on the broker, checked before a server logs in.

Every server of a kit logs in as the MQTT user ``server``, and the broker forces the client id
to the user name, so a second server takes over the first one's session, whose reconnect takes
it back a second later, forever, without an error. Mosquitto also publishes the Last Will of a
session it takes over, so the check cannot be made as ``server`` without disturbing the server
it is looking for. Hence:

1. ``check``: log in as ``server@lock`` (its own certificate; it may only read the claim), read
   the retained claim on ``fededge/<fed>/server`` and refuse, naming the other server, when one
   holds it. A claim of a process of this host that no longer runs (killed before the broker
   noticed) does not count.
2. ``claim``: the server logs in as ``server`` with a Last Will that clears the claim (an
   empty retained message), publishes its claim (run, host, pid, since), retained, and again
   after every reconnect (a restarted broker has lost it); ``release`` clears it when the
   server stops.

Two servers started within the same second could both pass step 1: this guards against a
mistake, it is not a consensus protocol.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from dataclasses import asdict, dataclass

from fededge.errors import FedEdgeError
from fededge.kits.kit import Kit
from fededge.kits.mqtt import connect, read_retained
from fededge.transport.mqtt import MqttTransport
from fededge.wire.topics import LOCK_ROLE, Topics

WILL_DELAY_S = 30
"""How long the broker may take to notice a server that vanished without closing its
connection: 1.5 times the keep-alive (20 s) of every fededge connection."""


class ServerLockError(FedEdgeError, RuntimeError):
    """Another server runs this federation; the message names it and what to do."""


@dataclass(frozen=True)
class Claim:
    """Who runs the federation."""

    run_id: str
    host: str
    pid: int
    since: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, payload: bytes) -> Claim | None:
        """The claim in a retained payload; None for an empty or unreadable one."""
        try:
            raw = json.loads(payload)
            return cls(str(raw["run_id"]), str(raw["host"]), int(raw["pid"]), str(raw["since"]))
        except (ValueError, TypeError, KeyError):
            return None

    @property
    def stale(self) -> bool:
        """A claim of this host whose process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: it runs
            return False
        return False


def holder(kit: Kit, timeout: float = 10.0) -> Claim | None:
    """The claim of the server running the federation of server kit ``kit``, if any."""
    topics = Topics(kit.federation)
    transport = connect(kit, role=LOCK_ROLE, timeout=timeout)
    try:
        retained = read_retained(transport, [topics.server_claim], topics.server_claim_sync,
                                 timeout)
    finally:
        transport.close()
    return Claim.parse(retained.get(topics.server_claim, b""))


def check(kit: Kit) -> None:
    """Raise ``ServerLockError`` if another server runs this federation."""
    claim = holder(kit)
    if claim is None or claim.stale:
        return
    raise ServerLockError(
        f"another server of federation {kit.federation!r} is running: run {claim.run_id} on "
        f"host {claim.host!r} (pid {claim.pid}) since {claim.since}; a federation has one "
        f"server: stop that one first. If it was killed, the broker clears its claim once it "
        f"notices, within {WILL_DELAY_S} s")


def will(kit: Kit) -> tuple[str, bytes]:
    """The Last Will of the server's connection: it clears the claim."""
    return Topics(kit.federation).server_claim, b""


def claim(transport: MqttTransport, kit: Kit, run_id: str) -> Claim:
    """Publish this server's claim, retained, now and after every reconnect."""
    held = Claim(run_id, socket.gethostname(), os.getpid(),
                 dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    topic = Topics(kit.federation).server_claim

    def publish() -> None:
        transport.publish(topic, held.encode(), retain=True)
    transport.on_connected(publish)
    publish()
    return held


def release(transport: MqttTransport, kit: Kit) -> None:
    """Clear the claim (the server is stopping)."""
    transport.publish(Topics(kit.federation).server_claim, b"", retain=True)

"""Mosquitto's own files for one federation: password file, ACL and ``mosquitto.conf`` (from
``templates/mosquitto.conf.in``). Text in, text out; no I/O, so provisioning decides where they go
and tests can read them directly.

Only MQTT 3.1.1 features and stock Mosquitto 2 options are used, so a cluster (``broker/``)
can take over with the same topics and rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass

from fededge.config import MAX_PAYLOAD, FederationConfig
from fededge.kits.kit import party_roles
from fededge.kits.render import render, when
from fededge.wire.topics import (
    AGENT_ROLE,
    DEPLOY_ROLE,
    LOCK_ROLE,
    MAX_CHUNKS,
    SERVER_ID,
    Topics,
    role_user,
    validate_id,
)

# Mosquitto 2's ``$7$`` password hash: PBKDF2-HMAC-SHA512 with these parameters is what
# ``mosquitto_passwd`` writes (mosquitto 2.0 src/password_mosq.c), so files are byte-compatible
# in format and the broker verifies them without the tool being installed.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
DEFAULT_QUEUE = 1000
MAX_PACKET_SIZE = MAX_PAYLOAD + 64 * 1024  # payload limit plus topic and headers
CONF_NAME, PASSWD_NAME, ACL_NAME = "mosquitto.conf", "passwd", "acl"
CA_NAME, CERT_NAME, KEY_NAME = "ca.crt", "broker.crt", "broker.key"
CRL_NAME = "crl.pem"  # the revoked certificates (provision --revoke), checked at every handshake


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The ``$7$<iterations>$<salt>$<hash>`` string Mosquitto 2 stores after ``user:``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS, HASH_BYTES)
    return (f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_password(password: str, stored: str) -> bool:
    """True if ``stored`` (a ``$7$`` hash) was made from ``password``."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(want))
    return hmac.compare_digest(got, want)


def parse_passwd(text: str) -> dict[str, str]:
    """``user -> stored hash`` of a Mosquitto password file (blank and ``#`` lines skipped)."""
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, stored = line.split(":", 1)
            entries[user] = stored
    return entries


def render_passwd(passwords: dict[str, str], previous: dict[str, str]) -> str:
    """A password file for ``user -> password``. A previous hash that still matches is kept,
    so re-provisioning leaves existing users' lines byte-identical."""
    lines = []
    for user in sorted(passwords):
        stored = previous.get(user, "")
        if not check_password(passwords[user], stored):
            stored = hash_password(passwords[user])
        lines.append(f"{user}:{stored}")
    return "\n".join(lines) + "\n"


def broker_users(passwords: dict[str, str], agents: Collection[str] = ()) -> dict[str, str]:
    """Every MQTT user of a federation from its parties' passwords: each party, plus its role
    users (``kit.party_roles``: ``server@deploy`` for ``fededge deploy``, ``server@lock`` for the
    one-server check, ``<device>@agent`` for each device's edge agent), which log in with their
    party's password. An agent-only device (in ``agents``) gets only its ``<device>@agent``
    user: it never trains."""
    users = {party: password for party, password in passwords.items() if party not in agents}
    for party, password in passwords.items():
        users.update({role_user(party, role): password for role in party_roles(party)})
    return users


def render_acl(federation: str, devices: list[str], agents: Collection[str] = ()) -> str:
    """Per-user topic rules; Mosquitto denies whatever a user's block does not grant.

    Explicit ``user`` blocks rather than one ``%u`` pattern: the server gets different rights
    from devices, and revoking a device removes its blocks, so the ACL alone locks it out.
    ``devices`` train; ``agents`` (agent-only devices) get only their edge agent's block.
    """
    t = Topics(federation)
    shared = (t.config, t.round, t.consensus)
    out = [
        f"# Topic ACL of fededge federation {federation!r}, written by `fededge provision`.",
        "# Re-run provision instead of editing. Everything not granted here is denied.",
        "# Devices read the federation-wide topics and write only their own upload and presence",
        "# topics (the broker publishes a device's Last Will on its presence topic, which needs",
        "# that write). The server reads every upload and presence, writes the shared topics.",
        "# Model delivery: `fededge deploy` (server@deploy) writes the deploy topics and reads the",
        "# agents' reports; each device's edge agent (<device>@agent) reads only its own deploy",
        "# topics and writes only its own report. Agent-only devices (no training) have only",
        "# that agent user. The running server holds a retained claim (one server per",
        "# federation), which server@lock reads before a server connects.",
        "",
        f"user {SERVER_ID}",
        f"topic read {t.all_up}",
        f"topic read {t.all_presence}",
        *(f"topic write {topic}" for topic in shared),
        f"topic readwrite {t.server_claim}",
        "",
        f"user {role_user(SERVER_ID, DEPLOY_ROLE)}",
        f"topic readwrite {t.all_deploy}",
        f"topic read {t.agent_status('+')}",
        "",
        f"user {role_user(SERVER_ID, LOCK_ROLE)}",
        f"topic read {t.server_claim}",
        f"topic readwrite {t.server_claim_sync}",
    ]
    for device in sorted({*devices, *agents}):
        if device not in agents:
            out += ["", f"user {device}", *(f"topic read {topic}" for topic in shared),
                    f"topic write {t.up(device)}", f"topic write {t.presence(device)}"]
        out += ["", f"user {role_user(device, AGENT_ROLE)}",
                f"topic read {t.deploy_tree(device)}",
                f"topic write {t.agent_status(device)}"]
    return "\n".join(out) + "\n"


def refreshes_per_attempt(config: FederationConfig) -> int:
    """An upper bound on how often the server reminds the devices while one round attempt is
    open: once per ``resend_s`` (by default a quarter of ``deadline_s``). server.py ``_pump``
    doubles the interval each time, but devices that keep reminding can make it re-publish
    the consensus and the announcement as often as once per ``resend_s``."""
    return math.ceil(config.deadline_s / (config.resend_s or config.deadline_s / 4))


def messages_per_round(config: FederationConfig) -> int:
    """What one round can send a party, at most: per attempt an announcement, an upload and 3
    messages (nudge, consensus, announcement) per reminder; then a consensus, metrics, a
    presence."""
    return config.max_attempts * (2 + 3 * refreshes_per_attempt(config)) + 3


def queue_size(config: FederationConfig, devices: int, agents: int = 0) -> int:
    """``max_queued_messages`` that holds every message one client could be sent.

    Rounds: every round's messages (``messages_per_round``) of the whole federation, for every
    party that trains (``devices`` and the server; agent-only devices take no part). Deploy:
    ``fededge deploy`` reads every device's retained bundle (at most ``MAX_CHUNKS`` chunks and a
    descriptor) at once, for training and agent-only devices alike. Both doubled as a margin.
    """
    rounds = 2 * (devices + 1) * (config.rounds + 1) * messages_per_round(config)
    deploy = 2 * (devices + agents) * (MAX_CHUNKS + 1)
    return max(DEFAULT_QUEUE, rounds, deploy)


_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")


def is_host(value: object) -> bool:
    """An address a listener can bind or a client dial: an IP address or a host name."""
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return len(value) <= 253 and _HOST_RE.fullmatch(value) is not None


def is_system_user(value: object) -> bool:
    """A name Mosquitto can switch to (``user``): a POSIX user name, as useradd takes it."""
    return isinstance(value, str) and _USER_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class ConfSettings:
    config: FederationConfig  # the federation's name and what sizes its queues
    bind: str
    tls_port: int
    plain_port: int        # 0: no plain listener
    devices: int           # devices that train
    agents: int = 0        # agent-only devices
    user: str = "mosquitto"

    def __post_init__(self) -> None:
        """The strings written into mosquitto.conf, each one token to Mosquitto (the federation
        file is checked the same way, naming the line; numbers are rendered as numbers)."""
        validate_id(self.config.federation, "federation name")
        if not is_host(self.bind):
            raise ValueError(f"bind {self.bind!r} is no IP address or host name")
        if not is_system_user(self.user):
            raise ValueError(f"user {self.user!r} is no system user name")


def render_conf(s: ConfSettings) -> str:
    c = s.config
    return render(
        "mosquitto.conf.in", federation=c.federation, user=s.user, passwd_file=PASSWD_NAME,
        acl_file=ACL_NAME, tls_port=s.tls_port, bind=s.bind, ca_file=CA_NAME, crl_file=CRL_NAME,
        cert_file=CERT_NAME, key_file=KEY_NAME, if_plain=when(bool(s.plain_port)),
        if_not_plain=when(not s.plain_port), plain_port=s.plain_port, devices=s.devices,
        rounds=c.rounds, messages_per_round=messages_per_round(c), max_attempts=c.max_attempts,
        refreshes=refreshes_per_attempt(c), deadline_s=f"{c.deadline_s:g}", agents=s.agents,
        max_chunks=MAX_CHUNKS, min_queued_messages=DEFAULT_QUEUE,
        max_queued_messages=queue_size(c, s.devices, s.agents), max_packet_size=MAX_PACKET_SIZE)

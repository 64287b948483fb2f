"""Mosquitto's own files for one federation: password file, ACL and ``mosquitto.conf``. Text in,
text out; no I/O, so provisioning decides where they go and tests can read them directly.

Only MQTT 3.1.1 features and stock Mosquitto 2 options are used, so a cluster (``broker/``)
can take over with the same topics and rules.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass

from fededge.config import MAX_PAYLOAD, FederationConfig
from fededge.wire.topics import AGENT_ROLE, DEPLOY_ROLE, MAX_CHUNKS, SERVER_ID, Topics, role_user

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
    """Every MQTT user of a federation from its parties' passwords: each party, plus
    ``server@deploy`` for ``fededge deploy`` and ``<device>@agent`` for each device's edge
    agent (see ``topics.role_user``), which log in with their party's password. An agent-only
    device (in ``agents``) gets only its ``<device>@agent`` user: it never trains."""
    users = {party: password for party, password in passwords.items() if party not in agents}
    for party, password in passwords.items():
        users[role_user(party, DEPLOY_ROLE if party == SERVER_ID else AGENT_ROLE)] = password
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
        "# that agent user.",
        "",
        f"user {SERVER_ID}",
        f"topic read {t.all_up}",
        f"topic read {t.all_presence}",
        *(f"topic write {topic}" for topic in shared),
        "",
        f"user {role_user(SERVER_ID, DEPLOY_ROLE)}",
        f"topic readwrite {t.all_deploy}",
        f"topic read {t.agent_status('+')}",
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
    """How often the server re-publishes its retained state while one round attempt is open
    (every ``resend_s``, by default a quarter of ``deadline_s``; server.py ``_pump``)."""
    return math.ceil(config.deadline_s / (config.resend_s or config.deadline_s / 4))


def messages_per_round(config: FederationConfig) -> int:
    """What one round can send a party: per attempt an announcement, an upload and 3 messages
    (config, consensus, announcement) per re-publish; then a consensus, metrics, a presence."""
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


@dataclass(frozen=True)
class ConfSettings:
    config: FederationConfig  # the federation's name and what sizes its queues
    bind: str
    tls_port: int
    plain_port: int        # 0: no plain listener
    devices: int           # devices that train
    agents: int = 0        # agent-only devices
    user: str = "mosquitto"


def render_conf(s: ConfSettings) -> str:
    c = s.config
    queued = queue_size(c, s.devices, s.agents)
    refreshes = refreshes_per_attempt(c)
    plain = ([
        "# Plain (unencrypted) listener, asked for with [broker] plain_port: loopback only, for",
        "# tools on this machine. Passwords and the ACL still apply.",
        f"listener {s.plain_port} 127.0.0.1",
        "use_username_as_clientid true",
        "",
    ] if s.plain_port else [
        "# No plain listener: add [broker] plain_port to the federation file for a loopback one.",
        "",
    ])
    return "\n".join([
        f"# Mosquitto 2 configuration of fededge federation {c.federation!r}, written by",
        "# `fededge provision`. Re-run provision instead of editing (credentials are kept).",
        "#",
        "# Paths are relative to the directory mosquitto runs in: `fededge broker --kit DIR`",
        "# copies DIR to a private runtime directory and starts mosquitto there (SIGHUP to",
        "# `fededge broker` re-copies the password file and ACL and makes mosquitto reload them).",
        "#",
        "# Privileges: started as root, mosquitto switches to `user` BEFORE it opens the password",
        "# file, the ACL and the TLS key, which provision writes 0600 for the provisioning user.",
        "# Rather than run a network daemon as root, `fededge broker --kit` started as root gives",
        f"# its runtime copy to {s.user!r}; started as any other user, mosquitto ignores `user`",
        "# and reads the files as that user.",
        f"user {s.user}",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {PASSWD_NAME}",
        f"acl_file {ACL_NAME}",
        "# Listener options (use_username_as_clientid below) must follow a `listener` line:",
        "# set before the first one they would configure, and open, a default listener on 1883.",
        "",
        "# TLS listener. Clients present a certificate signed by the federation CA and their",
        "# password: two independent factors, and revoking the password locks a device out.",
        f"listener {s.tls_port} {s.bind}",
        "# The MQTT client id is forced to the user name: one device cannot take over another",
        "# device's session by reusing its client id.",
        "use_username_as_clientid true",
        f"cafile {CA_NAME}",
        f"certfile {CERT_NAME}",
        f"keyfile {KEY_NAME}",
        "require_certificate true",
        "use_identity_as_username false",
        "",
        *plain,
        "# Mosquitto silently drops QoS-1 messages beyond max_queued_messages per client (its",
        "# default of 1000 delivered 1,668 of 2,000 in a burst here). Sized to hold everything one",
        "# client can be sent in this federation, the larger of:",
        f"# - rounds: 2 x ({s.devices} training devices + server) x ({c.rounds} rounds + 1) x "
        f"{messages_per_round(c)}",
        f"#   messages per round: {c.max_attempts} attempts x (announcement + upload + 3 x "
        f"{refreshes} re-publishes",
        f"#   of config, consensus and announcement: one every resend_s while the attempt's "
        f"{c.deadline_s:g} s",
        "#   deadline runs) + consensus, metrics, presence;",
        f"# - deploy: 2 x ({s.devices} training + {s.agents} agent-only devices) x "
        f"({MAX_CHUNKS} chunks + descriptor),",
        "#   the retained bundles `fededge deploy` reads at once;",
        "# and at least 1000. Re-provisioning resizes it.",
        f"max_queued_messages {queued}",
        "max_queued_bytes 0",
        "# fededge's payload limit (protocol.MAX_PAYLOAD) plus headers; larger packets are",
        "# refused by the broker before they reach anyone.",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "",
        "# Retained config/round live in memory; the server republishes them when it starts.",
        "persistence false",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
        "",
    ])

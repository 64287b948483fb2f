"""Provisioning, kits, the secured Mosquitto broker, and local differential privacy.

Broker tests run a real Mosquitto from a provisioned kit on a free loopback port (never 1883),
started through `fededge broker --kit` like an operator would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import requires_mosquitto
from kit_helpers import (
    AGENT,
    DEVICES,
    EXAMPLE,
    REPO,
    Processes,
    collect,
    connect_party,
    federation_file,
    has_mosquitto,
)
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.config import ConfigError, FederationConfig
from fededge.kits import mosquitto as mq
from fededge.kits import pki
from fededge.kits.fedfile import FederationFileError
from fededge.kits.kit import load_kit, login_files
from fededge.kits.manifest import verify_manifest, write_manifest
from fededge.kits.provision import provision
from fededge.learn.privacy import (
    LocalPrivacy,
    clip_rows,
    delta_for,
    epsilon_for,
    privacy_report,
    release_mu,
)
from fededge.transport.base import TransportError
from fededge.transport.brokers import free_port, mosquitto_binary, wait_for_port
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- provisioning

def test_example_provisions_as_is(tmp_path):
    kits = tmp_path / "kits"
    result = CliRunner().invoke(app, ["provision", str(EXAMPLE), "--out", str(kits)])
    assert result.exit_code == 0, result.output
    students = {load_kit(kits / d).student for d in DEVICES}
    assert {load_kit(kits / d).profile for d in DEVICES} == {
        "pi-5-8gb", "jetson-orin-nano-8gb", "x86-gateway"} and students

    for kit in [*DEVICES, "server"]:
        loaded = load_kit(kits / kit)
        assert loaded.broker.host == "127.0.0.1" and loaded.broker.username == kit
        assert loaded.dataset.proxy_sha256 == loaded.config["proxy_sha256"]
        cert = pki.Identity.load(kits / kit / "client.crt", kits / kit / "client.key").cert
        assert pki.common_name(cert) == kit
        for secret in ("password", "client.key"):
            assert _mode(kits / kit / secret) == 0o600, (kit, secret)
        assert (kits / kit / "start.sh").stat().st_mode & stat.S_IXUSR
        unit = (kits / kit / f"fededge-{'server' if kit == 'server' else 'client'}.service")
        assert "ExecStart=" in unit.read_text()
    for secret in ("ca/ca.key", "broker/passwd", "broker/broker.key"):
        assert _mode(kits / secret) == 0o600, secret
    assert not (kits / "broker" / "ca.key").exists()
    assert load_kit(kits / "server").devices == DEVICES

    conf = (kits / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "require_certificate true" in conf
    assert re.search(r"^listener 8883 127\.0\.0\.1$", conf, re.M)
    assert len(re.findall(r"^listener ", conf, re.M)) == 1  # no plain listener unless asked
    before_listener = conf[:conf.index("\nlistener ")]
    per_listener = ("use_username_as_clientid", "cafile", "certfile", "keyfile", "protocol",
                    "require_certificate", "use_identity_as_username", "max_connections")
    assert not [o for o in per_listener if re.search(rf"^{o} ", before_listener, re.M)], \
        "a listener option before the first listener opens a default listener on 1883"
    with_plain = mq.render_conf(mq.ConfSettings(FederationConfig(), "0.0.0.0", 8883, 1884, 3))
    assert re.findall(r"^listener .*$", with_plain, re.M) == ["listener 8883 0.0.0.0",
                                                              "listener 1884 127.0.0.1"]
    assert with_plain.count("\nuse_username_as_clientid true") == 2  # one per listener
    queued = int(re.search(r"^max_queued_messages (\d+)$", conf, re.M).group(1))
    config = FederationConfig.from_dict(load_kit(kits / "server").config)
    assert queued == mq.queue_size(config, len(DEVICES), 1) >= 1000
    passwd = mq.parse_passwd((kits / "broker" / "passwd").read_text())
    # Each party's second process (deploy, agent) is its own user with the party's password;
    # the agent-only device has only its agent user.
    assert set(passwd) == {*DEVICES, "server", "server@deploy", "server@lock",
                           *(f"{d}@agent" for d in (*DEVICES, AGENT))}
    for kit, user in [*((d, f"{d}@agent") for d in DEVICES), ("server", "server@deploy")]:
        for name in (kit, user):
            assert mq.check_password((kits / kit / "password").read_text().strip(), passwd[name])
    # The broker takes a certificate's CN as the user name: every user has its own certificate.
    logins = {(party, role) for party in DEVICES for role in (None, "agent")} | {
        (AGENT, "agent"), ("server", None), ("server", "deploy"), ("server", "lock")}
    for party, role in logins:
        cert_file, key_file = login_files(role)
        cert = pki.Identity.load(kits / party / cert_file, kits / party / key_file).cert
        assert pki.common_name(cert) == (party if role is None else f"{party}@{role}")
        assert pki.usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
        assert _mode(kits / party / key_file) == 0o600
    assert not (kits / AGENT / "client.crt").exists()  # agent-only: no training login
    assert "use_identity_as_username true\n" in conf and "crlfile crl.pem\n" in conf
    assert pki.revoked_serials((kits / "broker" / "crl.pem").read_bytes()) == []
    acl = (kits / "broker" / "acl").read_text()
    assert "topic write fededge/demo/up/jetson-lab\n" in acl
    block = acl.split("user jetson-lab\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic read fededge/demo/config", "topic read fededge/demo/round",
                     "topic read fededge/demo/consensus", "topic write fededge/demo/up/jetson-lab",
                     "topic write fededge/demo/presence/jetson-lab"]
    check = verify_manifest(kits)
    assert (check.checked, check.problems) == (
        len(json.loads((kits / "manifest.json").read_text())["files"]), [])
    verified = CliRunner().invoke(app, ["verify-kit", str(kits / "jetson-lab")])
    assert verified.exit_code == 0 and "match" in verified.output


def test_queue_size_counts_training_devices_republishes_and_deploys():
    config = FederationConfig(rounds=100, max_attempts=3, deadline_s=120.0)  # resend every 30 s
    # Per attempt: announcement, upload, and 4 re-publishes of config, consensus, announcement.
    assert mq.messages_per_round(config) == 3 * (2 + 3 * 4) + 3
    assert mq.messages_per_round(config.replace(resend_s=7.0)) == 3 * (2 + 3 * 18) + 3
    assert mq.queue_size(config, 50) == 2 * 51 * 101 * 45  # grows with the federation
    assert mq.queue_size(config, 50, 7) == mq.queue_size(config, 50)  # agents send no rounds
    small = FederationConfig(rounds=2)
    # `fededge deploy` reads every device's retained bundle (up to 500 chunks + descriptor).
    assert mq.queue_size(small, 1) == 2 * 501 > 2 * 2 * 3 * 45
    assert mq.queue_size(small, 1, 9) == 2 * 10 * 501
    conf = mq.render_conf(mq.ConfSettings(config, "0.0.0.0", 8883, 0, 50, 7))
    assert f"max_queued_messages {2 * 51 * 101 * 45}\n" in conf
    assert "3 attempts x (announcement + upload + 3 x 4 re-publishes" in conf


def test_password_file_is_mosquitto_compatible(tmp_path):
    stored = mq.hash_password("s3cret")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", stored)
    assert mq.check_password("s3cret", stored) and not mq.check_password("other", stored)
    tool = shutil.which("mosquitto_passwd")
    if tool:  # the reverse direction: a hash written by Mosquitto's own tool
        subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True)
        assert mq.check_password("s3cret", mq.parse_passwd((tmp_path / "pw").read_text())["alice"])


@pytest.mark.parametrize("old, new, words", [
    ('profile = "x86-gateway"', 'profile = "pi-9"', ["gateway-1", "unknown device profile 'pi-9'"]),
    ('id = "jetson-lab"', 'id = "pi5-kitchen"', ["duplicate device id 'pi5-kitchen'"]),
    ("tls_port = 8883", "tls_port = 70000", ["tls_port: input should be less than or equal to 65535, got 70000"]),
    ("rounds = 10", "rounds = 0", ["'rounds': input should be greater than or equal to 1"]),
    ('profile = "pi-5-8gb"', 'proifle = "pi-5-8gb"', ["unknown key 'proifle'"]),
    ('role = "agent"', 'role = "server"', ["role: input should be 'client' or 'agent'"]),
    ('model_from = "pi5-kitchen"', 'model_from = "nobody"',
     ["zero-kiosk", "model_from 'nobody' is no device of this file"]),
    ('model_from = "pi5-kitchen"', 'model_from = "zero-kiosk"', ["is the device itself"]),
    ('id = "gateway-1"', 'model_from = "jetson-lab"\nid = "gateway-1"',
     ["gateway-1", 'model_from is for agent-only devices; add role = "agent"']),
    ('model_from = "pi5-kitchen"', 'student = "cnn-xs"',
     ["zero-kiosk", "an agent-only device runs the student of its model_from device"]),
])
def test_bad_federation_file_names_the_line(tmp_path, old, new, words):
    text = EXAMPLE.read_text().replace(old, new)
    first = new.splitlines()[0]
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.startswith(first)]
    line = lines[-1]  # a duplicate is reported where it repeats, naming the first use
    path = tmp_path / "federation.toml"
    path.write_text(text)
    with pytest.raises(FederationFileError) as err:
        provision(path, tmp_path / "kits")
    assert f"{path} line {line}:" in str(err.value)
    for word in words + ([f"first used on line {lines[0]}"] if len(lines) > 1 else []):
        assert word in str(err.value)
    result = CliRunner().invoke(app, ["provision", str(path), "--out", str(tmp_path / "k")])
    assert result.exit_code == 2
    assert result.output.startswith("error:") and f"line {line}:" in result.output


def _credentials(kits: Path, party: str, role: str | None = None) -> dict[str, bytes]:
    """The password and the certificate and key of the party's login (or its role user's)."""
    return {name: (kits / party / name).read_bytes()
            for name in ("password", *login_files(role))}


def test_reprovision_adds_a_device_and_keeps_everyone_elses_credentials(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path), kits)
    before = {p: _credentials(kits, p) for p in [*DEVICES, "server"]}
    broker_before = {n: (kits / "broker" / n).read_bytes() for n in ("broker.crt", "broker.key")}
    ca_before = (kits / "ca" / "ca.key").read_bytes()
    passwd_before = mq.parse_passwd((kits / "broker" / "passwd").read_text())

    result = provision(federation_file(tmp_path, extra_device=True), kits)
    assert {d.id: d.status for d in result.devices} == {
        **dict.fromkeys((*DEVICES, AGENT), "kept"), "pi4-garage": "new"}
    assert {p: _credentials(kits, p) for p in [*DEVICES, "server"]} == before
    assert {n: (kits / "broker" / n).read_bytes() for n in broker_before} == broker_before
    assert (kits / "ca" / "ca.key").read_bytes() == ca_before
    passwd = mq.parse_passwd((kits / "broker" / "passwd").read_text())
    assert {u: passwd[u] for u in passwd_before} == passwd_before  # lines byte-identical
    assert "pi4-garage" in passwd and "user pi4-garage" in (kits / "broker" / "acl").read_text()
    assert load_kit(kits / "server").devices == (*DEVICES, "pi4-garage")
    assert verify_manifest(kits).problems == []


@pytest.fixture
def inference_only_catalog(tmp_path, monkeypatch):
    """The shipped profiles, but the Pi Zero 2 W cannot train (none shipped can) and may run
    students up to 40,000 parameters."""
    catalog = tmp_path / "devices"
    shutil.copytree(REPO / "devices", catalog, ignore=shutil.ignore_patterns("install*"))
    zero = catalog / "pi-zero-2w.toml"
    zero.write_text(re.sub(r"(?m)^can_train = true", "can_train = false",
                           zero.read_text().replace("max_params = 4000", "max_params = 40000")))
    monkeypatch.setenv("FEDEDGE_DEVICES", str(catalog))
    return catalog


def _acl_block(acl: str, user: str) -> list[str]:
    return acl.split(f"user {user}\n")[1].split("\n\n")[0].splitlines()


def test_agent_only_devices_get_agent_kits_and_no_training_rights(tmp_path,
                                                                  inference_only_catalog):
    kits = tmp_path / "kits"
    federation = federation_file(tmp_path, extra_device=True)  # + pi4-garage (cnn-m)
    with open(federation, "a") as fh:  # can_train = false: agent-only without saying so
        fh.write('\n[[devices]]\nid = "zero.auto"\nprofile = "pi-zero-2w"\n')
    result = provision(federation, kits)
    trainers = (*DEVICES, "pi4-garage")
    plans = {d.id: (d.role, d.model_from, d.student) for d in result.devices}
    assert plans == {**{d: ("client", None, plans[d][2]) for d in trainers},
                     # the largest trained student within the Pi Zero's 40,000 parameters
                     "zero.auto": ("agent", "pi4-garage", "cnn-m"),
                     AGENT: ("agent", "pi5-kitchen", "cnn-l")}  # explicit: budgets not applied
    assert [d.note for d in result.devices if d.note] == [
        "zero-kiosk runs pi5-kitchen's cnn-l, beyond the budgets of profile 'pi-zero-2w' "
        "(budgets.max_params needs 89,930, budget 40,000)"]

    server = load_kit(kits / "server")
    assert server.devices == trainers  # the server waits for (and counts quorum over) these
    assert server.agents == {AGENT: "pi5-kitchen", "zero.auto": "pi4-garage"}
    assert '\n"zero.auto" = "pi4-garage"\n' in (kits / "server" / "server.toml").read_text()
    agent = load_kit(kits / "zero.auto")
    assert (agent.role, agent.model_from, agent.student, agent.trains) == (
        "agent", "pi4-garage", "cnn-m", False)
    assert agent.dataset.shards == 4  # demo shards only for the devices that train
    start = (kits / "zero.auto" / "start.sh").read_text()
    assert 'exec "${FEDEDGE:-fededge}" agent --kit "$KIT"' in start
    unit = (kits / "zero.auto" / "fededge-agent.service").read_text()
    assert "ExecStart=/opt/fededge/bin/fededge agent --kit /etc/fededge/agent\n" in unit
    assert "ReadWritePaths=/etc/fededge/agent/state\n" in unit
    assert not (kits / "zero.auto" / "fededge-client.service").exists()

    acl = (kits / "broker" / "acl").read_text()
    assert "user zero.auto\n" not in acl and "up/zero.auto" not in acl
    assert _acl_block(acl, "zero.auto@agent") == [
        "topic read fededge/demo/deploy/zero.auto/#",
        "topic write fededge/demo/presence/zero.auto/agent"]
    passwd = mq.parse_passwd((kits / "broker" / "passwd").read_text())
    assert "zero.auto@agent" in passwd and "zero.auto" not in passwd
    conf = (kits / "broker" / "mosquitto.conf").read_text()
    assert "(4 training devices + server)" in conf and "4 training + 2 agent-only" in conf

    refused = CliRunner().invoke(app, ["client", "--kit", str(kits / "zero.auto")])
    assert refused.exit_code == 2 and refused.output.startswith("error:")
    assert (f"device 'zero.auto' is agent-only (role = \"agent\", it runs the model of "
            f"'pi4-garage') and does not train; run `fededge agent --kit {kits / 'zero.auto'}`"
            in " ".join(refused.output.split()))

    # A device that stops training keeps its agent's credentials and loses its training login;
    # its kit switches to the agent.
    before = _credentials(kits, "gateway-1", "agent")
    federation.write_text(federation.read_text().replace(
        'profile = "x86-gateway"',
        'profile = "x86-gateway"\nrole = "agent"\nmodel_from = "jetson-lab"'))
    provision(federation, kits)
    assert _credentials(kits, "gateway-1", "agent") == before
    assert not (kits / "gateway-1" / "client.crt").exists()
    assert not load_kit(kits / "gateway-1").trains
    assert (kits / "gateway-1" / "fededge-agent.service").is_file()
    assert not (kits / "gateway-1" / "fededge-client.service").exists()
    assert load_kit(kits / "server").devices == ("pi5-kitchen", "jetson-lab", "pi4-garage")
    assert "gateway-1" not in mq.parse_passwd((kits / "broker" / "passwd").read_text())
    assert verify_manifest(kits).problems == []


def test_kits_from_before_roles_train(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path), kits)
    toml = kits / "gateway-1" / "client.toml"
    toml.write_text(toml.read_text().replace('role = "client"\n', ""))
    assert load_kit(kits / "gateway-1").trains
    toml.write_text(toml.read_text().replace('seed = ', 'role = "trainer"\nseed = ', 1))
    with pytest.raises(ValueError, match="role: input should be 'client' or 'agent', got 'trainer'"):
        load_kit(kits / "gateway-1")


@pytest.mark.parametrize("old, new, key, words", [
    ('role = "agent"', 'role = "client"', "role",
     ["profile 'pi-zero-2w' cannot train (can_train = false); drop role = \"client\""]),
    ('model_from = "pi5-kitchen"', 'data = "/x.npz"', "data",
     ["an agent-only device trains nothing; drop data"]),
    ('model_from = "pi5-kitchen"',
     'model_from = "zero-2"\n\n[[devices]]\nid = "zero-2"\nprofile = "pi-zero-2w"',
     "model_from",
     ["model_from 'zero-2' is agent-only too; name a device that trains (pi5-kitchen, "
      "jetson-lab, gateway-1)"]),
])
def test_agent_only_errors_name_the_device_line_and_fix(tmp_path, inference_only_catalog,
                                                        old, new, key, words):
    path = tmp_path / "federation.toml"
    path.write_text(EXAMPLE.read_text().replace(old, new))
    with pytest.raises(FederationFileError) as err:
        provision(path, tmp_path / "kits")
    line = [n for n, text in enumerate(path.read_text().splitlines(), 1)
            if text.startswith(f"{key} = ")][-1]
    assert str(err.value).startswith(f"{path} line {line}: device 'zero-kiosk': ")
    for word in words:
        assert word in str(err.value)


def test_an_agent_only_device_needs_a_model_and_a_federation_needs_a_trainer(tmp_path):
    path = tmp_path / "federation.toml"
    path.write_text(EXAMPLE.read_text().replace('model_from = "pi5-kitchen"\n', ""))
    with pytest.raises(FederationFileError, match=(
            r"line \d+: device 'zero-kiosk': no trained student fits the budgets of profile "
            r"'pi-zero-2w' \(the smallest, cnn-l, exceeds them\); set model_from")):
        provision(path, tmp_path / "kits")
    text = EXAMPLE.read_text()
    path.write_text(text[:text.index("\n[[devices]]")] + text[text.index("\n# Agent-only"):]
                    .replace('model_from = "pi5-kitchen"\n', ""))
    result = CliRunner().invoke(app, ["provision", str(path), "--out", str(tmp_path / "k")])
    assert result.exit_code == 2
    assert "no device trains (all are agent-only); add a [[devices]] table" in result.output


def test_revoke_removes_the_device_from_password_file_and_acl(tmp_path):
    kits = tmp_path / "kits"
    federation = federation_file(tmp_path)
    provision(federation, kits)
    kept = _credentials(kits, "pi5-kitchen")
    for not_a_device in ("ca", "broker", "server", "nobody"):
        with pytest.raises(ValueError, match=f"--revoke {not_a_device}: no such device"):
            provision(federation, kits, revoke=[not_a_device])
    assert (kits / "ca" / "ca.key").is_file() and (kits / "server" / "server.toml").is_file()
    result = CliRunner().invoke(app, ["provision", str(federation), "--out", str(kits),
                                      "--revoke", "jetson-lab"])
    assert result.exit_code == 0, result.output
    assert "revoked jetson-lab" in result.output
    assert "jetson-lab" not in mq.parse_passwd((kits / "broker" / "passwd").read_text())
    assert "jetson-lab" not in (kits / "broker" / "acl").read_text()
    assert not (kits / "jetson-lab").exists()
    assert load_kit(kits / "server").devices == ("pi5-kitchen", "gateway-1")
    assert _credentials(kits, "pi5-kitchen") == kept
    # Still listed in the file: later runs skip it, never re-issue credentials.
    again = CliRunner().invoke(app, ["provision", str(federation), "--out", str(kits)])
    assert again.exit_code == 0 and "jetson-lab is still listed" in again.output
    assert not (kits / "jetson-lab").exists()
    assert verify_manifest(kits).problems == []


def test_a_device_dropped_from_the_file_must_be_revoked_explicitly(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path, extra_device=True), kits)
    with pytest.raises(ValueError, match="pi4-garage.*--revoke pi4-garage"):
        provision(federation_file(tmp_path), kits)


def test_verify_kit_catches_a_changed_byte(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path), kits)
    target = kits / "gateway-1" / "client.toml"
    data = bytearray(target.read_bytes())
    data[200] ^= 0x01
    target.write_bytes(bytes(data))
    for directory in (kits / "gateway-1", kits):
        result = CliRunner().invoke(app, ["verify-kit", str(directory)])
        assert result.exit_code == 1
        assert "client.toml: changed" in result.output
    (kits / "pi5-kitchen" / "state").mkdir()  # checkpoints are not kit content
    (kits / "pi5-kitchen" / "state" / "student.json").write_text("{}")
    (kits / "pi5-kitchen" / "extra.conf").write_text("x")
    assert verify_manifest(kits / "pi5-kitchen").problems == [
        "extra.conf: not in the manifest (added after provisioning)"]


def _rehash(kit: Path, name: str) -> None:
    """What someone who edits a kit file does to pass a hash check: rewrite its hash."""
    manifest = json.loads((kit / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((kit / name).read_bytes()).hexdigest()
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_verify_kit_refuses_a_rehashed_edit_loose_secrets_and_a_foreign_signature(tmp_path):
    kits = tmp_path / "kits"
    result = provision(federation_file(tmp_path), kits)
    kit = kits / "gateway-1"
    ok = CliRunner().invoke(app, ["verify-kit", str(kit)])
    assert ok.exit_code == 0 and result.ca_fingerprint in " ".join(ok.output.split())
    assert "signed by 'fededge demo kit signing'" in ok.output

    toml = kit / "client.toml"  # the broker moved to an address of the attacker's choosing
    toml.write_text(toml.read_text().replace('host = "127.0.0.1"', 'host = "10.6.6.6"'))
    _rehash(kit, "client.toml")
    for secret in ("client.key", "password", "client-agent.key"):
        (kit / secret).chmod(0o644)
    (kits / "ca" / "ca.key").chmod(0o640)
    out = CliRunner().invoke(app, ["verify-kit", str(kit)])
    assert out.exit_code == 1
    problems = [line.split(f"{kit}/", 1)[1].strip() for line in " ".join(
        out.output.split()).split("problem: ") if f"{kit}/" in line]
    assert problems[:2] == [
        "manifest.json: differs from the manifest signed at provisioning (entries of "
        "client.toml): edited or re-hashed afterwards",
        "client.toml: changed (its SHA-256 differs from the signed manifest)"]
    for secret in ("client-agent.key", "client.key", "password"):
        assert any(p.startswith(f"{secret}: mode 0644, but a secret must be 0600") for p in
                   problems), (secret, problems)
    assert len(problems) == 5
    root = verify_manifest(kits).problems
    assert "ca/ca.key: mode 0640, but a secret must be 0600 (readable by its owner alone): " \
        f"chmod 600 {kits / 'ca' / 'ca.key'}" in root
    assert "gateway-1/client.toml: changed (its SHA-256 differs from the signed manifest)" in root

    # Re-signed with another CA put in the kit: self-consistent, so only the fingerprint
    # (printed) or a pinned CA tells; --ca refuses it.
    for secret in ("client.key", "password", "client-agent.key"):
        (kit / secret).chmod(0o600)
    rogue = pki.create_ca("demo")
    signer = pki.issue(rogue, "fededge demo kit signing", usage=pki.KIT_SIGNING)
    (kit / "ca.crt").write_bytes(rogue.cert_pem)
    write_manifest(kit, "rogue", signer)
    self_check = verify_manifest(kit)
    assert self_check.problems == [] and pki.fingerprint(rogue.cert) in self_check.ca
    pinned = CliRunner().invoke(app, ["verify-kit", str(kit), "--ca",
                                      str(kits / "ca" / "ca.crt")])
    assert pinned.exit_code == 1
    assert "ca.crt: not the trusted CA" in pinned.output
    assert "manifest.sig: signature refused: signing certificate 'fededge demo kit signing' " \
        "was not issued by this federation's CA" in " ".join(pinned.output.split())
    # A deploy key (code signing) cannot sign a kit either.
    write_manifest(kits / "pi5-kitchen", "by deploy", pki.Identity.load(
        kits / "server" / "deploy.crt", kits / "server" / "deploy.key"))
    assert verify_manifest(kits / "pi5-kitchen").problems == [
        "manifest.sig: signature refused: signing certificate 'server@deploy' is not a "
        "kit-signing certificate"]


def test_verify_kit_names_an_unsigned_kit(tmp_path):
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path), kits)
    (kits / "jetson-lab" / "manifest.sig").unlink()
    problems = verify_manifest(kits / "jetson-lab").problems
    assert len(problems) == 1 and problems[0].startswith(
        "manifest.sig: missing, so nothing proves the manifest is provisioning's")


# ----------------------------------------------------------------------------- privacy

def test_clipping_and_noise_scale():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (500, 10))
    clipped = clip_rows(logits, 5.0)
    assert np.allclose(np.linalg.norm(clipped, axis=1), 5.0)
    small = logits / 100
    assert np.allclose(clip_rows(small, 5.0), small)
    mech = LocalPrivacy(clip=5.0, noise_multiplier=2.0, delta=1e-5, rng=rng)
    noisy, account = mech.apply(logits)
    assert noisy.dtype == np.float32
    assert abs(np.std(noisy - clipped) - 10.0) < 0.3
    assert account["releases"] == 1 and account["epsilon_total"] == account["epsilon_per_round"]


def test_accountant_matches_the_gaussian_mechanism_curve():
    from scipy.stats import norm

    # delta(0) of mu-GDP is the total variation distance of N(0,1) and N(mu,1).
    assert delta_for(0.0, 1.0) == pytest.approx(2 * norm.cdf(0.5) - 1, rel=1e-9)
    for mu in (0.3, 1.0, 5.0, 60.0):
        eps = epsilon_for(1e-5, mu)
        assert delta_for(eps, mu) == pytest.approx(1e-5, rel=1e-4)
        # Tighter than the RDP bound for the same mechanism: eps <= min_a a mu^2/2 + log(1/d)/(a-1).
        rdp = min(a * mu * mu / 2 + np.log(1e5) / (a - 1) for a in np.linspace(1.01, 2000, 20000))
        assert eps <= rdp + 1e-9
    # Composition: T identical releases are one release with mu * sqrt(T).
    mech = LocalPrivacy(clip=1.0, noise_multiplier=30.0, delta=1e-5)
    for _ in range(4):
        _, account = mech.apply(np.zeros((25, 10)))
    assert account["epsilon_total"] == pytest.approx(epsilon_for(1e-5, release_mu(30.0, 25) * 2))
    assert release_mu(30.0, 25) == pytest.approx(2 * 5 / 30)


def test_privacy_settings_are_checked_and_reported():
    assert privacy_report(FederationConfig(proxy_size=100)) is None
    with pytest.raises(ConfigError, match="share_class_counts"):
        FederationConfig(ldp_noise_multiplier=1.0)
    config = FederationConfig(ldp_noise_multiplier=4.0, share_class_counts=False, rounds=5,
                              proxy_size=400, proxy_per_round=100)
    report = privacy_report(config)
    assert report["rows_per_release"] == 100 and report["releases"] == 5
    assert report["epsilon_total"] == pytest.approx(epsilon_for(1e-5, 2 * 10 / 4 * 5 ** 0.5))
    assert report["epsilon_total"] > report["epsilon_per_round"] > 0


def test_device_refuses_a_server_config_weaker_than_its_kit():
    from fededge.kits.device import ConfigGuard

    hub = MemoryHub()
    floor = FederationConfig(federation="demo", ldp_noise_multiplier=2.0,
                             share_class_counts=False, proxy_size=100)
    guard = ConfigGuard(hub.connect("dev"), "demo", floor)
    seen = []
    guard.subscribe(proto.Topics("demo").config, lambda t, p: seen.append(p))
    server = hub.connect("server")

    def publish(config: FederationConfig) -> None:
        server.publish(proto.Topics("demo").config, proto.encode(
            proto.Message(proto.KIND_CONFIG, proto.SERVER_ID, 0, config.to_dict())), retain=True)
    publish(floor.replace(ldp_noise_multiplier=4.0))
    assert len(seen) == 1 and guard.refusal is None
    publish(floor.replace(ldp_noise_multiplier=0.0, share_class_counts=True))
    publish(floor.replace(rounds=floor.rounds * 2))
    assert len(seen) == 1 and "refusing" in guard.refusal
    guard.refusal = None
    publish(floor.replace(collect_models=True))  # this kit keeps its student on the device
    assert len(seen) == 1 and "collects the trained students" in guard.refusal
    allows = ConfigGuard(hub.connect("dev2"), "demo", floor.replace(collect_models=True))
    allows.subscribe(proto.Topics("demo").config, lambda t, p: seen.append(p))
    assert len(seen) == 2 and allows.refusal is None  # a kit that allows it takes part


def test_collect_models_is_the_federation_tables_choice(tmp_path):
    """[federation] collect_models reaches every kit's settings; [training] may not set it."""
    path = federation_file(tmp_path)
    assert "collect_models = true" in path.read_text()  # the example turns it on
    provision(path, tmp_path / "kits")
    assert load_kit(tmp_path / "kits" / "server").config["collect_models"] is True
    assert load_kit(tmp_path / "kits" / "gateway-1").config["collect_models"] is True
    path.write_text(path.read_text().replace("collect_models = true\n", "").replace(
        "[training]\n", "[training]\ncollect_models = true\n"))
    with pytest.raises(FederationFileError, match="unknown key 'collect_models' in .training."):
        provision(path, tmp_path / "kits")
    path.write_text(path.read_text().replace("[training]\ncollect_models = true\n",
                                             "[training]\n"))
    provision(path, tmp_path / "kits")
    assert load_kit(tmp_path / "kits" / "server").config["collect_models"] is False


def test_fedmd_reply_noises_logits_on_the_device():
    from fededge.federation.strategies.base import ClientContext
    from fededge.federation.strategies.fedmd import FedMDClient, FedMDServer

    class Fixed:
        def logits(self, rows):
            return np.full((len(rows), 10), 3.0, dtype=np.float32)
    config = FederationConfig(ldp_noise_multiplier=1.0, share_class_counts=False, proxy_size=20)
    ctx = ClientContext(Fixed(), np.zeros((5, 2)), np.zeros(5, dtype=np.int64), np.zeros((20, 2)),
                        new_learner=None)
    client = FedMDClient(config)
    reply = client.reply(ctx, FedMDServer(config).configure(1))
    assert "class_counts" not in reply.tensors
    uploaded = client.codec.decode(reply.tensors)
    assert uploaded.shape == (20, 10) and not np.allclose(uploaded, 3.0, atol=0.1)
    assert reply.info["ldp"]["releases"] == 1 and reply.info["ldp"]["epsilon_total"] > 0


# ----------------------------------------------------------------------------- the broker

TINY = "\n".join(["rounds = 2", "warmup_epochs = 2", "distill_epochs = 1", "revisit_epochs = 1",
                  "proxy_per_round = 100", "deadline_s = 60.0"])


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Kits for a 3-device federation with local DP, and their Mosquitto, running (the whole
    federation runs from kits in tests/test_kit_story.py)."""
    if not has_mosquitto():
        pytest.skip("mosquitto not installed (make test installs it)")
    tmp = tmp_path_factory.mktemp("secured")
    port = free_port()
    kits = tmp / "kits"
    provision(federation_file(tmp, port=port, settings=TINY,
                               privacy="noise_multiplier = 0.5\nclip = 10.0"), kits)
    procs = Processes()
    try:
        procs.start("broker", "--kit", str(kits / "broker"), log=tmp / "broker.log")
        assert wait_for_port("127.0.0.1", port, 20), (tmp / "broker.log").read_text()
        yield kits, port, procs, tmp
    finally:
        procs.stop_all()


def _arrived(got: list[str], count: int, seconds: float = 5.0) -> list[str]:
    """``got`` once it holds ``count`` topics (or after ``seconds``), and half a second more
    for anything that should not have come."""
    deadline = time.monotonic() + seconds
    while len(got) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return sorted(got)


@pytest.mark.mosquitto
def test_a_certificate_is_its_owners_identity_whatever_name_and_password_come_with_it(secured):
    """Mosquitto takes the certificate's CN as the user name (use_identity_as_username) and
    drops the user name and password the client sent: gateway-1's certificate with
    pi5-kitchen's user name and password connects as gateway-1, with gateway-1's rights only,
    and leaves pi5-kitchen's own session alone."""
    kits, port, _, _ = secured
    topics = proto.Topics("demo")
    server = connect_party(kits, port, "server")
    pi5 = connect_party(kits, port, "pi5-kitchen")
    impostor = connect_party(kits, port, "pi5-kitchen", cert_dir=kits / "gateway-1")
    anonymous = connect_party(kits, port, "jetson-lab", username=None)
    wrong = connect_party(kits, port, "gateway-1", username="gateway-1", password="not-it")
    try:
        at_server = collect(server, topics.all_up)
        time.sleep(0.5)  # subscription acknowledged
        impostor.publish(topics.up("pi5-kitchen"), b"forged")   # denied: it is gateway-1
        impostor.publish(topics.presence("pi5-kitchen"), b"forged", retain=True)
        impostor.publish(topics.up("gateway-1"), b"as itself")  # allowed
        anonymous.publish(topics.up("jetson-lab"), b"by certificate")
        wrong.publish(topics.up("gateway-1"), b"password not checked")
        assert _arrived(at_server, 3) == sorted([topics.up("gateway-1")] * 2
                                                + [topics.up("jetson-lab")])
        assert pi5.connected  # the impostor's client id is gateway-1, not pi5-kitchen
        presence = collect(server, topics.presence("pi5-kitchen"))
        assert _arrived(presence, 1, seconds=1.0) == []  # no forged retained presence
    finally:
        for t in (server, pi5, impostor, anonymous, wrong):
            t.close()


@pytest.mark.mosquitto
def test_certificates_for_other_purposes_cannot_log_in(secured, tmp_path):
    """Only TLS client certificates log in: not the code-signing one `fededge deploy` signs
    with, nor the broker's own server certificate."""
    kits, port, _, _ = secured
    for cert, key in (("server/deploy.crt", "server/deploy.key"),
                      ("broker/broker.crt", "broker/broker.key")):
        shutil.copy(kits / cert, tmp_path / "client.crt")
        shutil.copy(kits / key, tmp_path / "client.key")
        with pytest.raises(TransportError):
            connect_party(kits, port, "server", cert_dir=tmp_path, timeout=3)


@pytest.mark.mosquitto
def test_a_certificate_from_another_ca_is_refused(secured, tmp_path):
    kits, port, _, _ = secured
    rogue = pki.issue(pki.create_ca("rogue"), "pi5-kitchen")
    rogue.save(tmp_path / "client.crt", tmp_path / "client.key")
    with pytest.raises(TransportError):
        connect_party(kits, port, "pi5-kitchen", cert_dir=tmp_path, timeout=3)


@pytest.mark.mosquitto
def test_a_device_cannot_write_or_read_another_devices_uploads(secured):
    kits, port, _, _ = secured
    topics = proto.Topics("demo")
    server = connect_party(kits, port, "server")
    mallory = connect_party(kits, port, "pi5-kitchen")
    victim = connect_party(kits, port, "gateway-1")
    try:
        at_server = collect(server, topics.all_up)
        snooped = collect(mallory, topics.up("gateway-1"))
        snooped_all = collect(mallory, topics.all_up)
        time.sleep(0.5)  # subscriptions acknowledged
        forged = proto.encode(proto.Message(proto.KIND_METRICS, "gateway-1", 1, {}))
        mallory.publish(topics.up("gateway-1"), forged)
        mallory.publish(topics.up("pi5-kitchen"), proto.encode(
            proto.Message(proto.KIND_METRICS, "pi5-kitchen", 1, {})))  # its own: allowed
        victim.publish(topics.up("gateway-1"), forged)
        deadline = time.monotonic() + 5
        while len(at_server) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert sorted(at_server) == [topics.up("gateway-1"), topics.up("pi5-kitchen")]
        assert snooped == [] and snooped_all == []
    finally:
        for t in (server, mallory, victim):
            t.close()


def test_broker_without_mosquitto_names_the_debian_package(tmp_path, monkeypatch):
    import fededge.transport.brokers as broker

    provision(federation_file(tmp_path), tmp_path / "kits")
    monkeypatch.setattr(broker.shutil, "which", lambda name: None)
    monkeypatch.setattr(broker, "Path", lambda p: Path("/nonexistent") / Path(p).name)
    result = CliRunner().invoke(app, ["broker", "--kit", str(tmp_path / "kits" / "broker")])
    assert result.exit_code == 2
    assert "apt-get install -y mosquitto" in result.output and result.output.startswith("error:")


@requires_mosquitto
def test_site_bridge_carries_the_protocol(tmp_path):
    """broker/bridge/site.conf's bridge between two real Mosquittos: retained federation topics
    reach a device at the site, its upload reaches the server at the centre, ACLs hold."""
    centre_port = free_port()
    kits = tmp_path / "kits"
    provision(federation_file(tmp_path, port=centre_port), kits)
    ca = pki.Identity.load(kits / "ca" / "ca.crt", kits / "ca" / "ca.key")
    site = tmp_path / "site"
    shutil.copytree(kits / "broker", site)
    pki.issue(ca, "bridge-site-a").save(site / "bridge.crt", site / "bridge.key")
    bridge = (REPO / "broker" / "bridge" / "site.conf").read_text()
    bridge = bridge[bridge.index("connection "):].replace(
        "central.example.org:8883", f"127.0.0.1:{centre_port}").replace(
        "CHANGE-ME", "bridge-secret").replace("/etc/fededge/site-a/", "").replace(
        "/etc/fededge/broker/", "")
    conf = (site / "mosquitto.conf").read_text().replace("user mosquitto", "user root")
    with open(kits / "broker" / "passwd", "a") as fh:
        fh.write(f"bridge-site-a:{mq.hash_password('bridge-secret')}\n")
    with open(kits / "broker" / "acl", "a") as fh:
        fh.write((REPO / "broker" / "bridge" / "centre-acl-addition.acl").read_text())
    procs = Processes()
    try:
        procs.start("broker", "--kit", str(kits / "broker"), log=tmp_path / "centre.log")
        assert wait_for_port("127.0.0.1", centre_port, 20), (tmp_path / "centre.log").read_text()
        topics = proto.Topics("demo")
        server = connect_party(kits, centre_port, "server")
        at_server = collect(server, topics.all_up)
        server.publish(topics.config, b"config-v1", retain=True)
        server.flush()
        site_port = free_port()  # only now: a free port can be reused by outgoing connections
        (site / "mosquitto.conf").write_text(
            conf.replace(f"listener {centre_port} ", f"listener {site_port} ") + "\n" + bridge)
        site_proc = subprocess.Popen([mosquitto_binary(), "-c", "mosquitto.conf"], cwd=site,
                                     stdout=open(tmp_path / "site.log", "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        procs.procs.append(site_proc)
        assert wait_for_port("127.0.0.1", site_port, 20), (tmp_path / "site.log").read_text()
        time.sleep(1.5)  # the bridge connects and subscribes
        device = connect_party(kits, site_port, "pi5-kitchen")
        config = collect(device, topics.config)
        device.publish(topics.up("pi5-kitchen"), b"mine")
        device.publish(topics.up("gateway-1"), b"forged")  # denied by the site's ACL
        deadline = time.monotonic() + 10
        while (not config or not at_server) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert config == [topics.config]  # retained, carried in by the bridge
        assert at_server == [topics.up("pi5-kitchen")]
        for t in (server, device):
            t.close()
    finally:
        procs.stop_all()


@requires_mosquitto
def test_revocation_reaches_a_running_broker_on_sighup(tmp_path):
    """`provision --revoke` puts the device's certificates on the CRL; after SIGHUP the broker
    refuses them at the TLS handshake, whatever user name and password come with them."""
    port = free_port()
    federation, kits = federation_file(tmp_path, port=port), tmp_path / "kits"
    provision(federation, kits)
    procs = Processes()
    try:
        broker = procs.start("broker", "--kit", str(kits / "broker"), log=tmp_path / "b.log")
        assert wait_for_port("127.0.0.1", port, 20), (tmp_path / "b.log").read_text()
        saved = tmp_path / "jetson-lab"
        shutil.copytree(kits / "jetson-lab", saved)  # what the device still holds
        held = connect_party(kits, port, "jetson-lab")  # a session open during the revocation
        server = connect_party(kits, port, "server")
        at_server = collect(server, proto.Topics("demo").all_up)
        serials = {pki.load_certificate(saved / name).serial_number
                   for name in ("client.crt", "client-agent.crt")}
        result = provision(federation, kits, revoke=["jetson-lab"])
        assert result.revoked == ["jetson-lab"]
        assert set(pki.revoked_serials((kits / "broker" / "crl.pem").read_bytes())) == serials
        assert sorted(json.loads((kits / "ca" / "revoked.json").read_text())["jetson-lab"][
            "serials"]) == sorted(format(s, "x") for s in serials)
        os.kill(broker.pid, signal.SIGHUP)
        time.sleep(1.0)
        pi5_password = (kits / "pi5-kitchen" / "password").read_text().strip()
        for username, password in (("jetson-lab", None), ("pi5-kitchen", pi5_password)):
            with pytest.raises(TransportError, match="refuses this client's certificate"):
                connect_party(tmp_path, port, "jetson-lab", username=username,
                              password=password, timeout=3)
        with pytest.raises(TransportError, match="refuses this client's certificate"):
            connect_party(tmp_path, port, "jetson-lab", username="jetson-lab@agent",
                          cert_dir=_role_login(saved, "agent", tmp_path / "agent"), timeout=3)
        pi5 = connect_party(kits, port, "pi5-kitchen")  # everyone else still gets in
        held.publish(proto.Topics("demo").up("jetson-lab"), b"after revocation")
        pi5.publish(proto.Topics("demo").up("pi5-kitchen"), b"still here")
        # The open session lost its rights with its ACL block: only pi5-kitchen's arrives.
        assert _arrived(at_server, 1) == [proto.Topics("demo").up("pi5-kitchen")]
        for transport in (held, server, pi5):
            transport.close()
        assert broker.poll() is None
    finally:
        procs.stop_all()


def _role_login(kit: Path, role: str, into: Path) -> Path:
    """A directory holding the kit's ``role`` login as client.crt/client.key (what
    connect_party takes)."""
    into.mkdir()
    for src, dst in zip(login_files(role), ("client.crt", "client.key")):
        shutil.copy(kit / src, into / dst)
    return into


def test_a_dataset_file_ships_in_every_kit_and_devices_bring_their_own_data(tmp_path):
    from fededge.kits.device import _local_data, private_data
    from fededge.learn.data import load_dataset

    digits = load_dataset("digits")
    np.savez(tmp_path / "public.npz", X=digits.X[:600], y=digits.y[:600],
             X_public=digits.X[600:900])
    text = federation_file(tmp_path).read_text().replace('source = "digits"',
                                                          'source = "public.npz"')
    text = text.replace('id = "gateway-1"', 'id = "gateway-1"\ndata = "/data/own.npz"')
    (tmp_path / "federation.toml").write_text(text)
    kits = tmp_path / "kits"
    provision(tmp_path / "federation.toml", kits)
    gateway, pi = load_kit(kits / "gateway-1"), load_kit(kits / "pi5-kitchen")
    shipped = (kits / "gateway-1" / "dataset.npz").read_bytes()
    assert shipped == (tmp_path / "public.npz").read_bytes()
    assert gateway.data == "/data/own.npz" and gateway.shard is None
    assert pi.dataset.shards == 2 and {pi.shard, load_kit(kits / "jetson-lab").shard} == {0, 1}
    local, split, _ = _local_data(pi, None)
    assert split.proxy_sha256 == pi.dataset.proxy_sha256 and len(split.public_X) == 300
    # A device's own data may lack classes; only the label range is checked.
    own = tmp_path / "own.npz"
    np.savez(own, X=digits.X[:40], y=np.where(digits.y[:40] < 5, 3, 7))
    X, y = private_data(own, split)
    assert X.shape == (40, 1, 8, 8) and set(y.tolist()) == {3, 7}
    local, _, _ = _local_data(gateway, own)
    assert len(local.private_y) == 40
    np.savez(own, X=digits.X[:40], y=np.full(40, 12))
    with pytest.raises(ValueError, match="labels must be integers 0..9"):
        private_data(own, split)

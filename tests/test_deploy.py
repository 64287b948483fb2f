"""Model delivery: `fededge deploy` → `fededge agent` over a real Mosquitto with provisioned
kits (TLS, passwords, ACL), atomic install, rollback, every rejection path, and the agent and
`fededge infer` running with torch (and everything else the edge extra lacks) unimportable."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import BLOCKED_MARK, EDGE_BLOCKED, blocked_env, run_blocked, stdout_of
from kit_helpers import (
    AGENT,
    REPO,
    Processes,
    collect,
    connect_party,
    federation_file,
    has_mosquitto,
    http_json,
    poll,
)
from typer.testing import CliRunner

from fededge.cli.app import app
from fededge.delivery.deploy import Deployment, deploy, load_signer
from fededge.delivery.export import EvalData, StudentMeta, export_student
from fededge.edge import bundle as delivery
from fededge.edge import runtime
from fededge.edge.agent import Agent
from fededge.edge.installs import Installs, Pointer
from fededge.kits import pki
from fededge.kits.kit import load_kit
from fededge.kits.manifest import verify_manifest
from fededge.kits.provision import provision
from fededge.learn.data import load_dataset, split_federated
from fededge.learn.models import build_student
from fededge.profiles import get_profile
from fededge.transport.brokers import free_port, wait_for_port
from fededge.wire.topics import Topics

TOPICS = Topics("demo")
CHUNK = 4096  # small chunks, so every bundle arrives in several


# ----------------------------------------------------------------------------- fixtures

def _export(split, device: str, profile: str, seed: int, out: Path, *, student: str = "cnn-xs",
            int8: bool = False) -> Path:
    """An untrained student (seeded, so versions differ), exported and verified."""
    torch.manual_seed(seed)
    model = build_student(student, split.input_shape, split.num_classes)
    meta = StudentMeta(device, profile, student, 1, None, tuple(split.input_shape),
                       split.num_classes, split.class_names, split.preprocessing.to_dict(),
                       "digits")
    export_student(model, meta, EvalData(split.raw_test_X, split.test_y, split.raw_public_X),
                   out / device, profile=get_profile(profile), quantize="int8" if int8 else None)
    return out


@pytest.fixture(scope="module")
def fed(tmp_path_factory, digits_iid):
    """Provisioned kits, their Mosquitto running, and export roots: ``v1`` (every device,
    int8 for pi5-kitchen), ``v2`` (other weights) and ``wine`` (a model for other data)."""
    if not has_mosquitto():
        pytest.skip("mosquitto not installed (make test installs it)")
    tmp = tmp_path_factory.mktemp("deploy")
    port = free_port()
    kits = tmp / "kits"
    provision(federation_file(tmp, port=port), kits)
    procs = Processes()
    try:
        procs.start("broker", "--kit", str(kits / "broker"), log=tmp / "broker.log")
        assert wait_for_port("127.0.0.1", port, 20), (tmp / "broker.log").read_text()
        v1, v2 = tmp / "v1", tmp / "v2"
        _export(digits_iid, "pi5-kitchen", "pi-5-8gb", 0, v1, int8=True)
        for device, profile in (("jetson-lab", "jetson-orin-nano-8gb"),
                                ("gateway-1", "x86-gateway")):
            _export(digits_iid, device, profile, 0, v1)
            _export(digits_iid, device, profile, 1, v2)
        _export(digits_iid, "pi5-kitchen", "pi-5-8gb", 1, v2)
        wine = split_federated(load_dataset("wine"), 1, partition="iid", seed=0)
        wine_root = _export(wine, "gateway-1", "x86-gateway", 0, tmp / "wine", student="mlp-s")
        data = tmp / "test.npz"
        np.savez(data, X=digits_iid.raw_test_X, y=digits_iid.test_y)
        yield SimpleNamespace(kits=kits, port=port, tmp=tmp, procs=procs, v1=v1, v2=v2,
                              wine=wine_root, data=data, X=digits_iid.raw_test_X)
    finally:
        procs.stop_all()


def _deploy(fed, root: Path, device: str, **options) -> Deployment:
    """Deploy one device's bundle; returns the published version's record."""
    [result] = deploy(root, fed.kits / "server", [device], chunk_bytes=CHUNK, **options)
    return result


def _agent_once(fed, device: str, timeout: float = 20.0):
    """An in-process agent until its first outcome; returns (outcome, final report)."""
    agent = Agent(load_kit(fed.kits / device)).start()
    try:
        return agent.run(once=True, timeout=timeout), agent.report()
    finally:
        agent.stop()


def _poll(url: str, want: str | None, seconds: float = 20.0) -> dict:
    """GET ``url`` until its JSON ``version`` is ``want``."""
    return poll(url, lambda answer: answer.get("version") == want, seconds)


def _retained(fed, party: str, username: str, topic_filter: str,
              wait: float = 1.0) -> dict[str, bytes]:
    """The retained (non-empty) messages ``username`` can read below ``topic_filter``."""
    transport = connect_party(fed.kits, fed.port, party, username=username)
    got: dict[str, bytes] = {}
    transport.subscribe(topic_filter, lambda topic, payload: got.__setitem__(topic, payload))
    time.sleep(wait)
    transport.close()
    return {t: p for t, p in got.items() if p}


# ----------------------------------------------------------------------------- the happy path

@pytest.mark.mosquitto
def test_deploy_to_a_torch_free_agent_update_and_roll_back(fed, tmp_path):
    device, kit = "pi5-kitchen", fed.kits / "pi5-kitchen"
    http = free_port()
    log = tmp_path / "agent.log"
    agent = fed.procs.start("agent", "--kit", str(kit), "--http", str(http), log=log,
                            env=blocked_env(tmp_path, EDGE_BLOCKED))
    try:
        health = f"http://127.0.0.1:{http}/health"
        _poll(health, None)  # listening, nothing installed: 503 with version null
        assert http_json(health)[0] == 503

        first = _deploy(fed, fed.v1, device, wait=20)
        assert first.agent == "installed", log.read_text()
        assert first.files == 7 and first.chunks == -(-first.bytes // CHUNK) > 1
        _poll(health, first.version)
        reference = runtime.EdgeModel(fed.v1 / device)
        status, answer = http_json(f"http://127.0.0.1:{http}/predict", {"x": fed.X[:5].tolist()})
        labels, confidences = reference.predict(fed.X[:5])
        assert status == 200 and answer["version"] == first.version
        assert answer["labels"] == labels.tolist()
        assert answer["classes"] == [reference.class_names[i] for i in labels]
        assert np.allclose(answer["confidences"], confidences, atol=1e-6)
        status, answer = http_json(f"http://127.0.0.1:{http}/predict", {"x": [1, 2]})
        assert status == 400 and "expected (N, 1, 8, 8)" in answer["error"]

        second = _deploy(fed, fed.v2, device, wait=20)
        assert second.agent == "installed" and second.cleared == first.chunks
        assert _poll(health, second.version)["previous"] == first.version
        # The broker keeps one bundle per device: the descriptor and the new version's chunks.
        left = _retained(fed, "server", "server@deploy", TOPICS.deploy_tree(device))
        assert set(left) == {TOPICS.deploy(device), *(TOPICS.deploy_chunk(
            device, second.version, i) for i in range(second.chunks))}

        out = stdout_of(run_blocked(tmp_path, EDGE_BLOCKED, [
            "-m", "fededge.cli", "agent", "--kit", str(kit), "--rollback"], cwd=REPO))
        assert f"serving {first.version} instead of {second.version}" in out
        _poll(health, first.version, seconds=5)  # the running agent switched

        logits = tmp_path / "logits.npy"
        out = stdout_of(run_blocked(tmp_path, EDGE_BLOCKED, [
            "-m", "fededge.cli", "infer", str(kit), str(fed.data), "--save-logits",
            str(logits)], cwd=REPO))
        assert f"model.onnx ({first.version})" in out and "accuracy:" in out
        assert np.array_equal(np.load(logits), reference.logits(fed.X))

        report = json.loads(_retained(fed, "server", "server@deploy",
                                      TOPICS.agent_status(device))[TOPICS.agent_status(device)])
        assert report["installed"] == first.version and report["previous"] == second.version
        assert report["rolled_back"] == second.version and report["status"] == "online"
        assert report["smoke_test"] == {
            "version": second.version, "passed": True,
            "detail": "8 synthetic samples on CPUExecutionProvider"}
        assert report["http_port"] == http and report["last_rejection"] is None
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=15)
    assert code == 130, log.read_text()  # stopped cleanly, as after Ctrl-C
    assert "interrupted: agent stopped" in log.read_text()
    assert BLOCKED_MARK not in log.read_text()
    offline = json.loads(_retained(fed, "server", "server@deploy",
                                   TOPICS.agent_status(device))[TOPICS.agent_status(device)])
    assert offline["status"] == "offline" and offline["installed"] == first.version
    assert verify_manifest(kit).problems == []  # the agent's state/ is not kit content


@pytest.mark.mosquitto
def test_deploy_command_runs_without_torch(fed, tmp_path):
    proc = run_blocked(tmp_path, ["torch"], [
        "-m", "fededge.cli", "deploy", str(fed.v1), "--kit", str(fed.kits / "server"),
        "--device", "gateway-1", "--chunk-bytes", str(CHUNK)], cwd=REPO)
    out = stdout_of(proc)
    assert "gateway-1" in out and "Deployed" in out


@pytest.mark.mosquitto
def test_a_crash_mid_install_leaves_the_previous_model_serving(fed, tmp_path):
    device, kit = "jetson-lab", fed.kits / "jetson-lab"
    first = _deploy(fed, fed.v1, device)
    assert _agent_once(fed, device)[0].installed == first.version
    second = _deploy(fed, fed.v2, device)
    # The agent process dies (no cleanup of any kind) after writing and checking the new
    # version, as it goes to make it current.
    crash = textwrap.dedent(f"""
        import os, sys
        import fededge.edge.installs
        fededge.edge.installs.Installs.activate = lambda self, version: os._exit(9)
        from fededge.cli.app import app
        sys.argv = ["fededge", "agent", "--kit", {str(kit)!r}, "--once", "--timeout", "20"]
        app()
    """)
    proc = subprocess.run([sys.executable, "-c", crash], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    installs = Installs.of_kit(kit)
    assert installs.pointer().current == first.version
    assert (installs.path(second.version) / "model.onnx").is_file()  # written, not current
    out = CliRunner().invoke(app, ["infer", str(kit), str(fed.data)])
    assert out.exit_code == 0 and f"model.onnx ({first.version})" in out.output

    outcome, report = _agent_once(fed, device)  # the restarted agent tidies up and installs
    assert outcome.installed == second.version and not outcome.already
    assert installs.pointer() == Pointer(current=second.version, previous=first.version)
    assert sorted(p.name for p in installs.versions.iterdir()) == sorted(
        [first.version, second.version])
    again = CliRunner().invoke(app, ["agent", "--kit", str(kit), "--once", "--timeout", "10"])
    assert again.exit_code == 0 and f"already installed {second.version}" in again.output


@pytest.mark.mosquitto
def test_an_agent_only_device_receives_the_bundle_of_its_model_from_device(fed, tmp_path):
    """zero-kiosk trains nothing (no export of its own); by default deploy sends it
    pi5-kitchen's bundle, signed for zero-kiosk, and its agent installs it."""
    only = tmp_path / "export"
    shutil.copytree(fed.v1 / "pi5-kitchen", only / "pi5-kitchen")
    results = deploy(only, fed.kits / "server", chunk_bytes=CHUNK)
    assert [(r.device, r.source) for r in results] == [("pi5-kitchen", None),
                                                       (AGENT, "pi5-kitchen")]
    outcome, report = _agent_once(fed, AGENT)
    assert outcome.installed == results[1].version and report["smoke_test"]["passed"]
    installed = Installs.of_kit(fed.kits / AGENT).path(outcome.installed)
    for name in ("model.onnx", "model.int8.onnx", "manifest.json"):
        assert (installed / name).read_bytes() == (only / "pi5-kitchen" / name).read_bytes()
    out = CliRunner().invoke(app, ["infer", str(fed.kits / AGENT), str(fed.data)])
    assert out.exit_code == 0 and f"model.onnx ({outcome.installed})" in out.output
    # Its copy is its own: no other device's agent reads it, and it has no training user.
    assert _retained(fed, "pi5-kitchen", "pi5-kitchen@agent", TOPICS.deploy_tree(AGENT),
                     wait=0.5) == {}
    # No training login either: no certificate of that name, and its agent user may not
    # write the training topics.
    assert not (fed.kits / AGENT / "client.crt").exists()
    server = connect_party(fed.kits, fed.port, "server")
    uploads = collect(server, TOPICS.all_up)
    agent = connect_party(fed.kits, fed.port, AGENT, username=f"{AGENT}@agent")
    time.sleep(0.5)  # the server's subscription acknowledged
    agent.publish(TOPICS.up(AGENT), b"not a trainer")
    assert agent.flush(5)
    time.sleep(0.5)
    for transport in (agent, server):
        transport.close()
    assert uploads == []


# ----------------------------------------------------------------------------- rejections

@pytest.fixture(scope="module")
def gateway(fed):
    """gateway-1 with a good version installed, which every rejection must leave serving."""
    good = _deploy(fed, fed.v1, "gateway-1")
    assert _agent_once(fed, "gateway-1")[0].installed == good.version
    return good.version


def _bundle(root: Path, device: str) -> dict[str, bytes]:
    manifest = json.loads((root / device / "manifest.json").read_text())
    return {name: (root / device / name).read_bytes()
            for name in ["manifest.json", *manifest["files"]]}


def _corrupt_model(fed) -> dict[str, bytes]:
    """A bundle whose model.onnx is garbage but whose hashes all match: only the smoke test
    can catch it (a signer's mistake, not a transport error)."""
    files = _bundle(fed.v1, "gateway-1")
    files["model.onnx"] = b"\x08\x07 not an onnx graph" * 50
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["model.onnx"] = {"sha256": delivery.sha256_hex(files["model.onnx"]),
                                       "bytes": len(files["model.onnx"])}
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


def _foreign_signer() -> pki.Identity:
    """A code-signing certificate of another federation's CA (also named 'demo')."""
    return pki.issue(pki.create_ca("demo"), "server@deploy",
                     usage=ExtendedKeyUsageOID.CODE_SIGNING)


def _publish(fed, device: str, chunks: list[bytes], sealed: bytes, version: str) -> None:
    transport = connect_party(fed.kits, fed.port, "server", username="server@deploy")
    for index, chunk in enumerate(chunks):
        transport.publish(TOPICS.deploy_chunk(device, version, index), chunk, retain=True)
    transport.publish(TOPICS.deploy(device), sealed, retain=True)
    assert transport.flush(10)
    transport.close()


CASES = {
    "tampered chunk": "chunk 1 of version .* SHA-256 differs from the signed descriptor",
    "bundle hash": "size or SHA-256 differs from the signed descriptor",
    "bad signature": "the signature does not verify",
    "foreign CA": "was not issued by this federation's CA",
    "device certificate": "is not a code-signing certificate",
    "other device": "is for device 'pi5-kitchen' of federation 'demo', not 'gateway-1'",
    "wrong input shape": r"model takes input \(13,\).*federation's data is \(1, 8, 8\)",
    "corrupt model": "smoke test: model.onnx does not run",
}


@pytest.mark.mosquitto
@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_bundle_is_reported_and_the_old_model_keeps_serving(fed, gateway, case):
    kits, device = fed.kits, "gateway-1"
    signer = load_signer(load_kit(kits / "server"))
    files = {"wrong input shape": lambda: _bundle(fed.wine, device),
             "corrupt model": lambda: _corrupt_model(fed),
             "other device": lambda: _bundle(fed.v1, "pi5-kitchen")}.get(
        case, lambda: _bundle(fed.v1, device))()
    when = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(
        seconds=list(CASES).index(case))  # a fresh version per case
    addressee = "pi5-kitchen" if case == "other device" else device
    descriptor, chunks = delivery.describe("demo", addressee, files, chunk_bytes=CHUNK, when=when)
    if case == "bundle hash":
        descriptor = dataclasses.replace(descriptor, bundle_sha256="0" * 64)
    if case == "foreign CA":
        signer = _foreign_signer()
    if case == "device certificate":
        signer = pki.Identity.load(kits / device / "client.crt", kits / device / "client.key")
    sealed = delivery.seal(descriptor, signer)
    if case == "bad signature":
        envelope = json.loads(sealed)
        envelope["descriptor"] = envelope["descriptor"].replace("2001-01-01", "2001-01-02")
        sealed = json.dumps(envelope).encode()
    if case == "tampered chunk":
        chunks[1] = chunks[1][:-1] + bytes([chunks[1][-1] ^ 1])
    _publish(fed, device, chunks, sealed, descriptor.version)

    outcome, report = _agent_once(fed, device)
    assert outcome.rejected is not None and re.search(CASES[case], outcome.rejected), outcome
    installs = Installs.of_kit(kits / device)
    assert installs.pointer().current == gateway and report["serving"] == gateway
    assert not installs.path(descriptor.version).exists()
    assert report["last_rejection"]["reason"] == outcome.rejected
    assert report["last_rejection"]["sealed_sha256"] == delivery.sha256_hex(sealed)
    if case == "corrupt model":
        assert report["smoke_test"]["passed"] is False


@pytest.mark.mosquitto
def test_once_exits_1_with_the_reason(fed, gateway):
    """The contract of `fededge agent --once`: a refusal is exit code 1 and its reason."""
    files = _bundle(fed.v1, "gateway-1")
    when = dt.datetime(2002, 1, 1, tzinfo=dt.timezone.utc)
    descriptor, chunks = delivery.describe("demo", "gateway-1", files, chunk_bytes=CHUNK,
                                           when=when)
    _publish(fed, "gateway-1", chunks, delivery.seal(descriptor, _foreign_signer()),
             descriptor.version)
    result = CliRunner().invoke(app, ["agent", "--kit", str(fed.kits / "gateway-1"), "--once",
                                      "--timeout", "10"])
    assert result.exit_code == 1
    assert "refused the deployment: signature refused" in result.output


# ----------------------------------------------------------------------------- access control

@pytest.mark.mosquitto
def test_only_the_addressed_device_can_read_its_bundle(fed):
    _deploy(fed, fed.v1, "pi5-kitchen")
    own = _retained(fed, "pi5-kitchen", "pi5-kitchen@agent", TOPICS.deploy_tree("pi5-kitchen"))
    assert TOPICS.deploy("pi5-kitchen") in own and len(own) > 1
    for user in ("jetson-lab@agent", "jetson-lab"):
        for topic_filter in (TOPICS.deploy_tree("pi5-kitchen"), TOPICS.all_deploy):
            seen = _retained(fed, "jetson-lab", user, topic_filter, wait=0.5)
            assert not [t for t in seen if "/pi5-kitchen" in t], (user, topic_filter)
    # Devices cannot publish bundles, not even for themselves, nor another device's report;
    # the training server's presence subscription never sees an agent's report.
    server = connect_party(fed.kits, fed.port, "server")
    presences = collect(server, TOPICS.all_presence)
    for user in ("jetson-lab@agent", "jetson-lab"):
        forger = connect_party(fed.kits, fed.port, "jetson-lab", username=user)
        forger.publish(TOPICS.deploy_chunk("jetson-lab", "forged", 0), b"x", retain=True)
        forger.publish(TOPICS.agent_status("pi5-kitchen"), b"{}", retain=True)
        forger.close()
    time.sleep(0.5)
    server.close()
    assert presences == []
    assert _retained(fed, "server", "server@deploy", f"{TOPICS.deploy('jetson-lab')}/forged/#",
                     wait=0.5) == {}
    reports = _retained(fed, "server", "server@deploy", TOPICS.agent_status("pi5-kitchen"),
                        wait=0.5)
    assert reports.get(TOPICS.agent_status("pi5-kitchen")) != b"{}"


# ----------------------------------------------------------------------------- errors, kits

def test_descriptors_are_checked_before_anything_is_trusted():
    files = {"manifest.json": b"{}", "model.onnx": bytes(5000)}
    when = dt.datetime(2001, 1, 1, tzinfo=dt.timezone.utc)
    descriptor, chunks = delivery.describe("demo", "pi5-kitchen", files, chunk_bytes=2048,
                                           when=when)
    assert len(chunks) == 3 and delivery.unpack(descriptor, chunks) == files
    assert descriptor.version == "20010101T000000Z-" + delivery.sha256_hex(b"{}")[:12]
    assert delivery.Descriptor.from_json(descriptor.to_json()) == descriptor
    broken = {
        b"[]": "not a JSON object",
        descriptor.to_json().replace(b"fededge-deploy/1", b"fededge-deploy/9"): "upgrade",
        descriptor.to_json().replace(b'"chunk_bytes":2048', b'"chunk_bytes":4096'):
            "3 chunks cannot carry 5002 bytes",
        descriptor.to_json().replace(b'"model.onnx"', b'"../model.onnx"'): "invalid file name",
        descriptor.to_json().replace(b'"device":"pi5-kitchen"', b'"device":"a/#"'):
            "invalid device id",
    }
    for text, words in broken.items():
        with pytest.raises(delivery.DeliveryError, match=re.escape(words)):
            delivery.Descriptor.from_json(text)
    with pytest.raises(delivery.DeliveryError, match="--chunk-bytes 1001 or more"):
        delivery.describe("demo", "pi5-kitchen", {"manifest.json": bytes(500_001)},
                          chunk_bytes=1000, when=when)
    with pytest.raises(delivery.DeliveryError, match="not a sealed"):
        delivery.open_seal(b"garbage", pki.create_ca("demo").cert)


def test_device_commands_report_bad_input_in_one_line_without_torch(tmp_path):
    """On a device with only the ``edge`` extra, a user error must not turn into an
    ImportError traceback while the CLI looks up which exceptions are user errors."""
    not_a_kit = tmp_path / "not-a-kit"
    not_a_kit.mkdir()
    proc = run_blocked(tmp_path, EDGE_BLOCKED, ["-m", "fededge.cli", "verify-kit",
                                                str(not_a_kit)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stdout and "no manifest.json" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr



@pytest.mark.mosquitto
def test_deploy_errors_name_the_input_and_the_fix(fed, tmp_path):
    server = fed.kits / "server"
    unsigned = Path(shutil.copytree(server, tmp_path / "server"))
    (unsigned / "deploy.crt").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["deploy", str(fed.wine), "--kit", str(server), "--device", "pi5-kitchen"],
         "no exported bundle for device 'pi5-kitchen'"),
        (["deploy", str(fed.v1), "--kit", str(server), "--device", "dev9"],
         "--device dev9: not a device of federation 'demo' (its devices: pi5-kitchen, "
         "jetson-lab, gateway-1, zero-kiosk)"),
        (["deploy", str(fed.wine), "--kit", str(server), "--device", AGENT],
         "no exported bundle for device 'zero-kiosk' (it runs the model of 'pi5-kitchen')"),
        (["deploy", str(fed.v1), "--kit", str(unsigned)], "re-run `fededge provision"),
        (["deploy", str(fed.v1), "--kit", str(fed.kits / "gateway-1")],
         "deploy with the server kit"),
        (["deploy", str(fed.wine), "--kit", str(server)], "model takes input (13,)"),
        (["deploy", str(empty), "--kit", str(server)], "no bundle for any device"),
        (["deploy", str(tmp_path / "nope"), "--kit", str(server)], "no such export directory"),
        (["agent", "--kit", str(fed.kits / "server")], "run the agent with a device kit"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.output.startswith("error:"), result.output
        assert words in " ".join(result.output.split()), (args, result.output)


@pytest.mark.mosquitto
def test_rollback_needs_a_previous_version(fed, tmp_path):
    kit = Path(shutil.copytree(fed.kits / "gateway-1", tmp_path / "gateway-1",
                               ignore=shutil.ignore_patterns("state")))
    result = CliRunner().invoke(app, ["agent", "--kit", str(kit), "--rollback"])
    assert result.exit_code == 2 and "no previous version to roll back to" in result.output
    result = CliRunner().invoke(app, ["infer", str(kit), str(fed.data)])
    assert result.exit_code == 2 and "has installed no model yet" in result.output


def test_provision_issues_a_code_signing_certificate_and_keeps_it(tmp_path):
    kits = tmp_path / "kits"
    federation = federation_file(tmp_path)
    provision(federation, kits)
    server = kits / "server"
    signer = load_signer(load_kit(server))
    ca = pki.Identity.load(kits / "ca" / "ca.crt", kits / "ca" / "ca.key").cert
    assert pki.issued_by(signer.cert, ca) and pki.is_code_signing(signer.cert)
    assert pki.common_name(signer.cert) == "server@deploy"
    assert not pki.is_code_signing(pki.Identity.load(server / "client.crt",
                                                     server / "client.key").cert)
    assert (server / "deploy.key").stat().st_mode & 0o777 == 0o600
    listed = json.loads((server / "manifest.json").read_text())["files"]
    assert {"deploy.crt", "deploy.key"} <= set(listed)
    provision(federation, kits)
    assert load_signer(load_kit(server)) == signer  # kept byte for byte
    (server / "deploy.crt").unlink()  # a kit from before deployment existed
    provision(federation, kits)
    assert pki.is_code_signing(load_signer(load_kit(server)).cert)
    assert verify_manifest(kits).problems == []


@pytest.mark.mosquitto
def test_agent_service_stops_cleanly_on_a_busy_port_and_runs_off_the_main_thread(fed):
    """edge.service.run_agent, what `fededge agent` runs: its endpoint error names the option
    and the agent still says goodbye; off the main thread it leaves signals alone."""
    import socket
    import threading

    from fededge.edge import service

    kit, device = fed.kits / "gateway-1", "gateway-1"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["agent", "--kit", str(kit), "--http", str(port),
                                          "--timeout", "5"])
    assert result.exit_code == 2, result.output
    assert (f"error: --http {port}: cannot listen on 127.0.0.1:{port} (Address already in "
            "use); choose another port") in " ".join(result.output.split())
    report = _retained(fed, "server", "server@deploy", TOPICS.agent_status(device))
    assert json.loads(report[TOPICS.agent_status(device)])["status"] == "offline"

    lines: list[str] = []
    done: dict[str, object] = {}
    handler = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=lambda: done.setdefault(
        "outcome", service.run_agent(kit, timeout=0.5, events=lines.append)))
    thread.start()
    thread.join(30)
    assert done == {"outcome": None} and signal.getsignal(signal.SIGTERM) is handler
    assert [line for line in lines if line.endswith("waiting for deployments")]

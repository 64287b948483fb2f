"""``fededge deploy``: every device's exported bundle, signed and chunked onto retained topics
that only that device's edge agent may read (format: ``delivery``).

Retained, so a device that is off while the operator deploys installs the bundle when it comes
back; one topic per chunk, because a topic retains one message. Order matters for agents that
are listening: chunks first, then the descriptor that points at them, then the previous
version's chunks are cleared (an empty retained message deletes one), so a descriptor never
points at chunks that are not there yet, and the broker keeps one bundle per device.

The command connects as ``server@deploy`` (``topics.role_user``): a second user, so it never
knocks a running federation server off the broker, and one whose ACL allows nothing but the
deploy topics and the agents' reports. It signs with the server kit's code-signing certificate
(``deploy.crt``), so the CA key stays with the operator.

An agent-only device (the server kit's ``[agents]``) has no training run and so no export of
its own: it receives the bundle of its ``model_from`` device, signed for its own name, so the
agent's device check holds as for every other device.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fededge.edge import bundle, runtime
from fededge.errors import FedEdgeError
from fededge.kits import pki
from fededge.kits.kit import DEPLOY_CERT_FILE, DEPLOY_KEY_FILE, Kit, load_kit
from fededge.kits.mqtt import connect, read_retained
from fededge.transport.base import TransportError
from fededge.transport.mqtt import MqttTransport
from fededge.wire.topics import DEPLOY_ROLE, Topics

MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
"""fededge's Mosquitto accepts packets up to its 16 MiB payload limit plus headers."""


class DeployError(FedEdgeError, ValueError):
    """A deployment that cannot start; the message names the input and the fix."""


@dataclass(frozen=True)
class Deployment:
    """One device's published bundle."""

    device: str
    version: str
    files: int
    bytes: int
    chunks: int
    cleared: int                 # retained chunks of earlier versions deleted
    agent: str | None = None     # with ``wait``: installed, rejected (reason) or no report
    source: str | None = None    # an agent-only device: whose exported model it received


def deploy(export_dir: str | Path, kit_dir: str | Path, devices: Sequence[str] = (), *,
           chunk_bytes: int = bundle.DEFAULT_CHUNK_BYTES, timeout: float = 60.0,
           wait: float = 0.0) -> list[Deployment]:
    """Publish the bundles of ``devices`` (default: every device of the federation whose bundle,
    or its ``model_from`` device's, is in ``export_dir``) and return once the broker
    acknowledged every message; with ``wait`` > 0, also wait that many seconds for each
    device's agent to report on the new version."""
    export_dir = Path(export_dir)
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise DeployError(f"--chunk-bytes {chunk_bytes}: use {MIN_CHUNK_BYTES} to "
                          f"{MAX_CHUNK_BYTES} (the broker's message limit)")
    kit = load_kit(kit_dir)
    if not kit.is_server:
        raise DeployError(f"{kit.file}: this is device {kit.device!r}'s kit; deploy with the "
                          "server kit (KITS/server)")
    signer = load_signer(kit)
    targets = _targets(export_dir, kit, devices)
    when = dt.datetime.now(dt.timezone.utc)
    bundles = {d: bundle.describe(kit.federation, d,
                                    read_bundle(export_dir / kit.bundle_source(d), kit),
                                    chunk_bytes=chunk_bytes, when=when) for d in targets}
    topics = Topics(kit.federation)
    transport = connect(kit, role=DEPLOY_ROLE)
    try:
        retained = set(read_retained(transport, [topics.deploy_tree(d) for d in targets],
                                     topics.deploy_sync, timeout))
        reports = _AgentReports(transport, topics, targets) if wait > 0 else None
        results = []
        for device, (descriptor, chunks) in bundles.items():
            sealed = bundle.seal(descriptor, signer)
            if reports is not None:
                reports.expect(device, descriptor.version, sealed)
            for index, chunk in enumerate(chunks):
                transport.publish(topics.deploy_chunk(device, descriptor.version, index), chunk,
                                  retain=True)
            transport.publish(topics.deploy(device), sealed, retain=True)
            keep = {topics.deploy(device)} | {topics.deploy_chunk(device, descriptor.version, i)
                                              for i in range(len(chunks))}
            stale = sorted(t for t in retained if t.startswith(topics.deploy(device) + "/")
                           and t not in keep)
            for topic in stale:
                transport.publish(topic, b"", retain=True)
            results.append(Deployment(device, descriptor.version, len(descriptor.files),
                                      descriptor.bundle_bytes, len(chunks), len(stale),
                                      source=kit.agents.get(device)))
        if not transport.flush(timeout):
            raise TransportError(f"the broker at {kit.broker.host}:{kit.broker.port} did not "
                                 f"acknowledge every message within {timeout:.0f} s; deploy "
                                 "again (it replaces what arrived)")
        if reports is not None:
            outcomes = reports.wait(wait)
            results = [Deployment(**{**vars(r), "agent": outcomes[r.device]}) for r in results]
        return results
    finally:
        transport.close()


def load_signer(kit: Kit) -> pki.Identity:
    """The server kit's code-signing certificate and key."""
    cert, key = kit.path(DEPLOY_CERT_FILE), kit.path(DEPLOY_KEY_FILE)
    missing = [p.name for p in (cert, key) if not p.is_file()]
    if missing:
        raise DeployError(f"{kit.directory}: no {' or '.join(missing)}, the code-signing "
                          "certificate that deployments are signed with (kits provisioned "
                          "before deployment existed lack it); re-run `fededge provision "
                          "FEDERATION.toml --out KITS`, which adds it and keeps every existing "
                          "credential")
    return pki.Identity.load(cert, key)


def _targets(export_dir: Path, kit: Kit, devices: Sequence[str]) -> list[str]:
    if not export_dir.is_dir():
        raise DeployError(f"{export_dir}: no such export directory; pass the --out of "
                          "`fededge export` (it holds one directory per device)")
    every = [*kit.devices, *kit.agents]
    known = ", ".join(every)

    def exported(device: str) -> bool:
        return (export_dir / kit.bundle_source(device) / runtime.MANIFEST).is_file()
    for device in devices:
        if device not in every:
            raise DeployError(f"--device {device}: not a device of federation "
                              f"{kit.federation!r} (its devices: {known})")
        if not exported(device):
            source = kit.bundle_source(device)
            whose = "" if source == device else f" (it runs the model of {source!r})"
            raise DeployError(f"{export_dir / source}: no exported bundle for device "
                              f"{device!r}{whose}; export the student of {source!r} to "
                              f"{export_dir}/{source}/ (`fededge export` writes OUT/<device>/)")
    found = list(devices) or [d for d in every if exported(d)]
    if not found:
        raise DeployError(f"{export_dir}: no bundle for any device of federation "
                          f"{kit.federation!r} ({known}); `fededge export` writes them as "
                          f"{export_dir}/<device>/")
    return list(dict.fromkeys(found))


def read_bundle(model_dir: Path, kit: Kit) -> dict[str, bytes]:
    """The files of an export directory (its manifest and every file it lists), verified
    against the manifest and checked to fit the federation's data."""
    try:
        files = bundle.read_export(model_dir)
        bundle.check_fits(json.loads(files[runtime.MANIFEST]), kit.config["input_shape"],
                          kit.config["num_classes"])
    except bundle.DeliveryError as exc:
        raise DeployError(f"{model_dir}: {exc}") from None
    return files


class _AgentReports:
    """Follows the agents' retained reports until each names the version just deployed."""

    def __init__(self, transport: MqttTransport, topics: Topics, devices: list[str]) -> None:
        self._lock = threading.Lock()
        self._expected: dict[str, tuple[str, str]] = {}  # device → (version, sealed SHA-256)
        self._outcomes: dict[str, str] = {}
        self._topics = {topics.agent_status(d): d for d in devices}
        for topic in self._topics:
            transport.subscribe(topic, self._on_report)

    def expect(self, device: str, version: str, sealed: bytes) -> None:
        with self._lock:
            self._expected[device] = (version, bundle.sha256_hex(sealed))

    def _on_report(self, topic: str, payload: bytes) -> None:
        try:
            report = json.loads(payload)
            rejection = report.get("last_rejection") or {}
        except (ValueError, AttributeError):
            return
        device = self._topics[topic]
        with self._lock:
            if device not in self._expected:
                return
            version, sealed = self._expected[device]
            if report.get("installed") == version:
                self._outcomes[device] = "installed"
            elif sealed == rejection.get("sealed_sha256"):
                self._outcomes[device] = f"rejected: {rejection.get('reason')}"

    def wait(self, seconds: float) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._outcomes) == len(self._topics):
                    break
            time.sleep(0.05)
        with self._lock:
            return {d: self._outcomes.get(d, f"no report within {seconds:g} s")
                    for d in self._topics.values()}

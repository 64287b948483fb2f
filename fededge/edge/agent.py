"""``fededge agent``: the device side of model delivery. Receives its bundles over MQTT (or takes
a local export directory, ``install_local``), checks them, installs them atomically and serves
the installed model.

The broker is not needed to serve: the agent loads the installed model first and connects in
the background, retrying with backoff (``MqttTransport.start``) while the broker is down at
start or goes away later; ``broker_state`` says how it stands, and after every reconnect the
agent publishes its report again (a restarted broker has lost the retained one).

A bundle is installed only after every check passed, in this order (the first failure is the
logged and reported reason, and the model already installed keeps serving):

1. the sealed descriptor: signed by a code-signing certificate its kit's CA issued, addressed to
   this federation and this device (``bundle.open_seal``);
2. every chunk against its signed SHA-256 as it arrives, then the whole bundle and every file;
3. the manifest's own SHA-256 of every file, and an input shape and class count equal to the
   federation's (the kit's ``[config]``);
4. a smoke test: each model file loads with the device's execution providers and turns a few
   synthetic samples into finite logits of the right shape.

A local install (an export made on the device itself, when the federation does not collect
models) has no descriptor to check; checks 3 and 4 are the same.

Reports go, retained, to ``fededge/<fed>/presence/<device>/agent`` (JSON: installed and previous
version, smoke test, last rejection); one level below the presence topic, so neither the
training client's retained presence nor the server (which reads ``presence/+``) is disturbed.
The agent connects as ``<device>@agent`` so it can run beside ``fededge client``.

MQTT callbacks only queue messages; checks, installs and reports run on the caller's thread.
Imports no torch (the ``edge`` extra is enough).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509

from fededge.edge import bundle, runtime
from fededge.edge.installs import Installs
from fededge.kits.kit import CA_FILE, Kit, KitError
from fededge.kits.mqtt import connect
from fededge.profiles import get_profile, usable_threads
from fededge.transport.mqtt import MqttTransport
from fededge.wire.topics import AGENT_ROLE, Topics

log = logging.getLogger(__name__)

SMOKE_SAMPLES = 8
POLL_S = 0.5
"""How often the main loop looks at the install pointer (a ``--rollback`` from another shell)."""


@dataclass(frozen=True)
class Outcome:
    """What one received deployment came to: ``installed`` names the version now serving
    (``already`` when it was installed before), or ``rejected`` gives the reason."""

    installed: str | None = None
    rejected: str | None = None
    already: bool = False


@dataclass(frozen=True)
class Served:
    version: str
    model: runtime.EdgeModel


@dataclass
class _Pending:
    descriptor: bundle.Descriptor
    sealed: str                      # SHA-256 of the sealed descriptor, names it in reports
    chunks: dict[int, bytes] = field(default_factory=dict)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def smoke_test(model_dir: Path, manifest: dict[str, Any], providers: list[str],
               threads: int) -> runtime.EdgeModel:
    """Run every model file of a staged version on a few synthetic samples; returns the
    float32 model, ready to serve. Raises ``DeliveryError`` saying what failed."""
    classes = manifest["output"]["shape"][1]
    served = None
    for int8 in (False, True) if runtime.INT8_FILE in manifest["files"] else (False,):
        name = runtime.INT8_FILE if int8 else runtime.FP32_FILE
        try:
            model = runtime.EdgeModel(model_dir, int8=int8, threads=threads, providers=providers)
            X = np.random.default_rng(0).standard_normal((SMOKE_SAMPLES, *model.sample_shape))
            logits = model.logits(X.astype(np.float32))
        except Exception as exc:  # onnxruntime's errors share no base class; any is a refusal
            raise bundle.DeliveryError(f"smoke test: {name} does not run: "
                                         f"{str(exc).strip().splitlines()[0][:200]}") from None
        if logits.shape != (SMOKE_SAMPLES, classes) or not np.isfinite(logits).all():
            raise bundle.DeliveryError(f"smoke test: {name} gave logits of shape "
                                         f"{logits.shape} (expected ({SMOKE_SAMPLES}, {classes}))"
                                         " or non-finite values")
        if not int8:
            served = model
    return served


class Agent:
    """One device's edge agent. ``start``, then ``run`` (or ``step`` repeatedly), then ``stop``."""

    def __init__(self, kit: Kit, *, events: Callable[[str], None] = lambda line: None) -> None:
        if kit.is_server:
            raise KitError(f"{kit.file}: this is the server's kit; run the agent with a device "
                           "kit (KITS/<device>)")
        self.kit, self.events = kit, events
        self.topics = Topics(kit.federation)
        self.installs = Installs.of_kit(kit.directory)
        profile = get_profile(kit.profile)
        self.providers, self.threads = list(profile.ort_providers), usable_threads(profile)
        try:
            self.ca = x509.load_pem_x509_certificate(kit.path(CA_FILE).read_bytes())
        except (OSError, ValueError) as exc:
            raise KitError(f"{kit.path(CA_FILE)}: unreadable CA certificate ({exc}); "
                           "re-provision the kit") from None
        self.served: Served | None = None
        self.http_port: int | None = None
        self._loaded: str | None = None          # the pointer's current version last loaded
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._pending: _Pending | None = None
        self._refused: set[str] = set()          # sealed SHA-256 of rejected deployments
        self._smoke: dict[str, Any] | None = None
        self._rejection: dict[str, Any] | None = None
        self._transport: MqttTransport | None = None
        self._reconnected = threading.Event()    # set by the transport after each connect

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Agent:
        """Tidy the install directory, load the installed model, then connect in the
        background and subscribe (the model serves whether or not the broker answers)."""
        self.installs.clean()
        self._follow_pointer()
        offline = json.dumps({"device": self.kit.device, "status": "offline"}).encode()
        self._transport = connect(self.kit, role=AGENT_ROLE, background=True,
                                  will=(self.topics.agent_status(self.kit.device), offline))
        self._transport.on_connected(self._reconnected.set)
        self._transport.subscribe(self.topics.deploy(self.kit.device), self._enqueue)
        return self

    def run(self, *, once: bool = False, timeout: float | None = None) -> Outcome | None:
        """Handle deployments until ``timeout`` seconds passed (forever without one); with
        ``once``, return the first outcome instead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            outcome = self.step(POLL_S if deadline is None
                                else max(0.0, min(POLL_S, deadline - time.monotonic())))
            if once and outcome is not None:
                return outcome
        return None

    def step(self, wait: float) -> Outcome | None:
        """Handle at most one message (waiting up to ``wait`` seconds for it), then pick up a
        rollback or local install made meanwhile."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            self._report()
        outcome = None
        try:
            topic, payload = self._inbox.get(timeout=wait)
        except queue.Empty:
            pass
        else:
            try:
                if topic == self.topics.deploy(self.kit.device):
                    outcome = self._on_descriptor(payload)
                else:
                    outcome = self._on_chunk(topic, payload)
            except Exception as exc:  # a check that failed in an unforeseen way: a refusal
                log.exception("unexpected error while checking a message on %s", topic)
                outcome = self._reject(bundle.sha256_hex(payload), None,
                                       f"unexpected {type(exc).__name__} while checking a "
                                       f"message on {topic}: {str(exc)[:200]}")
        self._follow_pointer()
        return outcome

    def stop(self) -> None:
        """Say goodbye on the report topic and disconnect (without the broker: at once)."""
        if self._transport is not None:
            if self._transport.connected:
                self._report(status="offline")
                self._transport.close()
            else:
                self._transport.close(timeout=0)
            self._transport = None

    def broker_state(self) -> dict[str, Any]:
        """Whether the broker connection is up, since when, and why not (for ``/health``)."""
        transport = self._transport
        if transport is None:
            return {"connected": False, "since": None, "problem": "not started"}
        since = dt.datetime.fromtimestamp(transport.since, dt.timezone.utc)
        return {"connected": transport.connected,
                "since": since.isoformat(timespec="seconds"),
                "problem": None if transport.connected else transport.problem}

    def report(self, status: str = "online") -> dict[str, Any]:
        """The JSON document published on the report topic."""
        pointer = self.installs.pointer()
        return {
            "device": self.kit.device, "status": status, "installed": pointer.current,
            "previous": pointer.previous, "rolled_back": pointer.rolled_back,
            "serving": self.served.version if self.served else None,
            "providers": self.served.model.providers if self.served else None,
            "threads": self.threads, "http_port": self.http_port,
            "smoke_test": self._smoke, "last_rejection": self._rejection, "updated": _now(),
        }

    # -- messages ----------------------------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _on_descriptor(self, payload: bytes) -> Outcome | None:
        if not payload:
            return None  # the deployment was withdrawn
        sealed = bundle.sha256_hex(payload)
        if sealed in self._refused:
            return None  # re-delivered after a reconnect; already reported
        try:
            descriptor = bundle.open_seal(payload, self.ca)
        except bundle.DeliveryError as exc:
            return self._reject(sealed, None, str(exc))
        version = descriptor.version
        if (descriptor.federation, descriptor.device) != (self.kit.federation, self.kit.device):
            return self._reject(sealed, version, f"bundle {version} is for device "
                                f"{descriptor.device!r} of federation {descriptor.federation!r},"
                                f" not {self.kit.device!r} of {self.kit.federation!r}")
        pointer = self.installs.pointer()
        if version == pointer.current:
            return Outcome(installed=version, already=True)
        if version == pointer.rolled_back:
            log.info("bundle %s was rolled back here; not re-installing it", version)
            return None
        if self._pending is not None and self._pending.descriptor.version == version:
            return None
        self._drop_pending()
        self._pending = _Pending(descriptor, sealed)
        self.events(f"receiving {version}: {len(descriptor.chunks)} chunks, "
                    f"{descriptor.bundle_bytes} bytes")
        self._transport.subscribe(self.topics.deploy_chunks(self.kit.device, version),
                                  self._enqueue)
        return None

    def _on_chunk(self, topic: str, payload: bytes) -> Outcome | None:
        pending = self._pending
        version, _, index = topic[len(self.topics.deploy(self.kit.device)) + 1:].partition("/")
        if pending is None or version != pending.descriptor.version or not payload:
            return None  # an older version's chunk, or one being cleared
        try:
            if not index.isdigit():
                raise bundle.DeliveryError(f"chunk topic {topic} has no chunk number")
            bundle.check_chunk(pending.descriptor, int(index), payload)
        except bundle.DeliveryError as exc:
            return self._reject(pending.sealed, version, str(exc))
        pending.chunks[int(index)] = payload
        if len(pending.chunks) < len(pending.descriptor.chunks):
            return None
        return self._install(pending)

    # -- installing --------------------------------------------------------------------------

    def _install(self, pending: _Pending) -> Outcome:
        descriptor = pending.descriptor
        version = descriptor.version
        self._drop_pending()
        try:
            files = bundle.unpack(descriptor, [pending.chunks[i]
                                                 for i in range(len(descriptor.chunks))])
        except bundle.DeliveryError as exc:
            return self._reject(pending.sealed, version, str(exc))
        outcome = self._check_and_install(version, files)
        if outcome.rejected is not None:
            return self._reject(pending.sealed, version, outcome.rejected)
        self._report()
        return outcome

    def install_local(self, export_dir: Path) -> Outcome:
        """Install an export directory on this device (``fededge agent --install``): the same
        checks as a delivered bundle after its signature (the manifest's hashes, the
        federation's input and classes, the smoke test). A running agent switches to it
        within a second."""
        self.installs.clean()
        try:
            files = bundle.read_export(export_dir)
        except bundle.DeliveryError as exc:
            return Outcome(rejected=str(exc))
        current = self.installs.pointer().current
        if bundle.same_content(current, files[runtime.MANIFEST]):
            return Outcome(installed=current, already=True)
        version = bundle.version_id(files[runtime.MANIFEST], dt.datetime.now(dt.timezone.utc))
        return self._check_and_install(version, files)

    def _check_and_install(self, version: str, files: dict[str, bytes]) -> Outcome:
        """Stage ``files`` as ``version``, check them, and make them current; the reason of
        the first failed check otherwise (the staged copy is then deleted)."""
        try:
            path = self.installs.stage(version, files)
            manifest = runtime.read_manifest(path)
            bundle.check_fits(manifest, self.kit.config["input_shape"],
                                self.kit.config["num_classes"])
        except (OSError, runtime.InferenceError, bundle.DeliveryError) as exc:
            self.installs.discard(version)
            return Outcome(rejected=str(exc))
        try:
            model = smoke_test(path, manifest, self.providers, self.threads)
        except bundle.DeliveryError as exc:
            self.installs.discard(version)
            self._smoke = {"version": version, "passed": False, "detail": str(exc)}
            return Outcome(rejected=str(exc))
        self.installs.activate(version)
        self.served, self._loaded = Served(version, model), version
        self._smoke = {"version": version, "passed": True,
                       "detail": f"{SMOKE_SAMPLES} synthetic samples on "
                                 f"{', '.join(model.providers)}"}
        self.events(f"installed {version} (smoke test passed on {', '.join(model.providers)})")
        return Outcome(installed=version)

    def _reject(self, sealed: str, version: str | None, reason: str) -> Outcome:
        log.warning("refused bundle %s: %s", version or "(unverified)", reason)
        self.events(f"refused bundle {version or '(unverified)'}: {reason}")
        self._refused.add(sealed)
        if self._pending is not None and self._pending.sealed == sealed:
            self._drop_pending()
        self._rejection = {"version": version, "sealed_sha256": sealed, "reason": reason,
                           "at": _now()}
        self._report()
        return Outcome(rejected=reason)

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._transport.unsubscribe(self.topics.deploy_chunks(
                self.kit.device, self._pending.descriptor.version))
            self._pending = None

    def _follow_pointer(self) -> None:
        """Serve whatever the install pointer names (changed by ``--rollback``, or at start)."""
        current = self.installs.pointer().current
        if current == self._loaded:
            return
        self._loaded = current
        self.served = None
        if current is not None:
            try:
                model = runtime.EdgeModel(self.installs.path(current), threads=self.threads,
                                          providers=self.providers)
                self.served = Served(current, model)
                self.events(f"serving {current}")
            except (runtime.InferenceError, OSError) as exc:
                log.error("installed version %s cannot be served: %s", current, exc)
                self.events(f"installed version {current} cannot be served: {exc}")
        if self._transport is not None:
            self._report()

    def _report(self, status: str = "online") -> None:
        """Publish the report, retained; while disconnected nothing is queued: the agent
        reports again after the next connect."""
        if self._transport is not None and self._transport.connected:
            self._transport.publish(self.topics.agent_status(self.kit.device),
                                    json.dumps(self.report(status)).encode(), retain=True)

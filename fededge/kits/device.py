"""Running one device from its kit: its private data, its student, the federation's client.

Assembled by ``federation.wiring`` like every device; what the kit adds is the broker address
and credentials, the student named in ``client.toml``, and the split re-derived locally from the
kit's dataset reference (checked against the provisioned proxy set's SHA-256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.client import DeviceIdentity, FederationClient, LocalData
from fededge.kits.kit import STATE_DIR, Kit, KitError
from fededge.kits.mqtt import connect_chunked
from fededge.kits.run import kit_config, kit_split
from fededge.learn.data import FederatedSplit, load_private_npz
from fededge.learn.privacy import worst_case_mu
from fededge.learn.userzoo import load_user_zoo
from fededge.learn.zoo import estimate_cost
from fededge.profiles import get_profile, usable_threads
from fededge.transport.base import Handler, Transport, TransportWrapper
from fededge.wire.envelope import decode
from fededge.wire.messages import ConfigMessage
from fededge.wire.topics import ProtocolError, Topics


class ConfigGuard(TransportWrapper):
    """Holds back a federation config that would release more than the device agreed to.

    Local DP is only local if the device, not the server, decides the noise: the server's
    published config must not imply a weaker worst-case guarantee than the one provisioned in
    this kit, nor collect the trained student when the kit keeps it on the device. Such a
    config never reaches the client, which therefore never uploads.
    """

    def __init__(self, inner: Transport, federation: str, floor: FederationConfig) -> None:
        super().__init__(inner)
        self._config_topic = Topics(federation).config
        self._floor, self._floor_noise = worst_case_mu(floor), floor.ldp_noise_multiplier
        self._keeps_model = not floor.collect_models
        self.refusal: str | None = None

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        if topic_filter != self._config_topic:
            self.inner.subscribe(topic_filter, handler)
            return

        def checked(topic: str, payload: bytes) -> None:
            reason = self._weaker(payload)
            if reason is None:
                handler(topic, payload)
            else:
                self.refusal = reason
        self.inner.subscribe(topic_filter, checked)

    def _weaker(self, payload: bytes) -> str | None:
        try:
            offered = ConfigMessage.parse(decode(payload)).config
        except ProtocolError:
            return None  # malformed: the client rejects it with its own reason
        if offered.collect_models and self._keeps_model:
            return ("the server's config collects the trained students (collect_models), "
                    "which this kit keeps on the device; refusing to take part")
        if worst_case_mu(offered) <= self._floor * (1 + 1e-9):
            return None
        return (f"the server's config (noise multiplier {offered.ldp_noise_multiplier}, "
                f"{offered.rounds} rounds) releases more than this kit's local differential "
                f"privacy settings allow (noise multiplier {self._floor_noise}); refusing to "
                "take part")


@dataclass
class ClientRun:
    client: FederationClient
    privacy: dict[str, float] | None


def private_data(path: str | Path, split: FederatedSplit) -> tuple[np.ndarray, np.ndarray]:
    """A device's own labelled ``.npz``, standardized like the federation's data."""
    X, y = load_private_npz(path, split.input_shape, split.num_classes)
    return split.preprocessing.apply(X), y


def _local_data(kit: Kit, data: str | Path | None) -> tuple[LocalData, FederatedSplit, str]:
    split, dataset_name = kit_split(kit)
    data = data if data is not None else kit.data
    if data is not None:
        X, y = private_data(data, split)
    elif kit.shard is not None:
        X, y = split.clients[kit.shard].X, split.clients[kit.shard].y
    else:
        raise KitError(f"{kit.file}: device {kit.device!r} has no private data; pass "
                       "--data PATH.npz")
    return (LocalData(X, y, split.public_X, split.proxy_sha256, split.test_X, split.test_y),
            split, dataset_name)


def load_kit_zoo(kit: Kit, split: FederatedSplit) -> None:
    """The kit's copy of the federation's zoo file, checked and registered, so the device
    builds its user student from it; a copy whose students measure otherwise than
    provisioning recorded (the server checks sizes with those figures) is refused."""
    if kit.zoo is None:
        return
    path = kit.path(kit.zoo)
    loaded = {s.name: s.figures for s in load_user_zoo(path, tuple(split.input_shape),
                                                        split.num_classes)}
    for name, recorded in kit.zoo_students.items():
        got = loaded.get(name)
        if got is None or (got.params, got.flops, got.activation_floats) != (
                recorded.params, recorded.flops, recorded.activation_floats):
            found = "is missing" if got is None else f"has {got.params:,} parameters"
            raise KitError(f"{path}: student {name!r} {found}, provisioning measured "
                           f"{recorded.params:,}; check the kit with `fededge verify-kit "
                           f"{kit.directory}` and re-provision it")


def device_kit(kit: Kit) -> Kit:
    """``kit``, if it is one of a device that trains; the error says what to run instead."""
    if kit.is_server:
        raise KitError(f"{kit.file}: this is the server's kit; pass a device kit")
    if not kit.trains:
        raise KitError(f"{kit.file}: device {kit.device!r} is agent-only (role = "
                       f"\"{kit.role}\", it runs the model of {kit.model_from!r}) and does not "
                       f"train; run `fededge agent --kit {kit.directory}` instead")
    return kit


def run_client(kit: Kit, *, data: str | Path | None = None, state: Path | None = None,
               threads: int | None = None,
               on_progress: Callable[[dict[str, Any]], None] = lambda entry: None) -> ClientRun:
    """Join the federation and take part until its last round; returns the finished client."""
    floor = kit_config(device_kit(kit))
    threads = threads or usable_threads(get_profile(kit.profile))
    torch.set_num_threads(threads)
    local, split, dataset = _local_data(kit, data)
    load_kit_zoo(kit, split)
    params = estimate_cost(kit.student, split.input_shape, split.num_classes).params
    transport, chunked = connect_chunked(
        kit, will=FederationClient.last_will(kit.federation, kit.device))
    guard = ConfigGuard(chunked, kit.federation, floor)
    client = wiring.build_client(
        guard, floor, DeviceIdentity(kit.device, kit.profile, kit.student, params), local,
        seed=kit.seed, checkpoint_dir=state or kit.path(STATE_DIR),
        checkpoint_meta=wiring.checkpoint_meta(split, dataset)).start()
    finished = False
    try:
        reported = 0
        while not client.wait(0.5):
            for entry in client.history[reported:]:
                on_progress(entry)
            reported = len(client.history)
            if guard.refusal:
                raise KitError(f"{kit.device}: {guard.refusal}")
        for entry in client.history[reported:]:
            on_progress(entry)
        if client.error is not None:
            raise client.error
        finished = True
    finally:
        client.stop()
        if finished:
            transport.close()
        else:
            transport.abort()  # the broker publishes our Last Will: 'offline'
    privacy = getattr(client.state.strategy, "privacy", None)
    return ClientRun(client, privacy.report() if privacy is not None else None)

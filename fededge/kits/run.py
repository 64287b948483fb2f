"""Running the federation server from its kit, over TLS with the kit's credentials.

Assembled by ``federation.wiring`` like every server; what the kit adds is where things come
from: the broker address and credentials, the settings of its ``[config]`` table, the devices
to wait for, and (for a strategy that computes at the server, or a federation that collects
the trained students) the split re-derived from the kit's dataset reference. It also makes
sure the federation has one server (``lock``), and when the rounds are over writes
``summary.json`` (and, when students were collected, ``eval_data.npz``) into the state
directory, in the layout of a ``fededge simulate`` run, so ``fededge export KITS/server`` reads
it like one. Torch-free for fedmd and fedavg (``device.py`` runs a device).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge import __version__
from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.report import RoundRow, round_rows
from fededge.federation.server import FederationServer, ServerEvents
from fededge.federation.store import MODELS_DIR
from fededge.federation.strategies import strategy_pair
from fededge.files import atomic_write
from fededge.kits import lock
from fededge.kits.kit import STATE_DIR, Kit, KitError
from fededge.kits.mqtt import connect_chunked
from fededge.learn.arch import Measure
from fededge.learn.data import FederatedSplit, load_dataset, split_federated
from fededge.learn.zoo import register_measured

SUMMARY_FILE, EVAL_DATA_FILE = "summary.json", "eval_data.npz"  # as `fededge simulate` writes


def kit_config(kit: Kit) -> FederationConfig:
    """The federation settings the kit was provisioned with (a fresh run id each start)."""
    return FederationConfig.from_dict(kit.config)


def register_kit_students(kit: Kit, config: FederationConfig) -> None:
    """The federation's own students (its zoo file), as provisioning measured them, made known
    by name without torch: the server checks a collected student's size with them."""
    for name, m in kit.zoo_students.items():
        register_measured(name, config.input_shape, config.num_classes,
                          Measure(m.params, m.flops, m.activation_floats, (config.num_classes,)))


# ----------------------------------------------------------------------------- server

@dataclass
class ServerRun:
    """What a finished server reports (its store is closed by then)."""

    rows: list[RoundRow]
    rounds: int
    accepted: int
    rejected: int
    collected: list[str]     # devices whose trained student the server keeps (collect_models)
    summary: Path            # the state directory's summary.json


def run_server(kit: Kit, *, state: Path | None = None, join_timeout: float = 300.0,
               events: ServerEvents | None = None) -> ServerRun:
    """Publish the config, wait for the kit's devices and drive every round to the end. The
    server's state goes to ``state`` (default KIT/state), so a restart resumes the run. Refused
    (``lock.ServerLockError``) while another server runs the federation."""
    if not kit.is_server:
        raise KitError(f"{kit.file}: this is device {kit.device!r}'s kit; pass the server kit")
    config = kit_config(kit)
    register_kit_students(kit, config)
    needs_proxy = strategy_pair(config.strategy)[0].needs_proxy
    split, dataset = kit_split(kit) if needs_proxy or config.collect_models else (None, "")
    strategy = wiring.server_strategy(config, split.public_X if needs_proxy else None)
    lock.check(kit)  # before anything changes: a refused server leaves the state as it was
    state = Path(state or kit.path(STATE_DIR))
    store = wiring.open_store(state)  # resumes an unfinished run
    (state / SUMMARY_FILE).unlink(missing_ok=True)  # describes a finished run; written at the end
    mqtt, transport = connect_chunked(kit, will=lock.will(kit))
    try:
        server = wiring.build_server(
            transport, config, expected_clients=len(kit.devices), store=store,
            context={"devices": list(kit.devices)}, strategy=strategy,
            join_timeout=join_timeout, events=events,
            model_meta=wiring.checkpoint_meta(split, dataset) if split is not None else None)
        lock.claim(mqtt, kit, server.config.run_id)
        server.run()
        rows = round_rows(server.metrics, server.history)
        _write_summary(state, server, rows, dataset, split)
        if kit.zoo is not None:  # export rebuilds collected user students from it
            shutil.copyfile(kit.path(kit.zoo), state / kit.zoo)
        return ServerRun(rows, len(server.history), server.accepted_uploads,
                         sum(server.rejections.values()), sorted(server.collected),
                         state / SUMMARY_FILE)
    finally:
        lock.release(mqtt, kit)
        transport.close()
        store.close()


def _write_summary(state: Path, server: FederationServer, rows: list[RoundRow], dataset: str,
                   split: FederatedSplit | None) -> None:
    """``summary.json`` like a simulate run's (its ``clients`` are the collected students, with
    where each one is), and the raw test and proxy data export verifies and calibrates with."""
    config = server.config
    final = server.metrics.get(config.rounds, {})
    clients = [{"id": device, "profile": meta.get("profile"), "student": meta.get("student"),
                "params": meta.get("params"),
                "accuracy": final.get(device, {}).get("accuracy", meta.get("accuracy")),
                "checkpoint": f"{MODELS_DIR}/{device}"}
               for device, meta in sorted(server.collected.items())]
    accuracies = [info["accuracy"] for info in final.values() if info.get("accuracy") is not None]
    summary: dict[str, Any] = {
        "fededge_version": __version__, "source": "fededge server", "strategy": config.strategy,
        "aggregator": config.aggregator, "dataset": dataset, "rounds": config.rounds,
        "collect_models": config.collect_models,
        "mean_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "clients": clients,
        "missing_models": sorted(set(final) - set(server.collected))
        if config.collect_models else [],
        "bytes_up": sum(r.bytes_up for r in rows), "bytes_down": sum(r.bytes_down for r in rows),
        "uploads_accepted": server.accepted_uploads,
        "uploads_expected": sum(len(r.participants) for r in server.history),
        "rejected": dict(server.rejections), "config": config.to_dict(),
        "resumed_from_round": server.resumed_from_round,
    }
    if split is not None and clients:
        data = io.BytesIO()
        np.savez_compressed(data, test_X=split.raw_test_X, test_y=split.test_y,
                            public_X=split.raw_public_X)
        atomic_write(state / EVAL_DATA_FILE, data.getvalue())
    atomic_write(state / SUMMARY_FILE, json.dumps(summary, indent=2))


def kit_split(kit: Kit) -> tuple[FederatedSplit, str]:
    """The federation's split re-derived from the kit's dataset reference, checked against the
    provisioned proxy set; and the dataset's name."""
    dataset = load_dataset(kit.dataset_source())
    ref = kit.dataset
    split = split_federated(dataset, ref.shards, partition=ref.partition, alpha=ref.alpha,
                            seed=ref.seed)
    if split.proxy_sha256 != ref.proxy_sha256:
        raise KitError(f"{kit.file}: the proxy set derived here ({split.proxy_sha256[:12]}) "
                       f"differs from the provisioned one ({ref.proxy_sha256[:12]}); install the "
                       "fededge version that provisioned the kit")
    return split, dataset.name

"""Running the federation server from its kit, over TLS with the kit's credentials.

Assembled by ``federation.wiring`` like every server; what the kit adds is where things come
from: the broker address and credentials, the settings of its ``[config]`` table, the devices
to wait for, and (for a strategy that computes at the server) the split re-derived from the
kit's dataset reference. Torch-free for fedmd and fedavg (``device.py`` runs a device).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.report import RoundRow, round_rows
from fededge.federation.server import ServerEvents
from fededge.federation.strategies import strategy_pair
from fededge.kits.kit import STATE_DIR, Kit, KitError
from fededge.kits.mqtt import connect
from fededge.learn.data import FederatedSplit, load_dataset, split_federated


def kit_config(kit: Kit) -> FederationConfig:
    """The federation settings the kit was provisioned with (a fresh run id each start)."""
    return FederationConfig.from_dict(kit.config)


# ----------------------------------------------------------------------------- server

@dataclass
class ServerRun:
    """What a finished server reports (its store is closed by then)."""

    rows: list[RoundRow]
    rounds: int
    accepted: int
    rejected: int


def run_server(kit: Kit, *, state: Path | None = None, join_timeout: float = 300.0,
               events: ServerEvents | None = None) -> ServerRun:
    """Publish the config, wait for the kit's devices and drive every round to the end. The
    server's state goes to ``state`` (default KIT/state), so a restart resumes the run."""
    if not kit.is_server:
        raise KitError(f"{kit.file}: this is device {kit.device!r}'s kit; pass the server kit")
    config = kit_config(kit)
    needs_proxy = strategy_pair(config.strategy)[0].needs_proxy
    strategy = wiring.server_strategy(config, kit_split(kit)[0].public_X if needs_proxy else None)
    store = wiring.open_store(state or kit.path(STATE_DIR))  # resumes an unfinished run
    transport = connect(kit)
    try:
        server = wiring.build_server(transport, config, expected_clients=len(kit.devices),
                                     store=store, context={"devices": list(kit.devices)},
                                     strategy=strategy, join_timeout=join_timeout, events=events)
        server.run()
        return ServerRun(round_rows(server.metrics, server.history), len(server.history),
                         server.accepted_uploads, sum(server.rejections.values()))
    finally:
        transport.close()
        store.close()


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

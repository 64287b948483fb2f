"""A whole federation on one machine: broker, server and N clients, one command.

Each client gets its own MQTT connection and worker thread and runs exactly the code a device
runs; only the data split and the baselines (local-only, centralized) are simulation-specific.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .broker import EmbeddedBroker, MosquittoBroker
from .client import DeviceIdentity, FederationClient, LocalData
from .config import FederationConfig
from .data import FederatedSplit, load_dataset, split_federated
from .models import build_student
from .profiles import DeviceProfile, get_profile, load_catalog, pick_student
from .report import RoundRow, round_rows, union_seconds, write_plot
from .server import FederationServer, ServerEvents
from .strategy import strategy_pair
from .trainer import Trainer
from .transport import MqttTransport

log = logging.getLogger(__name__)

BROKERS = ("embedded", "mosquitto")


class SimulationError(ValueError):
    """A simulation option that cannot work; the message names the option and the fix."""


@dataclass
class SimulationOptions:
    data: str | None = None
    clients: int = 10
    rounds: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    aggregator: str = "era"
    strategy: str = "fedmd"
    profiles: list[str] | None = None
    out: Path = Path("runs/latest")
    broker: str = "embedded"
    baselines: bool = True
    torch_threads: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Participant:
    device_id: str
    profile: DeviceProfile
    student: str
    params: int


def _default_profiles() -> list[DeviceProfile]:
    """Every catalog profile that can train, slowest first, so N clients spread over them."""
    usable = [p for p in load_catalog().values() if p.can_train]
    return sorted(usable, key=lambda p: p.peak_gflops)


def plan_participants(opts: SimulationOptions, split: FederatedSplit) -> list[Participant]:
    """Assign profiles round-robin and pick each device's student from its profile."""
    if opts.profiles:
        profiles = [get_profile(name.strip()) for name in opts.profiles]
    else:
        profiles = _default_profiles()
    people = []
    for i in range(opts.clients):
        profile = profiles[i % len(profiles)]
        choice = pick_student(profile, split.input_shape, split.num_classes)
        if choice.inference_only:
            raise SimulationError(
                f"profile {profile.name!r} cannot train (can_train = false); it can only run "
                "exported students. Leave it out of --profiles")
        people.append(Participant(f"dev{i:03d}-{profile.name}", profile, choice.student,
                                  choice.cost.params))
    return people


def _start_broker(kind: str):
    if kind == "embedded":
        return EmbeddedBroker().start()
    if kind == "mosquitto":
        return MosquittoBroker().start()
    raise SimulationError(f"unknown broker {kind!r}; choose one of: {', '.join(BROKERS)}")


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))


def _new_trainer(p: Participant, split: FederatedSplit, config: FederationConfig,
                 seed: int) -> Trainer:
    torch.manual_seed(seed)
    model = build_student(p.student, split.input_shape, split.num_classes)
    return Trainer(model, lr=config.lr, batch_size=config.batch_size, seed=seed)


class _BackgroundBaselines:
    """Local-only (each student on its private data, with the federation's private-epoch
    budget) and centralized (each architecture on all private data pooled) accuracies.

    They train in a thread while the federation runs: the federation leaves part of the second
    core idle (clients wait on each other and on the broker), and torch releases the GIL inside
    its kernels, so this hides most of their cost. Models are built here, in the caller's
    thread, because weight init draws from torch's global RNG, which the clients also use.
    """

    def __init__(self, people: list[Participant], split: FederatedSplit,
                 config: FederationConfig, seed: int) -> None:
        self._split = split
        self._local_epochs = config.warmup_epochs + config.rounds * config.revisit_epochs
        self._central_epochs = max(20, config.warmup_epochs)
        self._local = [_new_trainer(p, split, config, seed + i) for i, p in enumerate(people)]
        self._central: dict[str, Trainer] = {}
        for i, p in enumerate(people):
            if p.student not in self._central:
                self._central[p.student] = _new_trainer(p, split, config, seed + i)
        self._students = [p.student for p in people]
        self._value: tuple[list[float], list[float]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="baselines", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        split = self._split
        try:
            local = []
            for trainer, data in zip(self._local, split.clients):
                trainer.fit(data.X, data.y, epochs=self._local_epochs)
                local.append(trainer.accuracy(split.test_X, split.test_y))
            pooled_X = np.concatenate([c.X for c in split.clients])
            pooled_y = np.concatenate([c.y for c in split.clients])
            central = {}
            for student, trainer in self._central.items():
                trainer.fit(pooled_X, pooled_y, epochs=self._central_epochs)
                central[student] = trainer.accuracy(split.test_X, split.test_y)
            self._value = local, [central[s] for s in self._students]
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def result(self) -> tuple[list[float], list[float]]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass
class SimulationResult:
    summary: dict[str, Any]
    rows: list[RoundRow]
    out: Path


def run_simulation(opts: SimulationOptions,
                   on_round: Callable[[RoundRow | None, str], None] = lambda row, msg: None
                   ) -> SimulationResult:
    """Run the federation; ``on_round`` is called with each finished round (for progress)."""
    if opts.clients < 1:
        raise SimulationError(f"--clients must be at least 1, got {opts.clients}")
    if opts.broker not in BROKERS:
        raise SimulationError(f"unknown broker {opts.broker!r}; choose one of: {', '.join(BROKERS)}")
    strategy_server, _ = strategy_pair(opts.strategy)
    torch.set_num_threads(opts.torch_threads)
    _seed_everything(opts.seed)
    started = time.time()
    dataset = load_dataset(opts.data)
    split = split_federated(dataset, opts.clients, partition=opts.partition, alpha=opts.alpha,
                            seed=opts.seed)
    config = FederationConfig(
        strategy=opts.strategy, aggregator=opts.aggregator, rounds=opts.rounds, seed=opts.seed,
        num_classes=split.num_classes, input_shape=tuple(split.input_shape),
        proxy_sha256=split.proxy_sha256, proxy_size=len(split.public_X)).replace(**opts.overrides)
    server_strategy = strategy_server(config)  # validates the aggregator before any work
    people = plan_participants(opts, split)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    on_round(None, f"{len(people)} clients, {len({p.student for p in people})} student "
                   f"architectures, {opts.broker} broker")

    baselines = _BackgroundBaselines(people, split, config, opts.seed) if opts.baselines else None
    broker = _start_broker(opts.broker)
    transports: list[MqttTransport] = []
    try:
        server_transport = MqttTransport("server", broker.host, broker.port).connect()
        transports.append(server_transport)
        clients = []
        for i, p in enumerate(people):
            will = FederationClient.last_will(config.federation, p.device_id)
            transport = MqttTransport(p.device_id, broker.host, broker.port, will=will).connect()
            transports.append(transport)
            data = split.clients[i]
            local = LocalData(data.X, data.y, split.public_X, split.proxy_sha256,
                              split.test_X, split.test_y)
            meta = {"input_shape": list(split.input_shape), "num_classes": split.num_classes,
                    "class_names": list(split.class_names),
                    "preprocessing": split.preprocessing.to_dict(),
                    "dataset": dataset.name, "fededge_version": __version__}
            clients.append(FederationClient(
                transport, config.federation,
                DeviceIdentity(p.device_id, p.profile.name, p.student, p.params),
                _new_trainer(p, split, config, opts.seed + i), local,
                checkpoint_dir=out / "clients" / p.device_id, checkpoint_meta=meta).start())

        server: FederationServer

        def round_reported(rnd: int) -> None:
            on_round(round_rows(server.metrics, server.history, upto=rnd)[-1], "")

        server = FederationServer(server_transport, config, server_strategy,
                                  expected_clients=len(people),
                                  events=ServerEvents(on_round_reported=round_reported))
        fed_start = time.time()
        server.run()
        for c in clients:
            c.wait(timeout=config.deadline_s)
        fed_end = time.time()
        failed = [c.identity.device_id for c in clients if c.error is not None]
        if failed:
            raise SimulationError(f"clients {failed} failed: {clients[0].error}")
    finally:
        for t in transports:
            t.close()
        broker.stop()

    rows = round_rows(server.metrics, server.history)
    compute = union_seconds(
        [tuple(iv) for per_round in server.metrics.values() for info in per_round.values()
         for iv in info.get("compute_intervals", [])], fed_start, fed_end)
    local_acc, central_acc = ([], [])
    if baselines is not None:
        on_round(None, "finishing baselines (local-only, centralized)")
        local_acc, central_acc = baselines.result()
    final = server.metrics.get(config.rounds, {})
    client_entries = [{"id": p.device_id, "profile": p.profile.name, "student": p.student,
                       "params": p.params, "accuracy": final.get(p.device_id, {}).get("accuracy"),
                       **({"local_only_accuracy": local_acc[i],
                           "centralized_accuracy": central_acc[i]} if local_acc else {})}
                      for i, p in enumerate(people)]
    accs = [c["accuracy"] for c in client_entries if c["accuracy"] is not None]
    bytes_up = sum(r.bytes_up for r in rows)
    bytes_down = sum(r.bytes_down for r in rows)
    fed_wall = fed_end - fed_start
    summary = {
        "fededge_version": __version__, "strategy": config.strategy,
        "aggregator": config.aggregator, "dataset": dataset.name, "partition": opts.partition,
        "alpha": opts.alpha, "seed": opts.seed, "broker": opts.broker,
        "rounds": config.rounds, "mean_accuracy": float(np.mean(accs)) if accs else None,
        "local_only_mean_accuracy": float(np.mean(local_acc)) if local_acc else None,
        "centralized_mean_accuracy": float(np.mean(central_acc)) if central_acc else None,
        "clients": client_entries, "bytes_up": bytes_up, "bytes_down": bytes_down,
        "bytes_per_client_round": (bytes_up + bytes_down) / max(1, len(people) * config.rounds),
        "uploads_accepted": server.accepted_uploads,
        "uploads_expected": sum(len(r.participants) for r in server.history),
        "rejected": dict(server.rejections),
        "federation_seconds": fed_wall, "compute_seconds": compute,
        "overhead_share": max(0.0, 1.0 - compute / fed_wall) if fed_wall > 0 else None,
        "wall_seconds": time.time() - started, "config": config.to_dict(),
    }
    with open(out / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_dict()) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out / "eval_data.npz", test_X=split.raw_test_X, test_y=split.test_y,
                        public_X=split.raw_public_X)
    np.savez_compressed(out / "test.npz", X=split.raw_test_X, y=split.test_y)  # for `infer`
    write_plot(rows, out / "rounds.png", title=f"fededge {config.strategy} on {dataset.name}")
    return SimulationResult(summary, rows, out)

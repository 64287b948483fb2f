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

from fededge import __version__
from fededge.config import FederationConfig
from fededge.errors import FedEdgeError
from fededge.federation.client import DeviceIdentity, FederationClient, LocalData
from fededge.federation.report import RoundRow, round_rows, union_seconds, write_plot
from fededge.federation.server import FederationServer, ServerEvents
from fededge.federation.store import Store, StoreError
from fededge.federation.strategies import strategy_pair
from fededge.learn.data import FederatedSplit, load_dataset, split_federated
from fededge.learn.models import build_student, estimate_cost, zoo_for
from fededge.learn.privacy import privacy_report
from fededge.learn.trainer import Trainer
from fededge.profiles import DeviceProfile, get_profile, load_catalog, pick_student
from fededge.transport.base import Transport
from fededge.transport.brokers import EmbeddedBroker, MosquittoBroker
from fededge.transport.chunking import MIN_PAYLOAD, ChunkingTransport
from fededge.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

BROKERS = ("embedded", "mosquitto")


class SimulationError(FedEdgeError, ValueError):
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
    # > 0 makes slower profiles real stragglers: each client sleeps straggle × (fastest
    # profile's compute / its own − 1) times the duration of each of its compute steps.
    straggle: float = 0.0
    # Every device trains this student (a homogeneous federation); strategies that average
    # weights default to the largest student every device's profile can train.
    student: str | None = None
    # > 0: payloads above this many bytes travel in chunks (chunking.py), for brokers that
    # cap the message size.
    max_message: int = 0


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


def _device_profiles(opts: SimulationOptions) -> list[DeviceProfile]:
    """One profile per device, assigned round-robin."""
    profiles = ([get_profile(name.strip()) for name in opts.profiles] if opts.profiles
                else _default_profiles())
    return [profiles[i % len(profiles)] for i in range(opts.clients)]


def homogeneous_student(opts: SimulationOptions, split: FederatedSplit) -> str:
    """The student every device trains: ``--student``, or for a strategy that averages
    weights the largest student every device can train; '' when each device picks its own."""
    if opts.student or not strategy_pair(opts.strategy)[0].homogeneous:
        return opts.student or ""
    picks = [pick_student(p, split.input_shape, split.num_classes).student
             for p in _device_profiles(opts)]
    return min(picks, key=zoo_for(split.input_shape).index)


def plan_participants(opts: SimulationOptions, split: FederatedSplit) -> list[Participant]:
    """Assign profiles round-robin and pick each device's student from its profile."""
    forced = homogeneous_student(opts, split)
    people = []
    for i, profile in enumerate(_device_profiles(opts)):
        choice = pick_student(profile, split.input_shape, split.num_classes)
        if choice.inference_only:
            raise SimulationError(
                f"profile {profile.name!r} cannot train (can_train = false); it can only run "
                "exported students. Leave it out of --profiles")
        student = forced or choice.student
        people.append(Participant(f"dev{i:03d}-{profile.name}", profile, student,
                                  estimate_cost(student, split.input_shape,
                                                split.num_classes).params))
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


def new_trainer(student: str, split: FederatedSplit, config: FederationConfig,
                seed: int) -> Trainer:
    """A freshly initialised student and its trainer; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    model = build_student(student, split.input_shape, split.num_classes)
    return Trainer(model, lr=config.lr, batch_size=config.batch_size, seed=seed)


def checkpoint_meta(split: FederatedSplit, dataset: str) -> dict[str, Any]:
    """What ``fededge export`` needs beside a checkpoint to rebuild and package the student."""
    return {"input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "class_names": list(split.class_names),
            "preprocessing": split.preprocessing.to_dict(), "dataset": dataset,
            "fededge_version": __version__}


def federation_config(opts: SimulationOptions, split: FederatedSplit) -> FederationConfig:
    """The federation settings the options and the split imply."""
    return FederationConfig(
        strategy=opts.strategy, aggregator=opts.aggregator, rounds=opts.rounds, seed=opts.seed,
        num_classes=split.num_classes, input_shape=tuple(split.input_shape),
        proxy_sha256=split.proxy_sha256, proxy_size=len(split.public_X),
        student=homogeneous_student(opts, split)).replace(**opts.overrides)


def resume_context(opts: SimulationOptions) -> dict[str, Any]:
    """Options outside the config that decide the split and the devices: a resumed run must
    agree on them."""
    return {"data": opts.data, "clients": opts.clients, "partition": opts.partition,
            "alpha": opts.alpha, "profiles": opts.profiles}


def slowdown(people: list[Participant], index: int, straggle: float) -> float:
    """How many times its own compute time client ``index`` sleeps to play its profile."""
    fastest = max(p.profile.relative_compute for p in people)
    return straggle * (fastest / people[index].profile.relative_compute - 1)


def build_client(people: list[Participant], index: int, split: FederatedSplit, dataset: str,
                 config: FederationConfig, transport: MqttTransport, checkpoint_dir: Path,
                 straggle: float = 0.0) -> FederationClient:
    """Device ``index`` of a simulated federation, exactly as a real device would run."""
    p, data = people[index], split.clients[index]
    local = LocalData(data.X, data.y, split.public_X, split.proxy_sha256, split.test_X,
                      split.test_y)
    return FederationClient(
        transport, config.federation,
        DeviceIdentity(p.device_id, p.profile.name, p.student, p.params),
        new_trainer(p.student, split, config, config.seed + index), local,
        checkpoint_dir=checkpoint_dir, checkpoint_meta=checkpoint_meta(split, dataset),
        slowdown=slowdown(people, index, straggle))


def chunked(transport: MqttTransport, opts: SimulationOptions) -> Transport:
    """The transport, splitting payloads over ``--max-message`` bytes into chunks if set."""
    if not opts.max_message:
        return transport
    if opts.max_message < MIN_PAYLOAD:
        raise SimulationError(f"--max-message must be 0 (no chunking) or at least {MIN_PAYLOAD} "
                              f"bytes, got {opts.max_message}")
    return ChunkingTransport(transport, opts.max_message)


def open_store(out: Path) -> Store:
    """The run directory's server state; a finished run there is replaced by a fresh one, an
    unfinished one is resumed."""
    store = Store(out)
    if store.finished:
        store.close()
        Store.wipe(out)
        store = Store(out)
    return store


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
        self._local = [new_trainer(p.student, split, config, seed + i)
                       for i, p in enumerate(people)]
        self._central: dict[str, Trainer] = {}
        for i, p in enumerate(people):
            if p.student not in self._central:
                self._central[p.student] = new_trainer(p.student, split, config, seed + i)
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
    config = federation_config(opts, split)
    server_strategy = strategy_server(config, split.public_X)  # validates before any work
    people = plan_participants(opts, split)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    on_round(None, f"{len(people)} clients, {len({p.student for p in people})} student "
                   f"architectures, {opts.broker} broker")

    baselines = _BackgroundBaselines(people, split, config, opts.seed) if opts.baselines else None
    store = open_store(out)
    broker = _start_broker(opts.broker)
    transports: list[Transport] = []
    try:
        server_transport = chunked(MqttTransport("server", broker.host, broker.port).connect(),
                                   opts)
        transports.append(server_transport)
        server: FederationServer

        def round_reported(rnd: int) -> None:
            on_round(round_rows(server.metrics, server.history, upto=rnd)[-1], "")

        try:
            server = FederationServer(server_transport, config, server_strategy,
                                      expected_clients=len(people), store=store,
                                      context=resume_context(opts),
                                      events=ServerEvents(on_round_reported=round_reported))
        except StoreError as exc:
            raise SimulationError(f"{out} holds an unfinished run with other settings; pass "
                                  f"another --out or delete it ({exc})") from None
        config = server.config  # on resume: the stored run, with its run_id
        if server.resumed_from_round is not None:
            on_round(None, f"resuming at round {server.resumed_from_round}")
        clients = []
        for i, p in enumerate(people):
            will = FederationClient.last_will(config.federation, p.device_id)
            transport = chunked(MqttTransport(p.device_id, broker.host, broker.port,
                                              will=will).connect(), opts)
            transports.append(transport)
            clients.append(build_client(people, i, split, dataset.name, config, transport,
                                        out / "clients" / p.device_id, opts.straggle).start())
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
        "resumed_from_round": server.resumed_from_round,
        "privacy": privacy_report(config),
    }
    store.close()
    with open(out / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_dict()) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out / "eval_data.npz", test_X=split.raw_test_X, test_y=split.test_y,
                        public_X=split.raw_public_X)
    np.savez_compressed(out / "test.npz", X=split.raw_test_X, y=split.test_y)  # for `infer`
    write_plot(rows, out / "rounds.png", title=f"fededge {config.strategy} on {dataset.name}")
    return SimulationResult(summary, rows, out)

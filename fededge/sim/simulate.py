"""A whole federation on one machine: broker, server and N clients, one command.

Each client gets its own MQTT connection and worker thread and runs exactly the code a device
runs; only the data split and the baselines (local-only, centralized) are simulation-specific.
``run_simulation`` reads top to bottom: prepare (options → split, devices, config), federate
(broker, server, clients), summarize, write the run directory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fededge import __version__
from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.client import FederationClient
from fededge.federation.report import RoundRow, round_rows, union_seconds, write_plot
from fededge.federation.server import FederationAborted, FederationServer, ServerEvents
from fededge.federation.store import Store, StoreError
from fededge.federation.strategies import strategy_pair
from fededge.federation.strategies.base import ServerStrategy
from fededge.files import atomic_write
from fededge.learn.data import FederatedSplit
from fededge.learn.privacy import privacy_report
from fededge.sim.baselines import BackgroundBaselines
from fededge.sim.recipe import (
    BROKERS,
    Participant,
    SimulationError,
    SimulationOptions,
    device_client,
    federation_config,
    plan_participants,
    resume_context,
    split_for,
)
from fededge.transport.base import Transport
from fededge.transport.brokers import EmbeddedBroker, MosquittoBroker
from fededge.transport.chunking import MIN_PAYLOAD, ChunkingTransport
from fededge.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

Progress = Callable[[RoundRow | None, str], None]


@dataclass
class SimulationResult:
    summary: dict[str, Any]
    rows: list[RoundRow]
    out: Path


@dataclass
class _Plan:
    """Everything decided before the broker starts."""

    dataset: str
    split: FederatedSplit
    config: FederationConfig
    people: list[Participant]
    server_strategy: ServerStrategy


@dataclass
class _Federated:
    """What the federation itself produced."""

    server: FederationServer
    config: FederationConfig
    started: float
    ended: float


def run_simulation(opts: SimulationOptions,
                   on_round: Progress = lambda row, msg: None) -> SimulationResult:
    """Run the federation; ``on_round`` is called with each finished round (for progress)."""
    started = time.time()
    plan = _prepare(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    on_round(None, f"{len(plan.people)} clients, {len({p.student for p in plan.people})} "
                   f"student architectures, {opts.broker} broker")
    baselines = (BackgroundBaselines(plan.people, plan.split, plan.config, opts.seed)
                 if opts.baselines else None)
    store = wiring.open_store(out)
    try:
        fed = _federate(opts, plan, store, out, on_round, baselines)
        rows = round_rows(fed.server.metrics, fed.server.history)
        local_acc, central_acc = [], []
        if baselines is not None:
            on_round(None, "finishing baselines (local-only, centralized)")
            local_acc, central_acc = baselines.result()
        summary = _summary(opts, plan, fed, rows, local_acc, central_acc, started)
    finally:
        if baselines is not None:
            baselines.stop()
        store.close()
    _write_outputs(out, plan, rows, summary, fed.config)
    return SimulationResult(summary, rows, out)


def _prepare(opts: SimulationOptions) -> _Plan:
    """Validate the options and derive the split, the config and the devices (seeded)."""
    if opts.clients < 1:
        raise SimulationError(f"--clients must be at least 1, got {opts.clients}")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise SimulationError(f"--out {opts.out}: exists and is not a directory; choose "
                              "another run directory")
    if opts.broker not in BROKERS:
        raise SimulationError(f"unknown broker {opts.broker!r}; choose one of: "
                              f"{', '.join(BROKERS)}")
    if opts.max_message and opts.max_message < MIN_PAYLOAD:
        raise SimulationError(f"--max-message must be 0 (no chunking) or at least {MIN_PAYLOAD} "
                              f"bytes, got {opts.max_message}")
    strategy_pair(opts.strategy)  # an unknown strategy fails before any work
    torch.set_num_threads(opts.torch_threads)
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed % (2 ** 32))
    dataset, split = split_for(opts)
    config = federation_config(opts, split)
    server_strategy = wiring.server_strategy(config, split.public_X)  # validates before any work
    return _Plan(dataset.name, split, config, plan_participants(opts, split), server_strategy)


def _start_broker(kind: str) -> EmbeddedBroker | MosquittoBroker:
    return EmbeddedBroker().start() if kind == "embedded" else MosquittoBroker().start()


def _chunked(transport: MqttTransport, opts: SimulationOptions) -> Transport:
    """The transport, splitting payloads over ``--max-message`` bytes into chunks if set."""
    return ChunkingTransport(transport, opts.max_message) if opts.max_message else transport


def _federate(opts: SimulationOptions, plan: _Plan, store: Store, out: Path,
              on_round: Progress, baselines: BackgroundBaselines | None) -> _Federated:
    """Broker, server and one client per device, run to the federation's end."""
    with ExitStack() as stack:
        broker = _start_broker(opts.broker)
        stack.callback(broker.stop)
        clients: list[FederationClient] = []
        stack.callback(lambda: [client.stop() for client in clients])  # before the broker

        def connect(client_id: str, will: tuple[str, bytes] | None = None) -> Transport:
            transport = MqttTransport(client_id, broker.host, broker.port, will=will).connect()
            stack.callback(transport.close)
            return _chunked(transport, opts)

        server: FederationServer

        def round_reported(rnd: int) -> None:
            on_round(round_rows(server.metrics, server.history, upto=rnd)[-1], "")

        try:
            server = wiring.build_server(
                connect("server"), plan.config, expected_clients=len(plan.people), store=store,
                context=resume_context(opts), strategy=plan.server_strategy,
                events=ServerEvents(on_round_reported=round_reported))
        except StoreError as exc:
            raise SimulationError(f"{out} holds an unfinished run with other settings; pass "
                                  f"another --out or delete it ({exc})") from None
        config = server.config  # on resume: the stored run, with its run_id
        if server.resumed_from_round is not None:
            on_round(None, f"resuming at round {server.resumed_from_round}")
        clients += [device_client(plan.people, i, plan.split, plan.dataset, config,
                                  connect(p.device_id,
                                          will=FederationClient.last_will(config.federation,
                                                                          p.device_id)),
                                  out / "clients" / p.device_id, opts.straggle).start()
                    for i, p in enumerate(plan.people)]
        started = time.time()
        _run_watched(server, clients, broker, baselines, out)
        for client in clients:
            client.wait(timeout=config.deadline_s)
        ended = time.time()
        failed = [c for c in clients if c.error is not None]
        if failed:
            raise SimulationError(f"clients {[c.identity.device_id for c in failed]} failed: "
                                  f"{failed[0].error}")
    return _Federated(server, config, started, ended)


WATCH_S = 0.2


def _run_watched(server: FederationServer, clients: list[FederationClient],
                 broker: EmbeddedBroker | MosquittoBroker,
                 baselines: BackgroundBaselines | None, out: Path) -> None:
    """Run the server in a thread while this one watches every other part of the run: a
    device whose worker failed (a NaN loss), a broker that stopped or failed baselines abort
    the server within ``WATCH_S`` with that reason, and so does Ctrl-C (or SIGTERM, turned
    into it by the command). Nothing is left waiting for a part that is gone."""
    outcome: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome.append(exc)
    thread = threading.Thread(target=serve, name="server", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(WATCH_S)
            failure = _failure(clients, broker, baselines)
            if failure is not None:
                server.abort(failure)
    except KeyboardInterrupt:
        server.abort("interrupted")
        thread.join()
        raise
    if outcome:
        exc = outcome[0]
        if isinstance(exc, FederationAborted):
            raise SimulationError(f"{exc}; {out} keeps the rounds done so far: fix the cause "
                                  "and run the same command to resume") from None
        raise exc


def _failure(clients: list[FederationClient], broker: EmbeddedBroker | MosquittoBroker,
             baselines: BackgroundBaselines | None) -> str | None:
    """The first part of the run that failed, as one line, or None."""
    for client in clients:
        if client.error is not None:
            return f"device {client.identity.device_id} failed: {client.error}"
    if broker.failure() is not None:
        return broker.failure()
    if baselines is not None and baselines.error is not None:
        return f"the baselines failed: {baselines.error}"
    return None


def _summary(opts: SimulationOptions, plan: _Plan, fed: _Federated, rows: list[RoundRow],
             local_acc: list[float], central_acc: list[float], started: float) -> dict[str, Any]:
    server, config, people = fed.server, fed.config, plan.people
    compute = union_seconds(
        [tuple(iv) for per_round in server.metrics.values() for info in per_round.values()
         for iv in info.get("compute_intervals", [])], fed.started, fed.ended)
    final = server.metrics.get(config.rounds, {})
    clients = [{"id": p.device_id, "profile": p.profile.name, "student": p.student,
                "params": p.params, "accuracy": final.get(p.device_id, {}).get("accuracy"),
                **({"local_only_accuracy": local_acc[i],
                    "centralized_accuracy": central_acc[i]} if local_acc else {})}
               for i, p in enumerate(people)]
    accs = [c["accuracy"] for c in clients if c["accuracy"] is not None]
    bytes_up = sum(r.bytes_up for r in rows)
    bytes_down = sum(r.bytes_down for r in rows)
    wall = fed.ended - fed.started
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return {
        "fededge_version": __version__, "strategy": config.strategy,
        "aggregator": config.aggregator, "dataset": plan.dataset, "partition": opts.partition,
        "alpha": opts.alpha, "seed": opts.seed, "broker": opts.broker,
        "rounds": config.rounds, "mean_accuracy": mean(accs),
        "local_only_mean_accuracy": mean(local_acc),
        "centralized_mean_accuracy": mean(central_acc),
        "clients": clients, "bytes_up": bytes_up, "bytes_down": bytes_down,
        "bytes_per_client_round": (bytes_up + bytes_down) / max(1, len(people) * config.rounds),
        "uploads_accepted": server.accepted_uploads,
        "uploads_expected": sum(len(r.participants) for r in server.history),
        "rejected": dict(server.rejections),
        "federation_seconds": wall, "compute_seconds": compute,
        "overhead_share": max(0.0, 1.0 - compute / wall) if wall > 0 else None,
        "wall_seconds": time.time() - started, "config": config.to_dict(),
        "resumed_from_round": server.resumed_from_round,
        "privacy": privacy_report(config),
    }


def _write_outputs(out: Path, plan: _Plan, rows: list[RoundRow], summary: dict[str, Any],
                   config: FederationConfig) -> None:
    """metrics.jsonl, summary.json, the plot, and the raw test/proxy data export needs."""
    split = plan.split
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    np.savez_compressed(out / "eval_data.npz", test_X=split.raw_test_X, test_y=split.test_y,
                        public_X=split.raw_public_X)
    np.savez_compressed(out / "test.npz", X=split.raw_test_X, y=split.test_y)  # for `infer`
    write_plot(rows, out / "rounds.png", title=f"fededge {config.strategy} on {plan.dataset}")

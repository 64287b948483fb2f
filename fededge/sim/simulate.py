"""A whole federation on one machine: broker, server and N clients, one command.

Each client gets its own MQTT connection and worker thread and runs exactly the code a device
runs; only the data split and the baselines (local-only, centralized) are simulation-specific.
``run_simulation`` reads top to bottom: prepare (options → split, devices, config), federate
(broker, server, clients), summarize, write the run directory.

The run directory is live: ``metrics.jsonl`` gets each round's line as soon as every device
that took part reported it (flushed, so a killed run keeps every completed round),
``baselines.json`` the references as soon as they are trained, and ``summary.json`` and
``rounds.png`` are written at the end from the store, so a resumed run covers every round.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fededge import __version__
from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.client import FederationClient
from fededge.federation.report import (
    MetricsLog,
    RoundRow,
    round_rows,
    union_seconds,
    write_plot,
)
from fededge.federation.server import FederationAborted, FederationServer, ServerEvents
from fededge.federation.store import Store, StoreError
from fededge.federation.strategies import strategy_pair
from fededge.federation.strategies.base import ServerStrategy
from fededge.files import atomic_write
from fededge.learn.data import FederatedSplit
from fededge.learn.privacy import privacy_report
from fededge.learn.zoo import USER_ZOO_FILE
from fededge.sim.baselines import BackgroundBaselines, References
from fededge.sim.progress import OnStep, Phases
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

METRICS_FILE, SUMMARY_FILE, BASELINES_FILE, PLOT_FILE = (
    "metrics.jsonl", "summary.json", "baselines.json", "rounds.png")


@dataclass
class SimulationResult:
    """A finished simulation: its ``summary`` (as in ``summary.json``), one row per round (as
    in ``metrics.jsonl``; round 0 is the warm-up) and the run directory ``out``."""

    summary: dict[str, Any]
    rows: list[RoundRow]
    out: Path

    @property
    def mean_accuracy(self) -> float | None:
        return self.summary["mean_accuracy"]

    @property
    def students(self) -> dict[str, Any]:
        """Each device's trained student (``TrainedStudent``: ``predict``, ``logits``,
        ``model``), loaded from its checkpoint in ``out/clients/<device>``."""
        from fededge.delivery.export import load_student

        return {c["id"]: load_student(self.out / "clients" / c["id"])
                for c in self.summary["clients"]}


@dataclass
class Plan:
    """Everything decided before the broker starts (``prepare``)."""

    dataset: str
    split: FederatedSplit
    config: FederationConfig
    people: list[Participant]
    server_strategy: ServerStrategy
    zoo: Path | None = None


@dataclass
class _Federated:
    """What the federation itself produced."""

    server: FederationServer
    config: FederationConfig
    started: float
    ended: float


def run_simulation(opts: SimulationOptions, on_step: OnStep = lambda step: None,
                   plan: Plan | None = None) -> SimulationResult:
    """Run the federation; ``on_step`` hears of each phase's progress (``sim.progress``).
    ``plan`` is ``prepare(opts)`` when the caller validated the options first."""
    started = time.time()
    plan = plan or prepare(opts)
    phases = Phases(on_step)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (SUMMARY_FILE, BASELINES_FILE):  # an earlier run's: rewritten by this one
        (out / stale).unlink(missing_ok=True)
    phases.step("data", 1, 1, f"{len(plan.split.clients)} devices, "
                              f"{len({p.student for p in plan.people})} students, "
                              f"{plan.dataset} ({opts.partition} split), {opts.broker} broker")
    baselines = (BackgroundBaselines(plan.people, plan.split, plan.config, opts.seed,
                                     on_progress=lambda done, total: phases.step(
                                         "baselines", done, total, "local-only and "
                                         "centralized models"),
                                     on_done=lambda refs: _write_baselines(out, refs))
                 if opts.baselines else None)
    store = wiring.open_store(out)
    try:
        fed = _federate(opts, plan, store, out, phases, baselines)
        rows = round_rows(fed.server.metrics, fed.server.history)
        refs = baselines.result() if baselines is not None else None
        summary = _summary(opts, plan, fed, rows, refs, started)
    finally:
        if baselines is not None:
            baselines.stop()
        store.close()
    _write_outputs(out, plan, rows, summary, fed.config)
    return SimulationResult(summary, rows, out)


def prepare(opts: SimulationOptions) -> Plan:
    """Validate the options and derive the split, the config and the devices (seeded). Every
    error a user's options can cause is raised here, before any work is shown or started."""
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
    people = plan_participants(opts, split)
    server_strategy.check_devices({p.device_id: p.student for p in people})
    return Plan(dataset.name, split, config, people, server_strategy, opts.zoo)


def _start_broker(kind: str) -> EmbeddedBroker | MosquittoBroker:
    return EmbeddedBroker().start() if kind == "embedded" else MosquittoBroker().start()


def _chunked(transport: MqttTransport, opts: SimulationOptions) -> Transport:
    """The transport, splitting payloads over ``--max-message`` bytes into chunks if set."""
    return ChunkingTransport(transport, opts.max_message) if opts.max_message else transport


def _federate(opts: SimulationOptions, plan: Plan, store: Store, out: Path,
              phases: Phases, baselines: BackgroundBaselines | None) -> _Federated:
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
        metrics_log = MetricsLog(out / METRICS_FILE)

        def round_reported(rnd: int) -> None:
            rows = round_rows(server.metrics, server.history, upto=rnd)
            metrics_log.append(rows)
            phases.step("rounds", rnd, server.config.rounds, row=rows[-1])

        try:
            server = wiring.build_server(
                connect("server"), plan.config, expected_clients=len(plan.people), store=store,
                context=resume_context(opts), strategy=plan.server_strategy,
                events=ServerEvents(on_round_reported=round_reported))
        except StoreError as exc:
            raise SimulationError(f"{out} holds an unfinished run with other settings; pass "
                                  f"another --out or delete it ({exc})") from None
        config = server.config  # on resume: the stored run, with its run_id
        # A resumed run's file starts with the rounds it completed before it was stopped.
        metrics_log.restart(round_rows(server.metrics, server.history,
                                       upto=len(server.history)) if server.history else [])
        clients += [device_client(plan.people, i, plan.split, plan.dataset, config,
                                  connect(p.device_id,
                                          will=FederationClient.last_will(config.federation,
                                                                          p.device_id)),
                                  out / "clients" / p.device_id, opts.straggle).start()
                    for i, p in enumerate(plan.people)]
        warmup = _WarmupWatch(clients, phases, len(server.history), config.rounds,
                              resumed=server.resumed_from_round is not None).start()
        stack.callback(warmup.stop)
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


class _WarmupWatch:
    """Reports the warm-up (every device training on its own data first) as devices finish
    it, then opens the rounds phase. A resumed run goes straight to its rounds."""

    def __init__(self, clients: list[FederationClient], phases: Phases, completed: int,
                 rounds: int, *, resumed: bool) -> None:
        self._clients, self._phases = clients, phases
        self._completed, self._rounds, self._resumed = completed, rounds, resumed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="warm-up", daemon=True)

    def start(self) -> _WarmupWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        total, reported = len(self._clients), -1
        while not self._resumed and not self._stop.is_set():
            done = sum(1 for c in self._clients if c.history)
            if done != reported:
                reported = done
                self._phases.step("warm-up", done, total, "devices train on their own data")
            if done >= total:
                break
            self._stop.wait(0.25)
        if not self._stop.is_set() or self._resumed:
            self._phases.begin("rounds", self._completed, self._rounds)


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


def _summary(opts: SimulationOptions, plan: Plan, fed: _Federated, rows: list[RoundRow],
             refs: References | None, started: float) -> dict[str, Any]:
    server, config, people = fed.server, fed.config, plan.people
    local_acc, central_acc = (refs.local_only, refs.centralized) if refs else ([], [])
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
        "clients_below_local_only": below_local_only(clients) if refs else None,
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


def below_local_only(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """Who the federation left worse than training alone: each device's final accuracy
    against the local-only accuracy of the same student on the same private data, and how
    many ended below it. A federation is only worth joining while ``count`` is 0, so every
    run reports it (and ``fededge simulate`` warns)."""
    rows = [{"id": c["id"], "accuracy": c["accuracy"],
             "local_only_accuracy": c["local_only_accuracy"],
             "delta": c["accuracy"] - c["local_only_accuracy"],
             "below": c["accuracy"] < c["local_only_accuracy"]}
            for c in clients if c["accuracy"] is not None]
    return {"count": sum(r["below"] for r in rows), "clients": rows}


def _write_baselines(out: Path, refs: References) -> None:
    """The references as soon as they are trained, for the dashboard and the curious."""
    atomic_write(out / BASELINES_FILE, json.dumps(refs.to_dict(), indent=2))


def _write_outputs(out: Path, plan: Plan, rows: list[RoundRow], summary: dict[str, Any],
                   config: FederationConfig) -> None:
    """metrics.jsonl (every round, also those of a run before a resume), summary.json, the
    plot, and the raw test/proxy data export needs."""
    split = plan.split
    atomic_write(out / METRICS_FILE, "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    atomic_write(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    np.savez_compressed(out / "eval_data.npz", test_X=split.raw_test_X, test_y=split.test_y,
                        public_X=split.raw_public_X)
    np.savez_compressed(out / "test.npz", X=split.raw_test_X, y=split.test_y)  # for `infer`
    if plan.zoo is not None:  # export rebuilds the user students from it
        shutil.copyfile(plan.zoo, out / USER_ZOO_FILE)
    write_plot(rows, out / PLOT_FILE, title=f"fededge {config.strategy} on {plan.dataset}",
               local_only=summary["local_only_mean_accuracy"],
               centralized=summary["centralized_mean_accuracy"])

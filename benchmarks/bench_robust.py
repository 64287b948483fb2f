"""Byzantine robustness: 2 of 10 devices attack, each aggregator is measured against the clean run.

Attacks (the two Byzantine devices replace devices 8 and 9; accuracy is the mean final test
accuracy of the 8 honest devices, the same 8 in every run):

- ``random``: the attackers speak the protocol correctly but upload random logits, N(0, 20²)
  (several times the honest logits' spread), with an honest-looking uniform label histogram.
- ``random+counts``: the same, but each claims 100× an honest device's samples. The class-aware
  ``era`` (the default) weights clients by their declared label counts, so this is the lie
  that attacks it directly. ``mean``, ``median`` and ``trimmed-mean`` ignore counts, so for
  them it is the ``random`` run and is not repeated.
- ``label-flip``: the attackers run the unmodified client on their own data with every label
  shifted by one class (y → y + 1 mod K): confident, consistent, wrong logits.

Two references: ``none`` (devices 8 and 9 honest) and ``absent`` (they never join: the 8 honest
devices alone). Under attack the honest devices lose what the attackers' data would have taught
them, so ``absent`` is the best any aggregator can do; the gap between ``none`` and ``absent``
is that lost knowledge, not the aggregator's fault.

Runs in one process over the in-memory transport (the aggregation, not the network, is under
test) with the same server and client code as every other path.

    .venv/bin/python benchmarks/bench_robust.py --rounds 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fededge.config import FederationConfig
from fededge.federation import wiring
from fededge.federation.client import FederationClient
from fededge.federation.strategies.fedmd import announced_rows
from fededge.learn.data import ClientData, FederatedSplit, load_dataset, split_federated
from fededge.sim.recipe import (
    SimulationOptions,
    device_client,
    federation_config,
    plan_participants,
)
from fededge.transport.base import Transport
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto
from fededge.wire.messages import Payload, PresenceMessage

ATTACKS = ("none", "absent", "random", "random+counts", "label-flip")
REFERENCES = ("none", "absent")  # not attacks: with devices 8 and 9 honest, or not there at all
AGGREGATORS = ("mean", "era", "median", "trimmed-mean")
USES_COUNTS = ("era", "weighted", "prob-mean")
CLIENTS, BYZANTINE = 10, (8, 9)
RANDOM_SCALE = 20.0
INFLATE = 100


class RandomLogitsAttacker:
    """A Byzantine device that follows the protocol to the letter with made-up content."""

    def __init__(self, transport: Transport, config: FederationConfig, device: str,
                 samples: int, inflate: int, seed: int) -> None:
        self.transport, self.config, self.device = transport, config, device
        self.topics = proto.Topics(config.federation)
        self.counts = np.full(config.num_classes, samples // config.num_classes,
                              np.int64) * inflate
        self.rng = np.random.default_rng(seed)
        self.run_id: str | None = None
        self.answered: set[int] = set()
        for topic in (self.topics.config, self.topics.round, self.topics.consensus):
            transport.subscribe(topic, self._on_message)

    def _send(self, topic: str, msg: proto.Message | PresenceMessage,
              retain: bool = False) -> None:
        body = msg.encode() if isinstance(msg, PresenceMessage) else proto.encode(msg)
        self.transport.publish(topic, body, retain=retain)

    def _on_message(self, topic: str, payload: bytes) -> None:
        msg = proto.decode(payload)
        if msg.kind == proto.KIND_CONFIG and self.run_id is None:
            self.run_id = msg.info["run_id"]
            self._send(self.topics.presence(self.device),
                       PresenceMessage(self.device, "online", self.run_id), retain=True)
        elif msg.kind == proto.KIND_ROUND and not msg.info.get("done") \
                and msg.round not in self.answered:
            self.answered.add(msg.round)
            rows = len(announced_rows(Payload(msg.info, msg.tensors), self.config.proxy_size))
            logits = self.rng.normal(0, RANDOM_SCALE, (rows, self.config.num_classes))
            self._send(self.topics.up(self.device), proto.Message(
                proto.KIND_UPLOAD, self.device, msg.round,
                {"samples": int(self.counts.sum()), "run_id": self.run_id, "attempt": 1},
                {"logits": logits.astype(np.float16), "class_counts": self.counts}))
        elif msg.kind == proto.KIND_CONSENSUS and msg.info.get("final"):
            self._send(self.topics.presence(self.device),
                       PresenceMessage(self.device, "offline", self.run_id), retain=True)


def _label_flipped(split: FederatedSplit) -> FederatedSplit:
    k = split.num_classes
    clients = [ClientData(c.X, (c.y + 1) % k) if i in BYZANTINE else c
               for i, c in enumerate(split.clients)]
    return dataclasses.replace(split, clients=clients)


def run(aggregator: str, attack: str, rounds: int, seed: int, workdir: Path) -> dict:
    torch.set_num_threads(1)
    opts = SimulationOptions(clients=CLIENTS, rounds=rounds, seed=seed, aggregator=aggregator)
    dataset = load_dataset(opts.data)
    split = split_federated(dataset, CLIENTS, partition=opts.partition, alpha=opts.alpha,
                            seed=seed)
    people = plan_participants(opts, split)
    config = federation_config(opts, split)
    hub = MemoryHub()
    honest = [i for i in range(CLIENTS) if attack == "none" or i not in BYZANTINE]
    present = honest if attack == "absent" else range(CLIENTS)
    server = wiring.build_server(hub.connect("server"), config, expected_clients=len(present))
    data = _label_flipped(split) if attack == "label-flip" else split
    clients = []
    for i, p in enumerate(people):
        if i not in present:
            continue
        transport = hub.connect(p.device_id,
                                will=FederationClient.last_will(config.federation, p.device_id))
        if i in honest or attack == "label-flip":
            clients.append(device_client(people, i, data, dataset.name, config, transport,
                                         workdir / f"{aggregator}-{attack}" / p.device_id).start())
        else:
            RandomLogitsAttacker(transport, config, p.device_id, len(split.clients[i].y),
                                 INFLATE if attack == "random+counts" else 1, seed + i)
    started = time.perf_counter()
    server.run()
    for c in clients:
        assert c.wait(120) and c.error is None, c.error
    final = server.metrics[rounds]
    accs = [final[people[i].device_id]["accuracy"] for i in range(CLIENTS) if i not in BYZANTINE]
    return {"aggregator": aggregator, "attack": attack, "seed": seed, "rounds": rounds,
            "honest_accuracy": float(np.mean(accs)), "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    """One row per aggregator, one column per attack; the worst loss against the aggregator's
    own clean run and against its run without devices 8 and 9 (where measured)."""
    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    ref = {(r["aggregator"], r["attack"]): r["honest_accuracy"] for r in rows
           if r["attack"] in REFERENCES}
    lines = ["| aggregator | " + " | ".join(attacks) + " | worst Δ vs clean | worst Δ vs absent |",
             "|---|" + "---|" * (len(attacks) + 2)]
    for agg in [a for a in AGGREGATORS if (a, "none") in ref]:
        cells, worst = [], 1.0
        for attack in attacks:
            if attack == "random+counts" and agg not in USES_COUNTS:
                attack = "random"  # counts are ignored: the same run
            acc = next(r["honest_accuracy"] for r in rows
                       if r["aggregator"] == agg and r["attack"] == attack)
            cells.append(f"{100 * acc:.1f}%")
            worst = min(worst, acc) if attack not in REFERENCES else worst
        vs_absent = (f"{100 * (worst - ref[agg, 'absent']):+.1f} pts"
                     if (agg, "absent") in ref else "")
        lines.append(f"| {agg} | " + " | ".join(cells) +
                     f" | {100 * (worst - ref[agg, 'none']):+.1f} pts | {vs_absent} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS))
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one process each")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-robust"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/robust.jsonl"),
                    help="every run, appended as it finishes; runs already there are skipped")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/robust.md"))
    args = ap.parse_args()
    rows = ([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
            if args.results.exists() else [])
    done = {(r["aggregator"], r["attack"], r["seed"], r["rounds"]) for r in rows}
    grid = [(agg, attack, seed) for seed in args.seeds for agg in args.aggregators
            for attack in args.attacks if attack != "random+counts" or agg in USES_COUNTS]
    todo = [cell for cell in grid if (*cell, args.rounds) not in done]
    print(f"{len(grid)} runs, {len(grid) - len(todo)} already in {args.results}", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run, agg, attack, args.rounds, seed, args.workdir)
                   for agg, attack, seed in todo]
        for future in concurrent.futures.as_completed(futures):
            rows.append(future.result())
            with args.results.open("a") as fh:
                fh.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    sections = []
    for seed in sorted({r["seed"] for r in rows if r["rounds"] == args.rounds}):
        sections.append(f"### seed {seed}\n\n" + table(
            [r for r in rows if r["seed"] == seed and r["rounds"] == args.rounds]))
    text = ("\n\n".join(sections) + f"\n\nMean final test accuracy of the 8 honest devices "
            f"(digits, Dirichlet α = 0.5, 10 devices, {args.rounds} rounds); devices 8 and 9 are "
            "the Byzantine ones (honest in `none`, not there in `absent`). Machine: "
            f"{platform.processor() or platform.machine()}.\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

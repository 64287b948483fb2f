"""Chaos: a longer federation of separate processes while clients, the server and the broker are
killed at random; reports faults injected and survived, rounds retried and submissions lost.

Every few seconds (exponentially distributed) one fault is injected and repaired:

- ``client``: SIGKILL a random client, restart it 1-4 s later (it resumes from its checkpoint);
- ``server``: SIGKILL the server, restart it 1-3 s later (it resumes from SQLite);
- ``broker``: stop Mosquitto (SIGTERM, without persistence: retained messages and sessions are
  gone), start it again 1-3 s later.

A fault is *survived* when the federation closes at least one more round after it (or the run
had already closed its last round). A submission is *lost* when a client logged an upload (or
re-send) for a round that the server's database never saw from that client in any form
(accepted, duplicate or late); uploads logged less than a second before their sender was
killed died with it and are counted apart. For reference, the same federation runs once
without faults (in one process, ``simulate``: same seeds, same figures when nothing is lost).

    .venv/bin/python benchmarks/bench_chaos.py --clients 5 --rounds 40
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import re
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

from fededge.sim.fleet import Fleet
from fededge.sim.simulate import SimulationOptions, run_simulation

UPLOAD_LINE = re.compile(r"^(\S+ \S+) INFO fededge\.client: (\S+) "
                         r"(?:uploaded round|re-sent its upload for round) (\d+)")


def _closed_rounds(fleet: Fleet) -> int:
    try:
        store = fleet.store()
    except Exception:  # not created yet
        return 0
    try:
        return len(store.closed_rounds())
    except Exception:
        return 0
    finally:
        store.close()


def _inject(fleet: Fleet, kind: str, rng: random.Random, clients: int) -> dict:
    """Inject one fault, repair it, and say what was done and when."""
    at = time.time()
    if kind == "client":
        victim = rng.randrange(clients)
        fleet.kill(f"client{victim}")
        time.sleep(rng.uniform(1, 4))
        fleet.start_client(victim)
        return {"kind": kind, "target": victim, "at": at}
    if kind == "server":
        fleet.kill("server")
        time.sleep(rng.uniform(1, 3))
        fleet.start_server()
    else:
        fleet.stop_broker()
        time.sleep(rng.uniform(1, 3))
        fleet.start_broker()
    return {"kind": kind, "at": at}


def _logged_uploads(fleet: Fleet, clients: int) -> list[tuple[float, str, int, int]]:
    """(time, device, round, client index) of every upload or re-send the clients logged."""
    found = []
    for i in range(clients):
        for line in fleet.log(f"client{i}").splitlines():
            m = UPLOAD_LINE.match(line)
            if m:
                when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((when, m.group(2), int(m.group(3)), i))
    return found


def _losses(fleet: Fleet, faults: list[dict], clients: int) -> tuple[int, int]:
    """(lost, died with their sender), per distinct (device, round)."""
    kills = {}
    for f in faults:
        if f["kind"] == "client":
            kills.setdefault(f["target"], []).append(f["at"])
    store = fleet.store()
    seen = {(sender, rnd) for sender, rnd, _, _ in store.submissions("upload")}
    store.close()
    lost, died = set(), set()
    for when, device, rnd, index in _logged_uploads(fleet, clients):
        if (device, rnd) in seen:
            continue
        if any(0 <= k - when < 1.0 for k in kills.get(index, [])):
            died.add((device, rnd))
        else:
            lost.add((device, rnd))
    return len(lost), len(died - lost)


def _settings(args: argparse.Namespace) -> dict:
    return {"deadline_s": args.deadline, "resend_s": 2.0, "quorum": 0.5, "max_attempts": 10}


def uninterrupted_accuracy(args: argparse.Namespace) -> float:
    result = run_simulation(SimulationOptions(
        clients=args.clients, rounds=args.rounds, seed=args.seed, broker="mosquitto",
        baselines=False, overrides=_settings(args), out=args.workdir / "reference"))
    return result.summary["mean_accuracy"]


def run(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    recipe = ["--rounds", str(args.rounds), "--seed", str(args.seed), "--join-timeout", "120",
              *(arg for k, v in _settings(args).items() for arg in ("--set", f"{k}={v}"))]
    shutil.rmtree(args.workdir, ignore_errors=True)
    faults: list[dict] = []
    started = time.time()
    with Fleet(args.workdir, recipe, args.clients) as fleet:
        closed_before = []
        while fleet.procs["server"].poll() is None:
            time.sleep(rng.expovariate(1 / args.interval))
            if fleet.procs["server"].poll() is not None:
                break  # the federation is over
            if time.time() - started > args.timeout:
                raise TimeoutError(f"the federation did not finish within {args.timeout} s")
            kind = rng.choices(("client", "server", "broker"), weights=(6, 2, 2))[0]
            closed_before.append(_closed_rounds(fleet))
            faults.append(_inject(fleet, kind, rng, args.clients))
            print(json.dumps({**faults[-1], "closed_rounds": closed_before[-1]}), flush=True)
        rc = fleet.wait("server", args.timeout)
        unfinished = 0
        for i in range(args.clients):
            try:
                unfinished += fleet.wait(f"client{i}", 120) != 0
            except subprocess.TimeoutExpired:
                unfinished += 1
        summary = fleet.summary() if rc == 0 else {}
        store = fleet.store()
        attempts = store.attempts()
        statuses = Counter(status for _, _, status, _ in store.submissions("upload"))
        store.close()
        lost, died = _losses(fleet, faults, args.clients)
    closed = Counter(rnd for rnd, _, status in attempts if status == "closed")
    final = len(closed)
    survived = sum(1 for before in closed_before if final > before or before >= args.rounds)
    return {
        "clients": args.clients, "rounds": args.rounds, "completed": rc == 0,
        "rounds_closed": final, "clients_unfinished": unfinished,
        "rounds_closed_twice": sum(1 for n in closed.values() if n > 1),
        "faults_injected": dict(Counter(f["kind"] for f in faults)),
        "faults_total": len(faults), "faults_survived": survived,
        "rounds_retried": sum(1 for _, _, status in attempts if status == "failed"),
        "uploads": dict(statuses), "submissions_lost": lost, "died_with_sender": died,
        "mean_accuracy": summary.get("mean_accuracy"),
        "wall_seconds": time.time() - started,
        "uninterrupted_accuracy": uninterrupted_accuracy(args),
    }


def report(result: dict, args: argparse.Namespace) -> str:
    faults = ", ".join(f"{n} {k}" for k, n in sorted(result["faults_injected"].items()))
    up = result["uploads"]
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    return "\n".join([
        "| figure | value |", "|---|---|",
        f"| federation completed | {'yes' if result['completed'] else 'NO'} "
        f"({result['rounds_closed']}/{result['rounds']} rounds, "
        f"{result['rounds_closed_twice']} closed twice) |",
        f"| clients that did not finish | {result['clients_unfinished']} |",
        f"| faults injected | {result['faults_total']} ({faults}) |",
        f"| faults survived | {result['faults_survived']} |",
        f"| rounds retried (attempts without quorum) | {result['rounds_retried']} |",
        f"| submissions lost | **{result['submissions_lost']}** |",
        f"| uploads that died with their killed sender | {result['died_with_sender']} |",
        f"| uploads accepted / duplicate / late | {up.get('accepted', 0)} / "
        f"{up.get('duplicate', 0)} / {up.get('late', 0)} |",
        f"| final mean accuracy | {pct(result['mean_accuracy'])} (the same run without "
        f"faults: {pct(result['uninterrupted_accuracy'])}) |",
        f"| wall time | {result['wall_seconds']:.0f} s |",
        "",
        f"{args.clients} client processes, the server and Mosquitto on one machine (digits, "
        f"Dirichlet α = 0.5, seed {args.seed}, deadline {args.deadline:.0f} s, quorum 0.5); one "
        f"fault every {args.interval:.0f} s on average. Machine: "
        f"{platform.processor() or platform.machine()}.",
        ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interval", type=float, default=4.0, help="mean seconds between faults")
    ap.add_argument("--deadline", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-chaos"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/chaos.md"))
    args = ap.parse_args()
    result = run(args)
    print(json.dumps(result), flush=True)
    text = report(result, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

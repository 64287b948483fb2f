"""A federation as separate OS processes on one machine: the fault-injection tests and the chaos
benchmark kill and restart these for real.

    python -m fededge.sim.fleet server --port P --state DIR [recipe]
    python -m fededge.sim.fleet client --index I --port P --dir DIR [recipe]

The recipe (dataset, clients, partition, alpha, seed, rounds, profiles, ``--set key=value``
federation settings) is what ``simulate`` takes; every process derives the same split, devices
and config from it, so a client process builds its own shard deterministically and a restarted
one rebuilds the same. The server keeps its state in ``--state`` and writes ``summary.json``
there when the federation is done; a client checkpoints in ``--dir``. Both retry the broker
while it is down, as a rebooted device would.

``Fleet`` starts, kills and restarts a Mosquitto broker, the server and the clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fededge.federation import wiring
from fededge.federation.client import FederationClient
from fededge.federation.store import Store
from fededge.files import atomic_write
from fededge.sim.recipe import (
    SimulationOptions,
    device_client,
    federation_config,
    plan_participants,
    resume_context,
    split_for,
)
from fededge.transport.base import TransportError
from fededge.transport.brokers import MosquittoBroker, dev_mosquitto_conf, free_port
from fededge.transport.mqtt import MqttTransport

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def recipe_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fededge.sim.fleet",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--state", type=Path, help="server: state directory (SQLite, consensus)")
    ap.add_argument("--index", type=int, help="client: which device of the recipe this is")
    ap.add_argument("--dir", type=Path, help="client: checkpoint directory")
    ap.add_argument("--data", default=None)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--partition", default="dirichlet")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--aggregator", default="era")
    ap.add_argument("--profiles", default=None, help="comma-separated, assigned round-robin")
    ap.add_argument("--straggle", type=float, default=0.0)
    ap.add_argument("--zoo", type=Path, default=None, help="a user zoo file")
    ap.add_argument("--join-timeout", type=float, default=120.0)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="a federation setting, e.g. deadline_s=10")
    return ap


def _options(args: argparse.Namespace) -> SimulationOptions:
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    return SimulationOptions(data=args.data, clients=args.clients, rounds=args.rounds,
                             partition=args.partition, alpha=args.alpha, seed=args.seed,
                             aggregator=args.aggregator, overrides=overrides,
                             profiles=args.profiles.split(",") if args.profiles else None,
                             straggle=args.straggle, zoo=args.zoo)


def connect_with_retry(make: Callable[[], MqttTransport], timeout: float = 120.0) -> MqttTransport:
    """Connect, retrying while the broker is unreachable (it may be restarting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return make().connect()
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def run_server(args: argparse.Namespace) -> int:
    opts = _options(args)
    _, split = split_for(opts)
    config = federation_config(opts, split)
    transport = connect_with_retry(lambda: MqttTransport("server", args.host, args.port))
    store = Store(args.state)
    server = wiring.build_server(transport, config, expected_clients=opts.clients, store=store,
                                 context=resume_context(opts), public_X=split.public_X,
                                 join_timeout=args.join_timeout)
    if server.resumed_from_round is not None:
        log.info("server resumed run %s at round %d", server.config.run_id,
                 server.resumed_from_round)
    history = server.run()
    final = server.metrics.get(server.config.rounds, {})
    accuracies = {d: m.get("accuracy") for d, m in sorted(final.items())}
    known = [a for a in accuracies.values() if a is not None]
    summary = {"run_id": server.config.run_id, "resumed_from_round": server.resumed_from_round,
               "rounds": [vars(r) for r in history], "accuracies": accuracies,
               "mean_accuracy": sum(known) / len(known) if known else None,
               "uploads_accepted": server.accepted_uploads,
               "rejected": dict(server.rejections)}
    atomic_write(args.state / SUMMARY, json.dumps(summary, indent=2))
    transport.close()
    store.close()
    return 0


def run_client(args: argparse.Namespace) -> int:
    opts = _options(args)
    dataset, split = split_for(opts)
    config = federation_config(opts, split)
    people = plan_participants(opts, split)
    device = people[args.index].device_id
    will = FederationClient.last_will(config.federation, device)
    transport = connect_with_retry(
        lambda: MqttTransport(device, args.host, args.port, will=will))
    client = device_client(people, args.index, split, dataset.name, config, transport, args.dir,
                           opts.straggle).start()
    client.wait()
    transport.close()
    return 1 if client.error is not None else 0


def main(argv: list[str] | None = None) -> int:
    import torch

    torch.set_num_threads(1)  # many small processes share the cores
    args = recipe_parser().parse_args(argv)
    if args.role == "server" and args.state is None:
        raise SystemExit("server needs --state DIR")
    if args.role == "client" and (args.index is None or args.dir is None):
        raise SystemExit("client needs --index I and --dir DIR")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_server(args) if args.role == "server" else run_client(args)


class Fleet:
    """A local Mosquitto, one server process and N client processes, each killable for real.

    Logs go to ``workdir/logs/<name>.log`` (appended across restarts); the server's state is in
    ``workdir/server`` and client i's checkpoints in ``workdir/client<i>``.
    """

    def __init__(self, workdir: Path, recipe: list[str], clients: int) -> None:
        self.workdir, self.recipe, self.clients = Path(workdir), list(recipe), clients
        self.port = free_port()
        self.state_dir = self.workdir / "server"
        self.conf = self.workdir / "mosquitto.conf"
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.conf.write_text(dev_mosquitto_conf(self.port))
        self.broker: MosquittoBroker | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.workdir / "logs" / f"{name}.log", "ab") as log_file:  # the child keeps it
            proc = subprocess.Popen([sys.executable, "-m", "fededge.sim.fleet", *args, "--port",
                                     str(self.port), "--clients", str(self.clients),
                                     *self.recipe],
                                    stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def start_broker(self) -> None:
        self.broker = MosquittoBroker(self.conf, port=self.port).start()

    def stop_broker(self) -> None:
        """SIGTERM, as a service manager would stop it; clients and server lose the link."""
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def start_server(self) -> subprocess.Popen:
        return self._spawn("server", ["server", "--state", str(self.state_dir)])

    def start_client(self, index: int) -> subprocess.Popen:
        return self._spawn(f"client{index}", ["client", "--index", str(index), "--dir",
                                              str(self.workdir / f"client{index}")])

    def start(self) -> "Fleet":
        self.start_broker()
        self.start_server()
        for i in range(self.clients):
            self.start_client(i)
        return self

    def kill(self, name: str) -> None:
        """``kill -9``: no goodbye, no flush; the broker fires the Last Will."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def pause(self, name: str) -> None:
        """SIGSTOP: the process hangs (keeps its connection, answers nothing) until resumed."""
        self.procs[name].send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGCONT)

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        self.stop_broker()

    def __enter__(self) -> "Fleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation ---------------------------------------------------------------------------
    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} never logged {text!r}:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)

    def wait_for(self, predicate: Callable[[Store], bool], timeout: float,
                 what: str = "condition") -> None:
        """Poll the server's database (read-only) until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if Store.exists(self.state_dir):
                store = Store(self.state_dir, readonly=True)
                try:
                    if predicate(store):
                        return
                except Exception:  # the schema may not exist yet
                    pass
                finally:
                    store.close()
            for name, proc in self.procs.items():
                if name == "server" and proc.poll() not in (None, 0, -signal.SIGKILL):
                    raise RuntimeError(f"server exited with {proc.returncode}:\n"
                                       f"{self.log('server')[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached within {timeout:.0f} s:\n"
                           f"{self.log('server')[-3000:]}")

    def store(self) -> Store:
        return Store(self.state_dir, readonly=True)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.state_dir / SUMMARY).read_text())

    def log(self, name: str) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())

"""What the dashboard shows, read from a federation's files while it runs or after it ended.

A source is a ``fededge simulate`` run directory or a server kit; both hold the server's SQLite
store (``server.db``: presence, rounds, submissions, metrics), which the server writes as it
goes, so it is the one live record of a federation. It is opened read-only and afresh for every
snapshot: a watcher never takes a write lock, and a new run that replaces the database in the
same directory is picked up. A run directory adds the simulation's references (local-only and
centralized accuracy) once its baselines or its summary are written. Torch-free: the dashboard
runs wherever the server does.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fededge.errors import FedEdgeError
from fededge.federation.report import round_rows
from fededge.federation.store import Store
from fededge.kits.kit import SERVER_FILE, STATE_DIR, KitError, load_kit

SUMMARY_FILE, BASELINES_FILE = "summary.json", "baselines.json"
LATEST_REJECTIONS = 20


class DashboardError(FedEdgeError, ValueError):
    """A dashboard source or address that cannot work; the message says what to pass."""


@dataclass(frozen=True)
class Source:
    """Where a federation's state lives: the store's directory, and for a simulate run the run
    directory (its summary and baselines); ``expected`` are the devices a server kit names."""

    kind: str                  # "run" or "kit"
    path: Path
    store_dir: Path
    expected: tuple[str, ...] = ()
    federation: str | None = None

    @classmethod
    def of(cls, path: str | Path, state: Path | None = None) -> Source:
        """A server kit (its ``state`` directory, or ``state``) or a simulate run directory,
        which may not hold a store yet (the simulation is still preparing its data)."""
        path = Path(path)
        if (path / SERVER_FILE).is_file():
            kit = load_kit(path)
            return cls("kit", path, state or kit.path(STATE_DIR), tuple(kit.devices),
                       kit.federation)
        if state is not None:
            raise DashboardError(f"--state is for a server kit; {path} has no {SERVER_FILE}")
        if not path.is_dir():
            raise DashboardError(f"{path}: no such directory; pass a `fededge simulate --out` "
                                 "run directory or a server kit (KITS/server)")
        if (path / "client.toml").is_file():
            raise KitError(f"{path} is a device's kit; the dashboard reads the server's state: "
                           "pass KITS/server")
        return cls("run", path, path)


def snapshot(source: Source, now: float | None = None) -> dict[str, Any]:
    """The whole dashboard as one JSON-able dict (``GET /api/state``)."""
    now = time.time() if now is None else now
    state: dict[str, Any] = {
        "source": {"kind": source.kind, "path": str(source.path),
                   "federation": source.federation},
        "time": now, "status": "preparing", "run_id": None, "config": {},
        "progress": None, "devices": [_device(d) for d in source.expected], "rounds": [],
        "references": {"local_only": None, "centralized": None}, "rejections": [],
        "rejected_total": 0}
    if Store.exists(source.store_dir):
        try:
            store = Store(source.store_dir, readonly=True)
        except sqlite3.Error:  # the server is creating it
            return state
        try:
            _from_store(store, source, state, now)
        except sqlite3.Error:  # its schema is being created: nothing to show yet
            pass
        finally:
            store.close()
    if source.kind == "run":
        state["references"] = _references(source.path, state["run_id"])
        if state["status"] == "finished" and not (source.path / SUMMARY_FILE).is_file():
            state["status"] = "summarizing"  # simulate: baselines, summary and plot to come
    return state


def _device(device_id: str) -> dict[str, Any]:
    return {"id": device_id, "profile": None, "student": None, "params": None,
            "status": "not seen", "last_seen": None, "accuracy": None, "accuracy_round": None,
            "bytes_up": 0, "bytes_down": 0, "rejected": 0}


def _from_store(store: Store, source: Source, state: dict[str, Any], now: float) -> None:
    federation = store.federation_row()
    if federation is None:
        return
    config = federation["config"]
    state.update(run_id=federation["run_id"],
                 status="finished" if federation["status"] == "done" else "running",
                 config={key: config.get(key) for key in (
                     "federation", "strategy", "aggregator", "rounds", "logit_codec",
                     "num_classes")})
    metrics = store.metrics()
    closed = store.closed_rounds()
    state["rounds"] = [row.to_dict() for row in round_rows(metrics, closed)]
    state["progress"] = _progress(store, federation, closed, now)
    state["devices"] = _devices(store, metrics, source.expected)
    state["rejected_total"] = sum(int(rejected or 0) for _, rejected in
                                  store.senders().values())
    state["rejections"] = [
        {"at": at, "device": sender or _device_of(topic), "topic": topic, "round": rnd,
         "reason": reason} for at, topic, sender, rnd, reason in
        store.latest_rejections(LATEST_REJECTIONS)]


def _progress(store: Store, federation: dict[str, Any], closed: list[Any],
              now: float) -> dict[str, Any]:
    """Where the federation is: the open round and its uploads, and an ETA from the pace of
    the rounds closed so far."""
    rounds = int(federation["config"]["rounds"])
    done = federation["status"] == "done"
    opened = store.open_attempts()
    current = None if done or not opened else opened[-1]
    seconds = [c.seconds for c in closed if c.seconds is not None]
    remaining = rounds - len(closed)
    eta = None
    if not done and seconds:
        eta = sum(seconds) / len(seconds) * remaining
        if current is not None:  # the open round is already under way
            eta = max(0.0, eta - (now - current[3]))
    progress: dict[str, Any] = {
        "rounds": rounds, "completed": len(closed), "round": None, "attempt": None,
        "uploads": 0, "expected": 0,
        "elapsed_s": (federation["updated"] if done else now) - federation["created"],
        "eta_s": 0.0 if done else eta,
        "phase": "finished" if done else "waiting for devices" if not opened else "rounds"}
    if current is not None:
        rnd, attempt, participants, _ = current
        progress.update(round=rnd, attempt=attempt, expected=len(participants),
                        uploads=len(store.accepted_senders(rnd)))
        if not closed:
            progress["phase"] = "warm-up"  # devices train on their own data first
    return progress


def _devices(store: Store, metrics: dict[int, dict[str, dict[str, Any]]],
             expected: tuple[str, ...]) -> list[dict[str, Any]]:
    presence = store.presence()
    senders: dict[str | None, tuple[float, int]] = {}
    for sender, (at, rejected) in store.senders().items():
        device = _device_of(sender) if "/" in sender else sender
        before_at, before_rejected = senders.get(device, (0.0, 0))
        senders[device] = (max(at, before_at), before_rejected + int(rejected or 0))
    ids = list(expected) + sorted((set(presence) | {d for r in metrics.values() for d in r})
                                  - set(expected))
    devices = []
    for device_id in ids:
        device = _device(device_id)
        if device_id in presence:
            status, info, at = presence[device_id]
            device.update(status=status, last_seen=at,
                          **{k: info[k] for k in ("profile", "student", "params") if k in info})
        for rnd in sorted(metrics):
            report = metrics[rnd].get(device_id)
            if report is None:
                continue
            device.update(accuracy=report.get("accuracy"), accuracy_round=rnd,
                          bytes_up=report["bytes"]["sent_bytes"],
                          bytes_down=report["bytes"]["received_bytes"])
            device["profile"] = device["profile"] or report.get("profile") or None
            device["student"] = device["student"] or report.get("student") or None
        if device_id in senders:
            at, rejected = senders[device_id]
            device["rejected"] = int(rejected or 0)
            device["last_seen"] = max(device["last_seen"] or 0.0, at)
        devices.append(device)
    return devices


def _device_of(topic: str) -> str | None:
    """The device a topic names (``…/up/<device>``, ``…/presence/<device>``), for messages
    rejected before their sender could be read."""
    parts = topic.split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] in ("up", "presence") else None


def _references(run_dir: Path, run_id: str | None) -> dict[str, float | None]:
    """Mean local-only and centralized accuracy of this run, from its summary (at the end) or
    its baselines (as soon as they are trained); nothing from an earlier run's files."""
    for name in (SUMMARY_FILE, BASELINES_FILE):
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        if run_id is not None and data.get("run_id", data.get("config", {}).get("run_id")) \
                not in (None, run_id):
            continue
        return {"local_only": data.get("local_only_mean_accuracy"),
                "centralized": data.get("centralized_mean_accuracy")}
    return {"local_only": None, "centralized": None}

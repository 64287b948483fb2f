"""The server's durable state: one SQLite database plus one consensus file per round.

What is kept and why:

- ``federation``: the config (with its ``run_id``) and the launch context, so a restarted
  server keeps the run every client already knows instead of starting a new one.
- ``rounds``: one row per attempt with its status (``open``, ``closed``, ``failed``). A round is
  complete exactly when it has a ``closed`` attempt; a restarted server resumes at the first
  round without one, so no completed round is redone or lost.
- ``submissions``: every message that reached the server on an upload or presence topic, with
  its status (``accepted``, ``duplicate``, ``rejected``) and the reason of a rejection. Accepted
  uploads keep their payload, so a server killed mid-round resumes that round with the uploads
  it already had.
- ``presence`` and ``metrics``: what devices announced and reported.
- ``consensus/round-NNNN.safetensors``: the exact bytes published for each round, re-published
  on restart so clients that missed them can catch up.
- ``models/<device>/student.safetensors`` + ``student.json`` (``collect_models``): each device's
  trained student as it arrived, and what ``fededge export`` needs to rebuild it; ``models``
  indexes them.

SQLite runs in WAL mode with ``synchronous=NORMAL``: each commit is one append to the log
without an fsync, which survives ``kill -9`` of the server (the threat here) but not a power
cut of the host; 1,000 hostile payloads a second cost milliseconds, not seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fededge.config import ConfigError, FederationConfig
from fededge.errors import FedEdgeError
from fededge.files import atomic_write

DB_NAME = "server.db"
CONSENSUS_DIR = "consensus"
MODELS_DIR = "models"
STUDENT_WEIGHTS, STUDENT_META = "student.safetensors", "student.json"  # as a device's checkpoint

_SCHEMA = """
CREATE TABLE IF NOT EXISTS federation (
    id INTEGER PRIMARY KEY CHECK (id = 1), run_id TEXT NOT NULL, config TEXT NOT NULL,
    context TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL,
    participants TEXT NOT NULL, accepted TEXT NOT NULL DEFAULT '[]',
    opened REAL NOT NULL, closed REAL, PRIMARY KEY (round, attempt));
CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, sender TEXT, kind TEXT,
    round INTEGER, attempt INTEGER, status TEXT NOT NULL, reason TEXT, bytes INTEGER NOT NULL,
    payload BLOB);
CREATE INDEX IF NOT EXISTS submissions_by_round ON submissions (round, status, kind);
CREATE TABLE IF NOT EXISTS presence (
    device TEXT PRIMARY KEY, status TEXT NOT NULL, info TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    round INTEGER NOT NULL, device TEXT NOT NULL, info TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS consensus (
    round INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    device TEXT PRIMARY KEY, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, meta TEXT NOT NULL,
    at REAL NOT NULL);
"""


class StoreError(FedEdgeError, ValueError):
    """The state directory belongs to another federation or is unreadable; says what to do."""


@dataclass(frozen=True)
class ClosedRound:
    """A completed round as recorded: the attempt that closed it and who took part."""

    round: int
    attempts: int
    participants: list[str]
    accepted: list[str]
    seconds: float


def reason_key(reason: str) -> str:
    """Rejections are counted by the part of the reason before its first colon, so 'tensor data
    is malformed: <detail>' variants fall into one bucket."""
    return reason.split(":")[0][:80]


class Store:
    """SQLite state of one federation server. ``directory=None`` keeps everything in memory,
    for tests and throw-away runs; the code path is otherwise the same."""

    def __init__(self, directory: Path | None = None, *, readonly: bool = False) -> None:
        """``readonly`` opens an existing store to watch a running server from another process
        (tests, benchmarks) without ever taking a write lock."""
        self.directory = Path(directory) if directory is not None else None
        self._consensus: dict[int, bytes] = {}  # only used in memory
        self._models: dict[str, bytes] = {}     # only used in memory
        if self.directory is None:
            self._db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        elif readonly:
            self._db = sqlite3.connect(f"file:{self.directory / DB_NAME}?mode=ro", uri=True,
                                       isolation_level=None, check_same_thread=False)
            return
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            # The server loop is the only writer; other threads only read after it finished.
            self._db = sqlite3.connect(str(self.directory / DB_NAME), isolation_level=None,
                                       check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / DB_NAME).is_file()

    @staticmethod
    def wipe(directory: Path) -> None:
        """Delete a state directory's database, consensus files and collected students (a
        fresh run in its place)."""
        directory = Path(directory)
        for suffix in ("", "-wal", "-shm"):
            (directory / (DB_NAME + suffix)).unlink(missing_ok=True)
        shutil.rmtree(directory / CONSENSUS_DIR, ignore_errors=True)
        shutil.rmtree(directory / MODELS_DIR, ignore_errors=True)

    def close(self) -> None:
        self._db.close()

    def _one(self, sql: str, *args: Any) -> Any:
        row = self._db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    # -- federation ----------------------------------------------------------------------------
    def begin(self, config: FederationConfig,
              context: dict[str, Any]) -> tuple[FederationConfig, bool]:
        """Record a new federation, or adopt the stored one if its settings match.

        Returns the config to run and whether it is a resume; on resume it is the stored config,
        whose ``run_id`` the clients already know. ``context`` holds launch settings outside the
        config (e.g. the number of clients) that must also match for a resume to make sense.
        """
        row = self._db.execute("SELECT config, context FROM federation").fetchone()
        now = time.time()
        if row is None:
            self._db.execute("INSERT INTO federation VALUES (1, ?, ?, ?, 'running', ?, ?)",
                             (config.run_id, json.dumps(config.to_dict()),
                              json.dumps(context, sort_keys=True), now, now))
            return config, False
        try:
            stored = FederationConfig.from_dict(json.loads(row[0]))
        except ConfigError as exc:  # written by an older fededge with looser checks
            stored, differ = None, [f"the stored settings are no longer valid ({exc})"]
        else:
            wanted = {**config.to_dict(), **context, "run_id": stored.run_id}
            have = {**stored.to_dict(), **json.loads(row[1])}
            differ = [f"{k} {have.get(k)!r} ≠ {wanted.get(k)!r}"
                      for k in sorted(set(have) | set(wanted)) if have.get(k) != wanted.get(k)]
        if differ and not self.closed_rounds():
            # Nothing was completed: an interrupted or failed start with other settings is no
            # run to resume, and must not block the next one.
            with self._db:
                self._db.execute("BEGIN")
                for table in ("federation", "rounds", "submissions", "presence", "metrics",
                              "consensus"):
                    self._db.execute(f"DELETE FROM {table}")
                self._db.execute("INSERT INTO federation VALUES (1, ?, ?, ?, 'running', ?, ?)",
                                 (config.run_id, json.dumps(config.to_dict()),
                                  json.dumps(context, sort_keys=True), now, now))
            return config, False
        if differ:
            where = self.directory or "memory"
            run = stored.run_id if stored else "?"
            raise StoreError(f"{where} holds federation run {run} with other settings "
                             f"({'; '.join(differ)[:300]}); use a fresh state directory")
        return stored, True

    @property
    def finished(self) -> bool:
        return self._one("SELECT status FROM federation") == "done"

    def finish(self) -> None:
        self._db.execute("UPDATE federation SET status = 'done', updated = ?", (time.time(),))

    # -- rounds --------------------------------------------------------------------------------
    def closed_rounds(self) -> list[ClosedRound]:
        rows = self._db.execute(
            "SELECT r.round, r.attempt, r.participants, r.accepted, "
            "r.closed - (SELECT min(opened) FROM rounds f WHERE f.round = r.round) "
            "FROM rounds r WHERE r.status = 'closed' ORDER BY r.round").fetchall()
        return [ClosedRound(rnd, attempt, json.loads(parts), json.loads(acc), seconds)
                for rnd, attempt, parts, acc, seconds in rows]

    def last_attempt(self, rnd: int) -> tuple[int, str] | None:
        """(attempt, status) of the newest attempt of ``rnd``, if any."""
        row = self._db.execute("SELECT attempt, status FROM rounds WHERE round = ? "
                               "ORDER BY attempt DESC LIMIT 1", (rnd,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def attempts(self) -> list[tuple[int, int, str]]:
        """(round, attempt, status) of every attempt, in order: the audit of retries."""
        return self._db.execute("SELECT round, attempt, status FROM rounds "
                                "ORDER BY round, attempt").fetchall()

    def open_attempt(self, rnd: int, attempt: int, participants: list[str]) -> None:
        self._db.execute("INSERT OR IGNORE INTO rounds (round, attempt, status, participants, "
                         "opened) VALUES (?, ?, 'open', ?, ?)",
                         (rnd, attempt, json.dumps(sorted(participants)), time.time()))

    def end_attempt(self, rnd: int, attempt: int, status: str, accepted: list[str]) -> None:
        """Mark an attempt ``closed`` (the round is complete) or ``failed`` (no quorum)."""
        self._db.execute("UPDATE rounds SET status = ?, accepted = ?, closed = ? "
                         "WHERE round = ? AND attempt = ?",
                         (status, json.dumps(sorted(accepted)), time.time(), rnd, attempt))

    # -- submissions ---------------------------------------------------------------------------
    def record(self, topic: str, payload: bytes, status: str, *, sender: str | None = None,
               kind: str | None = None, rnd: int | None = None, attempt: int | None = None,
               reason: str | None = None, keep_payload: bool = False) -> None:
        self._db.execute(
            "INSERT INTO submissions (at, topic, sender, kind, round, attempt, status, reason, "
            "bytes, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (time.time(), topic, sender, kind, rnd, attempt, status, reason, len(payload),
             bytes(payload) if keep_payload else None))

    def accepted_uploads(self, rnd: int) -> list[tuple[str, bytes]]:
        """(topic, payload) of the uploads accepted for ``rnd``, in arrival order."""
        return self._db.execute("SELECT topic, payload FROM submissions WHERE round = ? AND "
                                "kind = 'upload' AND status = 'accepted' AND payload IS NOT NULL "
                                "ORDER BY id", (rnd,)).fetchall()

    def submissions(self, kind: str | None = None
                    ) -> list[tuple[str | None, int | None, str, str | None]]:
        """(sender, round, status, reason) of every recorded message, optionally of one kind."""
        where, args = (" WHERE kind = ?", (kind,)) if kind else ("", ())
        return self._db.execute("SELECT sender, round, status, reason FROM submissions"
                                f"{where} ORDER BY id", args).fetchall()

    def count(self, status: str, kind: str | None = None) -> int:
        if kind is None:
            return int(self._one("SELECT count(*) FROM submissions WHERE status = ?", status))
        return int(self._one("SELECT count(*) FROM submissions WHERE status = ? AND kind = ?",
                             status, kind))

    def rejections(self) -> Counter[str]:
        """Rejected messages counted by reason (see ``reason_key``)."""
        counts: Counter[str] = Counter()
        for (reason,) in self._db.execute(
                "SELECT reason FROM submissions WHERE status = 'rejected'"):
            counts[reason_key(reason or "")] += 1
        return counts

    # -- presence and metrics ------------------------------------------------------------------
    def set_presence(self, device: str, status: str, info: dict[str, Any]) -> None:
        """Record a device's presence. What it said when online (profile, student, params)
        is kept when it goes offline, whose message (a Last Will) carries none of it."""
        before = self._one("SELECT info FROM presence WHERE device = ?", device)
        merged = {**(json.loads(before) if before else {}), **info}
        self._db.execute("INSERT OR REPLACE INTO presence VALUES (?, ?, ?, ?)",
                         (device, status, json.dumps(merged), time.time()))

    def add_metrics(self, rnd: int, device: str, info: dict[str, Any]) -> bool:
        """Store one report; False if (round, device) was already reported (a re-send)."""
        cur = self._db.execute("INSERT OR IGNORE INTO metrics VALUES (?, ?, ?, ?)",
                               (rnd, device, json.dumps(info), time.time()))
        return cur.rowcount == 1

    def metrics(self) -> dict[int, dict[str, dict[str, Any]]]:
        out: dict[int, dict[str, dict[str, Any]]] = {}
        for rnd, device, info in self._db.execute(
                "SELECT round, device, info FROM metrics ORDER BY round, at"):
            out.setdefault(int(rnd), {})[device] = json.loads(info)
        return out

    # -- views for watchers (the dashboard) ---------------------------------------------------
    def federation_row(self) -> dict[str, Any] | None:
        """The run's config, launch context, status and times; None before the server began."""
        row = self._db.execute("SELECT run_id, config, context, status, created, updated "
                               "FROM federation").fetchone()
        if row is None:
            return None
        run_id, config, context, status, created, updated = row
        return {"run_id": run_id, "config": json.loads(config), "context": json.loads(context),
                "status": status, "created": created, "updated": updated}

    def presence(self) -> dict[str, tuple[str, dict[str, Any], float]]:
        """device → (status, what it announced, when)."""
        return {device: (status, json.loads(info), at) for device, status, info, at in
                self._db.execute("SELECT device, status, info, at FROM presence")}

    def open_attempts(self) -> list[tuple[int, int, list[str], float]]:
        """(round, attempt, participants, opened) of the attempts still open."""
        return [(rnd, attempt, json.loads(parts), opened) for rnd, attempt, parts, opened in
                self._db.execute("SELECT round, attempt, participants, opened FROM rounds "
                                 "WHERE status = 'open' ORDER BY round, attempt")]

    def accepted_senders(self, rnd: int) -> list[str]:
        """Devices whose upload for ``rnd`` was accepted so far."""
        return [s for (s,) in self._db.execute(
            "SELECT DISTINCT sender FROM submissions WHERE round = ? AND kind = 'upload' AND "
            "status = 'accepted' ORDER BY sender", (rnd,))]

    def senders(self) -> dict[str, tuple[float, int]]:
        """sender → (when it was last heard from, how many of its messages were rejected); a
        message rejected before its sender could be read counts under its topic."""
        return {sender: (at, rejected) for sender, at, rejected in self._db.execute(
            "SELECT coalesce(sender, topic), max(at), sum(status = 'rejected') FROM submissions "
            "GROUP BY coalesce(sender, topic)")}

    def latest_rejections(self, limit: int) -> list[tuple[float, str, str | None, int | None,
                                                        str]]:
        """(at, topic, sender, round, reason) of the newest ``limit`` rejected messages."""
        return self._db.execute(
            "SELECT at, topic, sender, round, reason FROM submissions WHERE status = "
            "'rejected' ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    # -- consensus -----------------------------------------------------------------------------
    def _consensus_path(self, rnd: int) -> Path:
        assert self.directory is not None
        return self.directory / CONSENSUS_DIR / f"round-{rnd:04d}.safetensors"

    def save_round(self, rnd: int, attempt: int, accepted: list[str], body: bytes) -> None:
        """Write the consensus file, then close the attempt and index the file in one
        transaction: a crash in between leaves the round incomplete, never half-recorded."""
        if self.directory is None:
            self._consensus[rnd] = body
        else:
            atomic_write(self._consensus_path(rnd), body)
        with self._db:
            self._db.execute("BEGIN")
            self.end_attempt(rnd, attempt, "closed", accepted)
            self._db.execute("INSERT OR REPLACE INTO consensus VALUES (?, ?, ?)",
                             (rnd, hashlib.sha256(body).hexdigest(), len(body)))

    def consensus(self, rnd: int) -> bytes | None:
        """The consensus bytes published for ``rnd``, checked against the recorded hash."""
        sha = self._one("SELECT sha256 FROM consensus WHERE round = ?", rnd)
        if sha is None:
            return None
        try:
            body = self._consensus.get(rnd) if self.directory is None else \
                self._consensus_path(rnd).read_bytes()
        except OSError:
            body = None
        if body is None or hashlib.sha256(body).hexdigest() != sha:
            raise StoreError(f"consensus of round {rnd} in {self.directory} is missing or "
                             "altered; restore it or start a fresh state directory")
        return body

    # -- collected students ----------------------------------------------------------------------
    def model_dir(self, device: str) -> Path:
        """Where device's collected student is (``student.safetensors`` and ``.json``)."""
        assert self.directory is not None
        return self.directory / MODELS_DIR / device

    def save_model(self, device: str, payload: bytes, meta: dict[str, Any]) -> None:
        """Keep a device's trained student: the payload as it arrived, then its metadata, then
        the index row (a crash in between leaves it uncollected, to be sent again)."""
        if self.directory is None:
            self._models[device] = bytes(payload)
        else:
            atomic_write(self.model_dir(device) / STUDENT_WEIGHTS, bytes(payload))
            atomic_write(self.model_dir(device) / STUDENT_META, json.dumps(meta, indent=2))
        self._db.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                         (device, hashlib.sha256(payload).hexdigest(), len(payload),
                          json.dumps(meta), time.time()))

    def models(self) -> dict[str, dict[str, Any]]:
        """Every collected student's metadata, by device."""
        return {device: json.loads(meta) for device, meta in self._db.execute(
            "SELECT device, meta FROM models ORDER BY device")}

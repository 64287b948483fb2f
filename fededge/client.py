"""One device in the federation: join, warm up, answer rounds, absorb consensus, checkpoint.

The transport thread only queues messages; a worker thread does the learning, so slow training
never blocks MQTT keep-alives. The client is idempotent on (round, attempt) and (round,
consensus): QoS-1 redeliveries and retained re-sends are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from . import protocol as proto
from .config import ConfigError, FederationConfig
from .strategy import ClientContext, ClientStrategy, Payload, strategy_pair
from .trainer import Trainer
from .transport import Transport

log = logging.getLogger(__name__)

# How long a round announcement may wait for the previous round's consensus (brokers may reorder
# messages of different topics) before the client answers it anyway.
CONSENSUS_GRACE_S = 5.0


@dataclass
class DeviceIdentity:
    device_id: str
    profile: str
    student: str
    params: int


@dataclass
class LocalData:
    """Private labelled data, the shared proxy set, and an optional held-out evaluation set."""

    private_X: np.ndarray
    private_y: np.ndarray
    public_X: np.ndarray
    proxy_sha256: str
    eval_X: np.ndarray | None = None
    eval_y: np.ndarray | None = None


@dataclass
class _State:
    config: FederationConfig | None = None
    strategy: ClientStrategy | None = None
    warmed_up: bool = False
    answered: set[tuple[int, int]] = field(default_factory=set)
    absorbed: int = 0
    announcements: dict[int, Payload] = field(default_factory=dict)
    pending_round: proto.Message | None = None
    pending_since: float = 0.0


class FederationClient:
    def __init__(self, transport: Transport, federation: str, identity: DeviceIdentity,
                 trainer: Trainer, data: LocalData, *, checkpoint_dir: Path | None = None,
                 checkpoint_meta: dict[str, Any] | None = None) -> None:
        proto.validate_id(identity.device_id)
        self.transport, self.identity, self.trainer, self.data = transport, identity, trainer, data
        self.topics = proto.Topics(federation)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_meta = checkpoint_meta or {}
        self.ctx = ClientContext(trainer, data.private_X, data.private_y, data.public_X)
        self.state = _State()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.history: list[dict[str, Any]] = []
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._intervals: list[tuple[float, float]] = []
        self._worker = threading.Thread(target=self._work, name=f"client-{identity.device_id}",
                                        daemon=True)

    @staticmethod
    def last_will(federation: str, device_id: str) -> tuple[str, bytes]:
        """The retained 'offline' presence the broker publishes if this device vanishes."""
        topic = proto.Topics(federation).presence(device_id)
        return topic, proto.encode(proto.presence(device_id, "offline"))

    def start(self) -> "FederationClient":
        for topic in (self.topics.config, self.topics.round, self.topics.consensus):
            self.transport.subscribe(topic, lambda t, p: self._inbox.put((t, p)))
        self._worker.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def stop(self) -> None:
        self._inbox.put(("", b""))
        self._worker.join(timeout=30)

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self.finished.is_set():
                try:
                    topic, payload = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    self._maybe_release_pending()
                    continue
                if not topic:
                    break
                self._handle(topic, payload)
        except BaseException as exc:  # surfaced to whoever waits on us
            self.error = exc
            log.exception("client %s stopped", self.identity.device_id)
            self.finished.set()

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            msg = proto.decode(payload, topic=topic, topics=self.topics)
        except proto.ProtocolError as exc:
            log.warning("%s ignored a bad message on %s: %s", self.identity.device_id, topic, exc)
            return
        if msg.sender != proto.SERVER_ID:
            log.warning("%s ignored %s from %r on %s", self.identity.device_id, msg.kind,
                        msg.sender, topic)
            return
        if msg.kind == proto.KIND_CONFIG and topic == self.topics.config:
            self._on_config(msg)
        elif self.state.config is None or msg.info.get("run_id") != self.state.config.run_id:
            return  # nothing to do before the config, nor with another run's leftovers
        elif msg.kind == proto.KIND_ROUND and topic == self.topics.round:
            self._on_round(msg)
        elif msg.kind == proto.KIND_CONSENSUS and topic == self.topics.consensus:
            self._on_consensus(msg)

    def _on_config(self, msg: proto.Message) -> None:
        config = FederationConfig.from_dict(msg.info)
        if self.state.config is not None and config.run_id == self.state.config.run_id:
            return
        if config.proxy_sha256 != self.data.proxy_sha256:
            raise ConfigError(
                f"device {self.identity.device_id}: the server's proxy set "
                f"{config.proxy_sha256[:12]} differs from this device's "
                f"{self.data.proxy_sha256[:12]}; ship the federation's proxy set in the kit")
        _, client_cls = strategy_pair(config.strategy)
        self.state = _State(config=config, strategy=client_cls(config))
        self._publish_presence("online")

    def _publish_presence(self, status: str) -> None:
        ident = self.identity
        info = {"profile": ident.profile, "student": ident.student, "params": ident.params,
                "samples": int(len(self.data.private_y))}
        if self.state.config is not None:
            info["run_id"] = self.state.config.run_id
        self.transport.publish(self.topics.presence(ident.device_id),
                               proto.encode(proto.presence(ident.device_id, status, **info)),
                               retain=True)

    def _timed(self, fn, *args) -> Any:
        start = time.time()
        try:
            return fn(*args)
        finally:
            self._intervals.append((start, time.time()))

    def _on_round(self, msg: proto.Message) -> None:
        if msg.info.get("done"):
            if self.state.absorbed >= msg.round - 1:
                self._finish()
            return
        key = (msg.round, int(msg.info.get("attempt", 1)))
        if key in self.state.answered or msg.round <= self.state.absorbed:
            return
        if msg.round - 1 > self.state.absorbed and self.state.warmed_up:
            self.state.pending_round, self.state.pending_since = msg, time.monotonic()
            return
        self._answer(msg)

    def _answer(self, msg: proto.Message) -> None:
        state, ctx = self.state, self.ctx
        if not state.warmed_up:
            self._timed(state.strategy.warmup, ctx)
            state.warmed_up = True
            self._report(0)
        announcement = Payload(msg.info, msg.tensors)
        reply = self._timed(state.strategy.reply, ctx, announcement)
        reply.info.update(samples=int(len(self.data.private_y)), run_id=state.config.run_id,
                          attempt=msg.info.get("attempt", 1))
        self.transport.publish(self.topics.up(self.identity.device_id), proto.encode(
            proto.Message(proto.KIND_UPLOAD, self.identity.device_id, msg.round, reply.info,
                          reply.tensors)))
        state.announcements[msg.round] = announcement
        state.answered.add((msg.round, int(msg.info.get("attempt", 1))))

    def _maybe_release_pending(self) -> None:
        pending = self.state.pending_round
        if pending is None:
            return
        ready = pending.round - 1 <= self.state.absorbed
        if ready or time.monotonic() - self.state.pending_since > CONSENSUS_GRACE_S:
            self.state.pending_round = None
            if pending.round > self.state.absorbed:
                self._answer(pending)

    def _on_consensus(self, msg: proto.Message) -> None:
        state = self.state
        announcement = state.announcements.get(msg.round)
        if msg.round <= state.absorbed or announcement is None:
            return
        self._timed(state.strategy.absorb, self.ctx, announcement, Payload(msg.info, msg.tensors))
        state.absorbed = msg.round
        state.announcements = {r: a for r, a in state.announcements.items() if r > msg.round}
        self._report(msg.round)
        self._checkpoint(msg.round)
        if msg.info.get("final"):
            self._finish()
        else:
            self._maybe_release_pending()

    def _report(self, rnd: int) -> None:
        accuracy = None
        if self.data.eval_X is not None:
            accuracy = self._timed(self.trainer.accuracy, self.data.eval_X, self.data.eval_y)
        info = {"run_id": self.state.config.run_id, "accuracy": accuracy,
                "compute_intervals": [list(i) for i in self._intervals],
                "bytes": self.transport.stats.snapshot(), "student": self.identity.student,
                "profile": self.identity.profile}
        self._intervals = []
        self.history.append({"round": rnd, **info})
        self.transport.publish(self.topics.up(self.identity.device_id), proto.encode(
            proto.Message(proto.KIND_METRICS, self.identity.device_id, rnd, info)))

    def _checkpoint(self, rnd: int) -> None:
        """Write weights and metadata atomically so a crash never leaves a torn checkpoint."""
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        weights = self.checkpoint_dir / "student.safetensors"
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in
                   self.trainer.model.state_dict().items()}, str(tmp))
        os.replace(tmp, weights)
        last = self.history[-1] if self.history else {}
        meta = {"device": self.identity.device_id, "profile": self.identity.profile,
                "student": self.identity.student, "params": self.identity.params,
                "round": rnd, "accuracy": last.get("accuracy"), **self.checkpoint_meta}
        tmp_meta = self.checkpoint_dir / "student.json.tmp"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, self.checkpoint_dir / "student.json")

    def _finish(self) -> None:
        self._publish_presence("offline")
        self.finished.set()

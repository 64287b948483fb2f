"""One device in the federation: join, warm up, answer rounds, absorb consensus, checkpoint.

The transport thread only queues messages; a worker thread does the learning, so slow training
never blocks MQTT keep-alives. The client answers each round once and absorbs each consensus
once; QoS-1 redeliveries and retained re-sends are ignored.

Surviving failures: after warm-up and after every absorbed round the client checkpoints its
whole trainer (weights, Adam state, shuffling RNG) with the run's ``run_id``. Restarted, it
resumes from the checkpoint when the server announces the same run, absorbs the consensus it
missed (published retained and self-contained) and answers the current round. It keeps each
upload until the round's consensus arrives and re-sends it when the server's announcement lists
it in ``waiting_for`` (the upload was lost to a broker or server restart), so the same bytes
arrive again instead of a recomputed answer. A client that sees it lacks a message re-sends its
last report as a reminder, and the server re-publishes that message (``server.py``): a consensus
(a later round is announced or nudged) or a round announcement (nudged about a round it never
saw).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors import SafetensorError

from fededge.config import ConfigError, FederationConfig
from fededge.federation.checkpoints import (
    STATE_FILE,
    load_trainer_state,
    save_student,
    save_trainer_state,
)
from fededge.federation.strategies import strategy_pair
from fededge.federation.strategies.base import ClientContext, ClientStrategy
from fededge.learn.trainer import Trainer, seeded_trainer
from fededge.transport.base import Transport
from fededge.wire.envelope import decode
from fededge.wire.messages import (
    ConfigMessage,
    ConsensusMessage,
    MetricsMessage,
    ModelMessage,
    PresenceMessage,
    RoundMessage,
    UploadMessage,
    parse,
)
from fededge.wire.topics import SERVER_ID, ProtocolError, Topics, validate_id

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
    absorbed: int = 0
    # round → (upload, when it was sent), kept until the round's consensus is absorbed
    uploads: dict[int, tuple[bytes, float]] = field(default_factory=dict)
    pending_round: RoundMessage | None = None
    pending_since: float = 0.0
    last_report: bytes | None = None  # this process's last report, re-sent as a reminder


class FederationClient:
    def __init__(self, transport: Transport, federation: str, identity: DeviceIdentity,
                 trainer: Trainer, data: LocalData, *, checkpoint_dir: Path | None = None,
                 checkpoint_meta: dict[str, Any] | None = None, slowdown: float = 0.0) -> None:
        """``slowdown`` > 0 sleeps that multiple of every compute step's duration after it, so a
        simulated slow device really is a straggler."""
        validate_id(identity.device_id)
        self.transport, self.identity, self.trainer, self.data = transport, identity, trainer, data
        self.topics = Topics(federation)
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_meta = checkpoint_meta or {}
        self.slowdown = slowdown
        self.ctx = ClientContext(trainer, data.private_X, data.private_y, data.public_X,
                                 self._new_learner)
        self.state = _State()
        self.resumed_from: int | None = None
        self.finished = threading.Event()
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.history: list[dict[str, Any]] = []
        self._inbox: queue.Queue[tuple[str, bytes, float]] = queue.Queue()
        self._received_at = 0.0  # when the message being handled arrived (monotonic)
        self._intervals: list[tuple[float, float]] = []
        self._bytes_base: dict[str, int] = {}  # counted by earlier processes of this device
        self._worker = threading.Thread(target=self._work, name=f"client-{identity.device_id}",
                                        daemon=True)

    def _new_learner(self, student: str, seed: int) -> Trainer:
        """Another model for a strategy (a FedAvg teacher), for the federation's inputs."""
        c = self.state.config
        return seeded_trainer(student, c.input_shape, c.num_classes, seed=seed, lr=c.lr,
                              batch_size=c.batch_size)

    @staticmethod
    def last_will(federation: str, device_id: str) -> tuple[str, bytes]:
        """The retained 'offline' presence the broker publishes if this device vanishes."""
        return (Topics(federation).presence(device_id),
                PresenceMessage(device_id, "offline").encode())

    def start(self) -> "FederationClient":
        for topic in (self.topics.config, self.topics.round, self.topics.consensus):
            self.transport.subscribe(topic,
                                     lambda t, p: self._inbox.put((t, p, time.monotonic())))
        self._worker.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    def stop(self) -> None:
        """End the worker after the step it is in (its state is checkpointed after each)."""
        self._stopping.set()
        self._inbox.put(("", b"", 0.0))
        if self._worker.is_alive():
            self._worker.join(timeout=30)

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self.finished.is_set() and not self._stopping.is_set():
                try:
                    topic, payload, self._received_at = self._inbox.get(timeout=0.5)
                except queue.Empty:
                    self._maybe_release_pending()
                    continue
                if not topic or self._stopping.is_set():
                    break
                self._handle(topic, payload)
        except BaseException as exc:  # surfaced to whoever waits on us
            self.error = exc
            log.exception("client %s stopped", self.identity.device_id)
            self.finished.set()

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            envelope = decode(payload, topic=topic, topics=self.topics)
            if envelope.sender != SERVER_ID:
                raise ProtocolError(f"{envelope.kind} from {envelope.sender!r}, not the server")
            msg = parse(envelope)
        except ProtocolError as exc:
            log.warning("%s ignored a bad message on %s: %s", self.identity.device_id, topic, exc)
            return
        try:
            if isinstance(msg, ConfigMessage) and topic == self.topics.config:
                self._on_config(msg.config)
            elif (self.state.config is None
                  or getattr(msg, "run_id", None) != self.state.config.run_id):
                return  # nothing to do before the config, nor with another run's leftovers
            elif isinstance(msg, RoundMessage) and topic == self.topics.round:
                self._on_round(msg)
            elif isinstance(msg, ConsensusMessage) and topic == self.topics.consensus:
                self._on_consensus(msg)
        except ProtocolError as exc:  # the strategy found the message unusable: not ours to fix
            log.warning("%s ignored a bad %s on %s: %s", self.identity.device_id,
                        envelope.kind, topic, exc)

    def _on_config(self, config: FederationConfig) -> None:
        if self.state.config is not None and config.run_id == self.state.config.run_id:
            # The server re-published its state (it restarted, or the broker did): say we are
            # here, in case our presence was lost or overwritten by a Last Will.
            self._publish_presence("online")
            return
        if config.proxy_sha256 != self.data.proxy_sha256:
            raise ConfigError(
                f"device {self.identity.device_id}: the server's proxy set "
                f"{config.proxy_sha256[:12]} differs from this device's "
                f"{self.data.proxy_sha256[:12]}; ship the federation's proxy set in the kit")
        _, client_cls = strategy_pair(config.strategy)
        self.state = _State(config=config, strategy=client_cls(config))
        self._resume(config.run_id)
        self._publish_presence("online")

    def _resume(self, run_id: str) -> None:
        """Continue from this run's checkpoint, if there is one; other runs' are ignored."""
        path = self.checkpoint_dir / STATE_FILE if self.checkpoint_dir else None
        if path is None or not path.is_file():
            return
        try:
            trainer_state, meta = load_trainer_state(path)
        except (OSError, SafetensorError, ValueError, KeyError) as exc:
            log.warning("%s: unreadable checkpoint %s (%s); starting afresh",
                        self.identity.device_id, path, exc)
            return
        if meta.get("run_id") != run_id:
            return
        self.trainer.load_state_dict(trainer_state)
        self.state.warmed_up, self.state.absorbed = True, int(meta["round"])
        self._bytes_base = dict(meta["bytes"])
        self.resumed_from = self.state.absorbed
        log.info("%s resumed from its round-%d checkpoint", self.identity.device_id,
                 self.state.absorbed)

    def _publish_presence(self, status: str) -> None:
        ident, config = self.identity, self.state.config
        message = PresenceMessage(ident.device_id, status, config.run_id if config else None,
                                  ident.profile, ident.student, ident.params,
                                  int(len(self.data.private_y)))
        self.transport.publish(self.topics.presence(ident.device_id), message.encode(),
                               retain=True)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.time()
        try:
            return fn(*args)
        finally:
            if self.slowdown > 0:
                time.sleep((time.time() - start) * self.slowdown)
            self._intervals.append((start, time.time()))

    # -- rounds --------------------------------------------------------------------------------
    def _on_round(self, msg: RoundMessage) -> None:
        state = self.state
        if msg.done:
            if state.absorbed >= msg.round - 1:
                self._finish()
            return
        if msg.round <= state.absorbed:
            return
        behind = msg.round - 1 > state.absorbed and state.warmed_up
        if behind:
            self._remind()  # round msg.round - 1 closed, and its consensus is not here
        if msg.round in state.uploads:
            # Re-send only if the server said so after we sent: a listing queued while we were
            # still computing is stale.
            _, sent_at = state.uploads[msg.round]
            if (self.identity.device_id in msg.waiting_for
                    and self._received_at > sent_at):
                self._resend(msg.round)
            return
        if msg.nudge:
            # Not answered, not waiting for its consensus: the announcement itself was lost
            # (a nudge after the last round announces nothing).
            if state.warmed_up and not behind and msg.round <= state.config.rounds:
                self._remind()
            return
        if behind:
            if state.pending_round is None or state.pending_round.round != msg.round:
                state.pending_since = time.monotonic()
            state.pending_round = msg
            return
        self._answer(msg)

    def _answer(self, msg: RoundMessage) -> None:
        state, ctx = self.state, self.ctx
        if not state.warmed_up:
            self._timed(state.strategy.warmup, ctx)
            state.warmed_up = True
            self._report(0)
            self._checkpoint(0)
        reply = self._timed(state.strategy.reply, ctx, msg.body)
        body = UploadMessage(self.identity.device_id, msg.round, state.config.run_id,
                             int(len(self.data.private_y)), reply, attempt=msg.attempt).encode()
        state.uploads[msg.round] = (body, time.monotonic())
        self.transport.publish(self.topics.up(self.identity.device_id), body)
        log.info("%s uploaded round %d (%d bytes)", self.identity.device_id, msg.round, len(body))

    def _resend(self, rnd: int) -> None:
        """The server still lacks our upload: say we are here and send the same bytes again."""
        self._publish_presence("online")
        body, _ = self.state.uploads[rnd]
        self.state.uploads[rnd] = (body, time.monotonic())
        self.transport.publish(self.topics.up(self.identity.device_id), body)
        log.info("%s re-sent its upload for round %d", self.identity.device_id, rnd)

    def _remind(self) -> None:
        """A consensus or an announcement is missing: re-send the last report, which tells the
        server the last round this device absorbed (it re-publishes what that shows lacking)."""
        state = self.state
        if state.last_report is None:  # restarted: this process has not reported yet
            self._report(state.absorbed)
        else:
            self.transport.publish(self.topics.up(self.identity.device_id), state.last_report)

    def _maybe_release_pending(self) -> None:
        pending = self.state.pending_round
        if pending is None:
            return
        ready = pending.round - 1 <= self.state.absorbed
        if ready or time.monotonic() - self.state.pending_since > CONSENSUS_GRACE_S:
            self.state.pending_round = None
            if pending.round > self.state.absorbed and pending.round not in self.state.uploads:
                self._answer(pending)

    def _on_consensus(self, msg: ConsensusMessage) -> None:
        state = self.state
        if msg.final and msg.round == state.absorbed and not self.finished.is_set():
            # Absorbed before a restart, whose report the server may have lost with its own
            # restart: report again (the server counts a report once) and finish.
            self._report(msg.round)
            self._finish()
            return
        if msg.round <= state.absorbed or not state.warmed_up:
            return  # seen already, or nothing to distill into before the warm-up
        self._timed(state.strategy.absorb, self.ctx, msg.announcement, msg.body)
        state.absorbed = msg.round
        state.uploads = {r: body for r, body in state.uploads.items() if r > msg.round}
        self._report(msg.round)
        self._checkpoint(msg.round)
        if msg.final:
            self._finish()
        else:
            self._maybe_release_pending()

    def _byte_counters(self) -> dict[str, int]:
        """Cumulative traffic, including what earlier processes of this device counted."""
        now = self.transport.stats.snapshot()
        return {k: self._bytes_base.get(k, 0) + v for k, v in now.items()}

    def _report(self, rnd: int) -> None:
        accuracy = None
        if self.data.eval_X is not None:
            accuracy = self._timed(self.trainer.accuracy, self.data.eval_X, self.data.eval_y)
        report = MetricsMessage(self.identity.device_id, rnd, self.state.config.run_id,
                                self._byte_counters(), accuracy, tuple(self._intervals),
                                self.identity.student, self.identity.profile)
        self._intervals = []
        self.history.append({"round": rnd, **report.to_info()})
        self.state.last_report = report.encode()
        self.transport.publish(self.topics.up(self.identity.device_id), self.state.last_report)

    def _checkpoint(self, rnd: int) -> None:
        """The exportable student (``student.*``), then the resume state (``state.*``)."""
        if self.checkpoint_dir is None:
            return
        last = self.history[-1] if self.history else {}
        meta = {"device": self.identity.device_id, "profile": self.identity.profile,
                "student": self.identity.student, "params": self.identity.params,
                "round": rnd, "accuracy": last.get("accuracy"),
                "run_id": self.state.config.run_id, **self.checkpoint_meta}
        save_student(self.trainer.model, self.checkpoint_dir, meta)
        save_trainer_state(self.trainer, self.checkpoint_dir / STATE_FILE,
                           {"run_id": self.state.config.run_id, "round": rnd,
                            "bytes": self._byte_counters()})

    def _finish(self) -> None:
        if self.finished.is_set():
            return
        if self.state.config.collect_models and self.state.warmed_up:
            self._send_model()
        self._publish_presence("offline")
        self.finished.set()

    def _send_model(self) -> None:
        """The trained student, to a federation that collects them (``collect_models``): its
        weights, on the upload topic, after the last round's metrics."""
        weights = {name: tensor.detach().cpu().contiguous().numpy()
                   for name, tensor in self.trainer.model.state_dict().items()}
        accuracy = self.history[-1].get("accuracy") if self.history else None
        body = ModelMessage(self.identity.device_id, self.state.absorbed,
                            self.state.config.run_id, self.identity.student, weights,
                            accuracy).encode()
        self.transport.publish(self.topics.up(self.identity.device_id), body)
        log.info("%s sent its trained student (%d bytes)", self.identity.device_id, len(body))

"""Round orchestration: announce, collect validated uploads until all live clients answered or the
deadline passed with quorum, aggregate through the strategy, publish the consensus.

All broker traffic arrives on the transport's thread and is only queued there; this loop is the
single consumer, so round state needs no locks and a hostile payload can at worst be rejected.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from . import protocol as proto
from .config import FederationConfig
from .strategy import Payload, Reply, ServerStrategy
from .transport import Transport

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation cannot go on (too few clients); never raised for a bad payload."""


@dataclass
class RoundRecord:
    round: int
    participants: list[str]
    accepted: list[str]
    attempts: int
    seconds: float


@dataclass
class ServerEvents:
    """Hooks for progress display; the server works the same without them."""

    on_round_closed: Callable[[RoundRecord], None] = lambda record: None
    on_round_reported: Callable[[int], None] = lambda rnd: None


@dataclass
class _OpenRound:
    round: int
    attempt: int
    announcement: Payload
    specs: list[proto.TensorSpec]
    participants: set[str]
    replies: dict[str, Reply] = field(default_factory=dict)


class FederationServer:
    def __init__(self, transport: Transport, config: FederationConfig, strategy: ServerStrategy,
                 *, expected_clients: int, join_timeout: float = 120.0,
                 events: ServerEvents | None = None,
                 max_payload: int = proto.DEFAULT_MAX_PAYLOAD) -> None:
        self.transport, self.config, self.strategy = transport, config, strategy
        self.topics = proto.Topics(config.federation)
        self.expected_clients = expected_clients
        self.join_timeout = join_timeout
        self.events = events or ServerEvents()
        self.max_payload = max_payload
        self.live: dict[str, dict[str, Any]] = {}
        self.metrics: dict[int, dict[str, dict[str, Any]]] = {}
        self.rejections: Counter[str] = Counter()
        self.accepted_uploads = 0
        self.history: list[RoundRecord] = []
        self._open: _OpenRound | None = None
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        transport.subscribe(self.topics.all_up, self._enqueue)
        transport.subscribe(self.topics.all_presence, self._enqueue)

    # -- inbox ---------------------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle inbound messages until ``done()`` or the deadline; True if done."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                topic, payload = self._inbox.get(timeout=min(remaining, 0.25))
            except queue.Empty:
                continue
            self._handle(topic, payload)
        return True

    def _reject(self, topic: str, reason: str) -> None:
        self.rejections[reason.split(":")[0][:80]] += 1
        log.warning("rejected message on %s: %s", topic, reason)

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload and self.topics.device_of(topic) is not None and "/presence/" in topic:
            return  # a cleared retained presence
        try:
            msg = proto.decode(payload, topic=topic, topics=self.topics, max_bytes=self.max_payload)
            if msg.kind == proto.KIND_PRESENCE and "/presence/" in topic:
                self._on_presence(msg)
            elif msg.kind == proto.KIND_UPLOAD and "/up/" in topic:
                self._on_upload(msg)
            elif msg.kind == proto.KIND_METRICS and "/up/" in topic:
                self._on_metrics(msg)
            else:
                raise proto.ProtocolError(f"kind {msg.kind!r} is not accepted on {topic}")
        except proto.ProtocolError as exc:
            self._reject(topic, str(exc))

    def _on_presence(self, msg: proto.Message) -> None:
        if msg.info.get("run_id") not in (None, self.config.run_id):
            return  # a retained presence left over from another run
        if msg.info.get("status") == "online":
            self.live[msg.sender] = msg.info
        else:
            self.live.pop(msg.sender, None)

    def _on_upload(self, msg: proto.Message) -> None:
        current = self._open
        if current is None or msg.round != current.round or msg.info.get("run_id") != self.config.run_id:
            raise proto.ProtocolError(f"upload for round {msg.round} while round "
                                      f"{current.round if current else 'none'} is open")
        if msg.sender in current.replies:
            return  # QoS-1 redelivery: idempotent on (round, device, kind)
        proto.require_tensors(msg, current.specs)
        samples = msg.info.get("samples")
        if not isinstance(samples, int) or samples < 1:
            raise proto.ProtocolError(f"upload sample count {samples!r} is not a positive int")
        reply = Reply(msg.sender, samples, Payload(msg.info, msg.tensors))
        self.strategy.check(reply)
        current.replies[msg.sender] = reply
        self.accepted_uploads += 1

    def _on_metrics(self, msg: proto.Message) -> None:
        if msg.info.get("run_id") != self.config.run_id:
            raise proto.ProtocolError("metrics from another run")
        per_round = self.metrics.setdefault(msg.round, {})
        if msg.sender in per_round:
            return
        per_round[msg.sender] = msg.info
        if 1 <= msg.round <= len(self.history):
            contributors = set(self.history[msg.round - 1].accepted)
            if msg.sender in contributors and contributors <= set(per_round):
                self.events.on_round_reported(msg.round)

    # -- rounds --------------------------------------------------------------------------------
    def _publish(self, topic: str, kind: str, rnd: int, payload: Payload, *, retain: bool) -> None:
        info = {**payload.info, "run_id": self.config.run_id}
        body = proto.encode(proto.Message(kind, proto.SERVER_ID, rnd, info, payload.tensors))
        self.transport.publish(topic, body, retain=retain)

    def _quorum(self) -> int:
        return max(1, math.ceil(self.config.quorum * self.expected_clients))

    def wait_for_clients(self) -> None:
        joined = self._pump(lambda: len(self.live) >= self.expected_clients,
                            time.monotonic() + self.join_timeout)
        if not joined and len(self.live) < self._quorum():
            raise FederationError(
                f"only {len(self.live)} of {self.expected_clients} clients joined within "
                f"{self.join_timeout:.0f} s (quorum {self._quorum()}); check that the clients "
                "reach the broker and use this federation's name")

    def _run_round(self, rnd: int) -> RoundRecord:
        started = time.monotonic()
        for attempt in range(1, self.config.max_attempts + 1):
            announcement = self.strategy.configure(rnd)
            announcement.info.update(attempt=attempt, deadline_s=self.config.deadline_s)
            current = _OpenRound(rnd, attempt, announcement,
                                 self.strategy.reply_specs(announcement), set(self.live))
            self._open = current
            self._publish(self.topics.round, proto.KIND_ROUND, rnd, announcement, retain=True)
            self._pump(lambda: set(self.live) <= set(current.replies),
                       time.monotonic() + self.config.deadline_s)
            if len(current.replies) >= self._quorum():
                break
            log.warning("round %d attempt %d closed with %d uploads, quorum is %d; retrying",
                        rnd, attempt, len(current.replies), self._quorum())
        else:
            raise FederationError(f"round {rnd} reached no quorum in {self.config.max_attempts} "
                                  f"attempts ({len(current.replies)} of {self._quorum()} uploads)")
        self._open = None
        replies = [current.replies[d] for d in sorted(current.replies)]
        consensus = self.strategy.aggregate(rnd, announcement, replies)
        consensus.info["final"] = rnd == self.config.rounds
        self._publish(self.topics.consensus, proto.KIND_CONSENSUS, rnd, consensus, retain=False)
        record = RoundRecord(rnd, sorted(current.participants), sorted(current.replies), attempt,
                             time.monotonic() - started)
        self.history.append(record)
        self.events.on_round_closed(record)
        return record

    def run(self) -> list[RoundRecord]:
        """Drive the whole federation; returns one record per round."""
        self._publish(self.topics.config, proto.KIND_CONFIG, 0,
                      Payload(info=self.config.to_dict()), retain=True)
        self.wait_for_clients()
        for rnd in range(1, self.config.rounds + 1):
            self._run_round(rnd)
        final = self.config.rounds
        contributors = set(self.history[-1].accepted)
        self._pump(lambda: contributors <= set(self.metrics.get(final, {})),
                   time.monotonic() + self.config.deadline_s)
        self._publish(self.topics.round, proto.KIND_ROUND, final + 1,
                      Payload(info={"done": True}), retain=True)
        return self.history

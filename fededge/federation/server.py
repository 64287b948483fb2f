"""Round orchestration: announce, collect validated uploads until all live clients answered or the
deadline passed with quorum, aggregate through the strategy, publish the consensus.

All broker traffic arrives on the transport's thread and is only queued there; this loop is the
single consumer, so round state needs no locks and a hostile payload can at worst be rejected.

Surviving failures:

- Everything a restart needs is in the ``Store`` before it is acted upon: accepted uploads
  (with their bytes), closed rounds and their consensus. A restarted server adopts the stored
  ``run_id`` and resumes at the first incomplete round, with the uploads it already had.
- The server's view of the world is re-published, retained, while it waits: the config, the
  last consensus and the open round, whose ``waiting_for`` names the devices it still lacks.
  A client listed there re-sends its upload. This one mechanism recovers uploads and consensus
  lost to a broker restart (clean sessions, no broker persistence needed), to a server restart
  (nothing queued for it meanwhile) and to client restarts.
- A round closes when every live device answered and a quorum did, or at the deadline with a
  quorum; without quorum it is retried with a fresh deadline (uploads already accepted for the
  round are kept: the clients' students have not changed since), never faked.
- Presence comes from retained presence messages and Last Wills. A Will is believed only after
  ``presence_grace_s``, because a broker going down fires every device's Will although they
  are back seconds later; a device's own goodbye counts at once.
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from fededge.config import FederationConfig
from fededge.errors import FedEdgeError
from fededge.federation.store import Store
from fededge.federation.strategies.base import Payload, Reply, ServerStrategy
from fededge.transport.base import Transport
from fededge.wire import protocol as proto

log = logging.getLogger(__name__)

ANNOUNCED = "announced."
"""Prefix of the round announcement's tensors inside a consensus message. Carrying them makes a
consensus self-contained, so a client that restarted (and never saw the announcement) can still
absorb a round's consensus delivered as a retained message."""


class FederationError(FedEdgeError, RuntimeError):
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
    """A round taking uploads. ``announcement`` is the strategy's; the attempt, deadline and
    ``waiting_for`` are added each time it is published."""

    round: int
    attempt: int
    announcement: Payload
    specs: list[proto.TensorSpec]
    replies: dict[str, Reply]
    participants: set[str] = field(default_factory=set)


def bundle_consensus(announcement: Payload, consensus: Payload) -> Payload:
    """The consensus payload as published: the aggregate plus the announcement it answers."""
    info = {**consensus.info, "announcement": announcement.info}
    tensors = {**consensus.tensors,
               **{ANNOUNCED + name: arr for name, arr in announcement.tensors.items()}}
    return Payload(info, tensors)


def unbundle_consensus(msg: proto.Message) -> tuple[Payload, Payload]:
    """(announcement, consensus) from a published consensus message."""
    announced = {k[len(ANNOUNCED):]: v for k, v in msg.tensors.items() if k.startswith(ANNOUNCED)}
    own = {k: v for k, v in msg.tensors.items() if not k.startswith(ANNOUNCED)}
    announcement = msg.info.get("announcement")
    if not isinstance(announcement, dict):
        raise proto.ProtocolError("consensus does not carry its round announcement")
    return Payload(announcement, announced), Payload(msg.info, own)


def _check_metrics(info: dict[str, Any]) -> None:
    """Reports feed the run summary and plots, so their shape is checked like any payload."""
    accuracy = info.get("accuracy")
    if accuracy is not None and not (isinstance(accuracy, (int, float)) and 0 <= accuracy <= 1):
        raise proto.ProtocolError(f"metrics accuracy {accuracy!r} is not in [0, 1]")
    counters = info.get("bytes")
    if not isinstance(counters, dict) or not all(
            isinstance(counters.get(k), int) and counters[k] >= 0
            for k in ("sent_bytes", "received_bytes")):
        raise proto.ProtocolError("metrics bytes lack non-negative sent_bytes/received_bytes")
    intervals = info.get("compute_intervals", [])
    if not isinstance(intervals, list) or not all(
            isinstance(iv, list) and len(iv) == 2 and all(isinstance(t, (int, float)) for t in iv)
            for iv in intervals):
        raise proto.ProtocolError("metrics compute_intervals are not [start, end] pairs")


class FederationServer:
    def __init__(self, transport: Transport, config: FederationConfig, strategy: ServerStrategy,
                 *, expected_clients: int, store: Store | None = None,
                 context: dict[str, Any] | None = None, join_timeout: float = 120.0,
                 events: ServerEvents | None = None,
                 max_payload: int = proto.DEFAULT_MAX_PAYLOAD) -> None:
        """``store`` holds the state to resume from (default: in memory, nothing survives);
        ``context`` lists launch settings besides the config that a resume must match."""
        self.store = store or Store()
        self.config, resumed = self.store.begin(
            config, {"expected_clients": expected_clients, **(context or {})})
        self.transport, self.strategy = transport, strategy
        self.topics = proto.Topics(self.config.federation)
        self.expected_clients = expected_clients
        self.join_timeout = join_timeout
        self.events = events or ServerEvents()
        self.max_payload = max_payload
        # Devices to wait for: online, or offline for less than presence_grace_s.
        self.live: dict[str, dict[str, Any]] = {}
        self._offline_since: dict[str, float] = {}
        self.metrics = self.store.metrics()
        self.history = [RoundRecord(r.round, r.participants, r.accepted, r.attempts, r.seconds)
                        for r in self.store.closed_rounds()]
        self.resumed_from_round: int | None = len(self.history) + 1 if resumed else None
        self._last_consensus = self.store.consensus(len(self.history)) if self.history else None
        self._resend_s = self.config.resend_s or self.config.deadline_s / 4
        self._open: _OpenRound | None = None
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        transport.subscribe(self.topics.all_up, self._enqueue)
        transport.subscribe(self.topics.all_presence, self._enqueue)

    @property
    def rejections(self) -> Counter[str]:
        """Rejected messages by reason, as counted in the store."""
        return self.store.rejections()

    @property
    def accepted_uploads(self) -> int:
        return self.store.count("accepted", "upload")

    # -- inbox ---------------------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle inbound messages until ``done()`` or the deadline; True if done. While it
        waits it re-publishes the retained state every ``resend_s`` (see the module doc)."""
        next_refresh = time.monotonic() + self._resend_s
        while True:
            self._expire_offline()
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return self._drain(done)
            if now >= next_refresh:
                self._refresh()
                next_refresh = now + self._resend_s
            try:
                topic, payload = self._inbox.get(
                    timeout=max(0.001, min(deadline, next_refresh, now + 0.25) - now))
            except queue.Empty:
                continue
            self._handle(topic, payload)

    def _drain(self, done: Callable[[], bool]) -> bool:
        """At the deadline: what already arrived counts, even if this loop was late to read it
        (a stalled or suspended server)."""
        while not done():
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return False
            self._handle(topic, payload)
        return True

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload and "/presence/" in topic:
            return  # a cleared retained presence
        msg: proto.Message | None = None
        try:
            msg = proto.decode(payload, topic=topic, topics=self.topics, max_bytes=self.max_payload)
            if msg.kind == proto.KIND_PRESENCE and "/presence/" in topic:
                self._on_presence(msg)
                return
            if msg.kind == proto.KIND_UPLOAD and "/up/" in topic:
                status = self._on_upload(msg)
            elif msg.kind == proto.KIND_METRICS and "/up/" in topic:
                status = self._on_metrics(msg)
            else:
                raise proto.ProtocolError(f"kind {msg.kind!r} is not accepted on {topic}")
        except proto.ProtocolError as exc:
            self._record(topic, payload, msg, "rejected", str(exc))
            log.warning("rejected message on %s: %s", topic, exc)
            return
        self._record(topic, payload, msg, status)

    def _record(self, topic: str, payload: bytes, msg: proto.Message | None, status: str,
                reason: str | None = None) -> None:
        attempt = msg.info.get("attempt") if msg is not None else None
        self.store.record(
            topic, payload, status, sender=msg.sender if msg else None,
            kind=msg.kind if msg else None, rnd=msg.round if msg else None,
            attempt=attempt if isinstance(attempt, int) else None, reason=reason,
            keep_payload=status == "accepted" and msg is not None and msg.kind == proto.KIND_UPLOAD)

    def _on_presence(self, msg: proto.Message) -> None:
        # A Last Will carries no run_id (it is set before the device knows the run).
        if msg.info.get("run_id") not in (None, self.config.run_id):
            raise proto.ProtocolError(f"presence from run {msg.info.get('run_id')!r}, "
                                      "not this run")
        status = msg.info.get("status")
        self.store.set_presence(msg.sender, str(status), msg.info)
        if status == "online":
            self.live[msg.sender] = msg.info
            self._offline_since.pop(msg.sender, None)
        elif "run_id" in msg.info:  # a goodbye: the device is done
            self.live.pop(msg.sender, None)
            self._offline_since.pop(msg.sender, None)
        elif msg.sender in self.live and msg.sender not in self._offline_since:
            # A Will: the device crashed, or the broker went down and fired every Will. Ask
            # whoever is still (or again) there to speak up; while we are disconnected the
            # re-publish waits in paho.
            self._offline_since[msg.sender] = time.monotonic()
            self._refresh()

    def _expire_offline(self) -> None:
        """Stop waiting for devices offline for longer than the grace period."""
        now = time.monotonic()
        for device, since in list(self._offline_since.items()):
            if now - since >= self.config.presence_grace_s:
                self.live.pop(device, None)
                del self._offline_since[device]

    def _on_upload(self, msg: proto.Message) -> str:
        current = self._open
        if msg.info.get("run_id") != self.config.run_id:
            raise proto.ProtocolError(f"upload from run {msg.info.get('run_id')!r}, not this run")
        if current is None or msg.round != current.round:
            if 1 <= msg.round <= len(self.history):
                return "late"  # a straggler or a re-send after the round closed: ignored
            raise proto.ProtocolError(f"upload for round {msg.round} while round "
                                      f"{current.round if current else 'none'} is open")
        if msg.sender in current.replies:
            return "duplicate"  # QoS-1 redelivery or a re-send: idempotent on (round, device)
        current.replies[msg.sender] = self._validated_reply(msg, current.specs)
        return "accepted"

    def _validated_reply(self, msg: proto.Message, specs: list[proto.TensorSpec]) -> Reply:
        proto.require_tensors(msg, specs)
        samples = msg.info.get("samples")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise proto.ProtocolError(f"upload sample count {samples!r} is not a positive int")
        reply = Reply(msg.sender, samples, Payload(msg.info, msg.tensors))
        self.strategy.check(reply)
        return reply

    def _on_metrics(self, msg: proto.Message) -> str:
        if msg.info.get("run_id") != self.config.run_id:
            raise proto.ProtocolError(f"metrics from run {msg.info.get('run_id')!r}, not this run")
        if msg.round > self.config.rounds:
            raise proto.ProtocolError(f"metrics for round {msg.round} of a "
                                      f"{self.config.rounds}-round federation")
        _check_metrics(msg.info)
        if not self.store.add_metrics(msg.round, msg.sender, msg.info):
            return "duplicate"
        per_round = self.metrics.setdefault(msg.round, {})
        per_round[msg.sender] = msg.info
        if 1 <= msg.round <= len(self.history):
            contributors = set(self.history[msg.round - 1].accepted)
            if msg.sender in contributors and contributors <= set(per_round):
                self.events.on_round_reported(msg.round)
        return "accepted"

    # -- publishing ----------------------------------------------------------------------------
    def _encode(self, kind: str, rnd: int, payload: Payload) -> bytes:
        info = {**payload.info, "run_id": self.config.run_id}
        return proto.encode(proto.Message(kind, proto.SERVER_ID, rnd, info, payload.tensors))

    def _announce(self, current: _OpenRound) -> None:
        waiting = sorted((current.participants | set(self.live)) - set(current.replies))
        info = {**current.announcement.info, "attempt": current.attempt,
                "deadline_s": self.config.deadline_s, "waiting_for": waiting}
        announcement = Payload(info, current.announcement.tensors)
        self.transport.publish(self.topics.round,
                               self._encode(proto.KIND_ROUND, current.round, announcement),
                               retain=True)

    def _refresh(self) -> None:
        """Re-publish the retained state: config, last consensus, and the open round."""
        self.transport.publish(self.topics.config, self._encode(
            proto.KIND_CONFIG, 0, Payload(info=self.config.to_dict())), retain=True)
        if self._last_consensus is not None:
            self.transport.publish(self.topics.consensus, self._last_consensus, retain=True)
        if self._open is not None:
            self._announce(self._open)

    # -- rounds --------------------------------------------------------------------------------
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

    def _prepare(self, rnd: int) -> _OpenRound:
        """Round ``rnd`` ready to take uploads: its next attempt, with the uploads accepted for
        it before a restart (they passed validation then)."""
        announcement = self.strategy.configure(rnd)
        specs = self.strategy.reply_specs(announcement)
        replies: dict[str, Reply] = {}
        for topic, payload in self.store.accepted_uploads(rnd):
            msg = proto.decode(payload, topic=topic, topics=self.topics, max_bytes=len(payload))
            replies.setdefault(msg.sender, self._validated_reply(msg, specs))
        last = self.store.last_attempt(rnd)  # (attempt, status) of a run before a restart
        if last is None:
            attempt = 1
        else:
            attempt = last[0] if last[1] == "open" else last[0] + 1
        return _OpenRound(rnd, attempt, announcement, specs, replies)

    def _closable(self, current: _OpenRound) -> bool:
        return len(current.replies) >= self._quorum() and set(self.live) <= set(current.replies)

    def _collect(self, rnd: int) -> _OpenRound:
        """Run attempts of round ``rnd`` until one reaches quorum; returns it, still open."""
        current = self._open if self._open and self._open.round == rnd else self._prepare(rnd)
        self._open = current
        while current.attempt <= self.config.max_attempts:
            current.participants = set(self.live)
            self.store.open_attempt(rnd, current.attempt, sorted(current.participants))
            self._announce(current)
            log.info("round %d attempt %d open, %d uploads already in", rnd, current.attempt,
                     len(current.replies))
            self._pump(lambda: self._closable(current), time.monotonic() + self.config.deadline_s)
            if len(current.replies) >= self._quorum():
                return current
            self.store.end_attempt(rnd, current.attempt, "failed", sorted(current.replies))
            log.warning("round %d attempt %d closed with %d uploads, quorum is %d; retrying",
                        rnd, current.attempt, len(current.replies), self._quorum())
            current.attempt += 1
        raise FederationError(f"round {rnd} reached no quorum in {self.config.max_attempts} "
                              f"attempts ({len(current.replies)} of {self._quorum()} uploads)")

    def _run_round(self, rnd: int) -> RoundRecord:
        started = time.monotonic()
        current = self._collect(rnd)
        self._open = None
        replies = [current.replies[d] for d in sorted(current.replies)]
        consensus = self.strategy.aggregate(rnd, current.announcement, replies)
        consensus.info["final"] = rnd == self.config.rounds
        body = self._encode(proto.KIND_CONSENSUS, rnd,
                            bundle_consensus(current.announcement, consensus))
        self.store.save_round(rnd, current.attempt, sorted(current.replies), body)
        self._last_consensus = body
        self.transport.publish(self.topics.consensus, body, retain=True)
        log.info("round %d closed with %d uploads", rnd, len(replies))
        record = RoundRecord(rnd, sorted(current.participants), sorted(current.replies),
                             current.attempt, time.monotonic() - started)
        self.history.append(record)
        self.events.on_round_closed(record)
        return record

    def run(self) -> list[RoundRecord]:
        """Drive the federation from its first incomplete round; one record per round."""
        self._refresh()
        first = len(self.history) + 1
        if first <= self.config.rounds:
            # Open for uploads while clients join: resuming, they may answer the retained
            # announcement of the round before this server announced it again.
            self._open = self._prepare(first)
            self.wait_for_clients()
        for rnd in range(first, self.config.rounds + 1):
            self._run_round(rnd)
        final = self.config.rounds
        contributors = set(self.history[-1].accepted)
        self._pump(lambda: contributors & set(self.live) <= set(self.metrics.get(final, {})),
                   time.monotonic() + self.config.deadline_s)
        self.transport.publish(self.topics.round, self._encode(
            proto.KIND_ROUND, final + 1, Payload(info={"done": True})), retain=True)
        self.store.finish()
        return self.history

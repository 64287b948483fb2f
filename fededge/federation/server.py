"""Round orchestration: announce, collect validated uploads until all live clients answered or the
deadline passed with quorum, aggregate through the strategy, publish the consensus.

All broker traffic arrives on the transport's thread and is only queued there; this loop is the
single consumer, so round state needs no locks and a hostile payload can at worst be rejected.

Surviving failures:

- Everything a restart needs is in the ``Store`` before it is acted upon: accepted uploads
  (with their bytes), closed rounds and their consensus. A restarted server adopts the stored
  ``run_id`` and resumes at the first incomplete round, with the uploads it already had.
- While it waits, the server nudges the devices: a small, unretained round message without
  the announcement, whose ``waiting_for`` names the devices it still lacks (a client listed
  there re-sends its upload); while no round is open, a nudge of the round after the last one
  closed. Every nudge reaches every device, so the interval doubles during one wait. The
  retained config and announcement are re-published whole after a Last Will and at start.
  The last consensus, the one large message, is re-published only where it may be missing:
  at start (a restarted server), after a Last Will (a broker restart may have lost retained
  messages), and for a device that shows it lacks it. A device shows that by re-sending its
  last report (``client.py``) when an announcement or nudge shows a round closed whose
  consensus it has not absorbed; the server re-publishes when that report is one it has
  already and names a round older than the last consensus, and when the consensus did not
  go out within the last ``resend_s`` (the reminder may have crossed it). A device nudged
  about a round it never saw reminds the same way and gets the announcement again. A device
  busy absorbing costs nothing, so however long rounds take, each device receives about one
  consensus per round. These mechanisms recover uploads and consensus lost to a broker
  restart (clean sessions, no broker persistence needed), to a server restart (nothing queued
  for it meanwhile) and to client restarts.
- A round closes when every live device answered and a quorum did, or at the deadline with a
  quorum; without quorum it is retried with a fresh deadline (uploads already accepted for the
  round are kept: the clients' students have not changed since), never faked.
- Presence comes from retained presence messages and Last Wills. A Will is believed only after
  ``presence_grace_s``, because a broker going down fires every device's Will although they
  are back seconds later; a device's own goodbye counts at once.
- A restarted server (resuming a run) that has a quorum of devices present waits only
  ``presence_grace_s`` more for the others, not the whole join timeout: a device that died
  for good left an 'offline' Will, and the rounds close without it.

With ``collect_models`` the devices send their trained students after the last round; the
server checks each one (this run, the last round, the student the device announced, float32
weights whose parameter count that student has: ``learn.zoo``, no torch) and keeps the payload
as it came in its store, with the metadata ``fededge export`` needs (``model_meta``).
"""

from __future__ import annotations

import logging
import math
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from fededge.config import MAX_PAYLOAD, FederationConfig
from fededge.errors import FedEdgeError
from fededge.federation.store import Store
from fededge.federation.strategies.base import Reply, ServerStrategy
from fededge.learn.zoo import UnknownStudentError, estimate_cost
from fededge.transport.base import Transport, publish_packet_size
from fededge.wire.envelope import Message, TensorSpec, decode, require_tensors
from fededge.wire.messages import (
    AnyMessage,
    ConfigMessage,
    ConsensusMessage,
    MetricsMessage,
    ModelMessage,
    Payload,
    PresenceMessage,
    RoundMessage,
    UploadMessage,
    parse,
)
from fededge.wire.topics import ProtocolError, Topics

log = logging.getLogger(__name__)
MAX_TOPIC_CHARS = 300  # of a topic as recorded (the broker allows 65,535 bytes)


class FederationError(FedEdgeError, RuntimeError):
    """The federation cannot go on (too few clients); never raised for a bad payload."""


class FederationAborted(FederationError):
    """``abort`` was called (a failed device or broker, Ctrl-C): the state so far is kept."""


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
    specs: list[TensorSpec]
    replies: dict[str, Reply]
    participants: set[str] = field(default_factory=set)


def _measured_before(metrics: dict[int, dict[str, dict[str, Any]]]
                     ) -> tuple[dict[str, int], int]:
    """What earlier processes of this server measured (a restart continues the counts): bytes
    received per device, and bytes published."""
    up: dict[str, int] = {}
    down = 0
    for per_round in metrics.values():
        for device, info in per_round.items():
            counted = info.get("bytes", {})
            up[device] = max(up.get(device, 0), int(counted.get("sent_bytes", 0)))
            down = max(down, int(counted.get("received_bytes", 0)))
    return up, down


class FederationServer:
    def __init__(self, transport: Transport, config: FederationConfig, strategy: ServerStrategy,
                 *, expected_clients: int, store: Store | None = None,
                 context: dict[str, Any] | None = None, join_timeout: float = 120.0,
                 events: ServerEvents | None = None,
                 max_payload: int = MAX_PAYLOAD,
                 model_meta: dict[str, Any] | None = None) -> None:
        """``store`` holds the state to resume from (default: in memory, nothing survives);
        ``context`` lists launch settings besides the config that a resume must match;
        ``model_meta`` goes into every collected student's metadata (``collect_models``: the
        input shape, classes, preprocessing and dataset ``fededge export`` needs)."""
        self.store = store or Store()
        self.config, resumed = self.store.begin(
            config, {"expected_clients": expected_clients, **(context or {})})
        self.transport, self.strategy = transport, strategy
        self.topics = Topics(self.config.federation)
        self.expected_clients = expected_clients
        self.join_timeout = join_timeout
        self.events = events or ServerEvents()
        self.max_payload = max_payload
        # Devices to wait for: online, or offline for less than presence_grace_s.
        self.live: dict[str, dict[str, Any]] = {}
        self._offline_since: dict[str, float] = {}
        self.announced: dict[str, dict[str, Any]] = {}  # every device's last online presence
        self.model_meta = dict(model_meta or {})
        self.collected = self.store.models()             # device -> its student's metadata
        self.metrics = self.store.metrics()
        self._received: Counter[str] = Counter()  # packet bytes per device, this process
        self._traffic_base = _measured_before(self.metrics)
        self.history = [RoundRecord(r.round, r.participants, r.accepted, r.attempts, r.seconds)
                        for r in self.store.closed_rounds()]
        self.resumed_from_round: int | None = len(self.history) + 1 if resumed else None
        self._last_consensus = self.store.consensus(len(self.history)) if self.history else None
        self._consensus_sent_at = self._announced_at = -math.inf
        self._resend_s = self.config.resend_s or self.config.deadline_s / 4
        self._open: _OpenRound | None = None
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._closed_specs: dict[int, list[TensorSpec]] = {}  # rounds this process closed
        self._abort: str | None = None
        transport.subscribe(self.topics.all_up, self._enqueue)
        transport.subscribe(self.topics.all_presence, self._enqueue)

    @property
    def rejections(self) -> Counter[str]:
        """Rejected messages by reason, as counted in the store."""
        return self.store.rejections()

    @property
    def accepted_uploads(self) -> int:
        return self.store.count("accepted", "upload")

    def abort(self, reason: str) -> None:
        """Stop ``run`` within a moment, from any thread: it raises ``FederationAborted`` with
        ``reason``. Everything recorded so far stays, so a new server resumes the run."""
        self._abort = reason
        self._inbox.put(("", b""))  # wakes the loop

    def _check_abort(self) -> None:
        if self._abort is not None:
            raise FederationAborted(self._abort)

    # -- inbox ---------------------------------------------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:
        self._inbox.put((topic, payload))

    def _pump(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle inbound messages until ``done()`` or the deadline; True if done. While it
        waits it reminds the devices of the state after ``resend_s``, then after twice as long
        each time: a lost message is rare, while every reminder reaches every device, so a long
        wait must cost a few reminders, not one per ``resend_s`` (the module doc)."""
        interval = self._resend_s
        next_refresh = time.monotonic() + interval
        while True:
            self._check_abort()
            self._expire_offline()
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return self._drain(done)
            if now >= next_refresh:
                self._refresh()
                interval *= 2
                next_refresh = now + interval
            try:
                topic, payload = self._inbox.get(
                    timeout=max(0.001, min(deadline, next_refresh, now + 0.25) - now))
            except queue.Empty:
                continue
            if topic:
                self._handle(topic, payload)

    def _drain(self, done: Callable[[], bool]) -> bool:
        """At the deadline: what already arrived counts, even if this loop was late to read it
        (a stalled or suspended server)."""
        while not done():
            self._check_abort()
            try:
                topic, payload = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if topic:
                self._handle(topic, payload)
        return True

    def _handle(self, topic: str, payload: bytes) -> None:
        """Judge one inbound message. Whatever it holds, it ends here: accepted, duplicate,
        late, or rejected with its reason (any exception while handling it rejects it too),
        recorded, and the loop goes on."""
        device = self.topics.device_of(topic)
        if device is not None:
            self._received[device] += publish_packet_size(topic, payload)
        if not payload and "/presence/" in topic:
            return  # a cleared retained presence
        envelope: Message | None = None
        msg: AnyMessage | None = None
        try:
            envelope = decode(payload, topic=topic, topics=self.topics, max_bytes=self.max_payload)
            msg = parse(envelope)
            if isinstance(msg, PresenceMessage) and "/presence/" in topic:
                self._on_presence(msg)
                return
            if isinstance(msg, UploadMessage) and "/up/" in topic:
                status = self._on_upload(msg)
            elif isinstance(msg, MetricsMessage) and "/up/" in topic:
                status = self._on_metrics(msg)
            elif isinstance(msg, ModelMessage) and "/up/" in topic:
                status = self._on_model(msg, payload)
            else:
                raise ProtocolError(f"a {type(msg).__name__} is not accepted on {topic}")
        except ProtocolError as exc:
            self._reject(topic, payload, envelope, msg, str(exc))
            return
        except Exception as exc:  # a check that failed in an unforeseen way: still a rejection
            log.exception("unexpected error while judging a message on %s", topic)
            self._reject(topic, payload, envelope, msg,
                         f"unexpected {type(exc).__name__} while judging it: {str(exc)[:200]}")
            return
        self._record(topic, payload, envelope, msg, status)

    def _reject(self, topic: str, payload: bytes, envelope: Message | None,
                msg: AnyMessage | None, reason: str) -> None:
        self._record(topic, payload, envelope, msg, "rejected", reason)
        log.warning("rejected message on %s: %s", topic, reason)

    def _record(self, topic: str, payload: bytes, envelope: Message | None,
                msg: AnyMessage | None, status: str, reason: str | None = None) -> None:
        """Store the verdict. Only validated values reach SQLite (a decoded envelope's sender
        and round passed their checks); if the write still fails the verdict is logged and the
        loop goes on, since a message that cannot be recorded must not stop the server."""
        upload = isinstance(msg, UploadMessage)
        try:
            self.store.record(
                topic[:MAX_TOPIC_CHARS], payload, status,
                sender=envelope.sender if envelope else None,
                kind=envelope.kind if envelope else None, rnd=envelope.round if envelope else None,
                attempt=msg.attempt if upload else None, reason=reason,
                keep_payload=status == "accepted" and upload)
        except Exception:
            log.exception("could not record a %s message on %s (%s)", status, topic, reason)

    def _on_presence(self, msg: PresenceMessage) -> None:
        if msg.run_id not in (None, self.config.run_id):
            raise ProtocolError(f"presence from run {msg.run_id!r}, not this run")
        self.store.set_presence(msg.device, msg.status, msg.to_info())
        if msg.status == "online":
            self.live[msg.device] = self.announced[msg.device] = msg.to_info()
            self._offline_since.pop(msg.device, None)
        elif not msg.is_last_will:  # a goodbye: the device is done
            self.live.pop(msg.device, None)
            self._offline_since.pop(msg.device, None)
        elif msg.device in self.live and msg.device not in self._offline_since:
            # A Will: the device crashed, or the broker went down and fired every Will. Ask
            # whoever is still (or again) there to speak up; while we are disconnected the
            # re-publish waits in paho.
            self._offline_since[msg.device] = time.monotonic()
            self._refresh(everything=True)

    def _expire_offline(self) -> None:
        """Stop waiting for devices offline for longer than the grace period."""
        now = time.monotonic()
        for device, since in list(self._offline_since.items()):
            if now - since >= self.config.presence_grace_s:
                self.live.pop(device, None)
                del self._offline_since[device]

    def _on_upload(self, msg: UploadMessage) -> str:
        current = self._open
        if msg.run_id != self.config.run_id:
            raise ProtocolError(f"upload from run {msg.run_id!r}, not this run")
        if current is None or msg.round != current.round:
            if 1 <= msg.round <= len(self.history):
                # A straggler or a re-send after the round closed: ignored, but judged as it
                # would have been in time, so a hostile upload is a rejection whenever it comes.
                if msg.round in self._closed_specs:
                    self._validated_reply(msg, self._closed_specs[msg.round])
                return "late"
            raise ProtocolError(f"upload for round {msg.round} while round "
                                f"{current.round if current else 'none'} is open")
        if msg.device in current.replies:
            return "duplicate"  # QoS-1 redelivery or a re-send: idempotent on (round, device)
        current.replies[msg.device] = self._validated_reply(msg, current.specs)
        return "accepted"

    def _validated_reply(self, msg: UploadMessage, specs: list[TensorSpec]) -> Reply:
        require_tensors(Message("upload", msg.device, msg.round, {}, msg.body.tensors), specs)
        reply = Reply(msg.device, msg.samples, msg.body)
        self.strategy.check(reply)
        return reply

    def _on_metrics(self, msg: MetricsMessage) -> str:
        if msg.run_id != self.config.run_id:
            raise ProtocolError(f"metrics from run {msg.run_id!r}, not this run")
        if msg.round > self.config.rounds:
            raise ProtocolError(f"metrics for round {msg.round} of a "
                                f"{self.config.rounds}-round federation")
        info = msg.to_info()
        # Traffic the server can measure is its own figure, not the device's word: bytes it
        # received from the device, and bytes it published (which every device receives). The
        # device's counters are kept beside them, range-checked by the parser, for audits.
        info["reported_bytes"], info["bytes"] = info["bytes"], self._traffic(msg.device)
        if not self.store.add_metrics(msg.round, msg.device, info):
            self._remind(msg.device, msg.round)
            return "duplicate"
        per_round = self.metrics.setdefault(msg.round, {})
        per_round[msg.device] = info
        if 1 <= msg.round <= len(self.history):
            contributors = set(self.history[msg.round - 1].accepted)
            if msg.device in contributors and contributors <= set(per_round):
                self.events.on_round_reported(msg.round)
        return "accepted"

    def _traffic(self, device: str) -> dict[str, int]:
        """Cumulative bytes of ``device`` as this server measured them, over its restarts."""
        up, down = self._traffic_base
        return {"sent_bytes": up.get(device, 0) + self._received[device],
                "received_bytes": down + self.transport.stats.sent_bytes}

    def _on_model(self, msg: ModelMessage, payload: bytes) -> str:
        if msg.run_id != self.config.run_id:
            raise ProtocolError(f"model from run {msg.run_id!r}, not this run")
        if not self.config.collect_models:
            raise ProtocolError("this federation does not collect trained students "
                                "(collect_models = false)")
        if msg.round != self.config.rounds:
            raise ProtocolError(f"model after round {msg.round}; students are collected after "
                                f"the last round, {self.config.rounds}")
        if msg.device in self.collected:
            return "duplicate"
        announced = self.announced.get(msg.device)
        if announced is None or announced.get("student") != msg.student:
            raise ProtocolError(f"model of student {msg.student!r}, but {msg.device!r} "
                                f"announced {(announced or {}).get('student')!r}")
        try:
            params = estimate_cost(msg.student, self.config.input_shape,
                                   self.config.num_classes).params
        except (UnknownStudentError, ValueError) as exc:
            raise ProtocolError(f"model of student {msg.student!r}: {exc}") from None
        if msg.params != params:
            raise ProtocolError(f"model has {msg.params} weights; student {msg.student!r} has "
                                f"{params}")
        meta = {**self.model_meta, "device": msg.device, "profile": announced.get("profile", ""),
                "student": msg.student, "params": params, "round": msg.round,
                "accuracy": msg.accuracy, "run_id": msg.run_id}
        self.store.save_model(msg.device, payload, meta)
        self.collected[msg.device] = meta
        return "accepted"

    def _reported_last_round(self, devices: set[str]) -> bool:
        return devices <= set(self.metrics.get(self.config.rounds, {}))

    def _models_in(self, contributors: set[str]) -> bool:
        """Every device that finished the last round (still here, or reported it) sent its
        student."""
        waiting = {d for d in contributors
                   if d in self.live or self._reported_last_round({d})}
        return waiting <= set(self.collected)

    # -- publishing ----------------------------------------------------------------------------
    def _announce(self, current: _OpenRound, *, nudge: bool = False) -> None:
        """The open round, retained; or as a nudge (no announcement, not retained)."""
        waiting = sorted((current.participants | set(self.live)) - set(current.replies))
        message = RoundMessage(current.round, self.config.run_id,
                               Payload() if nudge else current.announcement,
                               attempt=current.attempt, deadline_s=self.config.deadline_s,
                               waiting_for=tuple(waiting), nudge=nudge)
        self.transport.publish(self.topics.round, message.encode(), retain=not nudge)
        if not nudge:
            self._announced_at = time.monotonic()

    def _refresh(self, *, everything: bool = False) -> None:
        """Remind the devices of the state (see the module doc): a nudge of the open round, or
        while none is open, of the round after the last one closed (a device that lacks that
        one's consensus reminds). With ``everything``, re-publish the config, the last consensus
        and the whole round announcement."""
        if everything:
            self.transport.publish(self.topics.config, ConfigMessage(self.config).encode(),
                                   retain=True)
            self._publish_consensus()
        if self._open is not None:
            self._announce(self._open, nudge=not everything)
        elif self.history:
            nudge = RoundMessage(len(self.history) + 1, self.config.run_id, nudge=True)
            self.transport.publish(self.topics.round, nudge.encode())

    def _publish_consensus(self) -> None:
        if self._last_consensus is not None:
            self.transport.publish(self.topics.consensus, self._last_consensus, retain=True)
            self._consensus_sent_at = time.monotonic()

    def _remind(self, device: str, absorbed: int) -> None:
        """``device`` re-sent its report of round ``absorbed``: it lacks a message. A later
        consensus, if one is out; else the open round's announcement, if it has not answered.
        Either is re-published unless it went out less than ``resend_s`` ago: the reminder may
        have crossed it, and the device reminds again at the next nudge if it still lacks it
        (so no device can make the server flood every device with copies)."""
        now = time.monotonic()
        if absorbed < len(self.history):
            if now - self._consensus_sent_at >= self._resend_s:
                log.info("%s has absorbed round %d only; re-publishing the round-%d consensus",
                         device, absorbed, len(self.history))
                self._publish_consensus()
        elif (self._open is not None and device not in self._open.replies
              and now - self._announced_at >= self._resend_s):
            log.info("%s lacks the round-%d announcement; re-publishing it", device,
                     self._open.round)
            self._announce(self._open)

    # -- rounds --------------------------------------------------------------------------------
    def _quorum(self) -> int:
        return max(1, math.ceil(self.config.quorum * self.expected_clients))

    def wait_for_clients(self) -> None:
        """Until every expected device is present, or a quorum after the join timeout; a
        resumed run with a quorum present waits ``presence_grace_s`` more at most."""
        quorum_since: list[float] = []

        def ready() -> bool:
            if len(self.live) >= self.expected_clients:
                return True
            if self.resumed_from_round is None or len(self.live) < self._quorum():
                quorum_since.clear()
                return False
            quorum_since[:] = quorum_since or [time.monotonic()]
            return time.monotonic() - quorum_since[0] >= self.config.presence_grace_s
        joined = self._pump(ready, time.monotonic() + self.join_timeout)
        if joined and len(self.live) < self.expected_clients:
            log.warning("resuming with %d of %d devices (quorum %d); the others may join "
                        "later", len(self.live), self.expected_clients, self._quorum())
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
            msg = UploadMessage.parse(decode(payload, topic=topic, topics=self.topics,
                                             max_bytes=len(payload)))
            replies.setdefault(msg.device, self._validated_reply(msg, specs))
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
        self._closed_specs[rnd] = current.specs
        replies = [current.replies[d] for d in sorted(current.replies)]
        consensus = self.strategy.aggregate(rnd, current.announcement, replies)
        body = ConsensusMessage(rnd, self.config.run_id, current.announcement, consensus,
                                final=rnd == self.config.rounds).encode()
        self.store.save_round(rnd, current.attempt, sorted(current.replies), body)
        self._last_consensus = body
        self._publish_consensus()
        log.info("round %d closed with %d uploads", rnd, len(replies))
        record = RoundRecord(rnd, sorted(current.participants), sorted(current.replies),
                             current.attempt, time.monotonic() - started)
        self.history.append(record)
        self.events.on_round_closed(record)
        return record

    def run(self) -> list[RoundRecord]:
        """Drive the federation from its first incomplete round; one record per round."""
        self._refresh(everything=True)
        first = len(self.history) + 1
        if first <= self.config.rounds:
            # Open for uploads while clients join: resuming, they may answer the retained
            # announcement of the round before this server announced it again.
            self._open = self._prepare(first)
            self.wait_for_clients()
        elif not self._reported_last_round(set(self.history[-1].accepted)):
            # Stopped between the last consensus and its reports: the devices must be back
            # (they absorb the retained consensus and report) before a report can be missing.
            self.wait_for_clients()
        for rnd in range(first, self.config.rounds + 1):
            self._run_round(rnd)
        contributors = set(self.history[-1].accepted)
        self._pump(lambda: self._reported_last_round(contributors & set(self.live)),
                   time.monotonic() + self.config.deadline_s)
        if self.config.collect_models:
            self._pump(lambda: self._models_in(contributors),
                       time.monotonic() + self.config.deadline_s)
        self.transport.publish(self.topics.round,
                               RoundMessage(self.config.rounds + 1, self.config.run_id, done=True).encode(),
                               retain=True)
        self.store.finish()
        return self.history

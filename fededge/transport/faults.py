"""Fault injection: a ``Transport`` wrapper that loses, delays, duplicates messages or dies.

Reliability code (re-sends, quorum retries, Last Will handling, resume) is only tested if
the faults it answers can be produced on demand, at a chosen message, in every test that
needs one. ``FaultyTransport`` wraps the transport a party is given, so the server and client
code under test runs unchanged and unpatched: the faults happen where real ones do, between
the party and the broker.

    faulty = FaultyTransport(hub.connect("dev1", will=...),
                             Drop("fededge/demo/up/dev1", count=1),          # lose one upload
                             Delay("fededge/demo/round", RECEIVE, seconds=0.5),  # slow link
                             Crash("fededge/demo/up/dev1", after=3))         # then die

A rule matches by MQTT topic filter (wildcards as the broker reads them), direction
(``PUBLISH``: what this party sends; ``RECEIVE``: what its handlers get) and optionally a test
on the message itself (``when``), because the transport knows no message kinds: the test
supplies that knowledge (``when=lambda topic, payload: decode(payload).kind == "upload"``).
Each message is offered to the rules in order and the first that takes it decides its fate
(a rule counts only the messages offered to it, those no earlier rule took); a message no
rule takes passes untouched. Byte counts are the inner transport's: what actually crossed
the wire.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Literal

import paho.mqtt.client as mqtt

from fededge.transport.base import Handler, Transport, TransportWrapper

log = logging.getLogger(__name__)

Direction = Literal["publish", "receive"]
PUBLISH: Direction = "publish"
RECEIVE: Direction = "receive"

CRASH_FLUSH_S = 5.0
"""How long a crash on publish waits for the broker to acknowledge what was sent before it,
so that "after the N-th message" means the broker has that message (paho sends from its own
thread; cutting the socket at once could lose it). A killed device may lose more; a test
that wants that drops the message too."""


@dataclass(frozen=True)
class Rule:
    """Which messages a fault applies to. ``count`` caps how many it takes (None: all that
    match), ``probability`` takes each matching one at random (the wrapper's seeded RNG)."""

    topic_filter: str
    direction: Direction = PUBLISH
    when: Callable[[str, bytes], bool] | None = None
    count: int | None = None
    probability: float = 1.0

    def matches(self, direction: Direction, topic: str, payload: bytes) -> bool:
        return (direction == self.direction and mqtt.topic_matches_sub(self.topic_filter, topic)
                and (self.when is None or self.when(topic, payload)))


@dataclass(frozen=True)
class Drop(Rule):
    """Lose the message: the broker never gets it (publish) or the handler never sees it."""


@dataclass(frozen=True, kw_only=True)
class Delay(Rule):
    """Hand the message on ``seconds`` later, from a timer thread: the transport's own thread
    goes on with other messages meanwhile, so later messages can overtake a delayed one."""

    seconds: float


@dataclass(frozen=True)
class Duplicate(Rule):
    """Hand the message on twice (a QoS-1 re-delivery, or a client re-sending)."""


@dataclass(frozen=True, kw_only=True)
class Crash(Rule):
    """Let the ``after``-th matching message through, then die like a killed device: the inner
    transport is aborted (the broker or hub publishes the Last Will) and every later message,
    in both directions, is swallowed. Only the transport dies: the party's threads go on
    (``FaultyTransport(on_crash=...)`` can stop them). ``count`` and ``probability`` do not
    apply."""

    after: int = 1


def _checked(rule: Rule) -> Rule:
    if not isinstance(rule, (Drop, Delay, Duplicate, Crash)):
        raise TypeError(f"not a fault: {rule!r}; use Drop, Delay, Duplicate or Crash")
    return rule


class _Counter:
    """How many messages one rule has matched and taken (rules are frozen, counts are not)."""

    def __init__(self, rule: Rule) -> None:
        self.rule, self.matched, self.taken = rule, 0, 0

    def takes(self, rng: random.Random) -> bool:
        rule = self.rule
        self.matched += 1
        if isinstance(rule, Crash):
            take = self.matched == rule.after
        else:
            take = ((rule.count is None or self.taken < rule.count)
                    and (rule.probability >= 1.0 or rng.random() < rule.probability))
        self.taken += take
        return take


class FaultyTransport(TransportWrapper):
    """``inner`` with the faults of ``rules`` injected; see the module docstring.

    ``seed`` makes probabilistic drops repeatable; ``on_crash`` is called (on the thread that
    handled the fatal message) once the endpoint has died, e.g. to stop the party's worker
    as a killed process would stop. ``crashed`` tells whether it has.
    """

    def __init__(self, inner: Transport, *rules: Rule, seed: int = 0,
                 on_crash: Callable[[], None] | None = None) -> None:
        super().__init__(inner)
        self.on_crash = on_crash
        self._counters = [_Counter(_checked(rule)) for rule in rules]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._timers: set[threading.Timer] = set()
        self._crashed = threading.Event()  # set when the fatal message is chosen
        self._aborted = False              # the inner transport was aborted (once)

    @property
    def crashed(self) -> bool:
        return self._crashed.is_set()

    def add(self, rule: Rule) -> None:
        """Start injecting one more fault from now on (after the existing rules)."""
        with self._lock:
            self._counters.append(_Counter(_checked(rule)))

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self._route(PUBLISH, topic, payload,
                    lambda: self.inner.publish(topic, payload, retain=retain))

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        def receive(topic: str, payload: bytes) -> None:
            self._route(RECEIVE, topic, payload, lambda: handler(topic, payload))
        self.inner.subscribe(topic_filter, receive)

    def flush(self, timeout: float = 10.0) -> bool:
        """Delayed publishes count as pending: wait for them, then for the inner transport."""
        deadline = time.monotonic() + timeout
        for timer in self._pending_timers():
            timer.join(max(0.0, deadline - time.monotonic()))
        return not self._pending_timers() and self.inner.flush(
            max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Hand on what is still delayed, then close the inner transport cleanly."""
        for timer in self._pending_timers():
            timer.join()
        self.inner.close()

    def abort(self) -> None:
        """Die now (as a ``Crash`` rule does): delayed messages are lost, the Last Will fires."""
        self._die(flush=False)

    # -- internals -----------------------------------------------------------------------------
    def _route(self, direction: Direction, topic: str, payload: bytes,
               forward: Callable[[], None]) -> None:
        if self._crashed.is_set():
            return
        with self._lock:
            counters = list(self._counters)
        matching = [c for c in counters if c.rule.matches(direction, topic, payload)]
        with self._lock:  # ``when`` ran outside it: it is the caller's code
            if self._crashed.is_set():
                return
            rule = next((c.rule for c in matching if c.takes(self._rng)), None)
            if isinstance(rule, Crash):
                self._crashed.set()  # from here on other threads' messages are swallowed
        if rule is None:
            forward()
        elif isinstance(rule, Drop):
            log.debug("fault: dropped %s %s", direction, topic)
        elif isinstance(rule, Duplicate):
            forward()
            forward()
        elif isinstance(rule, Delay):
            self._later(rule.seconds, forward)
        elif isinstance(rule, Crash):
            forward()
            log.info("fault: crashing after %s %s", direction, topic)
            self._die(flush=direction == PUBLISH)

    def _later(self, seconds: float, forward: Callable[[], None]) -> None:
        def fire() -> None:
            with self._lock:
                self._timers.discard(timer)
                if self._crashed.is_set():
                    return
            try:
                forward()
            except Exception:  # a handler bug must not vanish silently on a timer thread
                log.exception("delayed message failed")

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        with self._lock:
            self._timers.add(timer)
        timer.start()

    def _pending_timers(self) -> list[threading.Timer]:
        with self._lock:
            return list(self._timers)

    def _die(self, *, flush: bool) -> None:
        with self._lock:
            self._crashed.set()
            if self._aborted:
                return
            self._aborted = True
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.cancel()
        if flush:
            self.inner.flush(CRASH_FLUSH_S)
        self.inner.abort()
        if self.on_crash is not None:
            self.on_crash()

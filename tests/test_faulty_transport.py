"""FaultyTransport on its own: each fault kind over the in-memory hub, and a crash over a real
MQTT broker that must make the broker publish the Last Will."""

import threading
import time

import pytest

from fededge.transport.brokers import EmbeddedBroker
from fededge.transport.faults import (
    PUBLISH,
    RECEIVE,
    Crash,
    Delay,
    Drop,
    Duplicate,
    FaultyTransport,
    Rule,
)
from fededge.transport.memory import MemoryHub
from fededge.transport.mqtt import MqttTransport

WILL = ("f/presence/dev", b"offline")


class Inbox:
    """A handler that keeps what it got, with the time it got it."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.at: list[float] = []
        self._changed = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._changed:
            self.got.append((topic, payload))
            self.at.append(time.monotonic())
            self._changed.notify_all()

    def payloads(self, topic: str | None = None) -> list[bytes]:
        return [p for t, p in self.got if topic is None or t == topic]

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.got) >= count, timeout)


def _pair(*rules, **kw):
    """A faulty device endpoint and an observer on one hub; the observer sees f/#."""
    hub = MemoryHub()
    observer, inbox = hub.connect("observer"), Inbox()
    observer.subscribe("f/#", inbox)
    device = FaultyTransport(hub.connect("dev", will=WILL), *rules, **kw)
    return hub, observer, device, inbox


def _numbered(device, topic: str, n: int) -> None:
    for i in range(n):
        device.publish(topic, b"%d" % i)


def test_drop_the_next_n_matching_publishes():
    _, _, device, inbox = _pair(Drop("f/up/+", count=2))
    _numbered(device, "f/up/dev", 4)
    device.publish("f/other", b"x")                       # not matched: passes
    assert inbox.payloads("f/up/dev") == [b"2", b"3"]
    assert inbox.payloads("f/other") == [b"x"]


def test_drop_with_a_seeded_probability_is_repeatable():
    def delivered(seed):
        _, _, device, inbox = _pair(Drop("f/#", probability=0.5), seed=seed)
        _numbered(device, "f/up/dev", 200)
        return inbox.payloads()
    first = delivered(1)
    assert 60 < len(first) < 140
    assert delivered(1) == first
    assert delivered(2) != first


def test_drop_on_receive_only_what_the_test_selects():
    hub, _, device, _ = _pair(Drop("f/round", RECEIVE, when=lambda t, p: p.startswith(b"bad")))
    inbox = Inbox()
    device.subscribe("f/round", inbox)
    server = hub.connect("server")
    for payload in (b"bad-1", b"good-1", b"bad-2", b"good-2"):
        server.publish("f/round", payload)
    assert inbox.payloads() == [b"good-1", b"good-2"]


def test_delay_holds_one_message_without_holding_up_the_others():
    _, _, device, inbox = _pair(Delay("f/slow", seconds=0.4))
    started = time.monotonic()
    device.publish("f/slow", b"late")
    device.publish("f/fast", b"early")
    assert time.monotonic() - started < 0.2, "publish blocked on the delay"
    assert inbox.payloads() == [b"early"]
    assert device.flush(5), "flush must wait for the delayed publish"
    assert inbox.payloads() == [b"early", b"late"]
    assert inbox.at[1] - started >= 0.4


def test_delay_on_receive_and_close_hands_on_what_is_delayed():
    hub, _, device, _ = _pair(Delay("f/round", RECEIVE, seconds=0.3))
    inbox = Inbox()
    device.subscribe("f/#", inbox)
    server = hub.connect("server")
    server.publish("f/round", b"r1")
    server.publish("f/config", b"c1")
    assert inbox.payloads() == [b"c1"]
    device.close()
    assert inbox.payloads() == [b"c1", b"r1"]


def test_duplicate_in_both_directions():
    hub, _, device, inbox = _pair(Duplicate("f/up/#", count=1), Duplicate("f/round", RECEIVE))
    _numbered(device, "f/up/dev", 2)
    assert inbox.payloads("f/up/dev") == [b"0", b"0", b"1"]
    received = Inbox()
    device.subscribe("f/round", received)
    hub.connect("server").publish("f/round", b"r")
    assert received.payloads() == [b"r", b"r"]


def test_first_rule_that_takes_a_message_decides():
    _, _, device, inbox = _pair(Drop("f/up/dev", count=1), Duplicate("f/#"))
    _numbered(device, "f/up/dev", 2)
    assert inbox.payloads() == [b"1", b"1"]


def test_crash_after_n_fires_the_last_will_and_swallows_everything_after():
    crashes = []
    hub, _, device, inbox = _pair(Crash("f/up/dev", after=2),
                                  on_crash=lambda: crashes.append(time.monotonic()))
    received = Inbox()
    device.subscribe("f/round", received)
    device.publish("f/presence/dev", b"online", retain=True)  # not matched: not counted
    _numbered(device, "f/up/dev", 3)
    assert device.crashed and len(crashes) == 1
    assert inbox.got == [("f/presence/dev", b"online"), ("f/up/dev", b"0"),
                         ("f/up/dev", b"1"), WILL]
    hub.connect("server").publish("f/round", b"r")
    device.publish("f/up/dev", b"after")
    assert received.got == [] and inbox.got[-1] == ("f/round", b"r")
    device.abort()                                             # dead already: no second will
    assert inbox.payloads(WILL[0]) == [b"online", b"offline"] and len(crashes) == 1


def test_crash_on_receive_delivers_the_fatal_message_first():
    hub, _, device, inbox = _pair(Crash("f/round", RECEIVE, after=1))
    received = Inbox()
    device.subscribe("f/round", received)
    hub.connect("server").publish("f/round", b"r1")
    assert received.payloads() == [b"r1"] and device.crashed
    assert inbox.got[-1] == WILL


def test_abort_loses_delayed_messages_and_fires_the_will():
    _, _, device, inbox = _pair(Delay("f/up/#", seconds=0.2))
    device.publish("f/up/dev", b"in flight")
    device.abort()
    time.sleep(0.4)
    assert inbox.got == [WILL]


def test_only_fault_rules_are_accepted():
    with pytest.raises(TypeError, match="not a fault"):
        FaultyTransport(MemoryHub().connect("dev"), Rule("f/#", PUBLISH))


def test_crash_over_a_real_broker_fires_the_last_will():
    with EmbeddedBroker() as broker:
        observer, inbox = MqttTransport("observer", broker.host, broker.port).connect(), Inbox()
        observer.subscribe("f/#", inbox)
        observer.publish("f/ready", b"")  # comes back once the broker has the subscription
        assert inbox.wait_for(1)
        inner = MqttTransport("dev", broker.host, broker.port, will=WILL).connect()
        device = FaultyTransport(inner, Crash("f/up/dev", after=2))
        _numbered(device, "f/up/dev", 3)
        assert device.crashed
        assert inbox.wait_for(4, timeout=15), f"no Last Will: {inbox.got}"
        time.sleep(0.3)  # a swallowed third message would arrive by now
        assert inbox.got[1:] == [("f/up/dev", b"0"), ("f/up/dev", b"1"), WILL]
        assert inner.stats.sent_messages == 2
        observer.close()

import threading
import time

import pytest

from fededge.transport.base import TransportError, publish_packet_size
from fededge.transport.brokers import EmbeddedBroker, free_port
from fededge.transport.memory import MemoryHub
from fededge.transport.mqtt import MqttTransport


def _collector():
    got, event = [], threading.Event()

    def handler(topic, payload):
        got.append((topic, payload))
        event.set()
    return got, event, handler


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_packet_size_matches_mqtt_311_framing():
    # 1 fixed header byte + 1 length byte + (2 + 3 topic + 2 packet id + 10 payload)
    assert publish_packet_size("a/b", b"x" * 10) == 19
    # remaining length 200 needs a two-byte varint
    assert publish_packet_size("a", b"x" * 195) == 1 + 2 + 2 + 1 + 2 + 195


def test_memory_hub_wildcards_retained_and_last_will():
    hub = MemoryHub()
    server = hub.connect("server")
    device = hub.connect("dev1", will=("f/presence/dev1", b"offline"))
    device.publish("f/round", b"r1", retain=True)
    got, _, handler = _collector()
    server.subscribe("f/presence/+", handler)
    server.subscribe("f/round", handler)          # retained delivered on subscribe
    device.publish("f/presence/dev1", b"online", retain=True)
    device.abort()                                # vanishes: the hub publishes the will
    assert got == [("f/round", b"r1"), ("f/presence/dev1", b"online"),
                   ("f/presence/dev1", b"offline")]
    assert device.stats.sent_bytes == publish_packet_size("f/round", b"r1") + \
        publish_packet_size("f/presence/dev1", b"online")
    assert server.stats.received_messages == 3


def test_mqtt_round_trip_bytes_and_last_will_over_amqtt():
    with EmbeddedBroker() as broker:
        server = MqttTransport("server", broker.host, broker.port).connect()
        got, _, handler = _collector()
        server.subscribe("f/#", handler)
        device = MqttTransport("dev1", broker.host, broker.port,
                               will=("f/presence/dev1", b"offline")).connect()
        device.publish("f/up/dev1", b"x" * 1000)
        assert _wait_for(lambda: len(got) == 1)
        device.abort()
        assert _wait_for(lambda: len(got) == 2, timeout=10), "Last Will was not delivered"
        assert got == [("f/up/dev1", b"x" * 1000), ("f/presence/dev1", b"offline")]
        assert device.stats.sent_bytes == publish_packet_size("f/up/dev1", b"x" * 1000)
        assert server.stats.received_bytes == device.stats.sent_bytes + publish_packet_size(
            "f/presence/dev1", b"offline")
        server.close()


def test_connecting_to_nothing_names_the_address():
    port = free_port()
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}.*Is the broker running"):
        MqttTransport("dev1", "127.0.0.1", port).connect(timeout=2)


def test_flush_waits_for_acknowledgements_across_a_broker_restart():
    """A publish made while the broker is down is kept by paho and re-sent after the
    reconnect: flush is False while nobody can acknowledge it and True once the broker has."""
    broker = EmbeddedBroker().start()
    device = MqttTransport("dev1", broker.host, broker.port).connect()
    try:
        device.publish("f/before", b"1", retain=True)
        assert device.flush(5)
        broker.stop()
        assert _wait_for(lambda: not device.connected, timeout=10), "the drop went unnoticed"
        device.publish("f/while-down", b"2", retain=True)
        assert not device.flush(0.5), "nothing can have acknowledged it"
        broker = EmbeddedBroker(port=broker.port).start()
        assert device.flush(30), "the publish made while disconnected was never acknowledged"
        # amqtt keeps no retained messages across a restart: what is there came after it
        reader = MqttTransport("reader", broker.host, broker.port).connect()
        got, _, handler = _collector()
        reader.subscribe("f/#", handler)
        assert _wait_for(lambda: got == [("f/while-down", b"2")])
        reader.close()
    finally:
        device.abort()
        broker.stop()


"""The resend rule (issue 13): the server re-publishes the consensus only to fill a gap a device
has shown, so long rounds cost no extra downlink, and a lost consensus still arrives. Driven
in-process on a MemoryHub, where a spy sees every message the server publishes."""

from collections import Counter

import pytest
from helpers import make_client, message_is, small_config, small_split

from fededge.federation.client import FederationClient
from fededge.federation.report import round_rows
from fededge.federation.server import FederationServer
from fededge.federation.strategies.fedmd import FedMDServer
from fededge.transport import faults
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto

N = 3
ROUNDS = 3


@pytest.fixture(scope="module")
def split():
    return small_split(N)


def _federate(split, config, wrap=lambda i, t: t, slow: float = 0.0):
    """Run a federation; the published message kinds (a spy's count) and the clients."""
    hub = MemoryHub()
    published: Counter[str] = Counter()
    hub.connect("spy").subscribe(f"fededge/{config.federation}/#",
                                 lambda t, p: published.update([proto.decode(p).kind]))
    clients = []
    for i in range(N):
        will = FederationClient.last_will(config.federation, f"dev{i}")
        client = make_client(wrap(i, hub.connect(f"dev{i}", will=will)), split, i)
        client.slowdown = slow if i == N - 1 else 0.0
        clients.append(client.start())
    server = FederationServer(hub.connect("server"), config, FedMDServer(config),
                              expected_clients=N)
    history = server.run()
    for c in clients:
        assert c.wait(30) and c.error is None, c.error
    return published, clients, history, server


def _absorbed(client):
    return [h["round"] for h in client.history]


def test_a_device_that_has_the_consensus_is_not_sent_it_again(split):
    """dev2 straggles, so every round waits through nudges; still each consensus goes out once,
    and the downlink stays within 1.2x the uplink (the issue-13 target)."""
    config = small_config(split, rounds=ROUNDS, resend_s=0.5)
    published, clients, history, server = _federate(split, config, slow=1.0)
    nudges = published[proto.KIND_ROUND] - ROUNDS - 1  # beyond the announcements and 'done'
    assert nudges >= ROUNDS, f"rounds too short to test the rule: {published}"
    assert published[proto.KIND_CONSENSUS] == ROUNDS, published
    assert all(_absorbed(c) == list(range(ROUNDS + 1)) for c in clients)
    rows = round_rows(server.metrics, history)[1:]
    up, down = sum(r.bytes_up for r in rows), sum(r.bytes_down for r in rows)
    assert down <= 1.2 * up, f"downlink {down} B is {down / up:.2f}x the uplink {up} B"


@pytest.mark.parametrize("lost", [1, ROUNDS], ids=["round-1", "final"])
def test_a_device_that_lost_a_consensus_reminds_and_gets_it_again(split, lost):
    """dev1 never receives the first copy of one consensus; it re-sends its last report, the
    server re-publishes, and dev1 absorbs every round (the final one too, with no round after
    it to announce the gap)."""
    config = small_config(split, rounds=ROUNDS, resend_s=0.1)
    lose = faults.Drop(f"fededge/{config.federation}/consensus", faults.RECEIVE,
                       when=message_is(proto.KIND_CONSENSUS, lost), count=1)
    published, clients, history, server = _federate(
        split, config, lambda i, t: faults.FaultyTransport(t, lose) if i == 1 else t)
    assert _absorbed(clients[1]) == list(range(ROUNDS + 1))
    assert "dev1" in server.metrics[ROUNDS]
    assert published[proto.KIND_CONSENSUS] > ROUNDS
    assert server.store.count("duplicate", "metrics") >= 1  # the reminder


def test_a_device_that_lost_an_announcement_is_sent_it_again(split):
    """dev1 never receives round 2's announcement; the nudges name a round it has not seen, so
    it reminds, and the server re-publishes the announcement: dev1 is in round 2 after all."""
    config = small_config(split, rounds=ROUNDS, resend_s=0.1)

    def announcement(topic, payload):
        msg = proto.decode(payload)
        return msg.kind == proto.KIND_ROUND and msg.round == 2 and not msg.info.get("nudge")
    lose = faults.Drop(f"fededge/{config.federation}/round", faults.RECEIVE, when=announcement,
                       count=1)
    _, clients, history, server = _federate(
        split, config, lambda i, t: faults.FaultyTransport(t, lose) if i == 1 else t)
    assert [r.accepted for r in history] == [["dev0", "dev1", "dev2"]] * ROUNDS
    assert history[1].seconds < config.deadline_s, "round 2 waited for its deadline"

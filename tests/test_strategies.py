"""fedavg, fedavg-kd and compressed fedmd through the in-memory transport (same code as MQTT)."""

import numpy as np
import pytest
import torch
from helpers import make_client, small_config, small_split

from fededge.config import ConfigError
from fededge.federation.strategies import UnknownStrategyError, strategy_pair
from fededge.federation.strategies.base import ClientContext, Reply
from fededge.federation.strategies.fedavg import FedAvgClient, FedAvgKDServer, FedAvgServer
from fededge.federation.strategies.feddf import FedDFServer
from fededge.federation.wiring import build_server, learner_factory, server_strategy
from fededge.learn.aggregate import AggregationError
from fededge.learn.models import build_student
from fededge.learn.trainer import Trainer
from fededge.learn.weights import flat_weights
from fededge.learn.zoo import estimate_cost
from fededge.transport.memory import MemoryHub
from fededge.wire import envelope as proto
from fededge.wire.messages import Payload


@pytest.fixture(scope="module")
def split():
    return small_split(3)


def _reply(device: str, samples: int, weights: np.ndarray) -> Reply:
    return Reply(device, samples, Payload(tensors={"weights": weights}))


def _federate(split, config, students):
    """Run a whole federation over a MemoryHub; returns the server, the clients and the info
    of each round's consensus (the server may re-publish one; the first copy counts)."""
    hub = MemoryHub()
    seen = {}

    def watch(topic, payload):
        msg = proto.decode(payload)
        seen.setdefault(msg.round, msg.info)
    hub.connect("watcher").subscribe(proto.Topics(config.federation).consensus, watch)
    server = build_server(hub.connect("server"), config, public_X=split.public_X,
                          expected_clients=len(students))
    clients = [make_client(hub.connect(f"dev{i}"), split, i, student=s).start()
               for i, s in enumerate(students)]
    server.run()
    for c in clients:
        assert c.wait(30) and c.error is None, c.error
    return server, clients, [seen[r] for r in sorted(seen)]


def test_fedavg_consensus_is_the_sample_weighted_mean(split):
    config = small_config(split, strategy="fedavg", student="cnn-xs")
    server = FedAvgServer(config)
    size = estimate_cost("cnn-xs", split.input_shape, split.num_classes).params
    assert server.reply_specs(server.configure(1)) == [proto.TensorSpec("weights", ("F32",),
                                                                        (size,))]
    ones, fours = np.full(size, 1.0, np.float32), np.full(size, 4.0, np.float32)
    consensus = server.aggregate(1, server.configure(1), [_reply("a", 1, ones),
                                                          _reply("b", 3, fours)])
    np.testing.assert_allclose(consensus.tensors["weights"], 3.25)  # (1·1 + 3·4) / 4
    assert consensus.info == {"phase": "weights", "contributors": 2}


def test_fedavg_federation_ends_with_every_device_on_the_average(split):
    config = small_config(split, strategy="fedavg", student="cnn-xs", rounds=2, local_epochs=2)
    server, clients, seen = _federate(split, config, ["cnn-xs"] * 3)
    assert [info["phase"] for info in seen] == ["weights", "weights"]
    assert all(r.accepted == ["dev0", "dev1", "dev2"] for r in server.history)
    assert not server.rejections
    final = [flat_weights(c.trainer.model) for c in clients]
    assert all(np.array_equal(final[0], w) for w in final[1:])
    accuracy = [c.history[-1]["accuracy"] for c in clients]
    assert accuracy[0] == accuracy[1] == accuracy[2] > 0.5  # one model, learned something


def test_fedavg_refuses_a_device_on_another_architecture(split):
    config = small_config(split, strategy="fedavg", student="cnn-xs")
    torch.manual_seed(0)
    trainer = Trainer(build_student("cnn-s", split.input_shape, split.num_classes))
    data = split.clients[0]
    with pytest.raises(ConfigError, match="not the federation's student 'cnn-xs'"):
        FedAvgClient(config).warmup(ClientContext(trainer, data.X, data.y, split.public_X,
                                                  learner_factory(config)))


def test_fedavg_without_a_student_is_a_clear_error(split):
    with pytest.raises(ConfigError, match="needs the federation setting 'student'"):
        FedAvgServer(small_config(split, strategy="fedavg"))


def test_fedavg_kd_teaches_the_capable_and_distills_into_everyone(split):
    # Teacher cnn-s: dev1 (cnn-s) and dev2 (cnn-m) can train it, dev0 (cnn-xs) abstains.
    config = small_config(split, strategy="fedavg-kd", teacher="cnn-s", rounds=2,
                          warmup_epochs=3, local_epochs=2, kd_epochs=3, finetune_epochs=1)
    server, clients, seen = _federate(split, config, ["cnn-xs", "cnn-s", "cnn-m"])
    assert [(i["phase"], i["contributors"]) for i in seen] == [("teacher", 2), ("distill", 2)]
    assert all(r.accepted == ["dev0", "dev1", "dev2"] for r in server.history)
    assert not server.rejections
    for c in clients:
        assert c.state.strategy.teacher is None  # dropped after distilling
        assert c.history[-1]["round"] == 2 and c.history[-1]["accuracy"] > 0.3


def test_fedavg_kd_checks_teacher_weights_and_needs_a_contributor(split):
    config = small_config(split, strategy="fedavg-kd", teacher="cnn-s")
    server = FedAvgKDServer(config)
    server.check(_reply("a", 5, np.zeros(0, np.float32)))  # abstaining is fine
    with pytest.raises(proto.ProtocolError, match="expected 9050"):
        server.check(_reply("a", 5, np.zeros(17, np.float32)))
    with pytest.raises(AggregationError, match="every upload abstained"):
        server.aggregate(1, server.configure(1), [_reply("a", 5, np.zeros(0, np.float32))])


def test_fedavg_kd_checks_before_round_1_that_some_device_can_train_the_teacher(split):
    server = FedAvgKDServer(small_config(split, strategy="fedavg-kd", teacher="cnn-m"))
    server.check_devices({"a": "cnn-xs", "b": "cnn-m"})  # b trains it
    with pytest.raises(ConfigError) as raised:
        server.check_devices({"a": "cnn-xs", "b": "cnn-s"})
    message = str(raised.value)
    assert "'cnn-m'" in message and "cnn-s, cnn-xs" in message and "teacher=cnn-s" in message
    assert "x86-gateway" in message  # a catalog profile whose student is large enough
    assert "\n" not in message


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_fedmd_with_a_compressed_codec_runs_and_validates(split, codec):
    config = small_config(split, rounds=1, logit_codec=codec, warmup_epochs=3)
    server, clients, seen = _federate(split, config, ["cnn-xs", "cnn-s", "cnn-xs"])
    assert server.history[0].accepted == ["dev0", "dev1", "dev2"] and not server.rejections
    assert seen[0]["phase"] == "logits"


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(UnknownStrategyError, match="choose one of: fedmd, feddf, fedavg, fedavg-kd"):
        strategy_pair("fedprox")


def _logit_reply(device: str, logits: np.ndarray) -> Reply:
    counts = np.full(logits.shape[1], 10, np.int64)
    return Reply(device, int(counts.sum()), Payload(tensors={
        "logits": logits.astype(np.float16), "class_counts": counts}))


def test_feddf_server_model_learns_the_consensus_and_keeps_learning(split):
    # float16: the replies below carry raw logits, and the test reads the consensus as logits
    config = small_config(split, strategy="feddf", server_epochs=15, teacher="cnn-m",
                          logit_codec="float16")
    rows = np.arange(len(split.public_X))
    # a teacher the server model can learn: a fixed linear function of the proxy features
    W = np.random.default_rng(0).normal(size=(split.public_X[0].size, split.num_classes))
    target = split.public_X.reshape(len(rows), -1) @ W
    target = 5 * target / target.std()
    replies = [_logit_reply(f"d{i}", target) for i in range(3)]
    server = server_strategy(config, split.public_X)
    agreement = []
    for rnd in (1, 2):
        consensus = server.aggregate(rnd, server.configure(rnd), replies)
        assert consensus.info == {"phase": "logits", "contributors": 3, "server_model": "cnn-m"}
        teacher = consensus.tensors["logits"].astype(np.float32)
        assert teacher.shape == target.shape
        agreement.append((teacher.argmax(1) == target.argmax(1)).mean())
    assert agreement[0] > 0.6, "the server model did not learn the consensus"
    assert agreement[1] > agreement[0], "the server model does not carry over between rounds"
    with pytest.raises(ConfigError, match="feddf needs the proxy set and torch at the server"):
        FedDFServer(config).aggregate(1, server.configure(1), replies)
    with pytest.raises(ConfigError, match="proxy set of 3 rows"):
        server_strategy(config, split.public_X[:3])


def test_feddf_federation_runs_the_fedmd_clients(split):
    config = small_config(split, strategy="feddf", rounds=1, warmup_epochs=3, server_epochs=2)
    server, clients, seen = _federate(split, config, ["cnn-xs", "cnn-s", "cnn-xs"])
    assert server.history[0].accepted == ["dev0", "dev1", "dev2"] and not server.rejections
    assert seen[0]["server_model"] == "cnn-l" and seen[0]["phase"] == "logits"
    assert all(len(c.history) == 2 for c in clients), "a client did not absorb the teacher"

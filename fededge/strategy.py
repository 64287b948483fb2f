"""Strategies: what a round asks of clients and how the server combines their replies.

After Flower's Strategy: the server loop (``server.py``) and the device loop (``client.py``) are
written once, and a strategy fills in the hooks of a round:

    server  configure(rnd)                      the announcement; its ``phase`` names the round
    client  reply(ctx, announcement)            the upload
    server  reply_specs(announcement), check    exact validation of every upload
    server  aggregate(rnd, announcement, replies)   the consensus, which names its phase too
    client  absorb(ctx, announcement, consensus)    learning from it

Phases are what a device does with a round, so distillation is a phase like any other:

- ``fedmd`` (default, after FedMD / DS-FL): every round is a ``logits`` phase: logits on proxy
  rows up, consensus down, then the device distills it into its student and revisits its data.
- ``feddf``: fedmd's rounds, but the server distills each consensus into a larger server model
  whose predictions are sent as the teacher (after FedDF).
- ``fedavg``: every round is a ``weights`` phase (FedAvg): weights up, their average down.
- ``fedavg-kd`` (the design source's recipe): ``teacher`` rounds train one teacher by FedAvg
  among the devices able to train it; the last consensus opens the ``distill`` phase, in which
  every device distills that teacher into its own student on its private data, then fine-tunes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregate import SHARPENED_AGGREGATORS, AggregationError, get_aggregator
from .compress import codec_for
from .config import ConfigError, FederationConfig
from .models import zoo_for
from .privacy import LocalPrivacy
from .protocol import ProtocolError, TensorSpec
from .trainer import Trainer
from .weights import (flat_weights, initial_model, load_flat_weights, parameter_count,
                      require_same_architecture, weighted_mean)

PHASE_LOGITS, PHASE_WEIGHTS, PHASE_TEACHER, PHASE_DISTILL = "logits", "weights", "teacher", "distill"


@dataclass
class Payload:
    """The JSON part and the tensors of one message body."""

    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Reply:
    """One accepted client upload for a round."""

    device: str
    samples: int
    payload: Payload


@dataclass
class ClientContext:
    """Everything a client-side strategy may touch: its student and its data, no network."""

    trainer: Trainer
    private_X: np.ndarray
    private_y: np.ndarray
    public_X: np.ndarray


class ServerStrategy(ABC):
    name: str
    # True when every device must train the same architecture (``config.student``);
    # ``simulate`` then gives every device that student.
    homogeneous: bool = False
    # True when the server computes on the proxy set itself and must be given ``public_X``.
    needs_proxy: bool = False

    def __init__(self, config: FederationConfig, public_X: np.ndarray | None = None) -> None:
        """``public_X``: the standardized proxy set, for strategies that compute on it at the
        server (``feddf``); the others only count its rows."""
        self.config = config
        self.public_X = public_X

    @abstractmethod
    def configure(self, rnd: int) -> Payload:
        """The body of round ``rnd``'s announcement."""

    @abstractmethod
    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        """The tensors an upload must carry to answer ``announcement``; validated before use."""

    def check(self, reply: Reply) -> None:
        """Strategy-specific checks of an upload whose tensors already match ``reply_specs``;
        raise ``ProtocolError`` so a bad upload is rejected before it can reach ``aggregate``."""

    @abstractmethod
    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        """Combine the accepted replies into the body of the round's consensus message."""


class ClientStrategy(ABC):
    name: str

    def __init__(self, config: FederationConfig) -> None:
        self.config = config

    def warmup(self, ctx: ClientContext) -> None:
        """Train on private data before the first round; a student that knows nothing yet would
        only add noise to the first consensus."""
        ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=self.config.warmup_epochs)

    @abstractmethod
    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        """The upload answering a round announcement."""

    @abstractmethod
    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        """Learn from the round's consensus."""


# -- fedmd ---------------------------------------------------------------------------------------

def _round_rng(config: FederationConfig, rnd: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, rnd, 0xFED])


def announced_rows(announcement: Payload, proxy_size: int) -> np.ndarray:
    """The proxy-set rows a ``logits`` announcement selects, in order.

    They travel as a packed bitmask (``rows``, one bit per proxy sample: 68 bytes for digits'
    539 rows, where int64 indices took 4.3 KB, sent twice per round since the consensus
    carries its announcement)."""
    packed = announcement.tensors.get("rows")
    if packed is None or packed.dtype != np.uint8 or packed.shape != ((proxy_size + 7) // 8,):
        raise ProtocolError(f"announcement lacks a uint8 'rows' mask of {(proxy_size + 7) // 8} "
                            f"bytes for a proxy set of {proxy_size}")
    bits = np.unpackbits(packed)
    if bits[proxy_size:].any() or not bits.any():
        raise ProtocolError("announcement 'rows' mask selects no row, or rows past the proxy set")
    return np.flatnonzero(bits[:proxy_size])


def _rows_mask(rows: np.ndarray, proxy_size: int) -> np.ndarray:
    mask = np.zeros(proxy_size, dtype=bool)
    mask[rows] = True
    return np.packbits(mask)


class FedMDServer(ServerStrategy):
    """FedMD / DS-FL: consensus logits on a seeded subset of the public proxy set."""

    name = "fedmd"

    def __init__(self, config: FederationConfig, public_X: np.ndarray | None = None) -> None:
        super().__init__(config, public_X)
        sharpened = config.aggregator in SHARPENED_AGGREGATORS
        options = {"temperature": config.era_temperature} if sharpened else {}
        self._aggregate = get_aggregator(config.aggregator, **options)
        self.codec = codec_for(config)

    def configure(self, rnd: int) -> Payload:
        size, per_round = self.config.proxy_size, self.config.proxy_per_round
        if per_round == 0 or per_round >= size:
            rows = np.arange(size)
        else:
            rows = _round_rng(self.config, rnd).choice(size, per_round, replace=False)
        return Payload(info={"phase": PHASE_LOGITS, "temperature": self.config.temperature},
                       tensors={"rows": _rows_mask(rows, size)})

    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        specs = self.codec.specs(len(announced_rows(announcement, self.config.proxy_size)))
        if self.config.share_class_counts:
            specs.append(TensorSpec("class_counts", ("I64",), (self.config.num_classes,)))
        return specs

    def check(self, reply: Reply) -> None:
        counts = reply.payload.tensors.get("class_counts")
        if counts is not None and ((counts < 0).any() or int(counts.sum()) != reply.samples):
            raise ProtocolError(f"class_counts {counts.tolist()} are negative or do not sum to "
                                f"the {reply.samples} samples declared")
        self.codec.decode(reply.payload.tensors)

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        return Payload(info={"phase": PHASE_LOGITS, "contributors": len(replies)},
                       tensors=self.codec.encode(self.consensus(replies)))

    def consensus(self, replies: list[Reply]) -> np.ndarray:
        """The aggregated (rows, classes) logits of the replies, before encoding."""
        if self.config.share_class_counts:
            counts = np.stack([r.payload.tensors["class_counts"] for r in replies])
        else:
            counts = np.array([r.samples for r in replies])
        return self._aggregate([self.codec.decode(r.payload.tensors) for r in replies], counts)


class FedDFServer(FedMDServer):
    """A FedDF-style server teacher (Lin et al., 2020): the server distills each round's
    consensus into its own, larger model (``config.teacher``, by default the largest student of
    the zoo) on the announced proxy rows, and that model's predictions become the teacher signal.

    One model carries knowledge across rounds and smooths the consensus over similar proxy
    samples; it costs the server ``server_epochs`` of training per round and needs torch and the
    proxy set at the server. Devices run the fedmd client unchanged. A restarted server starts
    its model afresh from the seed (the store keeps consensus, not this model).
    """

    name = "feddf"
    needs_proxy = True

    def __init__(self, config: FederationConfig, public_X: np.ndarray | None = None) -> None:
        super().__init__(config, public_X)
        if public_X is not None and len(public_X) != config.proxy_size:
            raise ConfigError(f"feddf got a proxy set of {len(public_X)} rows, the config says "
                              f"{config.proxy_size}; derive both from the same split")
        self._server: Trainer | None = None

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        if self.public_X is None:
            raise ConfigError("strategy feddf needs the proxy set at the server (it trains a "
                              "server model on it); run it with `fededge simulate` or a server "
                              "kit whose dataset the server can load")
        rows = self.public_X[announced_rows(announcement, self.config.proxy_size)]
        c = self.config
        if self._server is None:
            model = initial_model(teacher_name(c), c.input_shape, c.num_classes, c.seed)
            self._server = Trainer(model, lr=c.lr, batch_size=c.batch_size, seed=c.seed)
        self._server.distill(rows, self.consensus(replies), epochs=c.server_epochs,
                             temperature=c.temperature, alpha=1.0)
        return Payload(info={"phase": PHASE_LOGITS, "contributors": len(replies),
                             "server_model": teacher_name(c)},
                       tensors=self.codec.encode(self._server.logits(rows)))


class FedMDClient(ClientStrategy):
    """Upload logits on the announced proxy rows; distill the consensus, then revisit private
    data so the student does not drift from its own labels (FedMD's 'revisit' step)."""

    name = "fedmd"

    def __init__(self, config: FederationConfig) -> None:
        super().__init__(config)
        self.privacy = LocalPrivacy.from_config(config)
        self.codec = codec_for(config)

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        rows = ctx.public_X[announced_rows(announcement, len(ctx.public_X))]
        logits, info = ctx.trainer.logits(rows), {}
        if self.privacy is not None:  # local DP: noised here, before anything leaves the device
            logits, info["ldp"] = self.privacy.apply(logits)
        tensors = self.codec.encode(logits)
        if self.config.share_class_counts:
            tensors["class_counts"] = np.bincount(
                ctx.private_y, minlength=self.config.num_classes).astype(np.int64)
        return Payload(info=info, tensors=tensors)

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        rows = ctx.public_X[announced_rows(announcement, len(ctx.public_X))]
        teacher = self.codec.decode(consensus.tensors)
        ctx.trainer.distill(rows, teacher, epochs=self.config.distill_epochs,
                            temperature=self.config.temperature, alpha=1.0)
        ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=self.config.revisit_epochs)


# -- fedavg and fedavg-kd ------------------------------------------------------------------------

def teacher_name(config: FederationConfig) -> str:
    """fedavg-kd's teacher: ``config.teacher``, by default the largest student of the zoo."""
    return config.teacher or zoo_for(config.input_shape)[-1]


def _weights_payload(phase: str, weights: np.ndarray, **info: Any) -> Payload:
    return Payload(info={"phase": phase, **info}, tensors={"weights": weights})


class FedAvgServer(ServerStrategy):
    """FedAvg (McMahan et al., 2017) for a homogeneous federation: every device trains
    ``config.student``. Each round the devices train ``local_epochs`` on their private data from
    the last average and upload their weights (one float32 vector); the consensus is the mean
    weighted by sample counts. Round 1 starts from weights each device derives from the config
    seed (``weights.initial_model``), so no weights travel before the first average."""

    name = "fedavg"
    homogeneous = True
    phase = PHASE_WEIGHTS

    def __init__(self, config: FederationConfig, public_X: np.ndarray | None = None) -> None:
        super().__init__(config, public_X)
        self.architecture = self._architecture()
        self.size = parameter_count(self.architecture, config.input_shape, config.num_classes)

    def _architecture(self) -> str:
        if not self.config.student:
            raise ConfigError("strategy 'fedavg' needs the federation setting 'student', the one "
                              "student every device trains (simulate: --student NAME)")
        return self.config.student

    def configure(self, rnd: int) -> Payload:
        return Payload(info={"phase": self.phase})

    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        return [TensorSpec("weights", ("F32",), (self.size,))]

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        average = weighted_mean([r.payload.tensors["weights"] for r in replies],
                                [r.samples for r in replies])
        return _weights_payload(self.phase, average, contributors=len(replies))


class FedAvgClient(ClientStrategy):
    name = "fedavg"

    def warmup(self, ctx: ClientContext) -> None:
        """Start from the shared seeded weights instead of training: FedAvg's round 1 must
        average models that began in the same place."""
        c = self.config
        start = initial_model(c.student, c.input_shape, c.num_classes, c.seed)
        require_same_architecture(ctx.trainer.model, start, f"federation's student {c.student!r}")
        load_flat_weights(ctx.trainer.model, flat_weights(start))

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=self.config.local_epochs)
        return _weights_payload(PHASE_WEIGHTS, flat_weights(ctx.trainer.model))

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        load_flat_weights(ctx.trainer.model, consensus.tensors["weights"])


class FedAvgKDServer(FedAvgServer):
    """FedAvg of the teacher among the devices able to train it. The others answer each round
    with an empty weight vector (they abstain), so the server waits for nobody in vain; the
    average covers the non-empty uploads. The last consensus is marked ``distill``."""

    name = "fedavg-kd"
    homogeneous = False
    phase = PHASE_TEACHER

    def _architecture(self) -> str:
        return teacher_name(self.config)

    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        return [TensorSpec("weights", ("F32",), (None,))]

    def check(self, reply: Reply) -> None:
        length = len(reply.payload.tensors["weights"])
        if length not in (0, self.size):
            raise ProtocolError(f"teacher weights of length {length}; expected {self.size} "
                                "(the teacher's parameters) or 0 (abstaining)")

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        trained = [r for r in replies if len(r.payload.tensors["weights"])]
        if not trained:
            raise AggregationError(
                f"no device trained the teacher {self.architecture!r} in round {rnd}: every "
                "upload abstained. Set 'teacher' to a student some devices are large enough for")
        average = weighted_mean([r.payload.tensors["weights"] for r in trained],
                                [r.samples for r in trained])
        phase = PHASE_DISTILL if rnd == self.config.rounds else PHASE_TEACHER
        return _weights_payload(phase, average, contributors=len(trained))


class FedAvgKDClient(ClientStrategy):
    """A device trains the teacher when its own student is at least as large: its profile
    picked the largest student that fits its budgets, so a teacher no larger fits too. It
    contributes only while its teacher holds the latest average (after a restart it sits out
    one round and resyncs from the next consensus). On ``distill`` every device, able to train
    the teacher or not, runs the teacher on its private data once and distills it."""

    name = "fedavg-kd"

    def __init__(self, config: FederationConfig) -> None:
        super().__init__(config)
        self.teacher_name = teacher_name(config)
        self.teacher: Trainer | None = None  # in sync with the latest average when set

    def _can_train_teacher(self, ctx: ClientContext) -> bool:
        own = sum(p.numel() for p in ctx.trainer.model.parameters())
        c = self.config
        return own >= parameter_count(self.teacher_name, c.input_shape, c.num_classes)

    def _teacher_trainer(self, weights: np.ndarray | None = None) -> Trainer:
        c = self.config
        model = initial_model(self.teacher_name, c.input_shape, c.num_classes, c.seed)
        if weights is not None:
            load_flat_weights(model, weights)
        return Trainer(model, lr=c.lr, batch_size=c.batch_size, seed=c.seed)

    def warmup(self, ctx: ClientContext) -> None:
        super().warmup(ctx)  # the student learns its own labels while the teacher trains
        if self._can_train_teacher(ctx):
            self.teacher = self._teacher_trainer()

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        if self.teacher is None:
            return _weights_payload(PHASE_TEACHER, np.zeros(0, np.float32), abstain=True)
        self.teacher.fit(ctx.private_X, ctx.private_y, epochs=self.config.local_epochs)
        return _weights_payload(PHASE_TEACHER, flat_weights(self.teacher.model))

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        weights = consensus.tensors["weights"]
        if consensus.info.get("phase") == PHASE_DISTILL:
            self._distill(ctx, weights)
        elif self.teacher is not None:
            load_flat_weights(self.teacher.model, weights)
        elif self._can_train_teacher(ctx):
            self.teacher = self._teacher_trainer(weights)

    def _distill(self, ctx: ClientContext, weights: np.ndarray) -> None:
        c = self.config
        soft = self._teacher_trainer(weights).logits(ctx.private_X)
        self.teacher = None
        ctx.trainer.distill(ctx.private_X, soft, epochs=c.kd_epochs, temperature=c.temperature,
                            alpha=c.kd_alpha, y=ctx.private_y)
        if c.finetune_epochs:
            ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=c.finetune_epochs)


STRATEGIES: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    "fedmd": (FedMDServer, FedMDClient),
    "feddf": (FedDFServer, FedMDClient),
    "fedavg": (FedAvgServer, FedAvgClient),
    "fedavg-kd": (FedAvgKDServer, FedAvgKDClient),
}


class UnknownStrategyError(ValueError):
    pass


def strategy_pair(name: str) -> tuple[type[ServerStrategy], type[ClientStrategy]]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None

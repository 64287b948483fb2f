"""Strategies: what a round asks of clients and how the server combines their replies.

After Flower's Strategy: the server loop (``server.py``) and the device loop (``client.py``) are
written once; a strategy fills in *configure* (what the round announcement carries), the client's
*reply*, the server's *aggregate*, and the client's *absorb* of the result. FedMD is the default;
weight-averaging strategies plug into the same four hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .aggregate import get_aggregator
from .config import FederationConfig
from .privacy import LocalPrivacy
from .protocol import ProtocolError, TensorSpec
from .trainer import Trainer


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

    def __init__(self, config: FederationConfig) -> None:
        self.config = config

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


def _round_rng(config: FederationConfig, rnd: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, rnd, 0xFED])


class FedMDServer(ServerStrategy):
    """FedMD / DS-FL: consensus logits on a seeded subset of the public proxy set."""

    name = "fedmd"

    def __init__(self, config: FederationConfig) -> None:
        super().__init__(config)
        options = {"temperature": config.era_temperature} if config.aggregator == "era" else {}
        self._aggregate = get_aggregator(config.aggregator, **options)

    def configure(self, rnd: int) -> Payload:
        size, per_round = self.config.proxy_size, self.config.proxy_per_round
        if per_round == 0 or per_round >= size:
            indices = np.arange(size, dtype=np.int64)
        else:
            indices = np.sort(_round_rng(self.config, rnd).choice(size, per_round, replace=False))
        return Payload(info={"phase": "logits", "temperature": self.config.temperature},
                       tensors={"indices": indices.astype(np.int64)})

    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        rows, classes = len(announcement.tensors["indices"]), self.config.num_classes
        specs = [TensorSpec("logits", ("F16", "F32"), (rows, classes))]
        if self.config.share_class_counts:
            specs.append(TensorSpec("class_counts", ("I64",), (classes,)))
        return specs

    def check(self, reply: Reply) -> None:
        counts = reply.payload.tensors.get("class_counts")
        if counts is not None and ((counts < 0).any() or int(counts.sum()) != reply.samples):
            raise ProtocolError(f"class_counts {counts.tolist()} are negative or do not sum to "
                                f"the {reply.samples} samples declared")

    def aggregate(self, rnd: int, announcement: Payload, replies: list[Reply]) -> Payload:
        if self.config.share_class_counts:
            counts = np.stack([r.payload.tensors["class_counts"] for r in replies])
        else:
            counts = np.array([r.samples for r in replies])
        consensus = self._aggregate([r.payload.tensors["logits"].astype(np.float32)
                                     for r in replies], counts)
        return Payload(info={"phase": "logits", "contributors": len(replies)},
                       tensors={"logits": consensus.astype(self.config.logit_dtype)})


class FedMDClient(ClientStrategy):
    """Upload logits on the announced proxy rows; distill the consensus, then revisit private
    data so the student does not drift from its own labels (FedMD's 'revisit' step)."""

    name = "fedmd"

    def __init__(self, config: FederationConfig) -> None:
        super().__init__(config)
        self.privacy = LocalPrivacy.from_config(config)

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        rows = ctx.public_X[announcement.tensors["indices"]]
        logits, info = ctx.trainer.logits(rows), {}
        if self.privacy is not None:  # local DP: noised here, before anything leaves the device
            logits, info["ldp"] = self.privacy.apply(logits)
        tensors = {"logits": logits.astype(self.config.logit_dtype)}
        if self.config.share_class_counts:
            tensors["class_counts"] = np.bincount(
                ctx.private_y, minlength=self.config.num_classes).astype(np.int64)
        return Payload(info=info, tensors=tensors)

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        rows = ctx.public_X[announcement.tensors["indices"]]
        teacher = consensus.tensors["logits"].astype(np.float32)
        ctx.trainer.distill(rows, teacher, epochs=self.config.distill_epochs,
                            temperature=self.config.temperature, alpha=1.0)
        ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=self.config.revisit_epochs)


STRATEGIES: dict[str, tuple[type[ServerStrategy], type[ClientStrategy]]] = {
    "fedmd": (FedMDServer, FedMDClient),
}


class UnknownStrategyError(ValueError):
    pass


def strategy_pair(name: str) -> tuple[type[ServerStrategy], type[ClientStrategy]]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None

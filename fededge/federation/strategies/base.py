"""The two halves of a strategy, the records they exchange, and what they may do with a student.

Strategies are torch-free: a device's student is a ``Learner`` (``learn.trainer.Trainer`` is
one), and a strategy that needs another model (a FedAvg teacher, a FedDF server model) asks the
``new_learner`` factory the wiring hands it for one built from the federation's seed. So a
fedmd or fedavg server runs where torch is not installed, and the round logic reads without
any tensor library in the way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fededge.config import ConfigError, FederationConfig
from fededge.learn.anchor import LabelAnchor
from fededge.learn.zoo import estimate_cost, zoo_for
from fededge.wire.envelope import TensorSpec
from fededge.wire.messages import Payload

PHASE_LOGITS, PHASE_WEIGHTS, PHASE_TEACHER, PHASE_DISTILL = "logits", "weights", "teacher", "distill"


class Learner(Protocol):
    """A student and its optimizer, as strategies use them (``learn.trainer.Trainer``)."""

    @property
    def params(self) -> int: ...

    def fit(self, X: np.ndarray, y: np.ndarray, epochs: int, *, keep_weight: float = 0.0,
            temperature: float = 1.0) -> float: ...

    def distill(self, X: np.ndarray, teacher_logits: np.ndarray, epochs: int,
                temperature: float, alpha: float = 1.0, y: np.ndarray | None = None,
                anchor: LabelAnchor | None = None) -> float: ...

    def logits(self, X: np.ndarray) -> np.ndarray: ...

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float: ...

    def weights(self) -> np.ndarray: ...

    def load_weights(self, flat: np.ndarray) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


NewLearner = Callable[[str, int], Learner]
"""``new_learner(student, seed)``: a fresh learner of zoo student ``student`` whose initial
weights depend on ``seed`` alone, so every device builds the same one without weights
travelling."""


@dataclass
class Reply:
    """One accepted client upload for a round."""

    device: str
    samples: int
    payload: Payload


@dataclass
class ClientContext:
    """Everything a client-side strategy may touch: its student, its data, a way to build
    other models; no network."""

    trainer: Learner
    private_X: np.ndarray
    private_y: np.ndarray
    public_X: np.ndarray
    new_learner: NewLearner


class ServerStrategy(ABC):
    name: str
    # True when every device must train the same architecture (``config.student``);
    # ``simulate`` then gives every device that student.
    homogeneous: bool = False
    # True when the server computes on the proxy set itself and must be given ``public_X`` and
    # ``new_learner`` (and so needs torch).
    needs_proxy: bool = False

    def __init__(self, config: FederationConfig, *, public_X: np.ndarray | None = None,
                 new_learner: NewLearner | None = None) -> None:
        """``public_X``: the standardized proxy set, and ``new_learner`` a model factory, for
        strategies that compute at the server (``feddf``); the others only count its rows."""
        self.config = config
        self.public_X = public_X
        self.new_learner = new_learner

    @abstractmethod
    def configure(self, rnd: int) -> Payload:
        """The body of round ``rnd``'s announcement."""

    @abstractmethod
    def reply_specs(self, announcement: Payload) -> list[TensorSpec]:
        """The tensors an upload must carry to answer ``announcement``; validated before use."""

    def check_devices(self, students: Mapping[str, str]) -> None:
        """Before round 1, at plan time (``simulate``, ``provision``): raise ``ConfigError``
        when the devices (id → the student each trains) cannot run this strategy at all."""

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


def teacher_name(config: FederationConfig) -> str:
    """fedavg-kd's teacher: ``config.teacher``, by default the largest student of the zoo."""
    return config.teacher or zoo_for(config.input_shape)[-1]


def parameter_count(config: FederationConfig, student: str) -> int:
    """Parameters of zoo student ``student`` for the federation's inputs (no torch needed)."""
    return estimate_cost(student, config.input_shape, config.num_classes).params


def load_same_architecture(target: Learner, source: Learner, what: str) -> None:
    """Copy ``source``'s weights into ``target``; a ``ConfigError`` naming ``what`` when they
    are not the same architecture (weight averaging needs one architecture everywhere)."""
    if target.params != source.params:
        raise ConfigError(f"this device trains a model of {target.params:,} parameters, not the "
                          f"{what} ({source.params:,}); weight averaging needs every device "
                          "on the same architecture")
    target.load_weights(source.weights())

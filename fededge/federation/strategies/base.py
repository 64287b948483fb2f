"""The two halves of a strategy and the records they exchange; the server loop and the device
loop call these hooks (see the package docstring for the round they make up)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fededge.config import FederationConfig
from fededge.learn.models import zoo_for
from fededge.learn.trainer import Trainer
from fededge.wire.protocol import TensorSpec

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


def teacher_name(config: FederationConfig) -> str:
    """fedavg-kd's teacher: ``config.teacher``, by default the largest student of the zoo."""
    return config.teacher or zoo_for(config.input_shape)[-1]

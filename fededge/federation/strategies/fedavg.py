"""Weight averaging: FedAvg of one student, and fedavg-kd (a FedAvg teacher distilled into
every device's own student)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fededge.config import ConfigError, FederationConfig
from fededge.federation.strategies.base import (
    PHASE_DISTILL,
    PHASE_TEACHER,
    PHASE_WEIGHTS,
    ClientContext,
    ClientStrategy,
    Learner,
    Reply,
    ServerStrategy,
    load_same_architecture,
    parameter_count,
    teacher_name,
)
from fededge.learn.aggregate import AggregationError, weighted_mean
from fededge.learn.picking import NoStudentFitsError, pick_student
from fededge.profiles import load_catalog
from fededge.wire.envelope import TensorSpec
from fededge.wire.messages import Payload
from fededge.wire.topics import ProtocolError


def _weights_payload(phase: str, weights: np.ndarray, **info: Any) -> Payload:
    return Payload(info={"phase": phase, **info}, tensors={"weights": weights})


def _weights(consensus: Payload, size: int) -> np.ndarray:
    """A consensus' float32 weight vector of ``size`` values; ``ProtocolError`` otherwise (a
    hostile server or broker gets the message ignored, not the device crashed)."""
    weights = consensus.tensors.get("weights")
    if weights is None or weights.dtype != np.float32 or weights.shape != (size,):
        raise ProtocolError(f"consensus weights are not {size} float32 values")
    return weights


class FedAvgServer(ServerStrategy):
    """FedAvg (McMahan et al., 2017) for a homogeneous federation: every device trains
    ``config.student``. Each round the devices train ``local_epochs`` on their private data from
    the last average and upload their weights (one float32 vector); the consensus is the mean
    weighted by sample counts. Round 1 starts from weights each device derives from the config
    seed (``ClientContext.new_learner``), so no weights travel before the first average."""

    name = "fedavg"
    homogeneous = True
    phase = PHASE_WEIGHTS

    def __init__(self, config: FederationConfig, **resources) -> None:
        super().__init__(config, **resources)
        self.architecture = self._architecture()
        self.size = parameter_count(config, self.architecture)

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
        load_same_architecture(ctx.trainer, ctx.new_learner(c.student, c.seed),
                               f"federation's student {c.student!r}")

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=self.config.local_epochs)
        return _weights_payload(PHASE_WEIGHTS, ctx.trainer.weights())

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        ctx.trainer.load_weights(_weights(consensus, ctx.trainer.params))


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

    def check_devices(self, students: Mapping[str, str]) -> None:
        """A device trains the teacher when its own student is at least as large (the client
        half's rule), so with none such every teacher round would end with no upload."""
        need = parameter_count(self.config, self.architecture)
        if any(parameter_count(self.config, s) >= need for s in students.values()):
            return
        able = _profiles_at_least(self.config, need)
        where = (f"profiles whose student is large enough: {', '.join(able)}; add such devices "
                 "(simulate: --profiles)" if able
                 else "no profile of the catalog picks a student that large")
        largest = max(students.values(), key=lambda s: parameter_count(self.config, s))
        raise ConfigError(
            f"fedavg-kd: no device can train the teacher {self.architecture!r} ({need:,} "
            f"params): the devices' students are {', '.join(sorted(set(students.values())))} "
            f"({where}), or set 'teacher' to a student some device trains (simulate: --set "
            f"teacher={largest})")

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


def _profiles_at_least(config: FederationConfig, params: int) -> list[str]:
    """The catalog's training profiles whose pick has at least ``params`` parameters."""
    able = []
    for profile in load_catalog().values():
        try:
            choice = pick_student(profile, config.input_shape, config.num_classes,
                                  config.batch_size)
        except NoStudentFitsError:
            continue
        if profile.can_train and choice.cost.params >= params:
            able.append(profile.name)
    return able


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
        self.teacher: Learner | None = None  # in sync with the latest average when set

    def _can_train_teacher(self, ctx: ClientContext) -> bool:
        return ctx.trainer.params >= parameter_count(self.config, self.teacher_name)

    def _teacher_trainer(self, ctx: ClientContext, weights: np.ndarray | None = None) -> Learner:
        teacher = ctx.new_learner(self.teacher_name, self.config.seed)
        if weights is not None:
            teacher.load_weights(weights)
        return teacher

    def warmup(self, ctx: ClientContext) -> None:
        super().warmup(ctx)  # the student learns its own labels while the teacher trains
        if self._can_train_teacher(ctx):
            self.teacher = self._teacher_trainer(ctx)

    def reply(self, ctx: ClientContext, announcement: Payload) -> Payload:
        if self.teacher is None:
            return _weights_payload(PHASE_TEACHER, np.zeros(0, np.float32), abstain=True)
        self.teacher.fit(ctx.private_X, ctx.private_y, epochs=self.config.local_epochs)
        return _weights_payload(PHASE_TEACHER, self.teacher.weights())

    def absorb(self, ctx: ClientContext, announcement: Payload, consensus: Payload) -> None:
        weights = _weights(consensus, parameter_count(self.config, self.teacher_name))
        if consensus.info.get("phase") == PHASE_DISTILL:
            self._distill(ctx, weights)
        elif self.teacher is not None:
            self.teacher.load_weights(weights)
        elif self._can_train_teacher(ctx):
            self.teacher = self._teacher_trainer(ctx, weights)

    def _distill(self, ctx: ClientContext, weights: np.ndarray) -> None:
        c = self.config
        soft = self._teacher_trainer(ctx, weights).logits(ctx.private_X)
        self.teacher = None
        ctx.trainer.distill(ctx.private_X, soft, epochs=c.kd_epochs, temperature=c.temperature,
                            alpha=c.kd_alpha, y=ctx.private_y)
        if c.finetune_epochs:
            ctx.trainer.fit(ctx.private_X, ctx.private_y, epochs=c.finetune_epochs)

"""The references a simulated federation is judged against: local-only and centralized."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fededge.config import FederationConfig
from fededge.errors import FedEdgeError
from fededge.federation import wiring
from fededge.learn.data import FederatedSplit
from fededge.learn.trainer import Trainer
from fededge.sim.recipe import Participant, SimulationError


class _Stopped(Exception):
    pass


@dataclass(frozen=True)
class References:
    """Per device, in the order of the devices: local-only and centralized test accuracy."""

    devices: list[str]
    local_only: list[float]
    centralized: list[float]
    costs: list[dict[str, Any]] = field(default_factory=list)  # one per trained model

    def to_dict(self) -> dict[str, Any]:
        return {"local_only_mean_accuracy": float(np.mean(self.local_only)),
                "centralized_mean_accuracy": float(np.mean(self.centralized)),
                "training": self.costs,
                "clients": [{"id": d, "local_only_accuracy": lo, "centralized_accuracy": c}
                            for d, lo, c in zip(self.devices, self.local_only,
                                                self.centralized)]}


def federation_samples(config: FederationConfig, split: FederatedSplit) -> int:
    """Training samples one device of the federation processes, on average: its warm-up and
    revisit epochs over its private data and its distillation epochs over the proxy rows of
    every round."""
    private = np.mean([len(c.y) for c in split.clients])
    proxy = config.proxy_per_round or len(split.public_X)
    return int(private * (config.warmup_epochs + config.rounds * config.revisit_epochs)
               + config.rounds * config.distill_epochs * min(proxy, len(split.public_X)))


def centralized_epochs(config: FederationConfig, split: FederatedSplit) -> int:
    """Epochs over the pooled private data that a centralized model trains: as many samples as
    a federated device trained on (``federation_samples``), so the reference costs what the
    federation spent per device (and at least one epoch). Before, it was max(20, warm-up
    epochs): ~32k samples for res-xl on hard32, 15-20 minutes alone on this machine."""
    pooled = sum(len(c.y) for c in split.clients)
    return max(1, math.ceil(federation_samples(config, split) / pooled))


class BackgroundBaselines:
    """Local-only (each student on its private data, with the federation's private-epoch
    budget) and centralized (each architecture on all private data pooled, with as many
    training samples as a federated device saw: ``centralized_epochs``) accuracies.

    They train in a thread while the federation runs: the federation leaves part of the second
    core idle (clients wait on each other and on the broker), and torch releases the GIL inside
    its kernels, so this hides most of their cost. Models are built here, in the caller's
    thread, because weight init draws from torch's global RNG, which the clients also use.
    """

    def __init__(self, people: list[Participant], split: FederatedSplit,
                 config: FederationConfig, seed: int, *,
                 on_progress: Callable[[int, int], None] = lambda done, total: None,
                 on_done: Callable[[References], None] = lambda refs: None) -> None:
        """``on_progress(done, total)`` hears of each trained model, ``on_done`` of the
        result; both are called from the baselines' thread."""
        self._split = split
        self._devices = [p.device_id for p in people]
        self._on_progress, self._on_done = on_progress, on_done
        self._local_epochs = config.warmup_epochs + config.rounds * config.revisit_epochs
        self._central_epochs = centralized_epochs(config, split)
        self._local = [wiring.student_trainer(p.student, split.input_shape,
                                              split.num_classes, config, seed + i)
                       for i, p in enumerate(people)]
        self._central: dict[str, Trainer] = {}
        for i, p in enumerate(people):
            if p.student not in self._central:
                self._central[p.student] = wiring.student_trainer(
                    p.student, split.input_shape, split.num_classes, config, seed + i)
        self._students = [p.student for p in people]
        self._value: References | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baselines", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        split = self._split
        total, done = len(self._local) + len(self._central), 0
        costs: list[dict[str, Any]] = []
        try:
            self._on_progress(done, total)
            local = []
            for trainer, data, student in zip(self._local, split.clients, self._students):
                local.append(self._train(trainer, data.X, data.y, self._local_epochs,
                                         costs, "local-only", student))
                done += 1
                self._on_progress(done, total)
            pooled_X = np.concatenate([c.X for c in split.clients])
            pooled_y = np.concatenate([c.y for c in split.clients])
            central = {}
            for student, trainer in self._central.items():
                central[student] = self._train(trainer, pooled_X, pooled_y,
                                               self._central_epochs, costs, "centralized",
                                               student)
                done += 1
                self._on_progress(done, total)
            self._value = References(self._devices, local, [central[s] for s in self._students],
                                     costs)
            self._on_done(self._value)
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def _train(self, trainer: Trainer, X: np.ndarray, y: np.ndarray, epochs: int,
               costs: list[dict[str, Any]], kind: str, student: str) -> float:
        """Train, then test; the model's cost (training wall time, samples) joins ``costs``."""
        started = time.perf_counter()
        self._fit(trainer, X, y, epochs)
        seconds = time.perf_counter() - started
        accuracy = trainer.accuracy(self._split.test_X, self._split.test_y)
        costs.append({"kind": kind, "student": student, "epochs": epochs,
                      "samples": epochs * len(y), "train_seconds": round(seconds, 2),
                      "samples_per_second": round(epochs * len(y) / max(seconds, 1e-9), 1)})
        return accuracy

    def _fit(self, trainer: Trainer, X: np.ndarray, y: np.ndarray, epochs: int) -> None:
        """``trainer.fit`` one epoch at a time (the same batches), so ``stop`` takes effect
        within an epoch."""
        for _ in range(epochs):
            if self._stop.is_set():
                raise _Stopped
            trainer.fit(X, y, epochs=1)

    @property
    def error(self) -> BaseException | None:
        """What ended the baselines' thread, if it failed (None while it runs or after it
        succeeded)."""
        return self._error

    def stop(self) -> None:
        """End the thread after the epoch it is in (a run that is stopping needs no baselines)."""
        self._stop.set()
        self._thread.join(timeout=30)

    def result(self) -> References:
        self._thread.join()
        if isinstance(self._error, FedEdgeError):
            raise self._error
        if isinstance(self._error, (ArithmeticError, ValueError)):  # e.g. a NaN training loss
            raise SimulationError(f"the baselines failed: {self._error}") from None
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

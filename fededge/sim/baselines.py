"""The references a simulated federation is judged against: local-only and centralized."""

from __future__ import annotations

import threading
from dataclasses import dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return {"local_only_mean_accuracy": float(np.mean(self.local_only)),
                "centralized_mean_accuracy": float(np.mean(self.centralized)),
                "clients": [{"id": d, "local_only_accuracy": lo, "centralized_accuracy": c}
                            for d, lo, c in zip(self.devices, self.local_only,
                                                self.centralized)]}


class BackgroundBaselines:
    """Local-only (each student on its private data, with the federation's private-epoch
    budget) and centralized (each architecture on all private data pooled) accuracies.

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
        self._central_epochs = max(20, config.warmup_epochs)
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
        try:
            self._on_progress(done, total)
            local = []
            for trainer, data in zip(self._local, split.clients):
                self._fit(trainer, data.X, data.y, self._local_epochs)
                local.append(trainer.accuracy(split.test_X, split.test_y))
                done += 1
                self._on_progress(done, total)
            pooled_X = np.concatenate([c.X for c in split.clients])
            pooled_y = np.concatenate([c.y for c in split.clients])
            central = {}
            for student, trainer in self._central.items():
                self._fit(trainer, pooled_X, pooled_y, self._central_epochs)
                central[student] = trainer.accuracy(split.test_X, split.test_y)
                done += 1
                self._on_progress(done, total)
            self._value = References(self._devices, local, [central[s] for s in self._students])
            self._on_done(self._value)
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

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

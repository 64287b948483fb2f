"""Local training and distillation for one student: the federation's hot path.

Plain torch, no DataLoader: a whole client's data fits in memory as one tensor, so each epoch
is one shuffle (a single gather) followed by contiguous slices, which avoids the per-batch
Python overhead that dominates tiny models on small CPUs. The Adam state persists across calls
(rounds), and `state_dict()` captures model, optimizer and shuffling RNG so a restored trainer
continues exactly where the saved one would have.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch

from fededge.learn.anchor import LabelAnchor
from fededge.learn.kd import kd_loss, label_prior, logit_adjusted_ce, not_true_distillation
from fededge.learn.weights import flat_weights, initial_model, load_flat_weights

INFERENCE_CHUNK = 1024  # samples per forward pass in logits(): bounds peak memory


class Trainer:
    """Trains `model` with Adam on numpy or torch inputs.

    `compute_seconds` accumulates the wall time spent in fit/distill/logits/accuracy, so
    callers can report how much of a round went to learning versus messaging.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float = 2e-3,
        batch_size: int = 32,
        seed: int = 0,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0 (got {lr}); try 2e-3")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size}); try 32")
        self.model = model
        self.batch_size = batch_size
        # fused Adam: one kernel per step instead of per-parameter Python loops (~10% faster here)
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=lr, weight_decay=weight_decay, fused=True
        )
        self._generator = torch.Generator().manual_seed(seed)
        self.compute_seconds = 0.0

    def fit(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, epochs: int,
            *, keep_weight: float = 0.0, temperature: float = 1.0) -> float:
        """Cross-entropy training on labelled data; returns the last epoch's mean loss.

        ``keep_weight > 0`` adds FedNTD's not-true-class distillation (``kd.
        not_true_distillation`` at ``temperature``) towards the student's own logits on ``X``
        as they are before this call, so revisiting labels fixes the true class without
        erasing what the student just learned about the others."""
        X_t = _features(X)
        y_t = _labels(y, len(X_t), "y")
        if keep_weight <= 0:
            def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
                return kd_loss(self.model(xb), yb, None, alpha=0.0, temperature=1.0)

            return self._train((X_t, y_t), epochs, loss_fn)
        kept = torch.from_numpy(self.logits(X_t))

        def keeping_loss(xb: torch.Tensor, yb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
            out = self.model(xb)
            return (kd_loss(out, yb, None, alpha=0.0, temperature=1.0)
                    + keep_weight * not_true_distillation(out, kb, yb, temperature))

        return self._train((X_t, y_t, kept), epochs, keeping_loss)

    def distill(
        self,
        X: np.ndarray | torch.Tensor,
        teacher_logits: np.ndarray | torch.Tensor,
        epochs: int,
        temperature: float,
        alpha: float = 1.0,
        y: np.ndarray | torch.Tensor | None = None,
        anchor: LabelAnchor | None = None,
    ) -> float:
        """Distill `teacher_logits` (logits or log-probabilities, one row per sample of `X`)
        with `distill.kd_loss`; `alpha < 1` mixes in the labels `y`, and an ``anchor`` adds a
        label term on private data (``LabelAnchor``). Returns the last epoch's mean loss."""
        X_t = _features(X)
        T_t = _features(teacher_logits)
        if T_t.ndim != 2 or len(T_t) != len(X_t):
            raise ValueError(
                f"teacher_logits has shape {tuple(T_t.shape)}; expected ({len(X_t)}, classes), "
                "one row per sample of X"
            )
        tensors = (X_t, T_t) if y is None else (X_t, T_t, _labels(y, len(X_t), "y"))

        def loss_fn(
            xb: torch.Tensor, tb: torch.Tensor, yb: torch.Tensor | None = None
        ) -> torch.Tensor:
            return kd_loss(self.model(xb), yb, tb, alpha=alpha, temperature=temperature)

        return self._train(tensors, epochs, loss_fn if anchor is None
                           else self._anchored(loss_fn, anchor))

    def _anchored(self, loss_fn: Callable[..., torch.Tensor],
                  anchor: LabelAnchor) -> Callable[..., torch.Tensor]:
        """``loss_fn`` plus the anchor's label term on a random private batch of the same size
        (drawn from the trainer's RNG, so a restored trainer draws the same batches)."""
        X_p, y_p = _features(anchor.X), _labels(anchor.y, len(anchor.X), "anchor y")
        log_prior = torch.from_numpy(
            np.log(label_prior(anchor.y, anchor.num_classes)).astype(np.float32))

        def anchored(xb: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            pick = torch.randint(len(X_p), (len(xb),), generator=self._generator)
            labelled = logit_adjusted_ce(self.model(X_p[pick]), y_p[pick], log_prior, anchor.tau)
            return loss_fn(xb, *rest) + anchor.weight * labelled

        return anchored

    def logits(self, X: np.ndarray | torch.Tensor) -> np.ndarray:
        """Eval-mode logits as float32 numpy (N, K)."""
        start = time.perf_counter()
        X_t = _features(X)
        self.model.eval()
        with torch.inference_mode():
            chunks = [X_t[i : i + INFERENCE_CHUNK] for i in range(0, len(X_t), INFERENCE_CHUNK)]
            out = torch.cat([self.model(chunk) for chunk in chunks])
        self.compute_seconds += time.perf_counter() - start
        return out.numpy().astype(np.float32, copy=False)

    def accuracy(self, X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
        """Fraction of samples whose argmax logit equals the label."""
        y_np = _labels(y, len(X), "y").numpy()
        return float((self.logits(X).argmax(axis=1) == y_np).mean())

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def weights(self) -> np.ndarray:
        """The parameters as one float32 vector (``weights.flat_weights``)."""
        return flat_weights(self.model)

    def load_weights(self, flat: np.ndarray) -> None:
        """Load a ``weights()`` vector in place; the optimizer state stays bound."""
        load_flat_weights(self.model, flat)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy) of model, optimizer and shuffling-RNG state."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self._generator.get_state(),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` snapshot."""
        missing = {"model", "optimizer", "generator"} - set(state)
        if missing:
            raise ValueError(
                f"trainer state lacks {', '.join(sorted(missing))}; pass a Trainer.state_dict()"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._generator.set_state(state["generator"])

    def _train(
        self,
        tensors: tuple[torch.Tensor, ...],
        epochs: int,
        loss_fn: Callable[..., torch.Tensor],
    ) -> float:
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1 (got {epochs})")
        start = time.perf_counter()
        n = len(tensors[0])
        self.model.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=self._generator)
            shuffled = [t[perm] for t in tensors]
            total = 0.0
            for a, b in self._batch_bounds(n):
                loss = loss_fn(*(t[a:b] for t in shuffled))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total += loss.item() * (b - a)
            mean_loss = total / n
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training loss became {mean_loss} in epoch {epoch + 1}; lower the learning "
                    "rate or check the inputs for extreme values"
                )
        self.compute_seconds += time.perf_counter() - start
        return mean_loss

    def _batch_bounds(self, n: int) -> list[tuple[int, int]]:
        """Batch (start, stop) pairs; a trailing batch of one sample joins the previous batch,
        because BatchNorm cannot train on a single sample."""
        starts = list(range(0, n, self.batch_size))
        if n > 1 and n - starts[-1] == 1:
            starts.pop()
        return list(zip(starts, starts[1:] + [n]))


def _features(X: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 tensor sharing memory with `X` when it already is contiguous float32."""
    if isinstance(X, torch.Tensor):
        t = X.to(torch.float32)
    else:
        t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if len(t) == 0:
        raise ValueError("got an empty array; training and inference need at least one sample")
    return t


def _labels(y: np.ndarray | torch.Tensor, n: int, name: str) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        t = y.to(torch.int64)
    else:
        t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    if t.shape != (n,):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected ({n},), one label per sample"
        )
    return t


def seeded_trainer(student: str, input_shape: Sequence[int], num_classes: int, *, seed: int,
                   lr: float = 2e-3, batch_size: int = 32) -> Trainer:
    """A trainer of zoo student ``student`` whose weights and shuffling depend on ``seed``
    alone (``weights.initial_model``): the ``new_learner`` strategies get from the wiring."""
    model = initial_model(student, input_shape, num_classes, seed)
    return Trainer(model, lr=lr, batch_size=batch_size, seed=seed)

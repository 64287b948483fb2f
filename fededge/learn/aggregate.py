"""Teacher-knowledge aggregators: many clients' logits on the proxy set → one consensus.

Every aggregator has the signature ``fn(logits, counts) -> consensus``: `logits` is one (M, K)
array per client (M proxy samples, K classes) and the result is an (M, K) float32 array of
*logits*. All but `mean` and `weighted` work in probability space and return log-probabilities,
which are valid logits for `distill.kd_loss`; `era`, `median` and `trimmed-mean` then sharpen
them (DS-FL's entropy reduction, ``temperature``).

`counts` is either each client's private sample count (n,) or, when clients share their label
histograms, per-class counts (n, K). Per-class counts make the weighted aggregators
*class-aware*: column c of the consensus is averaged with weights proportional to how many
examples of class c each client holds. Under label skew a client that never saw class c still
answers confidently on a c-sample, and a plain mean lets that noise into the teacher; weighting
by class counts lets the clients that know c decide it (on digits, Dirichlet α = 0.5, this lifts
the consensus from ~92 % to ~96 % correct). Robust coordinate-wise aggregators ignore counts.

Pure numpy (float64 inside), so the server needs no torch to aggregate.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Sequence
from typing import Callable

import numpy as np

from fededge.errors import FedEdgeError

Counts = "list[int] | np.ndarray"
Aggregator = Callable[[list[np.ndarray], Counts], np.ndarray]

CLASS_COUNT_SMOOTHING = 1e-3
"""Added to every per-class count so a class nobody holds falls back to equal weights."""


class AggregationError(FedEdgeError, ValueError):
    """The uploads cannot be aggregated; the message names the offending client or argument."""


class UnknownAggregatorError(AggregationError):
    """No aggregator has the requested name; the message lists the valid ones."""


def mean(logits: list[np.ndarray], counts: Counts) -> np.ndarray:
    """Unweighted mean of logits (FedMD)."""
    stack, _ = _validate(logits, counts)
    return stack.mean(axis=0).astype(np.float32)


def weighted(logits: list[np.ndarray], counts: Counts) -> np.ndarray:
    """Logit mean weighted by private sample count (per class when counts are per class):
    clients that saw more data count more."""
    stack, w = _validate(logits, counts)
    return (stack * _column_weights(w)[:, None, :]).sum(axis=0).astype(np.float32)


def prob_mean(logits: list[np.ndarray], counts: Counts) -> np.ndarray:
    """Mean of the clients' softmax probabilities (class-weighted when counts are per class),
    renormalized and returned as log-probabilities.

    Computed as logsumexp over clients of log-softmax minus ln n, so it stays finite even when a
    client is extremely confident.
    """
    stack, w = _validate(logits, counts)
    return _log_mean_prob(stack, _class_weights(w, len(stack))).astype(np.float32)


def era(logits: list[np.ndarray], counts: Counts, *, temperature: float = 0.1) -> np.ndarray:
    """Entropy Reduction Aggregation (DS-FL, Itahara et al. 2021): softmax(p̄ / T) where p̄ is
    the mean of the clients' probabilities (class-weighted when counts are per class). A low T sharpens the averaged soft labels, whose
    entropy grows under non-IID data. Returned as log-probabilities.

    Note the softmax is applied to p̄ itself (in [0, 1]), as in DS-FL, so with T = 0.1 the
    consensus logit gap is at most 10 and some dark knowledge survives.
    """
    stack, w = _validate(logits, counts)
    return _sharpen(np.exp(_log_mean_prob(stack, _class_weights(w, len(stack)))), temperature)


def median(logits: list[np.ndarray], counts: Counts, *, temperature: float = 0.1) -> np.ndarray:
    """Coordinate-wise median of the clients' probabilities, renormalized and sharpened like
    ``era``: robust to a minority of arbitrary uploads. Ignores counts, which a Byzantine
    client could inflate."""
    stack, _ = _validate(logits, counts)
    return _sharpen(np.median(_softmax(stack), axis=0), temperature)


def trimmed_mean(
    logits: list[np.ndarray], counts: Counts, *, trim: float = 0.2, temperature: float = 0.1
) -> np.ndarray:
    """Coordinate-wise mean of the clients' probabilities after dropping the `trim` fraction of
    highest and lowest values, renormalized and sharpened like ``era``. Ignores counts.

    Probability space rather than logits: a label-flipped client's logits are confident *and*
    large, so in logit space its wrong class pulls the mean of the survivors far more than in
    [0, 1], where one vote weighs at most 1 (digits, 2 of 10 clients label-flipped: 9.4 points
    lost in logit space, 1.9 here; BENCHMARKS.md). Any trim > 0 drops at least one value each side once there are 3
    clients; trim = 0 is the ``era`` of equal weights."""
    if not 0.0 <= trim < 0.5:
        raise AggregationError(f"trim must be in [0, 0.5) (got {trim}); try 0.2")
    stack, _ = _validate(logits, counts)
    n = len(stack)
    k = max(1, int(trim * n)) if trim > 0 and n >= 3 else 0
    ordered = np.sort(_softmax(stack), axis=0)
    return _sharpen(ordered[k : n - k].mean(axis=0), temperature)


AGGREGATORS: dict[str, Aggregator] = {
    "mean": mean,
    "weighted": weighted,
    "prob-mean": prob_mean,
    "era": era,
    "median": median,
    "trimmed-mean": trimmed_mean,
}

SHARPENED_AGGREGATORS = ("era", "median", "trimmed-mean")
"""The aggregators that take the DS-FL sharpening ``temperature`` (config ``era_temperature``)."""


def get_aggregator(name: str, **options: float) -> Aggregator:
    """Look up an aggregator; keyword `options` (e.g. ``temperature`` for era, ``trim`` for
    trimmed-mean) are bound into the returned function."""
    if name not in AGGREGATORS:
        close = difflib.get_close_matches(name, AGGREGATORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownAggregatorError(
            f"unknown aggregator {name!r}{hint}; valid: {', '.join(AGGREGATORS)}"
        )
    fn = AGGREGATORS[name]
    if not options:
        return fn
    allowed = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - {p.name for p in allowed})
    if unknown:
        valid = ", ".join(p.name for p in allowed) or "none"
        raise AggregationError(
            f"aggregator {name!r} takes no option {', '.join(unknown)}; its options: {valid}"
        )
    return functools.partial(fn, **options)


def _validate(logits: list[np.ndarray], counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """Stack uploads as float64 (n, M, K) and counts as float64 (n,), or explain what is wrong."""
    if len(logits) == 0:
        raise AggregationError("no client logits to aggregate; wait for at least one upload")
    if len(counts) != len(logits):
        raise AggregationError(
            f"got {len(logits)} logit arrays but {len(counts)} counts; pass one count per client"
        )
    arrays = [np.asarray(a, dtype=np.float64) for a in logits]
    shape = arrays[0].shape
    if len(shape) != 2:
        raise AggregationError(f"client 0's logits have shape {shape}; expected (samples, classes)")
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise AggregationError(
                f"client {i}'s logits have shape {a.shape} but client 0's have {shape}; "
                "all clients must answer on the same proxy samples and classes"
            )
        if not np.isfinite(a).all():
            raise AggregationError(f"client {i}'s logits contain NaN/Inf; drop that upload")
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim == 1 and not (w > 0).all():
        raise AggregationError(f"sample counts must be positive (got {w.tolist()})")
    if w.ndim == 2 and (w.shape[1] != shape[1] or (w < 0).any() or not (w.sum(1) > 0).all()):
        raise AggregationError(f"per-class counts must be a non-negative ({len(arrays)}, "
                               f"{shape[1]}) array with a positive total per client")
    if w.ndim not in (1, 2):
        raise AggregationError(f"counts must be (clients,) or (clients, classes), got {w.shape}")
    return np.stack(arrays), w


def _column_weights(counts: np.ndarray) -> np.ndarray:
    """(n, K) or (n, 1) weights summing to 1 over clients for each class column."""
    w = counts[:, None] if counts.ndim == 1 else counts + CLASS_COUNT_SMOOTHING
    return w / w.sum(axis=0, keepdims=True)


def _class_weights(counts: np.ndarray, n: int) -> np.ndarray:
    """Per-class weights for the probability aggregators, which stay unweighted (DS-FL) unless
    clients shared per-class counts."""
    if counts.ndim == 1:
        return np.full((n, 1), 1.0 / n)
    return _column_weights(counts)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(z))


def _sharpen(p: np.ndarray, temperature: float) -> np.ndarray:
    """DS-FL's entropy reduction: renormalize the (M, K) aggregate probabilities ``p`` (a median
    or trimmed mean no longer sums to 1) and return log softmax(p / T) as float32."""
    if not temperature > 0:
        raise AggregationError(f"temperature must be > 0 (got {temperature}); DS-FL uses 0.1")
    p = np.maximum(p, 0.0)
    p = p / np.maximum(p.sum(axis=-1, keepdims=True), np.finfo(np.float64).tiny)
    return _log_softmax(p / temperature).astype(np.float32)


def _log_mean_prob(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ln of the weighted mean over clients (axis 0) of softmax(stack), renormalized over
    classes; weights are (n, K) or (n, 1) columns summing to 1. Computed in log space so it
    stays finite when a client is extremely confident."""
    log_p = _log_softmax(stack)
    top = log_p.max(axis=0)
    mixed = top + np.log((weights[:, None, :] * np.exp(log_p - top)).sum(axis=0))
    return _log_softmax(mixed)


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg's average: sum_k w_k v_k / sum_k w_k, accumulated in float64."""
    w = np.asarray(weights, dtype=np.float64)
    if len(vectors) == 0 or len(w) != len(vectors) or not (w > 0).all():
        raise AggregationError("weighted_mean needs one positive weight per vector, and a vector")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    return (np.tensordot(w / w.sum(), stack, axes=1)).astype(np.float32)

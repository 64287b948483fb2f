import math

import numpy as np
import pytest

import fededge.aggregate as agg

from fededge.aggregate import (
    AGGREGATORS,
    AggregationError,
    UnknownAggregatorError,
    era,
    get_aggregator,
    mean,
    median,
    prob_mean,
    trimmed_mean,
    weighted,
)

A = np.array([[1.0, 2.0, 3.0]])
B = np.array([[3.0, 2.0, 1.0]])


def _scalars(*values):
    """One (1, 1) logit array per client."""
    return [np.array([[v]]) for v in values]


def test_registry_names():
    assert list(AGGREGATORS) == ["mean", "weighted", "prob-mean", "era", "median", "trimmed-mean"]
    assert get_aggregator("trimmed-mean") is trimmed_mean


def test_mean_and_weighted_by_hand():
    np.testing.assert_allclose(mean([A, B], [1, 3]), [[2.0, 2.0, 2.0]])
    # weights 1/4, 3/4: 0.25*A + 0.75*B
    np.testing.assert_allclose(weighted([A, B], [1, 3]), [[2.5, 2.0, 1.5]])


def test_prob_mean_by_hand():
    # client 1: [0, 0] -> p = [1/2, 1/2]; client 2: [ln 3, 0] -> p = [3/4, 1/4]; mean [5/8, 3/8]
    out = prob_mean([np.array([[0.0, 0.0]]), np.array([[math.log(3.0), 0.0]])], [1, 1])
    np.testing.assert_allclose(out, np.log([[0.625, 0.375]]), rtol=1e-6)


def test_era_sharpens_mean_probabilities_by_hand():
    logits = [np.array([[0.0, 0.0]]), np.array([[math.log(3.0), 0.0]])]
    # p_bar = [0.625, 0.375]; softmax(p_bar / 0.1) = softmax([6.25, 3.75]) = [1/(1+e^-2.5), ...]
    p0 = 1.0 / (1.0 + math.exp(-2.5))  # 0.924142
    np.testing.assert_allclose(np.exp(era(logits, [1, 1])), [[p0, 1 - p0]], rtol=1e-6)
    # T = 1: softmax([0.625, 0.375]) -> 1/(1+e^-0.25) = 0.562177
    soft = get_aggregator("era", temperature=1.0)(logits, [1, 1])
    np.testing.assert_allclose(np.exp(soft[0, 0]), 1.0 / (1.0 + math.exp(-0.25)), rtol=1e-6)


def test_median_and_trimmed_mean_by_hand():
    assert median(_scalars(0, 1, 10), [1, 1, 1])[0, 0] == 1.0
    assert median(_scalars(0, 1), [1, 1])[0, 0] == 0.5
    # 5 clients: trim max(1, int(0.5)) = 1 each side -> mean(1, 2, 3)
    assert trimmed_mean(_scalars(0, 1, 2, 3, 100), [1] * 5)[0, 0] == 2.0
    assert trimmed_mean(_scalars(0, 10), [1, 1])[0, 0] == 5.0  # < 3 clients: plain mean
    # 20 clients: trim int(0.1 * 20) = 2 each side
    values = list(range(18)) + [1000, -1000]
    assert trimmed_mean(_scalars(*values), [1] * 20)[0, 0] == pytest.approx(np.mean(range(1, 17)))
    assert get_aggregator("trimmed-mean", trim=0.0)(_scalars(0, 1, 2, 9), [1] * 4)[0, 0] == 3.0


def test_robust_aggregators_resist_one_outlier():
    honest = [np.full((4, 3), v) for v in (1.0, 1.1, 0.9, 1.0, 1.05)]
    uploads = honest + [np.full((4, 3), 1e6)]
    counts = [10] * 6
    assert abs(mean(uploads, counts).max()) > 1e5
    assert abs(median(uploads, counts) - 1.0).max() < 0.1
    assert abs(trimmed_mean(uploads, counts) - 1.0).max() < 0.1


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_shape_dtype_and_finiteness_on_extreme_logits(name):
    rng = np.random.default_rng(0)
    uploads = [rng.normal(size=(7, 5)) * 1e3 for _ in range(4)]
    out = get_aggregator(name)(uploads, [5, 6, 7, 8])
    assert out.shape == (7, 5) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["prob-mean", "era"])
def test_probability_aggregators_return_normalized_log_probs(name):
    rng = np.random.default_rng(1)
    out = get_aggregator(name)([rng.normal(size=(6, 4)) for _ in range(3)], [1, 2, 3])
    np.testing.assert_allclose(np.exp(out.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "logits, counts, expected",
    [
        ([], [], "no client logits"),
        ([A, B], [1], "2 logit arrays but 1 counts"),
        ([A, np.zeros((2, 3))], [1, 1], "client 1's logits have shape"),
        ([A, B], [1, 0], "sample counts must be positive"),
        ([A, np.array([[np.nan, 0.0, 0.0]])], [1, 1], "client 1's logits contain NaN"),
        ([np.zeros(3)], [1], "expected \\(samples, classes\\)"),
    ],
)
def test_input_validation(logits, counts, expected):
    with pytest.raises(AggregationError, match=expected):
        mean(logits, counts)


def test_unknown_name_and_option():
    with pytest.raises(UnknownAggregatorError, match="did you mean 'era'.*valid: mean, weighted"):
        get_aggregator("erra")
    assert issubclass(UnknownAggregatorError, ValueError)
    with pytest.raises(AggregationError, match="takes no option temperature; its options: none"):
        get_aggregator("mean", temperature=0.5)
    with pytest.raises(AggregationError, match="era temperature must be > 0"):
        get_aggregator("era", temperature=0.0)([A], [1])


def test_per_class_counts_let_the_clients_that_know_a_class_decide_it():
    # client A holds only class 0, client B only class 1; for this sample A is unsure and
    # B (who never saw class 0) is confidently wrong about class 1 vs 2
    a = np.array([[1.0, 0.0, 0.0]])
    b = np.array([[0.0, 3.0, 0.0]])
    counts = np.array([[10, 0, 5], [0, 10, 5]])
    w = (counts + agg.CLASS_COUNT_SMOOTHING) / (counts + agg.CLASS_COUNT_SMOOTHING).sum(0)
    expected_logits = w[0] * a[0] + w[1] * b[0]
    np.testing.assert_allclose(agg.weighted([a, b], counts)[0], expected_logits, rtol=1e-6)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()
    p = w[0] * softmax(a[0]) + w[1] * softmax(b[0])
    p /= p.sum()
    np.testing.assert_allclose(np.exp(agg.prob_mean([a, b], counts)[0]), p, rtol=1e-5)
    sharpened = softmax(p / 0.1)
    np.testing.assert_allclose(np.exp(agg.era([a, b], counts)[0]), sharpened, rtol=1e-5)
    # per-client totals keep DS-FL's unweighted probability mean
    plain = (softmax(a[0]) + softmax(b[0])) / 2
    np.testing.assert_allclose(np.exp(agg.prob_mean([a, b], [10, 10])[0]), plain, rtol=1e-5)


def test_bad_per_class_counts_are_explained():
    a = np.zeros((2, 3))
    with pytest.raises(agg.AggregationError, match="per-class counts"):
        agg.era([a, a], np.array([[1, 2], [3, 4]]))
    with pytest.raises(agg.AggregationError, match="per-class counts"):
        agg.era([a, a], np.array([[0, 0, 0], [1, 1, 1]]))

import math

import numpy as np
import pytest

import fededge.learn.aggregate as agg
from fededge.learn.aggregate import (
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


def _binary(*p0):
    """One (1, 2) logit array per client whose softmax is [p, 1 - p]."""
    return [np.log([[p, 1.0 - p]]) for p in p0]


def _p0(out):
    return float(np.exp(out.astype(np.float64))[0, 0])


def test_median_and_trimmed_mean_by_hand():
    # median of p0 (0.2, 0.6, 0.9) = 0.6, of p1 (0.8, 0.4, 0.1) = 0.4; T = 1: softmax([.6, .4])
    flat = {"temperature": 1.0}
    assert _p0(get_aggregator("median", **flat)(_binary(0.2, 0.6, 0.9), [1] * 3)) == \
        pytest.approx(1 / (1 + math.exp(-0.2)), rel=1e-6)
    # the default T = 0.1 sharpens like era: softmax([6, 4])
    assert _p0(median(_binary(0.2, 0.6, 0.9), [1] * 3)) == pytest.approx(1 / (1 + math.exp(-2)))
    # column medians need not sum to 1 and are renormalized: three rotated votes -> uniform
    rotated = [np.log([v]) for v in ([.7, .2, .1], [.1, .7, .2], [.2, .1, .7])]
    np.testing.assert_allclose(np.exp(median(rotated, [1] * 3)), [[1 / 3] * 3], rtol=1e-6)
    # 5 clients, trim 0.2: drop one each side -> mean(0.2, 0.3, 0.4) = 0.3
    out = get_aggregator("trimmed-mean", **flat)(_binary(0.1, 0.2, 0.3, 0.4, 0.99), [1] * 5)
    assert _p0(out) == pytest.approx(1 / (1 + math.exp(0.4)), rel=1e-6)
    # < 3 clients nothing is trimmed; trim 0 is era with equal weights
    uploads = _binary(0.1, 0.8)
    np.testing.assert_allclose(trimmed_mean(uploads, [1, 1]), era(uploads, [1, 1]), rtol=1e-6)
    np.testing.assert_allclose(get_aggregator("trimmed-mean", trim=0.0)(_binary(.1, .2, .9), [1] * 3),
                               era(_binary(.1, .2, .9), [1] * 3), rtol=1e-6)
    with pytest.raises(AggregationError, match="trim must be in"):
        get_aggregator("trimmed-mean", trim=0.5)(uploads, [1, 1])


def test_robust_aggregators_resist_confident_liars():
    # 8 honest clients lean to class 0; 2 liars are certain of class 2 and claim huge counts
    rng = np.random.default_rng(0)
    honest = [np.log([[0.6, 0.3, 0.1]] * 4) + rng.normal(0, 0.05, (4, 3)) for _ in range(8)]
    liars = [np.array([[-50.0, -50.0, 50.0]] * 4)] * 2
    uploads, counts = honest + liars, [10] * 8 + [10_000] * 2
    assert (mean(uploads, counts).argmax(1) == 2).all()
    for robust in (median, trimmed_mean):
        out = robust(uploads, counts)
        assert (out.argmax(1) == 0).all()
        np.testing.assert_allclose(np.exp(out), np.exp(era(honest, [10] * 8)), atol=0.01)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_shape_dtype_and_finiteness_on_extreme_logits(name):
    rng = np.random.default_rng(0)
    uploads = [rng.normal(size=(7, 5)) * 1e3 for _ in range(4)]
    out = get_aggregator(name)(uploads, [5, 6, 7, 8])
    assert out.shape == (7, 5) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("name", ["prob-mean", "era", "median", "trimmed-mean"])
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
    with pytest.raises(AggregationError, match="temperature must be > 0"):
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

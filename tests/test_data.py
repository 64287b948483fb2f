import json

import numpy as np
import pytest

from fededge.learn.data import (
    PARTITIONERS,
    DataError,
    Standardizer,
    load_dataset,
    proxy_fingerprint,
    split_federated,
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset(None)


def _npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _tabular(n=60, f=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, f)).astype(np.float32), np.arange(n) % k


# ------------------------------------------------------------------ built-in datasets


def test_digits_is_images_in_unit_range(digits):
    assert digits.X.shape == (1797, 1, 8, 8) and digits.X.dtype == np.float32
    assert digits.X.min() == 0.0 and digits.X.max() == 1.0
    assert digits.y.dtype == np.int64 and digits.num_classes == 10
    assert digits.input_shape == (1, 8, 8)
    assert digits.class_names == [str(i) for i in range(10)]
    assert load_dataset("digits").X.shape == digits.X.shape


def test_wine_is_tabular():
    ds = load_dataset("wine")
    assert ds.X.shape == (178, 13) and ds.X.dtype == np.float32
    assert ds.num_classes == 3 and ds.input_shape == (13,) and len(ds.class_names) == 3


def test_unknown_spec_lists_choices():
    with pytest.raises(DataError, match="digits, wine or the path of a .npz"):
        load_dataset("mnist")


# ------------------------------------------------------------------ user .npz files


def test_npz_tabular_with_names_and_integer_features(tmp_path):
    X, y = _tabular()
    path = _npz(tmp_path, X=(X * 10).astype(np.int32), y=y, class_names=np.array(["a", "b", "c"]))
    ds = load_dataset(str(path))
    assert ds.name == "data" and ds.X.dtype == np.float32 and ds.input_shape == (4,)
    assert ds.class_names == ["a", "b", "c"] and ds.X_public is None


def test_npz_images_and_whole_float_labels(tmp_path):
    X = np.random.default_rng(0).random((20, 3, 8, 9))
    ds = load_dataset(_npz(tmp_path, X=X, y=(np.arange(20) % 2).astype(np.float64)))
    assert ds.input_shape == (3, 8, 9) and ds.y.dtype == np.int64 and ds.num_classes == 2


def _error(tmp_path, **arrays):
    with pytest.raises(DataError) as info:
        load_dataset(_npz(tmp_path, **arrays))
    return str(info.value)


def test_npz_missing_file_and_not_zip(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.npz")
    fake = tmp_path / "fake.npz"
    fake.write_text("X,y\n1,2\n")
    with pytest.raises(DataError, match="not a .npz archive"):
        load_dataset(fake)


def test_npz_missing_key_lists_found_keys(tmp_path):
    X, y = _tabular()
    message = _error(tmp_path, features=X, y=y)
    assert "missing key(s) X" in message and "found: features, y" in message


def test_npz_refuses_pickled_objects(tmp_path):
    X, y = _tabular()
    message = _error(tmp_path, X=X, y=np.array(list(y), dtype=object))
    assert "no pickled objects" in message


@pytest.mark.parametrize(
    "X, expected",
    [
        (np.zeros((60, 1, 8, 8, 1), np.float32), r"must be 2-D .* 3-D \(samples, channels, length\)"),
        (np.zeros(60, np.float32), "must be 2-D"),
        (np.array(["a"] * 60).reshape(60, 1), "features must be numeric"),
        (np.zeros((60, 2), np.complex64), "features must be numeric"),
    ],
)
def test_npz_bad_features(tmp_path, X, expected):
    with pytest.raises(DataError, match=expected):
        load_dataset(_npz(tmp_path, X=X, y=np.arange(60) % 3))


def test_npz_nonfinite_features_reports_count_and_first_sample(tmp_path):
    X, y = _tabular()
    X[7, 1] = np.nan
    X[9, 0] = np.inf
    X[9, 2] = np.nan
    message = _error(tmp_path, X=X, y=y)
    assert "3 NaN/Inf values" in message and "first in sample 7" in message


@pytest.mark.parametrize(
    "y, expected",
    [
        (np.zeros((60, 1), np.int64), "y.ravel"),
        (np.full(60, 0.5), "not a whole number"),
        (np.array(["cat", "dog"] * 30), "return_inverse"),
        (np.arange(59) % 3, "X has 60 samples but y has 59"),
        (np.arange(60) % 3 + 1, "1-based: save y - 1"),
        (np.arange(60) % 3 * 2, r"found \{0, 2, 4\}"),
        (np.full(60, -1), "every class present"),
        (np.zeros(60, np.int64), "single class"),
    ],
)
def test_npz_bad_labels(tmp_path, y, expected):
    X, _ = _tabular()
    with pytest.raises(DataError, match=expected):
        load_dataset(_npz(tmp_path, X=X, y=y))


def test_npz_public_shape_mismatch_and_bad_class_names(tmp_path):
    X, y = _tabular()
    assert "feature shape (5,) but X has (4,)" in _error(
        tmp_path, X=X, y=y, X_public=np.zeros((10, 5), np.float32)
    )
    assert "3 names" in _error(tmp_path, X=X, y=y, class_names=np.array(["a", "b"]))


def test_npz_public_set_replaces_carved_proxy(tmp_path):
    X, y = _tabular(n=100)
    X_public = np.random.default_rng(1).normal(3.0, 2.0, size=(30, 4)).astype(np.float32)
    sp = split_federated(load_dataset(_npz(tmp_path, X=X, y=y, X_public=X_public)), 4)
    assert np.array_equal(sp.raw_public_X, X_public)
    assert len(sp.test_y) == 20 and sum(len(c) for c in sp.clients) == 80
    np.testing.assert_allclose(sp.preprocessing.mean, X_public.mean(axis=0), rtol=1e-5)


# ------------------------------------------------------------------ standardizer


def test_standardizer_per_channel_and_json_round_trip():
    X = np.random.default_rng(0).normal(5.0, 3.0, size=(50, 2, 4, 4)).astype(np.float32)
    X[:, 1] = 7.0  # a constant channel: std floored, maps to zero
    std = Standardizer.fit(X)
    assert std.kind == "channel" and std.mean.shape == (2,)
    Z = std.apply(X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z[:, 0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(Z[:, 0].std(), 1.0, atol=1e-4)
    assert np.all(Z[:, 1] == 0.0)
    again = Standardizer.from_dict(json.loads(json.dumps(std.to_dict())))
    np.testing.assert_array_equal(again.apply(X), Z)


def test_standardizer_errors():
    X, _ = _tabular()
    std = Standardizer.fit(X, "feature")
    with pytest.raises(DataError, match="cannot apply to X of shape"):
        std.apply(np.zeros((3, 5), np.float32))
    with pytest.raises(DataError, match="does not fit X"):
        Standardizer.fit(X, "channel")
    with pytest.raises(DataError, match="needs kind, mean and std"):
        Standardizer.from_dict({"kind": "feature", "mean": [0.0]})
    with pytest.raises(DataError, match="std > 0"):
        Standardizer.from_dict({"kind": "feature", "mean": [0.0], "std": [0.0]})


# ------------------------------------------------------------------ federated split


def test_split_sizes_standardization_and_fingerprint(digits):
    sp = split_federated(digits, 10, seed=0)
    n_private = sum(len(c) for c in sp.clients)
    assert len(sp.test_y) == 359 and len(sp.public_X) == 539
    assert len(sp.test_y) + len(sp.public_X) + n_private == 1797
    assert np.bincount(sp.test_y, minlength=10).min() >= 35  # stratified
    np.testing.assert_allclose(sp.public_X.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(sp.preprocessing.apply(sp.raw_test_X), sp.test_X)
    assert sp.raw_public_X.min() >= 0.0 and sp.raw_public_X.max() <= 1.0
    assert sp.proxy_sha256 == proxy_fingerprint(sp.raw_public_X)
    assert proxy_fingerprint(sp.raw_public_X.reshape(539, 64)) != sp.proxy_sha256
    assert (sp.num_classes, sp.input_shape) == (10, (1, 8, 8))


def test_split_is_seeded(digits):
    a, b = split_federated(digits, 5, seed=3), split_federated(digits, 5, seed=3)
    c = split_federated(digits, 5, seed=4)
    assert a.proxy_sha256 == b.proxy_sha256 != c.proxy_sha256
    assert all(np.array_equal(p.y, q.y) for p, q in zip(a.clients, b.clients))


def test_split_partitions_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 50)
    for name, kw in [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {})]:
        parts = PARTITIONERS[name](labels, 7, np.random.default_rng(0), **kw)
        merged = np.concatenate(parts)
        assert len(parts) == 7 and np.array_equal(np.sort(merged), np.arange(500)), name


def test_iid_balanced_and_shards_few_classes():
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    sizes = [len(p) for p in PARTITIONERS["iid"](labels, 3, rng)]
    assert max(sizes) - min(sizes) <= 1
    shards = PARTITIONERS["shards"](labels, 10, rng, shards_per_client=2)
    assert all(len(np.unique(labels[p])) <= 2 for p in shards)


def test_dirichlet_skew_and_minimum(digits):
    def classes_per_client(alpha):
        sp = split_federated(digits, 10, alpha=alpha, seed=0)
        assert min(len(c) for c in sp.clients) >= 10
        return np.mean([(c.class_counts(10) > 0).sum() for c in sp.clients])

    assert classes_per_client(0.1) < classes_per_client(100.0) == 10


def test_class_counts(digits):
    client = split_federated(digits, 3, partition="iid").clients[0]
    counts = client.class_counts(10)
    assert counts.shape == (10,) and counts.sum() == len(client)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_clients": 0}, "num_clients must be >= 1"),
        ({"partition": "pathological"}, "valid: iid, dirichlet, shards"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"num_clients": 1000}, "899 private samples cannot be shared among 1000 clients"),
        ({"num_clients": 500}, "needs 2 samples for each of 500 clients"),
        ({"partition": "shards", "num_clients": 500}, "1000 shards"),
        ({"test_fraction": 1.0}, "test_fraction must be in"),
        ({"public_fraction": 0.8}, "public_fraction must be in"),
    ],
)
def test_split_errors(digits, kwargs, expected):
    kwargs = {"num_clients": 10, **kwargs}
    with pytest.raises(DataError, match=expected):
        split_federated(digits, kwargs.pop("num_clients"), **kwargs)


def test_dirichlet_gives_up_with_advice():
    labels = np.repeat(np.arange(2), 20)
    with pytest.raises(DataError, match="raise alpha"):
        PARTITIONERS["dirichlet"](
            labels, 4, np.random.default_rng(0), alpha=0.01, min_samples=9, max_attempts=5
        )


def test_a_3d_npz_is_a_set_of_sequences_standardized_per_channel(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 6, 128)).astype(np.float32) * np.arange(1, 7)[None, :, None]
    path = tmp_path / "windows.npz"
    np.savez(path, X=X, y=np.arange(60) % 3)
    ds = load_dataset(path)
    assert ds.input_shape == (6, 128) and ds.num_classes == 3
    split = split_federated(ds, 2, partition="iid", seed=0)
    assert split.preprocessing.kind == "channel" and split.preprocessing.mean.shape == (6,)
    per_channel = split.public_X.std(axis=(0, 2))
    np.testing.assert_allclose(per_channel, np.ones(6), atol=1e-3)

"""Datasets, the public proxy split and federated partitioners.

Everything here is pure and seeded: the same dataset, arguments and seed always give the same
split, so every party of a federation can derive the same proxy set (and the same SHA-256 of it)
without exchanging data. Nothing here touches the network.

Shapes: image inputs are (N, C, H, W) float32, tabular inputs (N, F) float32; labels are int64
class indices 0..C-1 with every class present.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fededge.errors import FedEdgeError
from fededge.learn.zoo import estimate_cost, zoo_for

BUILTIN_DATASETS = ("digits", "wine")
STD_FLOOR = 1e-6
"""Standard deviations are floored here so constant features (e.g. digits' blank border
pixels) map to 0 instead of dividing by zero."""


class DataError(FedEdgeError, ValueError):
    """A dataset, its file or a split request is unusable; the message names the fix."""


# --------------------------------------------------------------------------------------------
# Datasets


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset in raw (unstandardized) form.

    `X_public`, when present, is a proxy set shipped with the data (unlabelled inputs every party
    holds); otherwise `split_federated` carves the proxy set out of `X`.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    X_public: np.ndarray | None
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]


def load_dataset(spec: str | os.PathLike[str] | None = None) -> Dataset:
    """Load `None`/"digits" (sklearn digits as (N,1,8,8) in [0,1]), "wine" (sklearn wine,
    (N,13) tabular) or a user `.npz` file (keys `X`, `y`, optional `X_public`, `class_names`)."""
    if spec is None or str(spec) == "digits":
        return _digits()
    if str(spec) == "wine":
        return _wine()
    if str(spec).endswith(".npz"):
        return _load_npz(Path(spec))
    raise DataError(
        f"unknown dataset {str(spec)!r}: use one of {', '.join(BUILTIN_DATASETS)} "
        "or the path of a .npz file (keys X, y, optional X_public and class_names)"
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return Dataset("digits", X, y, None, 10, (1, 8, 8), [str(i) for i in range(10)])


def _wine() -> Dataset:
    from sklearn.datasets import load_wine

    bunch = load_wine()
    X = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    names = [str(n) for n in bunch.target_names]
    return Dataset("wine", X, y, None, len(names), (X.shape[1],), names)


def _load_npz(path: Path) -> Dataset:
    arrays = _read_npz(path)
    X = _check_features(path, "X", arrays["X"])
    _check_supported(path, X.shape[1:])
    y = _check_labels(path, arrays["y"], len(X))
    num_classes = int(y.max()) + 1
    X_public = None
    if "X_public" in arrays:
        X_public = _check_features(path, "X_public", arrays["X_public"])
        if X_public.shape[1:] != X.shape[1:]:
            raise DataError(
                f"{path}: X_public has feature shape {X_public.shape[1:]} but X has "
                f"{X.shape[1:]}; the proxy set must describe the same inputs as X"
            )
    class_names = _check_class_names(path, arrays.get("class_names"), num_classes)
    return Dataset(path.stem, X, y, X_public, num_classes, tuple(X.shape[1:]), class_names)


def load_private_npz(path: str | os.PathLike[str], input_shape: tuple[int, ...],
                     num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's own labelled ``.npz`` (keys X, y), raw, checked like a dataset file but
    against the federation's input shape and classes (any subset of them)."""
    path = Path(path)
    arrays = _read_npz(path)
    X = _check_features(path, "X", arrays["X"])
    if tuple(X.shape[1:]) != tuple(input_shape):
        raise DataError(f"{path}: X has shape {X.shape}; the federation needs "
                        f"(N, {', '.join(map(str, input_shape))}) inputs")
    return X, _check_labels(path, arrays["y"], len(X), num_classes)


MAX_ARRAY_BYTES = 4 * 1024**3
"""The largest array a ``.npz`` member may hold (4 GiB): a header may claim any shape, and numpy
allocates what it claims before reading a byte."""
NPZ_KEYS = ("X", "y", "X_public", "class_names")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Read the known keys; never unpickles, and checks every member's ``.npy`` header (magic,
    dtype, shape against the member's size) before numpy allocates anything."""
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of an existing .npz file")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path}: not a .npz archive; save your arrays with numpy.savez(path, X=X, y=y)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()
                       if info.filename.endswith(".npy")}
            for key in NPZ_KEYS:
                if key in members:
                    _check_member(path, archive, members[key])
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            arrays = {k: npz[k] for k in NPZ_KEYS if k in keys}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise DataError(
            f"{path}: cannot read arrays ({str(exc)[:200]}); fededge loads no pickled objects, "
            "so store X, y and X_public as numeric arrays and class_names as a string array"
        ) from None
    missing = [k for k in ("X", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {', '.join(missing)} (found: {', '.join(keys) or 'none'}); "
            "save with numpy.savez(path, X=X, y=y)"
        )
    return arrays


def _check_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """A member ``K.npy`` is a real ``.npy`` whose header's shape and dtype account for exactly
    the member's size, within ``MAX_ARRAY_BYTES``, and holds no objects."""
    name = info.filename
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as exc:  # numpy's header parser raises many kinds (TokenError...)
            raise DataError(f"{path}: member {name} is not a .npy array ({str(exc)[:120]}); "
                            "save with numpy.savez(path, X=X, y=y)") from None
        header = member.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: member {name} holds Python objects (dtype {dtype}); fededge "
                        "loads no pickled objects: store numbers and strings only")
    count = 1
    for side in shape:
        count *= side
    data = count * dtype.itemsize
    if data > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: member {name} claims shape {shape} of {dtype} ({data:,} bytes)"
                        f", more than fededge loads ({MAX_ARRAY_BYTES:,} bytes)")
    if header + data != info.file_size:
        raise DataError(f"{path}: member {name} claims shape {shape} of {dtype} ({data:,} bytes)"
                        f" but holds {info.file_size - header:,}; the file is truncated or "
                        "forged: save it again with numpy.savez")


def _check_supported(path: Path, shape: tuple[int, ...]) -> None:
    """Inputs some student of the zoo can take; the zoo's own error names the smallest."""
    try:
        estimate_cost(zoo_for(shape)[0], shape, 2)
    except ValueError as exc:
        raise DataError(f"{path}: X has samples of shape {tuple(shape)}, which no student "
                        f"takes: {exc}") from None


def _check_features(path: Path, key: str, X: np.ndarray) -> np.ndarray:
    """Return `X` as float32 after checking dtype, rank and finiteness."""
    if X.dtype.kind not in "fiub":
        raise DataError(
            f"{path}: {key} has dtype {X.dtype}; features must be numeric, "
            f"save {key}.astype(numpy.float32)"
        )
    if X.ndim not in (2, 3, 4):
        raise DataError(
            f"{path}: {key} has shape {X.shape}; it must be 2-D (samples, features), 3-D "
            "(samples, channels, length) or 4-D (samples, channels, height, width)"
        )
    if len(X) == 0:
        raise DataError(f"{path}: {key} has no samples")
    with np.errstate(over="ignore"):
        X = X.astype(np.float32)
    bad = ~np.isfinite(X)
    if bad.any():
        first = int(np.flatnonzero(bad.reshape(len(X), -1).any(axis=1))[0])
        raise DataError(
            f"{path}: {key} has {int(bad.sum())} NaN/Inf values as float32 (first in sample "
            f"{first}); impute or drop those samples (|values| above 3.4e38 overflow float32)"
        )
    return X


def _check_labels(path: Path, y: np.ndarray, n: int, num_classes: int | None = None) -> np.ndarray:
    """Return `y` as int64 class indices 0..C-1. A dataset (``num_classes`` None) must hold every
    class and at least 2; a device's private data (non-IID devices are the norm) may lack
    classes, so its labels need only lie in 0..num_classes-1."""
    if y.ndim != 1:
        raise DataError(
            f"{path}: y has shape {y.shape}; labels must be 1-D class indices "
            "(for one-hot labels save y.argmax(axis=1), for a column save y.ravel())"
        )
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            first = int(np.flatnonzero(~whole)[0])
            raise DataError(
                f"{path}: y[{first}] = {y[first]} is not a whole number; labels must be "
                "integer class indices 0..C-1"
            )
    elif y.dtype.kind not in "iub":
        raise DataError(
            f"{path}: y has dtype {y.dtype}; labels must be integer class indices. Map names "
            "to indices with numpy.unique(y, return_inverse=True) and save the names as class_names"
        )
    if len(y) != n:
        raise DataError(f"{path}: X has {n} samples but y has {len(y)}; they must match")
    y = y.astype(np.int64)
    if num_classes is not None:
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{path}: labels must be integers 0..{num_classes - 1} (the "
                            f"federation's classes); found {int(y.min())}..{int(y.max())}")
        return y
    found = np.unique(y)
    if found[0] != 0 or found[-1] != len(found) - 1:
        raise DataError(f"{path}: {_label_advice(found)}")
    if len(found) < 2:
        raise DataError(f"{path}: y has a single class (0); classification needs at least 2")
    return y


def _label_advice(found: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in found[:20]) + (", ..." if len(found) > 20 else "")
    message = f"labels must be 0..C-1 with every class present; found {{{shown}}}"
    if found[0] == 1 and found[-1] == len(found):
        return message + "; they look 1-based: save y - 1"
    return message + "; remap with numpy.unique(y, return_inverse=True)[1]"


def _check_class_names(path: Path, names: np.ndarray | None, num_classes: int) -> list[str]:
    if names is None:
        return [str(i) for i in range(num_classes)]
    if names.ndim != 1 or names.dtype.kind not in "US" or len(names) != num_classes:
        raise DataError(
            f"{path}: class_names must be a 1-D string array of {num_classes} names "
            f"(one per class); got dtype {names.dtype}, shape {names.shape}"
        )
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]


# --------------------------------------------------------------------------------------------
# Standardization


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-channel (images) or per-feature (tabular) standardization.

    Statistics come from the public proxy set only: every party holds that set, so every party
    (and the exported ONNX bundle) derives the same preprocessing without seeing private data.
    """

    mean: np.ndarray
    std: np.ndarray
    kind: str  # "channel" for (N,C,H,W) and (N,C,L) inputs, "feature" for (N,F) inputs

    @classmethod
    def fit(cls, X: np.ndarray, kind: str | None = None) -> Standardizer:
        """Fit on `X`; `kind` defaults to what the rank of `X` implies and must agree with it."""
        implied = _kind_for(X)
        if kind is not None and kind != implied:
            raise DataError(f"Standardizer kind {kind!r} does not fit X of shape {X.shape}")
        axes = (0, *range(2, X.ndim))
        mean = X.mean(axis=axes, dtype=np.float64)
        std = np.maximum(X.std(axis=axes, dtype=np.float64), STD_FLOOR)
        return cls(mean.astype(np.float32), std.astype(np.float32), implied)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Standardize `X` (same layout as the fitting data) and return float32."""
        if _kind_for(X) != self.kind or X.shape[1] != len(self.mean):
            raise DataError(
                f"Standardizer fitted per {self.kind} on {len(self.mean)} "
                f"{self.kind}s cannot apply to X of shape {X.shape}"
            )
        shape = (1, -1) + (1,) * (X.ndim - 2)
        out = (X - self.mean.reshape(shape)) / self.std.reshape(shape)
        return out.astype(np.float32, copy=False)

    def to_dict(self) -> dict[str, object]:
        """JSON-serializable form (for the federation config and the model manifest)."""
        return {"kind": self.kind, "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Standardizer:
        """Inverse of `to_dict`, validating the fields."""
        try:
            kind = d["kind"]
            mean = np.asarray(d["mean"], dtype=np.float32)
            std = np.asarray(d["std"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"standardizer dict needs kind, mean and std (numeric lists): {exc}"
            ) from exc
        if kind not in ("channel", "feature"):
            raise DataError(f"standardizer kind must be 'channel' or 'feature', got {kind!r}")
        if mean.ndim != 1 or mean.shape != std.shape or not (std > 0).all():
            raise DataError(
                "standardizer mean and std must be equal-length lists with std > 0 "
                f"(got {mean.shape} and {std.shape})"
            )
        return cls(mean, std, str(kind))


def _kind_for(X: np.ndarray) -> str:
    if X.ndim in (3, 4):
        return "channel"
    if X.ndim == 2:
        return "feature"
    raise DataError(f"expected (N,C,H,W) images, (N,C,L) sequences or (N,F) features, got "
                    f"shape {X.shape}")


def proxy_fingerprint(X: np.ndarray) -> str:
    """SHA-256 hex identifying a raw proxy array across machines.

    Hashed bytes: ASCII ``"<f4:" + ",".join(shape) + "\\n"`` followed by the array as
    little-endian float32 in C order. The shape is included so a reshaped array with the same
    bytes does not collide.
    """
    arr = np.ascontiguousarray(X, dtype="<f4")
    digest = hashlib.sha256(("<f4:" + ",".join(map(str, arr.shape)) + "\n").encode("ascii"))
    digest.update(arr.tobytes(order="C"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Partitioners: (labels, num_clients, rng, **kw) -> one index array (into labels) per client


def partition_iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniformly random, equal-size (±1) parts."""
    parts = np.array_split(rng.permutation(len(labels)), num_clients)
    return [np.sort(p) for p in parts]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_samples: int | None = None,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is spread over clients by proportions ~ Dirichlet(alpha).

    Small alpha means each client sees few classes. Draws repeat until every client holds at
    least `min_samples` (default: 2 up to 10, at most half a fair share) so no client is left
    with nothing to train on or an uninformative sample count.
    """
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0 (got {alpha}); try 0.5, larger is more iid")
    n = len(labels)
    if min_samples is None:
        min_samples = max(2, min(10, n // (2 * num_clients)))
    if n < min_samples * num_clients:
        raise DataError(
            f"dirichlet partition needs {min_samples} samples for each of {num_clients} clients "
            f"but only {n} private samples exist; use fewer clients or partition='iid'"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_attempts):
        parts = _dirichlet_draw(by_class, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise DataError(
        f"dirichlet partition (alpha={alpha}) left a client with fewer than {min_samples} "
        f"samples in {max_attempts} draws; raise alpha, use fewer clients or partition='iid'"
    )


def _dirichlet_draw(
    by_class: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members in by_class:
        members = rng.permutation(members)
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, piece in zip(chunks, np.split(members, cuts)):
            client.append(piece)
    return [np.sort(np.concatenate(c)) for c in chunks]


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into equal shards, give each
    client `shards_per_client` random shards (so each client sees about that many classes)."""
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be >= 1 (got {shards_per_client})")
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise DataError(
            f"shards partition needs {num_shards} shards ({num_clients} clients x "
            f"{shards_per_client}) but only {len(labels)} private samples exist; "
            "lower shards_per_client or use fewer clients"
        )
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]  # by label, random within a label
    shards = np.array_split(order, num_shards)
    owners = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in owners]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": partition_iid,
    "dirichlet": partition_dirichlet,
    "shards": partition_shards,
}


# --------------------------------------------------------------------------------------------
# The federated split


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's private (standardized) samples."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def class_counts(self, num_classes: int) -> np.ndarray:
        """Samples per class, length `num_classes` (zeros included)."""
        return np.bincount(self.y, minlength=num_classes)


@dataclass(frozen=True, eq=False)
class FederatedSplit:
    """Test set, public proxy set and private client sets, standardized with `preprocessing`.

    `raw_test_X` / `raw_public_X` are the unstandardized arrays, kept for ONNX export (whose
    bundle applies `preprocessing` itself) and for `proxy_sha256`, the `proxy_fingerprint` of
    `raw_public_X`.
    """

    test_X: np.ndarray
    test_y: np.ndarray
    public_X: np.ndarray
    clients: list[ClientData]
    preprocessing: Standardizer
    proxy_sha256: str
    num_classes: int
    input_shape: tuple[int, ...]
    class_names: list[str]
    raw_test_X: np.ndarray
    raw_public_X: np.ndarray


def split_federated(
    ds: Dataset,
    num_clients: int,
    *,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    public_fraction: float = 0.3,
    shards_per_client: int = 2,
) -> FederatedSplit:
    """Split `ds` into a stratified test set, a public proxy set and `num_clients` private sets.

    Fractions are of the whole dataset. If `ds.X_public` exists it is the proxy set and
    `public_fraction` is ignored: everything outside the test set is private. `alpha` applies to
    the dirichlet partition, `shards_per_client` to shards.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1 (got {num_clients})")
    if partition not in PARTITIONERS:
        raise DataError(f"unknown partition {partition!r}; valid: {', '.join(PARTITIONERS)}")
    _check_fractions(test_fraction, public_fraction, ds.X_public is not None)
    rng = np.random.default_rng(seed)

    test_idx, rest = _stratified_split(ds.y, np.arange(len(ds.y)), test_fraction, rng)
    if ds.X_public is None:
        public_share = public_fraction / (1.0 - test_fraction)
        public_idx, private_idx = _stratified_split(ds.y[rest], rest, public_share, rng)
        raw_public = ds.X[public_idx]
    else:
        raw_public, private_idx = ds.X_public, rest
    _check_nonempty(ds, test_idx, raw_public, private_idx, num_clients)

    options = {"dirichlet": {"alpha": alpha}, "shards": {"shards_per_client": shards_per_client}}
    partitioner = PARTITIONERS[partition]
    parts = partitioner(ds.y[private_idx], num_clients, rng, **options.get(partition, {}))

    std = Standardizer.fit(raw_public)
    clients = [ClientData(std.apply(ds.X[private_idx[p]]), ds.y[private_idx[p]]) for p in parts]
    raw_test = ds.X[test_idx]
    return FederatedSplit(
        test_X=std.apply(raw_test),
        test_y=ds.y[test_idx],
        public_X=std.apply(raw_public),
        clients=clients,
        preprocessing=std,
        proxy_sha256=proxy_fingerprint(raw_public),
        num_classes=ds.num_classes,
        input_shape=ds.input_shape,
        class_names=list(ds.class_names),
        raw_test_X=raw_test,
        raw_public_X=np.ascontiguousarray(raw_public, dtype=np.float32),
    )


def _check_fractions(test_fraction: float, public_fraction: float, has_public: bool) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1) (got {test_fraction}); try 0.2")
    if has_public:
        return
    if not 0.0 < public_fraction < 1.0 - test_fraction:
        raise DataError(
            f"public_fraction must be in (0, 1 - test_fraction) = (0, {1 - test_fraction:g}) "
            f"(got {public_fraction}); try 0.3"
        )


def _check_nonempty(
    ds: Dataset,
    test_idx: np.ndarray,
    raw_public: np.ndarray,
    private_idx: np.ndarray,
    num_clients: int,
) -> None:
    n = len(ds.y)
    if len(test_idx) == 0 or len(raw_public) == 0:
        raise DataError(
            f"{ds.name}: {n} samples are too few for a non-empty test and proxy set; "
            "raise test_fraction / public_fraction or use more data"
        )
    if len(private_idx) < num_clients:
        raise DataError(
            f"{ds.name}: {len(private_idx)} private samples cannot be shared among "
            f"{num_clients} clients; use at most {len(private_idx)} clients or more data"
        )


def _stratified_split(
    y: np.ndarray, index: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Pick round(fraction * len(y)) entries of `index`, per class in proportion to its size
    (largest remainders get the leftovers). Returns (picked, rest), each sorted."""
    classes, counts = np.unique(y, return_counts=True)
    quotas = fraction * counts
    take = np.floor(quotas).astype(int)
    leftover = int(round(fraction * len(y))) - int(take.sum())
    take[np.argsort(-(quotas - take), kind="stable")[:leftover]] += 1
    picked = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[picked] = True
    return index[mask], index[~mask]

"""The hard synthetic sets: deterministic, the digits' labels kept, really harder than digits."""

from __future__ import annotations

import numpy as np
import pytest

from fededge.learn.data import load_dataset
from fededge.learn.synthetic import PRESETS, make_hard


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_seeded_images_of_the_digits_labels(preset):
    X, y = make_hard(preset, seed=3, count=60)
    again, _ = make_hard(preset, seed=3, count=60)
    other, _ = make_hard(preset, seed=4, count=60)
    p = PRESETS[preset]
    assert X.shape == (60 * p.renders, p.channels, p.size, p.size) and X.dtype == np.float32
    assert 0.0 <= X.min() and X.max() <= 1.0
    assert np.array_equal(X, again) and not np.array_equal(X, other)
    assert np.array_equal(y, np.tile(load_dataset("digits").y[:60], p.renders))


def test_a_saved_set_loads_through_the_ordinary_npz_path(tmp_path):
    X, y = make_hard("hard32", seed=0, count=200)
    np.savez_compressed(tmp_path / "hard32.npz", X=X, y=y)
    dataset = load_dataset(str(tmp_path / "hard32.npz"))
    assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10

"""Suite-wide settings and shared fixtures."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one thread; more intra-op threads only thrash on a shared
    2-core machine (a distill epoch went from 0.1 s to 0.7 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_iid():
    """Digits split for one client: test, proxy and the private pool, for model-level tests."""
    from fededge.learn.data import load_dataset, split_federated

    return split_federated(load_dataset("digits"), 1, partition="iid", seed=0)

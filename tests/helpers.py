"""Shared builders for federation tests: a small digits split and in-process clients."""

from __future__ import annotations

import numpy as np
import torch

from fededge.client import DeviceIdentity, FederationClient, LocalData
from fededge.config import FederationConfig
from fededge.data import load_dataset, split_federated
from fededge.models import build_student
from fededge.trainer import Trainer

STUDENTS = ("cnn-xs", "cnn-s", "cnn-m")


def small_split(num_clients: int = 3, seed: int = 0):
    return split_federated(load_dataset("digits"), num_clients, partition="dirichlet",
                           alpha=0.5, seed=seed)


def small_config(split, **changes) -> FederationConfig:
    base = dict(rounds=3, num_classes=split.num_classes, input_shape=tuple(split.input_shape),
                proxy_sha256=split.proxy_sha256, proxy_size=len(split.public_X),
                warmup_epochs=10, distill_epochs=2, revisit_epochs=1, deadline_s=30.0)
    return FederationConfig(**{**base, **changes})


def make_client(transport, split, index: int, federation: str = "demo",
                student: str | None = None, checkpoint_dir=None) -> FederationClient:
    student = student or STUDENTS[index % len(STUDENTS)]
    torch.manual_seed(index)
    model = build_student(student, split.input_shape, split.num_classes)
    params = sum(p.numel() for p in model.parameters())
    data = split.clients[index]
    local = LocalData(data.X, data.y, split.public_X, split.proxy_sha256, split.test_X,
                      split.test_y)
    return FederationClient(transport, federation,
                            DeviceIdentity(f"dev{index}", "test-profile", student, params),
                            Trainer(model, seed=index), local, checkpoint_dir=checkpoint_dir)


def local_only_accuracy(split, index: int, epochs: int) -> float:
    """The same student trained on its private data alone, for comparison."""
    torch.manual_seed(index)
    model = build_student(STUDENTS[index % len(STUDENTS)], split.input_shape, split.num_classes)
    trainer = Trainer(model, seed=index)
    data = split.clients[index]
    trainer.fit(data.X, data.y, epochs=epochs)
    return trainer.accuracy(split.test_X, split.test_y)


def mean(values) -> float:
    return float(np.mean(list(values)))

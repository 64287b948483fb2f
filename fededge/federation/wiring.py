"""The one place a server or a device is assembled from its parts: strategy, store, trainer,
transport. ``fededge simulate``, a kit's ``fededge server`` / ``fededge client``, the
multi-process fleet and the tests all build their parties here, so they run the same thing.

Torch is imported only by the functions that build a trainer (and by a server strategy that
trains a model itself, ``feddf``): a fedmd or fedavg server is assembled without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fededge import __version__
from fededge.config import MAX_PAYLOAD, FederationConfig
from fededge.federation.server import FederationServer, ServerEvents
from fededge.federation.store import Store
from fededge.federation.strategies import strategy_pair
from fededge.federation.strategies.base import NewLearner, ServerStrategy
from fededge.transport.base import Transport

if TYPE_CHECKING:
    from fededge.federation.client import DeviceIdentity, FederationClient, LocalData
    from fededge.learn.data import FederatedSplit
    from fededge.learn.trainer import Trainer


def learner_factory(config: FederationConfig) -> NewLearner:
    """``new_learner(student, seed)`` for the federation's inputs and optimizer settings."""
    from fededge.learn.trainer import seeded_trainer

    def new_learner(student: str, seed: int) -> Trainer:
        return seeded_trainer(student, config.input_shape, config.num_classes, seed=seed,
                              lr=config.lr, batch_size=config.batch_size)
    return new_learner


def server_strategy(config: FederationConfig,
                    public_X: np.ndarray | None = None) -> ServerStrategy:
    """The server half of the config's strategy; one that computes at the server (``feddf``)
    gets the proxy set and a model factory. Raises the strategy's errors before any work."""
    server_cls = strategy_pair(config.strategy)[0]
    if not server_cls.needs_proxy:
        return server_cls(config)
    return server_cls(config, public_X=public_X, new_learner=learner_factory(config))


def build_server(transport: Transport, config: FederationConfig, *, expected_clients: int,
                 store: Store | None = None, context: dict[str, Any] | None = None,
                 public_X: np.ndarray | None = None, strategy: ServerStrategy | None = None,
                 join_timeout: float = 120.0, events: ServerEvents | None = None,
                 max_payload: int = MAX_PAYLOAD,
                 model_meta: dict[str, Any] | None = None) -> FederationServer:
    """A federation server on ``transport``; ``store`` holds what a restart resumes from,
    ``model_meta`` what collected students' metadata carries (``checkpoint_meta``)."""
    return FederationServer(transport, config, strategy or server_strategy(config, public_X),
                            expected_clients=expected_clients, store=store, context=context,
                            join_timeout=join_timeout, events=events, max_payload=max_payload,
                            model_meta=model_meta)


def open_store(directory: Path) -> Store:
    """A server state directory: a finished run there is replaced by a fresh one, an
    unfinished one is resumed."""
    store = Store(directory)
    if store.finished:
        store.close()
        Store.wipe(directory)
        store = Store(directory)
    return store


def student_trainer(student: str, input_shape: tuple[int, ...], num_classes: int,
                    config: FederationConfig, seed: int) -> Trainer:
    """A device's freshly initialised student and its trainer; ``seed`` fixes the weights."""
    import torch

    from fededge.learn.models import build_student
    from fededge.learn.trainer import Trainer

    torch.manual_seed(seed)
    model = build_student(student, input_shape, num_classes)
    return Trainer(model, lr=config.lr, batch_size=config.batch_size, seed=seed)


def checkpoint_meta(split: FederatedSplit, dataset: str) -> dict[str, Any]:
    """What ``fededge export`` needs beside a checkpoint to rebuild and package the student."""
    return {"input_shape": list(split.input_shape), "num_classes": split.num_classes,
            "class_names": list(split.class_names),
            "preprocessing": split.preprocessing.to_dict(), "dataset": dataset,
            "fededge_version": __version__}


def build_client(transport: Transport, config: FederationConfig, identity: DeviceIdentity,
                 data: LocalData, *, seed: int, checkpoint_dir: Path | None = None,
                 checkpoint_meta: dict[str, Any] | None = None,
                 slowdown: float = 0.0) -> FederationClient:
    """Device ``identity`` on ``transport`` with a fresh student (weights from ``seed``,
    optimizer settings from ``config``), not started yet (``.start()``)."""
    from fededge.federation.client import FederationClient

    trainer = student_trainer(identity.student, config.input_shape, config.num_classes, config,
                              seed)
    return FederationClient(transport, config.federation, identity, trainer, data,
                            checkpoint_dir=checkpoint_dir, checkpoint_meta=checkpoint_meta,
                            slowdown=slowdown)

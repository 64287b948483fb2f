"""Model weights as one flat float32 vector: what the weight-averaging strategies exchange.

A flat vector (parameters in ``model.parameters()`` order) is one safetensors tensor whose
length alone says whether it fits an architecture, and averaging it is one numpy expression.
The students have no buffers (no BatchNorm, see ``models.py``), so the parameters are the
whole model.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fededge.learn.models import build_student

# torch's global RNG is process-wide; simulated devices warm up concurrently, so seeding it and
# building a model must not interleave between threads.
_INIT_LOCK = threading.Lock()


def flat_weights(model: nn.Module) -> np.ndarray:
    """A copy of the model's parameters as one float32 vector."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def load_flat_weights(model: nn.Module, flat: np.ndarray) -> None:
    """Copy a ``flat_weights`` vector into the model in place (optimizer state stays bound)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if flat.shape != (total,):
        raise ValueError(f"weight vector of shape {flat.shape} does not fit a model with "
                         f"{total} parameters")
    source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(source[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def initial_model(name: str, input_shape: Sequence[int], classes: int, seed: int) -> nn.Module:
    """Student ``name`` initialised from ``seed`` alone, so every device builds the same one
    without the weights crossing the network; torch's global RNG is left as it was."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_student(name, input_shape, classes)

"""fededge: federated knowledge distillation for heterogeneous edge devices over MQTT.

From Python: ``fededge.simulate(...)``, ``fededge.export(...)``, ``fededge.distill(...)`` and
``fededge.load_model(...)`` (see ``fededge.api``). They are loaded on first use, so ``import fededge`` stays light and
torch-free: the edge agent imports this package on devices that have no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = ("simulate", "export", "distill", "load_model")
__all__ = ["__version__", *API]

def __getattr__(name: str) -> Any:
    """The API on first use. Imported by name, not by an import statement: fededge's own
    modules import this package (for ``__version__``), and the layer contracts must not read
    that as their importing the whole training side."""
    if name in API:
        return getattr(importlib.import_module("fededge.api"), name)
    raise AttributeError(f"module 'fededge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))

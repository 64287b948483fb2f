"""A device's checkpoints: the exportable student and the resume state, both safetensors (no
pickle), both replaced atomically so a crash mid-write leaves the previous round's files.

- ``student.safetensors`` + ``student.json``: the weights and what ``fededge export`` needs to
  rebuild and package the student (profile, student, input shape, preprocessing, accuracy).
- ``state.safetensors``: the whole trainer (weights, Adam state, shuffling RNG) with the run id,
  round and byte counters, so a restarted device continues exactly where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fededge.files import atomic_write
from fededge.learn.trainer import Trainer

STUDENT_WEIGHTS, STUDENT_META = "student.safetensors", "student.json"
STATE_FILE = "state.safetensors"
"""The resume checkpoint: trainer tensors plus JSON metadata (run, round, byte counters)."""


def save_student(model: torch.nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """The exportable student: its weights, then its metadata (``fededge export`` reads both)."""
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / STUDENT_WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    atomic_write(directory / STUDENT_META, json.dumps(meta, indent=2))


def save_trainer_state(trainer: Trainer, path: Path, meta: dict[str, Any]) -> None:
    """Trainer state as safetensors (no pickle): ``model.*`` weights, ``optim.<param>.<key>``
    Adam tensors and the ``rng`` bytes; Adam's hyperparameters and ``meta`` go in the JSON
    metadata."""
    state = trainer.state_dict()
    tensors = {f"model.{k}": v.contiguous() for k, v in state["model"].items()}
    for index, per_param in state["optimizer"]["state"].items():
        tensors.update({f"optim.{index}.{key}": value for key, value in per_param.items()})
    tensors["rng"] = state["generator"]
    header = {"param_groups": state["optimizer"]["param_groups"], "meta": meta}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp),
                                             metadata={"json": json.dumps(header)}))


def load_trainer_state(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``Trainer.state_dict()``-shaped state, meta) from ``save_trainer_state``'s file."""
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()["json"])
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            optim.setdefault(int(index), {})[key] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g
              for g in header["param_groups"]]
    state = {"model": model, "optimizer": {"state": optim, "param_groups": groups},
             "generator": tensors["rng"]}
    return state, header["meta"]

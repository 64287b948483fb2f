"""Students of your own: a Python file whose ``students(input_shape, num_classes)`` returns
``{name: torch module}``, checked, measured and made pickable beside the built-in zoo.

fededge does not take a zoo file's word for anything: it runs each module on a batch of two
zero samples and checks the output is (2, num_classes) logits, exports it to ONNX the way
``fededge export`` does (legacy exporter, dynamic batch) and runs the export in onnxruntime,
and measures parameters, FLOPs and activation memory by tracing one sample
(``learn.models.trace``). A module that fails is refused with one line naming it and, where
one is to blame, its layer. The measured figures are registered with ``learn.zoo`` (so the
torch-free picking ranks them by the same budgets) and a builder with ``learn.models`` (so
every device, the export and the checkpoints build the same module by name).

The file is imported as Python: it runs with the user's rights, like any script they run.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from fededge.errors import FedEdgeError
from fededge.learn import models, zoo
from fededge.learn.arch import Measure
from fededge.names import ID_RULE, is_id

ENTRY_POINT = "students"
_ONNX_ATOL = 1e-4


class UserZooError(FedEdgeError, ValueError):
    """A zoo file, or one of its modules, that fededge cannot use; the message names it."""


@dataclass(frozen=True)
class UserStudent:
    """One checked module of a zoo file, with its traced per-sample figures."""

    name: str
    figures: Measure
    path: Path


def load_user_zoo(path: str | Path, input_shape: tuple[int, ...],
                  num_classes: int) -> list[UserStudent]:
    """Import ``path``, check and measure every module ``students(input_shape, num_classes)``
    returns, and register them for picking and building; returns them, smallest first.
    Loading the same file again for the same inputs re-checks and re-registers it."""
    path = Path(path)
    shape = tuple(int(d) for d in input_shape)
    students_fn = _entry_point(_import(path), path)
    modules = _call(students_fn, path, shape, num_classes)
    loaded = []
    for name, module in modules.items():
        _check_output(path, name, module, shape, num_classes)
        _check_onnx(path, name, module, shape)
        figures = models.trace(module, shape)
        try:
            zoo.register_measured(name, shape, num_classes, figures)
        except (zoo.UnknownStudentError, ValueError) as exc:
            raise UserZooError(f"{path}: student {name!r}: {exc}") from None
        models.register_user_builder(name, _builder(students_fn, path, name))
        loaded.append(UserStudent(name, figures, path))
    return sorted(loaded, key=lambda s: s.figures.params)


def _import(path: Path) -> ModuleType:
    if not path.is_file():
        raise UserZooError(f"{path}: no such zoo file; pass a Python file that defines "
                           f"{ENTRY_POINT}(input_shape, num_classes)")
    module_name = f"fededge_user_zoo_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserZooError(f"{path}: not importable as Python; give the zoo file a .py name")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - whatever the user's code raises, said in one line
        sys.modules.pop(module_name, None)
        raise UserZooError(f"{path}: importing the zoo file failed: {_one_line(exc)}") from None
    return module


def _entry_point(module: ModuleType, path: Path) -> Callable[..., object]:
    students_fn = getattr(module, ENTRY_POINT, None)
    if not callable(students_fn):
        raise UserZooError(f"{path}: defines no function {ENTRY_POINT}(input_shape, "
                           "num_classes) returning {name: torch.nn.Module}")
    return students_fn


def _call(students_fn: Callable[..., object], path: Path, shape: tuple[int, ...],
          num_classes: int) -> dict[str, nn.Module]:
    try:
        modules = students_fn(shape, num_classes)
    except Exception as exc:  # noqa: BLE001
        raise UserZooError(f"{path}: {ENTRY_POINT}({shape}, {num_classes}) failed: "
                           f"{_one_line(exc)}") from None
    if not isinstance(modules, dict) or not modules:
        raise UserZooError(f"{path}: {ENTRY_POINT}() must return a non-empty dict "
                           f"{{name: torch.nn.Module}}, got {type(modules).__name__}")
    for name, module in modules.items():
        if not is_id(name):
            raise UserZooError(f"{path}: student name {name!r} must be {ID_RULE}")
        if not isinstance(module, nn.Module):
            raise UserZooError(f"{path}: student {name!r} is a {type(module).__name__}, not a "
                               "torch.nn.Module")
    return modules


def _builder(students_fn: Callable[..., object], path: Path,
             name: str) -> models.UserBuilder:
    def build(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return _call(students_fn, path, shape, num_classes)[name]
    return build


def _check_output(path: Path, name: str, module: nn.Module, shape: tuple[int, ...],
                  num_classes: int) -> None:
    """Run two zero samples through the module; a failure names the layer it happened in."""
    current: list[str] = []
    names = {m: n for n, m in module.named_modules()}
    handles = [m.register_forward_pre_hook(lambda m, _i: current.append(names[m]))
               for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            out = module.eval()(torch.zeros((2, *shape)))
    except Exception as exc:  # noqa: BLE001
        where = f" in layer {current[-1]!r} ({type(_get(module, current[-1])).__name__})" \
            if current else ""
        raise UserZooError(f"{path}: student {name!r} fails on input (2, "
                           f"{', '.join(map(str, shape))}){where}: {_one_line(exc)}") from None
    finally:
        for handle in handles:
            handle.remove()
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise UserZooError(f"{path}: student {name!r} returns {got} for a batch of 2; it must "
                           f"return logits of shape (batch, {num_classes})")


def _check_onnx(path: Path, name: str, module: nn.Module, shape: tuple[int, ...]) -> None:
    """Export as ``fededge export`` does and compare onnxruntime with torch on 3 samples."""
    try:
        data = _export(module, shape)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        x = torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
        (got,) = session.run(None, {"input": x.numpy()})
    except Exception as exc:  # noqa: BLE001
        layer = _first_unexportable(module, shape)
        where = f" (layer {layer})" if layer else ""
        raise UserZooError(f"{path}: student {name!r} cannot be exported to ONNX{where}: "
                           f"{_one_line(exc)}") from None
    with torch.no_grad():
        expected = module(x).numpy()
    diff = float(np.abs(got - expected).max())
    if diff > _ONNX_ATOL:
        raise UserZooError(f"{path}: student {name!r}: its ONNX export differs from PyTorch by "
                           f"{diff:.3g} (tolerance {_ONNX_ATOL:g}); avoid data-dependent "
                           "control flow in forward()")


def _export(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros((2, *shape)),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def _first_unexportable(module: nn.Module, shape: tuple[int, ...]) -> str | None:
    """The first leaf layer (in call order) that does not export on its own inputs."""
    inputs: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = []
    names = {m: n for n, m in module.named_modules()}
    leaves = [m for m in module.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(
        lambda m, args: inputs.append((names[m], m, args))) for m in leaves]
    try:
        with torch.no_grad():
            module(torch.zeros((2, *shape)))
    finally:
        for handle in handles:
            handle.remove()
    for layer_name, layer, args in inputs:
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(layer, args, io.BytesIO(), dynamo=False, opset_version=17)
        except Exception:  # noqa: BLE001
            return f"{layer_name!r}, {type(layer).__name__}"
    return None


def _get(module: nn.Module, dotted: str) -> nn.Module:
    return module.get_submodule(dotted)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"

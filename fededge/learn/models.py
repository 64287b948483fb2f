"""Torch modules for the zoo's students, built from their architecture records.

``learn.zoo`` describes each student as layer records and computes its costs without torch;
this module turns the same records into torch modules and, for modules that come from
elsewhere (``learn.userzoo``), measures them by tracing one sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fededge.learn import arch
from fededge.learn.zoo import architecture, is_builtin

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d}
_MAX_POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVG_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d}

UserBuilder = Callable[[tuple[int, ...], int], nn.Module]
_user_builders: dict[str, UserBuilder] = {}


class Residual(nn.Module):
    """``body(x) + shortcut(x)`` (identity when there is no shortcut)."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))


def _layer(l: arch.Layer) -> nn.Module:  # noqa: E741 - one letter per record, as in arch
    if isinstance(l, arch.Conv):
        return _CONVS[l.dims](l.in_channels, l.out_channels, l.kernel, stride=l.stride,
                              padding=l.padding, groups=l.groups)
    if isinstance(l, arch.Linear):
        return nn.Linear(l.in_features, l.out_features)
    if isinstance(l, arch.GroupNorm):
        return nn.GroupNorm(l.groups, l.channels)
    if isinstance(l, arch.ReLU):
        return nn.ReLU()
    if isinstance(l, arch.MaxPool):
        return _MAX_POOLS[l.dims](l.size)
    if isinstance(l, arch.AvgPool):
        return _AVG_POOLS[len(l.kernel)](kernel_size=l.kernel, stride=l.stride)
    if isinstance(l, arch.Flatten):
        return nn.Flatten()
    shortcut = _sequential(l.shortcut) if l.shortcut else None
    return Residual(_sequential(l.body), shortcut)


def _sequential(layers: Sequence[arch.Layer]) -> nn.Sequential:
    return nn.Sequential(*(_layer(layer) for layer in layers))


def build_student(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build student ``name`` for inputs of shape (N, *input_shape); it returns logits (N, K).

    A built-in student, or one of a user zoo registered by ``register_user_builder``.
    Initialisation uses torch's global RNG, so ``torch.manual_seed`` makes it deterministic.
    """
    if name in _user_builders and not is_builtin(name, input_shape):
        return _user_builders[name](tuple(int(d) for d in input_shape), int(num_classes))
    model = _sequential(architecture(name, input_shape, num_classes))
    _init_for_relu(model)
    return model


def register_user_builder(name: str, builder: UserBuilder) -> None:
    """Let ``build_student`` build user student ``name`` (``learn.userzoo`` registers them)."""
    _user_builders[name] = builder


def forget_user_builders() -> None:
    """Drop every registered user student builder."""
    _user_builders.clear()


def trace(model: nn.Module, shape: tuple[int, ...]) -> arch.Measure:
    """Parameters, FLOPs and activation floats of any module, from one zero sample through it
    (counted as ``arch.measure`` counts them: conv and linear MACs; the outputs of every leaf
    module and residual sum). Arithmetic outside modules (``F.relu``, a ``+`` in a user's
    forward) adds no FLOPs and no activations here: a few percent."""
    macs = 0
    activations = math.prod(shape)

    def record(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs, activations
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            macs += (out.numel() * (module.in_channels // module.groups)
                     * math.prod(module.kernel_size))
        elif isinstance(module, nn.Linear):
            macs += out.numel() * module.in_features
        if not isinstance(module, (nn.Flatten, nn.Identity)) and isinstance(out, torch.Tensor):
            activations += out.numel()

    hooked = [m for m in model.modules()
              if next(m.children(), None) is None or isinstance(m, Residual)]
    handles = [module.register_forward_hook(record) for module in hooked]
    try:
        with torch.no_grad():
            output = tuple(model(torch.zeros((1, *shape))).shape[1:])
    finally:
        for handle in handles:
            handle.remove()
    params = sum(p.numel() for p in model.parameters())
    return arch.Measure(params, 2 * macs, activations, output)


def _init_for_relu(model: nn.Module) -> None:
    """He-uniform weights and zero biases for every conv and linear layer.

    PyTorch's default init has a 6× smaller weight variance than He init for ReLU layers; the
    narrow students then start with vanishing signals and need several times more epochs
    (on digits, cnn-xs reached 80–89 % test accuracy after 5 epochs of Adam at lr 1e-3–3e-3
    with the default init and 86–94 % with He init). The last GroupNorm of every residual
    branch starts at zero, so each block starts as its shortcut and deep members train as
    easily as shallow ones.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
        if isinstance(module, Residual):
            nn.init.zeros_(module.body[-1].weight)

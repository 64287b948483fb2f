"""Student architectures as plain records: what a network is, without torch.

A student is a sequence of layer records. From that one description ``learn.models`` builds the
torch module and this module computes, by shape propagation alone, its parameters, forward
FLOPs and activation memory. So picking a student for a device (``learn.picking``), checking a
weight vector's length at a FedAvg server, and provisioning kits all work where torch is not
installed, and the figures cannot drift from the model: ``tests/test_models.py`` checks them
against the built module for every member of the zoo.

Shapes are per sample, without the batch axis: (C, H, W) for images, (C, L) for sequences
(sensor windows, spectrogram frames), (features,) for vectors. Convolutions and pools work on
either spatial rank: ``dims`` is 2 for images and 1 for sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Conv:
    """A 1-D (``dims=1``) or 2-D convolution with a square kernel, stride and padding."""

    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1
    dims: int = 2

    def output(self, shape: Shape) -> Shape:
        side = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1  # noqa: E731
        return (self.out_channels, *(side(n) for n in shape[1:]))

    @property
    def params(self) -> int:
        return (self.out_channels * (self.in_channels // self.groups) * self.kernel ** self.dims
                + self.out_channels)

    def macs(self, out: Shape) -> int:
        return math.prod(out) * (self.in_channels // self.groups) * self.kernel ** self.dims


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int

    def output(self, shape: Shape) -> Shape:
        return (self.out_features,)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + self.out_features

    def macs(self, out: Shape) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class GroupNorm:
    """Normalisation over channel groups of one sample: unlike BatchNorm it behaves the same
    in training and inference and on any batch size (see ``learn.zoo``)."""

    groups: int
    channels: int

    def output(self, shape: Shape) -> Shape:
        return shape

    @property
    def params(self) -> int:
        return 2 * self.channels

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class ReLU:
    def output(self, shape: Shape) -> Shape:
        return shape

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class MaxPool:
    size: int = 2
    dims: int = 2

    def output(self, shape: Shape) -> Shape:
        return (shape[0], *(n // self.size for n in shape[1:]))

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class AvgPool:
    """A fixed average pool (kernel and stride per spatial axis): the legacy ONNX exporter
    exports it for any size, where ``AdaptiveAvgPool2d`` fails when the map is not a multiple
    of its output."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]

    def output(self, shape: Shape) -> Shape:
        return (shape[0], *((n - k) // s + 1
                            for n, k, s in zip(shape[1:], self.kernel, self.stride)))

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class Flatten:
    def output(self, shape: Shape) -> Shape:
        return (math.prod(shape),)

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class Residual:
    """``body(x) + shortcut(x)``; an empty ``shortcut`` is the identity. The sum is one more
    activation (``learn.models.Residual`` is traced as a layer of its own for it)."""

    body: tuple[Layer, ...]
    shortcut: tuple[Layer, ...] = ()


Layer = Conv | Linear | GroupNorm | ReLU | MaxPool | AvgPool | Flatten | Residual


@dataclass(frozen=True)
class Measure:
    """Per-sample figures of an architecture. ``flops`` are 2 × multiply-accumulates of the
    conv and linear layers (biases, normalisation, activations, pooling and residual sums are
    not counted: a few percent); ``activation_floats`` is the input plus every layer's output
    except views (Flatten), roughly what autograd keeps for the backward pass."""

    params: int
    flops: int
    activation_floats: int
    output: Shape


def measure(layers: Sequence[Layer], input_shape: Shape) -> Measure:
    """Propagate ``input_shape`` through ``layers``; raises ``ValueError`` if a layer's output
    would be empty."""
    shape = tuple(input_shape)
    out, params, macs, floats = _propagate(layers, shape, shape)
    return Measure(params, 2 * macs, math.prod(shape) + floats, out)


def _propagate(layers: Sequence[Layer], shape: Shape, origin: Shape) -> tuple[Shape, int, int, int]:
    """(output shape, params, MACs, activation floats without the input) of a layer chain."""
    params = macs = floats = 0
    for layer in layers:
        if isinstance(layer, Residual):
            out, *body = _propagate(layer.body, shape, origin)
            short, *skip = _propagate(layer.shortcut, shape, origin)
            if short != out:
                raise ValueError(f"a residual block maps {shape} to {out} but its shortcut to "
                                 f"{short}")
            params, macs = params + body[0] + skip[0], macs + body[1] + skip[1]
            floats += body[2] + skip[2] + math.prod(out)
            shape = out
            continue
        shape = layer.output(shape)
        if min(shape) < 1:
            raise ValueError(f"{layer} turns the input {origin} into an empty map {shape}")
        params += layer.params
        macs += layer.macs(shape)
        if not isinstance(layer, Flatten):
            floats += math.prod(shape)
    return shape, params, macs, floats

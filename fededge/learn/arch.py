"""Student architectures as plain records: what a network is, without torch.

A student is a sequence of layer records. From that one description ``learn.models`` builds the
torch module and this module computes, by shape propagation alone, its parameters, forward
FLOPs and activation memory. So picking a student for a device (``learn.picking``), checking a
weight vector's length at a FedAvg server, and provisioning kits all work where torch is not
installed, and the figures cannot drift from the model: ``tests/test_models.py`` checks them
against the built module for every member of the zoo.

Shapes are per sample, without the batch axis: (C, H, W) for images, (features,) for vectors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Conv2d:
    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1

    def output(self, shape: Shape) -> Shape:
        _, h, w = shape
        side = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1  # noqa: E731
        return (self.out_channels, side(h), side(w))

    @property
    def params(self) -> int:
        return (self.out_channels * (self.in_channels // self.groups) * self.kernel ** 2
                + self.out_channels)

    def macs(self, out: Shape) -> int:
        return math.prod(out) * (self.in_channels // self.groups) * self.kernel ** 2


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
class ReLU:
    def output(self, shape: Shape) -> Shape:
        return shape

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class MaxPool2d:
    size: int = 2

    def output(self, shape: Shape) -> Shape:
        c, h, w = shape
        return (c, h // self.size, w // self.size)

    params = 0

    def macs(self, out: Shape) -> int:
        return 0


@dataclass(frozen=True)
class AvgPool2d:
    """A fixed average pool (kernel and stride per axis): the legacy ONNX exporter exports it
    for any size, where ``AdaptiveAvgPool2d`` fails when the map is not a multiple of its
    output."""

    kernel: tuple[int, int]
    stride: tuple[int, int]

    def output(self, shape: Shape) -> Shape:
        c, h, w = shape
        return (c, (h - self.kernel[0]) // self.stride[0] + 1,
                (w - self.kernel[1]) // self.stride[1] + 1)

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


Layer = Conv2d | Linear | ReLU | MaxPool2d | AvgPool2d | Flatten


@dataclass(frozen=True)
class Measure:
    """Per-sample figures of an architecture. ``flops`` are 2 × multiply-accumulates of the
    conv and linear layers (biases, activations and pooling are not counted: a few percent);
    ``activation_floats`` is the input plus every layer's output except views (Flatten),
    roughly what autograd keeps for the backward pass."""

    params: int
    flops: int
    activation_floats: int
    output: Shape


def measure(layers: Sequence[Layer], input_shape: Shape) -> Measure:
    """Propagate ``input_shape`` through ``layers``; raises ``ValueError`` if a layer's output
    would be empty."""
    shape, params, macs, floats = tuple(input_shape), 0, 0, math.prod(input_shape)
    for layer in layers:
        shape = layer.output(shape)
        if min(shape) < 1:
            raise ValueError(f"{layer} turns the input {tuple(input_shape)} into an empty "
                             f"map {shape}")
        params += layer.params
        macs += layer.macs(shape)
        if not isinstance(layer, Flatten):
            floats += math.prod(shape)
    return Measure(params, 2 * macs, floats, shape)

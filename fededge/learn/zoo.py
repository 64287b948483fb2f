"""The student zoo: ladders of students for each input kind, and their costs, without torch.

Every device trains the largest student its budgets allow (``learn.picking``), so the zoo is an
ordered ladder of sizes per input kind: small CNNs for images (C, H, W), MLPs for tabular data
(features,). Students never exchange weights, only logits, which is why they may differ.

Each member is an architecture record (``learn.arch``) built from a spec; ``learn.models``
turns the same record into a torch module. Design constraints that shape every member:

* No BatchNorm. Clients train on tiny, non-iid batches and distill on a shared proxy set;
  batch statistics would differ per client and eval-mode behaviour would drift from training.
* ONNX-exportable with the legacy exporter and a dynamic batch axis: image students reduce
  their last feature map to a fixed 2×2 with an average pool whose kernel and stride are
  computed here from the known spatial size.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from fededge.errors import FedEdgeError
from fededge.learn.arch import (
    AvgPool2d,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    Measure,
    ReLU,
    measure,
)

BYTES_PER_FLOAT = 4
MIN_IMAGE_SIDE = 8
"""Smallest image height/width: the smallest side where one 2× max-pool leaves a 4×4 map."""

_POOL_FLOOR = 4  # max-pool only while the pooled map stays at least this big
_FINAL_SIDE = 2  # every image student ends in a fixed 2×2 feature map


@dataclass(frozen=True)
class _CnnSpec:
    """Conv widths per stage (a 2× max-pool follows a stage while the map stays ≥ 4×4)
    and the hidden widths of the MLP head."""

    stages: tuple[tuple[int, ...], ...]
    head: tuple[int, ...]


# Sizes chosen for the 1×8×8 digits default: ~3.7k, ~9k, ~36k, ~90k parameters. The two
# small students have a linear head: on a 2×2 map a hidden layer cost more than it gained.
_IMAGE_SPECS: dict[str, _CnnSpec] = {
    "cnn-xs": _CnnSpec(stages=((12,), (24,)), head=()),
    "cnn-s": _CnnSpec(stages=((20,), (40,)), head=()),
    "cnn-m": _CnnSpec(stages=((16, 32), (64,)), head=(48,)),
    "cnn-l": _CnnSpec(stages=((32,), (64, 64)), head=(128,)),
}

# Hidden widths of the tabular MLPs (input → hidden... → classes).
_TABULAR_SPECS: dict[str, tuple[int, ...]] = {
    "mlp-s": (32,),
    "mlp-m": (64, 64),
    "mlp-l": (256, 128),
}


class UnknownStudentError(FedEdgeError, ValueError):
    """A student name that is not in the zoo for the given input kind."""


@dataclass(frozen=True)
class StudentCost:
    """Analytic cost of one student for one input shape.

    ``flops`` counts forward FLOPs per sample as 2 × multiply-accumulates of the conv and
    linear layers; biases, ReLU and pooling are not counted (they would add a few percent).
    ``activation_bytes`` is the float32 size of every layer output of one sample's forward
    pass plus the input: roughly what autograd keeps for the backward pass.
    ``train_memory_bytes`` = weights + gradients + two Adam moments (4 × weight_bytes)
    + batch_size × activation_bytes × 2 (the activations and their gradients).
    """

    name: str
    params: int
    flops: int
    weight_bytes: int
    activation_bytes: int
    train_memory_bytes: int
    batch_size: int


def image_zoo() -> list[str]:
    """Image student names, smallest to largest."""
    return list(_IMAGE_SPECS)


def tabular_zoo() -> list[str]:
    """Tabular student names, smallest to largest."""
    return list(_TABULAR_SPECS)


def zoo_for(input_shape: Sequence[int]) -> list[str]:
    """The zoo for an input shape: (C, H, W) → image zoo, (features,) → tabular zoo."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        return image_zoo()
    if len(shape) == 1:
        return tabular_zoo()
    raise ValueError(
        f"input shape {shape} is neither an image (C, H, W) nor tabular (features,); "
        f"got {len(shape)} dimensions"
    )


def architecture(name: str, input_shape: Sequence[int], num_classes: int) -> tuple[Layer, ...]:
    """The layers of student ``name`` for inputs of shape (N, *input_shape), logits (N, K)."""
    shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if len(shape) == 3:
        return _cnn(_image_spec(name, shape), shape, num_classes)
    return _mlp(_tabular_spec(name, shape), shape[0], num_classes)


def estimate_cost(
    name: str, input_shape: Sequence[int], num_classes: int, batch_size: int = 32
) -> StudentCost:
    """Parameters, forward FLOPs and training memory of a student (cached per arguments)."""
    shape = _check_input_shape(input_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return _estimate_cost_cached(name, shape, _check_num_classes(num_classes), batch_size)


@functools.lru_cache(maxsize=256)
def _estimate_cost_cached(
    name: str, shape: tuple[int, ...], num_classes: int, batch_size: int
) -> StudentCost:
    return student_cost(name, measure(architecture(name, shape, num_classes), shape), batch_size)


def student_cost(name: str, figures: Measure, batch_size: int) -> StudentCost:
    """A ``StudentCost`` from per-sample figures (``arch.Measure``, or a traced module's)."""
    weight_bytes = figures.params * BYTES_PER_FLOAT
    activation_bytes = figures.activation_floats * BYTES_PER_FLOAT
    return StudentCost(
        name=name,
        params=figures.params,
        flops=figures.flops,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        train_memory_bytes=4 * weight_bytes + batch_size * activation_bytes * 2,
        batch_size=batch_size,
    )


def _cnn(spec: _CnnSpec, shape: tuple[int, ...], num_classes: int) -> tuple[Layer, ...]:
    channels, height, width = shape
    layers: list[Layer] = []
    for stage in spec.stages:
        for out_channels in stage:
            layers += [Conv2d(channels, out_channels), ReLU()]
            channels = out_channels
        if min(height, width) // 2 >= _POOL_FLOOR:
            layers.append(MaxPool2d(2))
            height, width = height // 2, width // 2
    layers += [_fixed_avg_pool(height, width), Flatten()]
    layers += _mlp_layers(channels * _FINAL_SIDE * _FINAL_SIDE, spec.head, num_classes)
    return tuple(layers)


def _fixed_avg_pool(height: int, width: int) -> AvgPool2d:
    """An average pool mapping an H×W map (H, W ≥ 2) to exactly 2×2.

    With stride s = ⌊H/2⌋ and kernel k = H − s the output size is ⌊(H − k)/s⌋ + 1 = 2;
    windows overlap by one row/column when H is odd, and every input cell is used.
    """
    stride = (height // _FINAL_SIDE, width // _FINAL_SIDE)
    return AvgPool2d(kernel=(height - stride[0], width - stride[1]), stride=stride)


def _mlp(hidden: tuple[int, ...], features: int, num_classes: int) -> tuple[Layer, ...]:
    return tuple(_mlp_layers(features, hidden, num_classes))


def _mlp_layers(in_features: int, hidden: tuple[int, ...], num_classes: int) -> list[Layer]:
    layers: list[Layer] = []
    for width in hidden:
        layers += [Linear(in_features, width), ReLU()]
        in_features = width
    layers.append(Linear(in_features, num_classes))
    return layers


def _image_spec(name: str, shape: tuple[int, ...]) -> _CnnSpec:
    if name not in _IMAGE_SPECS:
        raise _unknown(name, f"image input (C, H, W) = {shape}", image_zoo())
    return _IMAGE_SPECS[name]


def _tabular_spec(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if name not in _TABULAR_SPECS:
        raise _unknown(name, f"tabular input (features,) = {shape}", tabular_zoo())
    return _TABULAR_SPECS[name]


def _unknown(name: str, kind: str, valid: list[str]) -> UnknownStudentError:
    return UnknownStudentError(
        f"unknown student {name!r} for {kind}; valid students: {', '.join(valid)}"
    )


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Normalise to a tuple of Python ints (numpy ints welcome) and validate it."""
    try:
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        raise ValueError(
            f"input shape must be a sequence of integers, got {input_shape!r}"
        ) from None
    zoo_for(shape)  # rejects the wrong number of dimensions
    if any(d < 1 for d in shape):
        raise ValueError(f"input shape {shape} must have positive dimensions")
    if len(shape) == 3 and min(shape[1:]) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"image input (C, H, W) = {shape} is too small: H and W must be at least "
            f"{MIN_IMAGE_SIDE}"
        )
    return shape


def _check_num_classes(num_classes: int) -> int:
    """Normalise to a Python int (numpy ints welcome); a classifier needs at least 2 classes."""
    if not isinstance(num_classes, bool):
        try:
            classes = operator.index(num_classes)
        except TypeError:
            pass
        else:
            if classes >= 2:
                return classes
    raise ValueError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")

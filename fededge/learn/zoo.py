"""The student zoo: ladders of students for each input kind, and their costs, without torch.

Every device trains the largest student its budgets allow (``learn.picking``), so the zoo is an
ordered ladder of sizes per input kind, smallest first. Students never exchange weights, only
logits, which is why they may differ. The conv ladder serves images (C, H, W) and sequences
(C, L) alike (sensor windows, spectrogram frames): the same spec builds 2-D or 1-D layers. It
holds two families:

* ``cnn-*``: plain conv stacks with max-pools and a small MLP head (3.9k–90k parameters at
  3×32×32), for the boards with a few MB to spare;
* ``res-*``: residual networks (two 3×3 convs with GroupNorm per block, a 1×1 conv shortcut
  where the shape changes, stages that halve the map and double the width, a global average
  pool and a linear head), scaled by a width and a depth per stage up to several million
  parameters for the Jetsons and the gateway. Most parameters sit in the last, smallest stage,
  so parameters grow much faster than FLOPs and training time.

Tabular data (features,) gets MLPs. torchvision's definitions are not used: it does not import
beside the torch this project pins, and its models assume 224×224 inputs and BatchNorm.

Each member is an architecture record (``learn.arch``) built from a spec; ``learn.models``
turns the same record into a torch module. Design constraints that shape every member:

* No BatchNorm. Clients train on tiny, non-iid batches and distill on a shared proxy set;
  batch statistics would differ per client and eval-mode behaviour would drift from training.
  GroupNorm normalises each sample on its own and behaves the same in training and inference.
* A stem whose stride adapts to the resolution: the first conv strides by ⌊side / 32⌋ for
  images (⌊length / 128⌋ for sequences), so a 3×96×96 camera frame costs what a 32×32 one
  does and the smallest student still fits a Pi Zero 2 W.
* ONNX-exportable with the legacy exporter and a dynamic batch axis: feature maps are reduced
  by average pools whose kernel and stride are computed here from the known map size
  (``AdaptiveAvgPool`` fails to export when the map is not a multiple of its output).

Students a user brings (``learn.userzoo``) are measured with torch and registered here by
name (``register_measured``), so the torch-free picking, the server's checks and the ladder
order treat them like the built-in ones.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

from fededge.errors import FedEdgeError
from fededge.learn.arch import (
    AvgPool,
    Conv,
    Flatten,
    GroupNorm,
    Layer,
    Linear,
    MaxPool,
    Measure,
    ReLU,
    Residual,
    measure,
)

BYTES_PER_FLOAT = 4
MIN_SIDE = 8
"""Smallest image height/width or sequence length: the smallest side where one 2× max-pool
leaves a 4-wide map."""
ADAM_STATE_COPIES = 2
"""Adam keeps two moments per weight (``learn.trainer`` trains with Adam)."""

USER_ZOO_FILE = "zoo.py"
"""What a run directory or a kit calls its copy of the user zoo file (``learn.userzoo``)."""

_POOL_FLOOR = 4  # max-pool (or stride) only while the pooled map stays at least this big
_FINAL_SIDE = 2  # every plain CNN ends in a fixed 2×2 (or length-2) feature map
_STEM_TARGET = {2: 32, 1: 128}  # the side the adaptive stem strides the input down towards
_NORM_GROUPS = 8
_RES_MIN_SIDE = 16  # four stages: 16 → 8 → 4 → 2


@dataclass(frozen=True)
class _CnnSpec:
    """Conv widths per stage (a 2× max-pool follows a stage while the map stays ≥ 4 wide)
    and the hidden widths of the MLP head."""

    stages: tuple[tuple[int, ...], ...]
    head: tuple[int, ...]


@dataclass(frozen=True)
class _ResSpec:
    """Channels of the stem and of each of the four stages, and residual blocks per stage;
    every stage after the first halves the map."""

    stem: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]


# Smallest to largest. cnn-* sizes were chosen for the 1×8×8 digits default (~3.7k, ~9k,
# ~36k, ~90k parameters there); the two small ones have a linear head: on a 2×2 map a hidden
# layer cost more than it gained. res-* sizes at 3×32×32: ~0.19M, ~0.45M, ~0.95M, ~3.1M; they
# sit between the catalog's parameter budgets (250k, 500k, 1M, 5M).
_CONV_SPECS: dict[str, _CnnSpec | _ResSpec] = {
    "cnn-xs": _CnnSpec(stages=((12,), (24,)), head=()),
    "cnn-s": _CnnSpec(stages=((20,), (40,)), head=()),
    "cnn-m": _CnnSpec(stages=((16, 32), (64,)), head=(48,)),
    "cnn-l": _CnnSpec(stages=((32,), (64, 64)), head=(128,)),
    "res-s": _ResSpec(stem=16, widths=(16, 32, 64, 96), blocks=(1, 1, 1, 1)),
    "res-m": _ResSpec(stem=16, widths=(16, 32, 64, 160), blocks=(1, 1, 1, 1)),
    "res-l": _ResSpec(stem=24, widths=(24, 48, 96, 224), blocks=(1, 1, 1, 1)),
    "res-xl": _ResSpec(stem=32, widths=(32, 64, 128, 288), blocks=(1, 1, 1, 2)),
}

# Hidden widths of the tabular MLPs (input → hidden... → classes).
_TABULAR_SPECS: dict[str, tuple[int, ...]] = {
    "mlp-s": (32,),
    "mlp-m": (64, 64),
    "mlp-l": (256, 128),
    "mlp-xl": (512, 512, 256),
}

_registered: dict[tuple[str, tuple[int, ...], int], Measure] = {}


class UnknownStudentError(FedEdgeError, ValueError):
    """A student name that is not in the zoo for the given input kind."""


@dataclass(frozen=True)
class StudentCost:
    """Analytic cost of one student for one input shape.

    ``flops`` counts forward FLOPs per sample as 2 × multiply-accumulates of the conv and
    linear layers; biases, normalisation, ReLU, pooling and residual sums are not counted
    (they would add a few percent). ``activation_bytes`` is the float32 size of every layer
    output of one sample's forward pass plus the input: roughly what autograd keeps for the
    backward pass. ``train_memory_bytes`` = weights + gradients + two Adam moments
    (4 × weight_bytes) + batch_size × activation_bytes × 2 (the activations and their
    gradients).
    """

    name: str
    params: int
    flops: int
    weight_bytes: int
    activation_bytes: int
    train_memory_bytes: int
    batch_size: int


def conv_zoo() -> list[str]:
    """Conv student names (images and sequences), smallest to largest."""
    return list(_CONV_SPECS)


def tabular_zoo() -> list[str]:
    """Tabular student names, smallest to largest."""
    return list(_TABULAR_SPECS)


def builtin_zoo_for(input_shape: Sequence[int]) -> list[str]:
    """The built-in ladder for an input shape: (C, H, W) or (C, L) → conv students (residual
    ones only where the map is big enough for their stages), (features,) → tabular students."""
    shape = tuple(input_shape)
    if len(shape) in (2, 3):
        return [name for name in conv_zoo() if _fits(_CONV_SPECS[name], shape[1:])]
    if len(shape) == 1:
        return tabular_zoo()
    raise ValueError(
        f"input shape {shape} is neither an image (C, H, W), a sequence (C, L) nor tabular "
        f"(features,); got {len(shape)} dimensions"
    )


def zoo_for(input_shape: Sequence[int]) -> list[str]:
    """Every student for an input shape, smallest first by parameters: the built-in ladder
    with the registered user students (``register_measured``) merged in."""
    shape = tuple(input_shape)
    builtin = builtin_zoo_for(shape)
    users = {(name, classes): m for (name, s, classes), m in _registered.items() if s == shape}
    if not users:
        return builtin
    params = {name: m.params for (name, _), m in users.items()}
    for name in builtin:
        params[name] = min(_builtin_measure(name, shape, classes).params
                           for _, classes in users)
    return sorted(params, key=lambda n: (params[n], n not in builtin))


def register_measured(name: str, input_shape: Sequence[int], num_classes: int,
                      figures: Measure) -> None:
    """Make a user student known by name for one input shape and class count (its figures
    come from tracing the torch module, ``learn.models.trace``)."""
    shape = _check_input_shape(input_shape)
    if name in builtin_zoo_for(shape):
        raise UnknownStudentError(f"student name {name!r} is a built-in student; rename it in "
                                  "your zoo file")
    _registered[(name, shape, _check_num_classes(num_classes))] = figures
    _estimate_cost_cached.cache_clear()


def forget_registered() -> None:
    """Drop every registered user student (tests, and a process that loads another zoo)."""
    _registered.clear()
    _estimate_cost_cached.cache_clear()


def architecture(name: str, input_shape: Sequence[int], num_classes: int) -> tuple[Layer, ...]:
    """The layers of built-in student ``name`` for inputs (N, *input_shape), logits (N, K)."""
    shape = _check_input_shape(input_shape)
    num_classes = _check_num_classes(num_classes)
    if len(shape) == 1:
        return _mlp(_tabular_spec(name, shape), shape[0], num_classes)
    spec = _conv_spec(name, shape)
    if isinstance(spec, _ResSpec):
        return _resnet(spec, shape, num_classes)
    return _cnn(spec, shape, num_classes)


def is_builtin(name: str, input_shape: Sequence[int]) -> bool:
    """Whether ``name`` is a built-in student for this input kind (else a registered one)."""
    return name in builtin_zoo_for(tuple(input_shape))


def estimate_cost(
    name: str, input_shape: Sequence[int], num_classes: int, batch_size: int = 32
) -> StudentCost:
    """Parameters, forward FLOPs and training memory of a student (cached per arguments)."""
    shape = _check_input_shape(input_shape)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return _estimate_cost_cached(name, shape, _check_num_classes(num_classes), batch_size)


@functools.lru_cache(maxsize=1024)
def _estimate_cost_cached(
    name: str, shape: tuple[int, ...], num_classes: int, batch_size: int
) -> StudentCost:
    registered = _registered.get((name, shape, num_classes))
    if registered is not None:
        return student_cost(name, registered, batch_size)
    return student_cost(name, _builtin_measure(name, shape, num_classes), batch_size)


@functools.lru_cache(maxsize=1024)
def _builtin_measure(name: str, shape: tuple[int, ...], num_classes: int) -> Measure:
    return measure(architecture(name, shape, num_classes), shape)


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
        train_memory_bytes=(2 + ADAM_STATE_COPIES) * weight_bytes
        + batch_size * activation_bytes * 2,
        batch_size=batch_size,
    )


# --------------------------------------------------------------------------- families


def _fits(spec: _CnnSpec | _ResSpec, spatial: Sequence[int]) -> bool:
    """A residual member only where each stage after the first can halve the map and the last
    still runs on at least 2×2 (16×16 inputs for four stages): on a smaller map its late
    stages would be wide layers over a pixel or two, parameters that cost training time and
    buy nothing (on 1×8×8 digits they doubled the default simulation's time)."""
    if isinstance(spec, _CnnSpec):
        return True
    return min(spatial) // stem_stride(spatial) >= _RES_MIN_SIDE


def stem_stride(spatial: Sequence[int]) -> int:
    """How far the first conv strides: towards a 32-pixel side (128 for sequences), never
    below the input's own resolution (stride 1 up to a 63-pixel side)."""
    return max(1, min(spatial) // _STEM_TARGET[len(spatial)])


def _stem(in_channels: int, out_channels: int, spatial: Sequence[int]) -> Conv:
    stride = stem_stride(spatial)
    kernel = max(3, stride)  # a stride above 3 must not skip pixels
    return Conv(in_channels, out_channels, kernel, stride, (kernel - 1) // 2, dims=len(spatial))


def _cnn(spec: _CnnSpec, shape: tuple[int, ...], num_classes: int) -> tuple[Layer, ...]:
    channels, *spatial = shape
    dims = len(spatial)
    layers: list[Layer] = []
    first = True
    for stage in spec.stages:
        for out_channels in stage:
            conv = (_stem(channels, out_channels, spatial) if first
                    else Conv(channels, out_channels, dims=dims))
            layers += [conv, ReLU()]
            spatial = list(conv.output((channels, *spatial))[1:])
            channels, first = out_channels, False
        if min(spatial) // 2 >= _POOL_FLOOR:
            layers.append(MaxPool(2, dims=dims))
            spatial = [n // 2 for n in spatial]
    layers += [_fixed_avg_pool(spatial), Flatten()]
    layers += _mlp_layers(channels * _FINAL_SIDE ** dims, spec.head, num_classes)
    return tuple(layers)


def _resnet(spec: _ResSpec, shape: tuple[int, ...], num_classes: int) -> tuple[Layer, ...]:
    channels, *spatial = shape
    dims = len(spatial)
    stem = _stem(channels, spec.stem, spatial)
    layers: list[Layer] = [stem, _norm(spec.stem), ReLU()]
    channels, spatial = spec.stem, list(stem.output(shape)[1:])
    for stage, (width, blocks) in enumerate(zip(spec.widths, spec.blocks)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += [_basic_block(channels, width, stride, dims), ReLU()]
            channels, spatial = width, [(n - 1) // stride + 1 for n in spatial]
    layers += [AvgPool(tuple(spatial), tuple(spatial)), Flatten(), Linear(channels, num_classes)]
    return tuple(layers)


def _basic_block(in_channels: int, out_channels: int, stride: int, dims: int) -> Residual:
    body = (Conv(in_channels, out_channels, stride=stride, dims=dims), _norm(out_channels),
            ReLU(), Conv(out_channels, out_channels, dims=dims), _norm(out_channels))
    if stride == 1 and in_channels == out_channels:
        return Residual(body)
    return Residual(body, (Conv(in_channels, out_channels, 1, stride, 0, dims=dims),))


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(math.gcd(_NORM_GROUPS, channels), channels)


def _fixed_avg_pool(spatial: Sequence[int]) -> AvgPool:
    """An average pool mapping a map of sides n ≥ 2 to exactly 2 per side.

    With stride s = ⌊n/2⌋ and kernel k = n − s the output size is ⌊(n − k)/s⌋ + 1 = 2;
    windows overlap by one row/column when n is odd, and every input cell is used.
    """
    stride = tuple(n // _FINAL_SIDE for n in spatial)
    return AvgPool(kernel=tuple(n - s for n, s in zip(spatial, stride)), stride=stride)


def _mlp(hidden: tuple[int, ...], features: int, num_classes: int) -> tuple[Layer, ...]:
    return tuple(_mlp_layers(features, hidden, num_classes))


def _mlp_layers(in_features: int, hidden: tuple[int, ...], num_classes: int) -> list[Layer]:
    layers: list[Layer] = []
    for width in hidden:
        layers += [Linear(in_features, width), ReLU()]
        in_features = width
    layers.append(Linear(in_features, num_classes))
    return layers


def _conv_spec(name: str, shape: tuple[int, ...]) -> _CnnSpec | _ResSpec:
    valid = builtin_zoo_for(shape)
    if name not in valid:
        kind = "image input (C, H, W)" if len(shape) == 3 else "sequence input (C, L)"
        if name in _CONV_SPECS:
            raise UnknownStudentError(
                f"student {name!r} needs inputs of at least {_RES_MIN_SIDE} per side (after the "
                f"stem), got {kind} = {shape}; valid students: {', '.join(valid)}")
        raise _unknown(name, f"{kind} = {shape}", valid)
    return _CONV_SPECS[name]


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
    builtin_zoo_for(shape)  # rejects the wrong number of dimensions
    if any(d < 1 for d in shape):
        raise ValueError(f"input shape {shape} must have positive dimensions")
    if len(shape) > 1 and min(shape[1:]) < MIN_SIDE:
        kind = "image input (C, H, W)" if len(shape) == 3 else "sequence input (C, L)"
        sides = "H and W" if len(shape) == 3 else "L"
        raise ValueError(f"{kind} = {shape} is too small: {sides} must be at least {MIN_SIDE}")
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

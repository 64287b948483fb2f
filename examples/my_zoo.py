"""Two students of your own for `fededge devices --zoo examples/my_zoo.py` (and simulate,
or `zoo = "my_zoo.py"` in a federation file). fededge measures each module, picks among them
and the built-in students by every device's budgets, and exports the one a device trained.

Rules: students(input_shape, num_classes) returns {name: torch.nn.Module}; each module maps
(N, *input_shape) float32 to (N, num_classes) logits and exports to ONNX (no data-dependent
control flow in forward). Build the modules inside students(): every device calls it with
the same seed, so all build the same initial weights.
"""

from __future__ import annotations

import math

from torch import nn


def _tiny_convnet(channels: int, num_classes: int) -> nn.Module:
    """Depthwise-separable convs: few parameters for a very small board (3.85k on digits)."""
    return nn.Sequential(
        nn.Conv2d(channels, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.Conv2d(24, 96, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, num_classes))


def _wide_mlp(features: int, num_classes: int) -> nn.Module:
    """An MLP over the flattened input (51k parameters on digits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 256), nn.ReLU(),
                         nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes))


def students(input_shape: tuple[int, ...], num_classes: int) -> dict[str, nn.Module]:
    channels = input_shape[0]
    return {"my-sepconv": _tiny_convnet(channels, num_classes),
            "my-mlp": _wide_mlp(math.prod(input_shape), num_classes)}

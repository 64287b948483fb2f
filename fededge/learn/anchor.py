"""What a device's private labels contribute while it distills a consensus: torch-free, so
the strategies (which a torch-free server imports) can build it for the device's trainer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelAnchor:
    """Private labelled data kept in the loss while distilling proxy rows: every distillation
    batch is paired with a random private batch whose logit-adjusted cross-entropy (``kd.
    logit_adjusted_ce`` at ``tau``, with the client's own label prior), times ``weight``, is
    added. Without it a weak consensus overwrites what the student knew (issue 13)."""

    X: np.ndarray
    y: np.ndarray
    weight: float
    tau: float
    num_classes: int

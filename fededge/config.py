"""Federation settings: chosen once by the server, published retained, obeyed by every client.

Keeping training hyperparameters here (not in each device's config) means one place decides how
the federation learns, as in Flower's ``on_fit_config_fn``; devices only decide *what* they train
(their student) from their hardware profile.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from fededge.errors import FedEdgeError

MAX_PAYLOAD = 16 * 1024 * 1024
"""The largest message any party sends or accepts, in bytes: the envelope's size check, the
chunk reassembler's bound and the Mosquitto ``max_packet_size`` all derive from it."""


class ConfigError(FedEdgeError, ValueError):
    """A federation setting out of range; the message names the setting and the valid range."""


@dataclass(frozen=True)
class FederationConfig:
    federation: str = "demo"
    strategy: str = "fedmd"
    aggregator: str = "era"
    rounds: int = 20
    seed: int = 0
    num_classes: int = 10
    input_shape: tuple[int, ...] = (1, 8, 8)
    proxy_sha256: str = ""
    proxy_size: int = 0
    proxy_per_round: int = 0          # 0: the whole proxy set every round
    temperature: float = 3.0          # softening of teacher and student in the KD loss
    era_temperature: float = 0.1      # DS-FL sharpening (era, median, trimmed-mean)
    warmup_epochs: int = 30
    distill_epochs: int = 2
    revisit_epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 32
    logit_dtype: str = "float16"
    # Clients upload their private label histogram with their logits so the server can weight
    # each class by the clients that know it (see aggregate.py). It reveals the histogram to the
    # server; set false to share only the total sample count.
    share_class_counts: bool = True
    deadline_s: float = 120.0
    quorum: float = 0.5               # share of joined clients a round needs to close
    max_attempts: int = 3
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Local differential privacy (privacy.py): each device clips every uploaded logit row to L2
    # norm ldp_clip and adds Gaussian noise of std ldp_noise_multiplier * ldp_clip; 0 turns it
    # off. ldp_delta is the delta its (epsilon, delta) account is reported at.
    ldp_noise_multiplier: float = 0.0
    ldp_clip: float = 10.0
    ldp_delta: float = 1e-5
    # While uploads or reports are missing, the server re-publishes its retained state (config,
    # last consensus, the round naming who it still waits for) this often, so clients that
    # reconnected, restarted or lost a message catch up. 0: a quarter of deadline_s.
    resend_s: float = 0.0
    # A device whose Last Will arrives is still waited for this long: a broker restart fires
    # every device's Will although they are back seconds later. A crashed device delays a
    # round's close by at most this much.
    presence_grace_s: float = 5.0
    # How logits travel, uploads and consensus alike (compress.py): float16 (in logit_dtype),
    # int8 (1 byte per value, per-row scale) or topk (the logit_topk most likely classes' log-
    # probabilities per row; the others share the remaining mass).
    logit_codec: str = "float16"
    logit_topk: int = 3
    # Weight-averaging strategies (strategy.py). fedavg: every device trains `student`.
    # fedavg-kd: the devices whose student is at least as large as `teacher` ('' = the largest
    # zoo member) train it by FedAvg; after the last round every device distills it into its
    # own student on its private data (kd_epochs, KD loss weight kd_alpha on the teacher), then
    # fine-tunes on labels (finetune_epochs). local_epochs: private epochs per round (FedAvg's
    # E; on digits, alpha 0.5, cnn-xs, 20 rounds: 88.9% with 2, 94.7% with 5, 95.5% with 10).
    student: str = ""
    teacher: str = ""
    local_epochs: int = 5
    kd_alpha: float = 0.5
    kd_epochs: int = 20
    finetune_epochs: int = 0
    # feddf: epochs the server distills each round's consensus into its model (`teacher`).
    server_epochs: int = 5

    def __post_init__(self) -> None:
        checks = [
            (self.rounds >= 1, "rounds", "at least 1"),
            (self.num_classes >= 2, "num_classes", "at least 2"),
            (self.proxy_per_round >= 0, "proxy_per_round", "0 (all) or a positive count"),
            (self.temperature > 0, "temperature", "positive"),
            (self.era_temperature > 0, "era_temperature", "positive"),
            (min(self.warmup_epochs, self.distill_epochs, self.revisit_epochs) >= 0,
             "epochs", "0 or more"),
            (self.lr > 0, "lr", "positive"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.logit_dtype in ("float16", "float32"), "logit_dtype", "float16 or float32"),
            (self.deadline_s > 0, "deadline_s", "positive seconds"),
            (0.0 < self.quorum <= 1.0, "quorum", "in (0, 1]"),
            (self.max_attempts >= 1, "max_attempts", "at least 1"),
            (self.ldp_noise_multiplier >= 0, "ldp_noise_multiplier", "0 (off) or positive"),
            (self.ldp_clip > 0, "ldp_clip", "positive"),
            (0.0 < self.ldp_delta < 1.0, "ldp_delta", "in (0, 1)"),
            # The class histogram travels un-noised, so it would void the logits' guarantee.
            (not (self.ldp_noise_multiplier > 0 and self.share_class_counts),
             "share_class_counts", "false when local differential privacy is on (the label "
             "histogram is not noised)"),
            (self.resend_s >= 0, "resend_s", "0 (a quarter of deadline_s) or positive seconds"),
            (self.presence_grace_s >= 0, "presence_grace_s", "0 or positive seconds"),
            (self.logit_topk >= 1, "logit_topk", "at least 1"),
            (self.local_epochs >= 1, "local_epochs", "at least 1"),
            (0.0 <= self.kd_alpha <= 1.0, "kd_alpha", "in [0, 1]"),
            (self.kd_epochs >= 1, "kd_epochs", "at least 1"),
            (self.finetune_epochs >= 0, "finetune_epochs", "0 or more"),
            (self.server_epochs >= 1, "server_epochs", "at least 1"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ConfigError(f"federation setting {name!r} must be {want}, "
                                  f"got {getattr(self, name, None)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FederationConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown federation settings {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "input_shape" in values:
            values["input_shape"] = tuple(int(v) for v in values["input_shape"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad federation settings: {exc}") from None

    def replace(self, **changes: Any) -> "FederationConfig":
        return dataclasses.replace(self, **changes)

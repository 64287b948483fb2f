"""Federation settings: chosen once by the server, published retained, obeyed by every client.

Keeping training hyperparameters here (not in each device's config) means one place decides how
the federation learns, as in Flower's ``on_fit_config_fn``; devices only decide *what* they train
(their student) from their hardware profile.

``FederationConfig`` is the one schema of every setting, whichever way it arrives (``--set``,
the federation file's ``[training]`` and ``[privacy]``, a kit's ``[config]``, the retained
config message): a pydantic dataclass in strict mode (``schema.STRICT``), so integers are
integers, numbers are finite and each field's range is stated on its own line. A new setting
is one line here: ``name: Annotated[type, Field(range)] = default`` (a bare ``name: int = 5``
is already strict and finite). Settings derived from the data (``DERIVED``) cannot be set.
"""

from __future__ import annotations

import dataclasses
import json
import typing
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError
from pydantic.dataclasses import dataclass

from fededge.errors import FedEdgeError
from fededge.schema import STRICT, Identifier, SchemaError, describe, parse

MAX_PAYLOAD = 16 * 1024 * 1024
"""The largest message any party sends or accepts, in bytes: the envelope's size check, the
chunk reassembler's bound and the Mosquitto ``max_payload`` all derive from it."""
MAX_ROUNDS = 10_000
MAX_EPOCHS = 10_000
MAX_ROWS = 10_000_000
WEEK_S = 7 * 24 * 3600.0
MIN_RESEND_S = 0.1

DERIVED = ("federation", "num_classes", "input_shape", "proxy_sha256", "proxy_size", "run_id")
"""Settings that come from the data, the federation's name or each run, never from the user
(``--set``, ``[training]``): a ``num_classes`` other than the data's can only break a run."""

Sha256 = Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$", max_length=64)]
OptionalName = Annotated[str, Field(max_length=64, pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$")]
Dimension = Annotated[int, Field(ge=1, le=65536)]
Epochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
Temperature = Annotated[float, Field(ge=0.01, le=100.0)]
Seconds = Annotated[float, Field(ge=0.0, le=WEEK_S)]


class ConfigError(FedEdgeError, ValueError):
    """A federation setting out of range; the message names the setting and the valid range."""


@dataclass(frozen=True, config=STRICT)
class FederationConfig:
    federation: Identifier = "demo"
    strategy: Identifier = "fedmd"
    aggregator: Identifier = "era"
    rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 20
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    num_classes: Annotated[int, Field(ge=2, le=65536)] = 10
    input_shape: Annotated[tuple[Dimension, ...], Field(strict=False, min_length=1,
                                                      max_length=3)] = (1, 8, 8)
    proxy_sha256: Sha256 = ""
    proxy_size: Annotated[int, Field(ge=0, le=MAX_ROWS)] = 0
    proxy_per_round: Annotated[int, Field(ge=0, le=MAX_ROWS)] = 0  # 0: the whole proxy set
    temperature: Temperature = 3.0        # softening of teacher and student in the KD loss
    era_temperature: Temperature = 0.1    # DS-FL sharpening (era, median, trimmed-mean)
    warmup_epochs: Epochs = 30
    distill_epochs: Epochs = 2
    revisit_epochs: Epochs = 2
    # fedmd's defences against a weak consensus overwriting a student (issue 13). While it
    # distills, each proxy batch is paired with a private batch whose logit-adjusted
    # cross-entropy (FedLC-style, tau distill_label_tau, with the client's label prior) weighs
    # distill_label_weight; in the revisit, FedNTD's not-true-class distillation (weight
    # revisit_ntd_weight) holds the student to its post-distillation logits. 0 turns each off.
    distill_label_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    distill_label_tau: Annotated[float, Field(ge=0.0, le=10.0)] = 0.5
    revisit_ntd_weight: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    # The held-out safeguard (0: off): a device sets aside holdout_share of its private data,
    # trains on the rest in the rounds, and keeps its previous student whenever absorbing a
    # consensus lowers its held-out accuracy by more than holdout_margin.
    holdout_share: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    holdout_margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 2e-3
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    logit_dtype: Literal["float16", "float32"] = "float16"
    # Clients upload their private label histogram with their logits so the server can weight
    # each class by the clients that know it (see aggregate.py). It reveals the histogram to the
    # server; set false to share only the total sample count.
    share_class_counts: bool = True
    # After the last round each device sends its trained student (its weights) to the server,
    # which keeps them for `fededge export` and `fededge deploy`. Weights can reveal more of a
    # device's private data than its logits do, so this is the federation's privacy choice,
    # made in the federation file ([federation] collect_models); a device whose kit says false
    # refuses a server that asks for them.
    collect_models: bool = False
    deadline_s: Annotated[float, Field(gt=0.0, le=WEEK_S)] = 120.0
    quorum: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5  # share of joined clients to close
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    run_id: Identifier = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Local differential privacy (privacy.py): each device clips every uploaded logit row to L2
    # norm ldp_clip and adds Gaussian noise of std ldp_noise_multiplier * ldp_clip; 0 turns it
    # off. ldp_delta is the delta its (epsilon, delta) account is reported at.
    ldp_noise_multiplier: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0
    ldp_clip: Annotated[float, Field(gt=0.0, le=1e6)] = 10.0
    ldp_delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    # While uploads or reports are missing, the server re-publishes its retained state (config,
    # last consensus, the round naming who it still waits for) this often, so clients that
    # reconnected, restarted or lost a message catch up. 0: a quarter of deadline_s.
    resend_s: Seconds = 0.0  # 0, or at least MIN_RESEND_S
    # A device whose Last Will arrives is still waited for this long: a broker restart fires
    # every device's Will although they are back seconds later. A crashed device delays a
    # round's close by at most this much.
    presence_grace_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 5.0
    # How logits travel, uploads and consensus alike (codecs.py): int8 (default: 1 byte per
    # value, per-row scale; within 0.1 point of float16 on the suite), float16 (in
    # logit_dtype) or topk (the logit_topk most likely classes' log-probabilities per row;
    # the others share the remaining mass).
    logit_codec: Literal["float16", "int8", "topk"] = "int8"
    logit_topk: Annotated[int, Field(ge=1, le=65536)] = 3
    # Weight-averaging strategies (strategy.py). fedavg: every device trains `student`.
    # fedavg-kd: the devices whose student is at least as large as `teacher` ('' = the largest
    # zoo member) train it by FedAvg; after the last round every device distills it into its
    # own student on its private data (kd_epochs, KD loss weight kd_alpha on the teacher), then
    # fine-tunes on labels (finetune_epochs). local_epochs: private epochs per round (FedAvg's
    # E; on digits, alpha 0.5, cnn-xs, 20 rounds: 88.9% with 2, 94.7% with 5, 95.5% with 10).
    student: OptionalName = ""
    teacher: OptionalName = ""
    local_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 5
    kd_alpha: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    kd_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 20
    finetune_epochs: Epochs = 0
    # feddf: epochs the server distills each round's consensus into its model (`teacher`).
    server_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 5

    def __post_init__(self) -> None:
        """What one field cannot say alone."""
        # The class histogram travels un-noised, so it would void the logits' guarantee.
        if self.ldp_noise_multiplier > 0 and self.share_class_counts:
            raise ConfigError("federation setting 'share_class_counts' must be false when local "
                              "differential privacy is on (the label histogram is not noised)")
        if 0 < self.resend_s < MIN_RESEND_S:
            raise ConfigError(f"federation setting 'resend_s' must be 0 (a quarter of "
                              f"deadline_s) or at least {MIN_RESEND_S} s, got {self.resend_s!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederationConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"federation settings must be a table, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown federation settings {unknown}; known: {sorted(SETTINGS)}")
        return cls(**data)

    def replace(self, **changes: Any) -> FederationConfig:
        return dataclasses.replace(self, **changes)


def _user_errors(cls: type) -> type:
    """Construction raises ``ConfigError`` (a ``FedEdgeError``, printed as one line) naming the
    setting, instead of pydantic's multi-line ``ValidationError``."""
    validated = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            validated(self, *args, **kwargs)
        except ValidationError as exc:
            key, message = describe(exc)
            prefix = f"federation setting {key!r}" if key else "federation settings"
            raise ConfigError(f"{prefix}{message[len(key or ''):]}" if key
                              else message) from None
    __init__.__doc__ = validated.__doc__
    cls.__init__ = __init__
    return cls


FederationConfig = _user_errors(FederationConfig)
SETTINGS = tuple(f.name for f in dataclasses.fields(FederationConfig))
_FIELD_TYPES = typing.get_type_hints(FederationConfig, include_extras=True)


def check_setting(name: str, value: Any) -> Any:
    """One user-given setting (``--set``, ``[training]``), validated alone: a known, settable
    name and a value of its type and range. Checks across settings run when the whole
    config is built."""
    if name not in SETTINGS:
        raise ConfigError(f"unknown federation setting {name!r}; known: "
                          f"{', '.join(s for s in SETTINGS if s not in DERIVED)}")
    if name in DERIVED:
        raise ConfigError(f"federation setting {name!r} is derived from the data or the "
                          "federation and cannot be set")
    kind = _FIELD_TYPES[name]
    try:
        return parse(kind, value)
    except SchemaError as exc:
        raise ConfigError(f"federation setting {name!r}: {exc}") from None


def parse_assignment(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (``--set``): the value read as JSON (numbers, true/false, lists; no NaN
    or Infinity), else as text; then checked by ``check_setting``."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r:.80}: expected KEY=VALUE")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        value = text
    try:
        return key, check_setting(key, value)
    except ConfigError as exc:
        raise ConfigError(f"--set {item!r:.80}: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")

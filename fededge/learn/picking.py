"""Which student a device trains: the largest zoo member within every budget of its profile.

This is how a heterogeneous federation ends up with a different student on every kind of board.
Three budgets decide (each a ``[budgets]`` field of the profile):

* parameters (``max_params``);
* training memory (``max_train_memory_mb``): weights, gradients and two Adam moments, plus the
  activations of a batch of the configured ``batch_size`` and their gradients, all computed
  from the architecture records (``zoo.StudentCost``);
* per-sample latency (``max_latency_ms``): the student's forward FLOPs against the profile's
  *sustained* throughput (``DeviceProfile.sustained``, derated from the peak with the reason in
  each TOML), of which batch-1 inference of a small network reaches only a share.

Costs come from the zoo's architecture records (or a user zoo's measured modules, registered
with the zoo), so picking needs no torch: provisioning and the edge side pick too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fededge.learn import zoo
from fededge.profiles import DeviceProfile, ProfileError, _display, load_catalog

# Latency model (an estimate, not a benchmark). Small students are bound by memory traffic,
# framework dispatch and thread synchronisation as much as by arithmetic, so batch-1 inference
# reaches only a share of the sustained FP32 throughput. The shares below are deliberately
# conservative assumptions for edge boards (in-order Cortex-A53s, a GPU that one small kernel
# per layer cannot fill, which also pays a fixed cost for kernel launches and host↔device
# copies on every call). They are not measured on the boards: on this project's AVX-512 x86
# server core, onnxruntime with one thread ran the conv zoo at batch 1 at 10-50 GFLOPS, a much
# larger share (benchmarks/bench_zoo.py, BENCHMARKS.md), so on x86 the estimate errs slow.
EFFICIENCY = {"cpu": 0.08, "gpu": 0.03}
CALL_OVERHEAD_MS = {"cpu": 0.05, "gpu": 0.3}
DEFAULT_BATCH_SIZE = 32
"""The federation's default ``batch_size`` (``config.FederationConfig``), for callers that pick
without a federation config."""

BUDGET_FIELDS = {"params": "budgets.max_params",
                 "train_memory": "budgets.max_train_memory_mb",
                 "latency": "budgets.max_latency_ms"}
LARGEST = "largest"
"""The ``binding`` of a choice that is the largest student there is: no budget bound it."""


class NoStudentFitsError(ProfileError):
    """Even the smallest student exceeds one of a profile's budgets."""


@dataclass(frozen=True)
class StudentChoice:
    """The student picked for a profile; ``student`` is None when nothing fits (``reason``
    then says why). ``binding`` names the budget that ruled out the next larger student
    (``params``, ``train_memory`` or ``latency``; ``largest`` when there is none), or, when
    nothing fits, the one the smallest exceeds most."""

    profile: DeviceProfile
    student: str | None
    cost: zoo.StudentCost | None
    latency_ms: float | None
    inference_only: bool
    reason: str | None = None
    binding: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The JSON form ``fededge devices --json`` prints."""
        cost = self.cost
        return {"profile": self.profile.name, "student": self.student,
                "params": cost.params if cost else None, "flops": cost.flops if cost else None,
                "train_memory_bytes": cost.train_memory_bytes if cost else None,
                "latency_ms": self.latency_ms, "binding": self.binding,
                "inference_only": self.inference_only, "reason": self.reason}


def estimate_latency_ms(cost: zoo.StudentCost, profile: DeviceProfile) -> float:
    """Estimated batch-1 inference latency of a student on a device.

    forward FLOPs / (sustained GFLOPS · 1e9 · EFFICIENCY[unit]) · 1e3 + CALL_OVERHEAD_MS[unit].
    A coarse, documented estimate for ranking students against a budget; measure real
    latencies with ``fededge bench`` on the device.
    """
    unit = profile.compute_unit
    seconds = cost.flops / (profile.sustained * 1e9 * EFFICIENCY[unit])
    return seconds * 1e3 + CALL_OVERHEAD_MS[unit]


def pick_student(
    profile: DeviceProfile, input_shape: Sequence[int], num_classes: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> StudentChoice:
    """The largest zoo member (registered user students included) that fits every budget of
    ``profile``, training with batches of ``batch_size``.

    Training memory only counts when the profile can train; otherwise the choice is
    ``inference_only`` (the device runs a student trained elsewhere).
    """
    ladder = zoo.zoo_for(input_shape)
    larger: dict[str, float] | None = None
    for name in reversed(ladder):
        cost = zoo.estimate_cost(name, input_shape, num_classes, batch_size)
        latency = estimate_latency_ms(cost, profile)
        over = _overshoot(cost, latency, profile, trains=profile.can_train)
        if not over:
            return StudentChoice(profile, name, cost, latency, not profile.can_train,
                                 binding=_worst(larger) if larger else LARGEST)
        larger = over
    raise NoStudentFitsError(_no_fit_message(profile, ladder[0], input_shape, num_classes,
                                             batch_size))


def describe_catalog(
    input_shape: Sequence[int],
    num_classes: int,
    catalog: dict[str, DeviceProfile] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[StudentChoice]:
    """One choice per profile (for ``fededge devices``); a profile where nothing fits gets
    ``student=None`` and a ``reason`` instead of aborting the whole table."""
    catalog = load_catalog() if catalog is None else catalog
    choices = []
    for profile in catalog.values():
        try:
            choices.append(pick_student(profile, input_shape, num_classes, batch_size))
        except NoStudentFitsError as exc:
            smallest = zoo.estimate_cost(zoo.zoo_for(input_shape)[0], input_shape,
                                         num_classes, batch_size)
            over = _overshoot(smallest, estimate_latency_ms(smallest, profile), profile,
                              trains=profile.can_train)
            choices.append(StudentChoice(profile, None, None, None, not profile.can_train,
                                         reason=str(exc), binding=_worst(over)))
    return choices


def inference_exceeds(
    profile: DeviceProfile, student: str, input_shape: Sequence[int], num_classes: int
) -> dict[str, str]:
    """The budgets ``student`` exceeds when ``profile`` only runs it (an agent-only device
    receives a model trained elsewhere, so training memory does not count)."""
    cost = zoo.estimate_cost(student, input_shape, num_classes)
    return _exceeded_budgets(cost, estimate_latency_ms(cost, profile), profile, trains=False)


def _overshoot(
    cost: zoo.StudentCost, latency_ms: float, profile: DeviceProfile, *, trains: bool
) -> dict[str, float]:
    """need / budget of each budget the student exceeds (keys of ``BUDGET_FIELDS``)."""
    budgets = profile.budgets
    ratios = {"params": cost.params / budgets.max_params,
              "train_memory": (cost.train_memory_bytes / 2**20 / budgets.max_train_memory_mb
                               if trains else 0.0),
              "latency": latency_ms / budgets.max_latency_ms}
    return {budget: ratio for budget, ratio in ratios.items() if ratio > 1}


def _worst(overshoot: dict[str, float]) -> str:
    return max(overshoot, key=overshoot.__getitem__)


def _exceeded_budgets(
    cost: zoo.StudentCost, latency_ms: float, profile: DeviceProfile, *, trains: bool
) -> dict[str, str]:
    """Each budget the student exceeds: 'budgets.<field>' → 'needs X, budget Y'; training
    memory only when the device ``trains`` the student."""
    budgets = profile.budgets
    details = {
        "params": f"needs {cost.params:,}, budget {budgets.max_params:,}",
        "train_memory": (f"needs {cost.train_memory_bytes / 2**20:.1f}, budget "
                         f"{budgets.max_train_memory_mb:g}"),
        "latency": f"needs ~{latency_ms:.2f}, budget {budgets.max_latency_ms:g}",
    }
    return {BUDGET_FIELDS[budget]: details[budget]
            for budget in _overshoot(cost, latency_ms, profile, trains=trains)}


def _no_fit_message(
    profile: DeviceProfile, smallest: str, input_shape: Sequence[int], num_classes: int,
    batch_size: int,
) -> str:
    cost = zoo.estimate_cost(smallest, input_shape, num_classes, batch_size)
    exceeded = _exceeded_budgets(cost, estimate_latency_ms(cost, profile), profile,
                                 trains=profile.can_train)
    details = "; ".join(f"{budget} ({detail})" for budget, detail in exceeded.items())
    where = _display(profile.path) if profile.path else f"the {profile.name!r} profile"
    return (
        f"no student fits device profile {profile.name!r} for input {tuple(input_shape)} "
        f"with {num_classes} classes: the smallest, {smallest}, exceeds {details}. "
        f"Raise {' and '.join(exceeded)} in {where} if the device can afford it."
    )

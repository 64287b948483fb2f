"""Which student a device trains: the largest zoo member within every budget of its profile.

This is how a heterogeneous federation ends up with a different student on every kind of board.
Costs come from the zoo's architecture records, so picking needs no torch (provisioning and the
edge side pick too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fededge.learn import zoo
from fededge.profiles import DeviceProfile, ProfileError, _display, load_catalog

# Latency model (an estimate, not a benchmark). Students this small are bound by memory
# traffic, framework dispatch and thread synchronisation, not arithmetic: onnxruntime on an
# edge CPU reaches a few percent of FP32 peak for them. A GPU does worse relative to its peak
# at batch 1 (one tiny kernel per layer cannot fill it) and pays a fixed cost for kernel
# launches and host↔device copies on every call.
EFFICIENCY = {"cpu": 0.05, "gpu": 0.02}
CALL_OVERHEAD_MS = {"cpu": 0.05, "gpu": 0.3}



class NoStudentFitsError(ProfileError):
    """Even the smallest student exceeds one of a profile's budgets."""



@dataclass(frozen=True)
class StudentChoice:
    """The student picked for a profile; ``student`` is None when nothing fits (``reason``
    then says why)."""

    profile: DeviceProfile
    student: str | None
    cost: zoo.StudentCost | None
    latency_ms: float | None
    inference_only: bool
    reason: str | None = None




def estimate_latency_ms(cost: zoo.StudentCost, profile: DeviceProfile) -> float:
    """Estimated batch-1 inference latency of a student on a device.

    forward FLOPs / (peak GFLOPS · 1e9 · EFFICIENCY[unit]) · 1e3 + CALL_OVERHEAD_MS[unit].
    A coarse, documented estimate for ranking students against a budget; measure real
    latencies with ``fededge bench`` on the device.
    """
    unit = profile.compute_unit
    seconds = cost.flops / (profile.peak_gflops * 1e9 * EFFICIENCY[unit])
    return seconds * 1e3 + CALL_OVERHEAD_MS[unit]


def pick_student(
    profile: DeviceProfile, input_shape: Sequence[int], num_classes: int
) -> StudentChoice:
    """The largest zoo member that fits every budget of ``profile``.

    Training memory only counts when the profile can train; otherwise the choice is
    ``inference_only`` (the device runs a student trained elsewhere).
    """
    ladder = zoo.zoo_for(input_shape)
    for name in reversed(ladder):
        cost = zoo.estimate_cost(name, input_shape, num_classes)
        latency = estimate_latency_ms(cost, profile)
        if not _exceeded_budgets(cost, latency, profile, trains=profile.can_train):
            return StudentChoice(profile, name, cost, latency, not profile.can_train)
    raise NoStudentFitsError(_no_fit_message(profile, ladder[0], input_shape, num_classes))


def describe_catalog(
    input_shape: Sequence[int],
    num_classes: int,
    catalog: dict[str, DeviceProfile] | None = None,
) -> list[StudentChoice]:
    """One choice per profile (for ``fededge devices``); a profile where nothing fits gets
    ``student=None`` and a ``reason`` instead of aborting the whole table."""
    catalog = load_catalog() if catalog is None else catalog
    choices = []
    for profile in catalog.values():
        try:
            choices.append(pick_student(profile, input_shape, num_classes))
        except NoStudentFitsError as exc:
            choices.append(
                StudentChoice(profile, None, None, None, not profile.can_train, reason=str(exc))
            )
    return choices


def inference_exceeds(
    profile: DeviceProfile, student: str, input_shape: Sequence[int], num_classes: int
) -> dict[str, str]:
    """The budgets ``student`` exceeds when ``profile`` only runs it (an agent-only device
    receives a model trained elsewhere, so training memory does not count)."""
    cost = zoo.estimate_cost(student, input_shape, num_classes)
    return _exceeded_budgets(cost, estimate_latency_ms(cost, profile), profile, trains=False)


def _exceeded_budgets(
    cost: zoo.StudentCost, latency_ms: float, profile: DeviceProfile, *, trains: bool
) -> dict[str, str]:
    """Each budget the student exceeds: 'budgets.<field>' → 'needs X, budget Y'; training
    memory only when the device ``trains`` the student."""
    budgets = profile.budgets
    exceeded = {}
    if cost.params > budgets.max_params:
        exceeded["budgets.max_params"] = (
            f"needs {cost.params:,}, budget {budgets.max_params:,}"
        )
    train_mb = cost.train_memory_bytes / 2**20
    if trains and train_mb > budgets.max_train_memory_mb:
        exceeded["budgets.max_train_memory_mb"] = (
            f"needs {train_mb:.1f}, budget {budgets.max_train_memory_mb:g}"
        )
    if latency_ms > budgets.max_latency_ms:
        exceeded["budgets.max_latency_ms"] = (
            f"needs ~{latency_ms:.2f}, budget {budgets.max_latency_ms:g}"
        )
    return exceeded


def _no_fit_message(
    profile: DeviceProfile, smallest: str, input_shape: Sequence[int], num_classes: int
) -> str:
    cost = zoo.estimate_cost(smallest, input_shape, num_classes)
    exceeded = _exceeded_budgets(cost, estimate_latency_ms(cost, profile), profile,
                                 trains=profile.can_train)
    details = "; ".join(f"{budget} ({detail})" for budget, detail in exceeded.items())
    where = _display(profile.path) if profile.path else f"the {profile.name!r} profile"
    return (
        f"no student fits device profile {profile.name!r} for input {tuple(input_shape)} "
        f"with {num_classes} classes: the smallest, {smallest}, exceeds {details}. "
        f"Raise {' and '.join(exceeded)} in {where} if the device can afford it."
    )

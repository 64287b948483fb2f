"""Device profiles: load ``devices/*.toml`` and validate them (``learn.picking`` turns a
profile into the student it trains).

A profile describes one kind of hardware (vendor figures) plus the operator's budgets for it.

Every validation error is a ``ProfileError`` whose message names the file and the field, e.g.
``devices/pi-4-4gb.toml: field 'budgets.max_params' must be a positive integer, got 'abc'``,
because operators edit these files by hand on the device.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib
from fededge.errors import FedEdgeError

REFERENCE_GFLOPS = 332.8
"""Peak FP32 GFLOPS of the reference profile, ``x86-gateway`` (copied from its TOML), so that
``relative_compute`` means "how fast is this device next to the gateway"."""

ARCHES = frozenset({"aarch64", "armv7l", "x86_64"})
COMPUTE_UNITS = frozenset({"cpu", "gpu"})
DEFAULT_SUSTAINED_FRACTION = 0.6
"""A profile without ``sustained_gflops`` is assumed to sustain this share of its peak: the low
end of the shipped catalog's deratings (0.55–0.75), so an unknown board is not flattered."""

class ProfileError(FedEdgeError, ValueError):
    """A device profile that cannot be loaded or used; the message names file and field."""


@dataclass(frozen=True)
class Budgets:
    """Operator policy caps (not hardware limits) for the student a device trains and runs."""

    max_params: int
    max_train_memory_mb: float
    max_latency_ms: float


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of edge hardware, as described by ``devices/<name>.toml``."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    clock_ghz: float
    ram_mb: int
    accelerator: str
    compute_unit: str
    peak_gflops: float
    power_w: float
    ort_providers: tuple[str, ...]
    can_train: bool
    threads: int
    budgets: Budgets
    notes: str = ""
    sustained_gflops: float | None = None
    path: Path | None = field(default=None, compare=False)  # provenance, for messages

    @property
    def relative_compute(self) -> float:
        """Peak compute relative to the x86 gateway (1.0); simulation slows clients by it."""
        return self.peak_gflops / REFERENCE_GFLOPS

    @property
    def sustained(self) -> float:
        """FP32 GFLOPS the device keeps up for minutes of dense work: thermal limits, all-core
        clocks and memory bandwidth derate the peak. Each shipped profile gives its figure and
        the reason in its TOML; picking's latency estimate starts from this, not the peak."""
        if self.sustained_gflops is not None:
            return self.sustained_gflops
        return self.peak_gflops * DEFAULT_SUSTAINED_FRACTION


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class _Field:
    expected: str  # completes "field 'x' must be ..."
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value
    required: bool = True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """Finite int or float: TOML also allows inf and nan, which no figure here may be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_provider_list(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(p, str) and p.endswith("ExecutionProvider") for p in value)
    )


_TEXT = _Field("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
_POSITIVE_INT = _Field("a positive integer", lambda v: _is_int(v) and v > 0)
_POSITIVE_NUMBER = _Field("a positive number", lambda v: _is_number(v) and v > 0, float)

_TOP_FIELDS: dict[str, _Field] = {
    "description": _TEXT,
    "arch": _Field(
        f"one of {', '.join(sorted(ARCHES))}", lambda v: isinstance(v, str) and v in ARCHES
    ),
    "cpu": _TEXT,
    "cores": _POSITIVE_INT,
    "clock_ghz": _POSITIVE_NUMBER,
    "ram_mb": _POSITIVE_INT,
    "accelerator": _TEXT,
    "compute_unit": _Field(
        f"one of {', '.join(sorted(COMPUTE_UNITS))}",
        lambda v: isinstance(v, str) and v in COMPUTE_UNITS,
    ),
    "peak_gflops": _POSITIVE_NUMBER,
    "sustained_gflops": _Field(_POSITIVE_NUMBER.expected, _POSITIVE_NUMBER.accepts, float,
                               required=False),
    "power_w": _POSITIVE_NUMBER,
    "ort_providers": _Field(
        "a non-empty list of onnxruntime provider names ending in 'ExecutionProvider'",
        _is_provider_list,
        tuple,
    ),
    "can_train": _Field("a boolean (true or false)", lambda v: isinstance(v, bool)),
    "threads": _POSITIVE_INT,
    "notes": _Field("a string", lambda v: isinstance(v, str), required=False),
}

_BUDGET_FIELDS: dict[str, _Field] = {
    "max_params": _POSITIVE_INT,
    "max_train_memory_mb": _POSITIVE_NUMBER,
    "max_latency_ms": _POSITIVE_NUMBER,
}


# --------------------------------------------------------------------------- loading


def catalog_dir() -> Path:
    """Where the shipped profiles live.

    ``$FEDEDGE_DEVICES`` wins (operators keep their own catalog); then ``fededge/devices``,
    where a wheel install puts the catalog; then the repository's ``devices/`` (editable
    installs and a source checkout).
    """
    override = os.environ.get("FEDEDGE_DEVICES")
    if override:
        return Path(override)
    packaged = Path(__file__).parent / "devices"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "devices"


def load_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    """Load and validate one profile; its name is the file stem."""
    path = Path(path)
    where = _display(path)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read profile: {exc.strerror or exc}") from None
    return _parse(raw, path, where)


def load_catalog(directory: str | os.PathLike[str] | None = None) -> dict[str, DeviceProfile]:
    """All ``*.toml`` profiles of a directory (default ``catalog_dir()``), sorted by name."""
    root = Path(directory) if directory is not None else catalog_dir()
    if not root.is_dir():
        raise ProfileError(f"{_display(root)}: device catalog directory does not exist")
    paths = sorted(root.glob("*.toml"))
    if not paths:
        raise ProfileError(f"{_display(root)}: no device profiles (*.toml) found")
    return {path.stem: load_profile(path) for path in paths}


def get_profile(name: str, catalog: dict[str, DeviceProfile] | None = None) -> DeviceProfile:
    """The profile called ``name``; the error suggests the closest known name."""
    catalog = load_catalog() if catalog is None else catalog
    if name in catalog:
        return catalog[name]
    close = difflib.get_close_matches(name, list(catalog), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ProfileError(
        f"unknown device profile {name!r}{hint}; known profiles: {', '.join(sorted(catalog))}"
    )


def usable_threads(profile: DeviceProfile) -> int:
    """The profile's thread count, capped at this machine's cores: more threads than cores
    only add contention (and a profile may be used on a smaller machine than it describes)."""
    return min(profile.threads, os.cpu_count() or 1)


def _display(path: Path) -> str:
    """The path relative to the working directory when it is below it, for short messages."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _parse(raw: dict[str, Any], path: Path, where: str) -> DeviceProfile:
    top = _fields(raw, _TOP_FIELDS, where, prefix="", ignore={"budgets"})
    budgets_raw = raw.get("budgets")
    if budgets_raw is None:
        raise ProfileError(f"{where}: missing required table [budgets]")
    if not isinstance(budgets_raw, dict):
        raise ProfileError(f"{where}: field 'budgets' must be a table, got {budgets_raw!r}")
    budgets = Budgets(**_fields(budgets_raw, _BUDGET_FIELDS, where, prefix="budgets."))
    profile = DeviceProfile(name=path.stem, budgets=budgets, path=path, **top)
    _check_consistency(profile, where)
    return profile


def _fields(
    table: dict[str, Any],
    schema: dict[str, _Field],
    where: str,
    *,
    prefix: str,
    ignore: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Validate one TOML table against a schema; return the converted values."""
    unknown = [key for key in table if key not in schema and key not in ignore]
    if unknown:
        misplaced = not prefix and unknown[0] in _BUDGET_FIELDS
        hint = "it belongs under [budgets]" if misplaced else "known fields: " + ", ".join(
            prefix + key for key in schema
        )
        raise ProfileError(f"{where}: unknown field '{prefix}{unknown[0]}' ({hint})")
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        if key not in table:
            if spec.required:
                raise ProfileError(f"{where}: missing required field '{prefix}{key}'")
            continue
        value = table[key]
        if not spec.accepts(value):
            raise ProfileError(
                f"{where}: field '{prefix}{key}' must be {spec.expected}, got {value!r}"
            )
        values[key] = spec.convert(value)
    return values


def _check_consistency(profile: DeviceProfile, where: str) -> None:
    """Cross-field rules that a single field's type cannot express."""
    if profile.threads > 2 * profile.cores:
        raise ProfileError(
            f"{where}: field 'threads' must be at most 2 × cores = {2 * profile.cores}, "
            f"got {profile.threads}"
        )
    if profile.sustained_gflops is not None and profile.sustained_gflops > profile.peak_gflops:
        raise ProfileError(
            f"{where}: field 'sustained_gflops' must not exceed peak_gflops = "
            f"{profile.peak_gflops:g}, got {profile.sustained_gflops:g}"
        )
    if profile.budgets.max_train_memory_mb > profile.ram_mb:
        raise ProfileError(
            f"{where}: field 'budgets.max_train_memory_mb' must not exceed ram_mb = "
            f"{profile.ram_mb}, got {profile.budgets.max_train_memory_mb:g}"
        )

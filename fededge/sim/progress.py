"""Progress of a simulation by phase, each with its own clock and ETA, for any display.

A run goes through ``data`` (split, devices, students), ``warm-up`` (every device trains on its
own data), ``rounds`` and, meanwhile, ``baselines`` (local-only and centralized references,
trained in a thread). ``Phases`` stamps each step with the phase's elapsed time and an ETA from
its pace so far, so the terminal, a notebook and a CI log show the same figures.
``print_steps`` is the plain display: a line per event worth a line, for logs and notebooks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from fededge.federation.report import RoundRow

PHASES = ("data", "warm-up", "rounds", "baselines")


@dataclass(frozen=True)
class Step:
    """``done`` of ``total`` units of ``phase`` (devices, rounds, models); ``row`` is the round
    just reported in the rounds phase."""

    phase: str
    done: int
    total: int
    message: str = ""
    row: RoundRow | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total


OnStep = Callable[[Step], None]


class Phases:
    """Times each phase from its first step; thread-safe (baselines report from a thread)."""

    def __init__(self, on_step: OnStep) -> None:
        self._on_step = on_step
        self._started: dict[str, tuple[float, int]] = {}
        self._lock = threading.RLock()

    def begin(self, phase: str, done: int, total: int, message: str = "") -> None:
        """Open ``phase`` unless one of its steps already did."""
        with self._lock:
            if phase not in self._started:
                self.step(phase, done, total, message)

    def step(self, phase: str, done: int, total: int, message: str = "",
             row: RoundRow | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            start, first = self._started.setdefault(phase, (now, done))
            elapsed = now - start
            eta = None
            if done >= total:
                eta = 0.0
            elif done > first and elapsed > 0:
                eta = elapsed / (done - first) * (total - done)
            self._on_step(Step(phase, done, total, message, row, elapsed, eta))


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA —"
    seconds = round(seconds)
    return f"ETA {seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"ETA {seconds} s"


def describe(step: Step) -> str:
    """One line for a step: what it is, how far, how long, how long still."""
    if step.phase == "dashboard":
        return f"dashboard: {step.message}"
    if step.phase == "rounds" and step.row is not None:
        acc = step.row.mean_accuracy
        text = (f"round {step.done}/{step.total}: mean accuracy "
                f"{'—' if acc is None else f'{100 * acc:.1f}%'}")
    else:
        text = f"{step.phase} {step.done}/{step.total}" + (f": {step.message}"
                                                           if step.message else "")
    timing = f"{step.elapsed_s:.1f} s" if step.finished else eta_text(step.eta_s)
    return f"{text} ({timing})"


def print_steps(write: Callable[[str], None] = print) -> OnStep:
    """A display for logs and notebooks: a line when a phase starts, for every round, and when
    a phase ends; no line per device or per baseline model."""
    seen: set[str] = set()
    lock = threading.Lock()

    def on_step(step: Step) -> None:
        with lock:
            first = step.phase not in seen
            seen.add(step.phase)
            if first or step.finished or step.row is not None:
                write(describe(step))
    return on_step

"""What every fededge command prints through: one console, the one-line error exit, and
percentages. Torch-free (the device commands import it)."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)  # long paths stay on one line, whole


USER_ERRORS = {
    "fededge.learn.aggregate": "UnknownAggregatorError", "fededge.transport.brokers": "BrokerError",
    "fededge.config": "ConfigError", "fededge.learn.data": "DataError",
    "fededge.kits.fedfile": "FederationFileError", "fededge.kits.kit": "KitError",
    "fededge.kits.manifest": "ManifestError", "fededge.learn.models": "UnknownStudentError",
    "fededge.kits.pki": "PkiError", "fededge.profiles": "ProfileError",
    "fededge.kits.provision": "ProvisionError", "fededge.federation.server": "FederationError",
    "fededge.sim.simulate": "SimulationError", "fededge.federation.store": "StoreError",
    "fededge.federation.strategies": "UnknownStrategyError", "fededge.transport.mqtt": "TransportError",
}
"""Exceptions that mean bad input or environment rather than a bug, by defining module."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The ``USER_ERRORS`` classes whose modules are loaded, for ``except user_errors()``.

    Read from ``sys.modules`` instead of imported: an exception can only come from a module
    that is loaded, and importing the rest would pull in torch, which a device with only the
    ``edge`` extra lacks (the error message would become an ImportError traceback)."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items()
                 if module in sys.modules)


def fail(problem: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <problem>`` verbatim and exit: code 2 for bad input, 1 for a verdict.
    Verbatim because messages name TOML tables ("[federation]") that rich would otherwise take
    for markup and drop."""
    console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
    raise typer.Exit(code=code)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"

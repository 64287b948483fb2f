"""What every fededge command prints through: one console, the one-line error exit, and
percentages. Torch-free (the device commands import it)."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(soft_wrap=True)  # long paths stay on one line, whole


def fail(problem: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <problem>`` verbatim and exit: code 2 for bad input, 1 for a verdict.
    Verbatim because messages name TOML tables ("[federation]") that rich would otherwise take
    for markup and drop."""
    console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
    raise typer.Exit(code=code)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"

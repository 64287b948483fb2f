"""What every fededge command prints through: one console, the one-line error exit, and
percentages. Torch-free (the device commands import it)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


@contextmanager
def interruptible(resume: str) -> Iterator[None]:
    """Ctrl-C, and SIGTERM (what systemd and ``kill`` send) turned into it, end the command
    cleanly: the code inside unwinds (state kept, connections and brokers closed), then one
    line saying how to resume, and exit status 130."""
    main = threading.current_thread() is threading.main_thread()  # signals reach only it
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        yield
    except KeyboardInterrupt:
        console.print(f"[bold yellow]interrupted:[/] {escape(resume)}", highlight=False)
        raise typer.Exit(code=INTERRUPTED) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"

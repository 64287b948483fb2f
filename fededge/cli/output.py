"""What every fededge command prints through: results on stdout (``console``), progress,
warnings and notes on stderr (``err_console``), the one-line error exit, and percentages.
Torch-free (the device commands import it).

Results go to stdout so that ``fededge simulate > results.txt`` or ``fededge devices | cat``
keep only them; progress and warnings go to stderr, where ``-q`` silences them. Warnings of
fededge's own loggers are visible by default (quorum retries, rejected uploads); ``-v`` adds
the protocol's events, with their source and time.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# soft_wrap: long paths stay on one line, whole. emoji=False: a certificate fingerprint such
# as 07:AB:94 must not print as 07🆎94 (rich reads ':ab:' as an emoji code).
console = Console(soft_wrap=True, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, emoji=False)


class _ConsoleHandler(logging.Handler):
    """Log records as lines on ``err_console``, above any live progress display."""

    def __init__(self, detailed: bool) -> None:
        super().__init__()
        self.detailed = detailed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if self.detailed:
                message = f"{self.formatter.formatTime(record, '%H:%M:%S')} {record.name}: " \
                          f"{message}" if self.formatter else f"{record.name}: {message}"
            level = record.levelname.lower()
            style = {"warning": "yellow", "error": "bold red", "critical": "bold red"}.get(level)
            label = f"[{style}]{level}:[/] " if style else f"{level}: "
            err_console.print(label + escape(message), highlight=False)
        except Exception:  # a display problem must never break the command
            self.handleError(record)


def configure_output(verbose: bool = False, quiet: bool = False) -> None:
    """``-v``: fededge's protocol events too; ``-q``: only results and errors."""
    err_console.quiet = quiet
    handler = _ConsoleHandler(detailed=verbose)
    handler.setFormatter(logging.Formatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ConsoleHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.ERROR)  # other libraries (amqtt, paho): their errors only
    logging.getLogger("fededge").setLevel(
        logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING)


def note(message: str, *, style: str = "yellow", label: str = "note") -> None:
    """A remark beside the results (``-q`` silences it)."""
    err_console.print(f"[{style}]{label}:[/] {escape(message)}", highlight=False)


def print_error(problem: BaseException | str) -> None:
    """Print ``error: <problem>`` verbatim: messages name TOML tables ("[federation]") that
    rich would otherwise take for markup and drop."""
    console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)


def fail(problem: BaseException | str, code: int = 2) -> NoReturn:
    """Print ``error: <problem>`` and exit: code 2 for bad input, 1 for a verdict."""
    print_error(problem)
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

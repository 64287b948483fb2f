"""The simulation's progress on stderr: one bar per phase (data, warm-up, rounds, baselines),
each with its own clock and ETA, in a terminal; plain lines elsewhere (pipes, CI logs), where a
redrawn bar would only print its last frame. Nothing is shown before the first step, so an
argument error is the first and only thing a user sees."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column

from fededge.cli.output import err_console
from fededge.sim.progress import Step, eta_text, print_steps

UNITS = {"data": "", "warm-up": "devices", "rounds": "rounds", "baselines": "models"}


@contextmanager
def simulation_progress() -> Iterator[Callable[[Step], None]]:
    """An ``on_step`` for ``run_simulation`` that draws on ``err_console`` while in use."""
    if not err_console.is_terminal or err_console.quiet:
        yield print_steps(lambda line: err_console.print(escape(line), highlight=False))
        return
    # Fixed columns first; the status takes what is left of the width and is cut last.
    bars = Progress(TextColumn("[bold]{task.description:<9}"), BarColumn(bar_width=16),
                    TextColumn("{task.completed:>3}/{task.total:<3} {task.fields[unit]:<7}"),
                    TimeElapsedColumn(), TextColumn("{task.fields[eta]:<11}"),
                    TextColumn("{task.fields[status]}", table_column=Column(
                        ratio=1, no_wrap=True, overflow="ellipsis")),
                    console=err_console, expand=True)
    tasks: dict[str, TaskID] = {}

    def on_step(step: Step) -> None:
        if step.phase == "dashboard":
            bars.console.print(f"dashboard: {step.message}", highlight=False)
            return
        if not bars.live.is_started:
            bars.start()
        if step.phase not in tasks:
            tasks[step.phase] = bars.add_task(step.phase, total=step.total, status="",
                                              unit=UNITS.get(step.phase, ""), eta="")
        status = step.message
        if step.row is not None and step.row.mean_accuracy is not None:
            status = f"mean accuracy {100 * step.row.mean_accuracy:.1f}%"
        bars.update(tasks[step.phase], completed=step.done, total=step.total,
                    status=escape(status), eta="" if step.finished else eta_text(step.eta_s))
        if step.finished:
            bars.stop_task(tasks[step.phase])  # its clock stops; the others go on
    try:
        yield on_step
    finally:
        bars.stop()

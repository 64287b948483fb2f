"""Tables that read well at any width, in a terminal or piped (``fededge devices | cat``, CI
logs, ``tee``): columns that hold names users need (devices, profiles, students) are never cut;
when the table is too wide, headers are abbreviated first, then the least important columns
are left out (and named below the table), and at a width where even the names do not fit, the
rows are printed as plain ``name: value`` lines. Piped output is 80 columns wide unless
``COLUMNS`` says otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from fededge.cli.output import pct
from fededge.federation.report import RoundRow, human_bytes


@dataclass(frozen=True)
class Col:
    """A column: ``short`` is its abbreviated header; ``keep`` marks a name that must stay
    whole; ``drop`` orders what goes when space runs out (highest first; 0: never)."""

    header: str
    short: str | None = None
    justify: str = "left"
    keep: bool = False
    drop: int = 0


def fit_table(console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]],
              title: str | None = None) -> RenderableType:
    """The widest layout of ``rows`` that fits ``console.width``."""
    width = console.width
    shown = list(range(len(cols)))
    for short in (False, True):
        table = _table(cols, rows, shown, title, short)
        if _width(console, table) <= width:
            return table
    for victim in sorted((i for i, c in enumerate(cols) if c.drop),
                         key=lambda i: -cols[i].drop):
        shown.remove(victim)
        table = _table(cols, rows, shown, title, short=True)
        if _width(console, table) <= width:
            left_out = ", ".join(cols[i].header for i in range(len(cols)) if i not in shown)
            return Group(table, _wrapping(f"left out at {width} columns: {left_out} "
                                          "(wider: COLUMNS=160)", style="dim"))
    return _plain(cols, rows, title)


def _table(cols: Sequence[Col], rows: Sequence[Sequence[str]], shown: list[int],
           title: str | None, short: bool) -> Table:
    table = Table(title=_wrapping(title, style="table.title") if title else None)
    for i in shown:
        col = cols[i]
        table.add_column((col.short or col.header) if short else col.header,
                         justify=col.justify, no_wrap=col.keep, overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _wrapping(text: str, style: str) -> Text:
    """Text that wraps at the console's width even where the console prints long lines whole
    (``soft_wrap``, for paths)."""
    return Text(text, style=style, no_wrap=False, overflow="fold")


def _width(console: Console, table: Table) -> int:
    # The widest the table gets when nothing wraps (title excluded: rich wraps a title).
    title, table.title = table.title, None
    try:
        return Measurement.get(console, console.options.update(width=10_000), table).maximum
    finally:
        table.title = title


def _plain(cols: Sequence[Col], rows: Sequence[Sequence[str]],
           title: str | None) -> RenderableType:
    """One block per row: its first column, then ``header: value`` for the rest."""
    lines = [_wrapping(title, style="italic")] if title else []
    for row in rows:  # printed whole by fededge's console (soft_wrap), even past the width
        lines.append(Text.from_markup(row[0], style="bold"))
        lines += [Text.assemble(f"  {col.header}: ", Text.from_markup(value))
                  for col, value in zip(cols[1:], row[1:])]
    return Group(*lines)


ROUND_COLUMNS = (
    Col("round", keep=True), Col("clients", "n", justify="right", drop=2),
    Col("mean acc", "mean", justify="right"), Col("min acc", "min", justify="right", drop=3),
    Col("max acc", "max", justify="right", drop=4), Col("bytes up", "up", justify="right"),
    Col("bytes down", "down", justify="right"), Col("seconds", "s", justify="right", drop=1))


def rounds_table(console: Console, rows: Sequence[RoundRow],
                 title: str = "Rounds") -> RenderableType:
    """One line per round (0 = the warm-up): accuracy over the devices, traffic, duration."""
    cells = [("warm-up" if r.round == 0 else str(r.round), str(r.clients), pct(r.mean_accuracy),
              pct(r.min_accuracy), pct(r.max_accuracy), human_bytes(r.bytes_up),
              human_bytes(r.bytes_down), f"{r.seconds:.2f}") for r in rows]
    return fit_table(console, ROUND_COLUMNS, cells, title=title)

"""Turning the server's per-round metrics into rows, ``metrics.jsonl`` and a PNG plot (the
terminal table is ``cli.tables.rounds_table``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from fededge.files import atomic_write

if TYPE_CHECKING:  # the CLI imports this module on torch-free paths; server pulls in torch
    from fededge.federation.server import RoundRecord


@dataclass
class RoundRow:
    round: int
    clients: int
    mean_accuracy: float | None
    min_accuracy: float | None
    max_accuracy: float | None
    bytes_up: int
    bytes_down: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_rows(metrics: dict[int, dict[str, dict[str, Any]]], history: Sequence["RoundRecord"],
               upto: int | None = None) -> list[RoundRow]:
    """One row per round from the clients' reports; bytes are deltas of each client's cumulative
    counters, so they include everything the device sent and received since its last report."""
    last = max(metrics, default=0) if upto is None else upto
    previous: dict[str, dict[str, int]] = {}
    rows = []
    for rnd in range(0, last + 1):
        reports = metrics.get(rnd, {})
        accs = [r["accuracy"] for r in reports.values() if r.get("accuracy") is not None]
        up = down = 0
        for device, report in reports.items():
            before = previous.get(device, {"sent_bytes": 0, "received_bytes": 0})
            up += report["bytes"]["sent_bytes"] - before["sent_bytes"]
            down += report["bytes"]["received_bytes"] - before["received_bytes"]
            previous[device] = report["bytes"]
        seconds = history[rnd - 1].seconds if 1 <= rnd <= len(history) else 0.0
        rows.append(RoundRow(rnd, len(reports), sum(accs) / len(accs) if accs else None,
                             min(accs, default=None), max(accs, default=None), up, down, seconds))
    return rows


class MetricsLog:
    """``metrics.jsonl`` as a federation goes: each completed round's line is appended and
    flushed at once, so a run killed at any point keeps every round it completed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._written = -1  # the last round on file

    def restart(self, rows: Sequence[RoundRow]) -> None:
        """Start the file afresh with ``rows`` (a resumed run's completed rounds)."""
        atomic_write(self.path, "".join(json.dumps(r.to_dict()) + "\n" for r in rows))
        self._written = rows[-1].round if rows else -1

    def append(self, rows: Sequence[RoundRow]) -> None:
        """Append the rows of rounds not on file yet (the warm-up's comes with round 1's)."""
        new = [r for r in rows if r.round > self._written]
        if not new:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r.to_dict()) + "\n" for r in new))
            f.flush()
        self._written = new[-1].round


def union_seconds(intervals: Iterable[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of intervals clipped to [start, end]: wall time in which at least one
    client was computing (clients run concurrently, so summing would overcount)."""
    total, cursor = 0.0, start
    for lo, hi in sorted((max(lo, start), min(hi, end)) for lo, hi in intervals):
        if hi <= cursor:
            continue
        total += hi - max(lo, cursor)
        cursor = hi
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def write_plot(rows: Sequence[RoundRow], path: Path, title: str,
               local_only: float | None = None, centralized: float | None = None) -> None:
    """Accuracy (mean with min–max band, and the local-only and centralized references when
    known) and traffic per round, side by side; integer round ticks, legends below the axes
    so they hide no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in rows if r.mean_accuracy is not None]
    rounds = [r.round for r in scored]
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.6))
    ax_acc.plot(rounds, [100 * r.mean_accuracy for r in scored], marker="o",
                label="mean device accuracy")
    ax_acc.fill_between(rounds, [100 * r.min_accuracy for r in scored],
                        [100 * r.max_accuracy for r in scored], alpha=0.2, label="min–max")
    for value, label, style in ((local_only, "local-only (mean)", "--"),
                                (centralized, "centralized (mean)", ":")):
        if value is not None:
            ax_acc.axhline(100 * value, linestyle=style, color="grey" if style == ":" else
                           "tab:orange", label=f"{label} {100 * value:.1f}%")
    ax_acc.set(xlabel="round (0 = after warm-up)", ylabel="test accuracy (%)", title="accuracy")
    ax_acc.grid(alpha=0.3)
    fed = [r for r in rows if r.round >= 1]
    ax_bytes.bar([r.round - 0.2 for r in fed], [r.bytes_up / 1024 for r in fed], width=0.4,
                 label="up")
    ax_bytes.bar([r.round + 0.2 for r in fed], [r.bytes_down / 1024 for r in fed], width=0.4,
                 label="down")
    ax_bytes.set(xlabel="round", ylabel="KiB (all devices)", title="traffic")
    ax_bytes.grid(alpha=0.3, axis="y")
    for ax in (ax_acc, ax_bytes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False,
                  fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

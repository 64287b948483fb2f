"""Turning the server's per-round metrics into rows, a terminal table and a PNG plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rich.table import Table

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


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def rounds_table(rows: Sequence[RoundRow], title: str = "Rounds") -> Table:
    table = Table(title=title)
    for col in ("round", "clients", "mean acc", "min acc", "max acc", "bytes up", "bytes down",
                "seconds"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row("warm-up" if r.round == 0 else str(r.round), str(r.clients),
                      _pct(r.mean_accuracy), _pct(r.min_accuracy), _pct(r.max_accuracy),
                      human_bytes(r.bytes_up), human_bytes(r.bytes_down), f"{r.seconds:.2f}")
    return table


def write_plot(rows: Sequence[RoundRow], path: Path, title: str) -> None:
    """Accuracy (mean with min–max band) and traffic per round, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in rows if r.mean_accuracy is not None]
    mean = [100 * r.mean_accuracy for r in rows if r.mean_accuracy is not None]
    low = [100 * r.min_accuracy for r in rows if r.mean_accuracy is not None]
    high = [100 * r.max_accuracy for r in rows if r.mean_accuracy is not None]
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    ax_acc.plot(rounds, mean, marker="o", label="mean client accuracy")
    ax_acc.fill_between(rounds, low, high, alpha=0.2, label="min–max")
    ax_acc.set(xlabel="round (0 = after warm-up)", ylabel="test accuracy (%)", title="accuracy")
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    fed = [r for r in rows if r.round >= 1]
    ax_bytes.bar([r.round - 0.2 for r in fed], [r.bytes_up / 1024 for r in fed], width=0.4,
                 label="up")
    ax_bytes.bar([r.round + 0.2 for r in fed], [r.bytes_down / 1024 for r in fed], width=0.4,
                 label="down")
    ax_bytes.set(xlabel="round", ylabel="KiB (all clients)", title="traffic")
    ax_bytes.grid(alpha=0.3, axis="y")
    ax_bytes.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Markdown tables and PNG plots for ``bench_suite.py``'s records (one dict per run)."""

from __future__ import annotations

import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from fededge.config import FederationConfig
from fededge.learn.zoo import zoo_for
from fededge.wire.codecs import CODECS, bytes_per_value, codec_for

Record = dict[str, Any]
CLASSES = {"digits": 10, "wine": 3}
SHAPES = {"digits": (1, 8, 8), "wine": (13,)}
BYTES_RATIO = 50      # the bar: fedmd at least this many times lighter than FedAvg-largest
CODEC_POINTS = 0.01   # ... and int8/topk within one point of float16


def to_target(record: Record, target: float) -> tuple[int | None, float | None]:
    """(first round whose mean accuracy reaches ``target``, bytes per client spent until then
    inclusive), or (None, None)."""
    spent = 0.0
    for point in record["curve"]:
        spent += point["bytes_per_client"]
        if point["accuracy"] is not None and point["accuracy"] >= target:
            return point["round"], spent
    return None, None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _pct(v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f}%" + (f" ± {100 * spread:.1f}" if spread else "")


def _kib(v: float | None) -> str:
    return "—" if v is None else f"{v / 1024:,.1f}"


class _Group:
    """The seeds of one (dataset, α, method)."""

    def __init__(self, records: list[Record], target: float) -> None:
        self.records, self.target = records, target
        accs = [r["mean_accuracy"] for r in records]
        self.accuracy = statistics.fmean(accs)
        self.spread = statistics.stdev(accs) if len(accs) > 1 else None
        reached = [to_target(r, target) for r in records]
        hits = [x for x in reached if x[0] is not None]
        self.missed = len(records) - len(hits)
        self.rounds = _mean(x[0] for x in hits)
        self.bytes_to_target = _mean(x[1] for x in hits)
        self.bytes_per_round = statistics.fmean(r["bytes_per_client_round"] for r in records)
        self.seconds = statistics.fmean(r["seconds_per_round"] for r in records)
        self.outside = _mean(r["overhead_share"] for r in records)
        self.students = records[0]["students"]

    def row(self, label: str) -> str:
        rounds = "—" if self.rounds is None else f"{self.rounds:.1f}"
        if self.rounds is not None and self.missed:
            rounds += f" ({self.missed} of {len(self.records)} seeds never)"
        return (f"| {label} | {', '.join(self.students)} | {len(self.records)} | "
                f"{_pct(self.accuracy, self.spread)} | "
                f"{rounds} | {_kib(self.bytes_per_round)} | {_kib(self.bytes_to_target)} | "
                f"{self.seconds:.2f} | {_pct(self.outside)} |")


def _groups(records: list[Record], target: float) -> dict[tuple[str, str], dict[str, _Group]]:
    by_setting: dict[tuple[str, str], dict[str, list[Record]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if not r["method"].startswith("scale/"):
            by_setting[(r["dataset"], r["alpha"])][r["method"]].append(r)
    return {setting: {m: _Group(rs, target) for m, rs in methods.items()}
            for setting, methods in by_setting.items()}


def _paired_delta(a: _Group, b: _Group) -> tuple[float, int]:
    """Mean accuracy of ``a`` minus ``b`` over the seeds both ran (runs of different seeds
    differ by their splits, so unpaired means would compare splits, not methods)."""
    seeds_b = {r["seed"]: r["mean_accuracy"] for r in b.records}
    deltas = [r["mean_accuracy"] - seeds_b[r["seed"]] for r in a.records if r["seed"] in seeds_b]
    return (statistics.fmean(deltas) if deltas else float("nan")), len(deltas)


def _baselines(groups: dict[str, _Group]) -> list[str]:
    era = groups.get("fedmd/era/float16")
    if era is None or era.records[0]["local_only"] is None:
        return []
    rows = []
    for label, key in (("local-only", "local_only"), ("centralized", "centralized")):
        accs = [r[key] for r in era.records]
        spread = statistics.stdev(accs) if len(accs) > 1 else None
        rows.append(f"| {label} | {', '.join(era.students)} | {len(accs)} | "
                    f"{_pct(statistics.fmean(accs), spread)} | | | | | |")
    return rows


def _headline(dataset: str, groups: dict[str, _Group]) -> list[str]:
    """The issue's bars for fedmd (ERA, each codec) against FedAvg, and for the codecs."""
    zoo = zoo_for(SHAPES[dataset])
    fedmd = {m: g for m, g in groups.items() if m.startswith("fedmd/era/")}
    if not fedmd:
        return []
    common = min(next(iter(fedmd.values())).students, key=zoo.index)
    lines = []
    fedavg_common, fedavg_largest = groups.get(f"fedavg/{common}"), groups.get(f"fedavg/{zoo[-1]}")
    if fedavg_common and fedavg_largest:
        lines.append(f"- FedAvg of the largest student every device can run ({common}): "
                     f"{_pct(fedavg_common.accuracy)}; FedAvg of the largest student "
                     f"({zoo[-1]}): {_kib(fedavg_largest.bytes_per_round)} KiB per client per "
                     "round.")
        for method, g in sorted(fedmd.items()):
            ratio = fedavg_largest.bytes_per_round / g.bytes_per_round
            delta, paired = _paired_delta(g, fedavg_common)
            ok = delta >= 0 and ratio >= BYTES_RATIO
            lines.append(f"  - {method}: {_pct(g.accuracy)} ({100 * delta:+.1f} points vs "
                         f"FedAvg-{common} on the {paired} seed(s) both ran), {ratio:.0f}× "
                         f"fewer bytes than FedAvg-"
                         f"{zoo[-1]} — {'meets' if ok else 'misses'} the bar (≥ FedAvg-{common} "
                         f"accuracy at ≥ {BYTES_RATIO}× fewer bytes)")
    base = groups.get("fedmd/era/float16")
    for codec in CODECS[1:]:
        g = groups.get(f"fedmd/era/{codec}")
        if base and g:
            per_value = bytes_per_value(codec_for(FederationConfig(
                logit_codec=codec, num_classes=CLASSES[dataset])))
            delta, paired = _paired_delta(g, base)
            ok = delta >= -CODEC_POINTS and per_value <= 1.0
            lines.append(f"- {codec}: {per_value:.2f} bytes per proxy sample and class, "
                         f"{100 * delta:+.1f} points vs float16 on the {paired} seed(s) both "
                         f"ran — {'meets' if ok else 'misses'} "
                         "the bar (within 1 point at ≤ 1 byte)")
    return lines


def _codec_table() -> list[str]:
    lines = ["| codec | bytes per logit value, 10 classes | 3 classes |", "|---|---|---|"]
    for codec in CODECS:
        per = [bytes_per_value(codec_for(FederationConfig(logit_codec=codec, num_classes=k)))
               for k in (10, 3)]
        lines.append(f"| {codec} | {per[0]:.2f} | {per[1]:.2f} |")
    return lines


def _scale_table(records: list[Record]) -> list[str]:
    scale = sorted((r for r in records if r["method"].startswith("scale/")),
                   key=lambda r: r["clients"])
    if not scale:
        return []
    first = scale[0]
    lines = ["| clients | s per round | × vs first | clients × | s per client-round | peak RSS MiB "
             "| KiB per client per round | final accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in scale:
        lines.append(f"| {r['clients']} | {r['seconds_per_round']:.1f} | "
                     f"{r['seconds_per_round'] / first['seconds_per_round']:.1f} | "
                     f"{r['clients'] / first['clients']:.0f} | "
                     f"{r['seconds_per_round'] / r['clients']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{_kib(r['bytes_per_client_round'])} | {_pct(r['mean_accuracy'])} |")
    return lines


def _plot_setting(groups: dict[str, _Group], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, scatter) = plt.subplots(1, 2, figsize=(13, 5))
    for (method, g), color in zip(sorted(groups.items()), plt.cm.tab20.colors):
        r = g.records[0]
        spent, xs, ys = 0.0, [], []
        for point in r["curve"]:
            spent += point["bytes_per_client"]
            if point["accuracy"] is not None:
                xs.append(spent / 1024)
                ys.append(100 * point["accuracy"])
        style = "-" if method.startswith("fedmd") else "--"
        curves.plot(xs, ys, style, marker=".", label=method, color=color)
        scatter.scatter(g.bytes_per_round / 1024, 100 * g.accuracy, color=color)
        scatter.annotate(method, (g.bytes_per_round / 1024, 100 * g.accuracy), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    curves.set(xscale="log", xlabel="KiB per client, cumulative (log)",
               ylabel="mean client test accuracy (%)", title=f"accuracy per byte (seed "
               f"{next(iter(groups.values())).records[0]['seed']})", ylim=(50, 100))
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7, loc="upper left")
    scatter.set(xscale="log", xlabel="KiB per client per round (log)",
                ylabel="final mean accuracy (%)", title="final accuracy vs traffic")
    scatter.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scale(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = sorted((r for r in records if r["method"].startswith("scale/")),
                   key=lambda r: r["clients"])
    if not scale:
        return
    n = [r["clients"] for r in scale]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4))
    time_ax.plot(n, [r["seconds_per_round"] for r in scale], marker="o", label="measured")
    time_ax.plot(n, [scale[0]["seconds_per_round"] * k / n[0] for k in n], "--",
                 label="linear from the first point")
    time_ax.set(xlabel="clients in one process", ylabel="seconds per round", title="round time")
    time_ax.legend()
    mem_ax.plot(n, [r["peak_rss_mib"] for r in scale], marker="o")
    mem_ax.set(xlabel="clients in one process", ylabel="peak RSS (MiB)", title="peak memory")
    for ax in (time_ax, mem_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(records: list[Record], out: Path, stem: str, target: float) -> Path:
    """Write ``<stem>.md`` and its plots into ``out``; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    skipped = [r for r in records if "skipped" in r]
    records = [r for r in records if "skipped" not in r]
    lines = [f"# Strategy suite ({stem})", "",
             f"{len(records)} runs on {platform.machine()} ({platform.processor() or 'cpu'}), "
             "one process per run, torch at one thread, embedded amqtt broker. Accuracy is the "
             "mean over clients of test accuracy after the last round (mean ± sd over seeds); "
             f"'rounds to {100 * target:.0f}%' counts round 0 (after warm-up); bytes are MQTT "
             "PUBLISH packets sent plus received per client, every message included.", ""]
    groups = _groups(records, target)
    for (dataset, alpha), methods in sorted(groups.items()):
        seeds = sorted({r["seed"] for g in methods.values() for r in g.records})
        lines += [f"## {dataset}, α = {alpha} (seeds {', '.join(map(str, seeds))})", ""]
        headline = _headline(dataset, methods)
        if headline:
            lines += headline + [""]
        lines += [f"| method | students | seeds | accuracy | rounds to {100 * target:.0f}% | "
                  f"KiB/client/round | KiB/client to {100 * target:.0f}% | s/round | outside "
                  "training |", "|---|---|---|---|---|---|---|---|---|"]
        lines += _baselines(methods)
        lines += [g.row(m) for m, g in sorted(methods.items())]
        plot = out / f"{stem}_{dataset}_{alpha}.png"
        _plot_setting(methods, f"{dataset}, α = {alpha}", plot)
        lines += ["", f"![{dataset} α={alpha}]({plot.name})", ""]
    lines += ["## Logit codecs on the wire", ""] + _codec_table() + [""]
    scale = _scale_table(records)
    if scale:
        _plot_scale(records, out / f"{stem}_scale.png")
        lines += ["## Scale: N clients in one process (fedmd, digits, iid)", ""] + scale
        lines += ["", f"![scale]({stem}_scale.png)", ""]
    if skipped:
        lines += ["## Not runnable", ""]
        lines += sorted({f"- {r['dataset']}, α = {r['alpha']}, {r['clients']} clients: "
                         f"{r['skipped']}" for r in skipped}) + [""]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path

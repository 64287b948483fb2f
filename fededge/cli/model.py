"""``fededge export`` and ``fededge infer``: command functions that ``cli.py`` registers.

``infer`` runs on devices without torch, so this module imports only torch-free modules (the
runtime, kits, install state, profiles), typer and rich at its top level; ``export`` imports
the exporter (and with it torch) lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import typer
from rich.console import RenderableType
from rich.table import Table

from fededge.cli.output import console, fail, note, pct
from fededge.cli.tables import Col, fit_table
from fededge.edge import runtime
from fededge.edge.installs import InstallError, Installs
from fededge.errors import FedEdgeError
from fededge.federation.report import human_bytes
from fededge.kits.kit import CLIENT_FILE, load_kit
from fededge.profiles import get_profile, usable_threads

if TYPE_CHECKING:
    from fededge.delivery.export import ExportResult



def export_cmd(
    run_dir: Path = typer.Argument(..., help="A run: the --out of `fededge simulate`, a server "
                                             "kit (KITS/server, once its federation collected "
                                             "the students), or a device kit (its own "
                                             "student)."),
    device: Optional[str] = typer.Option(None, "--device", help="Export this device's student."),
    all_devices: bool = typer.Option(False, "--all", help="Export every device's student."),
    quantize: Optional[str] = typer.Option(
        None, "--quantize", help="Also write model.int8.onnx: int8 (calibrated on the proxy set)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Export root; each student goes to OUT/<device>/ "
                            "(default RUN_DIR/export, for a kit KIT/state/export)."),
    state: Optional[Path] = typer.Option(
        None, "--state", help="A kit's state directory, when it is not KIT/state (the "
                              "--state of `fededge server` or `fededge client`)."),
) -> None:
    """Export trained students as verified ONNX bundles that run with onnxruntime alone."""
    from fededge.delivery.export import export_run

    try:
        with console.status("exporting and verifying against PyTorch..."):
            results = export_run(run_dir, device=device, all_devices=all_devices,
                                 quantize=quantize, out=out, state=state)
    except (FedEdgeError, OSError) as exc:  # OSError: e.g. an --out the user cannot write to
        fail(exc)
    console.print(_export_table(results))
    for r in results:
        if r.int8 is not None and r.int8.quantized_layers == 0:
            note(f"{r.device} ({r.student}) has only a first and a last layer, which stay "
                 "float32, so its model.int8.onnx is no smaller")
        if r.int8 is not None and r.int8.lossy:
            note(f"{r.device} ({r.student}) loses {-100 * r.int8.accuracy_delta:.1f} points of "
                 "test accuracy as int8; ship model.onnx there, or retrain before quantizing",
                 label="warning")
    for r in results:
        console.print(f"wrote {r.out_dir}", highlight=False)


EXPORT_COLUMNS = (
    Col("device", keep=True), Col("student", keep=True), Col("params", justify="right", drop=3),
    Col("fp32 size", "fp32", justify="right", drop=4), Col("int8 size", "int8", justify="right"),
    Col("fp32 acc", "acc", justify="right"), Col("int8 acc", "acc8", justify="right"),
    Col("Δ points", "Δ", justify="right", drop=2),
    Col("max |Δ logit|", "parity", justify="right", keep=True, drop=1))


def _export_table(results: list[ExportResult]) -> RenderableType:
    rows = []
    for r in results:
        q = r.int8
        rows.append((
            r.device, r.student, f"{r.params:,}", human_bytes(r.fp32_bytes),
            "—" if q is None else f"{human_bytes(q.bytes)} ({100 * q.size_ratio:.0f}%)",
            pct(r.accuracy), "—" if q is None else pct(q.accuracy),
            "—" if q is None else f"{100 * q.accuracy_delta:+.1f}", f"{r.max_abs_diff:.1e}"))
    return fit_table(console, EXPORT_COLUMNS, rows, title="Exported students (accuracy on the "
                     "run's test split, onnxruntime)")


def infer_cmd(
    model_dir: Path = typer.Argument(..., help="A model directory written by `fededge export`, "
                                               "or a device kit: the model its edge agent "
                                               "installed."),
    data: Path = typer.Argument(..., help=".npz with raw features X and optional labels y."),
    int8: bool = typer.Option(False, "--int8", help="Use model.int8.onnx."),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="Intra-op threads (default: the device profile's)."),
    show: int = typer.Option(10, "--show", min=0, help="How many predictions to list."),
    save_logits: Optional[Path] = typer.Option(
        None, "--save-logits", help="Also write the raw logits (N x classes, float32) to this "
                                    ".npy file, for comparison by other programs."),
) -> None:
    """Predict with an exported student using onnxruntime only (no torch needed)."""
    try:
        model_dir, providers, threads = _model_source(model_dir, threads)
        report = runtime.infer_file(model_dir, data, int8=int8, threads=threads,
                                    providers=providers)
        if save_logits is not None:
            np.save(save_logits, report.logits)
    # OSError: e.g. an unreadable file; the others only for a kit (its installed model)
    except (FedEdgeError, OSError) as exc:
        fail(exc)
    shown = min(show, len(report.labels))
    console.print(f"{report.model_file} ({model_dir.name}): {len(report.labels)} samples, "
                  f"first {shown} predictions", highlight=False)
    table = Table()
    for col in ("index", "class", "confidence"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for i in range(shown):
        table.add_row(str(i), report.class_names[report.labels[i]],
                      f"{100 * report.confidences[i]:.1f}%")
    console.print(table)
    if report.accuracy is not None:
        console.print(f"accuracy: [bold]{100 * report.accuracy:.2f}%[/]", highlight=False)
    lat = report.latency
    console.print(
        f"latency per sample: p50 {lat.p50_ms:.3f} ms, p95 {lat.p95_ms:.3f} ms "
        f"({lat.samples} single-sample runs)\nproviders: {', '.join(report.providers)} "
        f"(threads={report.threads})", highlight=False)
    if save_logits is not None:
        console.print(f"wrote logits {report.logits.shape} to {save_logits}", highlight=False)


def _model_source(path: Path, threads: int | None) -> tuple[Path, list[str] | None, int | None]:
    """The model directory to run, with providers and threads. For a device kit: the version
    its edge agent installed, run as the kit's device profile says; for an export directory:
    itself, run as its manifest's profile says (None: the runtime reads the manifest)."""
    if not (path / CLIENT_FILE).is_file():
        return path, None, threads
    kit = load_kit(path)
    installed = Installs.of_kit(path).current_dir()
    if installed is None:
        raise InstallError(f"{path}: the edge agent has installed no model yet; deploy one "
                           f"(`fededge deploy`) and run `fededge agent --kit {path}`")
    profile = get_profile(kit.profile)
    return installed, list(profile.ort_providers), threads or usable_threads(profile)

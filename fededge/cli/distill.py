"""``fededge distill``: a command function ``cli.app`` registers (the pipeline is
``delivery.distill``; this module parses, shows progress on stderr and prints the table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from fededge.cli.output import console, err_console, fail, pct
from fededge.cli.tables import Col, fit_table
from fededge.errors import FedEdgeError
from fededge.federation.report import human_bytes

DISTILL_COLUMNS = (
    Col("model", keep=True), Col("student", keep=True), Col("params", justify="right"),
    Col("size", justify="right", drop=3), Col("accuracy", "acc", justify="right", keep=True),
    Col("latency ms", "ms", justify="right", drop=2),
    Col("labels-only", "labels", justify="right", keep=True),
    Col("Δ points", "Δ", justify="right", drop=1))


def distill_cmd(
    teacher: Path = typer.Argument(..., help="The teacher: an .onnx file (fed the data's X as "
                                             "stored) or a fededge student checkpoint "
                                             "directory (RUN/clients/<device>)."),
    data: str = typer.Option(..., "--data", help="PATH.npz with X and y (or digits, wine)."),
    out: Path = typer.Option(..., "--out", help="Output root: OUT/<profile>/ bundles and "
                                                "OUT/summary.json."),
    profiles: Optional[str] = typer.Option(None, "--profiles", help="Comma-separated device "
                                           "profiles (default: the whole catalog)."),
    zoo: Optional[Path] = typer.Option(None, "--zoo", help="A Python file defining "
                                       "students(input_shape, num_classes) -> {name: torch "
                                       "module}; its students compete with the built-in ones."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the teacher's soft targets "
                                "in J (1 - alpha on the labels)."),
    temperature: float = typer.Option(2.0, "--temperature", help="Softmax temperature T of "
                                      "both distributions in the soft term."),
    epochs: int = typer.Option(30, "--epochs", help="Distillation epochs."),
    finetune_epochs: int = typer.Option(3, "--finetune-epochs", help="Epochs on the labels "
                                        "alone after distillation (0: none)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Also write "
                                           "model.int8.onnx: int8 (calibrated on the "
                                           "validation split)."),
    teacher_outputs: str = typer.Option("logits", "--teacher-outputs", help="What the teacher "
                                        "returns: logits or probabilities."),
    seed: int = typer.Option(0, "--seed", help="Seed for the split and the students."),
) -> None:
    """Distill your own teacher into the student each device profile picks, exported and
    verified, with the same student trained on labels alone beside it."""
    from fededge.delivery.distill import DistillOptions, distill

    opts = DistillOptions(
        teacher=teacher, data=data, out=out, zoo=zoo, alpha=alpha, temperature=temperature,
        profiles=tuple(p.strip() for p in profiles.split(",") if p.strip()) if profiles else None,
        epochs=epochs, finetune_epochs=finetune_epochs, quantize=quantize,
        teacher_outputs=teacher_outputs, seed=seed)
    try:
        with err_console.status("distilling...") as status:
            def progress(line: str) -> None:
                err_console.print(line, highlight=False)
                status.update(line)

            summary = distill(opts, progress)
    except (FedEdgeError, OSError) as exc:
        fail(exc)
    console.print(_table(summary))
    console.print(f"wrote {out / 'summary.json'} and a bundle per profile under {out}",
                  highlight=False)


def _table(summary: dict[str, Any]):
    t = summary["teacher"]
    rows = [("teacher", t["kind"], f"{t['params']:,}" if t["params"] is not None else "—",
             human_bytes(t["bytes"]), pct(t["accuracy"]), f"{t['latency_ms']:.3f}", "—", "—")]
    for s in summary["students"]:
        rows.append((s["profile"], s["student"], f"{s['params']:,}", human_bytes(s["bytes"]),
                     pct(s["accuracy"]), f"{s['latency_ms']:.3f}",
                     pct(s["labels_only_accuracy"]),
                     f"{100 * (s['accuracy'] - s['labels_only_accuracy']):+.1f}"))
    return fit_table(console, DISTILL_COLUMNS, rows,
                     title="Teacher and distilled students (test split, onnxruntime batch-1 "
                           "latency; Δ: KD minus labels-only)")

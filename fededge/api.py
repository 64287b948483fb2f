"""fededge from Python: ``fededge.simulate``, ``fededge.export``, ``fededge.distill`` and
``fededge.load_model``.

The command line is a shell over these functions, so a notebook gets exactly what ``fededge
simulate`` and ``fededge export`` do::

    import fededge
    run = fededge.simulate("digits", clients=4, rounds=5, out="runs/nb")
    run.mean_accuracy, run.rows[-1]             # the summary and one row per round
    labels, probs = run.students["dev000-pi-zero-2w"].predict(X)
    exported = fededge.export(run, all_devices=True)
    model = fededge.load_model(exported[0].out_dir)   # onnxruntime only

This module imports nothing heavy at its top: ``load_model`` of an export needs no torch (it
runs where ``fededge infer`` does); ``simulate`` and ``export`` import the training side when
called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from fededge.errors import FedEdgeError

if TYPE_CHECKING:
    import numpy as np

    from fededge.delivery.export import ExportResult, TrainedStudent
    from fededge.edge.runtime import EdgeModel
    from fededge.sim.progress import Step
    from fededge.sim.recipe import SimulationOptions
    from fededge.sim.simulate import SimulationResult

DataSpec = Union[str, "os.PathLike[str]", Mapping[str, "np.ndarray"], tuple, None]
DATA_FILE = "data.npz"


class ApiError(FedEdgeError, ValueError):
    """An argument of the Python API that cannot work; the message says what to pass."""


def simulate(data: DataSpec = None, *, clients: int = 10, rounds: int = 20,
             partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0,
             aggregator: str = "era", strategy: str = "fedmd",
             profiles: list[str] | None = None, student: str | None = None,
             codec: str | None = None, max_message: int = 0, straggle: float = 0.0,
             settings: Mapping[str, Any] | None = None, baselines: bool = True,
             broker: str = "embedded", out: str | os.PathLike[str] = "runs/latest",
             dashboard: int | None = None, dashboard_host: str = "127.0.0.1",
             zoo: str | os.PathLike[str] | None = None,
             progress: bool | Callable[[Step], None] = True,
             on_dashboard: Callable[[str], None] | None = None) -> SimulationResult:
    """Run a whole federation on this machine (broker, server, devices over real MQTT), as
    ``fededge simulate`` does, and return its ``SimulationResult``: ``summary`` (the dict of
    ``summary.json``), ``rows`` (one ``RoundRow`` per round, 0 = warm-up), ``students`` (each
    device's trained student), ``out`` (the run directory).

    ``data``: ``"digits"`` (default), ``"wine"``, a ``.npz`` path, or arrays: a mapping with
    ``X``, ``y`` and optional ``X_public`` / ``class_names``, or an ``(X, y)`` tuple; arrays
    are saved as ``OUT/data.npz`` so that a rerun resumes the same data. ``settings`` are
    federation settings (``--set``). ``dashboard``: serve the live dashboard on this port
    (0: any free one) while the run lasts; its URL goes to ``on_dashboard`` (default: the
    progress display). ``progress``: True prints a line per phase and round, False nothing, or
    a callable receives every ``sim.progress.Step``. ``zoo``: a Python file of your own
    students (``students(input_shape, num_classes) -> {name: module}``) that compete with the
    built-in ones.
    """
    from fededge.sim.simulate import prepare, run_simulation

    opts = simulation_options(data, clients=clients, rounds=rounds, partition=partition,
                              alpha=alpha, seed=seed, aggregator=aggregator, strategy=strategy,
                              profiles=profiles, student=student, codec=codec,
                              max_message=max_message, straggle=straggle, settings=settings,
                              baselines=baselines, broker=broker, out=out,
                              zoo=Path(zoo) if zoo is not None else None)
    on_step = _progress(progress)
    plan = prepare(opts)  # every error the arguments can cause, before anything runs
    if dashboard is None:
        return run_simulation(opts, on_step, plan)
    from fededge.dashboard.server import DashboardServer
    from fededge.dashboard.state import Source

    Path(opts.out).mkdir(parents=True, exist_ok=True)
    with DashboardServer(Source.of(opts.out), host=dashboard_host, port=dashboard) as server:
        (on_dashboard or _announce(on_step))(server.url)
        return run_simulation(opts, on_step, plan)


def simulation_options(data: DataSpec = None, *, out: str | os.PathLike[str] = "runs/latest",
                       codec: str | None = None, settings: Mapping[str, Any] | None = None,
                       **options: Any) -> SimulationOptions:
    """The ``SimulationOptions`` of ``simulate``'s arguments (arrays saved to OUT/data.npz)."""
    from fededge.sim.recipe import SimulationOptions

    out = Path(out)
    return SimulationOptions(data=_data_source(data, out), out=out,
                             overrides={**({"logit_codec": codec} if codec else {}),
                                        **dict(settings or {})}, **options)


def _data_source(data: DataSpec, out: Path) -> str | None:
    """A dataset name or path as the simulation takes it; arrays become ``OUT/data.npz``."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else os.fspath(data)
    import numpy as np

    if isinstance(data, tuple) and len(data) == 2:
        data = {"X": data[0], "y": data[1]}
    if not isinstance(data, Mapping) or not {"X", "y"} <= set(data):
        raise ApiError("data: pass 'digits', 'wine', a .npz path, (X, y), or a mapping with X, "
                       "y and optional X_public and class_names")
    unknown = set(data) - {"X", "y", "X_public", "class_names"}
    if unknown:
        raise ApiError(f"data: unknown key(s) {', '.join(sorted(unknown))}; the keys are X, y, "
                       "X_public and class_names")
    out.mkdir(parents=True, exist_ok=True)
    path = out / DATA_FILE
    np.savez(path, **{key: np.asarray(value) for key, value in data.items()})
    return str(path)


def _progress(progress: bool | Callable[[Step], None]) -> Callable[[Step], None]:
    from fededge.sim.progress import print_steps

    if callable(progress):
        return progress
    return print_steps() if progress else (lambda step: None)


def _announce(on_step: Callable[[Step], None]) -> Callable[[str], None]:
    from fededge.sim.progress import Step

    return lambda url: on_step(Step("dashboard", 1, 1, url))


def export(run: SimulationResult | str | os.PathLike[str], device: str | None = None, *,
           all_devices: bool = False, quantize: str | None = None,
           out: str | os.PathLike[str] | None = None) -> list[ExportResult]:
    """Export trained students as verified ONNX bundles, as ``fededge export`` does: one
    ``device``, or every one (``all_devices``; a run of one device needs neither), to
    ``out/<device>/`` (default RUN/export); ``quantize="int8"`` adds ``model.int8.onnx``.
    Returns one ``ExportResult`` per student (its directory, accuracy, parity, sizes)."""
    from fededge.delivery.export import export_run

    return export_run(getattr(run, "out", run), device=device, all_devices=all_devices,
                      quantize=quantize, out=out)


def distill(teacher: str | os.PathLike[str], data: str | os.PathLike[str], *,
            out: str | os.PathLike[str], profiles: list[str] | None = None,
            zoo: str | os.PathLike[str] | None = None, alpha: float | None = None,
            temperature: float | None = None, epochs: int | None = None,
            finetune_epochs: int | None = None, quantize: str | None = None,
            teacher_outputs: str = "logits", seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Distill ``teacher`` (an .onnx file or a student checkpoint directory) into the student
    each device profile picks, as ``fededge distill`` does: bundles under ``out/<profile>/``,
    and the summary (also ``out/summary.json``) returned: ``teacher`` (accuracy, params,
    bytes) and ``students`` (profile, student, params, accuracy, labels_only_accuracy,
    export_dir). Unset α, T and epochs take the command's defaults."""
    from fededge.delivery import distill as job

    given = {"alpha": alpha, "temperature": temperature, "epochs": epochs,
             "finetune_epochs": finetune_epochs}
    opts = job.DistillOptions(
        teacher=Path(teacher), data=os.fspath(data), out=Path(out),
        profiles=tuple(profiles) if profiles else None,
        zoo=Path(zoo) if zoo is not None else None, quantize=quantize,
        teacher_outputs=teacher_outputs, seed=seed,
        **{key: value for key, value in given.items() if value is not None})
    return job.distill(opts, progress or (lambda line: None))


def load_model(path: str | os.PathLike[str], device: str | None = None, *,
               int8: bool = False) -> EdgeModel | TrainedStudent:
    """A model that predicts from raw features: ``model.predict(X)`` → (labels,
    probabilities), ``model.logits(X)``, ``model.class_names``.

    ``path`` is an export directory (``fededge export``; runs with onnxruntime alone, no
    torch; ``int8`` picks the quantized model), a checkpoint directory (``RUN/clients/<id>``)
    or a run directory with ``device`` (the trained student, in PyTorch).
    """
    from fededge.edge.runtime import MANIFEST

    path = Path(path)
    if (path / MANIFEST).is_file():
        from fededge.edge.runtime import EdgeModel

        return EdgeModel(path, int8=int8)
    if int8:
        raise ApiError(f"{path}: int8 is for an export directory; export with quantize='int8'")
    if device is not None:
        path = path / "clients" / device
    elif not (path / "student.json").is_file() and (path / "clients").is_dir():
        found = sorted(p.name for p in (path / "clients").iterdir())
        raise ApiError(f"{path} is a run directory: pass device= one of {', '.join(found)}")
    from fededge.delivery.export import load_student

    return load_student(path)

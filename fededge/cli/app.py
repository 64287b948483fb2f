"""The ``fededge`` command line. Each command is a thin shell over a library function; errors a
user can cause are printed as one line naming the bad input, never as a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from fededge.cli.model import export_cmd, infer_cmd
from fededge.cli.output import configure_output, console, fail, interruptible, pct, print_error
from fededge.cli.tables import Col, fit_table, rounds_table
from fededge.errors import FedEdgeError
from fededge.federation.report import human_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Federated knowledge distillation for heterogeneous edge devices. "
                       "Results go to stdout; progress, warnings and notes to stderr.")


TRAINING_MODULES = frozenset({"torch", "sklearn", "scipy", "safetensors", "amqtt", "matplotlib",
                              "onnx"})
"""Import names of the ``train`` extra's packages (pyproject.toml). `pip install fededge` (the
edge install) lacks them; a command that needs one says which extra to add instead of ending in
an ImportError traceback."""
_invoked: list[str] = []  # the subcommand being run, for that message


@app.callback()
def _options(ctx: typer.Context,
             verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log protocol "
                                      "events (joins, rounds, uploads) with their source."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only results and "
                                    "errors: no progress, warnings or notes.")) -> None:
    _invoked[:] = [ctx.invoked_subcommand or ""]
    if verbose and quiet:
        fail("pass -v (more) or -q (less), not both")
    configure_output(verbose=verbose, quiet=quiet)


DEVICE_COLUMNS = (
    Col("profile", keep=True), Col("arch", drop=7), Col("RAM", justify="right", drop=4),
    Col("sustained GFLOPS", "GFLOPS", justify="right", drop=5), Col("student", keep=True),
    Col("params", justify="right"), Col("MFLOPs", justify="right", drop=6),
    Col("train mem", "train", justify="right", drop=2),
    Col("latency", "ms", justify="right", drop=3), Col("binding", "bound", drop=1))


def main() -> None:
    """The ``fededge`` command (pyproject's script, ``python -m fededge.cli``). Commands import
    their heavy modules when they run, so a training command on an edge install fails here."""
    try:
        app(prog_name="fededge")
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in TRAINING_MODULES:
            raise
        command = f"`fededge {_invoked[0]}`" if _invoked and _invoked[0] else "this command"
        print_error(f"{command} needs fededge's training extra, which this install lacks (no "
                    f"module {missing!r}): pip install \"fededge[train]\" (torch first, from "
                    "the index you want)")
        sys.exit(2)


@app.command()
def devices(data: Optional[str] = typer.Option(
        None, help="Dataset whose input shape sizes the students: digits (default), wine, or a "
                   ".npz file."),
            zoo: Optional[Path] = typer.Option(None, "--zoo", help="A Python file defining "
                                               "students(input_shape, num_classes) -> {name: "
                                               "torch module}; its students compete with the "
                                               "built-in ones."),
            batch_size: int = typer.Option(32, min=1, help="Training batch size the memory "
                                           "budget is checked at."),
            as_json: bool = typer.Option(False, "--json", help="Print a JSON list (one object "
                                         "per profile) instead of the table.")) -> None:
    """Show every device profile and the student it would train, and which budget bound it."""
    try:
        from fededge.learn.data import load_dataset
        from fededge.learn.picking import describe_catalog

        dataset = load_dataset(data)
        shape = tuple(dataset.input_shape)
        if zoo is not None:
            from fededge.learn.userzoo import load_user_zoo

            load_user_zoo(zoo, shape, dataset.num_classes)
        choices = describe_catalog(shape, dataset.num_classes, batch_size=batch_size)
    except FedEdgeError as exc:
        fail(exc)
    if as_json:
        print(json.dumps([c.as_dict() for c in choices], indent=2))
        return
    rows = []
    for c in choices:
        p = c.profile
        student = c.student or "[red]none fits[/]"
        if c.inference_only and c.student:
            student += " (inference only)"
        cost = c.cost
        rows.append((p.name, p.arch, f"{p.ram_mb / 1024:.1f} GiB", f"{p.sustained:,.0f}",
                     student, f"{cost.params:,}" if cost else "—",
                     f"{cost.flops / 1e6:.2f}" if cost else "—",
                     human_bytes(cost.train_memory_bytes) if cost and p.can_train else "—",
                     f"{c.latency_ms:.3f}" if c.latency_ms is not None else "—",
                     c.binding or "—"))
    console.print(fit_table(console, DEVICE_COLUMNS, rows,
                            title=f"Device profiles → students for {dataset.name} "
                                  f"(input {'×'.join(map(str, dataset.input_shape))}, "
                                  f"{dataset.num_classes} classes, batch {batch_size}; latency "
                                  "in ms; bound: the budget the next larger student exceeds)"))


@app.command()
def simulate(
    data: Optional[str] = typer.Option(None, help="digits (default), wine, or PATH.npz with X, y "
                                                  "and optional X_public and class_names."),
    clients: int = typer.Option(10, help="Number of simulated devices."),
    rounds: int = typer.Option(20, help="Federation rounds."),
    partition: str = typer.Option("dirichlet", help="iid, dirichlet or shards."),
    alpha: float = typer.Option(0.5, help="Dirichlet concentration (smaller = more skewed)."),
    seed: int = typer.Option(0, help="Seed for the split, models and proxy subsets."),
    aggregator: str = typer.Option("era", help="mean, prob-mean, era, weighted, median, "
                                               "trimmed-mean (the last two resist Byzantine "
                                               "clients)."),
    strategy: str = typer.Option("fedmd", help="fedmd (logit distillation), feddf (fedmd with a "
                                               "server model as teacher), fedavg (weight "
                                               "averaging, one student) or fedavg-kd (a FedAvg "
                                               "teacher distilled into each student)."),
    profiles: Optional[str] = typer.Option(None, help="Comma-separated device profiles assigned "
                                                      "round-robin (default: all that train)."),
    out: Path = typer.Option(Path("runs/latest"), help="Run directory for metrics, plot and "
                                                        "checkpoints; rerunning with the same "
                                                        "--out resumes an unfinished run."),
    broker: str = typer.Option("embedded", help="embedded (amqtt, in-process) or mosquitto "
                                                "(a local mosquitto process)."),
    baselines: bool = typer.Option(True, help="Also train local-only and centralized baselines "
                                              "(--no-baselines: skip them)."),
    student: Optional[str] = typer.Option(None, help="Every device trains this student (default: "
                                                     "each profile picks; fedavg: the largest "
                                                     "all can train)."),
    codec: Optional[str] = typer.Option(None, help="Logit encoding on the wire: int8 "
                                                   "(default), float16 or topk."),
    max_message: int = typer.Option(0, help="Send payloads above this many bytes in chunks "
                                            "(0: never), for brokers that cap message size."),
    straggle: float = typer.Option(0.0, min=0.0, help="Make slow profiles real stragglers: each "
                                   "client sleeps STRAGGLE x (fastest relative compute / its "
                                   "own - 1) x its training time (0: off)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="Federation setting "
                                                 "KEY=VALUE, repeatable (e.g. --set "
                                                 "local_epochs=5)."),
    zoo: Optional[Path] = typer.Option(None, "--zoo", help="A Python file defining "
                                       "students(input_shape, num_classes) -> {name: torch "
                                       "module}; its students compete with the built-in "
                                       "ones."),
    dashboard: Optional[int] = typer.Option(None, "--dashboard", min=0, max=65535,
                                            metavar="PORT", help="Serve the live dashboard on "
                                            "127.0.0.1:PORT while the run lasts (0: any free "
                                            "port); afterwards `fededge dashboard OUT`."),
) -> None:
    """Run a whole federation on this machine: broker, server and clients over real MQTT."""
    from fededge import api
    from fededge.cli.progress import simulation_progress

    try:
        with simulation_progress() as on_step, interruptible(
                f"the state is kept in {out}: run the same command (same --out) to resume"):
            result = api.simulate(
                data, clients=clients, rounds=rounds, partition=partition, alpha=alpha,
                seed=seed, aggregator=aggregator, strategy=strategy, out=out, broker=broker,
                baselines=baselines, student=student, max_message=max_message,
                straggle=straggle, codec=codec, settings=_settings(settings or []),
                profiles=[p for p in profiles.split(",") if p.strip()] if profiles else None,
                dashboard=dashboard, progress=on_step, zoo=zoo)
    except FedEdgeError as exc:
        fail(exc)
    _print_simulation(result)
    if dashboard is not None:
        console.print(f"the dashboard stopped with the run; to look again: fededge dashboard "
                      f"{out}", highlight=False)


def _settings(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` federation settings, each typed and range-checked by the one schema
    (``config.FederationConfig``); the first bad one ends the command with its reason."""
    from fededge.config import ConfigError, FederationConfig, parse_assignment

    settings: dict[str, object] = {}
    for item in items:
        try:
            key, value = parse_assignment(item)
        except ConfigError as exc:
            fail(exc)
        settings[key] = value
    try:  # what one setting cannot say alone (resend_s against its floor, ldp_* together)
        FederationConfig().replace(**settings)
    except ConfigError as exc:
        fail(f"--set: {exc}")
    return settings


CLIENT_COLUMNS = (
    Col("device", keep=True), Col("profile", keep=True, drop=2), Col("student", keep=True),
    Col("params", justify="right", drop=1), Col("accuracy", "acc", justify="right"),
    Col("local-only", "local", justify="right"),
    Col("centralized", "central", justify="right"))


def _print_simulation(result) -> None:
    s = result.summary
    console.print(rounds_table(console, result.rows, title="Per-round results (all clients)"))
    rows = [(c["id"], c["profile"], c["student"], f"{c['params']:,}", pct(c["accuracy"]),
             pct(c.get("local_only_accuracy")), pct(c.get("centralized_accuracy")))
            for c in s["clients"]]
    console.print(fit_table(console, CLIENT_COLUMNS, rows, title="Clients"))
    console.print(
        f"[bold]{s['strategy']} mean accuracy {pct(s['mean_accuracy'])}[/] · local-only "
        f"{pct(s['local_only_mean_accuracy'])} · centralized {pct(s['centralized_mean_accuracy'])}"
        f"\ntraffic: {human_bytes(s['bytes_up'])} up, {human_bytes(s['bytes_down'])} down "
        f"({human_bytes(s['bytes_per_client_round'])} per client per round); uploads "
        f"{s['uploads_accepted']}/{s['uploads_expected']} accepted"
        f"\ntime: {s['wall_seconds']:.1f} s total, federation {s['federation_seconds']:.1f} s, "
        f"{100 * (s['overhead_share'] or 0):.1f}% of it outside training and evaluation"
        f"\nwrote {result.out}/summary.json, metrics.jsonl, rounds.png and clients/*/ checkpoints",
        highlight=False)
    below = s.get("clients_below_local_only")
    if below and below["count"]:
        worst = min(below["clients"], key=lambda c: c["delta"])
        console.print(
            f"[bold yellow]warning:[/] {below['count']} of {len(below['clients'])} clients ended "
            f"below their local-only accuracy (worst: {worst['id']} {pct(worst['accuracy'])} vs "
            f"{pct(worst['local_only_accuracy'])} alone); see clients_below_local_only in "
            f"{result.out}/summary.json", highlight=False)


app.command("export")(export_cmd)
app.command("infer")(infer_cmd)

from fededge.cli.distill import distill_cmd  # noqa: E402

app.command("distill")(distill_cmd)

# Deployment: kits, the production broker, and the server and devices run from kits.
from fededge.cli.kit import broker_cmd, client_cmd, provision_cmd, server_cmd, verify_kit_cmd  # noqa: E402

app.command("provision")(provision_cmd)
app.command("verify-kit")(verify_kit_cmd)
app.command("broker")(broker_cmd)
app.command("server")(server_cmd)
app.command("client")(client_cmd)

# Model delivery: the server side (deploy) and the device side (agent, torch-free).
from fededge.cli.deploy import agent_cmd, deploy_cmd  # noqa: E402

app.command("deploy")(deploy_cmd)
app.command("agent")(agent_cmd)

# Watching a federation: a simulate run directory or a server kit (torch-free).
from fededge.cli.dashboard import dashboard_cmd  # noqa: E402

app.command("dashboard")(dashboard_cmd)


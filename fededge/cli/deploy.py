"""``fededge deploy`` and ``fededge agent``: the model-delivery commands that ``cli.py`` registers.
They parse options and print; the work is ``delivery.deploy.deploy`` and ``edge.service``.

``agent`` runs on devices that have only the ``edge`` extra, so nothing this module imports,
at its top or inside the commands, may import torch, scikit-learn, safetensors or amqtt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fededge.cli.output import console, fail, interruptible
from fededge.cli.tables import Col, fit_table
from fededge.edge import service
from fededge.edge.bundle import DEFAULT_CHUNK_BYTES
from fededge.errors import FedEdgeError
from fededge.federation.report import human_bytes

DEPLOY_COLUMNS = (Col("device", keep=True), Col("version", keep=True), Col("files", drop=2),
                  Col("bytes", justify="right"), Col("chunks", justify="right", drop=1),
                  Col("cleared", justify="right", drop=3))


def deploy_cmd(
    export_dir: Path = typer.Argument(..., help="Export root with one directory per device, as "
                                                "written by `fededge export --out`."),
    kit: Path = typer.Option(..., "--kit", help="The server kit (KITS/server); its deploy.crt "
                                                "signs the bundles."),
    devices: Optional[list[str]] = typer.Option(
        None, "--device", help="Deploy to this device (repeatable; default: every device of "
                               "the federation with a bundle in EXPORT_DIR)."),
    chunk_bytes: int = typer.Option(DEFAULT_CHUNK_BYTES, "--chunk-bytes",
                                    help="Bytes per retained chunk message."),
    wait: float = typer.Option(0.0, "--wait", min=0, help="Then wait up to this many seconds "
                               "for each device's agent to report the bundle installed or "
                               "refused (exit 1 unless all installed)."),
    timeout: float = typer.Option(60.0, "--timeout", min=1, help="Seconds to wait for the "
                                  "broker to acknowledge every message."),
) -> None:
    """Publish each device's exported model, signed and retained, to that device only."""
    from fededge.delivery.deploy import deploy

    try:
        with console.status("signing and publishing..."):
            results = deploy(export_dir, kit, devices or [], chunk_bytes=chunk_bytes,
                             timeout=timeout, wait=wait)
    except (FedEdgeError, OSError) as exc:
        fail(exc)
    rows = [(r.device if r.source is None else f"{r.device} (model of {r.source})", r.version,
             str(r.files), human_bytes(r.bytes), str(r.chunks), str(r.cleared),
             *([r.agent] if wait else [])) for r in results]
    columns = DEPLOY_COLUMNS + ((Col("agent", keep=True),) if wait else ())
    console.print(fit_table(console, columns, rows, title="Deployed, retained on the broker "
                            "until replaced (cleared: stale chunks of earlier versions)"))
    if wait and any(r.agent != "installed" for r in results):
        raise typer.Exit(code=1)


def agent_cmd(
    kit: Path = typer.Option(..., "--kit", help="This device's kit (KITS/<device>)."),
    http: Optional[int] = typer.Option(
        None, "--http", min=0, max=65535, help="Also serve predictions over HTTP on this port "
                                               "(0: any free port): POST /predict, GET /health."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address of the HTTP endpoint. It has "
                             "no authentication: keep it on the device."),
    once: bool = typer.Option(False, "--once", help="Exit after the first deployment: 0 once "
                              "installed (or already installed), 1 if refused."),
    timeout: Optional[float] = typer.Option(
        None, "--timeout", min=0, help="Stop after this many seconds (with --once: exit 1 if "
                                       "nothing was installed by then)."),
    rollback: bool = typer.Option(False, "--rollback", help="Serve the previous version again "
                                  "and exit; a running agent switches within a second."),
    install: Optional[Path] = typer.Option(
        None, "--install", help="Install this export directory (`fededge export` on this "
                                "device) with the checks of a deployed bundle, and exit: 0 "
                                "once installed, 1 if refused; a running agent switches."),
) -> None:
    """Receive, verify and install this device's models; serve the installed one (also while
    the broker is unreachable: it reconnects in the background)."""
    if rollback or install is not None:
        what = "--rollback" if rollback else "--install"
        if once or http is not None or timeout is not None or (rollback and install):
            fail(ValueError(f"{what} changes the installed version and exits; drop --once, "
                             "--http, --timeout and the other of --rollback and --install"))
        _install_or_roll_back(kit, install)
        return
    try:
        with interruptible(f"agent stopped; the installed model is kept in {kit}/state; run "
                           f"`fededge agent --kit {kit}` to serve it again"):
            outcome = service.run_agent(kit, http=http, bind=bind, once=once, timeout=timeout,
                                        events=lambda line: console.print(line, highlight=False))
    except service.EndpointError as exc:
        fail(f"--http {http}: {exc}")
    except FedEdgeError as exc:
        fail(exc)
    if not once:
        return
    if outcome is None:
        fail(code=1, problem=f"no deployment arrived within {timeout:g} s" if timeout is not None
                   else "stopped before a deployment arrived")
    if outcome.rejected:
        fail(code=1, problem=f"refused the deployment: {outcome.rejected}")
    console.print(f"{'already ' if outcome.already else ''}installed {outcome.installed}",
                  highlight=False)


def _install_or_roll_back(kit: Path, export_dir: Path | None) -> None:
    """``--install DIR`` or ``--rollback``: change what the agent serves, and exit."""
    try:
        if export_dir is None:
            pointer = service.rollback(kit)
        else:
            outcome = service.install(kit, export_dir)
    except FedEdgeError as exc:
        fail(exc)
    if export_dir is None:
        console.print(f"rolled back: serving {pointer.current} instead of {pointer.previous}; "
                      f"{pointer.previous} will not be re-installed from its retained "
                      "deployment (deploy a new bundle to move on)", highlight=False)
    elif outcome.rejected:
        fail(code=1, problem=f"refused {export_dir}: {outcome.rejected}")
    else:
        console.print(f"{'already ' if outcome.already else ''}installed {outcome.installed} "
                      f"from {export_dir}", highlight=False)

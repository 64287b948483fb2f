"""Deployment commands that ``cli.py`` registers: ``provision``, ``verify-kit``, ``broker``,
``server`` and ``client``. Heavy modules (torch, via the runner and provisioning) are imported
inside the commands so ``verify-kit`` and ``broker`` start instantly on a small device.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from fededge.cli.output import console, fail, interruptible, note, pct
from fededge.cli.tables import Col, fit_table
from fededge.errors import FedEdgeError

KIT_COLUMNS = (Col("device", keep=True), Col("profile", keep=True, drop=2),
               Col("role", drop=1), Col("student", keep=True), Col("credentials", "creds"))


def _privacy_line(report: dict | None) -> str:
    """One line from ``privacy.privacy_report`` or ``LocalPrivacy.report``."""
    if report is None:
        return "local differential privacy: off"
    return (f"local differential privacy: ε = {report['epsilon_total']:.4g} over "
            f"{report['releases']} uploads (ε = {report['epsilon_per_round']:.4g} per round) at "
            f"δ = {report['delta']:g}")


def _zoo_measurer():
    """``learn.userzoo``'s measurement of a zoo file when torch is installed, else None (then
    provisioning refuses a federation file with a zoo, naming the extra to install). Torch is
    imported only when a zoo file is measured: provisioning without one stays torch-free."""
    try:
        if importlib.util.find_spec("torch") is None:
            return None
    except ImportError:
        return None

    def measure(path: Path, input_shape: tuple[int, ...], num_classes: int) -> dict:
        from fededge.learn.userzoo import load_user_zoo

        return {s.name: s.figures for s in load_user_zoo(path, input_shape, num_classes)}
    return measure


def provision_cmd(
    federation_file: Path = typer.Argument(..., help="The federation file (see "
                                                     "examples/federation.toml)."),
    out: Path = typer.Option(..., "--out", help="Directory for the kits; re-running on it keeps "
                                                "existing credentials."),
    revoke: Optional[list[str]] = typer.Option(None, "--revoke", help="Remove device ID from the "
                                               "password file and ACL and delete its kit "
                                               "(repeatable)."),
) -> None:
    """Write startup kits: configs, credentials, certificates and the broker's Mosquitto files."""
    try:
        from fededge.kits.provision import provision
        from fededge.learn.privacy import privacy_report

        result = provision(federation_file, out, revoke or [], _zoo_measurer())
    except FedEdgeError as exc:
        fail(exc)
    rows = [(escape(d.id), escape(d.profile), d.role,
             escape(d.student if d.model_from is None
                    else f"{d.student} (model of {d.model_from})"), escape(d.status))
            for d in result.devices]
    console.print(fit_table(console, KIT_COLUMNS, rows, title=f"Kits of federation "
                            f"{result.config.federation!r} in {result.out}"))
    for d in result.devices:
        if d.note:
            note(d.note)
    for device in result.revoked:
        console.print(f"revoked {device}: removed from the password file and ACL, kit deleted; "
                      "reload the broker (SIGHUP or `systemctl reload fededge-broker`)")
    for device in result.skipped:
        note(f"{device} is still listed in {federation_file} but was revoked; it was skipped "
             "(give a replacement a new id)")
    console.print(f"{_privacy_line(privacy_report(result.config))}\n"
                  f"federation CA SHA-256 fingerprint: {result.ca_fingerprint} (`fededge "
                  "verify-kit` prints the one a kit trusts; compare them)\n"
                  f"start: {result.out}/broker/start.sh, {result.out}/server/start.sh, then "
                  f"each device's start.sh; check a kit with `fededge verify-kit DIR`",
                  highlight=False)


def verify_kit_cmd(
    directory: Path = typer.Argument(..., help="The provision output or one kit in it."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="The federation's CA certificate to "
                                      "trust (KITS/ca/ca.crt; default: the kit's own ca.crt, "
                                      "whose fingerprint is printed to compare)."),
) -> None:
    """Check a kit's signed manifest: the signature, every file's SHA-256 and the mode of secret
    files; exit 1 naming every difference."""
    from fededge.kits.manifest import verify_manifest

    try:
        check = verify_manifest(directory, ca)
    except FedEdgeError as exc:
        fail(exc)
    for problem in check.problems:
        console.print(f"[bold red]problem:[/] {escape(f'{directory}/{problem}')}",
                      highlight=False)
    trusted = f"CA {check.ca}" if check.ca else "no CA"
    if check.problems:
        console.print(f"{directory}: {len(check.problems)} problem(s); checked against "
                      f"{trusted}", highlight=False)
        raise typer.Exit(code=1)
    console.print(f"{directory}: all {check.checked} files match the manifest signed by "
                  f"{check.signer!r}, {trusted}", highlight=False)


def broker_cmd(
    kit: Optional[Path] = typer.Option(None, "--kit", help="A broker kit (KITS/broker): "
                                       "Mosquitto with its TLS, passwords and ACL."),
    embedded: Optional[bool] = typer.Option(None, "--embedded/--mosquitto",
                                            help="Development brokers without a kit: amqtt in "
                                                 "this process (default), or an anonymous local "
                                                 "mosquitto."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (development brokers)."),
    port: int = typer.Option(1883, help="Port to listen on (development brokers)."),
) -> None:
    """Run an MQTT broker until Ctrl-C: a kit's Mosquitto, or a development broker."""
    from fededge.transport.brokers import EmbeddedBroker, MosquittoBroker

    if kit is not None and embedded is not None:
        fail(ValueError("--kit runs the kit's Mosquitto; drop --embedded/--mosquitto"))
    if kit is not None:
        from fededge.kits.broker import KitBroker

        try:
            broker = KitBroker(kit)
            code = broker.run_foreground(lambda b: console.print(
                f"mosquitto from {kit} listening on {b.host}:{b.port} (TLS; Ctrl-C to stop, "
                "SIGHUP reloads passwords and ACL)", highlight=False))
        except FedEdgeError as exc:
            fail(exc)
        raise typer.Exit(code=code if code > 0 else 0)
    try:
        dev = (EmbeddedBroker(host, port) if embedded in (None, True)
               else MosquittoBroker(port=port, host=host)).start()
    except FedEdgeError as exc:
        fail(exc)
    console.print(f"{'amqtt' if embedded in (None, True) else 'mosquitto'} development broker "
                  f"listening on {host}:{port}, anonymous, no TLS (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        dev.stop()


def server_cmd(
    kit: Path = typer.Option(..., "--kit", help="The server kit (KITS/server)."),
    state: Optional[Path] = typer.Option(None, "--state", help="Server state directory, for "
                                         "resuming after a restart (default KIT/state)."),
    join_timeout: float = typer.Option(300.0, help="Seconds to wait for the devices to join."),
) -> None:
    """Run the federation server from its kit: publish the config, drive every round."""
    from fededge.cli.tables import rounds_table
    from fededge.federation.server import ServerEvents
    from fededge.kits.kit import load_kit
    from fededge.kits.run import run_server

    def closed(record) -> None:
        console.print(f"round {record.round}: {len(record.accepted)}/{len(record.participants)} "
                      f"uploads, {record.seconds:.1f} s", highlight=False)
    try:
        loaded = load_kit(kit)
        console.print(f"server of federation {loaded.federation!r}: waiting for "
                      f"{len(loaded.devices)} devices", highlight=False)
        with interruptible(f"server stopped; its state is kept in {state or kit / 'state'}: "
                           f"run `fededge server --kit {kit}` again to resume the run"):
            done = run_server(loaded, state=state, join_timeout=join_timeout,
                              events=ServerEvents(on_round_closed=closed))
    except FedEdgeError as exc:
        fail(exc)
    console.print(rounds_table(console, done.rows, title="Per-round results (all devices)"))
    console.print(f"federation done: {done.rounds} rounds, {done.accepted} uploads accepted, "
                  f"{done.rejected} rejected", highlight=False)
    if done.collected:
        console.print(f"kept the trained students of {', '.join(done.collected)} "
                      f"({done.summary}); export them with `fededge export {kit} --all --out "
                      "EXPORT`", highlight=False)


def client_cmd(
    kit: Path = typer.Option(..., "--kit", help="This device's kit (KITS/<device>)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Private labelled .npz (X, y); "
                                        "overrides client.toml's data or demo shard."),
    state: Optional[Path] = typer.Option(None, "--state", help="Checkpoint directory "
                                         "(default KIT/state)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads (default: "
                                          "the profile's, at most the CPU count)."),
) -> None:
    """Run one device from its kit until the federation's last round."""
    from fededge.kits.device import device_kit, run_client
    from fededge.kits.kit import load_kit

    def progress(entry: dict) -> None:
        label = "warm-up" if entry["round"] == 0 else f"round {entry['round']}"
        console.print(f"{label}: accuracy {pct(entry.get('accuracy'))}", highlight=False)
    try:
        loaded = device_kit(load_kit(kit))
        console.print(f"device {loaded.device!r} ({loaded.profile}, {loaded.student}) joining "
                      f"{loaded.federation!r} at {loaded.broker.host}:{loaded.broker.port}",
                      highlight=False)
        with interruptible(f"device stopped; its checkpoint is kept in "
                           f"{state or kit / 'state'}: run `fededge client --kit {kit}` again "
                           "to rejoin where it left off"):
            result = run_client(loaded, data=data, state=state, threads=threads,
                                on_progress=progress)
    except FedEdgeError as exc:
        fail(exc)
    last = result.client.history[-1] if result.client.history else {}
    config = result.client.state.config
    kept = ("its trained student went to the server (collect_models)"
            if config is not None and config.collect_models else
            f"its trained student stays here (`fededge export {kit}`)")
    console.print(f"federation done: final accuracy {pct(last.get('accuracy'))}; {kept}; "
                  f"{_privacy_line(result.privacy)}", highlight=False)

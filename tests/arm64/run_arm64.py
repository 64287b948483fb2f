"""``make test-arm64``: prove the edge agent on an emulated arm64 Debian system.

    sudo .venv/bin/python tests/arm64/run_arm64.py [--cache DIR] [--rebuild] [--skip-delivery]

Builds (once, cached outside the repository) a Debian bookworm arm64 rootfs with debootstrap and
qemu-user-static and fetches the aarch64 wheels of fededge's edge install. On the host it
provisions a federation of a training device and an agent-only device (the emulated one),
trains and exports the training device's student, and starts the secured Mosquitto. Inside the
rootfs ``devices/install.sh`` installs the agent-only kit (it must choose the torch-free path by
itself), then ``fededge deploy`` runs on the host and ``fededge agent --once`` in the chroot
receives, verifies and installs the bundle over MQTT, and ``fededge infer --save-logits``
predicts the test split. PASS needs the same argmax as x86 onnxruntime on every sample and a max absolute
logit difference of at most 1e-4. Also prints the emulated/native per-sample latency ratio.

Not part of ``make test`` (pytest collects no ``test_*.py`` here): it needs root and minutes.
Logs of every step are in CACHE/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import proof
import rootfs
import wheels
from rootfs import (
    Arm64Error,
    Timer,
    build_rootfs,
    chroot,
    ensure_binfmt,
    ensure_host_tools,
    mounted,
    python_version,
    require_root,
)

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("FEDEDGE_ARM64_CACHE", "~/.cache/fededge/arm64"))
MIRROR = "http://deb.debian.org/debian"
# Paths inside the rootfs.
STAGE = "/srv/proof"            # this run's files (wiped each run)
WHEELS = "/srv/wheels"          # the aarch64 wheels, installed offline
VENV = "/opt/fededge"           # install.sh's default venv
KIT = "/etc/fededge/kit"        # where install.sh puts the kit
USER = "fededge"                # install.sh's service user; the agent runs as it


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="rootfs, wheels, work files and logs (default %(default)s)")
    parser.add_argument("--mirror", default=MIRROR, help="Debian mirror for debootstrap")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the rootfs from scratch")
    parser.add_argument("--skip-delivery", action="store_true",
                        help="no deploy/agent: copy the export into the rootfs and compare its "
                             "logits (checks the emulation alone)")
    parser.add_argument("--timeout", type=int, default=300, help="agent --timeout seconds")
    parser.add_argument("--cpu", default=rootfs.CPU,
                        help="CPU model qemu emulates (QEMU_CPU; default %(default)s, a Pi 5's)")
    parser.add_argument("--samples", type=int, default=300,
                        help="single-sample runs timed on each side")
    return parser.parse_args(argv)


def check_cli(fededge: str, delivery: bool) -> None:
    """Fail early, naming the missing command, rather than after building everything."""
    needs = [(("infer",), "--save-logits")] if delivery else []
    needs += [(("deploy",), None), (("agent",), "--once")] if delivery else []
    missing = [" ".join(w) + (f" {o}" if o else "") for w, o in needs
               if not proof.has_command(fededge, *w, option=o)]
    if missing:
        raise Arm64Error(f"this fededge has no `fededge {'`, `fededge '.join(missing)}`; the "
                         "full proof needs model delivery. Check the emulation alone with "
                         "--skip-delivery (make test-arm64 ARM64_ARGS=--skip-delivery)")


def stage(root: Path, wheel_dir: Path, fededge_whl: Path, kits: Path,
          trained: proof.Trained) -> None:
    """Copy into the rootfs what a device would be given: the installer, its kit, the wheels;
    plus the test split, the exported model (for the latency probe) and the probe."""
    target = root / STAGE.lstrip("/")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    shutil.copytree(REPO / "devices", target / "devices")
    shutil.copytree(kits / proof.AGENT, target / "kit")
    shutil.copytree(trained.model_dir, target / "model")
    (target / "dist").mkdir()
    shutil.copy2(fededge_whl, target / "dist")
    shutil.copy2(trained.test_npz, target / "test.npz")
    shutil.copy2(HERE / "probe.py", target / "probe.py")
    wheels_target = root / WHEELS.lstrip("/")
    shutil.rmtree(wheels_target, ignore_errors=True)
    shutil.copytree(wheel_dir, wheels_target)


def check_unit(root: Path, work: Path) -> None:
    """The unit install.sh rendered into the rootfs: the right command, and valid for
    ``systemd-analyze verify`` when the host has it (ExecStart pointed at the rootfs's copy)."""
    unit = root / "etc/systemd/system/fededge-agent.service"
    text = unit.read_text() if unit.is_file() else ""
    expected = f"ExecStart={VENV}/bin/fededge agent --kit {KIT}"
    if expected not in text:
        raise Arm64Error(f"{unit}: install.sh did not render `{expected}`")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        copy = work / unit.name
        copy.write_text(text.replace(f"{VENV}/bin/fededge", str(root / VENV.lstrip("/")
                                                                / "bin/fededge")))
        result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                                check=False)
        complaints = [ln for ln in (result.stdout + result.stderr).splitlines() if unit.name in ln]
        if result.returncode or complaints:
            raise Arm64Error(f"systemd-analyze verify {unit}:\n{result.stdout}{result.stderr}")


def probe(cmd: list[str], runner) -> dict:
    out = runner(cmd)
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cache = args.cache.expanduser().resolve()
    root, logs, work = cache / "rootfs", cache / "logs", cache / "work"
    delivery = not args.skip_delivery
    timer = Timer()
    print(f"arm64 proof: cache {cache}, logs {logs}", flush=True)
    try:
        require_root()
        fededge = proof.fededge_cmd()
        check_cli(fededge, delivery)
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with timer.phase("host tools") as notes:
            installed = ensure_host_tools(logs / "host.log")
            ensure_binfmt(logs / "host.log")
            notes.append(f"apt-get installed {', '.join(installed)}" if installed
                         else "debootstrap, qemu-user-static, binfmt-support present")
        with timer.phase("rootfs") as notes:
            built = build_rootfs(root, args.mirror, logs / "debootstrap.log",
                                 rebuild=args.rebuild)
            notes.append("debootstrap from scratch" if built else f"cached: {root}")
        with mounted(root):
            result = prove(args, root, logs, work, fededge, delivery, timer)
    except (Arm64Error, subprocess.TimeoutExpired) as exc:
        print(f"\n{timer.summary()}" if timer.phases else "", flush=True)
        print(f"\nFAIL: {exc}", flush=True)
        return 1
    print(f"\n{timer.summary()}")
    print(result[1])
    return 0 if result[0] else 1


def prove(args, root: Path, logs: Path, work: Path, fededge: str, delivery: bool,
          timer: Timer) -> tuple[bool, str]:
    """Everything that needs the rootfs mounted; returns (passed, the closing report)."""
    def in_chroot(cmd: list[str], log: str, **kw) -> str:
        if log == "-":
            return chroot(root, cmd, capture=True, cpu=args.cpu, **kw).stdout
        return str(chroot(root, cmd, log=logs / log, cpu=args.cpu, **kw).returncode)

    with timer.phase("wheels") as notes:
        python = python_version(root, args.cpu)
        reqs = wheels.edge_requirements(REPO)
        wheel_dir, fetched = wheels.download(reqs, python, args.cache.expanduser().resolve()
                                             / "wheels", logs / "wheels.log")
        fededge_whl = wheels.build_fededge(REPO, work / "dist", logs / "wheels.log")
        count = len(list(wheel_dir.glob("*.whl")))
        notes.append(f"{count} aarch64 wheels for Python {python} "
                     f"({'downloaded' if fetched else 'cached'}) + {fededge_whl.name}")

    with timer.phase("federation") as notes:
        from fededge.transport.brokers import free_port

        port = free_port()
        kits = work / "kits"
        proof.run([fededge, "provision", str(proof.federation_file(work, port)), "--out",
                   str(kits)], log=logs / "federation.log")
        trained = proof.train_and_export(fededge, work, logs / "federation.log")
        notes.append(f"provisioned {proof.DEVICE} + agent-only {proof.AGENT}, trained and "
                     f"exported {proof.DEVICE} (broker port {port})")

    stage(root, wheel_dir, fededge_whl, kits, trained)
    with timer.phase("install") as notes:
        in_chroot(["bash", f"{STAGE}/devices/install.sh", "--kit", f"{STAGE}/kit", "--wheels",
                   WHEELS, "--from", f"{STAGE}/dist/{fededge_whl.name}"], "install.log")
        if "mode:        agent (kit role = agent" not in (logs / "install.log").read_text():
            raise Arm64Error(f"install.sh did not choose the agent-only install for the "
                             f"agent-only kit (log: {logs / 'install.log'})")
        code = ("import importlib.util as u, platform; "
                "print(platform.machine(), u.find_spec('torch') is not None)")
        torch = in_chroot([f"{VENV}/bin/python", "-c", code], "-")
        if torch.split() != ["aarch64", "False"]:
            raise Arm64Error(f"the agent-only install is not a torch-free aarch64 venv: {torch}")
        in_chroot(["install", "-d", "-o", USER, "-g", USER, f"{STAGE}/out"], "install.log")
        check_unit(root, work)
        notes.append(f"devices/install.sh chose the agent: {VENV} without torch, kit at {KIT}")

    out = root / STAGE.lstrip("/") / "out" / "logits.npy"
    if delivery:
        with proof.broker(fededge, kits, port, logs / "broker.log"):
            with timer.phase("deploy") as notes:
                proof.run([fededge, "deploy", str(trained.export_dir), "--kit",
                           str(kits / "server"), "--device", proof.AGENT],
                          log=logs / "deploy.log")
                notes.append(f"fededge deploy {trained.export_dir.name} --kit kits/server "
                             f"--device {proof.AGENT}")
            with timer.phase("agent") as notes:
                agent = in_chroot([f"{VENV}/bin/fededge", "agent", "--kit", KIT, "--once",
                                   "--timeout", str(args.timeout)], "-", user=USER,
                                  timeout=args.timeout + 120)
                (logs / "agent.log").write_text(agent)
                print("\n".join("    | " + line for line in agent.strip().splitlines()[-8:]))
                notes.append("received, verified and installed the bundle over MQTT (TLS)")
        with timer.phase("infer") as notes:
            infer = in_chroot([f"{VENV}/bin/fededge", "infer", KIT, f"{STAGE}/test.npz",
                               "--save-logits", f"{STAGE}/out/logits.npy"], "-", user=USER)
            (logs / "infer.log").write_text(infer)
            notes.append(f"fededge infer {KIT} on arm64")
    else:
        with timer.phase("infer") as notes:
            infer = in_chroot([f"{VENV}/bin/fededge", "infer", f"{STAGE}/model",
                               f"{STAGE}/test.npz"], "-", user=USER)
            (logs / "infer.log").write_text(infer)
            in_chroot([f"{VENV}/bin/python", f"{STAGE}/probe.py", f"{STAGE}/model",
                       f"{STAGE}/test.npz", "--samples", "1", "--logits",
                       f"{STAGE}/out/logits.npy"], "-", user=USER)
            notes.append("--skip-delivery: the exported model copied in, no deploy/agent")
    shown = [line for line in infer.strip().splitlines() if not line.startswith("latency")]
    print("\n".join("    | " + line for line in shown[-3:]))  # absolute emulated ms mislead
    ok, verdict = proof.compare(proof.reference_logits(trained.model_dir, trained.test_npz),
                                np.load(out))

    with timer.phase("latency") as notes:
        host = probe([sys.executable, str(HERE / "probe.py"), str(trained.model_dir),
                      str(trained.test_npz), "--samples", str(args.samples)],
                     lambda cmd: subprocess.run(cmd, capture_output=True, text=True,
                                                check=True).stdout)
        arm = probe([f"{VENV}/bin/python", f"{STAGE}/probe.py", f"{STAGE}/model",
                     f"{STAGE}/test.npz", "--samples", str(args.samples)],
                    lambda cmd: in_chroot(cmd, "-"))
        (logs / "latency.log").write_text(json.dumps({"host": host, "arm64": arm}, indent=1))
        ratio = arm["p50_ms"] / host["p50_ms"]
        notes.append(f"{args.samples} single-sample runs each side, 1 thread")

    what = "full proof (deploy → agent over MQTT → infer)" if delivery else \
        "emulation only (--skip-delivery: no deploy/agent)"
    report = (f"\nemulated arm64 per-sample latency (p50): {ratio:.1f}x the native x86 host's, "
              f"same model, 1 thread (qemu-user emulation, not a Pi)\n"
              f"{'PASS' if ok else 'FAIL'}: {what}: arm64 onnxruntime vs x86 onnxruntime on "
              f"{verdict}")
    return ok, report


if __name__ == "__main__":
    sys.exit(main())

"""The host side of the arm64 proof: a provisioned federation, a trained and exported student,
the secured Mosquitto, ``fededge deploy``, and the comparison against x86 onnxruntime.

Everything runs through the ``fededge`` command line an operator would use, so the proof
covers the same paths a real deployment takes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rootfs import Arm64Error, run

FEDERATION = "arm64proof"
PROFILE = "pi-5-8gb"                # a 64-bit Raspberry Pi OS device
DEVICE = f"dev000-{PROFILE}"        # the training device: what `fededge simulate` calls its first
AGENT = "arm64-kiosk"               # the emulated device: agent-only, runs DEVICE's model
TOLERANCE = 1e-4                    # max |logit difference| arm64 vs x86


def fededge_cmd() -> str:
    """The fededge entry point of the interpreter running this harness (the repo's venv)."""
    path = Path(sys.executable).with_name("fededge")
    if not path.exists():
        raise Arm64Error(f"{path}: no fededge command beside {sys.executable}; run the harness "
                         "with the repository's venv (make test-arm64 does)")
    return str(path)


def has_command(fededge: str, *words: str, option: str | None = None) -> bool:
    """Whether ``fededge WORDS --help`` works (and mentions ``option``)."""
    result = subprocess.run([fededge, *words, "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, check=False)
    return result.returncode == 0 and (option is None or option in result.stdout)


def federation_file(work: Path, port: int) -> Path:
    """A training device and the emulated agent-only device that runs its model, on a free
    loopback port. The training device's id is what simulate names its device, so the export
    directory and the kits agree on whose model it is; role = "agent" is what makes
    devices/install.sh pick the torch-free install by itself."""
    path = work / "federation.toml"
    path.write_text(f"""# written by tests/arm64/proof.py
[federation]
name = "{FEDERATION}"

[broker]
host = "127.0.0.1"
tls_port = {port}
bind = "127.0.0.1"

[dataset]
source = "digits"
partition = "iid"
seed = 0

[training]
rounds = 1

[[devices]]
id = "{DEVICE}"
profile = "{PROFILE}"

[[devices]]
id = "{AGENT}"
profile = "{PROFILE}"
role = "agent"
model_from = "{DEVICE}"
""")
    return path


@dataclass(frozen=True)
class Trained:
    model_dir: Path     # EXPORT/<device>
    export_dir: Path    # EXPORT, what `fededge deploy` takes
    test_npz: Path


def train_and_export(fededge: str, work: Path, log: Path) -> Trained:
    """A one-device, one-round federation (its student is the Pi 5 profile's) and its export."""
    run_dir, export_dir = work / "run", work / "export"
    run([fededge, "simulate", "--clients", "1", "--profiles", PROFILE, "--rounds", "1",
         "--partition", "iid", "--set", "warmup_epochs=5", "--out", str(run_dir)], log=log)
    run([fededge, "export", str(run_dir), "--device", DEVICE, "--out", str(export_dir)], log=log)
    return Trained(export_dir / DEVICE, export_dir, run_dir / "test.npz")


@contextlib.contextmanager
def broker(fededge: str, kits: Path, port: int, log: Path) -> Iterator[None]:
    """``fededge broker --kit`` (Mosquitto with TLS, passwords and ACL) for the duration."""
    from fededge.transport.brokers import wait_for_port

    out = log.open("ab")
    proc = subprocess.Popen([fededge, "broker", "--kit", str(kits / "broker")], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_port("127.0.0.1", port, 20.0):
            raise Arm64Error(f"the broker did not listen on 127.0.0.1:{port} within 20 s "
                             f"(log: {log})")
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)   # our own process group, by its id
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


def reference_logits(model_dir: Path, test_npz: Path) -> np.ndarray:
    """x86 onnxruntime logits of the exported model: the reference arm64 must reproduce."""
    from fededge.edge.runtime import EdgeModel, load_npz

    X, _ = load_npz(test_npz)
    return EdgeModel(model_dir, threads=1).logits(X)


def compare(reference: np.ndarray, arm64: np.ndarray) -> tuple[bool, str]:
    """Same argmax on every sample and max |difference| within TOLERANCE."""
    if arm64.shape != reference.shape:
        return False, f"shape {arm64.shape} on arm64, {reference.shape} on x86"
    same = reference.argmax(axis=1) == arm64.argmax(axis=1)
    diff = float(np.abs(reference - arm64).max())
    ok = bool(same.all()) and diff <= TOLERANCE
    return ok, (f"{len(reference)} test samples: argmax equal on {int(same.sum())}/{len(same)}, "
                f"max |logit diff| {diff:.2e} (limit {TOLERANCE:.0e})")

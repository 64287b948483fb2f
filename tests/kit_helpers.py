"""Provisioned kits on a real Mosquitto, for integration tests: the example federation file with
test settings, `fededge` subprocesses, and MQTT connections as a kit's party."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from helpers import has_mosquitto  # noqa: F401  (re-exported for the kit tests)

from fededge.transport.mqtt import MqttTransport, TlsConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "federation.toml"
DEVICES = ("pi5-kitchen", "jetson-lab", "gateway-1")  # the example's training devices
AGENT = "zero-kiosk"   # its agent-only device, which runs pi5-kitchen's model


def federation_file(tmp: Path, *, port: int = 8883, extra_device: bool = False,
                    settings: str = "", privacy: str = "") -> Path:
    """The shipped example with test-sized settings (ports, rounds, epochs) swapped in."""
    text = EXAMPLE.read_text().replace("tls_port = 8883", f"tls_port = {port}")
    text = re.sub(r"(?ms)^\[training\].*?(?=^# Optional local)",
                  f"[training]\n{settings}\n\n", text)
    if privacy:
        text = text.replace("# [privacy]", f"[privacy]\n{privacy}\n# ")
    if extra_device:
        text += '\n[[devices]]\nid = "pi4-garage"\nprofile = "pi-4-4gb"\n'
    path = tmp / "federation.toml"
    path.write_text(text)
    return path


class Processes:
    """Subprocesses started by a test, each in its own session so a whole tree can be ended."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``python -m fededge.cli ARGS`` from the repository, output to ``log``."""
        env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        proc = subprocess.Popen([sys.executable, "-m", "fededge.cli", *args], cwd=REPO, env=env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def connect_party(kits: Path, port: int, party: str, *, username: str | None = "",
                  password: str | None = None, cert_dir: Path | None = None,
                  timeout: float = 10.0) -> MqttTransport:
    """Connect with ``party``'s kit: its certificate (or ``cert_dir``'s), its password (or
    ``password``) and its user name (or ``username``; None: anonymous)."""
    kit, certs = kits / party, cert_dir or kits / party
    tls = TlsConfig(str(kits / party / "ca.crt"), str(certs / "client.crt"),
                    str(certs / "client.key"))
    user = party if username == "" else username
    secret = (kit / "password").read_text().strip() if password is None else password
    return MqttTransport(user or party, "127.0.0.1", port, username=user,
                         password=secret if user is not None else None, tls=tls).connect(timeout)


def collect(transport: MqttTransport, topic_filter: str) -> list[str]:
    """The topics of every message the filter receives from now on (appended as they come)."""
    got: list[str] = []
    transport.subscribe(topic_filter, lambda topic, payload: got.append(topic))
    return got

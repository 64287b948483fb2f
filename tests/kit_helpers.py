"""Provisioned kits on a real Mosquitto, for integration tests: the example federation file with
test settings, `fededge` subprocesses, and MQTT connections as a kit's party."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from helpers import has_mosquitto  # noqa: F401  (re-exported for the kit tests)

from fededge.kits.kit import login_files
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
    """Connect with ``party``'s kit: its password (or ``password``), its user name (or
    ``username``; None: anonymous) and the certificate of that user (a role user such as
    ``party@agent`` has its own), or ``cert_dir``'s client.crt/client.key."""
    kit = kits / party
    user = party if username == "" else username
    role = user.split("@", 1)[1] if user and user.startswith(f"{party}@") else None
    cert, key = ((cert_dir / "client.crt", cert_dir / "client.key") if cert_dir else
                 (kit / name for name in login_files(role)))
    tls = TlsConfig(str(kits / party / "ca.crt"), str(cert), str(key))
    secret = (kit / "password").read_text().strip() if password is None else password
    return MqttTransport(user or party, "127.0.0.1", port, username=user,
                         password=secret if user is not None else None, tls=tls).connect(timeout)


def collect(transport: MqttTransport, topic_filter: str) -> list[str]:
    """The topics of every message the filter receives from now on (appended as they come)."""
    got: list[str] = []
    transport.subscribe(topic_filter, lambda topic, payload: got.append(topic))
    return got


def http_json(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def poll(url: str, check: Callable[[dict], bool], seconds: float = 20.0) -> dict:
    """GET ``url`` until ``check(answer)`` holds (connection errors retried); the answer."""
    deadline, answer = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        try:
            answer = http_json(url)[1]
            if check(answer):
                return answer
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}: never as expected within {seconds:g} s; last answer {answer}")

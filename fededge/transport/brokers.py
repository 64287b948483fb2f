"""Brokers: the embedded amqtt broker (zero install, demos and tests) and a Mosquitto launcher.

Both serve plain MQTT 3.1.1 (retained, Last Will, QoS 1) and nothing broker-specific, so the
same server and clients run against either, or against a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from fededge.errors import FedEdgeError

log = logging.getLogger(__name__)

# Mosquitto silently drops QoS-1 messages beyond its default queue of 1000 per client.
DEFAULT_MAX_QUEUED = 100_000


class BrokerError(FedEdgeError, RuntimeError):
    """A broker could not start; the message says what to install or change."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (tests and simulations; never 1883)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class EmbeddedBroker:
    """amqtt running on its own event loop in a daemon thread, bound to loopback."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _config(self) -> dict:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                      "max_connections": -1}},
            # Only anonymous auth: the default plugin set adds $SYS publishing and packet logging
            # that cost CPU on every message.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        from amqtt.broker import Broker

        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._broker = Broker(self._config(), loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # surfaced to the starting thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        import amqtt.broker  # noqa: F401  here, so a missing amqtt is the caller's ImportError

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise BrokerError(f"embedded MQTT broker failed to start on {self.host}:{self.port}: "
                              f"{self._error or 'timeout'}. Is the port already in use?")
        return self

    def failure(self) -> str | None:
        """Why a started broker stopped serving (its thread ended), or None while it runs."""
        if self._thread is not None and self._started.is_set() and not self._thread.is_alive():
            return f"the embedded MQTT broker stopped ({self._error or 'its thread ended'})"
        return None

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout=10)
        except Exception:  # shutting down: nothing left to save
            log.debug("amqtt shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM a broker process (Mosquitto saves and closes cleanly on it), SIGKILL it if it
    has not exited within ``grace_s``; a no-op for a process that is gone or never started."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    if path is None:
        raise BrokerError("the 'mosquitto' broker is not installed. On Debian/Ubuntu/Raspberry "
                          "Pi OS: sudo apt-get install -y mosquitto")
    return path


def dev_mosquitto_conf(port: int, host: str = "127.0.0.1",
                       max_queued: int = DEFAULT_MAX_QUEUED) -> str:
    """An anonymous loopback-only config for tests and development."""
    return "\n".join([
        f"listener {port} {host}",
        "allow_anonymous true",
        "persistence false",
        f"max_queued_messages {max_queued}",
        "max_inflight_messages 0",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "",
    ])


class MosquittoBroker:
    """A Mosquitto process in the foreground, started and stopped by us."""

    def __init__(self, conf_path: Path | None = None, *, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port(host)
        self._tmp: tempfile.TemporaryDirectory | None = None
        if conf_path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fededge-mosquitto-")
            conf_path = Path(self._tmp.name) / "mosquitto.conf"
            conf_path.write_text(dev_mosquitto_conf(self.port, host))
        self.conf_path = Path(conf_path)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
            raise BrokerError(f"mosquitto did not start listening on {self.host}:{self.port}: "
                              f"{out.strip() or 'no output'}")
        return self

    def failure(self) -> str | None:
        """Why a started broker stopped serving (its process exited), or None while it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"mosquitto exited with status {self.proc.returncode}"
        return None

    def stop(self) -> None:
        stop_process(self.proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

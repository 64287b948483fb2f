"""Running Mosquitto from a broker kit, in the foreground.

The kit's files are staged into a fresh private runtime directory and Mosquitto runs there
(the kit's ``mosquitto.conf`` uses relative paths), which settles two things at once:
- the kit can live anywhere, including below a directory Mosquitto's user cannot enter;
- started as root, Mosquitto drops to the conf's ``user`` before it opens the 0600 password
  file, ACL and key; the staged copy is given to that user, the kit itself is left untouched.
SIGHUP re-stages the password file, ACL and revocation list and forwards the signal, so a
revocation takes effect without a restart (retained messages live in memory and would be lost
by one): Mosquitto re-reads all three, and rebuilds its TLS context with the new CRL.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fededge.files import SECRET_MODE, atomic_write
from fededge.kits import mosquitto as mq
from fededge.transport.brokers import BrokerError, mosquitto_binary, stop_process, wait_for_port

STAGED = (mq.CONF_NAME, mq.PASSWD_NAME, mq.ACL_NAME, mq.CA_NAME, mq.CERT_NAME, mq.KEY_NAME,
          mq.CRL_NAME)
RELOADED = (mq.PASSWD_NAME, mq.ACL_NAME, mq.CRL_NAME)


def _listening_ports() -> set[int] | None:
    """Local TCP ports in LISTEN state, from /proc (None where there is no /proc/net/tcp)."""
    ports, found = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        ports |= {int(f[1].rsplit(":", 1)[1], 16) for f in map(str.split, lines) if f[3] == "0A"}
    return ports if found else None


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float) -> bool:
    """Wait until Mosquitto listens. Watching /proc instead of connecting keeps a bogus
    'unexpected eof' TLS error out of the broker's log at every start."""
    if _listening_ports() is None:
        return wait_for_port(host, port, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if port in (_listening_ports() or set()):
            return True
        time.sleep(0.05)
    return False


class KitBroker:
    """Mosquitto started from ``kit`` (a ``KITS/broker`` directory)."""

    def __init__(self, kit: str | Path) -> None:
        self.kit = Path(kit)
        missing = [name for name in STAGED if not (self.kit / name).is_file()]
        if missing:
            raise BrokerError(f"{self.kit}: not a broker kit (missing {', '.join(missing)}); "
                              "pass the broker/ directory written by `fededge provision` (an "
                              "older one lacks crl.pem: re-run provision on the same output)")
        conf = (self.kit / mq.CONF_NAME).read_text()
        listener = re.search(r"^listener\s+(\d+)(?:\s+(\S+))?", conf, re.MULTILINE)
        user = re.search(r"^user\s+(\S+)", conf, re.MULTILINE)
        if listener is None:
            raise BrokerError(f"{self.kit / mq.CONF_NAME}: no listener line; re-provision")
        self.port = int(listener.group(1))
        bind = listener.group(2) or "0.0.0.0"
        self.host = "127.0.0.1" if bind in ("0.0.0.0", "::") else bind
        self.user = user.group(1) if user else None
        self.binary = mosquitto_binary()
        self.proc: subprocess.Popen | None = None
        self._runtime: Path | None = None

    def _owner(self) -> tuple[int, int] | None:
        """Who must own the staged files: the conf's user when we are root, else nobody."""
        if os.geteuid() != 0 or self.user is None:
            return None
        try:
            entry = pwd.getpwnam(self.user)
        except KeyError:
            raise BrokerError(
                f"user {self.user!r} named in {self.kit / mq.CONF_NAME} does not exist; "
                "install Debian's mosquitto package (it creates it) or set [broker] user in "
                "the federation file and re-provision") from None
        return entry.pw_uid, entry.pw_gid

    def _stage(self, names: tuple[str, ...]) -> None:
        owner = self._owner()
        for name in names:
            atomic_write(self._runtime / name, (self.kit / name).read_bytes(), mode=SECRET_MODE,
                         owner=owner)

    def start(self, timeout: float = 10.0) -> KitBroker:
        self._runtime = Path(tempfile.mkdtemp(prefix="fededge-broker-"))
        owner = self._owner()
        if owner:
            os.chown(self._runtime, *owner)
        self._stage(STAGED)
        self.proc = subprocess.Popen([self.binary, "-c", mq.CONF_NAME], cwd=self._runtime)
        if not _wait_listening(self.proc, self.host, self.port, timeout):
            code = self.proc.poll()
            self.stop()
            raise BrokerError(f"mosquitto did not start listening on {self.host}:{self.port} "
                              f"({'exit code ' + str(code) if code is not None else 'timeout'}; "
                              "its log is above)")
        return self

    def reload(self) -> None:
        """Re-read the kit's password file, ACL and CRL (after a re-provision or revocation)."""
        if self.proc is not None and self.proc.poll() is None:
            self._stage(RELOADED)
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        stop_process(self.proc)
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def run_foreground(self, on_ready: Callable[[KitBroker], None] = lambda broker: None) -> int:
        """Start, serve until SIGINT/SIGTERM (forwarded to Mosquitto), clean up; SIGHUP
        reloads credentials. Returns Mosquitto's exit code."""
        self.start()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM,
                                                            signal.SIGINT)}
        signal.signal(signal.SIGHUP, lambda *_: self.reload())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.proc.terminate())
        try:
            on_ready(self)
            return self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

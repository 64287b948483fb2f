"""The emulated arm64 system: host tools, the binfmt handler, a cached Debian rootfs, chroot runs.

Why a chroot under qemu-user rather than a full VM: it needs only Debian packages
(``debootstrap``, ``qemu-user-static``), builds in minutes, and shares the host's network
namespace, so an agent inside reaches a broker on the host's 127.0.0.1 with no networking setup.

Safety: the chroot bind-mounts the host's ``/dev``. A rootfs is never deleted while anything is
mounted below it (``rmtree`` would follow the bind mount into the host's ``/dev``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"                      # Debian 12: python3 is 3.11, like the host's
PACKAGES = ("python3", "python3-venv")  # python3-venv brings ensurepip, so venvs get pip
HOST_PACKAGES = {"debootstrap": "debootstrap", "qemu-aarch64-static": "qemu-user-static",
                 "update-binfmts": "binfmt-support"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
STAMP = ".fededge-rootfs"               # written last: a rootfs without it is half-built
# The Raspberry Pi 5's core (the proof's device profile), rather than qemu's default "max", whose
# SVE/SME a Pi never has: onnxruntime then picks the kernels a Pi 5 would run.
CPU = "cortex-a76"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Arm64Error(RuntimeError):
    """A setup step that failed; the message names what and how to fix it."""


def run(cmd: Sequence[str], *, log: Path | None = None, check: bool = True,
        env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a host command; with ``log`` its output goes to that file instead of the terminal
    (debootstrap and pip are chatty), and a failure quotes the log's tail."""
    if log is None:
        result = subprocess.run(list(cmd), env=env, timeout=timeout, check=False)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
            out.flush()
            result = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    timeout=timeout, check=False)
    if check and result.returncode != 0:
        tail = "" if log is None else "\n" + "\n".join(log.read_text(errors="replace")
                                                       .splitlines()[-25:])
        raise Arm64Error(f"`{' '.join(map(str, cmd))}` exited {result.returncode}"
                         f"{f' (log: {log})' if log else ''}{tail}")
    return result


def require_root() -> None:
    if os.geteuid() != 0:
        raise Arm64Error("needs root (debootstrap, chroot and mount do): "
                         "run `sudo make test-arm64`")


def ensure_host_tools(log: Path) -> list[str]:
    """Install the Debian packages the emulation needs when missing; returns what it installed."""
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items()
                      if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()
                      and not Path("/usr/bin", tool).exists()})
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise Arm64Error(f"missing {', '.join(missing)} and no apt-get to install them; "
                         "this harness needs a Debian or Ubuntu host")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], log=log, env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], log=log, env=env)
    return missing


def ensure_binfmt(log: Path) -> None:
    """Register qemu-aarch64 with the kernel so arm64 binaries run transparently.

    Debian's qemu-user-static registers with the 'F' (fix-binary) flag, so the interpreter is
    opened once on the host and need not exist inside the rootfs."""
    if not (BINFMT_DIR / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], log=log)
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        run(["update-binfmts", "--enable", "qemu-aarch64"], log=log, check=False)
    if not entry.exists() or not entry.read_text().startswith("enabled"):
        raise Arm64Error(f"{entry}: the qemu-aarch64 binfmt handler is not enabled; check that "
                         "qemu-user-static and binfmt-support are installed and the container "
                         "may mount binfmt_misc (docker: --privileged)")


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below ``root`` (deepest first, the order to unmount them)."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_all(root: Path) -> None:
    for point in mounts_below(root):
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def safe_rmtree(root: Path) -> None:
    """Delete a rootfs, but only once nothing is mounted below it."""
    if not root.exists():
        return
    unmount_all(root)
    left = mounts_below(root)
    if left:
        raise Arm64Error(f"refusing to delete {root}: still mounted: {', '.join(left)}; "
                         "unmount them (umount -l) and retry")
    shutil.rmtree(root)


def build_rootfs(root: Path, mirror: str, log: Path, *, rebuild: bool = False) -> bool:
    """Build the Debian arm64 rootfs at ``root`` unless a complete one is cached there.

    Built in ``root.partial`` and renamed when done, so an interrupted build is never reused.
    Returns True when it built one."""
    spec = f"{SUITE} arm64 minbase {','.join(PACKAGES)}\n"
    stamp = root / STAMP
    if not rebuild and stamp.is_file() and stamp.read_text() == spec:
        return False
    partial = root.with_name(root.name + ".partial")
    safe_rmtree(partial)
    safe_rmtree(root)
    run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
         SUITE, str(partial), mirror], log=log)
    unmount_all(partial)  # debootstrap bind-mounts /dev in containers; make sure it is gone
    (partial / STAMP).write_text(spec)
    partial.rename(root)
    return True


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc and /dev inside the rootfs for the duration (qemu-user and Python need /proc,
    Python wants /dev/urandom and /dev/null).

    Not /sys: with the host's sysfs CPU lists next to the host's x86 /proc/cpuinfo (qemu-user
    does not emulate it), the cpuinfo library inside onnxruntime 1.32 segfaults while loading.
    Without /sys it reports that it cannot detect the CPU and onnxruntime runs normally."""
    unmount_all(root)  # left over from a killed run
    try:
        (root / "proc").mkdir(exist_ok=True)
        run(["mount", "-t", "proc", "proc", str(root / "proc")])
        (root / "dev").mkdir(exist_ok=True)
        run(["mount", "--bind", "/dev", str(root / "dev")])
        yield
    finally:
        unmount_all(root)


def chroot(root: Path, cmd: Sequence[str], *, log: Path | None = None, check: bool = True,
           timeout: float | None = None, user: str | None = None, capture: bool = False,
           cpu: str = CPU) -> subprocess.CompletedProcess:
    """Run ``cmd`` inside the rootfs with a clean environment (nothing of the host's venv), on
    the emulated CPU model ``cpu`` (qemu-user reads QEMU_CPU from the program's environment).
    A ``user`` gets the home install.sh gives the service user."""
    env = {"PATH": CHROOT_PATH, "HOME": "/var/lib/fededge" if user else "/root",
           "LANG": "C.UTF-8", "QEMU_CPU": cpu, "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    full = ["chroot", *([f"--userspec={user}:{user}"] if user else []), str(root),
            "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *cmd]
    if capture:
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check and result.returncode != 0:
            raise Arm64Error(f"in the arm64 chroot, `{' '.join(cmd)}` exited "
                             f"{result.returncode}:\n{result.stdout}{result.stderr}")
        return result
    return run(full, log=log, check=check, timeout=timeout)


def python_version(root: Path, cpu: str = CPU) -> str:
    """The rootfs's Python as 'X.Y' (the wheels must match it) — checked, not assumed."""
    code = "import sys, platform; print('%d.%d' % sys.version_info[:2], platform.machine())"
    out = chroot(root, ["python3", "-c", code],
                 capture=True, cpu=cpu).stdout.split()
    if out[1] != "aarch64":
        raise Arm64Error(f"{root}: python3 reports machine {out[1]!r}, not aarch64; is the "
                         "binfmt handler for qemu-aarch64 registered?")
    return out[0]


class Timer:
    """Wall-clock seconds per phase, printed as they finish and summarised at the end."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float, str]] = []

    @contextlib.contextmanager
    def phase(self, name: str, note: str = "") -> Iterator[list[str]]:
        notes = [note] if note else []
        print(f"==> {name}...", flush=True)
        start = time.monotonic()
        yield notes
        seconds = time.monotonic() - start
        self.phases.append((name, seconds, "; ".join(n for n in notes if n)))
        print(f"    {name}: {seconds:.1f} s{'  (' + notes[-1] + ')' if notes else ''}",
              flush=True)

    def summary(self) -> str:
        width = max(len(n) for n, _, _ in self.phases)
        lines = [f"  {n:<{width}}  {s:7.1f} s  {note}".rstrip() for n, s, note in self.phases]
        total = sum(s for _, s, _ in self.phases)
        return "\n".join(["phase timings:", *lines, f"  {'total':<{width}}  {total:7.1f} s"])

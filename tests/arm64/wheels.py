"""The aarch64 wheels an edge device installs, fetched on the host, and fededge's own wheel.

Why download on the host: the emulated system then installs offline (``pip --no-index``), which
is both faster than resolving under qemu and what a device without internet access would do.
The list is fededge's own dependencies read from pyproject.toml (the torch-free edge install,
``pip install fededge``), the same list ``devices/install.sh`` installs for an agent-only
device, so the proof covers exactly what a device gets.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: fededge depends on tomli there
    import tomli as tomllib

from rootfs import Arm64Error, run

# aarch64 wheels are tagged with either spelling; allow each glibc baseline Debian 12 meets.
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
STAMP = ".complete"


def edge_requirements(repo: Path) -> list[str]:
    """The base dependencies of the repository's pyproject.toml: the edge install."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    if "torch" in " ".join(project.get("dependencies", [])):
        raise Arm64Error(f"{repo / 'pyproject.toml'}: fededge's own dependencies include torch; "
                         "they are the edge install and must not (torch is the train extra)")
    return list(project.get("dependencies", []))


def download(requirements: list[str], python: str, cache: Path, log: Path) -> tuple[Path, bool]:
    """Download the aarch64 wheels of ``requirements`` for CPython ``python`` ('3.11') into a
    cache directory named by their hash; returns it and whether anything was downloaded."""
    key = hashlib.sha256("\n".join([python, *PLATFORMS, *requirements]).encode()).hexdigest()
    dest = cache / f"py{python}-{key[:12]}"
    if (dest / STAMP).is_file():
        return dest, False
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", *platforms,
         "--python-version", python, "--implementation", "cp", "--abi",
         f"cp{python.replace('.', '')}", "--dest", str(dest), *requirements], log=log)
    (dest / STAMP).write_text("\n".join(requirements) + "\n")
    return dest, True


def build_fededge(repo: Path, dest: Path, log: Path) -> Path:
    """A wheel of the work tree (pure Python, so the same wheel serves arm64)."""
    shutil.rmtree(dest, ignore_errors=True)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest), str(repo)],
        log=log)
    wheels = sorted(dest.glob("fededge-*.whl"))
    if len(wheels) != 1:
        raise Arm64Error(f"{dest}: expected one fededge wheel, found {len(wheels)}")
    return wheels[0]

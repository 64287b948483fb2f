"""Atomic file writes with explicit modes, for kits that hold secrets.

A secret is created 0600 from its first byte (``os.open`` with the mode, then ``fchmod`` because
the umask can only narrow it), written to a temporary name and renamed into place, so a reader
never sees a half-written key and an interrupted provision never leaves a world-readable one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
EXECUTABLE_MODE = 0o755
PRIVATE_DIR_MODE = 0o700


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if fd != -1:
            os.close(fd)
    os.replace(tmp, path)


def write_secret(path: Path, data: bytes | str) -> None:
    """Write a file only its owner may read (keys, passwords, the broker's password file)."""
    _atomic_write(path, data.encode() if isinstance(data, str) else data, SECRET_MODE)


def write_file(path: Path, data: bytes | str, *, executable: bool = False) -> None:
    """Write a public file (certificates, configs, scripts)."""
    _atomic_write(path, data.encode() if isinstance(data, str) else data,
                  EXECUTABLE_MODE if executable else PUBLIC_MODE)


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory only its owner may enter: a kit holds its secrets."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()

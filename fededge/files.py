"""Atomic file writes with explicit modes: every file fededge writes for later use goes through
``atomic_write`` (kits with secrets, checkpoints, consensus files, installed models).

A secret is created 0600 from its first byte (``os.open`` with the mode, then ``fchmod`` because
the umask can only narrow it), written to a temporary name and renamed into place, so a reader
never sees a half-written key and an interrupted provision never leaves a world-readable one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644
EXECUTABLE_MODE = 0o755
PRIVATE_DIR_MODE = 0o700


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable: the directory entry, not just the file's data."""
    fsync_path(path)


def atomic_write(path: Path, data: bytes | str | Callable[[Path], None], *,
                 mode: int = PUBLIC_MODE, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` so that a crash leaves the old file or the new one, never a torn one:
    write a temporary file beside it, fsync, rename, fsync the directory.

    ``data`` is the content, or a function that writes a given path (a library's own saver,
    such as safetensors' ``save_file``; its file is chmodded to ``mode`` afterwards, so pass
    secrets as bytes, which are 0600 from the first byte). ``owner`` (uid, gid) is set before
    the rename, for a file another user's process reads (the broker's password file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if callable(data):
        tmp.unlink(missing_ok=True)
        data(tmp)
        os.chmod(tmp, mode)
        fsync_path(tmp)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fd = -1
                fh.write(data.encode() if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            if fd != -1:
                os.close(fd)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_secret(path: Path, data: bytes | str) -> None:
    """Write a file only its owner may read (keys, passwords, the broker's password file)."""
    atomic_write(path, data, mode=SECRET_MODE)


def write_file(path: Path, data: bytes | str, *, executable: bool = False) -> None:
    """Write a public file (certificates, configs, scripts)."""
    atomic_write(path, data, mode=EXECUTABLE_MODE if executable else PUBLIC_MODE)


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

"""A device's installed model versions, below ``KIT/state/agent/``::

    versions/<version>/   a complete export bundle per kept version (manifest.json, model.onnx...)
    installed.json        {"current": ..., "previous": ..., "rolled_back": ...}

Installing writes the new version into ``versions/.partial-<version>/`` (every file fsynced),
renames it to ``versions/<version>/`` and only then replaces ``installed.json`` (temporary file,
fsync, rename: ``files.write_file``). A crash anywhere before that last rename leaves the old
pointer, so the previous model keeps serving; the next start deletes partial and unreferenced
directories. One pointer file rather than two symlinks, so current and previous change in one
atomic step. Only the current and the previous version are kept, for ``--rollback``.

Standard library only: the edge agent and ``fededge infer KIT`` read this on torch-free devices.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from fededge.errors import FedEdgeError
from fededge.files import fsync_dir, write_file
from fededge.kits.kit import STATE_DIR

AGENT_DIR = "agent"
VERSIONS_DIR = "versions"
POINTER_FILE = "installed.json"
PARTIAL_PREFIX = ".partial-"


class InstallError(FedEdgeError, ValueError):
    """Install state that cannot be used or changed; the message names the file and the fix."""


@dataclass(frozen=True)
class Pointer:
    """Which versions are installed. ``rolled_back`` is the version an operator rolled back
    from: the agent does not re-install it from the still-retained deployment."""

    current: str | None = None
    previous: str | None = None
    rolled_back: str | None = None


class Installs:
    """The versions installed below one agent state directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / VERSIONS_DIR
        self.pointer_file = self.root / POINTER_FILE

    @classmethod
    def of_kit(cls, kit_dir: str | Path) -> Installs:
        return cls(Path(kit_dir) / STATE_DIR / AGENT_DIR)

    def pointer(self) -> Pointer:
        if not self.pointer_file.is_file():
            return Pointer()
        try:
            return Pointer(**json.loads(self.pointer_file.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise InstallError(f"{self.pointer_file}: unreadable ({exc}); delete it and deploy "
                               "again") from None

    def path(self, version: str) -> Path:
        return self.versions / version

    def current_dir(self) -> Path | None:
        current = self.pointer().current
        return None if current is None else self.path(current)

    def stage(self, version: str, files: dict[str, bytes]) -> Path:
        """Write a version's files durably to ``versions/<version>/``; not yet current."""
        partial = self.versions / f"{PARTIAL_PREFIX}{version}"
        final = self.path(version)
        for stale in (partial, final):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, data in files.items():
            write_file(partial / name, data)
        fsync_dir(partial)
        os.replace(partial, final)
        fsync_dir(self.versions)
        return final

    def activate(self, version: str) -> Pointer:
        """Make a staged version current and the current one previous, in one atomic step."""
        old = self.pointer()
        pointer = Pointer(current=version, previous=old.current)
        self._swap(pointer)
        self.clean()
        return pointer

    def rollback(self) -> Pointer:
        """Serve the previous version again; the current one becomes previous (so a second
        rollback undoes the first) and is not re-installed from the retained deployment."""
        old = self.pointer()
        if old.previous is None or not self.path(old.previous).is_dir():
            raise InstallError(f"{self.root}: no previous version to roll back to (installed: "
                               f"{old.current or 'nothing'})")
        pointer = Pointer(current=old.previous, previous=old.current, rolled_back=old.current)
        self._swap(pointer)
        return pointer

    def discard(self, version: str) -> None:
        """Delete a staged version that failed its checks (never the current or previous)."""
        pointer = self.pointer()
        if version not in (pointer.current, pointer.previous):
            shutil.rmtree(self.path(version), ignore_errors=True)

    def clean(self) -> None:
        """Delete partial writes and every version neither current nor previous."""
        if not self.versions.is_dir():
            return
        pointer = self.pointer()
        keep = {pointer.current, pointer.previous}
        for entry in self.versions.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _swap(self, pointer: Pointer) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_file(self.pointer_file, json.dumps(asdict(pointer), indent=2) + "\n")
        fsync_dir(self.root)

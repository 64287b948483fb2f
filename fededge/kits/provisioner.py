"""How provisioning runs, in the shape of NVIDIA FLARE's ``nvflare/lighter`` (``spec.Builder``,
``provisioner.Provisioner``): an ordered list of builders, one concern each, over one shared
context, writing into a staging copy of the output directory that takes its place only once
every builder is done.

    initialize   every builder, in order     read and check; write nothing
    build        every builder, in order     write below ``ctx.root``, the staging copy
    finalize     every builder, in reverse   check what was built (the first builder last)

Then the staging copy replaces OUT. On any exception (a bad input, a full disk, Ctrl-C) the
staging directory is removed and OUT is as it was: no half-written kit, no revocation that
reached the ACL but not the password file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fededge.errors import FedEdgeError
from fededge.files import fsync_dir, fsync_path
from fededge.kits.kit import STATE_DIR


class ProvisionError(FedEdgeError, ValueError):
    """Provisioning cannot go on; the message names the input (file and line, or kit)."""


@dataclass(kw_only=True)
class Context:
    """What every builder shares: the output directory and its staging copy. Builders add
    what they find out or make as fields of a subclass (``provision.ProvisionContext``)."""

    out: Path                                    # the output directory, as messages name it
    root: Path = field(init=False, repr=False)   # its staging copy (set by the provisioner):
                                                 # builders read and write here

    def shown(self, path: Path) -> Path:
        """``path`` (below ``root``) as it will be once committed, for messages."""
        return self.out / path.relative_to(self.root)


class Builder:
    """One concern of provisioning; each phase does nothing unless overridden."""

    def initialize(self, ctx: Context) -> None:
        """Read what exists and check the inputs; write nothing."""

    def build(self, ctx: Context) -> None:
        """Write this concern's files below ``ctx.root``."""

    def finalize(self, ctx: Context) -> None:
        """Check what was built, before it is committed (runs in reverse builder order)."""


class Provisioner:
    def __init__(self, builders: Sequence[Builder]) -> None:
        if not builders:
            raise ValueError("a provisioner needs at least one builder")
        self.builders = list(builders)

    def provision(self, ctx: Context) -> Context:
        """Run every builder over a staging copy of ``ctx.out``; replace ``ctx.out`` with it
        when all are done, or remove it and re-raise."""
        staging = Staging(ctx.out)
        try:
            ctx.root = staging.root
            for builder in self.builders:
                builder.initialize(ctx)
            for builder in self.builders:
                builder.build(ctx)
            for builder in reversed(self.builders):
                builder.finalize(ctx)
            staging.commit()
        finally:
            staging.discard()
        return ctx


def _durable_copy(src: str, dst: str) -> None:
    """``copy2``, then fsync: the copy replaces the original, which is then deleted, so a
    power cut must not leave an empty CA key where the old one was."""
    shutil.copy2(src, dst)
    fsync_path(Path(dst))


class Staging:
    """A copy of ``out`` that replaces it on ``commit``, in a private (0700) directory beside it
    (``.<name>.provision-XXXXXXXX/<name>``, on the same filesystem, so a rename moves it).

    The copy holds every kit (existing CA, passwords, keys and certificates are kept), but not
    the kits' runtime ``state/`` directories: ``commit`` moves those over instead of copying
    them, so a server's checkpoints or an agent's installed models are never duplicated and
    files open in them stay valid. If ``out`` is a symbolic link, what it points to is replaced.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.target = Path(os.path.realpath(out))
        anchor = self.target.parent  # where a new OUT's box goes: its nearest existing parent
        while not anchor.is_dir():
            anchor = anchor.parent
        if self.target.exists() and not self.target.is_dir():
            raise ProvisionError(f"{out}: exists and is not a directory; choose another --out")
        self.box = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.provision-", dir=anchor))
        self.root = self.box / self.target.name
        try:
            if self.target.is_dir():
                shutil.copytree(self.target, self.root, symlinks=True,
                                copy_function=_durable_copy, ignore=self._runtime_state)
            else:
                self.root.mkdir()  # with the umask's mode, as OUT would have been
        except BaseException:
            self.discard()
            raise

    def _runtime_state(self, directory: str, names: list[str]) -> list[str]:
        return [STATE_DIR] if STATE_DIR in names and Path(directory).parent == self.target \
            else []

    def commit(self) -> None:
        """Move the kits' ``state/`` into the copy, then the copy into OUT's place. Each step
        is a rename; a failure undoes the steps done, so OUT stays as it was."""
        for directory, _, _ in os.walk(self.root):  # copies and new directories, durable
            fsync_dir(Path(directory))
        undo: list[tuple[Path, Path]] = []

        def move(src: Path, dst: Path) -> None:
            os.rename(src, dst)
            undo.append((dst, src))
            fsync_dir(dst.parent)
        try:
            if self.target.is_dir():
                for state in sorted(self.target.glob(f"*/{STATE_DIR}")):
                    kit = self.root / state.parent.name
                    if kit.is_dir():  # a revoked device's state goes with its kit
                        move(state, kit / STATE_DIR)
                move(self.target, self.box / f"{self.target.name}.previous")
            self.target.parent.mkdir(parents=True, exist_ok=True)
            move(self.root, self.target)
        except BaseException:
            for src, dst in reversed(undo):
                os.rename(src, dst)
            raise

    def discard(self) -> None:
        """Remove the staging directory: after a commit, what OUT was before."""
        shutil.rmtree(self.box, ignore_errors=True)

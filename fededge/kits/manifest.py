"""Kit manifests: the SHA-256 of every file of a kit, and their verification.

Every kit directory (a device's, the server's, the broker's) carries its own ``manifest.json`` so
it can be checked where it was copied to; the output root's manifest covers every file of every
kit. Files under a kit's ``state/`` directory are runtime output (checkpoints), not kit content.
"""

from __future__ import annotations

import json
from pathlib import Path

from fededge.errors import FedEdgeError
from fededge.files import sha256_file, write_file
from fededge.kits.kit import MANIFEST_FILE, STATE_DIR


def _kit_files(root: Path) -> list[Path]:
    """Every file below ``root`` except manifests and runtime state, sorted."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or path.name == MANIFEST_FILE or STATE_DIR in rel.parts[:-1]:
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # an interrupted atomic write
        files.append(path)
    return files


def write_manifest(root: Path, description: str) -> None:
    digests = {str(p.relative_to(root)): sha256_file(p) for p in _kit_files(root)}
    body = {"description": description, "algorithm": "sha256", "files": digests}
    write_file(root / MANIFEST_FILE, json.dumps(body, indent=2, sort_keys=True) + "\n")


class ManifestError(FedEdgeError, ValueError):
    """A directory without a readable manifest."""


def verify_manifest(root: Path) -> tuple[int, list[str]]:
    """Check ``root`` against its manifest: (files checked, problems). A problem is a changed,
    missing or unlisted file, each named by its path relative to ``root``."""
    path = root / MANIFEST_FILE
    try:
        listed = json.loads(path.read_text())["files"]
    except FileNotFoundError:
        raise ManifestError(f"{root}: no {MANIFEST_FILE}; pass a directory written by "
                            "`fededge provision` (the output root or one kit)") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc!r}); the kit was damaged, "
                            "re-provision it") from None
    problems = []
    for rel, digest in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{rel}: changed (SHA-256 differs from the manifest)")
    present = {str(p.relative_to(root)) for p in _kit_files(root)}
    problems += [f"{rel}: not in the manifest (added after provisioning)"
                 for rel in sorted(present - set(listed))]
    return len(listed), problems

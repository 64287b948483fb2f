"""Kit manifests: the SHA-256 of every file of a kit, signed, and their verification.

Every kit directory (a device's, the server's, the broker's) carries its own ``manifest.json`` so
it can be checked where it was copied to; the output root's manifest covers every file of every
kit. Files under a kit's ``state/`` directory are runtime output (checkpoints, installed models),
not kit content.

A hash list alone proves nothing: whoever edits a file can rewrite its hash. So provisioning
signs each manifest with its kit-signing certificate (``pki.KIT_SIGNING``, issued by the
federation CA, its key kept in ``ca/``) into ``manifest.sig``, which holds the exact signed
manifest text. Verification trusts that signed text, not ``manifest.json``: a manifest edited or
re-hashed afterwards is named as such, and every file is compared with the hash that was signed.
The trust anchor is the CA certificate: the kit's own ``ca.crt`` unless the caller pins one
(``verify-kit --ca``); its fingerprint is reported, to compare with what provision printed.

Secret files (keys, passwords, the broker's password file) must stay readable by their owner
alone: the signed manifest lists them and verification checks their mode.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fededge.errors import FedEdgeError
from fededge.files import SECRET_MODE, sha256_file, write_file
from fededge.kits import pki
from fededge.kits.kit import CA_FILE, MANIFEST_FILE, PASSWORD_FILE, STATE_DIR

SIGNATURE_FILE = "manifest.sig"
SIGNED_FORMAT = "fededge-kit-manifest/1"
SECRET_NAMES = (PASSWORD_FILE, "passwd")  # besides every *.key
CA_PLACES = (CA_FILE, f"ca/{CA_FILE}")    # a kit's CA, or the provision output's


def is_secret(name: str) -> bool:
    """A file only its owner may read: a private key or a password file."""
    base = Path(name).name
    return base.endswith(".key") or base in SECRET_NAMES


def _kit_files(root: Path) -> list[Path]:
    """Every file below ``root`` except manifests and runtime state, sorted."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if (not path.is_file() or path.name in (MANIFEST_FILE, SIGNATURE_FILE)
                or STATE_DIR in rel.parts[:-1]):
            continue
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            continue  # an interrupted atomic write
        files.append(path)
    return files


def write_manifest(root: Path, description: str, signer: pki.Identity) -> None:
    """``manifest.json`` (every file's SHA-256, and which are secret) and ``manifest.sig``."""
    digests = {str(p.relative_to(root)): sha256_file(p) for p in _kit_files(root)}
    body = {"description": description, "algorithm": "sha256", "files": digests,
            "secrets": sorted(rel for rel in digests if is_secret(rel))}
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    write_file(root / MANIFEST_FILE, text)
    sealed = {"format": SIGNED_FORMAT, "manifest": text,
              **pki.signature_fields(signer, text.encode())}
    write_file(root / SIGNATURE_FILE, json.dumps(sealed, indent=2, sort_keys=True) + "\n")


class ManifestError(FedEdgeError, ValueError):
    """A directory without a readable manifest."""


@dataclass
class KitCheck:
    """What ``verify_manifest`` found: files checked, every problem (empty: the kit is intact),
    the signer and the CA the signature was checked against."""

    checked: int
    problems: list[str] = field(default_factory=list)
    signer: str | None = None      # the kit-signing certificate's CN, once the signature held
    ca: str | None = None          # "<CN> (SHA-256 <fingerprint>)" of the trust anchor


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable {what} ({exc!r}); the kit was damaged, "
                            "re-provision it") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a {what}; the kit was damaged, re-provision it")
    return data


def _trust_anchor(root: Path, pinned: Path | None, check: KitCheck):
    """The CA certificate to check the signature against: ``pinned``, else the kit's own. A
    kit whose own CA differs from the pinned one is a problem in itself."""
    own = next((root / place for place in CA_PLACES if (root / place).is_file()), None)
    try:
        ca = pki.load_certificate(pinned) if pinned is not None else (
            pki.load_certificate(own) if own is not None else None)
        if ca is None:
            check.problems.append(f"{CA_FILE}: missing; no CA to check the signature against "
                                  "(pass --ca KITS/ca/ca.crt)")
            return None
        if pinned is not None and own is not None and pki.load_certificate(own) != ca:
            check.problems.append(f"{own.relative_to(root)}: not the trusted CA {pinned} "
                                  f"(fingerprint {pki.fingerprint(pki.load_certificate(own))})")
    except pki.PkiError as exc:
        check.problems.append(str(exc))
        return None
    check.ca = f"{pki.common_name(ca)!r} (SHA-256 {pki.fingerprint(ca)})"
    return ca


def _signed_manifest(root: Path, text: str, own: dict, ca, check: KitCheck) -> dict | None:
    """The manifest as signed at provisioning, or None (with the problem recorded)."""
    path = root / SIGNATURE_FILE
    if not path.is_file():
        check.problems.append(f"{SIGNATURE_FILE}: missing, so nothing proves the manifest is "
                              "provisioning's (a kit from before kits were signed: re-run "
                              "`fededge provision` on the same output)")
        return None
    sealed = _read_json(path, "manifest signature")
    signed = sealed.get("manifest")
    if sealed.get("format") != SIGNED_FORMAT or not isinstance(signed, str):
        check.problems.append(f"{SIGNATURE_FILE}: not a {SIGNED_FORMAT} signature")
        return None
    if ca is None:
        return None
    try:
        cert = pki.verify_fields(sealed, ca, signed.encode(), pki.KIT_SIGNING)
    except pki.SignatureError as exc:
        check.problems.append(f"{SIGNATURE_FILE}: signature refused: {exc}")
        return None
    check.signer = pki.common_name(cert)
    listing = json.loads(signed)
    if text != signed:
        mine, theirs = _files_of(own), _files_of(listing)
        changed = sorted(rel for rel in mine.keys() | theirs.keys()
                         if mine.get(rel) != theirs.get(rel))
        detail = f" (entries of {', '.join(changed)})" if changed else ""
        check.problems.append(f"{MANIFEST_FILE}: differs from the manifest signed at "
                              f"provisioning{detail}: edited or re-hashed afterwards")
    return listing


def _files_of(manifest: dict) -> dict[str, str]:
    files = manifest.get("files")
    return files if isinstance(files, dict) else {}


def verify_manifest(root: Path, ca_file: Path | None = None) -> KitCheck:
    """Check ``root`` against its signed manifest: the signature (against ``ca_file``, else the
    kit's own CA), every file's SHA-256, files added since, and the mode of secret files. Each
    problem names the file, relative to ``root``, and what differs."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{root}: no {MANIFEST_FILE}; pass a directory written by "
                            "`fededge provision` (the output root or one kit)")
    text = path.read_text()
    own = _read_json(path, "manifest")
    check = KitCheck(0)
    ca = _trust_anchor(root, ca_file, check)
    signed = _signed_manifest(root, text, own, ca, check)
    manifest = signed if signed is not None else own
    listed = _files_of(manifest)
    if not listed:
        raise ManifestError(f"{path}: lists no files; the kit was damaged, re-provision it")
    check.checked = len(listed)
    for rel, digest in sorted(listed.items()):
        file = root / rel
        if not file.is_file():
            check.problems.append(f"{rel}: missing")
        elif sha256_file(file) != digest:
            check.problems.append(f"{rel}: changed (its SHA-256 differs from the signed "
                                  "manifest)" if signed is not None else
                                  f"{rel}: changed (its SHA-256 differs from the manifest)")
    present = {str(p.relative_to(root)) for p in _kit_files(root)}
    check.problems += [f"{rel}: not in the manifest (added after provisioning)"
                       for rel in sorted(present - set(listed))]
    secrets = manifest.get("secrets") or [rel for rel in listed if is_secret(rel)]
    for rel in sorted(secrets):
        file = root / rel
        if file.is_file() and stat.S_IMODE(file.stat().st_mode) & 0o077:
            check.problems.append(
                f"{rel}: mode {stat.S_IMODE(file.stat().st_mode):04o}, but a secret must be "
                f"{SECRET_MODE:04o} (readable by its owner alone): chmod 600 {file}")
    return check

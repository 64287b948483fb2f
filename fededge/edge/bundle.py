"""Model delivery on the wire: how ``fededge deploy`` packs, chunks and signs an exported bundle,
and how the edge agent checks what it receives. No network and no torch: both ends import it
(reading an export directory is the only file access).

A bundle is the files of one export directory (``manifest.json`` and every file it lists)
concatenated in name order. Its **descriptor** names the federation, the device, the version,
each file (name, size, SHA-256), the bundle's size and SHA-256, the chunk size and the SHA-256
of every chunk. The descriptor travels **sealed**: a JSON envelope holding the exact signed
descriptor text, an ECDSA P-256/SHA-256 signature over it, and the PEM of the code-signing
certificate that made it (see ``pki``). Topics (``topics.Topics``), all retained:

    fededge/<fed>/deploy/<device>                     the sealed descriptor of the current bundle
    fededge/<fed>/deploy/<device>/<version>/<index>   chunk ``index`` of that bundle, raw bytes

A receiver trusts nothing before the seal opens (certificate issued by its own federation's CA
for code signing, valid signature). After that every chunk must match its signed hash on
arrival, the reassembled bundle its signed size and hash, and every file its signed hash, so a
byte changed anywhere between the export directory and the device is named, not installed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fededge.edge import runtime
from fededge.edge.runtime import MANIFEST
from fededge.errors import FedEdgeError
from fededge.kits import pki
from fededge.wire import boundedjson
from fededge.wire.topics import MAX_CHUNKS, ProtocolError, validate_id

FORMAT = "fededge-deploy/1"
DEFAULT_CHUNK_BYTES = 128 * 1024
"""Below the tightest common broker limit (AWS IoT Core's 128 KB message size)."""
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
"""A device holds a whole bundle in memory while it arrives; refuse descriptors above this."""
MAX_SEAL_BYTES = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DeliveryError(FedEdgeError, ValueError):
    """A descriptor, chunk or bundle a device must refuse; the message is the logged reason."""


@dataclass(frozen=True)
class BundleFile:
    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Descriptor:
    """What one signed deployment promises; ``chunks`` holds the SHA-256 of every chunk."""

    federation: str
    device: str
    version: str
    created: str
    files: tuple[BundleFile, ...]
    bundle_bytes: int
    bundle_sha256: str
    chunk_bytes: int
    chunks: tuple[str, ...]

    def to_json(self) -> bytes:
        """The canonical text that is signed (sorted keys, no spaces)."""
        body = {"format": FORMAT, **asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: bytes) -> Descriptor:
        """Parse and check a descriptor; any inconsistency is a ``DeliveryError``."""
        try:
            raw = boundedjson.loads(text, max_depth=4)
            kind = raw.pop("format")
        except (ValueError, KeyError, AttributeError, TypeError):
            raise DeliveryError("descriptor is not a JSON object with a format") from None
        if kind != FORMAT:
            raise DeliveryError(f"descriptor format {kind!r} is not {FORMAT}; upgrade fededge "
                                "on the device")
        try:
            files = tuple(BundleFile(**f) for f in raw.pop("files"))
            descriptor = cls(files=files, chunks=tuple(raw.pop("chunks")), **raw)
        except (KeyError, TypeError) as exc:
            raise DeliveryError(f"descriptor is malformed ({exc!r:.120})") from None
        descriptor._check()
        return descriptor

    def _check(self) -> None:
        try:
            for value, what in ((self.federation, "federation name"), (self.device, "device id"),
                                (self.version, "version id")):
                validate_id(value, what)
            for f in self.files:
                validate_id(f.name, "file name")
        except ProtocolError as exc:
            raise DeliveryError(f"descriptor: {exc}") from None
        names = [f.name for f in self.files]
        hashes = [self.bundle_sha256, *(f.sha256 for f in self.files), *self.chunks]
        counts = [self.bundle_bytes, self.chunk_bytes, *(f.bytes for f in self.files)]
        if (MANIFEST not in names or len(set(names)) != len(names)
                or not all(isinstance(h, str) and _SHA256.match(h) for h in hashes)
                or not all(isinstance(n, int) and n >= 0 for n in counts)
                or self.chunk_bytes == 0 or self.bundle_bytes == 0
                or not isinstance(self.created, str)):
            raise DeliveryError("descriptor: files must be unique and include "
                                f"{MANIFEST}, hashes hex SHA-256, sizes whole numbers")
        if self.bundle_bytes != sum(f.bytes for f in self.files):
            raise DeliveryError(f"descriptor: bundle of {self.bundle_bytes} bytes is not the sum "
                                "of its files")
        if self.bundle_bytes > MAX_BUNDLE_BYTES:
            raise DeliveryError(f"descriptor: bundle of {self.bundle_bytes} bytes exceeds the "
                                f"device limit of {MAX_BUNDLE_BYTES}")
        if len(self.chunks) > MAX_CHUNKS:
            raise DeliveryError(
                f"bundle for {self.device} of {self.bundle_bytes} bytes needs {len(self.chunks)} "
                f"chunks, more than the {MAX_CHUNKS} a broker safely queues for one device; "
                f"deploy with --chunk-bytes {-(-self.bundle_bytes // MAX_CHUNKS)} or more")
        if len(self.chunks) != -(-self.bundle_bytes // self.chunk_bytes):
            raise DeliveryError(f"descriptor: {len(self.chunks)} chunks cannot carry "
                                f"{self.bundle_bytes} bytes in chunks of {self.chunk_bytes}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_export(model_dir: str | Path) -> dict[str, bytes]:
    """The files of an export directory (``fededge export`` writes one per device): its
    manifest and every file it lists, each checked against the manifest's SHA-256."""
    try:
        manifest = runtime.read_manifest(model_dir)
    except runtime.InferenceError as exc:
        raise DeliveryError(str(exc)) from None
    return {name: (Path(model_dir) / name).read_bytes()
            for name in [MANIFEST, *manifest["files"]]}


def check_fits(manifest: dict[str, Any], input_shape: list[int], num_classes: int) -> None:
    """Raise unless the exported model takes ``input_shape`` samples and scores
    ``num_classes`` classes, as the federation's data does."""
    try:
        got_input = list(manifest["input"]["shape"][1:])
        got_classes = manifest["output"]["shape"][1]
    except (KeyError, TypeError, IndexError):
        raise DeliveryError(f"{MANIFEST} lacks the input and output shapes; re-export the "
                            "model") from None
    if got_input != list(input_shape) or got_classes != num_classes:
        raise DeliveryError(
            f"model takes input {tuple(got_input)} and scores {got_classes} classes, but this "
            f"federation's data is {tuple(input_shape)} with {num_classes} classes; deploy a "
            "student trained in this federation")


def version_id(manifest: bytes, when: dt.datetime) -> str:
    """A bundle's version: UTC time to the second, then a prefix of the manifest's SHA-256
    (the manifest hashes every model file), so versions sort by age and name their content."""
    return f"{when.astimezone(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{sha256_hex(manifest)[:12]}"


def same_content(version: str | None, manifest: bytes) -> bool:
    """True if ``version`` (a ``version_id``) names a bundle with this manifest."""
    return version is not None and version.endswith("-" + sha256_hex(manifest)[:12])


def describe(federation: str, device: str, files: dict[str, bytes], *, chunk_bytes: int,
             when: dt.datetime) -> tuple[Descriptor, list[bytes]]:
    """Pack ``files`` (name → content) into a bundle for ``device``; returns its descriptor
    and its chunks."""
    names = sorted(files)
    bundle = b"".join(files[name] for name in names)
    chunks = [bundle[i:i + chunk_bytes] for i in range(0, len(bundle), chunk_bytes)]
    descriptor = Descriptor(
        federation=federation, device=device, version=version_id(files[MANIFEST], when),
        created=when.astimezone(dt.timezone.utc).isoformat(timespec="seconds"),
        files=tuple(BundleFile(n, len(files[n]), sha256_hex(files[n])) for n in names),
        bundle_bytes=len(bundle), bundle_sha256=sha256_hex(bundle), chunk_bytes=chunk_bytes,
        chunks=tuple(sha256_hex(c) for c in chunks))
    descriptor._check()
    return descriptor, chunks


def seal(descriptor: Descriptor, signer: pki.Identity) -> bytes:
    """The descriptor with its signature and the signer's certificate, ready to publish."""
    text = descriptor.to_json()
    return json.dumps({"format": FORMAT, "descriptor": text.decode(),
                       **pki.signature_fields(signer, text)}, sort_keys=True).encode()


def open_seal(payload: bytes, ca: x509.Certificate) -> Descriptor:
    """The descriptor of a sealed payload, after checking its signature chains to ``ca``."""
    if len(payload) > MAX_SEAL_BYTES:
        raise DeliveryError(f"sealed descriptor of {len(payload)} bytes exceeds "
                            f"{MAX_SEAL_BYTES}")
    try:
        envelope: dict[str, Any] = boundedjson.loads(payload, max_depth=4)
        text = envelope["descriptor"].encode()
        base64.b64decode(envelope["signature"], validate=True)
        envelope["certificate"].encode()
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        raise DeliveryError(f"not a sealed {FORMAT} descriptor") from None
    try:
        pki.verify_fields(envelope, ca, text, ExtendedKeyUsageOID.CODE_SIGNING)
    except pki.SignatureError as exc:
        raise DeliveryError(f"signature refused: {exc}") from None
    return Descriptor.from_json(text)


def check_chunk(descriptor: Descriptor, index: int, data: bytes) -> None:
    """Raise unless ``data`` is chunk ``index`` exactly as signed."""
    if not 0 <= index < len(descriptor.chunks):
        raise DeliveryError(f"chunk {index} of version {descriptor.version}: the descriptor "
                            f"lists {len(descriptor.chunks)} chunks")
    if sha256_hex(data) != descriptor.chunks[index]:
        raise DeliveryError(f"chunk {index} of version {descriptor.version}: SHA-256 differs "
                            "from the signed descriptor (corrupted or tampered with)")


def unpack(descriptor: Descriptor, chunks: list[bytes]) -> dict[str, bytes]:
    """The files of a bundle from its chunks (in order), each checked against its signed hash."""
    bundle = b"".join(chunks)
    if len(bundle) != descriptor.bundle_bytes or sha256_hex(bundle) != descriptor.bundle_sha256:
        raise DeliveryError(f"bundle {descriptor.version}: size or SHA-256 differs from the "
                            "signed descriptor")
    files, offset = {}, 0
    for f in descriptor.files:
        data = bundle[offset:offset + f.bytes]
        offset += f.bytes
        if sha256_hex(data) != f.sha256:
            raise DeliveryError(f"bundle {descriptor.version}: {f.name} SHA-256 differs from "
                                "the signed descriptor")
        files[f.name] = data
    return files

"""The federation's small PKI: one CA, a TLS certificate for the broker, one client certificate
per MQTT user (its user name as CN: the broker takes the CN as the user, so a certificate is an
identity), a code-signing certificate for ``fededge deploy``, a kit-signing certificate that
signs every kit's manifest, and the certificate revocation list the broker checks. Built with
``cryptography``; no openssl command line needed.

Each signature has its own certificate and purpose (extended key usage), and a verifier accepts
only the purpose it expects: bundles are signed with the code-signing certificate rather than
the CA key itself, so the CA key can stay offline with the operator, and devices accept a
signature when the certificate chains to the CA in their kit and says ``codeSigning``, which no
TLS certificate of the federation does (a stolen device key cannot sign models for the others).
Kit manifests are signed by provisioning's own certificate (``KIT_SIGNING``, a private purpose),
so neither a deploy key nor a device key can re-sign an edited kit.

Keys are EC P-256: small enough for a Pi Zero's TLS handshake to stay fast, and supported by
every OpenSSL that Mosquitto and Python link against. PEM files, unencrypted keys: the device
has to start unattended, so key protection is file mode 0600 (see ``files.write_secret``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fededge.errors import FedEdgeError
from fededge.files import write_file, write_secret

CA_YEARS = 10
LEAF_YEARS = 5
KIT_SIGNING = x509.ObjectIdentifier("2.25.119213581123806457955107143954843179744")
"""Extended key usage of the certificate that signs kit manifests: a UUID-based OID (ITU-T
X.667), so no other certificate of the federation, and no public CA's, has it."""
USAGE_NAMES = {ExtendedKeyUsageOID.CODE_SIGNING: "code-signing",
               ExtendedKeyUsageOID.CLIENT_AUTH: "TLS client",
               ExtendedKeyUsageOID.SERVER_AUTH: "TLS server", KIT_SIGNING: "kit-signing"}


class PkiError(FedEdgeError, ValueError):
    """A certificate or key on disk that cannot be used; the message names the file."""


class SignatureError(FedEdgeError, ValueError):
    """A signature a receiver must refuse; the message says which check failed."""


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key, both as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def save(self, cert_path: Path, key_path: Path) -> None:
        write_file(cert_path, self.cert_pem)
        write_secret(key_path, self.key_pem)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> "Identity":
        try:
            return cls(cert_path.read_bytes(), key_path.read_bytes())
        except OSError as exc:
            raise PkiError(f"{exc.filename}: cannot read ({exc.strerror})") from None


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_key(identity: Identity) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the key of {common_name(identity.cert)!r} is not an EC key; was it "
                       "made by fededge provision?")
    return key


def create_ca(federation: str) -> Identity:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"fededge {federation} CA", f"fededge {federation}")
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return Identity(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def issue(ca: Identity, common_name: str, *, hosts: list[str] | None = None,
          usage: x509.ObjectIdentifier | None = None) -> Identity:
    """A leaf certificate signed by ``ca`` for one ``usage`` (extended key usage): by default
    a TLS server certificate valid for ``hosts`` (as SANs; clients check the host they dial
    against them), or a TLS client certificate without hosts."""
    ca_cert, ca_key = ca.cert, _private_key(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = usage or (ExtendedKeyUsageOID.SERVER_AUTH if hosts else
                      ExtendedKeyUsageOID.CLIENT_AUTH)
    signs = usage in (ExtendedKeyUsageOID.CODE_SIGNING, KIT_SIGNING)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name, ca_cert.subject.get_attributes_for_oid(
                   NameOID.ORGANIZATION_NAME)[0].value))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(min(now + dt.timedelta(days=365 * LEAF_YEARS),
                                    ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=not signs,
                                            key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Identity(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def server_hosts(cert: x509.Certificate) -> list[str]:
    """The SAN entries (IP addresses and DNS names) of a server certificate, as strings."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + \
        list(san.get_values_for_type(x509.DNSName))


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if ``ca`` signed ``cert`` (so a kept certificate still chains to the kept CA)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    """The certificate's extended key usages (empty without the extension)."""
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def is_code_signing(cert: x509.Certificate) -> bool:
    """True if the certificate's extended key usage allows signing code (deploy bundles)."""
    return ExtendedKeyUsageOID.CODE_SIGNING in usages(cert)


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint, as ``openssl x509 -fingerprint -sha256`` prints it."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_certificate(path: Path) -> x509.Certificate:
    """A PEM certificate file; an unreadable one is a ``PkiError`` naming it."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{path}: not a readable PEM certificate ({exc})") from None


def _load_crl(pem: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate revocation list ({exc})") from None


def revoked_serials(pem: bytes) -> list[int]:
    """The serial numbers a PEM CRL revokes."""
    return sorted(entry.serial_number for entry in _load_crl(pem))


def crl_lists(pem: bytes, ca: x509.Certificate, serials: list[int]) -> bool:
    """True if the PEM CRL is signed by ``ca``, still valid in a year, and revokes exactly
    ``serials``."""
    crl = _load_crl(pem)
    year = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=365)
    return (crl.is_signature_valid(ca.public_key()) and crl.issuer == ca.subject
            and crl.next_update_utc is not None and crl.next_update_utc > year
            and revoked_serials(pem) == sorted(set(serials)))


def revocation_list(ca: Identity, serials: list[int]) -> bytes:
    """A PEM CRL of ``serials``, signed by ``ca``, valid until the CA expires: the broker refuses
    a revoked certificate at the TLS handshake, and with a CRL configured it refuses every
    certificate if the CRL expires, so it must not lapse before the certificates it covers."""
    ca_cert, now = ca.cert, dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(now - dt.timedelta(minutes=5))
               .next_update(ca_cert.not_valid_after_utc))
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial)
            .revocation_date(now - dt.timedelta(minutes=5)).build())
    crl = builder.sign(_private_key(ca), hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def sign(identity: Identity, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of ``data`` with the identity's key."""
    return _private_key(identity).sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert_pem: bytes, ca: x509.Certificate, data: bytes, signature: bytes,
                     usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CODE_SIGNING
                     ) -> x509.Certificate:
    """Check that ``signature`` over ``data`` was made with the key of ``cert_pem``, a
    certificate for ``usage`` (code signing by default) issued by ``ca`` and valid now; returns
    the certificate. Each failed check raises ``SignatureError`` naming it."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise SignatureError("the signing certificate is not a PEM certificate") from None
    who = f"signing certificate {common_name(cert)!r}"
    if not issued_by(cert, ca):
        raise SignatureError(f"{who} was not issued by this federation's CA "
                             f"({common_name(ca)!r})")
    now = dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise SignatureError(f"{who} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d}"
                             f" to {cert.not_valid_after_utc:%Y-%m-%d}); check the clock")
    if usage not in usages(cert):
        raise SignatureError(f"{who} is not a {USAGE_NAMES.get(usage, usage.dotted_string)} "
                             "certificate")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"{who} does not hold an EC key")
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(f"the signature does not verify with {who}") from None
    return cert


def signature_fields(signer: Identity, text: bytes) -> dict[str, str]:
    """The JSON fields that seal ``text``: an ECDSA signature and the signer's certificate. A
    sealed document (a deploy descriptor, a kit manifest) carries them beside its exact text."""
    return {"signature": base64.b64encode(sign(signer, text)).decode(),
            "certificate": signer.cert_pem.decode()}


def verify_fields(fields: dict, ca: x509.Certificate, text: bytes,
                  usage: x509.ObjectIdentifier) -> x509.Certificate:
    """Check ``signature_fields`` of ``text`` (see ``verify_signature``); a missing or
    malformed field is a ``SignatureError`` too."""
    try:
        signature = base64.b64decode(fields["signature"], validate=True)
        certificate = fields["certificate"].encode()
    except (KeyError, TypeError, AttributeError, ValueError, binascii.Error):
        raise SignatureError("no well-formed signature and certificate") from None
    return verify_signature(certificate, ca, text, signature, usage)

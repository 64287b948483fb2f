"""The federation's small PKI: one CA, a TLS certificate for the broker, one client certificate
per party (device id as CN), and a code-signing certificate for ``fededge deploy``. Built with
``cryptography``; no openssl command line needed.

Bundles are signed with that code-signing certificate rather than the CA key itself, so the CA
key can stay offline with the operator: devices accept a signature when the certificate chains
to the CA in their kit and says ``codeSigning``, which no TLS certificate of the federation does
(a stolen device key cannot sign models for the others).

Keys are EC P-256: small enough for a Pi Zero's TLS handshake to stay fast, and supported by
every OpenSSL that Mosquitto and Python link against. PEM files, unencrypted keys: the device
has to start unattended, so key protection is file mode 0600 (see ``files.write_secret``).
"""

from __future__ import annotations

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
          code_signing: bool = False) -> Identity:
    """A leaf certificate signed by ``ca``: a TLS server certificate valid for ``hosts`` (as
    SANs; clients check the host they dial against them), a code-signing certificate, or else
    a client certificate."""
    ca_cert, ca_key = ca.cert, _private_key(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = (ExtendedKeyUsageOID.CODE_SIGNING if code_signing else
             ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH)
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
                                            key_agreement=not code_signing,
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


def is_code_signing(cert: x509.Certificate) -> bool:
    """True if the certificate's extended key usage allows signing code (deploy bundles)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CODE_SIGNING in usages


def sign(identity: Identity, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature (DER) of ``data`` with the identity's key."""
    return _private_key(identity).sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert_pem: bytes, ca: x509.Certificate, data: bytes,
                     signature: bytes) -> x509.Certificate:
    """Check that ``signature`` over ``data`` was made with the key of ``cert_pem``, a
    code-signing certificate issued by ``ca`` and valid now; returns the certificate. Each
    failed check raises ``SignatureError`` naming it."""
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
    if not is_code_signing(cert):
        raise SignatureError(f"{who} is not a code-signing certificate")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"{who} does not hold an EC key")
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureError(f"the signature does not verify with {who}") from None
    return cert

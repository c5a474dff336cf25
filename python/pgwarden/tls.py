"""TLS contexts for both ends of the gateway, and a self-signed certificate for development.

Client side (the gateway as a server): TLS 1.2 or newer and ALPN ``postgresql``, which
PostgreSQL 17 clients require for ``sslnegotiation=direct``.  Upstream side (the gateway as a
client): one context per libpq ``sslmode`` value, with libpq's meanings.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any, Final

ALPN_POSTGRESQL = "postgresql"


class _DirectSSLObject(ssl.SSLObject):
    """An SSLObject whose ``read``/``write``/``pending`` are the C methods themselves.

    ``ssl.SSLObject`` wraps each of them in a Python method that only forwards the call;
    the event loop's TLS transport calls them for every record, so skipping the wrapper
    takes one Python frame per record off the relay path.  Same signatures, same errors.
    """

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> _DirectSSLObject:
        self: _DirectSSLObject = super()._create(*args, **kwargs)  # type: ignore[misc]
        native = self._sslobj  # type: ignore[attr-defined]
        self.read = native.read  # type: ignore[method-assign]
        self.write = native.write  # type: ignore[method-assign]
        self.pending = native.pending  # type: ignore[method-assign]
        return self


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Context offered to clients, for SSLRequest upgrades and direct TLS alike."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    # Renegotiation is a DoS vector and PostgreSQL disables it too.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


#: A certificate closer than this to its expiry gets a warning when it is loaded.
EXPIRY_WARNING: Final = datetime.timedelta(days=14)


def describe_certificate(cert_file: Path) -> tuple[str, str | None]:
    """The first certificate of a PEM chain, for the log: (subject, expiry and SHA-256
    fingerprint, the one to compare with what a client saw; a warning when it has expired
    or expires within :data:`EXPIRY_WARNING`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    expires = cert.not_valid_after_utc
    text = (
        f"{cert.subject.rfc4514_string()}, expires {expires.strftime('%Y-%m-%d %H:%M:%S UTC')}, "
        f"SHA-256 {cert.fingerprint(hashes.SHA256()).hex()}"
    )
    left = expires - datetime.datetime.now(datetime.UTC)
    warning = None
    if left <= datetime.timedelta(0):
        warning = f"the TLS certificate in {cert_file} has expired: clients that verify it fail"
    elif left < EXPIRY_WARNING:
        warning = f"the TLS certificate in {cert_file} expires in {left.days} day(s)"
    return text, warning


def upstream_context(mode: str, ca_file: Path | None) -> ssl.SSLContext | None:
    """Context for connecting to PostgreSQL in libpq ``sslmode`` ``mode``; None for disable.

    ``prefer`` and ``require`` encrypt without checking the certificate (libpq's meaning),
    ``verify-ca`` checks the chain, ``verify-full`` checks the chain and the host name.
    """
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_POSTGRESQL])
    if mode in ("prefer", "require"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = mode == "verify-full"
    return ctx


def generate_dev_certificate(directory: Path, *, days: int = 30) -> tuple[Path, Path]:
    """Write a self-signed certificate for ``localhost`` / ``127.0.0.1`` / ``::1``.

    Returns ``(cert_file, key_file)``; the key file is created with mode 0600.  Meant for the
    demo and local development only: clients cannot verify it beyond ``sslmode=require``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "pgwarden-dev.crt"
    key_file = directory / "pgwarden-dev.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_file.touch(mode=0o600, exist_ok=True)
    key_file.chmod(0o600)
    key_file.write_bytes(key_bytes)
    return cert_file, key_file

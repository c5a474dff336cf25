"""A renewed TLS certificate is picked up on SIGHUP: new handshakes get it, open sessions
go on, and a pair of files that does not load leaves the current certificate in place."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
from pathlib import Path

import pytest

import pgproto
from harness import GatewayProcess, StartGateway, wait_until
from pgwarden.tls import generate_dev_certificate

SSL_REQUEST = 80877103


def presented_certificate(gateway: GatewayProcess) -> str:
    """SHA-256 of the certificate the gateway shows a new client (SSLRequest, then TLS)."""
    with socket.create_connection((gateway.host, gateway.port), timeout=10) as sock:
        sock.sendall(pgproto.request_code_message(SSL_REQUEST))
        assert sock.recv(1) == b"S"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with context.wrap_socket(sock) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def fingerprint(cert_file: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert_file.read_text())).hexdigest()


def install(pair: tuple[Path, Path], cert_file: Path, key_file: Path) -> None:
    """Replace the files the gateway reads, as a renewal job would (write, then rename)."""
    for source, target in zip(pair, (cert_file, key_file), strict=True):
        staged = target.with_suffix(".new")
        shutil.copyfile(source, staged)
        staged.replace(target)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_loads_a_renewed_certificate(
    start_gateway: StartGateway, tmp_path: Path, workers: int
) -> None:
    old = generate_dev_certificate(tmp_path / "old")
    new = generate_dev_certificate(tmp_path / "new")
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"
    install(old, cert_file, key_file)
    gateway = start_gateway(
        {"workers": workers, "tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
    )
    assert presented_certificate(gateway) == fingerprint(old[0])
    with gateway.connect(sslmode="require", autocommit=True) as session:
        install(new, cert_file, key_file)
        gateway.process.send_signal(signal.SIGHUP)
        assert wait_until(
            lambda: gateway.stderr.count("TLS certificate reloaded from") == workers, 10
        ), gateway.stderr
        assert f"SHA-256 {fingerprint(new[0])}" in gateway.stderr
        # Every worker shows the new one (SO_REUSEPORT spreads the handshakes).
        for _ in range(4 * workers):
            assert presented_certificate(gateway) == fingerprint(new[0])
        # The session opened before goes on with the certificate it was made with.
        assert session.execute("select 'still here'").fetchone() == ("still here",)

        # A broken renewal: the gateway keeps serving the certificate it has.
        cert_file.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        gateway.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: gateway.stderr.count("not reloaded") == workers, 10)
        assert presented_certificate(gateway) == fingerprint(new[0])
        assert session.execute("select 1").fetchone() == (1,)
    assert gateway.alive()

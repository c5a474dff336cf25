"""The startup phase: TLS (negotiated and direct), GSSENC, protocol version negotiation."""

from __future__ import annotations

import socket
import ssl

import asyncpg
import psycopg
import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    TEST_DATABASE,
    GatewayCertificates,
    GatewayProcess,
    StartGateway,
    run_tool,
)
from pgproto import (
    AUTH_CLEARTEXT,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
    RawConnection,
    password,
    request_code_message,
    startup_message,
)


def test_psql_sslmode_require(gateway: GatewayProcess) -> None:
    env = {**gateway.env(), "PGSSLMODE": "require"}
    result = run_tool(["psql", "--no-psqlrc", "-c", "\\conninfo", "-c", "select 'tls ok'"], env)
    assert result.returncode == 0, result.stderr
    assert "SSL connection (protocol: TLSv1." in result.stdout
    assert "tls ok" in result.stdout


def test_psycopg_verify_full(gateway: GatewayProcess, gateway_certs: GatewayCertificates) -> None:
    dsn = gateway.dsn(sslmode="verify-full", sslrootcert=str(gateway_certs.ca_file))
    with psycopg.connect(dsn) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select 1").fetchone() == (1,)


def test_psycopg_rejects_untrusted_certificate(gateway: GatewayProcess, tmp_path: object) -> None:
    import trustme

    other_ca = trustme.CA()
    path = f"{tmp_path}/other-ca.pem"
    other_ca.cert_pem.write_to_path(path)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(gateway.dsn(sslmode="verify-full", sslrootcert=path))


def test_ssl_request_answered_n_without_certificate(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"tls_cert_file": None, "tls_key_file": None})
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(request_code_message(SSL_REQUEST_CODE))
    assert conn.read_byte() == b"N"
    conn.startup(CLIENT_USER, TEST_DATABASE)
    conn.authenticate(CLIENT_PASSWORD)
    assert any(m.tag == b"D" for m in conn.simple_query("select 1"))
    conn.close()
    # libpq's sslmode=prefer falls back to plaintext on 'N'.
    with psycopg.connect(gateway.dsn(sslmode="prefer")) as pg:
        assert not pg.info.pgconn.ssl_in_use


def test_require_client_tls_refuses_plaintext(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"require_client_tls": True})
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.startup(CLIENT_USER, TEST_DATABASE)
    error = conn.read_error_or_close()
    assert error is not None, "plaintext client must get an ErrorResponse"
    assert error.sqlstate == "28000"
    assert error.fields["S"] == "FATAL"
    conn.close()

    result = run_tool(["psql", "-c", "select 1"], {**gateway.env(), "PGSSLMODE": "disable"})
    assert result.returncode != 0
    with psycopg.connect(gateway.dsn(sslmode="require")) as tls_conn:
        assert tls_conn.execute("select 'over tls'").fetchone() == ("over tls",)


@pytest.mark.anyio
async def test_require_client_tls_sqlstate_seen_by_asyncpg(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"require_client_tls": True})
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await gateway.connect_asyncpg()


def test_direct_tls_with_alpn(gateway: GatewayProcess, gateway_certs: GatewayCertificates) -> None:
    """PostgreSQL 17 clients may start TLS at once (first byte 0x16), ALPN "postgresql"."""
    context = ssl.create_default_context(cafile=str(gateway_certs.ca_file))
    context.set_alpn_protocols(["postgresql"])
    raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "postgresql"
    conn = RawConnection(tls)
    conn.send(startup_message([("user", CLIENT_USER), ("database", TEST_DATABASE)]))
    first = conn.read_message()
    assert first.tag == b"R" and first.auth_code == AUTH_CLEARTEXT
    conn.send(password(CLIENT_PASSWORD))
    messages = conn.read_until(b"Z")
    assert next(m for m in messages if m.tag == b"R").auth_code == 0
    conn.close()


def test_direct_tls_without_alpn_is_refused(
    gateway: GatewayProcess, gateway_certs: GatewayCertificates
) -> None:
    context = ssl.create_default_context(cafile=str(gateway_certs.ca_file))
    raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
    try:
        tls = context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError):
        return  # refused during the handshake (no_application_protocol alert)
    conn = RawConnection(tls)
    conn.send(startup_message([("user", CLIENT_USER), ("database", TEST_DATABASE)]))
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate == "08P01"
    conn.close()


def test_psycopg_direct_ssl_negotiation(
    gateway: GatewayProcess, gateway_certs: GatewayCertificates
) -> None:
    if psycopg.pq.version() < 170000:
        pytest.skip("libpq older than 17 has no sslnegotiation=direct")
    dsn = gateway.dsn(
        sslmode="verify-full", sslrootcert=str(gateway_certs.ca_file), sslnegotiation="direct"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select 'direct'").fetchone() == ("direct",)


def test_gssenc_request_answered_n_then_startup(gateway: GatewayProcess) -> None:
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(request_code_message(GSSENC_REQUEST_CODE))
    assert conn.read_byte() == b"N"
    conn.startup(CLIENT_USER, TEST_DATABASE)
    conn.authenticate(CLIENT_PASSWORD)
    rows = [m for m in conn.simple_query("select 'after gssenc'") if m.tag == b"D"]
    assert rows and b"after gssenc" in rows[0].body
    conn.close()


def test_gssenc_then_ssl_request(
    gateway: GatewayProcess, gateway_certs: GatewayCertificates
) -> None:
    """libpq with gssencmode=prefer and sslmode=require: GSSENC refused, then TLS."""
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(request_code_message(GSSENC_REQUEST_CODE))
    assert conn.read_byte() == b"N"
    conn.send(request_code_message(SSL_REQUEST_CODE))
    assert conn.read_byte() == b"S"
    context = ssl.create_default_context(cafile=str(gateway_certs.ca_file))
    tls = context.wrap_socket(conn.sock, server_hostname="localhost")
    tls_conn = RawConnection(tls)
    tls_conn.startup(CLIENT_USER, TEST_DATABASE)
    tls_conn.authenticate(CLIENT_PASSWORD)
    tls_conn.close()


def test_psql_with_gssencmode_prefer(gateway: GatewayProcess) -> None:
    env = {**gateway.env(), "PGGSSENCMODE": "prefer", "PGSSLMODE": "prefer"}
    result = run_tool(["psql", "--no-psqlrc", "-Atc", "select 'works'"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "works"


def test_newer_minor_version_and_unknown_option_negotiated(gateway: GatewayProcess) -> None:
    """A "greased" startup (3.9999 and an unknown _pq_ option) gets NegotiateProtocolVersion."""
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(
        startup_message(
            [
                ("user", CLIENT_USER),
                ("database", TEST_DATABASE),
                ("_pq_.test_protocol_negotiation", "1"),
            ],
            minor=9999,
        )
    )
    first = conn.read_message()
    assert first.tag == b"v", f"expected NegotiateProtocolVersion, got {first}"
    newest_minor = int.from_bytes(first.body[:4], "big")
    count = int.from_bytes(first.body[4:8], "big")
    names = [n.decode() for n in first.body[8:].split(b"\0") if n]
    assert newest_minor in (0, 1, 2)
    assert count == 1 and names == ["_pq_.test_protocol_negotiation"]
    conn.authenticate(CLIENT_PASSWORD)
    rows = [m for m in conn.simple_query("select 1") if m.tag == b"D"]
    assert len(rows) == 1
    conn.close()


def test_protocol_3_2_startup(gateway: GatewayProcess) -> None:
    """Protocol 3.2 (PostgreSQL 18) is either spoken or negotiated down to 3.0."""
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(startup_message([("user", CLIENT_USER), ("database", TEST_DATABASE)], minor=2))
    first = conn.read_message()
    if first.tag == b"v":
        assert int.from_bytes(first.body[:4], "big") in (0, 1)
        messages = conn.authenticate(CLIENT_PASSWORD)
        key_lengths = {len(m.body) - 4 for m in messages if m.tag == b"K"}
        assert key_lengths == {4}
    else:
        assert first.tag == b"R" and first.auth_code == AUTH_CLEARTEXT
        conn.send(password(CLIENT_PASSWORD))
        messages = conn.read_until(b"Z")
        assert not [m for m in messages if m.tag == b"E"]
    assert len([m for m in conn.simple_query("select 1") if m.tag == b"D"]) == 1
    conn.close()


def test_unknown_option_in_protocol_3_0(gateway: GatewayProcess) -> None:
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(
        startup_message(
            [("user", CLIENT_USER), ("database", TEST_DATABASE), ("_pq_.made_up", "on")]
        )
    )
    first = conn.read_message()
    assert first.tag == b"v"
    assert int.from_bytes(first.body[:4], "big") == 0
    assert b"_pq_.made_up" in first.body
    conn.authenticate(CLIENT_PASSWORD)
    conn.close()


def test_libpq_max_protocol_version_3_2(gateway: GatewayProcess) -> None:
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq older than 18 cannot ask for protocol 3.2")
    with psycopg.connect(gateway.dsn(max_protocol_version="3.2")) as conn:
        assert conn.execute("select 'negotiated'").fetchone() == ("negotiated",)
        assert conn.info.pgconn.protocol_version == 3


def test_major_version_2_refused(gateway: GatewayProcess) -> None:
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.send(startup_message([("user", CLIENT_USER), ("database", TEST_DATABASE)], major=2))
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate in ("08P01", "0A000")
    conn.close()

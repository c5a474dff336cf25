"""Client authentication at the gateway, and the gateway's own login upstream."""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    MD5_PASSWORD,
    MD5_ROLE,
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    TEST_DATABASE,
    TLS_PASSWORD,
    TLS_ROLE,
    GatewayCertificates,
    GatewayProcess,
    StartGateway,
    run_tool,
)
from pgproto import connect_authenticated
from pgwarden.pgcluster import TemporaryCluster


def test_scram_upstream_role_is_current_user(
    cluster: TemporaryCluster, gateway: GatewayProcess
) -> None:
    stored = cluster.psql(f"select rolpassword from pg_authid where rolname = '{SCRAM_ROLE}'")
    assert stored.startswith("SCRAM-SHA-256$")
    with gateway.connect() as conn:
        assert conn.execute("select current_user, session_user").fetchone() == (
            SCRAM_ROLE,
            SCRAM_ROLE,
        )


def test_md5_upstream_role(
    cluster: TemporaryCluster, start_gateway: StartGateway, tmp_path: object
) -> None:
    assert (
        cluster.psql(
            f"select rolpassword like 'md5%' from pg_authid where rolname = '{MD5_ROLE}'"
        ).strip()
        == "t"
    )
    gateway = start_gateway({"upstream": {"user": MD5_ROLE, "password": MD5_PASSWORD}})
    with gateway.connect() as conn:
        assert conn.execute("select current_user").fetchone() == (MD5_ROLE,)


def test_upstream_password_from_file(start_gateway: StartGateway, tmp_path: object) -> None:
    path = f"{tmp_path}/upstream.pw"
    with open(path, "w") as handle:
        handle.write(SCRAM_PASSWORD + "\n")
    gateway = start_gateway({"upstream": {"password": None, "password_file": path}})
    with gateway.connect() as conn:
        assert conn.execute("select current_user").fetchone() == (SCRAM_ROLE,)


@pytest.mark.anyio
async def test_wrong_client_password(gateway: GatewayProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await gateway.connect_asyncpg(password="not-the-password")


@pytest.mark.anyio
async def test_unknown_client_user(gateway: GatewayProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await gateway.connect_asyncpg(user="mallory")


def test_wrong_password_with_psql(gateway: GatewayProcess) -> None:
    env = {**gateway.env(), "PGPASSWORD": "wrong"}
    result = run_tool(["psql", "-c", "select 1"], env)
    assert result.returncode != 0
    assert f'password authentication failed for user "{CLIENT_USER}"' in result.stderr


def test_upstream_role_name_is_not_a_client_login(gateway: GatewayProcess) -> None:
    """Knowing the upstream role and its password gets a client nowhere."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(gateway.dsn(user=SCRAM_ROLE, password=SCRAM_PASSWORD))


@pytest.mark.anyio
async def test_unknown_database_forwarded(gateway: GatewayProcess) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError, match="no_such_database"):
        await gateway.connect_asyncpg(database="no_such_database")


def test_wrong_upstream_password_is_a_clear_error(start_gateway: StartGateway) -> None:
    secret = "wrong-upstream-Secret-1d2c"
    gateway = start_gateway({"upstream": {"password": secret}})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn())
    assert secret not in str(info.value)
    assert SCRAM_PASSWORD not in str(info.value)
    assert gateway.alive()


def test_upstream_password_never_reaches_client(gateway: GatewayProcess) -> None:
    conn, startup = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    conn.simple_query("show all")
    conn.simple_query("select * from pg_settings")
    conn.simple_query("select current_setting('application_name'), inet_server_port()")
    conn.simple_query("select * from pg_authid")  # permission denied
    conn.simple_query("select 1/0")
    conn.close()
    everything = conn.received
    assert len(everything) > 10_000
    for secret in (SCRAM_PASSWORD, SCRAM_PASSWORD[:12], SCRAM_PASSWORD[-12:]):
        assert secret.encode() not in everything
    assert CLIENT_PASSWORD.encode() not in everything
    parameters = {
        m.body.split(b"\0")[0].decode(): m.body.split(b"\0")[1].decode()
        for m in startup
        if m.tag == b"S"
    }
    assert parameters.get("server_version", "").startswith("15")
    assert "client_encoding" in parameters


def test_upstream_tls_required(cluster: TemporaryCluster, start_gateway: StartGateway) -> None:
    gateway = start_gateway(
        {"upstream": {"user": TLS_ROLE, "password": TLS_PASSWORD, "tls": "require"}}
    )
    with gateway.connect() as conn:
        row = conn.execute(
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()
    assert row == (TLS_ROLE, True)


def test_upstream_tls_prefer_uses_tls(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"upstream": {"tls": "prefer"}})
    with gateway.connect() as conn:
        assert conn.execute(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone() == (True,)


def test_upstream_tls_verify_full(cluster: TemporaryCluster, start_gateway: StartGateway) -> None:
    gateway = start_gateway(
        {
            "upstream": {
                "user": TLS_ROLE,
                "password": TLS_PASSWORD,
                "tls": "verify-full",
                "tls_ca_file": str(cluster.ca_cert_file),
            }
        }
    )
    with gateway.connect() as conn:
        assert conn.execute("select current_user").fetchone() == (TLS_ROLE,)


def test_upstream_tls_verify_full_rejects_unknown_ca(
    start_gateway: StartGateway, gateway_certs: GatewayCertificates
) -> None:
    gateway = start_gateway(
        {
            "upstream": {
                "user": TLS_ROLE,
                "password": TLS_PASSWORD,
                "tls": "verify-full",
                "tls_ca_file": str(gateway_certs.ca_file),  # not the CA that signed PostgreSQL's
            }
        }
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gateway.dsn())
    assert gateway.alive()


def test_upstream_without_tls_refused_by_hba(start_gateway: StartGateway) -> None:
    gateway = start_gateway(
        {"upstream": {"user": TLS_ROLE, "password": TLS_PASSWORD, "tls": "disable"}}
    )
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gateway.dsn())

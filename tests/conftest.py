"""Integration fixtures: a real PostgreSQL, and real ``pgwarden serve`` processes in front of it.

Session-wide: one :class:`~pgwarden.pgcluster.TemporaryCluster` (fsync off, server TLS on)
with the roles the tests log in as upstream, and one shared gateway for tests that need no
special settings.  ``start_gateway(settings)`` starts a dedicated gateway subprocess per
test (configured through ``PGWARDEN_*`` variables) and checks at teardown that SIGTERM
makes it exit with status 0.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme

try:
    import pgwarden.pgcluster  # noqa: F401
except ImportError:  # a source tree without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from harness import (
    MD5_PASSWORD,
    MD5_ROLE,
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    TEST_DATABASE,
    TLS_PASSWORD,
    TLS_ROLE,
    GatewayCertificates,
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    stop_and_check,
)
from pgwarden.pgcluster import FAST_UNSAFE_SETTINGS, TemporaryCluster

TEST_TIME_LIMIT = 240


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running integration tests")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail a test that hangs (e.g. a gateway waiting for a Sync that never comes)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"test exceeded {TEST_TIME_LIMIT} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIME_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster() -> Iterator[TemporaryCluster]:
    """The upstream PostgreSQL for the whole run (server TLS on, md5/hostssl roles)."""
    hba = [
        f"host all {MD5_ROLE} 127.0.0.1/32 md5",
        f"hostssl all {TLS_ROLE} 127.0.0.1/32 scram-sha-256",
        f"host all {TLS_ROLE} 127.0.0.1/32 reject",
    ]
    settings: Mapping[str, Any] = {
        **FAST_UNSAFE_SETTINGS,
        "max_connections": 200,
        "log_statement": "none",
        "log_min_messages": "warning",
        # Masked sessions must not read other statements' texts through its view.
        "shared_preload_libraries": "pg_stat_statements",
    }
    with TemporaryCluster(settings=settings, hba_lines=hba, ssl=True) as pg:
        pg.psql(
            f"""
            set password_encryption = 'scram-sha-256';
            create role {SCRAM_ROLE} login createdb password '{SCRAM_PASSWORD}';
            create role {TLS_ROLE} login password '{TLS_PASSWORD}';
            set password_encryption = 'md5';
            create role {MD5_ROLE} login password '{MD5_PASSWORD}';
            create database {TEST_DATABASE} owner {SCRAM_ROLE};
            grant all on database {TEST_DATABASE} to {MD5_ROLE}, {TLS_ROLE};
            """
        )
        pg.psql(f"grant all on schema public to {MD5_ROLE}, {TLS_ROLE}", dbname=TEST_DATABASE)
        yield pg


@pytest.fixture
def superuser(cluster: TemporaryCluster) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to PostgreSQL (not through the gateway)."""
    with psycopg.connect(cluster.dsn(TEST_DATABASE), autocommit=True) as conn:
        yield conn


# --- the gateway -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gateway_certs(tmp_path_factory: pytest.TempPathFactory) -> GatewayCertificates:
    """A CA and a server certificate for localhost / 127.0.0.1, offered by the gateway."""
    directory = tmp_path_factory.mktemp("gateway-tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    certs = GatewayCertificates(
        ca_file=directory / "ca.pem",
        cert_file=directory / "gateway.crt",
        key_file=directory / "gateway.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca_file))
    with certs.cert_file.open("wb") as handle:
        for pem in server.cert_chain_pems:
            handle.write(pem.bytes())
    server.private_key_pem.write_to_path(str(certs.key_file))
    certs.key_file.chmod(0o600)
    return certs


@pytest.fixture(scope="session")
def gateway_launcher(
    cluster: TemporaryCluster, gateway_certs: GatewayCertificates
) -> GatewayLauncher:
    return GatewayLauncher(cluster, gateway_certs)


@pytest.fixture
def start_gateway(gateway_launcher: GatewayLauncher) -> Iterator[StartGateway]:
    """Factory: ``start_gateway({"require_client_tls": True})`` -> a running gateway.

    Every gateway started is stopped with SIGTERM at teardown and must exit 0.
    """
    started: list[GatewayProcess] = []

    def start(settings: Mapping[str, Any] | None = None) -> GatewayProcess:
        gateway = gateway_launcher.start(settings)
        started.append(gateway)
        return gateway

    yield start
    failures = []
    for gateway in started:
        try:
            stop_and_check(gateway)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture(scope="session")
def gateway(gateway_launcher: GatewayLauncher) -> Iterator[GatewayProcess]:
    """A gateway with the default settings, shared by the whole run."""
    gw = gateway_launcher.start()
    yield gw
    stop_and_check(gw)

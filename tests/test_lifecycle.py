"""How sessions end: client gone, backend killed, PostgreSQL restarted, gateway drained."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    TEST_DATABASE,
    GatewayProcess,
    StartGateway,
    backends_running,
    background,
    wait_until,
)
from pgproto import connect_authenticated, data_rows, query, terminate
from pgwarden.pgcluster import FAST_UNSAFE_SETTINGS, TemporaryCluster, find_free_port


def marker() -> str:
    return "m" + uuid.uuid4().hex[:12]


def raw_session(gateway: GatewayProcess) -> Any:
    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    return conn


def test_client_disconnect_mid_query_leaves_no_backend(
    gateway: GatewayProcess, superuser: psycopg.Connection[Any]
) -> None:
    tag = marker()
    conn = raw_session(gateway)
    conn.send(query(f"select pg_sleep(60) /* {tag} */"))
    assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    started = time.monotonic()
    assert wait_until(lambda: not backends_running(superuser, tag), 15), (
        "the upstream query kept running after its client went away"
    )
    print(f"upstream backend gone {time.monotonic() - started:.2f} s after the client left")


def test_terminate_message_closes_upstream(
    gateway: GatewayProcess, superuser: psycopg.Connection[Any]
) -> None:
    tag = marker()
    conn = raw_session(gateway)
    conn.simple_query(f"select 1 /* {tag} */")
    assert backends_running(superuser, tag)
    conn.send(terminate())
    assert conn.read_error_or_close(5) is None
    conn.close()
    assert wait_until(lambda: not backends_running(superuser, tag), 10)


def test_backend_terminated_mid_query(
    gateway: GatewayProcess, superuser: psycopg.Connection[Any]
) -> None:
    tag = marker()
    conn = raw_session(gateway)
    conn.send(query(f"select pg_sleep(60) /* {tag} */"))
    assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
    superuser.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity where query like %s "
        "and pid <> pg_backend_pid()",
        (f"%{tag}%",),
    )
    error = conn.read_error_or_close(10)
    assert error is not None, "the client must be told why its session ended"
    assert error.sqlstate == "57P01", error.fields
    assert conn.read_error_or_close(5) is None  # and then the connection closes
    conn.close()
    assert gateway.alive()
    with gateway.connect() as other:
        assert other.execute("select 'gateway still serving'").fetchone() == (
            "gateway still serving",
        )


def test_backend_terminated_seen_by_psycopg(
    gateway: GatewayProcess, superuser: psycopg.Connection[Any]
) -> None:
    tag = marker()
    with gateway.connect() as conn:
        with background(lambda: conn.execute(f"select pg_sleep(60) /* {tag} */")) as outcome:
            assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
            superuser.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where query like %s "
                "and pid <> pg_backend_pid()",
                (f"%{tag}%",),
            )
        assert isinstance(outcome.get("error"), psycopg.OperationalError), outcome
        assert conn.closed or conn.broken
    with gateway.connect() as fresh:
        assert fresh.execute("select 1").fetchone() == (1,)


# --- PostgreSQL going away --------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[TemporaryCluster]:
    """A PostgreSQL this module may restart and crash without disturbing other tests."""
    with TemporaryCluster(settings=FAST_UNSAFE_SETTINGS) as pg:
        pg.psql(f"create role {SCRAM_ROLE} login password '{SCRAM_PASSWORD}'")
        pg.psql(f"create database {TEST_DATABASE} owner {SCRAM_ROLE}")
        yield pg


@pytest.fixture
def own_gateway(start_gateway: StartGateway, own_cluster: TemporaryCluster) -> GatewayProcess:
    return start_gateway({"upstream": {"port": own_cluster.port}})


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_postgres_restart_mid_session(
    own_cluster: TemporaryCluster, own_gateway: GatewayProcess, how: str
) -> None:
    with own_gateway.connect(autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        if how == "restart":
            own_cluster.restart(mode="fast")
        else:
            own_cluster.kill()
            own_cluster.start()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("select 2")
    assert own_gateway.alive()
    with own_gateway.connect() as fresh:
        assert fresh.execute("select 'after restart'").fetchone() == ("after restart",)


def test_postgres_down_gives_clear_error(
    own_cluster: TemporaryCluster, own_gateway: GatewayProcess
) -> None:
    own_cluster.stop()
    try:
        conn, _ = _startup_raw(own_gateway)
        error = conn.read_error_or_close(15)
        conn.close()
        assert error is not None, "client must get an ErrorResponse when upstream is down"
        assert error.sqlstate is not None
        assert error.sqlstate.startswith("08") or error.sqlstate in ("57P03", "53300")
        assert own_gateway.alive()
    finally:
        own_cluster.start()
    with own_gateway.connect() as conn2:
        assert conn2.execute("select 1").fetchone() == (1,)


def test_upstream_unreachable_port(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"upstream": {"port": find_free_port(), "connect_timeout_seconds": 3}})
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gateway.dsn())
    assert time.monotonic() - started < 10
    assert gateway.alive()


def _startup_raw(gateway: GatewayProcess) -> tuple[Any, None]:
    from pgproto import RawConnection, password

    conn = RawConnection.open(gateway.host, gateway.port, timeout=15)
    conn.startup(CLIENT_USER, TEST_DATABASE)
    first = conn.read_message()
    if first.tag == b"R":
        conn.send(password(CLIENT_PASSWORD))
    else:
        conn.buffer = first.tag + (len(first.body) + 4).to_bytes(4, "big") + first.body
    return conn, None


# --- the gateway going away ----------------------------------------------------------------


def test_sigterm_drains_sessions_and_exits_zero(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"drain_timeout_seconds": 10})
    idle = raw_session(gateway)
    busy = raw_session(gateway)
    busy.send(query("select 'finished', pg_sleep(2)"))
    time.sleep(0.5)

    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)

    error = idle.read_error_or_close(5)
    assert error is not None, "an idle session must be told the gateway is shutting down"
    assert error.sqlstate == "57P01", error.fields
    assert time.monotonic() - started < 3, "idle sessions should be closed at once"
    idle.close()

    # The in-flight query is allowed to finish within the drain timeout.
    messages = busy.read_until(b"C", timeout=10)
    assert data_rows(messages)[0][0] == b"finished"
    busy.read_error_or_close(10)
    busy.close()

    # No new sessions once draining.
    with pytest.raises((ConnectionRefusedError, psycopg.OperationalError)):
        connect_authenticated(
            gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
        )

    assert gateway.process.wait(15) == 0
    print(f"gateway drained and exited {time.monotonic() - started:.2f} s after SIGTERM")


def test_sigterm_with_no_sessions_exits_promptly(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(10) == 0
    assert time.monotonic() - started < 5


def test_sigterm_drain_timeout_closes_long_query(
    start_gateway: StartGateway, superuser: psycopg.Connection[Any]
) -> None:
    gateway = start_gateway({"drain_timeout_seconds": 1})
    tag = marker()
    busy = raw_session(gateway)
    busy.send(query(f"select pg_sleep(60) /* {tag} */"))
    assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(15) == 0
    error = busy.read_error_or_close(5)
    assert error is None or error.sqlstate in ("57P01", "57014"), error.fields
    busy.close()
    assert wait_until(lambda: not backends_running(superuser, tag), 15), (
        "the upstream query outlived the gateway"
    )


@pytest.mark.anyio
async def test_fifty_concurrent_sessions(gateway: GatewayProcess) -> None:
    async def one(i: int) -> int:
        conn = await gateway.connect_asyncpg(timeout=30)
        try:
            value: int = await conn.fetchval("select $1::int from pg_sleep(0.2)", i)
            return value
        finally:
            await conn.close()

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 60)
    assert results == list(range(50))

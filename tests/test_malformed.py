"""Hostile bytes from a raw socket: each gets a 08P01 ErrorResponse or a clean close.

After every case a client that was connected all along still works and the gateway
process is alive: one bad connection must never hurt the others.
"""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    TEST_DATABASE,
    GatewayLauncher,
    GatewayProcess,
    stop_and_check,
    wait_until,
)
from pgproto import (
    PROTOCOL_3_0,
    RawConnection,
    connect_authenticated,
    message,
    query,
    startup_message,
)

MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def small_gateway(gateway_launcher: GatewayLauncher) -> Iterator[GatewayProcess]:
    """A gateway with a 1 MiB message limit, shared by this module."""
    gw = gateway_launcher.start({"max_message_bytes": MAX_MESSAGE, "startup_timeout_seconds": 5})
    yield gw
    stop_and_check(gw)


@pytest.fixture
def bystander(small_gateway: GatewayProcess) -> Iterator[psycopg.Connection[Any]]:
    """A well-behaved session open before, during and after the bad one."""
    with small_gateway.connect(autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        yield conn
        assert small_gateway.alive(), f"gateway died:\n{small_gateway.stderr}"
        assert conn.execute("select 'still fine'").fetchone() == ("still fine",)
    with small_gateway.connect() as fresh:
        assert fresh.execute("select 2").fetchone() == (2,)


def expect_protocol_error_or_close(
    conn: RawConnection, timeout: float = 5.0, sqlstates: tuple[str, ...] = ("08P01",)
) -> None:
    started = time.monotonic()
    error = conn.read_error_or_close(timeout)
    assert time.monotonic() - started < timeout, "the gateway neither answered nor closed"
    if error is not None:
        assert error.sqlstate in sqlstates, error.fields
        assert error.fields.get("S") == "FATAL"
        # After a FATAL error the connection must be closed.
        assert conn.read_error_or_close(timeout) is None
    conn.close()


def raw(gateway: GatewayProcess) -> RawConnection:
    return RawConnection.open(gateway.host, gateway.port, timeout=10)


def authenticated(gateway: GatewayProcess) -> RawConnection:
    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    return conn


# --- before authentication ------------------------------------------------------------


def test_startup_length_below_minimum(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(struct.pack("!ii", 4, PROTOCOL_3_0))
    expect_protocol_error_or_close(conn)


def test_startup_length_negative(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(struct.pack("!ii", -1, PROTOCOL_3_0))
    expect_protocol_error_or_close(conn)


def test_huge_startup_length_is_not_allocated(
    small_gateway: GatewayProcess, bystander: Any
) -> None:
    before = small_gateway.rss_kib()
    conn = raw(small_gateway)
    conn.send(struct.pack("!ii", 2**31 - 1, PROTOCOL_3_0) + b"user\0x\0")
    expect_protocol_error_or_close(conn)
    growth_kib = small_gateway.rss_kib() - before
    assert growth_kib < 16 * 1024, f"gateway RSS grew by {growth_kib} KiB"


def test_startup_just_over_limit(small_gateway: GatewayProcess, bystander: Any) -> None:
    params = [("user", CLIENT_USER), ("database", TEST_DATABASE), ("application_name", "x" * 20000)]
    conn = raw(small_gateway)
    conn.send(startup_message(params))
    expect_protocol_error_or_close(conn)


def test_http_request_instead_of_startup(small_gateway: GatewayProcess, bystander: Any) -> None:
    """ "GET " read as a length is over a gigabyte: PostgreSQL says "invalid length of
    startup packet" (08P01) before it looks at the version."""
    conn = raw(small_gateway)
    conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    expect_protocol_error_or_close(conn)


# A plausible length followed by a bogus version: PostgreSQL answers 0A000 "unsupported
# frontend protocol", and so may the gateway.
UNSUPPORTED_VERSION = ("08P01", "0A000")


def test_garbage_before_startup(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(b"\x00\x00\x00\x10garbage-garbage!" + startup_message([("user", CLIENT_USER)]))
    expect_protocol_error_or_close(conn, sqlstates=UNSUPPORTED_VERSION)


def test_unknown_request_code(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(struct.pack("!ii", 8, 12345678))
    expect_protocol_error_or_close(conn, sqlstates=UNSUPPORTED_VERSION)


def test_startup_without_terminator(small_gateway: GatewayProcess, bystander: Any) -> None:
    body = struct.pack("!i", PROTOCOL_3_0) + b"user\0alice"  # no NULs to end the list
    conn = raw(small_gateway)
    conn.send(struct.pack("!i", len(body) + 4) + body)
    expect_protocol_error_or_close(conn)


def test_startup_without_user(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(startup_message([("database", TEST_DATABASE)]))
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate in ("08P01", "28000"), error.fields
    conn.close()


def test_truncated_startup_then_close(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(struct.pack("!ii", 100, PROTOCOL_3_0) + b"user\0al")
    conn.close()


def test_silent_client_is_timed_out(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.send(struct.pack("!i", 100))  # then nothing: startup_timeout_seconds is 5
    started = time.monotonic()
    conn.read_error_or_close(timeout=15)
    assert time.monotonic() - started < 12, "a stalled startup must be timed out"
    conn.close()


def test_password_message_too_long(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.startup(CLIENT_USER, TEST_DATABASE)
    assert conn.read_message().tag == b"R"
    conn.send(b"p" + struct.pack("!i", 2**31 - 1))
    expect_protocol_error_or_close(conn)


def test_wrong_message_instead_of_password(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = raw(small_gateway)
    conn.startup(CLIENT_USER, TEST_DATABASE)
    assert conn.read_message().tag == b"R"
    conn.send(query("select 1"))
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate in ("08P01", "28000", "28P01"), error.fields
    conn.close()


# --- after authentication ------------------------------------------------------------------


def test_truncated_message_then_close(
    small_gateway: GatewayProcess, bystander: Any, superuser: psycopg.Connection[Any]
) -> None:
    before = _upstream_sessions(superuser)
    conn = authenticated(small_gateway)
    wait_until(lambda: _upstream_sessions(superuser) > before, 5)
    conn.send(b"Q" + struct.pack("!i", 100) + b"select 1")
    conn.close()
    # The upstream session of the vanished client must go away too.
    assert wait_until(lambda: _upstream_sessions(superuser) <= before, 10), (
        "upstream backend left behind after the client vanished mid-message"
    )


def test_unknown_message_type(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    conn.send(message(b"z", b"whatever"))
    expect_protocol_error_or_close(conn)


def test_message_length_below_four(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    conn.send(b"Q" + struct.pack("!i", 3))
    expect_protocol_error_or_close(conn)


def test_message_over_max_message_bytes(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    before = small_gateway.rss_kib()
    # Only the header: the gateway must refuse on the length, not wait for the body.
    conn.send(b"Q" + struct.pack("!i", 64 * MAX_MESSAGE))
    expect_protocol_error_or_close(conn)
    assert small_gateway.rss_kib() - before < 16 * 1024


def test_message_with_max_length(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    conn.send(b"P" + struct.pack("!i", 2**31 - 1))
    expect_protocol_error_or_close(conn)


def test_query_just_over_max_message_bytes_sent_whole(
    small_gateway: GatewayProcess, bystander: Any
) -> None:
    conn = authenticated(small_gateway)
    sql = "select '" + "x" * MAX_MESSAGE + "'"
    try:
        conn.send(query(sql))
    except (BrokenPipeError, ConnectionResetError):
        conn.close()
        return
    expect_protocol_error_or_close(conn)


def test_query_under_max_message_bytes_works(small_gateway: GatewayProcess) -> None:
    conn = authenticated(small_gateway)
    messages = conn.simple_query("select length('" + "y" * (MAX_MESSAGE // 2) + "')")
    assert next(m for m in messages if m.tag == b"D").body.endswith(str(MAX_MESSAGE // 2).encode())
    conn.close()


def test_query_without_nul_terminator(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    conn.send(message(b"Q", b"select 1"))  # a Query body is a C string
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate == "08P01", error.fields
    conn.close()


def test_bind_with_bad_parameter_count(small_gateway: GatewayProcess, bystander: Any) -> None:
    conn = authenticated(small_gateway)
    body = b"\0\0" + struct.pack("!h", 0) + struct.pack("!h", 5) + struct.pack("!i", 10) + b"ab"
    conn.send(message(b"B", body) + message(b"S"))
    error = conn.read_error_or_close()
    assert error is None or error.sqlstate in ("08P01", "26000"), error.fields
    conn.close()


def test_random_bytes_after_auth(small_gateway: GatewayProcess, bystander: Any) -> None:
    import random

    rng = random.Random(20240229)
    conn = authenticated(small_gateway)
    try:
        conn.send(bytes(rng.getrandbits(8) for _ in range(4096)))
    except (BrokenPipeError, ConnectionResetError):
        conn.close()
        return
    conn.read_error_or_close(timeout=5)
    conn.close()


def test_many_bad_connections_in_a_row(small_gateway: GatewayProcess, bystander: Any) -> None:
    cases: list[Callable[[], bytes]] = [
        lambda: struct.pack("!ii", 4, PROTOCOL_3_0),
        lambda: struct.pack("!ii", 2**31 - 1, PROTOCOL_3_0),
        lambda: b"\x16\x03\x01\x00\x05hello",
        lambda: b"\xff" * 64,
    ]
    for _ in range(10):
        for case in cases:
            conn = raw(small_gateway)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.send(case())
            conn.read_error_or_close(timeout=5)
            conn.close()


def _upstream_sessions(superuser: psycopg.Connection[Any]) -> int:
    row = superuser.execute(
        "select count(*) from pg_stat_activity where usename = 'app_scram'"
    ).fetchone()
    assert row is not None
    count: int = row[0]
    return count

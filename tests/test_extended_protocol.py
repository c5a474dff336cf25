"""Extended query protocol at the byte level: no waiting for Sync, errors forwarded at once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import CLIENT_PASSWORD, CLIENT_USER, TEST_DATABASE, GatewayProcess
from pgproto import (
    RawConnection,
    bind,
    connect_authenticated,
    data_rows,
    describe_statement,
    execute,
    flush,
    parse,
    sync,
)


@pytest.fixture
def conn(gateway: GatewayProcess) -> Iterator[RawConnection]:
    connection, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    yield connection
    connection.close()


def test_parse_describe_flush_answered_without_sync(conn: RawConnection) -> None:
    """What asyncpg does to prepare a statement."""
    conn.send(parse("select $1::int + 1 as next", name="s1") + describe_statement("s1") + flush())
    assert [m.tag for m in conn.read_until(b"T", timeout=5)] == [b"1", b"t", b"T"]
    conn.send(bind([b"41"], statement="s1") + execute() + flush())
    messages = conn.read_until(b"C", timeout=5)
    assert data_rows(messages) == [[b"42"]]
    conn.send(sync())
    assert conn.read_until(b"Z", timeout=5)[-1].body == b"I"


def test_error_forwarded_before_sync(conn: RawConnection) -> None:
    conn.send(parse("select 1/0") + bind() + execute() + flush())
    messages = conn.read_until(b"E", timeout=5)
    assert messages[-1].sqlstate == "22012"
    # Messages after the error are discarded by the server until Sync.
    conn.send(parse("select 1") + bind() + execute() + sync())
    rest = conn.read_until(b"Z", timeout=5)
    assert [m.tag for m in rest] == [b"Z"]
    assert rest[-1].body == b"I"


def test_parse_error_forwarded_before_sync(conn: RawConnection) -> None:
    conn.send(parse("selec 1", name="bad") + flush())
    error = conn.read_until(b"E", timeout=5)[-1]
    assert error.sqlstate == "42601"
    conn.send(sync())
    conn.read_until(b"Z", timeout=5)


def test_portal_suspended_and_resumed(conn: RawConnection) -> None:
    conn.send(
        parse("select g from generate_series(1, 10) g") + bind() + execute(max_rows=4) + flush()
    )
    first = conn.read_until(b"s", timeout=5)
    assert data_rows(first) == [[b"1"], [b"2"], [b"3"], [b"4"]]
    conn.send(execute(max_rows=4) + flush())
    second = conn.read_until(b"s", timeout=5)
    assert data_rows(second) == [[b"5"], [b"6"], [b"7"], [b"8"]]
    conn.send(execute() + sync())
    rest = conn.read_until(b"Z", timeout=5)
    assert data_rows(rest) == [[b"9"], [b"10"]]


def test_many_pipelined_statements_in_one_write(conn: RawConnection) -> None:
    batch = b"".join(
        parse("select $1::int * 2") + bind([str(i).encode()]) + execute() for i in range(500)
    )
    conn.send(batch + sync())
    messages = conn.read_until(b"Z", timeout=30)
    assert [int(row[0] or b"0") for row in data_rows(messages)] == [i * 2 for i in range(500)]


def test_null_parameter(conn: RawConnection) -> None:
    conn.send(parse("select $1::text is null") + bind([None]) + execute() + sync())
    assert data_rows(conn.read_until(b"Z", timeout=5)) == [[b"t"]]

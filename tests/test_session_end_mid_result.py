"""A session the gateway ends while a large result is being forwarded.

Server bytes are forwarded as they arrive, so when the shutdown drain times out the
client may hold part of a DataRow.  Its FATAL must come after that row is complete (or not
at all, if the rest does not arrive in time): never spliced into it.
"""

from __future__ import annotations

import signal
import struct
import time
from typing import Any

import psycopg
import pytest

from harness import CLIENT_PASSWORD, CLIENT_USER, TEST_DATABASE, GatewayProcess, StartGateway
from pgproto import Message, RawConnection, connect_authenticated, error_fields, query

ROW_BYTES = 100_000
# 500 MB: far more than the drain lets through, so the result is always cut short.
BIG_RESULT = f"select repeat('x', {ROW_BYTES}) from generate_series(1, 5000)"
ROW_BODY = struct.pack("!hi", 1, ROW_BYTES) + b"x" * ROW_BYTES


def slow_session(gateway: GatewayProcess) -> RawConnection:
    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE, rcvbuf=65536
    )
    conn.send(query(BIG_RESULT))
    return conn


def read_slowly(conn: RawConnection, seconds: float) -> None:
    """About 2 MB/s for ``seconds``: the result keeps streaming, never finishes."""
    deadline = time.monotonic() + seconds
    conn.sock.settimeout(10)
    while time.monotonic() < deadline:
        chunk = conn.sock.recv(32768)
        assert chunk, "the gateway closed the connection too early"
        conn.received += chunk
        time.sleep(0.01)


def read_to_eof(conn: RawConnection, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    conn.sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            chunk = conn.sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            return conn.received
        conn.received += chunk
    raise AssertionError("the gateway did not close the connection")


def split_messages(stream: bytes) -> tuple[list[Message], bytes]:
    """Every complete message after the startup phase, and the bytes of an incomplete one."""
    messages: list[Message] = []
    pos = 0
    while len(stream) - pos >= 5:
        tag = stream[pos : pos + 1]
        (length,) = struct.unpack("!i", stream[pos + 1 : pos + 5])
        assert tag in (b"R", b"S", b"K", b"Z", b"T", b"D", b"E", b"N"), (
            f"not a message boundary at byte {pos}: {stream[pos : pos + 16]!r}"
        )
        assert 4 <= length <= ROW_BYTES + 64, (tag, length)
        if len(stream) - pos < 1 + length:
            break
        messages.append(Message(tag, stream[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    return messages, stream[pos:]


def result_messages(stream: bytes) -> tuple[list[Message], bytes]:
    """The messages that answer BIG_RESULT, each checked; plus an incomplete tail."""
    messages, tail = split_messages(stream)
    startup_end = next(i for i, m in enumerate(messages) if m.tag == b"Z") + 1
    answer = messages[startup_end:]
    assert answer[0].tag == b"T", answer[0]
    rows = [m for m in answer[1:] if m.tag == b"D"]
    assert rows, "some rows were forwarded before the end"
    for row in rows:
        assert row.body == ROW_BODY, "a DataRow was corrupted"
    return answer, tail


def test_fatal_waits_for_the_datarow_being_forwarded(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"drain_timeout_seconds": 1})
    conn = slow_session(gateway)
    read_slowly(conn, 0.5)
    gateway.process.send_signal(signal.SIGTERM)
    read_slowly(conn, 2.0)  # the drain times out meanwhile, mid-row
    stream = read_to_eof(conn)
    conn.close()

    answer, tail = result_messages(stream)
    assert tail == b"", f"the stream ends inside a message: {tail[:16]!r}"
    last = answer[-1]
    assert last.tag == b"E", f"the session must end with its FATAL, not {last.tag!r}"
    fields = error_fields(last.body)
    assert (fields["S"], fields["C"]) == ("FATAL", "57P01"), fields
    assert all(m.tag == b"D" for m in answer[1:-1])
    assert gateway.process.wait(15) == 0
    print(f"{len(answer) - 2} whole rows, then FATAL 57P01")


def test_stalled_client_is_closed_without_a_spliced_fatal(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"drain_timeout_seconds": 1})
    conn = slow_session(gateway)
    read_slowly(conn, 0.5)
    # The client stops reading: the row being forwarded cannot be completed.
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(5)  # drain timeout (1 s) + the wait for the row's end (2 s), with margin
    stream = read_to_eof(conn)
    conn.close()

    answer, tail = result_messages(stream)
    if tail:
        # Closed mid-row, as it must be: the bytes the client got are the row's own.
        assert tail[:1] == b"D"
        assert ROW_BODY.startswith(tail[5:]), "something was written into the row"
        assert all(m.tag == b"D" for m in answer[1:])
        print(f"closed after {len(answer) - 1} rows and {len(tail)} bytes of the next")
    else:
        # The drain timed out exactly at a row boundary: then the FATAL is allowed.
        assert answer[-1].tag == b"E" and error_fields(answer[-1].body)["C"] == "57P01"
    assert gateway.process.wait(15) == 0


def test_psycopg_streaming_sees_admin_shutdown(start_gateway: StartGateway) -> None:
    """A real client reading the result row by row gets AdminShutdown, not a lost sync."""
    gateway = start_gateway({"drain_timeout_seconds": 1})
    rows = 0
    with psycopg.connect(gateway.dsn()) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.OperationalError) as caught:
            for _ in cur.stream(BIG_RESULT):
                rows += 1
                if rows == 3:
                    gateway.process.send_signal(signal.SIGTERM)
                time.sleep(0.02)
    error: Any = caught.value
    assert isinstance(error, psycopg.errors.AdminShutdown), repr(error)
    assert error.sqlstate == "57P01"
    assert rows > 3
    assert gateway.process.wait(15) == 0

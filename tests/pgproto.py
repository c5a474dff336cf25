"""A minimal PostgreSQL frontend over a raw socket, for tests that need exact bytes.

Independent of pgwarden's own codec on purpose: these tests check the gateway against
the protocol as documented (PostgreSQL "Frontend/Backend Protocol", message formats).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

AUTH_OK = 0
AUTH_CLEARTEXT = 3


class ProtocolClosed(Exception):
    """The server closed the connection."""


def startup_message(params: Iterable[tuple[str, str]], major: int = 3, minor: int = 0) -> bytes:
    body = struct.pack("!HH", major, minor)
    for name, value in params:
        body += name.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def request_code_message(code: int) -> bytes:
    """SSLRequest, GSSENCRequest: length 8 and a request code."""
    return struct.pack("!ii", 8, code)


def cancel_request(process_id: int, secret_key: bytes) -> bytes:
    return struct.pack("!iii", 8 + 4 + len(secret_key), CANCEL_REQUEST_CODE, process_id) + (
        secret_key
    )


def message(tag: bytes, body: bytes = b"") -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def query(sql: str) -> bytes:
    return message(b"Q", cstring(sql))


def password(secret: str) -> bytes:
    return message(b"p", cstring(secret))


def parse(sql: str, name: str = "", param_types: Iterable[int] = ()) -> bytes:
    types = list(param_types)
    body = cstring(name) + cstring(sql) + struct.pack("!h", len(types))
    body += b"".join(struct.pack("!i", oid) for oid in types)
    return message(b"P", body)


def bind(params: Iterable[bytes | None] = (), portal: str = "", statement: str = "") -> bytes:
    values = list(params)
    body = cstring(portal) + cstring(statement) + struct.pack("!h", 0)
    body += struct.pack("!h", len(values))
    for value in values:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            body += struct.pack("!i", len(value)) + value
    body += struct.pack("!h", 0)
    return message(b"B", body)


def describe_statement(name: str = "") -> bytes:
    return message(b"D", b"S" + cstring(name))


def describe_portal(name: str = "") -> bytes:
    return message(b"D", b"P" + cstring(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstring(portal) + struct.pack("!i", max_rows))


def flush() -> bytes:
    return message(b"H")


def sync() -> bytes:
    return message(b"S")


def terminate() -> bytes:
    return message(b"X")


def error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}."""
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


@dataclass
class Message:
    tag: bytes
    body: bytes

    @property
    def fields(self) -> dict[str, str]:
        return error_fields(self.body)

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C") if self.tag in (b"E", b"N") else None

    @property
    def auth_code(self) -> int:
        assert self.tag == b"R"
        code: int = struct.unpack("!i", self.body[:4])[0]
        return code


class RawConnection:
    """A socket speaking the typed-message phase; records every byte received."""

    def __init__(self, sock: socket.socket | ssl.SSLSocket) -> None:
        self.sock = sock
        self.buffer = b""
        self.received = b""

    @classmethod
    def open(
        cls, host: str, port: int, timeout: float = 10.0, rcvbuf: int | None = None
    ) -> RawConnection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, timeout: float | None) -> None:
        if timeout is not None:
            self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ProtocolClosed("server closed the connection")
        self.buffer += chunk
        self.received += chunk

    def read_byte(self, timeout: float | None = 10.0) -> bytes:
        """One untyped byte (the answer to SSLRequest / GSSENCRequest)."""
        while not self.buffer:
            self._fill(timeout)
        byte, self.buffer = self.buffer[:1], self.buffer[1:]
        return byte

    def read_message(self, timeout: float | None = 10.0) -> Message:
        while len(self.buffer) < 5:
            self._fill(timeout)
        length = struct.unpack("!i", self.buffer[1:5])[0]
        while len(self.buffer) < 1 + length:
            self._fill(timeout)
        tag, body = self.buffer[:1], self.buffer[5 : 1 + length]
        self.buffer = self.buffer[1 + length :]
        return Message(tag, body)

    def read_until(self, tag: bytes, timeout: float = 10.0) -> list[Message]:
        """Messages up to and including the first one with ``tag``."""
        deadline = time.monotonic() + timeout
        messages: list[Message] = []
        while True:
            remaining = max(0.01, deadline - time.monotonic())
            msg = self.read_message(remaining)
            messages.append(msg)
            if msg.tag == tag:
                return messages

    def read_error_or_close(self, timeout: float = 10.0) -> Message | None:
        """The first ErrorResponse, or ``None`` if the server closes the connection first.

        Other messages (notices, parameter status) before either are skipped.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                msg = self.read_message(max(0.01, deadline - time.monotonic()))
                if msg.tag == b"E":
                    return msg
        except (ProtocolClosed, ConnectionResetError, BrokenPipeError):
            return None

    def startup(self, user: str, database: str, extra: Iterable[tuple[str, str]] = ()) -> None:
        self.send(startup_message([("user", user), ("database", database), *extra]))

    def authenticate(self, secret: str, timeout: float = 10.0) -> list[Message]:
        """Answer a cleartext password request; read through the first ReadyForQuery."""
        first = self.read_message(timeout)
        if first.tag == b"E":
            raise AssertionError(f"startup refused: {first.fields}")
        assert first.tag == b"R" and first.auth_code == AUTH_CLEARTEXT, first
        self.send(password(secret))
        messages = self.read_until(b"Z", timeout)
        errors = [m.fields for m in messages if m.tag == b"E"]
        assert not errors, errors
        return messages

    def simple_query(self, sql: str, timeout: float = 30.0) -> list[Message]:
        self.send(query(sql))
        return self.read_until(b"Z", timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def connect_authenticated(
    host: str, port: int, user: str, secret: str, database: str, **open_args: int
) -> tuple[RawConnection, list[Message]]:
    """A connection through startup and authentication, plus the messages seen."""
    conn = RawConnection.open(host, port, **open_args)
    conn.startup(user, database)
    return conn, conn.authenticate(secret)


def data_rows(messages: Iterable[Message]) -> list[list[bytes | None]]:
    """Decode DataRow messages (text format) into lists of column values."""
    rows: list[list[bytes | None]] = []
    for msg in messages:
        if msg.tag != b"D":
            continue
        count = struct.unpack("!h", msg.body[:2])[0]
        offset = 2
        row: list[bytes | None] = []
        for _ in range(count):
            length = struct.unpack("!i", msg.body[offset : offset + 4])[0]
            offset += 4
            if length < 0:
                row.append(None)
            else:
                row.append(msg.body[offset : offset + length])
                offset += length
        rows.append(row)
    return rows

"""A client connection up to its StartupMessage: TLS detection, SSL/GSSENC requests, versions.

Per "Message Flow / Start-up" and "SSL Session Encryption" of the protocol:

* first byte 0x16 is a TLS ClientHello (PostgreSQL 17 ``sslnegotiation=direct``): TLS is
  terminated at once and ALPN ``postgresql`` is required;
* SSLRequest is answered 'S' (a certificate is configured) or 'N'; bytes pipelined behind it
  before the handshake are refused (CVE-2021-23214);
* GSSENCRequest is answered 'N' and the client goes on (with SSLRequest or StartupMessage);
* CancelRequest is returned to the caller, which answers nothing;
* StartupMessage 3.0 to 3.2 is accepted; a newer 3.x minor or ``_pq_.*`` options get a
  NegotiateProtocolVersion and the session continues at the version we speak.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Final

import anyio

from pgwarden import _wire, errors, tls
from pgwarden.errors import ConnectionClosed, GatewayError
from pgwarden.transport import PgStream

NEWEST_MINOR: Final = 2  # protocol 3.2 (PostgreSQL 18): variable-length cancel keys
_TLS_HANDSHAKE_RECORD: Final = b"\x16"
# Messages a client sends before authentication is done are small (a password or token).
MAX_STARTUP_PHASE_MESSAGE: Final = 65536


@dataclass(frozen=True, slots=True)
class StartupRequest:
    """A client's StartupMessage, after protocol negotiation."""

    user: str
    database: str
    params: list[tuple[str, str]]  # everything but the ``_pq_.*`` options, in wire order
    minor: int  # the protocol minor version both sides now speak
    tls: bool


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes


async def peek_first_byte(sock: socket.socket) -> bytes:
    """The client's first byte, left in the socket: 0x16 means a TLS ClientHello."""
    while True:
        await anyio.wait_readable(sock)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from exc
        if not first:
            raise ConnectionClosed("client closed the connection before sending anything")
        return first


def is_direct_tls(first_byte: bytes) -> bool:
    return first_byte == _TLS_HANDSHAKE_RECORD


async def attach_client_stream(
    sock: socket.socket,
    stream: PgStream,
    *,
    direct_tls_context: ssl.SSLContext | None,
    handshake_timeout: float,
) -> None:
    """Give the accepted socket to a transport driving ``stream`` (the transport owns it now).

    With ``direct_tls_context`` TLS is terminated first and ALPN ``postgresql`` required.
    """
    loop = asyncio.get_running_loop()
    # Keep our own reference to the protocol: with ssl=, uvloop returns its SSL protocol.
    if direct_tls_context is None:
        await loop.connect_accepted_socket(lambda: stream, sock)
        return
    try:
        transport, _ = await loop.connect_accepted_socket(
            lambda: stream, sock, ssl=direct_tls_context, ssl_handshake_timeout=handshake_timeout
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConnectionClosed(f"TLS handshake failed: {exc}") from exc
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != tls.ALPN_POSTGRESQL:
        # Direct TLS without ALPN could be a cross-protocol attack; PostgreSQL refuses it.
        raise GatewayError(
            errors.PROTOCOL_VIOLATION,
            "received direct SSL connection request without ALPN protocol negotiation extension",
        )


async def read_startup(
    stream: PgStream,
    *,
    server_context: ssl.SSLContext | None,
    require_tls: bool,
    handshake_timeout: float,
) -> StartupRequest | CancelRequest:
    """Run the startup negotiation until a StartupMessage or a CancelRequest arrives."""
    ssl_done = stream.tls
    gss_done = False
    while True:
        packet = await stream.read_startup_packet()
        kind = packet.kind
        if kind == "ssl":
            if ssl_done:
                raise GatewayError(errors.PROTOCOL_VIOLATION, "unexpected SSLRequest")
            ssl_done = True
            if server_context is None:
                stream.write(b"N")
                continue
            if stream.has_unread_bytes():
                raise GatewayError(
                    errors.PROTOCOL_VIOLATION, "received unencrypted data after SSL request"
                )
            stream.write(b"S")
            try:
                await stream.start_tls(
                    server_context, server_side=True, handshake_timeout=handshake_timeout
                )
            except (ssl.SSLError, OSError) as exc:
                stream.abort()
                raise ConnectionClosed(f"TLS handshake failed: {exc}") from exc
            continue
        if kind == "gssenc":
            if gss_done or stream.tls:
                raise GatewayError(errors.PROTOCOL_VIOLATION, "unexpected GSSENCRequest")
            gss_done = True
            stream.write(b"N")
            continue
        if kind == "cancel":
            return CancelRequest(packet.process_id, packet.secret_key)
        return _negotiate(stream, packet, require_tls=require_tls)


def _negotiate(
    stream: PgStream, packet: _wire.StartupPacket, *, require_tls: bool
) -> StartupRequest:
    if packet.major != 3:
        raise GatewayError(
            errors.FEATURE_NOT_SUPPORTED,
            f"unsupported frontend protocol {packet.major}.{packet.minor}: "
            f"server supports 3.0 to 3.{NEWEST_MINOR}",
        )
    params: list[tuple[str, str]] = []
    unsupported: list[str] = []
    for name, value in packet.params:
        if name.startswith("_pq_."):
            unsupported.append(name)  # no protocol extension is implemented yet
        else:
            params.append((name, value))
    minor = min(packet.minor, NEWEST_MINOR)
    if packet.minor > NEWEST_MINOR or unsupported:
        stream.write(_wire.encode_negotiate_protocol_version(minor, unsupported))
    if require_tls and not stream.tls:
        raise GatewayError(
            errors.INVALID_AUTHORIZATION_SPECIFICATION,
            "TLS required",
            hint="Connect with sslmode=require (or stronger).",
        )
    values = dict(params)
    user = values.get("user", "")
    if not user:
        raise GatewayError(
            errors.INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        )
    database = values.get("database") or user
    return StartupRequest(user=user, database=database, params=params, minor=minor, tls=stream.tls)

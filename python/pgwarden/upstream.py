"""Opening a connection to the upstream PostgreSQL server with the gateway-held credential.

Order of events (protocol 3.0, "Message Flow / Start-up"): TCP or unix socket connect →
optional SSLRequest + TLS per ``upstream.tls`` → StartupMessage → authentication
(SCRAM-SHA-256, md5 or cleartext, whichever the server asks for) → ParameterStatus* →
BackendKeyData → ReadyForQuery.  The gateway always speaks protocol 3.0 upstream: it gives the
client its own cancel key, so the upstream key length never reaches the client.

Any ErrorResponse the server sends during this phase is kept byte for byte in the raised
:class:`GatewayError`, so the client sees the server's own SQLSTATE and message (28P01,
3D000, ...).  Nothing here ever logs or returns the upstream password.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Final

import anyio
import anyio.to_thread

from pgwarden import _wire, errors, scram, tls
from pgwarden.config import UpstreamSettings
from pgwarden.errors import ConnectionClosed, GatewayError
from pgwarden.transport import PgStream

log = logging.getLogger(__name__)

# Authentication request codes (protocol "Message Formats", Authentication*).
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

_R, _S, _K, _Z, _E, _N, _V = (ord(c) for c in "RSKZENv")
# Startup-phase messages from the server are small; a huge one is a broken server.
_MAX_STARTUP_MESSAGE = 1024 * 1024


class UpstreamAuthError(GatewayError):
    """The upstream login failed in a way the gateway detected (not the server's own error)."""


@dataclass(frozen=True, slots=True)
class UpstreamLogin:
    """Who to log in as upstream, and which client parameters go along."""

    user: str
    database: str
    password: str | None
    params: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class UpstreamConnection:
    """A logged-in upstream session, ready for queries (ReadyForQuery received)."""

    stream: PgStream
    parameters: list[tuple[str, str]]
    notices: list[bytes]
    process_id: int
    secret_key: bytes
    transaction_status: str


def _unavailable(reason: str) -> GatewayError:
    # The client is untrusted: the upstream address and OS error stay in the gateway log.
    log.warning("upstream connection failed: %s", reason)
    return GatewayError(
        errors.CONNECTION_FAILURE,
        "pgwarden could not connect to the upstream PostgreSQL server",
    )


async def _connect_plain(upstream: UpstreamSettings, max_message_len: int) -> PgStream:
    loop = asyncio.get_running_loop()

    def factory() -> PgStream:
        return PgStream(max_message_len=max_message_len, max_startup_len=0)

    try:
        if upstream.host.startswith("/"):
            path = f"{upstream.host.rstrip('/')}/.s.PGSQL.{upstream.port}"
            _, stream = await loop.create_unix_connection(factory, path)
        else:
            transport, stream = await loop.create_connection(factory, upstream.host, upstream.port)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        raise _unavailable(f"{upstream.host}:{upstream.port}: {exc}") from exc
    return stream


async def open_stream(upstream: UpstreamSettings, *, max_message_len: int) -> PgStream:
    """Connect to the upstream server and negotiate TLS per ``upstream.tls``.

    Also used for CancelRequest, which PostgreSQL accepts after TLS negotiation as well.
    """
    context = tls.upstream_context(upstream.tls, upstream.tls_ca_file)
    stream = await _connect_plain(upstream, max_message_len)
    if context is None or upstream.host.startswith("/"):
        return stream  # libpq never uses TLS over unix sockets either
    try:
        stream.write(_wire.encode_ssl_request())
        answer = await stream.read_exact(1)
    except ConnectionClosed as exc:
        raise _unavailable("connection closed during SSLRequest") from exc
    if answer == b"S":
        if stream.has_unread_bytes():
            # CVE-2021-23222: bytes injected before the handshake must not be trusted.
            stream.abort()
            raise _unavailable("server sent unencrypted data after accepting SSLRequest")
        try:
            await stream.start_tls(
                context,
                server_side=False,
                server_hostname=upstream.host,
                handshake_timeout=upstream.connect_timeout_seconds,
            )
        except (ssl.SSLError, ssl.CertificateError, OSError, ConnectionClosed) as exc:
            stream.abort()
            if upstream.tls == "prefer":
                log.info("upstream TLS handshake failed (%s); retrying without TLS", exc)
                return await _connect_plain(upstream, max_message_len)
            raise _unavailable(f"TLS handshake failed: {exc}") from exc
        return stream
    if answer == b"N" and upstream.tls == "prefer":
        return stream
    stream.abort()
    if answer == b"N":
        raise _unavailable(f"server does not support TLS (tls mode {upstream.tls})")
    raise _unavailable(f"unexpected answer {answer!r} to SSLRequest")


def _server_error(body: bytes) -> GatewayError:
    fields = _wire.decode_fields(body)
    return GatewayError(
        fields.get("C", errors.CONNECTION_FAILURE),
        fields.get("M", "upstream server error"),
        severity=fields.get("V", fields.get("S", "FATAL")),
        wire=_wire.encode_message(_E, body),
    )


def _auth_failed(reason: str) -> UpstreamAuthError:
    log.warning("upstream authentication failed: %s", reason)
    return UpstreamAuthError(
        errors.CONNECTION_FAILURE,
        "pgwarden could not authenticate to the upstream PostgreSQL server",
    )


async def login(
    upstream: UpstreamSettings, login: UpstreamLogin, *, max_message_len: int
) -> UpstreamConnection:
    """Connect, authenticate and wait for ReadyForQuery.  Caller applies the timeout."""
    stream = await open_stream(upstream, max_message_len=max_message_len)
    try:
        return await _authenticate(stream, login)
    except BaseException:
        stream.abort()
        raise


async def _authenticate(stream: PgStream, login: UpstreamLogin) -> UpstreamConnection:
    startup = [("user", login.user), ("database", login.database), *login.params]
    stream.write(_wire.encode_startup(startup, 3, 0))
    parameters: list[tuple[str, str]] = []
    notices: list[bytes] = []
    process_id, secret_key = 0, b""
    exchange: scram.ScramClient | None = None
    scram_verified = False
    authenticated = False

    def password() -> str:
        if login.password is None:
            raise _auth_failed(f"server asks a password for {login.user!r} and none is set")
        return login.password

    while True:
        try:
            tag, body = await stream.read_message()
        except ConnectionClosed as exc:
            raise _unavailable("server closed the connection during startup") from exc
        if len(body) > _MAX_STARTUP_MESSAGE:
            raise _auth_failed("oversized startup message from server")
        if tag == _R:
            code, payload = _wire.decode_authentication(body)
            if code == AUTH_OK:
                if exchange is not None and not scram_verified:
                    # A server that skips SASLFinal has not proven it knows the password.
                    raise _auth_failed("server skipped the SCRAM server signature")
                authenticated = True
            elif code == AUTH_CLEARTEXT:
                stream.write(_wire.encode_password(password().encode()))
            elif code == AUTH_MD5:
                if len(payload) != 4:
                    raise _auth_failed("malformed AuthenticationMD5Password")
                digest = scram.md5_password(password(), login.user, payload)
                stream.write(_wire.encode_password(digest))
            elif code == AUTH_SASL:
                mechanisms = _wire.decode_sasl_mechanisms(payload)
                if scram.MECHANISM not in mechanisms:
                    raise _auth_failed(f"no supported SASL mechanism in {mechanisms}")
                exchange = scram.ScramClient(password())
                stream.write(
                    _wire.encode_sasl_initial_response(scram.MECHANISM, exchange.client_first())
                )
            elif code == AUTH_SASL_CONTINUE and exchange is not None:
                try:
                    exchange.parse_server_first(payload)
                    if scram.keys_cached(password(), exchange.salt, exchange.iterations):
                        final = exchange.client_final()
                    else:  # PBKDF2 takes milliseconds: keep the event loop serving others
                        final = await anyio.to_thread.run_sync(exchange.client_final)
                except scram.ScramError as exc:
                    raise _auth_failed(str(exc)) from exc
                stream.write(_wire.encode_sasl_response(final))
            elif code == AUTH_SASL_FINAL and exchange is not None:
                try:
                    exchange.verify_server_final(payload)
                except scram.ScramError as exc:
                    raise _auth_failed(str(exc)) from exc
                scram_verified = True
            else:
                raise _auth_failed(f"unsupported authentication request {code}")
        elif tag == _S:
            parameters.append(_wire.decode_parameter_status(body))
        elif tag == _K:
            process_id, secret_key = _wire.decode_backend_key_data(body)
        elif tag == _Z:
            if not authenticated:
                raise _auth_failed("ReadyForQuery before AuthenticationOk")
            status = body[:1].decode("ascii", "replace") or "I"
            return UpstreamConnection(stream, parameters, notices, process_id, secret_key, status)
        elif tag == _E:
            raise _server_error(body)
        elif tag == _N:
            notices.append(_wire.encode_message(tag, body))
        elif tag == _V:
            pass  # NegotiateProtocolVersion: we asked for 3.0, nothing to adjust
        else:
            raise _auth_failed(f"unexpected message {chr(tag)!r} during startup")


async def send_cancel(
    upstream: UpstreamSettings, process_id: int, secret_key: bytes, *, time_limit: float
) -> None:
    """Open a fresh upstream connection and send CancelRequest on it (no reply expected)."""
    with anyio.move_on_after(time_limit):
        stream = await open_stream(upstream, max_message_len=1024)
        try:
            stream.write(_wire.encode_cancel_request(process_id, secret_key))
            # The server closes the connection once it has processed the request.
            with anyio.move_on_after(time_limit):
                await stream.wait_closed()
        finally:
            stream.close()

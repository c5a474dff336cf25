"""One PostgreSQL connection during the startup phase: an asyncio Protocol with awaitable reads.

Until a session is authenticated its traffic is a handful of small messages, read with
``await stream.read_startup_packet()`` / ``read_message()`` / ``read_exact()``.  Once both ends
are ready the session hands the raw transports to the relay (``pgwarden.relay``), which
installs its own lean protocols with ``transport.set_protocol()``; :meth:`PgStream.take_leftover`
hands over whatever arrived but was not consumed, so no byte is lost in the switch.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import cast

from pgwarden import _wire, errors
from pgwarden.errors import ConnectionClosed, GatewayError

# Stop reading from a peer that sends far more than the startup phase needs.
_READ_PAUSE_BYTES = 256 * 1024


def _startup_error(head: bytes, max_len: int, exc: _wire.WireError) -> GatewayError:
    """ErrorResponse for an unacceptable startup packet, in PostgreSQL's order of checks.

    The length is judged first ("invalid length of startup packet", 08P01; an HTTP request
    lands here), then the version: 0A000 for a protocol we do not speak.
    """
    if len(head) >= 4:
        length = int.from_bytes(head[:4], "big")
        if length < 8 or length > max_len:
            return GatewayError(errors.PROTOCOL_VIOLATION, "invalid length of startup packet")
    if len(head) == 8:
        major, minor = int.from_bytes(head[4:6], "big"), int.from_bytes(head[6:8], "big")
        if major not in (3, 1234):  # 1234.x are the SSL/GSSENC/cancel request codes
            return GatewayError(
                errors.FEATURE_NOT_SUPPORTED,
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.2",
            )
    return GatewayError(errors.PROTOCOL_VIOLATION, f"invalid startup packet: {exc}")


class PgStream(asyncio.Protocol):
    """Buffering protocol with coroutine reads, for either end of the gateway."""

    def __init__(self, *, max_message_len: int, max_startup_len: int) -> None:
        self.transport: asyncio.Transport | None = None
        self._max_startup_len = max_startup_len
        self._framer = _wire.MessageFramer(max_message_len)
        self._buf = bytearray()
        self._messages: deque[tuple[int, bytes]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost = False
        self._reading_paused = False
        self._closed: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > _READ_PAUSE_BYTES and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = True
        self._wake()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    # --- state ------------------------------------------------------------------------

    def has_unread_bytes(self) -> bool:
        """Bytes arrived that no read has consumed (framed messages included)."""
        return bool(self._buf) or bool(self._messages)

    @property
    def tls(self) -> bool:
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    # --- reads ------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_for_data(self) -> None:
        if self._eof:
            raise ConnectionClosed("connection closed by peer")
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_startup_packet(self) -> _wire.StartupPacket:
        """The next untyped startup-phase packet (StartupMessage, SSLRequest, ...)."""
        while True:
            if self._buf:
                try:
                    decoded = _wire.read_startup(bytes(self._buf), self._max_startup_len)
                except _wire.WireError as exc:
                    raise _startup_error(bytes(self._buf[:8]), self._max_startup_len, exc) from exc
                if decoded is not None:
                    packet, consumed = decoded
                    del self._buf[:consumed]
                    return packet
            await self._wait_for_data()

    async def read_message(self) -> tuple[int, bytes]:
        """The next typed message as ``(tag, body)``."""
        while not self._messages:
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                try:
                    self._messages.extend(self._framer.feed(data))
                except _wire.WireError as exc:
                    raise GatewayError(errors.PROTOCOL_VIOLATION, str(exc)) from exc
                continue
            await self._wait_for_data()
        return self._messages.popleft()

    async def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (the one-byte answer to SSLRequest)."""
        while len(self._buf) < n:
            await self._wait_for_data()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the transport for the relay: ``(transport, unconsumed bytes)``.

        The caller installs its own protocol with ``transport.set_protocol()``.
        """
        if self.transport is None or self._lost:
            raise ConnectionClosed("connection closed before the relay started")
        if self._eof:
            raise ConnectionClosed("peer half-closed the connection before the relay started")
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        return self.transport, self.take_leftover()

    def take_leftover(self) -> bytes:
        """Every byte received and not consumed, in wire order; the stream is empty after."""
        parts = [_wire.encode_message(tag, body) for tag, body in self._messages]
        self._messages.clear()
        parts.append(self._framer.take_pending())
        parts.append(bytes(self._buf))
        self._buf.clear()
        return b"".join(parts)

    # --- writes and TLS -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionClosed("connection already closed")
        transport.write(data)

    async def start_tls(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection in place (after SSLRequest / 'S')."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        new_transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        if new_transport is None:
            raise ConnectionClosed("connection closed during the TLS handshake")
        self.transport = new_transport

    async def wait_closed(self) -> None:
        """Wait until the transport reported connection_lost."""
        if self._lost:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await self._closed

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

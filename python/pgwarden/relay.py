"""The relay: two asyncio Protocols that pass chunks between client and server through the codec.

This is the hot path.  Each ``data_received(chunk)`` makes exactly one call into Rust
(``SessionCodec.feed_client`` / ``feed_server``) and one ``transport.write``; Python looks at
the returned events only when there are some (per statement, never per row).  Backpressure is
the transports' own: when the client's write buffer fills, reading from the server pauses, and
the other way round, so no result set is ever buffered whole.

Endings: the side that goes away first closes the other.  A client that disconnects gets its
upstream backend a Terminate (client messages are forwarded only whole, so the upstream stream
is at a message boundary); a server that disappears without a FATAL of its own gets the client
a FATAL 08006 "server closed the connection unexpectedly".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import anyio

from pgwarden import _wire, errors
from pgwarden.statement_log import StatementLog

if TYPE_CHECKING:
    from pgwarden.hooks import ClientEventHook
    from pgwarden.session import Session

log = logging.getLogger(__name__)

TERMINATE: Final = _wire.encode_message(ord("X"), b"")
EV_READY: Final = _wire.EV_READY
EV_ERROR: Final = _wire.EV_ERROR
EV_TERMINATE: Final = _wire.EV_TERMINATE
# Time a closing side gets to flush what is buffered for it before it is aborted.
CLOSE_GRACE_SECONDS: Final = 10.0


class _ClientSide(asyncio.Protocol):
    """Bytes from the client: frame in Rust, forward upstream."""

    __slots__ = ("_feed", "_relay", "_write")

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._feed = relay.codec.feed_client
        self._write: Callable[[bytes], None] = relay.server_transport.write

    def data_received(self, data: bytes) -> None:
        try:
            out, events = self._feed(data)
            if events is not None:
                out = self._relay.client_events(out, events)
            if out:
                self._write(out)
        except _wire.WireError as exc:
            self._relay.protocol_violation(str(exc))
        except Exception:
            self._relay.internal_error("client data")

    def eof_received(self) -> bool | None:
        return None  # close: PostgreSQL has no use for half-closed connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.client_lost()

    def pause_writing(self) -> None:  # client is slow: stop reading the server
        self._relay.server_transport.pause_reading()

    def resume_writing(self) -> None:
        self._relay.server_transport.resume_reading()


class _ServerSide(asyncio.Protocol):
    """Bytes from the server: frame (and later mask) in Rust, forward to the client."""

    __slots__ = ("_feed", "_relay", "_write")

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._feed = relay.codec.feed_server
        self._write: Callable[[bytes], None] = relay.client_transport.write

    def data_received(self, data: bytes) -> None:
        try:
            out, events = self._feed(data)
            if out:
                self._write(out)
            if events is not None:
                self._relay.server_events(events)
        except _wire.WireError as exc:
            self._relay.server_protocol_violation(str(exc))
        except Exception:
            self._relay.internal_error("server data")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.server_lost()

    def pause_writing(self) -> None:  # server is slow to read: stop reading the client
        self._relay.client_transport.pause_reading()

    def resume_writing(self) -> None:
        self._relay.client_transport.resume_reading()


class Relay:
    """Both directions of one authenticated session."""

    def __init__(
        self,
        session: Session,
        codec: _wire.SessionCodec,
        client_transport: asyncio.Transport,
        server_transport: asyncio.Transport,
        *,
        statement_log: StatementLog | None,
        client_event_hook: ClientEventHook | None,
    ) -> None:
        self.session = session
        self.codec = codec
        self.client_transport = client_transport
        self.server_transport = server_transport
        self._statement_log = statement_log
        self._hook = client_event_hook
        self._client_lost = False
        self._server_lost = False
        self._client_terminated = False  # client sent Terminate
        self._upstream_fatal = False  # server sent its own FATAL/PANIC
        self._terminating = False  # the gateway ended the session
        self._drain_requested = False
        self.busy_when_terminated = False
        self._one_lost = anyio.Event()
        self._both_lost = anyio.Event()

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, client_leftover: bytes, server_leftover: bytes) -> None:
        """Install the relay protocols and replay bytes that arrived during the switch."""
        client_side = _ClientSide(self)
        server_side = _ServerSide(self)
        self.client_transport.set_protocol(client_side)
        self.server_transport.set_protocol(server_side)
        if server_leftover:
            server_side.data_received(server_leftover)
        if client_leftover:
            client_side.data_received(client_leftover)

    async def wait(self) -> None:
        """Until both connections are closed (aborting a side that cannot flush in time)."""
        try:
            await self._one_lost.wait()
            with anyio.move_on_after(CLOSE_GRACE_SECONDS):
                await self._both_lost.wait()
        finally:
            if not self._both_lost.is_set():
                self.client_transport.abort()
                self.server_transport.abort()

    @property
    def idle(self) -> bool:
        """ReadyForQuery 'I' seen last and no statement in flight."""
        return self.codec.transaction_status == "I" and self.codec.in_flight == 0

    def request_drain(self) -> None:
        """Shutdown: end the session now if idle, else at its next idle ReadyForQuery."""
        self._drain_requested = True
        if self.idle:
            self.terminate(errors.ADMIN_SHUTDOWN, errors.ADMIN_SHUTDOWN_MESSAGE)

    def send_to_client(self, data: bytes) -> None:
        if not self._client_lost and not self.client_transport.is_closing():
            self.client_transport.write(data)

    def terminate(self, sqlstate: str, message: str) -> None:
        """Send the client FATAL ``sqlstate``, end the upstream backend, close both sides."""
        if self._terminating:
            return
        self._terminating = True
        self.busy_when_terminated = self.codec.in_flight > 0
        self._close_client(errors.fatal(sqlstate, message))
        self._close_server()

    # --- events -------------------------------------------------------------------------

    def client_events(self, data: bytes, events: list[_wire.ClientEvent]) -> bytes:
        for event in events:
            if event[0] == EV_TERMINATE:
                self._client_terminated = True
        if self._hook is not None:
            return self._hook.on_client_events(self.session, data, events)
        return data

    def server_events(self, events: list[_wire.ServerEvent]) -> None:
        for event in events:
            kind = event[0]
            if kind == EV_READY:
                if self._statement_log is not None:
                    self._statement_log.append(self.codec.take_records())
                if self._drain_requested and event[1] == "I" and self.codec.in_flight == 0:
                    self.terminate(errors.ADMIN_SHUTDOWN, errors.ADMIN_SHUTDOWN_MESSAGE)
            elif kind == EV_ERROR and event[1] in ("FATAL", "PANIC"):
                self._upstream_fatal = True

    def flush_records(self) -> None:
        if self._statement_log is not None:
            self._statement_log.append(self.codec.take_records())

    # --- failures -----------------------------------------------------------------------

    def protocol_violation(self, reason: str) -> None:
        log.info("session %s: client protocol violation: %s", self.session.id, reason)
        self.terminate(errors.PROTOCOL_VIOLATION, reason)

    def server_protocol_violation(self, reason: str) -> None:
        log.warning("session %s: invalid data from upstream: %s", self.session.id, reason)
        self.terminate(errors.PROTOCOL_VIOLATION, f"invalid message from upstream server: {reason}")

    def internal_error(self, where: str) -> None:
        if self._terminating:
            return  # writes racing a close; nothing to report
        log.exception("session %s: internal error handling %s", self.session.id, where)
        self.terminate(errors.INTERNAL_ERROR, "internal error in pgwarden")

    # --- closing ------------------------------------------------------------------------

    def _close_client(self, final_message: bytes | None) -> None:
        if self._client_lost or self.client_transport.is_closing():
            return
        if final_message is not None:
            self.client_transport.write(final_message)
        self.client_transport.close()

    def _close_server(self) -> None:
        if self._server_lost or self.server_transport.is_closing():
            return
        if not self._client_terminated:
            self.server_transport.write(TERMINATE)
        self.server_transport.close()

    def client_lost(self) -> None:
        self._client_lost = True
        self._close_server()
        self._lost()

    def server_lost(self) -> None:
        self._server_lost = True
        if (
            self._client_lost
            or self._upstream_fatal
            or self._client_terminated
            or self._terminating
        ):
            self._close_client(None)
        else:
            log.warning("session %s: upstream connection closed unexpectedly", self.session.id)
            self._close_client(
                errors.fatal(errors.CONNECTION_FAILURE, errors.SERVER_CLOSED_MESSAGE)
            )
        self._lost()

    def _lost(self) -> None:
        self._one_lost.set()
        if self._client_lost and self._server_lost:
            self._both_lost.set()

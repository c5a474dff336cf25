"""The relay: two asyncio Protocols that pass chunks between client and server through the codec.

This is the hot path.  Each ``data_received(chunk)`` makes exactly one call into Rust
(``SessionCodec.feed_client`` / ``feed_server``) and one ``transport.write``; Python looks at
the returned events only when there are some (per statement, never per row).  Backpressure is
the transports' own: when the client's write buffer fills, reading from the server pauses, and
the other way round, so no result set is ever buffered whole.

Endings: the side that goes away first closes the other.  A client that disconnects gets its
upstream backend a Terminate (client messages are forwarded only whole, so the upstream stream
is at a message boundary), plus a CancelRequest when a statement was still running; a server
that disappears without a FATAL of its own gets the client a FATAL 08006 "server closed the
connection unexpectedly".

A message of the gateway's own (the FATAL that ends a session) is only ever written to the
client at a server-message boundary: server bytes are forwarded as they arrive, so the client
may hold part of a DataRow, and a FATAL spliced into it would make the client lose
synchronization.  When the gateway ends a session mid-message, it goes on forwarding the
server's bytes until that message is complete (and no further), then writes the FATAL; if
the rest does not come within :data:`BOUNDARY_WAIT_SECONDS`, the client connection is closed
with nothing more written.
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
    from pgwarden.audit.trail import SyncGate
    from pgwarden.hooks import ClientEventHook
    from pgwarden.session import Session

log = logging.getLogger(__name__)

TERMINATE: Final = _wire.encode_message(ord("X"), b"")
EV_READY: Final = _wire.EV_READY
EV_ERROR: Final = _wire.EV_ERROR
EV_TERMINATE: Final = _wire.EV_TERMINATE
# Time a closing side gets to flush what is buffered for it before it is aborted.
CLOSE_GRACE_SECONDS: Final = 10.0
# Time an ending session waits for the server message being forwarded to be complete.
BOUNDARY_WAIT_SECONDS: Final = 2.0


class _ClientSide(asyncio.Protocol):
    """Bytes from the client: frame in Rust, forward upstream."""

    __slots__ = ("_feed", "_relay", "_write")

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._feed = relay.codec.feed_client
        # With fsync = always, bytes wait for the fsync that covers their audit records.
        self._write: Callable[[bytes], None] = (
            relay.server_transport.write if relay.sync_gate is None else relay.write_after_sync
        )

    def data_received(self, data: bytes) -> None:
        try:
            out, events = self._feed(data)
            if events is not None:
                out = self._relay.client_events(out, events)
            if out:
                self._write(out)
        except _wire.WireError as exc:
            self._relay.protocol_violation(str(exc))
        except _wire.AuditSpoolError as exc:
            self._relay.audit_refused(exc)
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

    __slots__ = ("_feed", "_on_events", "_relay", "_write")

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._feed = relay.codec.feed_server
        self._write: Callable[[bytes], None] = relay.client_transport.write
        self._on_events = relay.server_events

    def data_received(self, data: bytes) -> None:
        try:
            out, events = self._feed(data)
            if out:
                self._write(out)
            if events is not None:
                self._on_events(events)
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


class _ServerSideCompletingMessage(_ServerSide):
    """The session is ending mid-message: forward the rest of that message only."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        codec = relay.codec
        try:
            # Fed in pieces no longer than what is owed, so nothing past the message's
            # end reaches the client; the rest of the chunk is dropped with the session.
            while data and (owed := codec.server_bytes_owed) > 0:
                piece, data = data[:owed], data[owed:]
                out, events = self._feed(piece)
                if out:
                    self._write(out)
                if events is not None:
                    self._on_events(events)
        except Exception as exc:
            log.info("session %s: cannot complete the server message: %s", relay.session.id, exc)
            relay.boundary_missed()
            return
        if codec.server_bytes_owed == 0:
            relay.boundary_reached()

    # The client is no longer read: server backpressure has nothing to pause.
    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class _Signal:
    """A flag one task waits for.  Its future is made only when the flag is awaited unset,
    where an ``anyio.Event`` holds an ``asyncio.Event`` and its waiter queue (about 1 KiB)
    for as long as the session is open."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        if self._set:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():  # a cancelled wait leaves a done future behind
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter


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
        sync_gate: SyncGate | None = None,
    ) -> None:
        self.session = session
        self.codec = codec
        self.client_transport = client_transport
        self.server_transport = server_transport
        self._statement_log = statement_log
        self._hook = client_event_hook
        self.sync_gate = sync_gate
        self._held: list[bytes] = []  # client bytes waiting for an fsync (fsync = always)
        self._held_target = 0  # the audit seq the held bytes wait for
        self.ended_by: tuple[str, str] | None = None  # (sqlstate, message) of terminate()
        self._client_lost = False
        self._server_lost = False
        self._client_terminated = False  # client sent Terminate
        self._upstream_fatal = False  # server sent its own FATAL/PANIC
        self._terminating = False  # the gateway ended the session
        # terminate() mid server message: the FATAL to write once the message is complete.
        self._final_message: bytes | None = None
        # Set by end_when_idle(): (sqlstate, message) to end with at the next safe point.
        self._end_when_idle: tuple[str, str] | None = None
        self.cancel_upstream_on_close = False  # a statement may still be running
        self._one_lost = _Signal()
        self._both_lost = _Signal()

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
        """A safe point to end the session: the server owes the client nothing.

        Last ReadyForQuery was 'I', no request (statement, Parse, Bind, Describe, Close, Sync)
        awaits a response, and no partial client message is held back.
        """
        codec = self.codec
        return (
            codec.transaction_status == "I"
            and codec.pending_requests == 0
            and codec.held_client_bytes == 0
        )

    def end_when_idle(self, sqlstate: str, message: str) -> None:
        """End the session (FATAL ``sqlstate``) now if idle, else at its next idle point.

        Used by the shutdown drain and by identity deadlines; a caller that cannot wait
        forever calls :meth:`terminate` later.
        """
        if self._end_when_idle is None:
            self._end_when_idle = (sqlstate, message)
        if self.idle:
            self.terminate(*self._end_when_idle)

    def request_drain(self) -> None:
        """Shutdown: end the session now if idle, else at its next idle ReadyForQuery."""
        self.end_when_idle(errors.ADMIN_SHUTDOWN, errors.ADMIN_SHUTDOWN_MESSAGE)

    def send_to_client(self, data: bytes) -> None:
        if not self._client_lost and not self.client_transport.is_closing():
            self.client_transport.write(data)

    def terminate(self, sqlstate: str, message: str) -> None:
        """Send the client FATAL ``sqlstate``, end the upstream backend, close both sides.

        The FATAL goes at a server-message boundary: at once when the client's stream is
        at one, else after the rest of the message being forwarded (see the module notes).
        """
        if self._terminating:
            return
        self._terminating = True
        self.ended_by = (sqlstate, message)
        self.cancel_upstream_on_close |= self.codec.in_flight > 0
        final = errors.fatal(sqlstate, message)
        if (
            self._client_lost
            or self._server_lost
            or self.client_transport.is_closing()
            or self.codec.server_bytes_owed == 0
        ):
            self._close_client(final)
            self._close_server()
            return
        self._final_message = final
        self.client_transport.pause_reading()  # nothing more goes upstream
        self.server_transport.set_protocol(_ServerSideCompletingMessage(self))
        asyncio.get_running_loop().call_later(BOUNDARY_WAIT_SECONDS, self.boundary_missed)

    def boundary_reached(self) -> None:
        """The message being forwarded when the session was ended is complete."""
        final, self._final_message = self._final_message, None
        if final is not None:
            self._close_client(final)
            self._close_server()

    def boundary_missed(self) -> None:
        """It did not complete in time (or cannot): close without writing anything more."""
        final, self._final_message = self._final_message, None
        if final is not None:
            log.info(
                "session %s: server message incomplete after %.0f s; closing without a FATAL",
                self.session.id,
                BOUNDARY_WAIT_SECONDS,
            )
            self._close_client(None)
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
                if self._end_when_idle is not None and self.idle:
                    self.terminate(*self._end_when_idle)
            elif kind == EV_ERROR and event[1] in ("FATAL", "PANIC"):
                self._upstream_fatal = True

    def flush_records(self) -> None:
        if self._statement_log is not None:
            self._statement_log.append(self.codec.take_records())

    # --- audit --------------------------------------------------------------------------

    def write_after_sync(self, data: bytes) -> None:
        """Forward ``data`` once the audit records stored so far are on disk, in order."""
        gate = self.sync_gate
        assert gate is not None
        target = gate.written_seq()
        if not self._held and gate.synced_seq() >= target:
            self.server_transport.write(data)
            return
        self._held.append(data)
        self._held_target = target
        if len(self._held) == 1:
            gate.wait(target, self._release_held)

    def _release_held(self) -> None:
        gate = self.sync_gate
        assert gate is not None
        if gate.synced_seq() < self._held_target:
            gate.wait(self._held_target, self._release_held)  # more arrived meanwhile
            return
        held, self._held = self._held, []
        if self._server_lost or self.server_transport.is_closing():
            return
        self.server_transport.write(b"".join(held))

    def audit_refused(self, exc: _wire.AuditSpoolError) -> None:
        """The statement's audit record could not be stored: it is not forwarded."""
        from pgwarden.audit.trail import AuditTrail

        refusal = AuditTrail.refusal(exc)
        log.error("session %s: statement refused: %s (%s)", self.session.id, refusal.message, exc)
        self.terminate(refusal.sqlstate, refusal.message)

    @property
    def end_reason(self) -> tuple[str, str | None, str | None]:
        """How the session ended: (reason, sqlstate, message) for its audit record."""
        if self.ended_by is not None:
            return ("terminated", *self.ended_by)
        if self._client_terminated:
            return ("client_terminate", None, None)
        if self._upstream_fatal:
            return ("server_fatal", None, None)
        if self._server_lost and not self._client_lost:
            return ("server_closed", None, None)
        return ("client_disconnect", None, None)

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
        if not self._server_lost and self.codec.in_flight > 0:
            # PostgreSQL notices a vanished client only when it next reads or writes: a long
            # statement would run on, so the session cancels it once the relay is closed.
            self.cancel_upstream_on_close = True
        self._close_server()
        self._lost()

    def server_lost(self) -> None:
        self._server_lost = True
        self._final_message = None  # the message being completed never will be
        if (
            self._client_lost
            or self._upstream_fatal
            or self._client_terminated
            or self._terminating
        ):
            self._close_client(None)
        else:
            log.warning("session %s: upstream connection closed unexpectedly", self.session.id)
            # Not spliced into a message the server left unfinished.
            at_boundary = self.codec.server_bytes_owed == 0
            self._close_client(
                errors.fatal(errors.CONNECTION_FAILURE, errors.SERVER_CLOSED_MESSAGE)
                if at_boundary
                else None
            )
        self._lost()

    def _lost(self) -> None:
        self._one_lost.set()
        if self._client_lost and self._server_lost:
            self._both_lost.set()

"""One client session: startup, authentication, upstream login, then the relay until the end.

The session is the only place that turns typed errors into what the client sees: a
:class:`~pgwarden.errors.GatewayError` becomes its ErrorResponse, a client that went away is
closed quietly, and anything unexpected is logged and answered FATAL XX000, without touching
any other session.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, Final

import anyio

from pgwarden import _wire, errors, upstream
from pgwarden.cancel import UpstreamBackend
from pgwarden.client_auth import AuthError, AuthRequest, Identity
from pgwarden.client_startup import (
    MAX_STARTUP_PHASE_MESSAGE,
    CancelRequest,
    StartupRequest,
    attach_client_stream,
    is_direct_tls,
    peek_first_byte,
    read_startup,
)
from pgwarden.errors import ConnectionClosed, GatewayError
from pgwarden.relay import Relay
from pgwarden.startup_params import upstream_startup_params
from pgwarden.transport import PgStream

if TYPE_CHECKING:
    from pgwarden.gateway import Gateway
    from pgwarden.policy.mask_catalog import SessionMasks
    from pgwarden.policy.mask_check import MaskScope
    from pgwarden.policy.mask_watch import MaskKey
    from pgwarden.policy.rules import Mask
    from pgwarden.session_limits import Admission

log = logging.getLogger(__name__)

_PASSWORD_MESSAGE: Final = ord("p")
_AUTH_OK: Final = 0
_AUTH_CLEARTEXT: Final = 3
_UPSTREAM_STARTUP_MESSAGE_LIMIT: Final = 1024 * 1024
# How long a closing client gets to read its final ErrorResponse.
_FINAL_MESSAGE_GRACE_SECONDS: Final = 2.0


class Session:
    """A client connection and, once authenticated, its upstream connection."""

    def __init__(self, gateway: Gateway, sock: socket.socket, client_address: str) -> None:
        self.id = secrets.token_hex(8)
        self.gateway = gateway
        self.client_address = client_address
        self.identity: Identity | None = None
        self.startup: StartupRequest | None = None
        self.upstream_user: str | None = None
        self.database: str | None = None
        self._sock = sock
        self._sock_handed_over = False  # once True, the client transport owns the socket
        self._client: PgStream | None = None
        self._upstream: upstream.UpstreamConnection | None = None
        self._admission: Admission | None = None  # counted by the gateway's session ledger
        self._relay: Relay | None = None
        self._startup_scope: anyio.CancelScope | None = None
        self._pending_end: tuple[str, str] | None = None
        self._cancel_process_id: int | None = None
        self._backend: UpstreamBackend | None = None
        self._observed = False  # the session observer was told the session started
        self._accepted_us = time.time_ns() // 1000
        self._stage = "startup"  # where a refusal happened, for the audit record
        self._audit_started = False  # the session record is in the audit spool
        #: The policy's masks for the session, once decided (after the upstream login;
        #: None before), and the masked columns looked up for them.
        self.policy_masks: tuple[Mask, ...] | None = None
        #: The version of the policy the session started under (its audit record says it).
        self.policy_version: str | None = None
        #: The session's masked columns as looked up, for what (database, masks), and the
        #: login a recheck of them may use (policy.mask_watch); None without masks.
        self.mask_lookup: SessionMasks | None = None
        self.mask_key: MaskKey | None = None
        self.mask_login: upstream.UpstreamLogin | None = None

    @property
    def mask_scope(self) -> MaskScope | None:
        """What the statement checks guard for this session (None without masks)."""
        return self.mask_lookup.scope if self.mask_lookup is not None else None

    def __repr__(self) -> str:
        who = self.identity.name if self.identity is not None else "?"
        return f"<Session {self.id} {who}@{self.client_address}>"

    # --- control from outside ---------------------------------------------------------

    def terminate(self, sqlstate: str, message: str) -> None:
        """End the session now: the client gets FATAL ``sqlstate`` ``message``, both sides close.

        Used for shutdown and by identity checks (token or grant expired).
        """
        if self._relay is not None:
            self._relay.terminate(sqlstate, message)
        elif self._startup_scope is not None:
            self._pending_end = (sqlstate, message)
            self._startup_scope.cancel()

    def end_after_statement(self, sqlstate: str, message: str) -> None:
        """End the session with FATAL ``sqlstate`` as soon as no statement is running.

        Immediately when idle (or still starting up); otherwise after the server has answered
        everything the client sent.  Callers that need a bound call :meth:`terminate` later.
        """
        if self._relay is not None:
            self._relay.end_when_idle(sqlstate, message)
        else:
            self.terminate(sqlstate, message)

    def request_drain(self) -> None:
        """Shutdown has begun: end now if idle or still starting, else when next idle."""
        if self._relay is not None:
            self._relay.request_drain()
        else:
            self.terminate(errors.ADMIN_SHUTDOWN, errors.ADMIN_SHUTDOWN_MESSAGE)

    @property
    def relay(self) -> Relay | None:
        """The session's relay while it runs (None before, and once the session ended)."""
        return self._relay

    def send_to_client(self, data: bytes) -> None:
        """Write protocol messages to the client during the relay (for event hooks)."""
        if self._relay is not None:
            self._relay.send_to_client(data)

    @property
    def protocol_minor(self) -> int:
        return self.startup.minor if self.startup is not None else 0

    # --- the session --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except ConnectionClosed as exc:
            log.debug("session %s: %s", self.id, exc)
        except Exception:
            log.exception("session %s: internal error", self.id)
            await self._close_client(
                errors.fatal(errors.INTERNAL_ERROR, "internal error in pgwarden")
            )
        finally:
            await self._cleanup()

    async def _run(self) -> None:
        settings = self.gateway.settings
        request: StartupRequest | None = None
        with anyio.CancelScope() as scope:
            self._startup_scope = scope
            try:
                try:
                    with anyio.fail_after(settings.startup_timeout_seconds):
                        request = await self._client_phase()
                except TimeoutError:
                    log.info("session %s: startup timeout", self.id)
                    self._audit_refused(None, "startup timeout")
                    await self._close_client(None)
                    return
                if request is None:
                    return
                try:
                    self._stage = "upstream"
                    with anyio.fail_after(settings.upstream.connect_timeout_seconds):
                        await self._upstream_phase(request)
                except TimeoutError:
                    log.warning("session %s: timeout connecting to the upstream server", self.id)
                    raise GatewayError(
                        errors.CONNECTION_FAILURE,
                        "timeout while connecting to the upstream PostgreSQL server",
                    ) from None
                self._stage = "audit"
                self._audit_session_started(request)
            except GatewayError as exc:
                log.info("session %s: refused: %s", self.id, exc)
                self._audit_refused(exc.sqlstate, exc.message)
                if self.gateway.metrics is not None:
                    self.gateway.metrics.connection_refused(exc.sqlstate)
                observer = self.gateway.session_observer
                if observer is not None:
                    observer.session_refused(self, exc)
                await self._close_client(exc.to_wire())
                return
        self._startup_scope = None
        if scope.cancelled_caught or request is None:
            sqlstate, message = self._pending_end or (
                errors.ADMIN_SHUTDOWN,
                errors.ADMIN_SHUTDOWN_MESSAGE,
            )
            await self._close_client(errors.fatal(sqlstate, message))
            return
        await self._relay_phase(request)

    async def _client_phase(self) -> StartupRequest | None:
        """TLS, StartupMessage and client authentication; None for a CancelRequest."""
        gateway = self.gateway
        settings = gateway.settings
        first_byte = await peek_first_byte(self._sock)
        direct_tls = is_direct_tls(first_byte)
        if direct_tls and gateway.server_tls is None:
            raise ConnectionClosed("direct TLS, but no certificate is configured")
        self._client = PgStream(
            max_message_len=MAX_STARTUP_PHASE_MESSAGE,
            max_startup_len=settings.max_startup_bytes,
        )
        self._sock_handed_over = True
        await attach_client_stream(
            self._sock,
            self._client,
            direct_tls_context=gateway.server_tls if direct_tls else None,
            handshake_timeout=settings.startup_timeout_seconds,
        )
        request = await read_startup(
            self._client,
            server_context=gateway.server_tls,
            require_tls=settings.require_client_tls,
            handshake_timeout=settings.startup_timeout_seconds,
        )
        if isinstance(request, CancelRequest):
            await gateway.cancels.cancel(request.process_id, request.secret_key)
            await self._close_client(None)
            return None
        self.startup = request
        self._stage = "authentication"
        auth_request = AuthRequest(
            user=request.user,
            database=request.database,
            client_address=self.client_address,
            tls=request.tls,
            params=dict(request.params),
            ask_password=self._ask_password,
            session_id=self.id,
        )
        try:
            self.identity = await gateway.authenticator.authenticate(auth_request)
        except AuthError as exc:
            raise GatewayError(exc.sqlstate, exc.message) from exc
        if gateway.ledger is not None:
            # Counted from here to the session's end; past a limit, FATAL 53300.
            self._admission = gateway.ledger.admit(self.identity)
        return request

    async def _ask_password(self) -> str:
        """AuthenticationCleartextPassword, then the client's PasswordMessage."""
        assert self._client is not None
        self._client.write(_wire.encode_authentication(_AUTH_CLEARTEXT))
        tag, body = await self._client.read_message()
        if tag != _PASSWORD_MESSAGE:
            raise GatewayError(
                errors.PROTOCOL_VIOLATION,
                f"expected password response, got message type {chr(tag)!r}",
            )
        if not body.endswith(b"\0"):
            raise GatewayError(errors.PROTOCOL_VIOLATION, "invalid password packet")
        return body[:-1].decode("utf-8", "replace")

    async def _upstream_phase(self, request: StartupRequest) -> None:
        settings = self.gateway.settings.upstream
        identity = self.identity
        assert identity is not None
        withheld = identity.withheld_params
        decision = upstream_startup_params(
            (name, value) for name, value in request.params if name.lower() not in withheld
        )
        if identity.upstream_user is not None:
            # The identity maps to its own role, with that role's credential.
            self.upstream_user = identity.upstream_user
            password = identity.upstream_password
        else:
            self.upstream_user = settings.user
            password = settings.resolved_password()
        self.database = identity.upstream_database or settings.database or request.database
        login = upstream.UpstreamLogin(
            user=self.upstream_user,
            database=self.database,
            password=password,
            params=decision.forwarded,
        )
        self._upstream = await upstream.login(
            settings, login, max_message_len=_UPSTREAM_STARTUP_MESSAGE_LIMIT
        )
        policy = self.gateway.policy
        masks = policy.masks_for(self) if policy is not None else ()
        self.policy_masks = masks
        self.policy_version = policy.engine.version if policy is not None else None
        if policy is not None and masks:
            found = await policy.masked_columns(self.database, masks, self._upstream.stream)
            self.mask_key = (self.database, masks)
            self.mask_lookup = found
            self.mask_login = upstream.UpstreamLogin(
                user=self.upstream_user, database=self.database, password=password
            )
            log.debug("session %s: masked columns %s", self.id, ", ".join(found.names))

    def _greeting(self, request: StartupRequest, conn: upstream.UpstreamConnection) -> bytes:
        """AuthenticationOk, ParameterStatus*, the gateway's BackendKeyData, ReadyForQuery."""
        self._backend = UpstreamBackend(
            self.gateway.settings.upstream, conn.process_id, conn.secret_key
        )
        key_length = 32 if request.minor >= 2 else 4
        process_id, secret_key = self.gateway.cancels.register(self._backend, key_length)
        self._cancel_process_id = process_id
        parts = [_wire.encode_authentication(_AUTH_OK), *conn.notices]
        parts.extend(_wire.encode_parameter_status(name, value) for name, value in conn.parameters)
        parts.append(_wire.encode_backend_key_data(process_id, secret_key))
        parts.append(_wire.encode_ready_for_query(conn.transaction_status))
        return b"".join(parts)

    def _context_json(self) -> str:
        fields: dict[str, object] = {
            "session": self.id,
            "user": self.identity.name if self.identity is not None else None,
            "database": self.database,
            "upstream_user": self.upstream_user,
            "client_addr": self.client_address,
        }
        if self.identity is not None and self.identity.attributes:
            # Who the authenticator says the caller is (issuer, subject, rule, grant, ...).
            fields["identity"] = dict(self.identity.attributes)
        return ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in fields.items())

    async def _relay_phase(self, request: StartupRequest) -> None:
        # The set-up's locals (the upstream login, the greeting, the leftover bytes) end
        # with _start_relay's frame instead of living as long as this one.
        relay = self._start_relay(request)
        if self.gateway.draining:
            relay.request_drain()
        await relay.wait()

    def _start_relay(self, request: StartupRequest) -> Relay:
        gateway = self.gateway
        settings = gateway.settings
        conn = self._upstream
        assert self._client is not None and conn is not None
        greeting = self._greeting(request, conn)
        client_transport, client_leftover = self._client.detach()
        server_transport, server_leftover = conn.stream.detach()
        codec = _wire.SessionCodec(
            max_message_len=settings.max_message_bytes,
            context_json=self._context_json(),
            record_statements=gateway.statement_log is not None,
            client_events=gateway.client_event_hook is not None,
            max_param_bytes=settings.statement_log_max_param_bytes,
            **(gateway.audit.codec_options(self.id) if gateway.audit is not None else {}),
        )
        if self.mask_lookup is not None and self.mask_lookup.columns:
            codec.mask_columns(self.mask_lookup.columns)
        relay = Relay(
            self,
            codec,
            client_transport,
            server_transport,
            statement_log=gateway.statement_log,
            client_event_hook=gateway.client_event_hook,
            sync_gate=gateway.audit.sync_gate() if gateway.audit is not None else None,
        )
        client_transport.write(greeting)
        self._relay = relay
        relay.start(client_leftover, server_leftover)
        # The relay owns both transports now: the startup streams (their buffers) and the
        # upstream's ParameterStatus list would only weigh on an idle session's memory.
        self._client = None
        self._upstream = None
        log.debug("session %s: relaying for %s", self.id, self.identity)
        if gateway.metrics is not None:
            gateway.metrics.session_started()
        if gateway.session_observer is not None:
            self._observed = True
            gateway.session_observer.session_started(self)
        return relay

    # --- audit --------------------------------------------------------------------------

    def _audit_session_started(self, request: StartupRequest) -> None:
        """The session record, before the client is let in (GatewayError if it cannot be)."""
        audit = self.gateway.audit
        if audit is None:
            return
        audit.session_started(
            self.id,
            identity=self.identity,
            client_address=self.client_address,
            database=self.database,
            upstream_user=self.upstream_user,
            application_name=dict(request.params).get("application_name"),
            tls=request.tls,
            policy_version=self.policy_version,
        )
        self._audit_started = True

    def _audit_refused(self, sqlstate: str | None, message: str) -> None:
        audit = self.gateway.audit
        if audit is None:
            return
        audit.connection_refused(
            self.id,
            client_address=self.client_address,
            user=self.startup.user if self.startup is not None else None,
            identity=self.identity,
            database=self.database or (self.startup.database if self.startup else None),
            sqlstate=sqlstate or "",
            message=message,
            stage=self._stage,
            started_us=self._accepted_us,
        )

    # --- endings ------------------------------------------------------------------------

    async def _close_client(self, final_message: bytes | None) -> None:
        """Send a last message (if any), close, and give the client a moment to read it."""
        if self._relay is not None:  # the relay owns the transports now
            self._relay.terminate(errors.INTERNAL_ERROR, "internal error in pgwarden")
            return
        client = self._client
        if client is None or client.transport is None or client.transport.is_closing():
            return  # no transport yet (cleanup closes the socket) or already closing
        if final_message is not None:
            client.transport.write(final_message)
        client.close()
        with anyio.move_on_after(_FINAL_MESSAGE_GRACE_SECONDS, shield=True):
            await client.wait_closed()
        client.abort()

    async def _cleanup(self) -> None:
        if self._admission is not None and self.gateway.ledger is not None:
            self.gateway.ledger.release(self._admission)
            self._admission = None
        if self._observed and self.gateway.session_observer is not None:
            self.gateway.session_observer.session_ended(self)
        relay = self._relay
        if relay is not None:
            relay.flush_records()  # Relay.wait() already closed or aborted both transports
            if self.gateway.metrics is not None:
                self.gateway.metrics.session_ended(relay.codec.counters)
            # The relay points back at this session: let go of it, so that both go when
            # their last reference does rather than at the next full garbage collection
            # (and the metrics count its figures as ended, not as open, from here on).
            self._relay = None
        else:
            if self._upstream is not None:
                self._upstream.stream.abort()
            if not self._sock_handed_over:
                self._sock.close()
            elif self._client is not None:
                # A transport owns the socket (or closed it itself after a failed handshake).
                self._client.abort()
        if self._audit_started and self.gateway.audit is not None:
            reason, sqlstate, message = (
                relay.end_reason if relay is not None else ("not started", None, None)
            )
            self.gateway.audit.session_ended(self.id, reason, sqlstate=sqlstate, message=message)
        if self._cancel_process_id is not None:
            self.gateway.cancels.unregister(self._cancel_process_id)
        if relay is not None and relay.cancel_upstream_on_close and self._backend is not None:
            # The backend may still be running the statement: ask it to stop.
            backend = self._backend
            with anyio.CancelScope(shield=True):
                try:
                    await upstream.send_cancel(
                        backend.settings, backend.process_id, backend.secret_key, time_limit=5.0
                    )
                except Exception as exc:
                    log.debug("session %s: cancel after termination failed: %s", self.id, exc)

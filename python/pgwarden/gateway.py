"""The state one gateway process shares between its sessions.

Settings, the client TLS context, the authenticator, cancel keys, the statement log, the event
hook, the identity runtime (when ``identity`` is configured: token authentication, role-change
guard, session deadlines), and the set of live sessions that shutdown drains.  The server
(``pgwarden.server``) builds one per worker process and hands it every accepted connection.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

import anyio

from pgwarden import errors, tls
from pgwarden.audit.trail import AuditTrail
from pgwarden.cancel import CancelForwarder, CancelRegistry
from pgwarden.client_auth import ClientAuthenticator, StaticPasswordAuthenticator
from pgwarden.config import Settings
from pgwarden.hooks import ClientEventHook, SessionObserver
from pgwarden.metrics import MetricsBoard, WorkerMetrics
from pgwarden.session import Session
from pgwarden.session_limits import SessionLedger
from pgwarden.statement_log import StatementLog

if TYPE_CHECKING:
    from pgwarden.identity.runtime import IdentityRuntime
    from pgwarden.policy.gate import PolicyGate
    from pgwarden.policy.mask_watch import MaskWatch

log = logging.getLogger(__name__)


class Gateway:
    """Per-process registry of sessions and the services they use."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_index: int = 0,
        cancel_forwarder: CancelForwarder | None = None,
        authenticator: ClientAuthenticator | None = None,
        client_event_hook: ClientEventHook | None = None,
        ledger: SessionLedger | None = None,
        metrics_board: MetricsBoard | None = None,
    ) -> None:
        self.settings = settings
        self.worker_index = worker_index
        # Sessions counted against max_client_connections / max_connections_per_identity:
        # shared with the other workers when the supervisor made it, else this process's.
        self.ledger = ledger if ledger is not None else SessionLedger.for_settings(settings)
        if self.ledger is not None:
            self.ledger.worker_index = worker_index
        # Figures for metrics_listen: on a board the supervisor shares, or this process's.
        board = metrics_board if metrics_board is not None else MetricsBoard.for_settings(settings)
        self.metrics = WorkerMetrics(board, self, worker_index) if board is not None else None
        self.server_tls: ssl.SSLContext | None = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            self.server_tls = tls.server_context(settings.tls_cert_file, settings.tls_key_file)
            with contextlib.suppress(ValueError):  # loaded above: only the description
                _, warning = tls.describe_certificate(settings.tls_cert_file)
                if warning is not None:
                    log.warning("%s", warning)
        self.cancel_forwarder = cancel_forwarder
        self.cancels = CancelRegistry(worker_index, cancel_forwarder)
        self.statement_log = (
            StatementLog(settings.statement_log) if settings.statement_log is not None else None
        )
        # With identity configured, tokens replace the static users, and role changes are
        # refused; with a statement policy, its checks come after that one.
        self.identity: IdentityRuntime | None = None
        self.session_observer: SessionObserver | None = None
        if settings.identity is not None and authenticator is None:
            from pgwarden.identity.runtime import IdentityRuntime  # (pglast, pyjwt: only here)

            self.identity = IdentityRuntime(
                settings,
                statement_log=self.statement_log,
                worker_index=worker_index,
                runtime_dir=cancel_forwarder.runtime_dir if cancel_forwarder else None,
            )
            authenticator = self.identity.authenticator
            self.session_observer = self.identity
        self.authenticator: ClientAuthenticator = authenticator or StaticPasswordAuthenticator(
            settings.users
        )
        self.policy: PolicyGate | None = None
        self.mask_watch: MaskWatch | None = None
        if settings.policy_file is not None and client_event_hook is None:
            from pgwarden.policy.gate import PolicyGate  # (pglast: only here)
            from pgwarden.policy.mask_watch import MaskWatch

            self.policy = PolicyGate(settings.policy_file)
            self.mask_watch = MaskWatch(self, settings.mask_recheck_seconds)
            client_event_hook = self._statement_gate(self.policy)
        elif self.identity is not None:
            client_event_hook = client_event_hook or self.identity.role_guard
        self.client_event_hook = client_event_hook
        self.audit: AuditTrail | None = None
        if settings.audit.directory is not None:
            self.audit = AuditTrail(settings, worker_index=worker_index)
        self.sessions: set[Session] = set()
        self.sessions_ended = 0  # sessions (or refused connections) that have ended
        self.draining = False
        self._sessions_changed = anyio.Event()

    def _statement_gate(self, policy: PolicyGate) -> ClientEventHook:
        """The policy's checks, after the identity's role-change guard when identity is on."""
        from pgwarden.statement_gate import StatementGate

        statement_checks = [policy.check_statement, policy.check_masking]
        function_checks = [policy.check_function_call, policy.check_masking_call]
        if self.identity is not None:
            from pgwarden.identity import role_guard

            statement_checks.insert(0, role_guard.check_statement)
            function_checks.insert(0, role_guard.check_function_call)
        return StatementGate(statement_checks, function_checks)

    def reload_tls(self) -> None:
        """SIGHUP: load ``tls_cert_file`` / ``tls_key_file`` again (a renewed certificate).
        Handshakes from now on use it; open sessions keep the one they were made with.  A
        pair that does not load leaves the current one in place."""
        cert_file, key_file = self.settings.tls_cert_file, self.settings.tls_key_file
        if cert_file is None or key_file is None:
            return
        try:
            context = tls.server_context(cert_file, key_file)
            described, warning = tls.describe_certificate(cert_file)
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.error(
                "TLS certificate %s not reloaded, clients keep getting the current one: %s",
                cert_file,
                exc,
            )
            return
        self.server_tls = context
        log.info("TLS certificate reloaded from %s: %s", cert_file, described)
        if warning is not None:
            log.warning("%s", warning)

    def reload_policy(self) -> None:
        """SIGHUP: read the statement policy again (kept as it is when the file is broken).
        Live sessions the new policy treats otherwise (other rules or masks apply to them)
        are ended: none goes on with statements prepared, or masks looked up, under the
        old one."""
        if self.policy is None:
            return
        previous = self.policy.reload()
        if previous is None:
            return
        version = self.policy.engine.version
        ended = 0
        for session in list(self.sessions):
            if self.policy.changed_for(session, previous):
                ended += 1
                session.terminate(
                    errors.ADMIN_SHUTDOWN,
                    f"terminating connection because the pgwarden policy for this session "
                    f"changed (version {previous.version} to {version}); connect again",
                )
        if ended:
            log.info("statement policy %s: ended %d session(s) it treats otherwise", version, ended)

    async def handle_connection(self, sock: socket.socket, client_address: str) -> None:
        """Run one session to its end; never raises (one session cannot hurt another)."""
        session = Session(self, sock, client_address)
        self.sessions.add(session)
        try:
            await session.run()
        except Exception:
            log.exception("session %s: unhandled error", session.id)
        finally:
            self.sessions.discard(session)
            self.sessions_ended += 1
            self._sessions_changed.set()

    def begin_drain(self) -> None:
        """Stop taking new work: idle sessions end now, busy ones when they become idle."""
        self.draining = True
        for session in list(self.sessions):
            session.request_drain()

    def terminate_all(self) -> None:
        for session in list(self.sessions):
            session.terminate(errors.ADMIN_SHUTDOWN, errors.ADMIN_SHUTDOWN_MESSAGE)

    def close(self) -> None:
        """Release what the process holds (the audit stream is closed cleanly)."""
        if self.audit is not None:
            self.audit.close()
            self.audit = None

    async def wait_sessions_closed(self) -> None:
        while self.sessions:
            self._sessions_changed = anyio.Event()
            await self._sessions_changed.wait()

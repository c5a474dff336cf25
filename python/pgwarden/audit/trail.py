"""The gateway side of the audit trail: one spool per process, records for each session.

:class:`AuditTrail` opens this process's stream in the spool (``_wire.AuditSpool``, the
Rust writer), hands every session codec what it needs to write its statements' records
itself, and writes the session records (start, end, refused connection) from Python, where
the session's identity is known.  In strict mode a record that cannot be stored refuses
what it was for: :meth:`refusal` names the SQLSTATE the client gets.

With ``fsync = "always"`` a statement must also wait for the fsync that covers its record:
:class:`SyncGate` lets the relay hold a session's outgoing bytes until the spool's sync
thread reports the sequence number reached (an eventfd the event loop watches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from pgwarden import __version__, _wire, errors
from pgwarden.audit import chain
from pgwarden.audit.records import DECISION, REFUSED, SESSION, SESSION_END, members
from pgwarden.audit.spool import AuditPaths, new_stream_id
from pgwarden.config import Settings

if TYPE_CHECKING:
    from pgwarden.client_auth import Identity

log = logging.getLogger(__name__)

#: The spool is at its bound: new statements and sessions are refused (class 53,
#: insufficient resources; 53400 is configuration_limit_exceeded).
SPOOL_FULL: Final = "53400"
#: The record could not be written at all (class 58, system error; 58030 is io_error).
SPOOL_IO_ERROR: Final = "58030"
SPOOL_FULL_MESSAGE: Final = (
    "audit spool is full: statements are refused until the audit backend accepts records again"
)
SPOOL_FULL_HINT: Final = (
    "pgwarden records every statement before it runs; the spool fills when the audit "
    "backend is unreachable. Try again later, or ask the operator to check the shipper."
)


def identity_fields(identity: Identity | None, fallback_user: str | None) -> dict[str, Any]:
    """The ``user`` object of a session record (name, id, roles, issuer, email)."""
    if identity is None:
        return {"name": fallback_user} if fallback_user else {}
    attributes = dict(getattr(identity, "attributes", {}) or {})
    user: dict[str, Any] = {"name": identity.name}
    for field, keys in (
        ("id", ("sub", "subject", "id")),
        ("issuer", ("iss", "issuer")),
        ("email", ("email",)),
        ("rule", ("rule",)),  # the identity rule that mapped the caller to its role
        ("grant", ("grant",)),  # the time-bound grant the session uses
    ):
        value = getattr(identity, field, None) or next(
            (attributes[k] for k in keys if attributes.get(k)), None
        )
        if value:
            user[field] = str(value)
    roles = list(getattr(identity, "roles", ()) or ())
    if roles:
        user["roles"] = [str(r) for r in roles]
    return user


class SyncGate:
    """Calls back once the spool's durable seq reaches a target (fsync = always)."""

    def __init__(self, spool: _wire.AuditSpool, loop: asyncio.AbstractEventLoop) -> None:
        fd = spool.notify_fd
        if fd is None:
            raise ValueError("the spool has no sync notifications (fsync is not 'always')")
        self._spool = spool
        self._fd = fd
        self._loop = loop
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()
        loop.add_reader(fd, self._synced)

    def synced_seq(self) -> int:
        return self._spool.synced_seq

    def written_seq(self) -> int:
        return self._spool.written_seq

    def wait(self, seq: int, callback: Callable[[], None]) -> None:
        """``callback()`` on the loop once everything up to ``seq`` is on disk."""
        if self._spool.synced_seq >= seq:
            callback()
            return
        self._waiting.append((seq, callback))

    def _synced(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._fd, 8)
        done = self._spool.synced_seq
        # Targets of different sessions arrive in any order: look at every waiter.
        ready = [callback for seq, callback in self._waiting if seq <= done]
        if not ready:
            return
        self._waiting = deque(w for w in self._waiting if w[0] > done)
        for callback in ready:
            try:
                callback()
            except Exception:
                log.exception("audit: releasing a statement after fsync failed")

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


class AuditTrail:
    """This process's audit stream, and the session records written into it."""

    def __init__(self, settings: Settings, *, worker_index: int = 0) -> None:
        audit = settings.audit
        if audit.directory is None:
            raise ValueError("audit.directory is not set")
        self.settings = settings
        self.paths = AuditPaths(audit.directory)
        self.strict = audit.mode == "strict"
        self.always_sync = audit.fsync == "always"
        key = chain.load_or_create_key(audit.chain_key_bytes(), audit.directory)
        self.paths.spool.mkdir(parents=True, exist_ok=True)
        os.chmod(audit.directory, 0o700)
        try:
            self.spool = self._open_spool(settings, worker_index, key)
        except _wire.AuditSpoolError as exc:
            raise OSError(f"audit spool in {self.paths.spool}: {exc}") from exc
        self._gate: SyncGate | None = None
        log.info(
            "audit: spool %s (mode %s, fsync %s, bound %d bytes)",
            self.spool.directory,
            audit.mode,
            audit.fsync,
            audit.max_spool_bytes,
        )

    def _open_spool(self, settings: Settings, worker_index: int, key: bytes) -> _wire.AuditSpool:
        audit = settings.audit
        return _wire.AuditSpool(
            str(self.paths.spool),
            new_stream_id(worker_index),
            key,
            segment_bytes=audit.segment_bytes,
            max_bytes=audit.max_spool_bytes,
            fsync=audit.fsync,
            fsync_interval_ms=audit.fsync_interval_ms,
            open_members=members(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "version": __version__,
                    "worker": worker_index,
                    "listen": f"{settings.listen_host}:{settings.listen_port}",
                }
            ),
        )

    # --- codec --------------------------------------------------------------------------

    def codec_options(self, session_id: str) -> dict[str, Any]:
        """Keyword arguments for ``_wire.SessionCodec`` so that it writes this session's
        statement records."""
        audit = self.settings.audit
        recording = audit.recording
        return {
            "audit": self.spool,
            "audit_session": session_id,
            "audit_params": audit.record_parameters,
            "audit_strict": self.strict,
            "capture_rows": audit.recording_max_rows if recording else 0,
            "capture_bytes": audit.recording_max_bytes if recording else 0,
        }

    def sync_gate(self) -> SyncGate | None:
        """The gate statements wait at (fsync = always), created on the running loop."""
        if not self.always_sync:
            return None
        if self._gate is None:
            self._gate = SyncGate(self.spool, asyncio.get_running_loop())
        return self._gate

    # --- session records ----------------------------------------------------------------

    def session_started(
        self,
        session_id: str,
        *,
        identity: Identity | None,
        client_address: str,
        database: str | None,
        upstream_user: str | None,
        application_name: str | None,
        tls: bool,
        policy_version: str | None = None,
    ) -> None:
        """Store the session record before the client is let in; refuse if it cannot be.
        ``policy_version``: the statement policy the session runs under (its statements
        without a ``decision`` record were allowed by it)."""
        upstream = self.settings.upstream
        fields = {
            "session": session_id,
            "client_address": client_address,
            "user": identity_fields(identity, None),
            "database": database,
            "upstream_user": upstream_user,
            "server_address": upstream.host,
            "server_port": upstream.port,
            "application_name": application_name or None,
            "tls": tls,
            "policy_version": policy_version,
        }
        self._append(SESSION, fields, new=True)

    def session_ended(
        self,
        session_id: str,
        reason: str,
        *,
        sqlstate: str | None = None,
        message: str | None = None,
    ) -> None:
        fields = {"session": session_id, "reason": reason, "sqlstate": sqlstate, "message": message}
        try:
            self._append(SESSION_END, fields, new=False)
        except errors.GatewayError as exc:
            log.error("audit: session %s end not recorded: %s", session_id, exc.message)

    def connection_refused(
        self,
        session_id: str,
        *,
        client_address: str,
        user: str | None,
        identity: Identity | None,
        database: str | None,
        sqlstate: str,
        message: str,
        stage: str,
        started_us: int | None = None,
    ) -> None:
        fields = {
            "session": session_id,
            "client_address": client_address,
            "user": identity_fields(identity, user),
            "database": database,
            "server_address": self.settings.upstream.host,
            "server_port": self.settings.upstream.port,
            "sqlstate": sqlstate,
            "message": message,
            "stage": stage,
            "started": started_us,
        }
        try:
            self._append(REFUSED, fields, new=False)
        except errors.GatewayError as exc:
            log.error("audit: refused connection %s not recorded: %s", session_id, exc.message)

    def statement_refused(
        self, session_id: str, n: int, *, rule: str | None, policy_version: str | None
    ) -> None:
        """The gateway refused statement ``n`` of the session (its ``stmt`` record is
        already stored): a ``decision`` record, whose verdict, rule and policy version the
        statement's span carries."""
        fields = {
            "session": session_id,
            "n": n,
            "decision": "deny",
            "rule": rule,
            "policy_version": policy_version,
        }
        try:
            self._append(DECISION, fields, new=False)
        except errors.GatewayError as exc:
            log.error("audit: decision on %s/%d not recorded: %s", session_id, n, exc.message)

    def _append(self, kind: str, fields: dict[str, Any], *, new: bool) -> None:
        try:
            self.spool.append(kind, members(fields), new=new)
        except (_wire.AuditSpoolError, ValueError) as exc:
            if self.strict or not new:
                raise self.refusal(exc) from exc
            log.error("audit: %s record dropped (relaxed mode): %s", kind, exc)

    @staticmethod
    def refusal(exc: BaseException) -> errors.GatewayError:
        """The error a client gets when its statement or session cannot be recorded."""
        if isinstance(exc, _wire.AuditSpoolFull):
            return errors.GatewayError(SPOOL_FULL, SPOOL_FULL_MESSAGE, hint=SPOOL_FULL_HINT)
        return errors.GatewayError(
            SPOOL_IO_ERROR,
            "audit record could not be written: statements are refused until it can",
            detail=str(exc),
        )

    def close(self) -> None:
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        try:
            self.spool.close()
        except _wire.AuditSpoolError as exc:
            log.error("audit: closing the spool: %s", exc)

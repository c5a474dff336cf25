"""Identity in one gateway process: the authenticator, the guard, the timers, the services.

:class:`IdentityRuntime` is built by the gateway when ``identity`` is configured.  It gives
the gateway

* ``authenticator`` -- :class:`~pgwarden.identity.authenticator.OidcAuthenticator`;
* ``role_guard`` -- the client event hook refusing role changes;
* the session observer calls (``session_started`` / ``session_refused`` /
  ``session_ended``): connection events and the expiry timers;
* ``run`` -- the process's identity services: the grants file watcher, the admin socket,
  and loading every issuer's keys before the first connection needs them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from pgwarden.cancel import default_runtime_dir
from pgwarden.client_auth import AuthError
from pgwarden.config import IdentitySettings, Settings
from pgwarden.errors import GatewayError
from pgwarden.identity import admin
from pgwarden.identity.authenticator import OidcAuthenticator
from pgwarden.identity.connection_events import ACCEPTED, ENDED, REFUSED, ConnectionEvents
from pgwarden.identity.deadlines import SessionDeadlines
from pgwarden.identity.discovery import DiscoveryError, check_endpoint_url
from pgwarden.identity.grants import GrantFileError, GrantStore, GrantTable, iso
from pgwarden.identity.role_guard import RoleChangeGuard
from pgwarden.identity.tokens import TokenValidator
from pgwarden.statement_log import StatementLog

if TYPE_CHECKING:
    from pgwarden.session import Session

log = logging.getLogger(__name__)


def check_identity_settings(identity: IdentitySettings) -> str | None:
    """Problems found at start-up rather than at the first connection (None: all good)."""
    for role in identity.roles:
        try:
            role.resolved_password()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            return f"invalid setting identity.roles ({role.name}): cannot read the password: {exc}"
    for issuer in identity.issuers:
        try:
            issuer.resolved_hs_secret()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            return f"invalid setting identity.issuers ({issuer.issuer}): hs_secret_file: {exc}"
        for url in (issuer.issuer, issuer.discovery_url, issuer.jwks_uri):
            try:
                if url is not None:
                    check_endpoint_url(url)
            except DiscoveryError as exc:
                return f"invalid setting identity.issuers: {exc}"
        if issuer.ca_file is not None and not issuer.ca_file.is_file():
            return (
                f"invalid setting identity.issuers ({issuer.issuer}): no such file {issuer.ca_file}"
            )
    return None


def admin_dir(settings: Settings, runtime_dir: Path | None = None) -> Path | None:
    """Where the admin sockets live; None when no stable place is known (port 0).

    ``identity.admin_dir``, else ``runtime_dir`` (the setting, or the directory a worker
    supervisor chose), else /tmp/pgwarden-<uid>-<port>.
    """
    identity = settings.identity
    if identity is not None and identity.admin_dir is not None:
        return identity.admin_dir
    if settings.runtime_dir is not None:
        return settings.runtime_dir
    if runtime_dir is not None:
        return runtime_dir
    if settings.listen_port == 0:
        return None
    return default_runtime_dir(settings.listen_port)


class IdentityRuntime:
    """Everything identity needs in one gateway process."""

    def __init__(
        self,
        settings: Settings,
        *,
        statement_log: StatementLog | None,
        worker_index: int = 0,
        runtime_dir: Path | None = None,
    ) -> None:
        assert settings.identity is not None
        self.settings = settings
        self.identity_settings = settings.identity
        self.worker_index = worker_index
        self.admin_dir = admin_dir(settings, runtime_dir)
        self.events = ConnectionEvents(statement_log)
        self.grants = GrantTable()
        grants_file = settings.identity.grants_file
        self.grant_store = GrantStore(grants_file) if grants_file is not None else None
        self._grants_signature: tuple[int, int, int] | None = None
        self._reload_lock = anyio.Lock()  # the poll and an admin request, one at a time
        self.validator = TokenValidator(settings.identity)
        self.authenticator = OidcAuthenticator(
            settings, validator=self.validator, grants=self.grants, events=self.events
        )
        self.deadlines = SessionDeadlines(grace_seconds=settings.identity.expiry_grace_seconds)
        self.role_guard = RoleChangeGuard()

    # --- session observer ------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        """The upstream login succeeded and the relay runs: the connection is accepted."""
        identity = session.identity
        if identity is None or identity.upstream_user is None:
            return
        self.deadlines.track(session, self.grants)
        attributes = identity.attributes
        self.events.emit(
            ACCEPTED,
            session=session.id,
            client_addr=session.client_address,
            tls=session.startup.tls if session.startup is not None else None,
            user=session.startup.user if session.startup is not None else None,
            database=session.database,
            issuer=attributes.get("issuer"),
            subject=attributes.get("subject"),
            name=identity.name,
            email=attributes.get("email"),
            groups=list(identity.roles),
            role=session.upstream_user,
            rule=attributes.get("rule"),
            grant=identity.grant,
            expires_at=iso(identity.expires_at) if identity.expires_at is not None else None,
            withheld_params=sorted(identity.withheld_params) or None,
        )

    def session_refused(self, session: Session, error: GatewayError) -> None:
        """A connection refused outside the authenticator (which records its own refusals).

        Before authentication: TLS required, an invalid startup packet, ...; after it: the
        upstream server refused the login.
        """
        if isinstance(error.__cause__, AuthError):
            return  # the authenticator's connection.refused event has the details
        identity = session.identity
        startup = session.startup
        if identity is None:
            self.events.emit(
                REFUSED,
                session=session.id,
                client_addr=session.client_address,
                tls=startup.tls if startup is not None else None,
                user=startup.user if startup is not None else None,
                database=startup.database if startup is not None else None,
                reason="startup",
                sqlstate=error.sqlstate,
                message=error.message,
            )
            return
        self.events.emit(
            REFUSED,
            session=session.id,
            client_addr=session.client_address,
            tls=startup.tls if startup is not None else None,
            user=startup.user if startup is not None else None,
            database=session.database,
            issuer=identity.attributes.get("issuer"),
            subject=identity.attributes.get("subject"),
            role=identity.upstream_user,
            reason="upstream_login",
            sqlstate=error.sqlstate,
            message=error.message,
        )

    def session_ended(self, session: Session) -> None:
        identity = session.identity
        if identity is None or identity.upstream_user is None:
            return
        ended_because = self.deadlines.untrack(session)
        self.events.emit(
            ENDED,
            session=session.id,
            client_addr=session.client_address,
            issuer=identity.attributes.get("issuer"),
            subject=identity.attributes.get("subject"),
            role=session.upstream_user,
            grant=identity.grant,
            reason=ended_because or "closed",
        )

    # --- grants --------------------------------------------------------------------------

    async def reload_grants(self, *, force: bool = False) -> int:
        """Re-read the grants file if it changed; returns how many sessions that ended."""
        store = self.grant_store
        if store is None:
            return 0
        async with self._reload_lock:
            return await self._reload(store, force=force)

    async def _reload(self, store: GrantStore, *, force: bool) -> int:
        signature = await anyio.to_thread.run_sync(store.signature)
        if signature == self._grants_signature and not force:
            return 0
        try:
            grants = await anyio.to_thread.run_sync(store.load)
        except GrantFileError as exc:
            # Keep the grants known so far: an unreadable file must not revoke them all, and
            # must not grant anything either.
            log.error("grants file %s: %s", store.path, exc)
            return 0
        self._grants_signature = signature
        configured = {role.name for role in self.identity_settings.roles}
        usable = []
        for grant in grants:
            if grant.role in configured:
                usable.append(grant)
            else:
                log.warning("grant %s names role %r, not in identity.roles", grant.id, grant.role)
        self.grants.replace(usable)
        ended = self.deadlines.grants_changed(self.grants)
        log.info("grants loaded: %d active; %d session(s) ended", len(usable), ended)
        return ended

    async def _watch_grants(self) -> None:
        interval = self.identity_settings.grants_poll_seconds
        while True:
            await anyio.sleep(interval)
            await self.reload_grants()
            # Grants that ran out meanwhile are ended by the session timers.

    async def _admin_request(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "reload":
            ended = await self.reload_grants(force=True)
            return {"ok": True, "grants": len(self.grants), "sessions_ended": ended}
        if op == "sessions":
            now = time.time()
            sessions = []
            for session in self.deadlines.sessions():
                identity = session.identity
                if identity is None:
                    continue
                sessions.append(
                    {
                        "session": session.id,
                        "name": identity.name,
                        "subject": identity.attributes.get("subject"),
                        "role": session.upstream_user,
                        "grant": identity.grant,
                        "client_addr": session.client_address,
                        "expires_in_seconds": round((identity.expires_at or now) - now, 1),
                    }
                )
            return {"ok": True, "worker": self.worker_index, "sessions": sessions}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # --- services --------------------------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Grants, admin socket, key prefetch; ready once the grants are loaded."""
        await self.reload_grants(force=True)
        async with anyio.create_task_group() as services:
            directory = self.admin_dir
            if directory is not None:
                server = admin.AdminServer(
                    admin.socket_path(directory, self.worker_index), self._admin_request
                )
                try:
                    await services.start(server.serve)
                except OSError as exc:
                    log.error("admin socket unavailable (%s): grants apply at the next poll", exc)
            if self.grant_store is not None:
                services.start_soon(self._watch_grants)
            for cache in self.validator.key_caches.values():
                services.start_soon(cache.prefetch)
            task_status.started()

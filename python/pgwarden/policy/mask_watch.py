"""Keeps open sessions' masks in step with the catalog.

A session's masked columns are found by OID when it starts (:mod:`mask_catalog`).
Relations created later are not among them: a new partition or inheritance child of a
masked table, a view over a masked column, or a masked table dropped and created again
(or swapped in by a rename) by a migration.  Selected directly, their columns would reach
the session unmasked.

So every ``mask_recheck_seconds`` the gateway looks the masked columns up again for the
masks of each open masked session, per database, on one connection of its own (logged in
as the role of one of those sessions: the lookup reads only the catalog), and ends each
session whose lookup came out otherwise (FATAL 57P01, "connect again"): the next session
starts with the new lookup, which also replaces the one shared by sessions starting now.
When only the functions defined in the database changed, the session's statement checks
take the new list and the session goes on (its rows are masked as before).
A failed lookup is logged and tried again at the next round; the sessions go on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import anyio
from anyio.abc import TaskStatus

from pgwarden import errors, upstream
from pgwarden.errors import GatewayError
from pgwarden.policy.mask_catalog import Masked, SessionMasks, resolve
from pgwarden.policy.names import quote_name
from pgwarden.policy.rules import Mask

if TYPE_CHECKING:
    from pgwarden.gateway import Gateway
    from pgwarden.session import Session

log = logging.getLogger(__name__)

_MESSAGE_LIMIT: Final = 16 << 20
#: How the lookup connection shows in pg_stat_activity.
APPLICATION_NAME: Final = "pgwarden (mask recheck)"
#: Relations named in the message of a session ended for a change, at most.
_NAMES_SHOWN: Final = 3


#: What a session's lookup depends on: its database and the masks applying to it.
MaskKey = tuple[str, tuple[Mask, ...]]


def fingerprint(found: SessionMasks) -> tuple[frozenset[tuple[int, int, str]], object]:
    """What makes two lookups the same for a session: the masked (OID, attribute, name)
    and the relations its statement checks know (tables, views)."""
    return frozenset((oid, attnum, name) for oid, attnum, _, name, _ in found.columns), found.scope


def changed_names(before: SessionMasks, now: SessionMasks) -> list[str]:
    """The masked columns (or views) that differ between two lookups, for the message."""
    old = {(oid, name) for oid, _, _, name, _ in before.columns}
    new = {(oid, name) for oid, _, _, name, _ in now.columns}
    names = sorted({name for _, name in old ^ new})
    views = sorted(
        f"{quote_name(s)}.{quote_name(v)}" for s, v in now.scope.views ^ before.scope.views
    )
    return names + views


class MaskWatch:
    """The round of lookups, run as a service of the gateway while it serves."""

    def __init__(self, gateway: Gateway, interval: float) -> None:
        self.gateway = gateway
        self.interval = interval
        self._connections: dict[str, upstream.UpstreamConnection] = {}
        self._failing: set[str] = set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await anyio.sleep(self.interval)
                await self.check()
        finally:
            for conn in self._connections.values():
                conn.stream.abort()
            self._connections.clear()

    async def check(self) -> None:
        """One round: a lookup per (database, masks) of the open masked sessions."""
        by_key: dict[MaskKey, list[Session]] = {}
        for session in list(self.gateway.sessions):
            key = session.mask_key
            if key is not None and session.mask_lookup is not None:
                by_key.setdefault(key, []).append(session)
        for database in set(self._connections) - {database for database, _ in by_key}:
            self._connections.pop(database).stream.abort()
        for key, sessions in by_key.items():
            found = await self._lookup(key, sessions)
            if found is not None:
                self._settle(key, sessions, found)

    async def _lookup(self, key: MaskKey, sessions: Sequence[Session]) -> SessionMasks | None:
        database, masks = key
        policy = self.gateway.policy
        if policy is None:
            return None
        try:
            found = await self._resolve(database, masks, sessions, policy.kept(database, masks))
        except Exception as exc:  # a failed round must not stop the gateway
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            # Once per spell of failures, not every round.
            level = logging.DEBUG if database in self._failing else logging.WARNING
            self._failing.add(database)
            log.log(
                level,
                "masked columns of database %s cannot be looked up again (%s); open "
                "sessions keep their lookup, the next round tries again",
                database,
                reason,
            )
            return None
        if database in self._failing:
            self._failing.discard(database)
            log.info("masked columns of database %s looked up again", database)
        policy.remember_lookup(database, masks, found)
        return found

    async def _resolve(
        self,
        database: str,
        masks: tuple[Mask, ...],
        sessions: Sequence[Session],
        kept: Sequence[Masked],
    ) -> SessionMasks:
        """The lookup on the database's connection; a connection that has gone (a server
        restart, ``idle_session_timeout``) is replaced once."""
        timeout = self.gateway.settings.upstream.connect_timeout_seconds
        open_conn = self._connections.pop(database, None)
        if open_conn is not None:
            try:
                with anyio.fail_after(timeout):
                    found = await resolve(open_conn.stream, masks, kept)
            except Exception:
                open_conn.stream.abort()
            else:
                self._connections[database] = open_conn
                return found
        with anyio.fail_after(timeout):
            conn = await upstream.login(
                self.gateway.settings.upstream, _login_of(sessions), max_message_len=_MESSAGE_LIMIT
            )
            try:
                found = await resolve(conn.stream, masks, kept)
            except BaseException:
                conn.stream.abort()
                raise
        self._connections[database] = conn
        return found

    def _settle(self, key: MaskKey, sessions: Iterable[Session], found: SessionMasks) -> None:
        now = fingerprint(found)
        for session in sessions:
            before = session.mask_lookup
            if before is None or session.mask_key != key or fingerprint(before) == now:
                continue
            if fingerprint(before)[0] == now[0] and before.scope.same_relations(found.scope):
                # Only functions came or went: the statement checks take the new list
                # (the rows' masking is unchanged), the session goes on.
                session.mask_lookup = found
                continue
            names = changed_names(before, found)
            shown = ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")
            log.info("session %s: masked relations changed (%s); ending it", session.id, shown)
            session.terminate(
                errors.ADMIN_SHUTDOWN,
                "terminating connection because the relations masked for this session "
                f"changed ({shown or 'views'}); connect again",
            )


def _login_of(sessions: Sequence[Session]) -> upstream.UpstreamLogin:
    for session in sessions:
        if session.mask_login is not None:
            return replace(session.mask_login, params=[("application_name", APPLICATION_NAME)])
    raise GatewayError(errors.CONNECTION_FAILURE, "no session holds a login for the lookup")

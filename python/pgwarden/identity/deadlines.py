"""Ending sessions on time: at token expiry, at a grant's end, and when a grant is revoked.

A session authenticated by token carries a deadline (``Identity.expires_at``: the token's
``exp`` plus the issuer's leeway, or the end of the grant it uses if that comes first).  At
the deadline the session ends with FATAL 57P01 (admin_shutdown, the code PostgreSQL uses when
an administrator terminates a backend; clients treat it as "reconnect"), and the message says
why.  A statement that is running then gets ``identity.expiry_grace_seconds`` to finish (the
session ends as soon as it does); after that it is cancelled and the session ends anyway.
A revoked grant ends the sessions that use it at once, running statement or not.

One timer per session (``loop.call_later``), no task and no polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pgwarden import errors
from pgwarden.identity.grants import Grant, GrantTable, iso

if TYPE_CHECKING:
    from pgwarden.session import Session

log = logging.getLogger(__name__)

TERMINATION_SQLSTATE: Final = errors.ADMIN_SHUTDOWN


@dataclass(slots=True)
class _Tracked:
    deadline: float
    cause: str  # "token_expired" | "grant_expired"
    message: str
    timer: asyncio.TimerHandle | None = None
    ended_because: str | None = None


def token_expired_message(expires_at: float) -> str:
    return (
        f"terminating connection because the access token expired at {iso(expires_at)}: "
        "reconnect with a new token"
    )


def grant_expired_message(grant: Grant) -> str:
    return (
        f"terminating connection because grant {grant.id} for role {grant.role!r} "
        f"expired at {iso(grant.expires_at)}"
    )


def grant_revoked_message(grant_id: str) -> str:
    return f"terminating connection because grant {grant_id} was revoked"


class SessionDeadlines:
    """The timers that end token-authenticated sessions."""

    def __init__(self, *, grace_seconds: float) -> None:
        self._grace_seconds = grace_seconds
        self._tracked: dict[Session, _Tracked] = {}

    def __len__(self) -> int:
        return len(self._tracked)

    def sessions(self) -> list[Session]:
        return list(self._tracked)

    def track(self, session: Session, grants: GrantTable) -> None:
        identity = session.identity
        if identity is None or identity.expires_at is None:
            return
        tracked = _Tracked(
            deadline=identity.expires_at,
            cause="token_expired",
            message=token_expired_message(identity.expires_at),
        )
        grant = grants.get(identity.grant) if identity.grant is not None else None
        if grant is not None and grant.expires_at <= tracked.deadline:
            tracked.deadline = grant.expires_at
            tracked.cause = "grant_expired"
            tracked.message = grant_expired_message(grant)
        self._tracked[session] = tracked
        self._schedule(session, tracked)

    def untrack(self, session: Session) -> str | None:
        """Forget the session; returns why the gateway ended it, if it did."""
        tracked = self._tracked.pop(session, None)
        if tracked is None:
            return None
        if tracked.timer is not None:
            tracked.timer.cancel()
        return tracked.ended_because

    def grants_changed(self, grants: GrantTable) -> int:
        """Apply a new grant set: end sessions whose grant is gone, move earlier deadlines."""
        ended = 0
        now = time.time()
        for session, tracked in list(self._tracked.items()):
            grant_id = session.identity.grant if session.identity is not None else None
            if grant_id is None or tracked.ended_because is not None:
                continue
            grant = grants.get(grant_id)
            if grant is None or not grant.active(now):
                log.info("session %s: grant %s revoked: ending the session", session.id, grant_id)
                tracked.ended_because = "grant_revoked"
                if tracked.timer is not None:
                    tracked.timer.cancel()
                session.terminate(TERMINATION_SQLSTATE, grant_revoked_message(grant_id))
                ended += 1
            elif grant.expires_at < tracked.deadline:
                tracked.deadline = grant.expires_at
                tracked.cause = "grant_expired"
                tracked.message = grant_expired_message(grant)
                self._schedule(session, tracked)
        return ended

    def _schedule(self, session: Session, tracked: _Tracked) -> None:
        if tracked.timer is not None:
            tracked.timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, tracked.deadline - time.time())
        tracked.timer = loop.call_later(delay, self._deadline_reached, session)

    def _deadline_reached(self, session: Session) -> None:
        tracked = self._tracked.get(session)
        if tracked is None:
            return
        log.info("session %s: %s: ending the session", session.id, tracked.cause)
        tracked.ended_because = tracked.cause
        # Now if no statement runs, else when it finishes; in any case within the grace.
        session.end_after_statement(TERMINATION_SQLSTATE, tracked.message)
        loop = asyncio.get_running_loop()
        tracked.timer = loop.call_later(
            self._grace_seconds, session.terminate, TERMINATION_SQLSTATE, tracked.message
        )

"""Who the client is: the pluggable client authenticator and the static password one.

A session hands an :class:`AuthRequest` to the configured :class:`ClientAuthenticator` and gets
an :class:`Identity` back, or an :class:`AuthError` that becomes the client's FATAL
ErrorResponse.  The authenticator never touches the wire: it asks for the password through
``request.ask_password()``, which sends AuthenticationCleartextPassword and reads the answer.
Token (OIDC) authenticators plug in here with the same shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from pgwarden import errors
from pgwarden.config import StaticUser


@dataclass(frozen=True, slots=True)
class Identity:
    """The authenticated caller, and the PostgreSQL login the gateway should make for it.

    ``upstream_user`` / ``upstream_database`` of None mean "use the gateway's configured
    default" (``upstream.user``; ``upstream.database`` or the database the client asked for).
    When ``upstream_user`` is set, ``upstream_password`` is that role's credential (None: the
    server asks for none); it is kept out of ``repr`` so it never reaches a log.
    ``expires_at`` (Unix time) is when the session must end (token or grant expiry);
    ``grant`` names the time-bound grant the session uses, if any.  ``withheld_params`` are
    startup parameters (lower-case names) that must not reach the upstream server.
    """

    name: str
    upstream_user: str | None = None
    upstream_database: str | None = None
    roles: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    upstream_password: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    grant: str | None = None
    withheld_params: frozenset[str] = frozenset()
    #: Sessions this identity may hold open at once (its mapping rule's ``max_connections``).
    max_connections: int | None = None


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """What a client presented before authentication, plus a way to ask it for a secret."""

    user: str
    database: str
    client_address: str
    tls: bool
    params: Mapping[str, str]
    ask_password: Callable[[], Awaitable[str]]
    session_id: str = ""


class AuthError(Exception):
    """Authentication refused; ``sqlstate`` and ``message`` go to the client as FATAL."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message


class ClientAuthenticator(Protocol):
    """Decides who a connecting client is."""

    async def authenticate(self, request: AuthRequest) -> Identity:
        """Return the caller's identity or raise :class:`AuthError`."""
        ...


def password_failed(user: str) -> AuthError:
    """PostgreSQL's message for a wrong password; the same for an unknown user (no oracle)."""
    return AuthError(errors.INVALID_PASSWORD, f'password authentication failed for user "{user}"')


class StaticPasswordAuthenticator:
    """Accepts the logins listed in ``settings.users`` (development and tests).

    Compares in constant time, and runs the comparison for unknown users as well so that
    response timing does not reveal which user names exist.
    """

    def __init__(self, users: list[StaticUser]) -> None:
        self._passwords = {u.name: u.password.get_secret_value().encode() for u in users}

    async def authenticate(self, request: AuthRequest) -> Identity:
        presented = (await request.ask_password()).encode()
        expected = self._passwords.get(request.user)
        if expected is None:
            hmac.compare_digest(presented, presented)
            raise password_failed(request.user)
        if not hmac.compare_digest(presented, expected):
            raise password_failed(request.user)
        return Identity(name=request.user)

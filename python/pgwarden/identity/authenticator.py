""":class:`OidcAuthenticator`: the password is a token; the identity gets a role by policy.

For each connection (``ClientAuthenticator.authenticate``):

1. a token travels as a cleartext password, so outside TLS the client is refused before it is
   even asked for one, unless ``identity.allow_plaintext_password`` (development) says so;
2. AuthenticationCleartextPassword, then :class:`~pgwarden.identity.tokens.TokenValidator`;
3. the startup ``user`` is checked as ``identity.user_field`` says (ignored, equal to the
   token's sub or email, or naming the role to use);
4. :class:`~pgwarden.identity.mapping.RoleMapper` picks the role and checks the database;
5. protected startup parameters are refused or withheld;
6. the :class:`~pgwarden.client_auth.Identity` carries the role, the gateway-held credential
   for it, the session deadline (token ``exp`` plus leeway, or the grant's end if sooner) and
   the grant used.

Refusals are FATAL 28P01 (the token does not authenticate) or 28000 (it does, but this login
is not allowed), 42501 for a refused startup parameter, each recorded as a
``connection.refused`` event.  Acceptance is recorded once the upstream login succeeded.
"""

from __future__ import annotations

import logging
import time

from pgwarden import errors
from pgwarden.client_auth import AuthError, AuthRequest, Identity
from pgwarden.config import Settings
from pgwarden.identity.claims import TokenIdentity
from pgwarden.identity.connection_events import REFUSED, ConnectionEvents
from pgwarden.identity.grants import GrantTable
from pgwarden.identity.mapping import MappingRefused, RoleMapper
from pgwarden.identity.startup_policy import StartupParameterRefused, withheld_parameters
from pgwarden.identity.tokens import TokenRejected, TokenValidator

log = logging.getLogger(__name__)

TLS_REQUIRED_MESSAGE = "a token is accepted only over TLS"
TLS_REQUIRED_HINT = "Connect with sslmode=require (or stronger)."


class LoginRefused(Exception):
    """A refusal decided here (not by the token or the rules): TLS, user name, credential."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.sqlstate = errors.INVALID_AUTHORIZATION_SPECIFICATION


Refusal = TokenRejected | MappingRefused | StartupParameterRefused | LoginRefused


class OidcAuthenticator:
    """Authenticates clients by OIDC token and maps them to an upstream role."""

    def __init__(
        self,
        settings: Settings,
        *,
        validator: TokenValidator,
        grants: GrantTable,
        events: ConnectionEvents,
    ) -> None:
        assert settings.identity is not None
        self._settings = settings
        self._identity = settings.identity
        self.validator = validator
        self._mapper = RoleMapper(self._identity.rules)
        self._grants = grants
        self._events = events
        # Read once at start-up: no file or environment access on the connection path.
        self._credentials = {role.name: role.resolved_password() for role in self._identity.roles}

    async def authenticate(self, request: AuthRequest) -> Identity:
        who: TokenIdentity | None = None
        try:
            if not request.tls and not self._identity.allow_plaintext_password:
                raise LoginRefused(
                    "tls_required",
                    "a token is accepted only over TLS: connect with sslmode=require (or stronger)",
                )
            token = (await request.ask_password()).strip()
            validated = await self.validator.validate(token)
            who = TokenIdentity.from_claims(
                validated.issuer, validated.claims, validated.expires_at
            )
            return self._map(request, who)
        except (TokenRejected, MappingRefused, StartupParameterRefused, LoginRefused) as exc:
            self._refused(request, exc, who)
            raise AuthError(exc.sqlstate, exc.message) from None

    def _map(self, request: AuthRequest, who: TokenIdentity) -> Identity:
        requested_role: str | None = None
        mode = self._identity.user_field
        if mode == "role":
            requested_role = request.user
        elif mode == "identity":
            email = who.email.lower() if who.email else None
            if request.user != who.subject and request.user.lower() != email:
                raise LoginRefused(
                    "user_mismatch",
                    f"user name {request.user!r} does not match the token: "
                    "use the token's subject or email as the user name",
                )
        database = self._settings.upstream.database or request.database
        decision = self._mapper.decide(
            who,
            database=database,
            requested_role=requested_role,
            grants=self._grants.for_identity(who.issuer, who.subject, time.time()),
        )
        withheld = withheld_parameters(request.params, self._identity)
        if decision.role not in self._credentials:
            # A grant for a role without a configured credential: refuse, never guess one.
            log.warning("role %r has no entry in identity.roles", decision.role)
            raise LoginRefused(
                "role_not_configured", f"role {decision.role!r} is not configured on the gateway"
            )
        expires_at = who.expires_at
        grant_id: str | None = None
        if decision.grant is not None:
            grant_id = decision.grant.id
            expires_at = min(expires_at, decision.grant.expires_at)
        attributes = {"issuer": who.issuer, "subject": who.subject, "role": decision.role}
        if who.email:
            attributes["email"] = who.email
        if decision.rule is not None:
            attributes["rule"] = decision.rule
        if grant_id is not None:
            attributes["grant"] = grant_id
        if withheld:
            attributes["withheld_params"] = ",".join(sorted(withheld))
        return Identity(
            name=who.display,
            upstream_user=decision.role,
            upstream_database=decision.database,
            roles=who.groups,
            attributes=attributes,
            upstream_password=self._credentials[decision.role],
            expires_at=expires_at,
            grant=grant_id,
            withheld_params=withheld,
            max_connections=decision.max_connections,
        )

    def _refused(self, request: AuthRequest, exc: Refusal, who: TokenIdentity | None) -> None:
        issuer = who.issuer if who is not None else getattr(exc, "issuer", None)
        self._events.emit(
            REFUSED,
            session=request.session_id or None,
            client_addr=request.client_address,
            tls=request.tls,
            user=request.user,
            database=request.database,
            issuer=issuer,
            subject=who.subject if who is not None else None,
            name=who.name if who is not None else None,
            email=who.email if who is not None else None,
            groups=list(who.groups) if who is not None else None,
            rule=getattr(exc, "rule", None),
            reason=exc.reason,
            sqlstate=exc.sqlstate,
            message=exc.message,
        )
        log.info(
            "session %s: refused %s from %s: %s",
            request.session_id,
            who.display if who is not None else "unauthenticated client",
            request.client_address,
            exc.reason,
        )

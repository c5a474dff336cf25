"""Who a validated token says the caller is: issuer, subject, display name, email, groups."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgwarden.config import IssuerSettings


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at ``path``: a top-level claim of that exact name, else a dotted walk.

    ``realm_access.roles`` reads ``claims["realm_access"]["roles"]``; a claim whose name itself
    contains dots (``https://example.com/groups``) is found by its full name first.
    """
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _as_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _as_groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value if isinstance(v, str | int) and str(v))
    return ()


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """The caller as a validated token describes it."""

    issuer: str
    subject: str
    name: str | None
    email: str | None
    groups: tuple[str, ...]
    expires_at: float
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def display(self) -> str:
        """A name for logs and statement records: email, else display name, else subject."""
        return self.email or self.name or self.subject

    @classmethod
    def from_claims(
        cls, issuer: IssuerSettings, claims: Mapping[str, Any], expires_at: float
    ) -> TokenIdentity:
        groups = _as_groups(claim_at(claims, issuer.groups_claim)) if issuer.groups_claim else ()
        return cls(
            issuer=issuer.issuer,
            subject=str(claims["sub"]),
            name=_as_text(claim_at(claims, issuer.name_claim))
            or _as_text(claims.get("preferred_username")),
            email=_as_text(claim_at(claims, issuer.email_claim)),
            groups=groups,
            expires_at=expires_at,
            claims=dict(claims),
        )

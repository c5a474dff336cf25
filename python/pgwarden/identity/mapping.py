"""Role mapping: which PostgreSQL role, and which databases, an identity gets.

Rules are tried in order and the first whose conditions all hold decides (first match
wins): a ``deny`` rule refuses, an ``allow`` rule offers its roles.  Active time-bound grants
of the identity add their roles in front (a grant is an explicit, temporary decision for this
very identity).  When no rule matches and no grant applies, the identity is refused: the
default is deny, always.

Conditions use shell-style patterns (``*``, ``?``, ``[...]``; ``fnmatch`` semantics, where
``*`` also matches ``/`` and ``:``), case-sensitive except for email addresses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pgwarden import errors
from pgwarden.config import RoleRule
from pgwarden.identity.claims import TokenIdentity, claim_at
from pgwarden.identity.grants import Grant


class MappingRefused(Exception):
    """The identity may not log in as asked; ``message`` is for the client (FATAL 28000)."""

    def __init__(self, reason: str, message: str, *, rule: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.rule = rule
        self.sqlstate = errors.INVALID_AUTHORIZATION_SPECIFICATION


@dataclass(frozen=True, slots=True)
class RoleDecision:
    """The role the session logs in as, and why."""

    role: str
    database: str
    rule: str | None  # name (or index) of the rule that allowed it
    grant: Grant | None  # the grant that allowed it
    max_connections: int | None = None  # the matching rule's limit on open sessions


def _any_match(value: str | None, patterns: Sequence[str], *, fold: bool = False) -> bool:
    if value is None:
        return False
    if fold:
        value = value.lower()
        return any(fnmatchcase(value, p.lower()) for p in patterns)
    return any(fnmatchcase(value, p) for p in patterns)


def _claim_matches(value: object, patterns: str | list[str]) -> bool:
    accepted = [patterns] if isinstance(patterns, str) else patterns
    values = value if isinstance(value, list) else [value]
    return any(
        isinstance(v, str | int | bool) and _any_match(_claim_text(v), accepted) for v in values
    )


def _claim_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def rule_matches(rule: RoleRule, who: TokenIdentity) -> bool:
    if rule.issuer is not None and rule.issuer != who.issuer:
        return False
    if rule.subjects and not _any_match(who.subject, rule.subjects):
        return False
    if rule.emails and not _any_match(who.email, rule.emails, fold=True):
        return False
    if rule.groups and not set(rule.groups).intersection(who.groups):
        return False
    return all(
        _claim_matches(claim_at(who.claims, path), patterns)
        for path, patterns in rule.claims.items()
    )


def _allows_database(patterns: Sequence[str], database: str) -> bool:
    return any(fnmatchcase(database, p) for p in patterns)


class RoleMapper:
    """Applies the configured rules (and the identity's grants) to an identity."""

    def __init__(self, rules: Sequence[RoleRule]) -> None:
        self._rules = [(rule.name or f"rules[{i}]", rule) for i, rule in enumerate(rules)]

    def first_match(self, who: TokenIdentity) -> tuple[str, RoleRule] | None:
        for name, rule in self._rules:
            if rule_matches(rule, who):
                return name, rule
        return None

    def decide(
        self,
        who: TokenIdentity,
        *,
        database: str,
        requested_role: str | None,
        grants: Sequence[Grant],
    ) -> RoleDecision:
        """The role for this login; raise :class:`MappingRefused` when there is none."""
        matched = self.first_match(who)
        if matched is not None and matched[1].action == "deny":
            raise MappingRefused(
                "denied_by_rule",
                f"access denied by rule {matched[0]!r}",
                rule=matched[0],
            )
        # (role, databases, rule name, grant), in order of preference.
        offers: list[tuple[str, Sequence[str], str | None, Grant | None]] = [
            (g.role, g.databases, None, g) for g in grants
        ]
        if matched is not None:
            name, rule = matched
            offers += [(role, rule.databases, name, None) for role in rule.roles]
        if not offers:
            raise MappingRefused(
                "no_rule",
                "no role mapping rule matches this identity (default deny)",
            )
        if requested_role is not None:
            offers = [offer for offer in offers if offer[0] == requested_role]
            if not offers:
                raise MappingRefused(
                    "role_not_allowed",
                    f"role {requested_role!r} is not allowed for this identity",
                    rule=matched[0] if matched else None,
                )
        # The rule the identity matched limits its sessions, whatever offer wins.
        limit = matched[1].max_connections if matched is not None else None
        for role, databases, rule_name, grant in offers:
            if _allows_database(databases, database):
                return RoleDecision(
                    role=role, database=database, rule=rule_name, grant=grant, max_connections=limit
                )
        raise MappingRefused(
            "database_not_allowed",
            f"database {database!r} is not allowed for this identity",
            rule=matched[0] if matched else None,
        )

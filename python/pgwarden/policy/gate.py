"""The statement policy as checks of the :class:`~pgwarden.statement_gate.StatementGate`:
who the session is (identity name, groups, the role it logs in as) and the statement text
go to the :class:`~pgwarden.policy.engine.PolicyEngine`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pgwarden.policy.engine import Decision, PolicyEngine
from pgwarden.policy.rules import PolicyError, load_policy
from pgwarden.statement_gate import Refusal

if TYPE_CHECKING:
    from pgwarden.session import Session

log = logging.getLogger(__name__)


def _refusal(decision: Decision, version: str) -> Refusal:
    who = f'rule "{decision.rule}"' if decision.rule is not None else "no rule"
    label = f"by policy {version}: {who} ({decision.kind or 'unparsable'})"
    return Refusal(
        decision.sqlstate,
        decision.message,
        decision.hint,
        label,
        rule=decision.rule or ("(default)" if decision.kind else "(unparsable)"),
        policy_version=version,
    )


class PolicyGate:
    """The policy's statement and fast-path checks, and its reload."""

    def __init__(self, path: Path) -> None:
        self.path = path
        loaded = load_policy(path)
        self.engine = PolicyEngine(loaded)
        log.info(
            "statement policy %s loaded from %s (%d rules, default %s)",
            loaded.version,
            path,
            len(loaded.policy.rule),
            loaded.policy.default,
        )

    @staticmethod
    def _subject(session: Session) -> tuple[str, tuple[str, ...], str]:
        identity = session.identity
        user = identity.name if identity is not None else ""
        groups = identity.roles if identity is not None else ()
        return user, groups, session.upstream_user or ""

    def check_statement(self, session: Session, sql: str) -> Refusal | None:
        engine = self.engine
        decision = engine.decide(engine.rules_for(*self._subject(session)), sql)
        return None if decision.allowed else _refusal(decision, engine.version)

    def check_function_call(self, session: Session, oid: int) -> Refusal | None:
        engine = self.engine
        decision = engine.decide_call(engine.rules_for(*self._subject(session)), oid)
        return None if decision.allowed else _refusal(decision, engine.version)

    def reload(self) -> bool:
        """Read the policy file again; on any problem keep enforcing the current policy
        (logged as an error).  True if the new policy is in force."""
        try:
            loaded = load_policy(self.path)
        except PolicyError as exc:
            log.error(
                "statement policy not reloaded, %s stays in force: %s", self.engine.version, exc
            )
            return False
        self.engine.replace(loaded)
        log.info(
            "statement policy %s reloaded from %s (%d rules, default %s)",
            loaded.version,
            self.path,
            len(loaded.policy.rule),
            loaded.policy.default,
        )
        return True

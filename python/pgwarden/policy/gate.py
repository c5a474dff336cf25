"""The statement policy as checks of the :class:`~pgwarden.statement_gate.StatementGate`:
who the session is (identity name, groups, the role it logs in as) and the statement text
go to the :class:`~pgwarden.policy.engine.PolicyEngine`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pgwarden import errors
from pgwarden.policy.engine import Decision, PolicyEngine, Rules
from pgwarden.policy.mask_catalog import Masked, SessionMasks, resolve
from pgwarden.policy.mask_check import refusal_reason
from pgwarden.policy.rules import LoadedPolicy, Mask, PolicyError, load_policy, masks_applying
from pgwarden.statement_gate import Refusal

if TYPE_CHECKING:
    from pgwarden.session import Session
    from pgwarden.transport import PgStream

log = logging.getLogger(__name__)

#: How long a database's masked columns, once looked up, serve the sessions that start
#: next (a connection storm costs one catalog query per database, not one per session).
MASK_LOOKUP_TTL_SECONDS: Final = 10.0
#: Masked columns kept by OID per database and set of masks, at most.
_KEPT_COLUMNS: Final = 10_000
#: Sessions whose rules are remembered by session id (a session's identity and role do
#: not change); the memo is emptied when it reaches this size, or on a reload.
_SESSIONS_REMEMBERED: Final = 8192


MASKING_RULE: Final = "(masking)"
MASKING_HINT: Final = (
    "Masked columns can be selected as they are (their values come back masked), "
    "not computed with, filtered, sorted, grouped, copied or written elsewhere."
)


def _subject(session: Session) -> tuple[str, tuple[str, ...], str]:
    """Who the session is, as rules and masks match it: identity name, groups, role."""
    identity = session.identity
    user = identity.name if identity is not None else ""
    groups = identity.roles if identity is not None else ()
    return user, groups, session.upstream_user or ""


def _printable(text: str, limit: int = 300) -> str:
    """Identifiers from the statement, made safe for the refusal's message."""
    return "".join(ch if " " <= ch <= "~" and ch != "$" else "?" for ch in text)[:limit]


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
        self._session_rules: dict[str, Rules] = {}
        self._lookups: dict[tuple[str, tuple[Mask, ...]], tuple[float, SessionMasks]] = {}
        self._missing_reported: set[tuple[str, str]] = set()
        self._kept: dict[tuple[str, tuple[Mask, ...]], set[Masked]] = {}
        self._announce("loaded")

    def _rules(self, session: Session) -> Rules:
        """The rules for the session: who it is (identity name and groups) and the role it
        logs in as, remembered per session."""
        rules = self._session_rules.get(session.id)
        if rules is None:
            rules = self.engine.rules_for(*_subject(session))
            if len(self._session_rules) >= _SESSIONS_REMEMBERED:
                self._session_rules.clear()
            self._session_rules[session.id] = rules
        return rules

    def check_statement(self, session: Session, sql: str) -> Refusal | None:
        decision = self.engine.decide(self._rules(session), sql)
        return None if decision.allowed else _refusal(decision, self.engine.version)

    def masks_for(self, session: Session) -> tuple[Mask, ...]:
        """The masks that apply to the session (looked up when it starts)."""
        return masks_applying(self.engine.loaded.policy.mask, *_subject(session))

    async def masked_columns(
        self, database: str, masks: tuple[Mask, ...], stream: PgStream
    ) -> SessionMasks:
        """The masked columns in ``database``: looked up on ``stream`` (a logged-in
        upstream connection), or as looked up by a session that started less than
        :data:`MASK_LOOKUP_TTL_SECONDS` ago."""
        key = (database, masks)
        now = time.monotonic()
        cached = self._lookups.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await resolve(stream, masks, self.kept(database, masks))
        self.remember_lookup(database, masks, found)
        return found

    def kept(self, database: str, masks: tuple[Mask, ...]) -> tuple[Masked, ...]:
        """The columns earlier lookups with these masks found (by OID): they stay masked
        while they exist, a table renamed by a migration included, until the policy is
        reloaded or the gateway restarts."""
        return tuple(sorted(self._kept.get((database, masks), ())))

    def remember_lookup(self, database: str, masks: tuple[Mask, ...], found: SessionMasks) -> None:
        """Sessions with these masks starting in the next :data:`MASK_LOOKUP_TTL_SECONDS`
        take ``found`` (a session's own lookup, or one of the gateway's rechecks)."""
        if len(self._lookups) >= _SESSIONS_REMEMBERED:
            self._lookups.clear()
        self._lookups[(database, masks)] = (time.monotonic() + MASK_LOOKUP_TTL_SECONDS, found)
        kept = self._kept.setdefault((database, masks), set())
        if len(kept) < _KEPT_COLUMNS:
            kept.update(found.masked)
        for name in found.missing:
            if (database, name) not in self._missing_reported:
                self._missing_reported.add((database, name))
                log.warning(
                    "statement policy %s masks %s, which database %s does not have: renamed "
                    "or dropped? (a table renamed while the gateway runs stays masked by its "
                    "OID until a restart or reload; update the policy)",
                    self.engine.version,
                    name,
                    database,
                )

    def check_masking(self, session: Session, sql: str) -> Refusal | None:
        """Refuses a statement that would read one of the session's masked columns
        around the mask (:mod:`pgwarden.policy.mask_check`)."""
        scope = session.mask_scope
        if scope is None:
            return None
        reason = refusal_reason(sql, scope)
        if reason is None:
            return None
        reason = _printable(reason)
        return self._masking_refusal(reason, f"by masking: {reason}")

    def check_masking_call(self, session: Session, oid: int) -> Refusal | None:
        """Refuses every fast-path FunctionCall in a session with masks: its result is a
        FunctionCallResponse, not a row, and the function (``table_to_xml``,
        ``query_to_xml``, ...) may read anything."""
        if session.mask_scope is None:
            return None
        reason = "a session with masked columns cannot make fast-path function calls"
        return self._masking_refusal(reason, f"by masking: {reason} (function {oid})")

    def _masking_refusal(self, reason: str, label: str) -> Refusal:
        return Refusal(
            errors.INSUFFICIENT_PRIVILEGE,
            f"permission denied by pgwarden masking: {reason}",
            MASKING_HINT,
            label,
            rule=MASKING_RULE,
            policy_version=self.engine.version,
        )

    def check_function_call(self, session: Session, oid: int) -> Refusal | None:
        decision = self.engine.decide_call(self._rules(session), oid)
        return None if decision.allowed else _refusal(decision, self.engine.version)

    def reload(self) -> LoadedPolicy | None:
        """Read the policy file again; on any problem keep enforcing the current policy
        (logged as an error) and return None.  Returns the policy the new one replaced."""
        try:
            loaded = load_policy(self.path)
        except PolicyError as exc:
            log.error(
                "statement policy not reloaded, %s stays in force: %s", self.engine.version, exc
            )
            return None
        previous = self.engine.loaded
        self.engine.replace(loaded)
        self._session_rules = {}
        self._lookups = {}
        self._missing_reported = set()
        self._kept = {}
        self._announce("reloaded")
        return previous

    def changed_for(self, session: Session, previous: LoadedPolicy) -> bool:
        """Whether the policy in force treats a session that started under ``previous``
        otherwise: other rules apply to it, another default, or other masks than those it
        looked up.  Its prepared statements, cursors and masks hold verdicts of the old
        policy, so such a session must not go on.  A session that has not looked its masks
        up yet (still logging in) will use the new policy throughout."""
        if session.policy_masks is None:
            return False
        subject = _subject(session)
        now, before = self.engine.loaded.policy, previous.policy
        return (
            now.default != before.default
            or tuple(r for r in now.rule if r.applies_to(*subject))
            != tuple(r for r in before.rule if r.applies_to(*subject))
            or masks_applying(now.mask, *subject) != session.policy_masks
        )

    def _announce(self, what: str) -> None:
        loaded = self.engine.loaded
        log.info(
            "statement policy %s %s from %s (%d rules, default %s)",
            loaded.version,
            what,
            self.path,
            len(loaded.policy.rule),
            loaded.policy.default,
        )

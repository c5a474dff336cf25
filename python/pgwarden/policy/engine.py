"""Decisions: a statement text, for a subject, against the loaded policy.

A decision depends on the policy version, the rules that apply to the subject and the
text, and is cached on that: a repeated statement costs two dictionary lookups.  Texts that
differ only in their numeric constants (``aid = 1``, ``aid = 2``) share one decision (the
key comes from :func:`pgwarden._wire.number_blind_key`, which keeps digits in names):
numbers never change a statement's class, tables or functions, except in EXPLAIN's options
(``ANALYZE 0`` / ``ANALYZE 1``), so a text with the word EXPLAIN is keyed by itself.
Parsing (libpg_query) happens on a cache miss only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from pgwarden import _wire, errors
from pgwarden.policy.analysis import CACHED_TEXT_CHARS, CODE, Statement, analyse
from pgwarden.policy.rules import LoadedPolicy, Rule

log = logging.getLogger(__name__)

_MAX_DECISIONS: Final = 65536
NO_RULE_HINT: Final = "Ask for a policy rule that allows it."
UNPARSABLE_MESSAGE: Final = "pgwarden refused a statement the PostgreSQL grammar cannot parse"
UNPARSABLE_HINT: Final = "Check the statement for a syntax error."


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on a statement text: allowed, or refused with this error."""

    allowed: bool
    kind: str = ""  # the class of the statement that decided ("" when none did)
    rule: str | None = None  # the rule that decided (None: the policy's default)
    sqlstate: str = ""
    message: str = ""
    hint: str | None = None


ALLOWED: Final = Decision(allowed=True)


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules that apply to a session, in order, and a number naming this set."""

    id: int
    rules: tuple[Rule, ...]


def cache_key(sql: str) -> str:
    """The key a text's decision is cached under: its number-blind key, or the text itself
    when numbers may matter (EXPLAIN options) or the key cannot be had."""
    if "explain" in sql.lower():
        return sql
    key = _wire.number_blind_key(sql)
    return sql if key is None else key


def _refusal(statement: Statement, rule: Rule | None) -> Decision:
    if rule is not None:
        return Decision(
            allowed=False,
            kind=statement.kind,
            rule=rule.name,
            sqlstate=errors.INSUFFICIENT_PRIVILEGE,
            message=f'permission denied by pgwarden policy: rule "{rule.name}" refuses '
            f"this {statement.kind} statement",
            hint=rule.message,
        )
    return Decision(
        allowed=False,
        kind=statement.kind,
        sqlstate=errors.INSUFFICIENT_PRIVILEGE,
        message=f"permission denied by pgwarden policy: no rule allows this {statement.kind} "
        "statement",
        hint=NO_RULE_HINT,
    )


class PolicyEngine:
    """The loaded policy and its caches; :meth:`replace` swaps in a reloaded one."""

    def __init__(self, loaded: LoadedPolicy) -> None:
        self.loaded = loaded
        self._rule_sets: dict[tuple[int, ...], Rules] = {}
        self._decisions: dict[tuple[int, str], Decision] = {}

    @property
    def version(self) -> str:
        return self.loaded.version

    def replace(self, loaded: LoadedPolicy) -> None:
        """Use ``loaded`` from now on (cached decisions of the old policy are dropped)."""
        self.loaded = loaded
        self._rule_sets = {}
        self._decisions = {}

    def rules_for(self, user: str, groups: tuple[str, ...], role: str) -> Rules:
        """The rules that apply to a subject, in order; subjects with the same rules share
        one :class:`Rules`, and so its cached decisions."""
        every = self.loaded.policy.rule
        picked = tuple(i for i, r in enumerate(every) if r.applies_to(user, groups, role))
        rules = self._rule_sets.get(picked)
        if rules is None:
            rules = Rules(len(self._rule_sets), tuple(every[i] for i in picked))
            self._rule_sets[picked] = rules
        return rules

    def decide(self, rules: Rules, sql: str) -> Decision:
        """The verdict on ``sql`` under ``rules`` (from :meth:`rules_for`)."""
        key = (rules.id, cache_key(sql))
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= _MAX_DECISIONS:
                self._decisions.clear()
            decision = self._decide(rules.rules, sql)
            if len(sql) <= CACHED_TEXT_CHARS:
                self._decisions[key] = decision
        return decision

    def _decide(self, rules: tuple[Rule, ...], sql: str) -> Decision:
        analysis = analyse(sql)
        if not analysis.parsed:
            return Decision(
                allowed=False,
                sqlstate=errors.SYNTAX_ERROR,
                message=UNPARSABLE_MESSAGE,
                hint=UNPARSABLE_HINT,
            )
        for statement in analysis.statements:
            refused = self._verdict(rules, statement)
            if refused is not None:
                return refused
        return ALLOWED

    def decide_call(self, rules: Rules, oid: int) -> Decision:
        """The verdict on a fast-path FunctionCall (function ``oid``): a ``code`` statement
        whose function the policy cannot name."""
        statement = Statement(kind=CODE, node="FunctionCall", tables=(), functions=())
        return self._verdict(rules.rules, statement) or ALLOWED

    def _verdict(self, rules: tuple[Rule, ...], statement: Statement) -> Decision | None:
        """The refusal of one statement (the first matching rule, else the default), or
        None when it is allowed."""
        rule = next((r for r in rules if r.matches(statement)), None)
        action = rule.action if rule is not None else self.loaded.policy.default
        return None if action == "allow" else _refusal(statement, rule)

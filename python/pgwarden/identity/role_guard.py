"""Refuse statements that would change the session's role: SET ROLE, SET SESSION
AUTHORIZATION, RESET ROLE, ``set_config('role', ...)`` and the like.

The upstream session logs in as the role the identity was mapped to; switching to another
role (one the mapped role is a member of) would escape that mapping.  Every Query and Parse
is parsed with the PostgreSQL grammar (libpg_query, through pglast) and refused when its
parse tree contains

* a ``VariableSetStmt`` for ``role`` or ``session_authorization`` -- SET [LOCAL] ROLE,
  RESET ROLE, SET/RESET SESSION AUTHORIZATION, and the same settings inside
  ``ALTER ROLE/DATABASE ... SET`` or ``CREATE FUNCTION ... SET``;
* a call of ``set_config`` whose first argument is ``role``, ``session_authorization`` or
  not a constant.

The verdict depends on the statement text only and is cached per text.  A statement the
grammar cannot parse is refused as well (fail closed; pglast's grammar is at least as new as
the server's, so the server would not have parsed it either).

**How a refusal is answered** (:mod:`pgwarden.refusal`): the message is replaced, at the
same place in the stream, by a ``DO`` block the server itself fails with SQLSTATE 42501, so
the server answers in order, marks the transaction failed and skips to Sync, and the
statement record keeps the statement the client sent.  For the extended protocol the
replaced Parse succeeds and the error comes at Execute.  A FunctionCall of ``set_config``
(fast path) ends the session.

Not covered here (the statement policy's work): role changes executed inside function
bodies or DO blocks, whose text the grammar sees only as a string.  Give mapped roles no
membership in roles they must not become.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import TYPE_CHECKING, Any, Final

from pglast import parser as pg_parser

from pgwarden import _wire, errors
from pgwarden.policy.analysis import CACHED_TEXT_CHARS, walk
from pgwarden.statement_gate import Refusal, StatementGate

if TYPE_CHECKING:
    from pgwarden.session import Session

log = logging.getLogger(__name__)

PROTECTED_SETTINGS: Final = frozenset({"role", "session_authorization"})
SET_CONFIG_OID: Final = 2078  # pg_catalog.set_config(text, text, boolean), fixed in pg_proc.dat
_CACHE_SIZE: Final = 16384
# A VariableSetStmt appears under its node name, or as the typed ``setstmt`` field of
# ALTER ROLE/DATABASE/SYSTEM ... SET.
_SET_STATEMENT_KEYS: Final = frozenset({"VariableSetStmt", "setstmt"})
_TREE_MARKERS: Final = ('"VariableSetStmt"', '"setstmt"', "set_config")

#: The rule a role-change refusal names in the audit.
GUARD_RULE: Final = "role-change guard"
ROLE_CHANGE_HINT: Final = (
    "The gateway chooses the role from your identity; ask for a grant to use another role."
)


def _describe_set(statement: dict[str, Any]) -> str | None:
    name = str(statement.get("name", "")).lower()
    if name not in PROTECTED_SETTINGS:
        return None
    what = "ROLE" if name == "role" else "SESSION AUTHORIZATION"
    return f"RESET {what}" if statement.get("kind") == "VAR_RESET" else f"SET {what}"


def _describe_call(call: dict[str, Any]) -> str | None:
    names = call.get("funcname") or []
    last = names[-1].get("String", {}).get("sval") if names else None
    if last != "set_config":
        return None
    args = call.get("args") or []
    first = args[0].get("A_Const", {}).get("sval", {}).get("sval") if args else None
    if isinstance(first, str) and first.lower() not in PROTECTED_SETTINGS:
        return None
    return "set_config of the session role"


_verdicts: dict[str, str | None] = {}


def role_change(sql: str) -> str | None:
    """What role change ``sql`` makes (``"SET ROLE"``, ...), or None; "unparsable" too.

    Cached per text, texts that differ only in their numeric constants sharing a verdict
    (:func:`pgwarden._wire.number_blind_key`: the verdict reads names and the string
    ``'role'``, never a number); texts too long to keep (bulk statements) are not cached.
    """
    if len(sql) > CACHED_TEXT_CHARS:
        return _role_change(sql)
    key = _wire.number_blind_key(sql) or sql
    try:
        return _verdicts[key]
    except KeyError:
        pass
    verdict = _role_change(sql)
    if len(_verdicts) >= _CACHE_SIZE:
        _verdicts.clear()
    _verdicts[key] = verdict
    return verdict


def _role_change(sql: str) -> str | None:
    try:
        tree_json = pg_parser.parse_sql_json(sql)
    except Exception:  # pglast.parser.ParseError, or the grammar's own limits
        return "unparsable"
    if not any(marker in tree_json for marker in _TREE_MARKERS):
        return None  # the common case: no tree walk
    for node in walk(json.loads(tree_json)):
        for kind, body in node.items():
            if kind in _SET_STATEMENT_KEYS and isinstance(body, dict):
                found = _describe_set(body)
            elif kind == "FuncCall" and isinstance(body, dict):
                found = _describe_call(body)
            else:
                continue
            if found is not None:
                return found
    return None


@functools.lru_cache(maxsize=8)
def _refusal(change: str) -> Refusal:
    if change == "unparsable":
        return Refusal(
            errors.SYNTAX_ERROR,
            "pgwarden refused a statement the PostgreSQL grammar cannot parse",
            "Check the statement for a syntax error.",
            "an unparsable statement",
            rule=GUARD_RULE,
        )
    return Refusal(
        errors.INSUFFICIENT_PRIVILEGE,
        f"permission denied: {change} is not allowed through pgwarden",
        ROLE_CHANGE_HINT,
        change,
        rule=GUARD_RULE,
    )


def check_statement(session: Session, sql: str) -> Refusal | None:
    """The role-change check of a statement text (a :class:`StatementGate` check)."""
    change = role_change(sql)
    return None if change is None else _refusal(change)


_SET_CONFIG_CALL: Final = Refusal(
    errors.INSUFFICIENT_PRIVILEGE,
    "permission denied: calling set_config through the fast-path interface "
    "is not allowed through pgwarden",
    None,
    "set_config",
)


def check_function_call(session: Session, oid: int) -> Refusal | None:
    """A fast-path call of ``set_config`` is refused (a :class:`StatementGate` check)."""
    return _SET_CONFIG_CALL if oid == SET_CONFIG_OID else None


class RoleChangeGuard(StatementGate):
    """The client event hook that refuses role changes (see the module documentation)."""

    def __init__(self) -> None:
        super().__init__([check_statement], [check_function_call])

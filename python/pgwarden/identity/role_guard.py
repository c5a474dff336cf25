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

**How a refusal is answered.**  The codec has already counted the message as sent (its
statement tracker matches every server response in order, for the statement log and the
drain), so the gateway does not cut it out and answer on its own -- that would break the
order of responses behind pipelined statements.  Instead the message is replaced, at the
same place in the stream, by one the server itself fails with SQLSTATE 42501: a
``DO`` block that raises the gateway's error.  The server then answers exactly as it would
answer a refused statement -- ErrorResponse, the transaction marked failed, everything up to
the next Sync skipped, ReadyForQuery -- and the statement record keeps the statement the
client sent, with the 42501.  For the extended protocol the replaced Parse succeeds and the
error comes at Execute.  A FunctionCall of ``set_config`` (fast path) ends the session.

Not covered here (the statement policy's work): role changes executed inside function
bodies or DO blocks, whose text the grammar sees only as a string.  Give mapped roles no
membership in roles they must not become.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from pglast import parser as pg_parser

from pgwarden import _wire, errors

if TYPE_CHECKING:
    from pgwarden._wire import ClientEvent
    from pgwarden.session import Session

log = logging.getLogger(__name__)

EV_QUERY: Final = _wire.EV_QUERY
EV_PARSE: Final = _wire.EV_PARSE
EV_FUNCTION_CALL: Final = _wire.EV_FUNCTION_CALL
PROTECTED_SETTINGS: Final = frozenset({"role", "session_authorization"})
SET_CONFIG_OID: Final = 2078  # pg_catalog.set_config(text, text, boolean), fixed in pg_proc.dat
_CACHE_SIZE: Final = 16384
_DO_TAG: Final = "$pgwarden_refusal$"
# A VariableSetStmt appears under its node name, or as the typed ``setstmt`` field of
# ALTER ROLE/DATABASE/SYSTEM ... SET.
_SET_STATEMENT_KEYS: Final = frozenset({"VariableSetStmt", "setstmt"})
_TREE_MARKERS: Final = ('"VariableSetStmt"', '"setstmt"', "set_config")

ROLE_CHANGE_HINT: Final = (
    "The gateway chooses the role from your identity; ask for a grant to use another role."
)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a parse tree (JSON form), depth first, in statement order."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


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


@functools.lru_cache(maxsize=_CACHE_SIZE)
def role_change(sql: str) -> str | None:
    """What role change ``sql`` makes (``"SET ROLE"``, ...), or None; "unparsable" too."""
    try:
        tree_json = pg_parser.parse_sql_json(sql)
    except Exception:  # pglast.parser.ParseError, or the grammar's own limits
        return "unparsable"
    if not any(marker in tree_json for marker in _TREE_MARKERS):
        return None  # the common case: no tree walk
    for node in _walk(json.loads(tree_json)):
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


def _raise_sql(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    """A DO block that raises ``message`` (fixed text, never client input) as ``sqlstate``."""
    for text in (message, hint or ""):
        if "'" in text or "\\" in text or "$" in text:
            raise ValueError("refusal texts must not need quoting")
    using = f"ERRCODE = '{sqlstate}', MESSAGE = '{message}'"
    if hint:
        using += f", HINT = '{hint}'"
    return f"DO {_DO_TAG}BEGIN RAISE EXCEPTION USING {using}; END{_DO_TAG}".encode()


@functools.lru_cache(maxsize=8)
def refusal_sql(change: str) -> bytes:
    if change == "unparsable":
        return _raise_sql(
            errors.SYNTAX_ERROR,
            "pgwarden refused a statement the PostgreSQL grammar cannot parse",
            "Check the statement for a syntax error.",
        )
    return _raise_sql(
        errors.INSUFFICIENT_PRIVILEGE,
        f"permission denied: {change} is not allowed through pgwarden",
        ROLE_CHANGE_HINT,
    )


def _replacement_query(change: str) -> bytes:
    return _wire.encode_message(ord("Q"), refusal_sql(change) + b"\0")


def _replacement_parse(message: bytes, change: str) -> bytes:
    """The same Parse (statement name, parameter types) with the refusal as its SQL."""
    body = message[5:]
    name_end = body.index(0)
    sql_end = body.index(0, name_end + 1)
    new_body = body[: name_end + 1] + refusal_sql(change) + body[sql_end:]
    return _wire.encode_message(ord("P"), new_body)


class RoleChangeGuard:
    """The client event hook that refuses role changes (see the module documentation)."""

    def __init__(self) -> None:
        self.refused = 0

    def on_client_events(self, session: Session, data: bytes, events: list[ClientEvent]) -> bytes:
        pieces: list[bytes] | None = None
        position = 0
        for event in events:
            kind = event[0]
            if kind in (EV_QUERY, EV_PARSE):
                sql = event[1] if kind == EV_QUERY else event[2]
                assert isinstance(sql, str)
                change = role_change(sql)
                if change is None:
                    continue
                start, end = event[-2], event[-1]
                assert isinstance(start, int) and isinstance(end, int)
                if pieces is None:
                    pieces = []
                pieces.append(data[position:start])
                if kind == EV_QUERY:
                    pieces.append(_replacement_query(change))
                else:
                    pieces.append(_replacement_parse(data[start:end], change))
                position = end
                self.refused += 1
                log.info("session %s: refused %s", session.id, change)
            elif kind == EV_FUNCTION_CALL and event[1] == SET_CONFIG_OID:
                log.warning("session %s: fast-path set_config call: session ended", session.id)
                session.terminate(
                    errors.INSUFFICIENT_PRIVILEGE,
                    "permission denied: calling set_config through the fast-path interface "
                    "is not allowed through pgwarden",
                )
                return b""
        if pieces is None:
            return data
        pieces.append(data[position:])
        return b"".join(pieces)

"""What a statement text does, read from its PostgreSQL parse tree (libpg_query, through
pglast): for each statement in the text, its class, the tables it names and the functions
it calls.  The result depends on the text only and is cached per text.

Classes (``docs/policy.md`` lists which statement goes where):

* ``read`` -- SELECT, VALUES, TABLE, SHOW, EXPLAIN without ANALYZE, DECLARE CURSOR / FETCH /
  CLOSE, COPY ... TO STDOUT;
* ``write`` -- INSERT, UPDATE, DELETE, MERGE, TRUNCATE, LOCK, SELECT ... FOR UPDATE/SHARE
  (PostgreSQL asks for UPDATE privilege there too), COPY ... FROM STDIN, REFRESH
  MATERIALIZED VIEW, and any statement holding a data-modifying WITH query;
* ``ddl`` -- CREATE / ALTER / DROP / COMMENT / SECURITY LABEL of objects, SELECT INTO and
  CREATE TABLE AS;
* ``admin`` -- roles and privileges (GRANT, REVOKE, CREATE/ALTER/DROP ROLE, ALTER DEFAULT
  PRIVILEGES, REASSIGN/DROP OWNED, SET/RESET ROLE and SESSION AUTHORIZATION), ALTER
  SYSTEM, VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, LOAD, databases, tablespaces,
  subscriptions, server-side COPY to or from a file or program, and the like;
* ``code`` -- DO and CALL: server-side code the grammar cannot look into;
* ``transaction`` -- BEGIN, COMMIT, ROLLBACK, SAVEPOINT, PREPARE TRANSACTION, ...;
* ``session`` -- SET / RESET, DISCARD, PREPARE (judged as its query too), EXECUTE,
  DEALLOCATE, LISTEN / NOTIFY / UNLISTEN;
* ``other`` -- anything not listed, so a policy names it before it passes.

EXPLAIN ANALYZE runs its statement and takes that statement's class; PREPARE takes the
class of the query it prepares.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pglast import parser as pg_parser

READ: Final = "read"
WRITE: Final = "write"
DDL: Final = "ddl"
ADMIN: Final = "admin"
CODE: Final = "code"
TRANSACTION: Final = "transaction"
SESSION: Final = "session"
OTHER: Final = "other"
CLASSES: Final = (READ, WRITE, DDL, ADMIN, CODE, TRANSACTION, SESSION, OTHER)

_CACHE_SIZE: Final = 16384
#: Longer texts (multi-row INSERTs, generated batches) are analysed each time rather than
#: kept: caches of 16k entries must not hold 16k bulk statements.
CACHED_TEXT_CHARS: Final = 16384

_WRITE_NODES: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_BY_NODE: Final[dict[str, str]] = {
    "SelectStmt": READ,
    "VariableShowStmt": READ,
    "FetchStmt": READ,
    "ClosePortalStmt": READ,
    "InsertStmt": WRITE,
    "UpdateStmt": WRITE,
    "DeleteStmt": WRITE,
    "MergeStmt": WRITE,
    "TruncateStmt": WRITE,
    "LockStmt": WRITE,
    "RefreshMatViewStmt": WRITE,
    "CreateTableAsStmt": DDL,
    "CommentStmt": DDL,
    "SecLabelStmt": DDL,
    "RenameStmt": DDL,
    "DropStmt": DDL,
    "IndexStmt": DDL,
    "ViewStmt": DDL,
    "RuleStmt": DDL,
    "DefineStmt": DDL,
    "CompositeTypeStmt": DDL,
    "AlterObjectSchemaStmt": DDL,
    "AlterOwnerStmt": DDL,
    "CreateForeignTableStmt": DDL,
    "GrantStmt": ADMIN,
    "GrantRoleStmt": ADMIN,
    "AlterDefaultPrivilegesStmt": ADMIN,
    "CreateRoleStmt": ADMIN,
    "AlterRoleStmt": ADMIN,
    "AlterRoleSetStmt": ADMIN,
    "DropRoleStmt": ADMIN,
    "ReassignOwnedStmt": ADMIN,
    "DropOwnedStmt": ADMIN,
    "AlterSystemStmt": ADMIN,
    "VacuumStmt": ADMIN,
    "ClusterStmt": ADMIN,
    "ReindexStmt": ADMIN,
    "CheckPointStmt": ADMIN,
    "LoadStmt": ADMIN,
    "CreatedbStmt": ADMIN,
    "AlterDatabaseStmt": ADMIN,
    "AlterDatabaseSetStmt": ADMIN,
    "AlterDatabaseRefreshCollStmt": ADMIN,
    "DropdbStmt": ADMIN,
    "CreateTableSpaceStmt": ADMIN,
    "DropTableSpaceStmt": ADMIN,
    "AlterTableSpaceOptionsStmt": ADMIN,
    "AlterTableMoveAllStmt": ADMIN,
    "CreateSubscriptionStmt": ADMIN,
    "AlterSubscriptionStmt": ADMIN,
    "DropSubscriptionStmt": ADMIN,
    "CreatePublicationStmt": ADMIN,
    "AlterPublicationStmt": ADMIN,
    "CreateEventTrigStmt": ADMIN,
    "AlterEventTrigStmt": ADMIN,
    "CreateExtensionStmt": ADMIN,
    "AlterExtensionStmt": ADMIN,
    "AlterExtensionContentsStmt": ADMIN,
    "CreateFdwStmt": ADMIN,
    "AlterFdwStmt": ADMIN,
    "CreateForeignServerStmt": ADMIN,
    "AlterForeignServerStmt": ADMIN,
    "CreateUserMappingStmt": ADMIN,
    "AlterUserMappingStmt": ADMIN,
    "DropUserMappingStmt": ADMIN,
    "ImportForeignSchemaStmt": ADMIN,
    "CreatePLangStmt": ADMIN,
    "AlterCollationStmt": ADMIN,
    "DoStmt": CODE,
    "CallStmt": CODE,
    "TransactionStmt": TRANSACTION,
    "VariableSetStmt": SESSION,
    "DiscardStmt": SESSION,
    "ExecuteStmt": SESSION,
    "DeallocateStmt": SESSION,
    "ListenStmt": SESSION,
    "UnlistenStmt": SESSION,
    "NotifyStmt": SESSION,
    "ConstraintsSetStmt": SESSION,
}
# Settings whose change is a change of privileges.
_ROLE_SETTINGS: Final = frozenset({"role", "session_authorization"})
# DROP of these names relations (tables and what reads like one).
_DROPPED_RELATIONS: Final = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_INDEX",
        "OBJECT_SEQUENCE",
        "OBJECT_FOREIGN_TABLE",
    }
)
# Node names that are DDL by their prefix: CREATE ..., ALTER ... (after the exact names
# above, which take precedence).
_DDL_PREFIXES: Final = ("Create", "Alter")


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a text."""

    kind: str  # its class
    node: str  # the parse tree's top node ("SelectStmt", ...)
    tables: tuple[str, ...]  # relations named, "schema.name" or "name", lower-case as parsed
    functions: tuple[str, ...]  # functions called, by their last name ("pg_read_file")


@dataclass(frozen=True, slots=True)
class Analysis:
    """A statement text: its statements, the highest parameter number it uses, and whether
    the grammar could read it (an unparsable text has no statements)."""

    statements: tuple[Statement, ...]
    parameters: int
    parsed: bool = True


UNPARSABLE: Final = Analysis(statements=(), parameters=0, parsed=False)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every dict in a parse tree (JSON form), depth first, in statement order."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _names(parts: Any) -> list[str]:
    if not isinstance(parts, list):
        return []
    out = []
    for part in parts:
        if isinstance(part, dict):
            value = part.get("String", {}).get("sval")
            if isinstance(value, str):
                out.append(value)
    return out


def option_on(options: Any, name: str) -> bool:
    """Whether an EXPLAIN-style option list turns ``name`` on: ``ANALYZE``, ``ANALYZE true``
    and anything else PostgreSQL would not read as off (``false``, ``off``, ``0``), so an
    option the server refuses counts as on (fail closed)."""
    on = False
    for option in options or []:
        elem = option.get("DefElem", {}) if isinstance(option, dict) else {}
        if elem.get("defname") != name:
            continue
        arg = elem.get("arg")
        off = False
        if isinstance(arg, dict):
            text = arg.get("String", {}).get("sval") if "String" in arg else None
            number = arg.get("Integer", {}).get("ival", 0) if "Integer" in arg else None
            off = (isinstance(text, str) and text.lower() in ("false", "off")) or number == 0
        on = not off  # the last mention wins, as in PostgreSQL
    return on


def _inner_kind(body: dict[str, Any], default: str) -> str:
    """The class of the statement in ``body``'s ``query`` (EXPLAIN, PREPARE, DECLARE)."""
    inner = body.get("query")
    if not isinstance(inner, dict) or not inner:
        return default
    inner_node, inner_body = next(iter(inner.items()))
    return _kind(inner_node, inner_body if isinstance(inner_body, dict) else {})


def _kind(node: str, body: dict[str, Any]) -> str:
    """The class of one top-level statement (before the tree-wide checks)."""
    if node == "ExplainStmt":
        if option_on(body.get("options"), "analyze"):
            return _inner_kind(body, READ)
        return READ
    if node == "PrepareStmt":
        return _inner_kind(body, SESSION)
    if node == "DeclareCursorStmt":
        return _inner_kind(body, READ)
    if node == "SelectStmt":
        if body.get("intoClause"):
            return DDL  # SELECT INTO creates a table
        if body.get("lockingClause"):
            return WRITE
        return READ
    if node == "CopyStmt":
        if body.get("filename") is not None or body.get("is_program"):
            return ADMIN  # the server's own files or programs
        return WRITE if body.get("is_from") else READ
    if node == "VariableSetStmt":
        if str(body.get("name", "")).lower() in _ROLE_SETTINGS:
            return ADMIN  # SET ROLE, SET SESSION AUTHORIZATION and their RESET
        return SESSION
    known = _BY_NODE.get(node)
    if known is not None:
        return known
    if node.startswith(_DDL_PREFIXES):
        return DDL
    return OTHER


def _dropped(body: dict[str, Any]) -> list[str]:
    """The relations a DROP names ("schema.name" or "name"); a dropped schema is
    "schema.*", every relation in it."""
    kind = body.get("removeType")
    out = []
    for obj in body.get("objects") or []:
        if not isinstance(obj, dict):
            continue
        if kind in _DROPPED_RELATIONS:
            names = _names(obj.get("List", {}).get("items"))
            if names:
                out.append(".".join(names[-2:]))
        elif kind == "OBJECT_SCHEMA":
            names = _names([obj])
            if names:
                out.append(f"{names[0]}.*")
    return out


def _labelled(body: dict[str, Any]) -> list[str]:
    """The relation a COMMENT or SECURITY LABEL is about (of a column: its table)."""
    kind = body.get("objtype")
    obj = body.get("object")
    if not isinstance(obj, dict) or not (kind in _DROPPED_RELATIONS or kind == "OBJECT_COLUMN"):
        return []
    names = _names(obj.get("List", {}).get("items"))
    if kind == "OBJECT_COLUMN":
        names = names[:-1]
    return [".".join(names[-2:])] if names else []


def _statement(node: str, body: dict[str, Any]) -> tuple[Statement, int]:
    """One statement, and the highest parameter number it uses."""
    kind = _kind(node, body)
    ctes: set[str] = set()
    tables: list[str] = (
        _dropped(body)
        if node == "DropStmt"
        else _labelled(body)
        if node in ("CommentStmt", "SecLabelStmt")
        else []
    )
    functions: list[str] = []
    writes = False
    highest = 0
    for item in walk(body):
        for key, value in item.items():
            if key in _WRITE_NODES:
                writes = True
            elif key == "CommonTableExpr" and isinstance(value, dict):
                name = value.get("ctename")
                if isinstance(name, str):
                    ctes.add(name)
            elif key == "ParamRef" and isinstance(value, dict):
                number = value.get("number")
                if isinstance(number, int) and number > highest:
                    highest = number
        relname = item.get("relname")
        if isinstance(relname, str):
            schema = item.get("schemaname")
            tables.append(f"{schema}.{relname}" if isinstance(schema, str) else relname)
        names = _names(item.get("funcname"))
        if names:
            functions.append(names[-1])
    explained = node == "ExplainStmt" and not option_on(body.get("options"), "analyze")
    if writes and kind == READ and not explained:
        kind = WRITE  # a data-modifying WITH query, or EXPLAIN ANALYZE of one
    seen: dict[str, None] = {}
    for table in tables:
        if table not in ctes:  # a WITH query's name is not a table
            seen.setdefault(table)
    statement = Statement(
        kind=kind,
        node=node,
        tables=tuple(seen),
        functions=tuple(dict.fromkeys(functions)),
    )
    return statement, highest


def analyse(sql: str) -> Analysis:
    """The statements of ``sql`` (cached per text up to :data:`CACHED_TEXT_CHARS`);
    :data:`UNPARSABLE` when the grammar cannot read it."""
    if len(sql) > CACHED_TEXT_CHARS:
        return _analyse(sql)  # a bulk statement: not kept (the cache holds 16k texts)
    return _analyse_cached(sql)


def _analyse(sql: str) -> Analysis:
    try:
        tree = json.loads(pg_parser.parse_sql_json(sql))
    except Exception:  # pglast.parser.ParseError, or the grammar's own limits
        return UNPARSABLE
    statements = []
    parameters = 0
    for raw in tree.get("stmts") or []:
        stmt = raw.get("stmt") if isinstance(raw, dict) else None
        if not isinstance(stmt, dict) or not stmt:
            continue
        node, body = next(iter(stmt.items()))
        statement, highest = _statement(node, body if isinstance(body, dict) else {})
        statements.append(statement)
        parameters = max(parameters, highest)
    return Analysis(statements=tuple(statements), parameters=parameters)


_analyse_cached = functools.lru_cache(maxsize=_CACHE_SIZE)(_analyse)

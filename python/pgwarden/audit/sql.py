"""What a statement's SQL text says, read with PostgreSQL's own parser (libpg_query, pglast).

Used by the shipper, off the statement's path, once per query shape:

- the operation(s) and the tables, functions and procedures they touch, in the order they
  appear, for ``db.query.summary`` (OpenTelemetry's "Generating a summary of the query");
- ``db.operation.name`` and ``db.collection.name`` only when the text has exactly one
  operation and one collection (the conventions ask not to guess them from text that
  names several);
- a sanitised text: libpg_query's normalisation, which replaces every literal constant
  with a ``$n`` placeholder (never a regular expression).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Final

from pglast import parser as pg

SUMMARY_LIMIT: Final = 255

# Statement node -> operation keyword(s), as PostgreSQL spells the command.
_OPERATIONS: Final[dict[str, str]] = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "CopyStmt": "COPY",
    "CreateStmt": "CREATE TABLE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "ViewStmt": "CREATE VIEW",
    "IndexStmt": "CREATE INDEX",
    "CreateSchemaStmt": "CREATE SCHEMA",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "CreateFunctionStmt": "CREATE FUNCTION",
    "CreateRoleStmt": "CREATE ROLE",
    "CreatedbStmt": "CREATE DATABASE",
    "CreateExtensionStmt": "CREATE EXTENSION",
    "AlterTableStmt": "ALTER TABLE",
    "AlterRoleStmt": "ALTER ROLE",
    "AlterSystemStmt": "ALTER SYSTEM",
    "DropStmt": "DROP",
    "DropRoleStmt": "DROP ROLE",
    "DropdbStmt": "DROP DATABASE",
    "TruncateStmt": "TRUNCATE",
    "RenameStmt": "ALTER",
    "CommentStmt": "COMMENT",
    "GrantStmt": "GRANT",
    "GrantRoleStmt": "GRANT",
    "VariableSetStmt": "SET",
    "VariableShowStmt": "SHOW",
    "DiscardStmt": "DISCARD",
    "ExplainStmt": "EXPLAIN",
    "CallStmt": "CALL",
    "DoStmt": "DO",
    "LockStmt": "LOCK",
    "VacuumStmt": "VACUUM",
    "ClusterStmt": "CLUSTER",
    "ReindexStmt": "REINDEX",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "DeclareCursorStmt": "DECLARE",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "NotifyStmt": "NOTIFY",
    "LoadStmt": "LOAD",
    "CheckPointStmt": "CHECKPOINT",
}
_TRANSACTION_KINDS: Final[dict[str, str]] = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "START TRANSACTION",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK TO",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """What the parser found in one query text (one or more statements)."""

    parsed: bool
    statements: int = 0
    operation: str | None = None
    collection: str | None = None
    procedure: str | None = None
    summary: str | None = None


def _statement_operation(name: str, node: dict[str, Any]) -> str:
    if name == "TransactionStmt":
        return _TRANSACTION_KINDS.get(str(node.get("kind")), "TRANSACTION")
    if name == "FetchStmt" and node.get("ismove"):
        return "MOVE"
    if name == "VacuumStmt" and not node.get("is_vacuumcmd", False):
        return "ANALYZE"
    if name == "GrantStmt" and not node.get("is_grant", False):
        return "REVOKE"
    return _OPERATIONS.get(name) or name.removesuffix("Stmt").upper()


def _qualified(node: dict[str, Any]) -> str:
    parts = [node.get("catalogname"), node.get("schemaname"), node.get("relname")]
    return ".".join(str(p) for p in parts if p)


def _function_name(funcname: list[Any]) -> str:
    return ".".join(str(p.get("String", {}).get("sval", "")) for p in funcname)


class _Walker:
    """Collects operations and targets in document order (WITH clauses first)."""

    def __init__(self) -> None:
        self.tokens: list[tuple[str, str]] = []  # ("op" | "target", text)
        self.ctes: set[str] = set()
        self.top: str | None = None  # the statement's own operation

    def walk(self, value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                self.walk(item)
            return
        if not isinstance(value, dict):
            return
        for key, child in value.items():
            if not isinstance(child, dict):
                self.walk(child)
                continue
            if key.endswith("Stmt") and key[:1].isupper():
                self._statement(key, child)
            elif key == "RangeVar" or (key == "relation" and "relname" in child):
                # A statement's own `relation` is a RangeVar without the node wrapper.
                name = _qualified(child)
                if child.get("schemaname") or name not in self.ctes:
                    self.tokens.append(("target", name))
            elif key == "CommonTableExpr":
                self.ctes.add(str(child.get("ctename")))
                self.walk(child)
            else:
                self.walk(child)

    def _statement(self, name: str, node: dict[str, Any]) -> None:
        with_clause = node.get("withClause")
        if with_clause is not None:
            if self.top is None:
                self.top = _statement_operation(name, node)
            self.walk(with_clause)
        operation = _statement_operation(name, node)
        values_only = name == "SelectStmt" and "valuesLists" in node and "fromClause" not in node
        if values_only:
            operation = "VALUES"
        if self.top is None and with_clause is None:
            self.top = operation
        if not values_only or (self.top == operation and not self.tokens):
            # A VALUES list feeding an INSERT is data, not an operation of its own.
            self.tokens.append(("op", operation))
        if name == "CallStmt":
            call = node.get("funccall", {})
            self.tokens.append(("target", _function_name(call.get("funcname", []))))
        elif name == "DropStmt":
            for obj in node.get("objects", []):
                items = obj.get("List", {}).get("items", []) if isinstance(obj, dict) else []
                if items:
                    self.tokens.append(("target", _function_name(items)))
            return
        self.walk({k: v for k, v in node.items() if k != "withClause"})


def _summary(tokens: list[tuple[str, str]]) -> str:
    out: list[str] = []
    size = 0
    for _, text in tokens:
        if size + len(text) + (1 if out else 0) > SUMMARY_LIMIT:
            break
        out.append(text)
        size += len(text) + (1 if len(out) > 1 else 0)
    return " ".join(out)


@functools.lru_cache(maxsize=4096)
def analyze(sql: str) -> QueryInfo:
    """Operation, collection and summary of ``sql`` (cached per distinct text).

    The shipper asks once per query shape (rust/ship ``shape``), not per statement.
    """
    return _analyze(sql)


def _analyze(sql: str) -> QueryInfo:
    try:
        tree = json.loads(pg.parse_sql_json(sql))
    except Exception:  # pglast.parser.ParseError
        return QueryInfo(parsed=False)
    statements = tree.get("stmts", [])
    summaries: list[str] = []
    operations: list[str] = []
    collections: set[str] = set()
    procedure: str | None = None
    op_count = 0
    for raw in statements:
        walker = _Walker()
        walker.walk(raw.get("stmt", {}))
        summaries.append(_summary(walker.tokens))
        ops = [t for kind, t in walker.tokens if kind == "op"]
        op_count += len(ops)
        if walker.top is not None:
            operations.append(walker.top)
        for kind, text in walker.tokens:
            if kind == "target":
                collections.add(text)
        if "CallStmt" in raw.get("stmt", {}):
            targets = [t for kind, t in walker.tokens if kind == "target"]
            procedure = targets[0] if targets else None
    if not statements:
        return QueryInfo(parsed=True)
    if len(statements) == 1:
        single_op = op_count == 1
        return QueryInfo(
            parsed=True,
            statements=1,
            operation=operations[0] if operations else None,
            collection=(
                next(iter(collections))
                if single_op and len(collections) == 1 and procedure is None
                else None
            ),
            procedure=procedure,
            summary=summaries[0] or None,
        )
    # Several statements in one Query message: a batch.
    same_summary = len(set(summaries)) == 1
    same_op = len(set(operations)) == 1 and len(operations) == len(statements)
    return QueryInfo(
        parsed=True,
        statements=len(statements),
        operation=f"BATCH {operations[0]}" if same_op else "BATCH",
        summary=f"BATCH {summaries[0]}" if same_summary and summaries[0] else "BATCH",
    )


@functools.lru_cache(maxsize=4096)
def sanitise(sql: str) -> str | None:
    """``sql`` with every literal replaced by a placeholder; None if it does not parse."""
    try:
        return str(pg.normalize(sql))
    except Exception:  # pglast.parser.ParseError
        return None

"""The statements that would read a masked column around the mask.

On the wire pgwarden masks a column where the server says a result column comes from it:
each RowDescription field carries its origin (table OID and attribute number), and
PostgreSQL follows that origin through subqueries, WITH queries, joins and views in FROM
as long as the column is selected as it is.  Anything that computes with the value
loses the origin, so a statement that touches a masked table is read with the
PostgreSQL grammar (libpg_query) and refused when a masked column, or a whole row of a
masked table, is used anywhere but as a plain output column of a SELECT:

* in an expression, a function call or a cast (``lower(email)``, ``email || ''``,
  ``row_to_json(c)``, ``to_jsonb(c.*)``), a scalar subquery or a set operation
  (``UNION`` keeps no origin);
* in WHERE, JOIN ... ON / USING, GROUP BY, HAVING, ORDER BY (by name or position),
  DISTINCT and DISTINCT ON, window definitions, a WITH query's SEARCH or CYCLE clause, or
  LIMIT (each would let the value be inferred);
* anywhere in a statement that writes or creates (INSERT ... SELECT, UPDATE ... SET x =
  email, RETURNING, CREATE TABLE AS, SELECT INTO, CREATE VIEW);
* in a statement under EXPLAIN, which is judged as the statement itself (its row
  estimates come from the column statistics);
* in ``COPY ... TO`` (CopyData carries no origin) unless its column list leaves every
  masked column out;
* through a view or materialized view that reads a masked column (the gateway lists them
  when the session starts), or a masked table, join, subquery or WITH query whose
  columns are renamed by a column list (``customers AS c(i, n, e)``, ``AS s(x)``);
* and any statement that would change or extend a masked table's definition (ALTER,
  DROP, RENAME, CREATE TABLE ... INHERITS / PARTITION OF, GRANT, COMMENT, ...): a table
  or column renamed would no longer be known by the name the mask gives it.

A session with masks cannot create or run code the grammar cannot read (DO, CREATE
FUNCTION / PROCEDURE), nor call the built-in functions that read a table, a cursor or a
query named by a text argument (``table_to_xml``, ``query_to_xml``, ``cursor_to_xml``,
``ts_stat``, dblink).  A name the grammar cannot tie to a table (``email`` with two
tables in FROM) counts as masked when any masked table in the statement has a column of
that name, and an output alias of a masked column (``email AS e``, and ``e AS f``
above it) is masked under its new name.  Existing functions are not looked into: keep
functions that read masked tables out of reach with a policy rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Final

from pglast import parser as pg_parser

from pgwarden import _wire
from pgwarden.policy.analysis import walk
from pgwarden.policy.names import quote_name

_CACHE_SIZE: Final = 16384
_CACHED_TEXT_CHARS: Final = 16384


class MaskScope:
    """What one session sees masked: the masked columns of each table, and the views
    that read them, by (schema, name), as the catalog has them.  Sessions with
    the same scope share their checks' cache."""

    __slots__ = (
        "_function_names",
        "_hash",
        "_key",
        "calling_views",
        "functions",
        "oracles",
        "tables",
        "views",
    )

    def __init__(
        self,
        tables: dict[tuple[str, str], frozenset[str]],
        views: frozenset[tuple[str, str]],
        oracles: dict[tuple[str, str], dict[str, str]] | None = None,
        functions: frozenset[tuple[str, str]] = frozenset(),
        calling_views: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.tables = tables
        self.views = views
        #: Views (and materialized views) that call one of ``functions``, with its name.
        self.calling_views = calling_views or {}
        #: Functions defined in the database (schema, name) the session may not call.
        self.functions = functions
        self._function_names = frozenset(name for _, name in functions)
        #: Columns a session with masks must not write, by table: the unique index or
        #: foreign key that would answer whether a masked value exists.
        self.oracles = oracles or {}
        self._key = (
            tuple(sorted((k, tuple(sorted(v))) for k, v in tables.items())),
            views,
            tuple(sorted((k, tuple(sorted(v.items()))) for k, v in self.oracles.items())),
            functions,
            tuple(sorted(self.calling_views.items())),
        )
        self._hash = hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MaskScope) and self._key == other._key

    def same_relations(self, other: MaskScope) -> bool:
        """Whether the two differ at most in the functions the session may not call (and
        the views calling them)."""
        return self._key[:3] == other._key[:3]

    def __hash__(self) -> int:
        return self._hash

    def __bool__(self) -> bool:
        return bool(self.tables or self.views or self.calling_views)

    def opaque_function(self, names: list[str]) -> str | None:
        """The name of a call to a function defined in the database that the session may
        not call (without a schema: one of that name in any schema), else None."""
        if not names or names[-1] not in self._function_names:
            return None
        if len(names) == 1:
            return names[0]
        if (names[-2], names[-1]) in self.functions:
            return f"{names[-2]}.{names[-1]}"
        return None


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _grouping_items(node: dict[str, Any]) -> Iterator[Any]:
    """The expressions a grouping set lists, nested sets and row lists opened."""
    for item in node["GroupingSet"].get("content") or []:
        if isinstance(item, dict) and "GroupingSet" in item:
            yield from _grouping_items(item)
        elif isinstance(item, dict) and "RowExpr" in item:
            yield from item["RowExpr"].get("args") or []
        else:
            yield item


def _sval(node: Any) -> str | None:
    if isinstance(node, dict):
        value = node.get("String", {}).get("sval")
        if isinstance(value, str):
            return value
    return None


def _relation_name(schema: str, name: str) -> str:
    return f"{quote_name(schema)}.{quote_name(name)}"


def _names(relation: dict[str, Any], key: tuple[str, str]) -> bool:
    """Whether a RangeVar names the relation ``key`` (schema, name): by both, or, without
    a schema, by its name in any schema (search_path decides, and the caller sets it)."""
    schema = relation.get("schemaname")
    return key[1] == relation.get("relname") and (not isinstance(schema, str) or schema == key[0])


def _fields(column_ref: dict[str, Any]) -> list[str | None]:
    """A ColumnRef's names; ``None`` stands for ``*``."""
    out: list[str | None] = []
    for field in column_ref.get("fields") or []:
        if isinstance(field, dict) and "A_Star" in field:
            out.append(None)
        else:
            out.append(_sval(field))
    return out


def _relations(body: Any) -> Iterator[dict[str, Any]]:
    """Every relation a statement names (RangeVar nodes)."""
    for item in walk(body):
        if isinstance(item.get("relname"), str) and "inh" in item:
            yield item


class _Statement:
    """One statement checked against a scope."""

    def __init__(self, scope: MaskScope) -> None:
        self.scope = scope
        self.columns: set[str] = set()  # masked column names in play
        self.rows: set[str] = set()  # names whose whole row carries masked values
        self.tables: list[str] = []  # the masked tables named, for the message
        self.positional = False  # an output column was named by its position

    def _table(self, relation: dict[str, Any]) -> frozenset[str] | None:
        # Relation names as the catalog stores them: the parser folds unquoted names to
        # lower case and keeps quoted ones ("Customer", an ORM's table) as written.
        name = str(relation.get("relname", ""))
        schema = relation.get("schemaname")
        if isinstance(schema, str):
            found = self.scope.tables.get((schema, name))
            if found is not None:
                self.tables.append(_relation_name(schema, name))
            return found
        # Without a schema the name resolves through search_path: any schema counts.
        hits = [(s, cols) for (s, t), cols in self.scope.tables.items() if t == name]
        if not hits:
            return None
        self.tables.extend(_relation_name(s, name) for s, _ in hits)
        return frozenset().union(*(cols for _, cols in hits))

    def _view(self, relation: dict[str, Any]) -> str | None:
        """Why a view the statement names is refused: it reads masked columns, or calls a
        function the session may not call."""
        for view in self.scope.views:
            if _names(relation, view):
                return f"the view {_relation_name(*view)} reads masked columns"
        for view, function in self.scope.calling_views.items():
            if _names(relation, view):
                return (
                    f"the view {_relation_name(*view)} calls {function}, a function defined "
                    "in the database"
                )
        return None

    def touches(self, body: dict[str, Any]) -> bool:
        """Whether the statement names a masked table (and so must be read closely); a
        view over masked columns refuses it outright."""
        touched = False
        for relation in _relations(body):
            view = self._view(relation)
            if view is not None:
                raise _Refused(view)
            columns = self._table(relation)
            if columns is None:
                continue
            touched = True
            self.columns |= {c.lower() for c in columns}
            self.rows.add(str(relation.get("relname", "")).lower())
            alias = relation.get("alias")
            if isinstance(alias, dict):
                if alias.get("colnames"):
                    # customers AS c(i, n, e): the columns go by other names.
                    raise _Refused("a masked table's columns are renamed by a column list")
                if isinstance(alias.get("aliasname"), str):
                    self.rows.add(alias["aliasname"].lower())
        if touched:
            self._names_in_play(body)
        return touched

    def _names_in_play(self, body: dict[str, Any]) -> None:
        """Output names that carry a masked column under another name (``email AS e`` in
        a subquery), and the names of subqueries and WITH queries, whose whole rows may
        carry masked values."""
        aliases: list[tuple[str, dict[str, Any]]] = []
        for item in walk(body):
            target = item.get("ResTarget")
            if isinstance(target, dict) and isinstance(target.get("name"), str):
                val = target.get("val")
                if isinstance(val, dict) and "ColumnRef" in val:
                    aliases.append((target["name"].lower(), val))
        # An alias of an alias (``e AS f`` over ``email AS e``), in any nesting order.
        grown = True
        while grown:
            grown = False
            for name, val in aliases:
                if name not in self.columns and self._masked_ref(val):
                    self.columns.add(name)
                    grown = True
        for item in walk(body):
            join = item.get("JoinExpr")
            if isinstance(join, dict) and (join.get("alias") or {}).get("colnames"):
                # (customers CROSS JOIN t) AS j(a, b, x): every column under a new name.
                raise _Refused("a join's columns are renamed by a column list")
            sub = item.get("RangeSubselect")
            if isinstance(sub, dict):
                alias = sub.get("alias")
                if isinstance(alias, dict):
                    if alias.get("colnames") and self._reads_masked(sub.get("subquery")):
                        raise _Refused("a subquery's columns are renamed by a column list")
                    if isinstance(alias.get("aliasname"), str):
                        self.rows.add(alias["aliasname"].lower())
            cte = item.get("CommonTableExpr")
            if isinstance(cte, dict):
                if cte.get("aliascolnames") and self._reads_masked(cte.get("ctequery")):
                    raise _Refused("a WITH query's columns are renamed by a column list")
                if isinstance(cte.get("ctename"), str):
                    self.rows.add(cte["ctename"].lower())

    def _reads_masked(self, node: Any) -> bool:
        """Whether anything in ``node`` may read a masked column (or ``*``)."""
        return any("ColumnRef" in item and self._masked_ref(item) for item in walk(node))

    def _masked_ref(self, node: dict[str, Any]) -> bool:
        """A ColumnRef node that may read a masked column, a whole masked row or ``*``."""
        fields = _fields(node["ColumnRef"])
        if not fields:
            return False
        last = fields[-1]
        if last is None:
            return True  # * or t.*
        if len(fields) == 1 and last.lower() in self.rows:
            return True  # a whole row
        # "*": a mask of every column, before the catalog named them (policy check).
        return last.lower() in self.columns or "*" in self.columns

    def _whole_row(self, node: dict[str, Any]) -> bool:
        fields = _fields(node["ColumnRef"])
        return len(fields) == 1 and fields[0] is not None and fields[0].lower() in self.rows

    def nowhere(self, node: Any, where: str) -> None:
        """Refuses any masked column read in ``node`` (a position with no origin)."""
        for item in walk(node):
            column_ref = item.get("ColumnRef")
            if isinstance(column_ref, dict) and self._masked_ref(item):
                fields = _fields(column_ref)
                name = ".".join("*" if f is None else f for f in fields)
                raise _Refused(f"{name} is used {where}")
            join = item.get("JoinExpr")
            if isinstance(join, dict):
                self._join(join)

    def _join(self, join: dict[str, Any]) -> None:
        if join.get("isNatural"):
            raise _Refused("a NATURAL JOIN compares columns of a masked table")
        for name in join.get("usingClause") or []:
            value = _sval(name)
            if value is not None and value.lower() in self.columns:
                raise _Refused(f"{value} is used in JOIN ... USING")

    def select(self, node: Any, plain: bool) -> None:
        """A SELECT whose plain output columns keep their origin when ``plain``."""
        if not isinstance(node, dict):
            return
        body = node.get("SelectStmt")
        if not isinstance(body, dict):
            self.nowhere(node, "in a statement that writes")
            return
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            # The arms are SelectStmt bodies without their node name.
            self.select({"SelectStmt": body.get("larg")}, False)
            self.select({"SelectStmt": body.get("rarg")}, False)
            self.nowhere(body.get("sortClause"), "in ORDER BY")
            return
        with_clause = body.get("withClause")
        if isinstance(with_clause, dict):
            for cte in with_clause.get("ctes") or []:
                expr = cte.get("CommonTableExpr", {})
                if expr.get("search_clause") or expr.get("cycle_clause"):
                    raise _Refused("a WITH query's SEARCH or CYCLE clause compares its columns")
                self.select(expr.get("ctequery"), plain)
        for item in body.get("fromClause") or []:
            self._from(item, plain)
        targets = body.get("targetList") or []
        for target in targets:
            val = target.get("ResTarget", {}).get("val")
            if isinstance(val, dict) and "ColumnRef" in val:
                if not plain and self._masked_ref(val):
                    self.nowhere(val, "where its origin is lost (set operation or subquery)")
                if self._whole_row(val):
                    self.nowhere(val, "as a whole row")
                continue
            self.nowhere(val, "in an expression")
        self.nowhere(body.get("whereClause"), "in WHERE")
        self.nowhere(body.get("havingClause"), "in HAVING")
        self.nowhere(body.get("windowClause"), "in a window")
        self.nowhere(body.get("limitCount"), "in LIMIT")
        self.nowhere(body.get("limitOffset"), "in OFFSET")
        self.nowhere(body.get("valuesLists"), "in VALUES")
        distinct = body.get("distinctClause") or []
        on = [d for d in distinct if d]
        self._ordered(on, targets, "in DISTINCT ON")
        if distinct and not on:
            # Plain DISTINCT compares every output column.
            self.nowhere(targets, "in SELECT DISTINCT")
        self._ordered(body.get("groupClause"), targets, "in GROUP BY")
        self._ordered(body.get("sortClause"), targets, "in ORDER BY")

    def _ordered(self, items: Any, targets: list[Any], where: str) -> None:
        """GROUP BY / ORDER BY, whose items may name an output column by position."""
        for item in items or []:
            if isinstance(item, dict) and "GroupingSet" in item:
                # ROLLUP (1), CUBE ((2, 1)), GROUPING SETS ((1), ()): each integer in
                # them names an output column by position too.
                self._ordered(list(_grouping_items(item)), targets, where)
                continue
            expr = item.get("SortBy", {}).get("node", item) if isinstance(item, dict) else item
            position = (
                expr.get("A_Const", {}).get("ival", {}).get("ival")
                if isinstance(expr, dict)
                else None
            )
            if isinstance(position, int):
                self.positional = True
            if isinstance(position, int) and 0 < position <= len(targets):
                self.nowhere(targets[position - 1].get("ResTarget", {}).get("val"), where)
            else:
                self.nowhere(expr, where)

    def _from(self, item: Any, plain: bool) -> None:
        if not isinstance(item, dict):
            return
        if "RangeSubselect" in item:
            self.select(item["RangeSubselect"].get("subquery"), plain)
        elif "JoinExpr" in item:
            join = item["JoinExpr"]
            self._join(join)
            self._from(join.get("larg"), plain)
            self._from(join.get("rarg"), plain)
            self.nowhere(join.get("quals"), "in JOIN ... ON")
        elif "RangeVar" not in item:
            self.nowhere(item, "in FROM")  # functions, TABLESAMPLE, JSON_TABLE, ...

    def copy(self, body: dict[str, Any]) -> None:
        if body.get("is_from"):
            return  # COPY FROM writes the table, reads nothing
        if body.get("query") is not None:
            self.nowhere(body.get("query"), "in COPY (CopyData is not masked)")
            return
        relation = body.get("relation")
        columns = self._table(relation) if isinstance(relation, dict) else None
        if not columns:
            return
        listed = [_sval(a) for a in body.get("attlist") or []]
        if not listed or any(c is not None and c.lower() in columns for c in listed):
            raise _Refused("COPY TO sends masked columns as CopyData, which is not masked")


def refusal_reason(sql: str, scope: MaskScope) -> str | None:
    """Why ``sql`` would read a masked column of ``scope`` around the mask, or None.
    Unparsable texts are the statement policy's to refuse.

    Cached per scope and number-blind key (texts differing only in numeric constants
    share a verdict), except for texts that use an output column's position (``ORDER BY
    1``), whose numbers matter: those are cached by their exact text."""
    if len(sql) > _CACHED_TEXT_CHARS:
        return _reason(sql, scope)[0]
    blind = _wire.number_blind_key(sql)
    key = (scope, blind if blind is not None else sql)
    found = _CACHE.get(key, _MISSING)
    if found is _POSITIONAL:
        key = (scope, sql)
        found = _CACHE.get(key, _MISSING)
    if found is _MISSING:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        found, positional = _reason(sql, scope)
        if positional and key[1] != sql:
            _CACHE[key] = _POSITIONAL
            key = (scope, sql)
        _CACHE[key] = found
    return found if isinstance(found, str) else None


_MISSING: Final = object()
_POSITIONAL: Final = object()
_CACHE: dict[tuple[MaskScope, str], object] = {}


def _reason(sql: str, scope: MaskScope) -> tuple[str | None, bool]:
    """The refusal reason, and whether an output column was named by its position (its
    number then matters to the verdict)."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(sql))
    except Exception:  # the policy refuses what the grammar cannot read
        return None, False
    positional = False
    for raw in tree.get("stmts") or []:
        stmt = raw.get("stmt") if isinstance(raw, dict) else None
        if not isinstance(stmt, dict) or not stmt:
            continue
        node, body = next(iter(stmt.items()))
        if not isinstance(body, dict):
            continue
        check = _Statement(scope)
        try:
            if node in _OPAQUE_CODE:
                raise _Refused(
                    "a session with masked columns cannot create or run server-side code "
                    "the gateway cannot read (DO, CREATE FUNCTION, CREATE PROCEDURE)"
                )
            call = _refused_call(scope, body)
            if call is not None:
                raise _Refused(call)
            _check_writes(scope, node, body)
            if not check.touches(body):
                continue
            _check(check, node, body)
        except _Refused as refused:
            tables = ", ".join(dict.fromkeys(check.tables))
            reason = f"{refused.reason} ({tables})" if tables else refused.reason
            return reason, positional or check.positional
        positional = positional or check.positional
    return None, positional


def _check_writes(scope: MaskScope, node: str, body: dict[str, Any]) -> None:
    """Refuses a write that sets a column whose unique index or foreign key would answer
    whether a masked value exists (``insert into customers (email) values ('ada@...')``
    failing with a unique violation, or succeeding under ON CONFLICT DO NOTHING with no
    row): the value is the caller's, but its fate is an oracle on the stored ones."""
    if not scope.oracles:
        return
    writes: list[tuple[str, dict[str, Any]]] = [(node, body)]
    for item in walk(body):
        for key in ("InsertStmt", "UpdateStmt", "MergeStmt"):
            inner = item.get(key)
            if isinstance(inner, dict):
                writes.append((key, inner))
    for kind, stmt in writes:
        relation = stmt.get("relation")
        if not isinstance(relation, dict):
            continue
        guarded = _oracle_columns(scope, relation)
        if not guarded:
            continue
        written = _written(kind, stmt)
        hits = sorted(guarded if written is None else (c for c in written if c in guarded))
        if hits:
            table = relation.get("relname", "")
            column = hits[0]
            raise _Refused(
                f"writing {column} of {table} would tell whether a value of a masked column "
                f"exists ({guarded[column]})"
            )


def _oracle_columns(scope: MaskScope, relation: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for table, columns in scope.oracles.items():
        if _names(relation, table):
            found.update(columns)
    return found


def _written(kind: str, stmt: dict[str, Any]) -> list[str] | None:
    """The columns a write sets, by name; None when it may set every column (an INSERT or
    COPY FROM without a column list)."""
    names: list[str] = []

    def targets(items: Any) -> None:
        for item in items or []:
            target = item.get("ResTarget") if isinstance(item, dict) else None
            if isinstance(target, dict) and isinstance(target.get("name"), str):
                names.append(target["name"])

    if kind == "InsertStmt":
        if not stmt.get("cols"):
            return None
        targets(stmt.get("cols"))
        conflict = stmt.get("onConflictClause")
        if isinstance(conflict, dict):
            targets(conflict.get("targetList"))
    elif kind == "UpdateStmt":
        targets(stmt.get("targetList"))
    elif kind == "MergeStmt":
        for clause in stmt.get("mergeWhenClauses") or []:
            when = clause.get("MergeWhenClause") if isinstance(clause, dict) else None
            if not isinstance(when, dict):
                continue
            if when.get("commandType") == "CMD_INSERT" and not when.get("targetList"):
                return None
            targets(when.get("targetList"))
    elif kind == "CopyStmt":
        if not stmt.get("is_from"):
            return []
        if not stmt.get("attlist"):
            return None
        names.extend(n for n in (_sval(a) for a in stmt["attlist"]) if n is not None)
    else:
        return []
    return names


#: Statements that may name a masked table without changing what it is: reads (checked
#: closely), writes (whose reads are checked), and maintenance.  Any other statement
#: naming one (ALTER, DROP, CREATE ... INHERITS, RENAME, GRANT, COMMENT, ...) is refused:
#: a renamed table or column would no longer be known by its masked name.
_DATA_STATEMENTS: Final = frozenset(
    {
        "SelectStmt",
        "InsertStmt",
        "UpdateStmt",
        "DeleteStmt",
        "MergeStmt",
        "CopyStmt",
        "ExplainStmt",
        "DeclareCursorStmt",
        "PrepareStmt",
        "TruncateStmt",
        "LockStmt",
        "VacuumStmt",
    }
)


#: Code whose body the gateway cannot read (PL/pgSQL, string-bodied SQL functions): it
#: could select masked columns and hand them back through a notice, an error or a result
#: without an origin.
_OPAQUE_CODE: Final = frozenset({"DoStmt", "CreateFunctionStmt"})


#: Built-in functions that read a table, a cursor or a query named by a text argument
#: (``table_to_xml('customers', ...)``, ``query_to_xml('select email ...', ...)``,
#: ``cursor_to_xml``, ``ts_stat``) and dblink, which runs a query on a connection of its
#: own: what they read is a string to the grammar, and comes back without an origin.
#: Logical decoding (``pg_logical_slot_get_changes`` and its kin, for roles with
#: REPLICATION) returns the changed rows as text, ``pg_read_binary_file`` (for roles
#: allowed to read server files) a table's data files, and ``pg_stat_get_activity`` the
#: statements other sessions run, literals included (what pg_stat_activity.query shows
#: masked).
_TEXT_READERS: Final = frozenset(
    {
        "table_to_xml",
        "query_to_xml",
        "cursor_to_xml",
        "schema_to_xml",
        "database_to_xml",
        "table_to_xml_and_xmlschema",
        "query_to_xml_and_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "pg_read_file",
        "pg_read_binary_file",
        "pg_stat_get_activity",
        "pg_stat_get_backend_activity",
        "pg_stat_statements",
    }
)
_TEXT_READER_PREFIXES: Final = ("dblink", "pg_logical_slot_")


def _refused_call(scope: MaskScope, body: dict[str, Any]) -> str | None:
    """Why the first call in ``body`` the session may not make is refused: a function
    that reads what a text names, or one defined in the database that no mask trusts
    (in an expression, in FROM, or CALL's own, which is not wrapped in a FuncCall)."""
    for item in walk(body):
        for call in (item.get("FuncCall"), item.get("funccall")):
            if not isinstance(call, dict):
                continue
            names = [n for n in (_sval(f) for f in call.get("funcname") or []) if n is not None]
            name = names[-1].lower() if names else ""
            arguments = len(call.get("args") or [])
            if (
                name in _TEXT_READERS
                or name.startswith(_TEXT_READER_PREFIXES)
                or (name == "ts_rewrite" and arguments == 2)  # its second argument is a query
            ):
                return (
                    f"a session with masked columns cannot call {name}: what it reads "
                    "is out of the gateway's sight, and what it returns cannot be masked"
                )
            opaque = scope.opaque_function(names)
            if opaque is not None:
                return (
                    f"a session with masked columns cannot call {opaque}: a function defined "
                    "in the database may read masked columns and return them without an "
                    "origin (a mask's trusted_functions lists those it may call)"
                )
    return None


def _check(check: _Statement, node: str, body: dict[str, Any]) -> None:
    if node not in _DATA_STATEMENTS:
        raise _Refused("the statement would change or extend a masked table")
    if node == "SelectStmt" and not body.get("intoClause"):
        check.select({"SelectStmt": body}, True)
    elif node in ("DeclareCursorStmt", "PrepareStmt"):
        check.select(body.get("query"), True)
    elif node == "ExplainStmt":
        # A plan shows no rows, but its row estimates come from the column statistics
        # (EXPLAIN of ``WHERE email < 'b'`` tells how many values sort before 'b'), and
        # EXPLAIN ANALYZE runs its statement: either way the statement must pass.
        inner = body.get("query")
        if isinstance(inner, dict) and inner:
            inner_node, inner_body = next(iter(inner.items()))
            if isinstance(inner_body, dict):
                _check(check, inner_node, inner_body)
    elif node == "CopyStmt":
        check.copy(body)
    else:
        check.nowhere(body, "in a statement that writes or creates")

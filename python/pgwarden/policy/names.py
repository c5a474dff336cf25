"""Column names in the policy file, read with PostgreSQL's own grammar.

A ``[[mask]]`` names its columns as ``schema.table.column`` (``column`` may be ``*``), in
SQL syntax: unquoted identifiers are folded to lower case as PostgreSQL folds them
(``Shop.Customers.Email`` is ``shop.customers.email``), double-quoted ones are kept as
written (``public."Customer"."eMail"``, the names an ORM such as Prisma creates).  The
names are compared with the catalog's as it stores them, byte for byte.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Final

from pglast import keywords
from pglast import parser as pg_parser

#: Column parts: schema, table, column (``*``: every column of the table).
ColumnName = tuple[str, str, str]

_BARE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_$")
#: Keywords a bare name cannot be (PostgreSQL's quote_ident quotes all but unreserved ones).
_KEYWORDS: Final = frozenset(
    keywords.RESERVED_KEYWORDS | keywords.COL_NAME_KEYWORDS | keywords.TYPE_FUNC_NAME_KEYWORDS
)
#: What ``SELECT schema.table.column`` parses to besides its one target.
_SELECT_DEFAULTS: Final = {"limitOption": "LIMIT_OPTION_DEFAULT", "op": "SETOP_NONE"}
_SHAPE: Final = "columns are named schema.table.column (or schema.table.*)"


def quote_name(name: str) -> str:
    """``name`` as SQL writes it: bare when it reads back the same, else double-quoted."""
    bare = name and set(name) <= _BARE and not name[0].isdigit() and name[0] != "$"
    if bare and name not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def format_column(parts: ColumnName) -> str:
    schema, table, column = parts
    last = "*" if column == "*" else quote_name(column)
    return f"{quote_name(schema)}.{quote_name(table)}.{last}"


@lru_cache(maxsize=1024)
def parse_column(spec: str) -> ColumnName:
    """The schema, table and column a policy's ``schema.table.column`` names; ValueError
    with the reason when it is not one column reference of three parts."""
    if "\0" in spec or not spec.strip():
        raise ValueError(f"{spec!r}: {_SHAPE}")
    try:
        tree = json.loads(pg_parser.parse_sql_json("SELECT " + spec))
    except pg_parser.ParseError as exc:
        raise ValueError(f"{spec!r}: {_SHAPE} ({exc})") from None
    fields = _only_column_ref(tree)
    if fields is None or len(fields) != 3:
        raise ValueError(f"{spec!r}: {_SHAPE}")
    parts: list[str] = []
    for index, field in enumerate(fields):
        if not isinstance(field, dict):
            raise ValueError(f"{spec!r}: {_SHAPE}")
        if "A_Star" in field and index == 2:
            parts.append("*")
            continue
        name = field.get("String", {}).get("sval")
        if not isinstance(name, str) or not name or name == "*":
            raise ValueError(f"{spec!r}: {_SHAPE}")
        if any(ord(c) < 0x20 for c in name):
            raise ValueError(f"{spec!r}: {name!r} holds a control character")
        parts.append(name)
    return parts[0], parts[1], parts[2]


def _only_column_ref(tree: Any) -> list[Any] | None:
    """The fields of the one ColumnRef ``SELECT <spec>`` selects, or None when the text
    is anything else (more targets, an alias, a FROM, another statement...)."""
    stmts = tree.get("stmts") if isinstance(tree, dict) else None
    if not isinstance(stmts, list) or len(stmts) != 1:
        return None
    select = stmts[0].get("stmt", {}).get("SelectStmt")
    if not isinstance(select, dict):
        return None
    targets = select.get("targetList")
    rest = {k: v for k, v in select.items() if k != "targetList"}
    if rest != _SELECT_DEFAULTS or not isinstance(targets, list) or len(targets) != 1:
        return None
    target = targets[0].get("ResTarget", {})
    if set(target) != {"val", "location"}:
        return None
    ref = target["val"].get("ColumnRef") if isinstance(target["val"], dict) else None
    fields = ref.get("fields") if isinstance(ref, dict) else None
    return fields if isinstance(fields, list) else None

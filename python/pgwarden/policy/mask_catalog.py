"""Where a session's masked columns are: their table OIDs and attribute numbers, read from
the catalog of the session's own database when it starts (with the inheritance children
and partitions of the masked tables, and their parents, whose columns of the same name
are masked too), and the views that read them.

RowDescription names a result column's origin by table OID and attribute number, which
is what the wire masker matches (``SessionCodec.mask_columns``).  The lookup runs on the
session's upstream connection, as its role, after login and before the client's first
message: one round trip per session that has masks.  Views and materialized views that
read a masked column (directly or through other views, from ``pg_depend``) are listed
too: their columns' origin is the view, so statements naming them are refused
(:mod:`pgwarden.policy.mask_check`).  So are the columns whose writes would answer
whether a masked value exists: masked columns in a unique or exclusion index, and the
columns of foreign keys referencing a masked column.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pgwarden import _wire, errors
from pgwarden.errors import ConnectionClosed, GatewayError
from pgwarden.policy.mask_check import MaskScope
from pgwarden.policy.names import format_column, parse_column
from pgwarden.policy.rules import Mask
from pgwarden.transport import PgStream

log = logging.getLogger(__name__)

_Q, _D, _C, _T, _Z, _E, _N, _S = (ord(c) for c in "QDCTZENS")

#: A masked column as a later lookup keeps it: table OID, attribute number, mask index.
Masked = tuple[int, int, int]
#: Masked columns of the session (``mask_columns``' argument): table OID, attribute
#: number, the replacement text (None: NULL), "schema.table.column", the characters kept.
WireColumns = list[tuple[int, int, bytes | None, str, int]]


@dataclass(frozen=True, slots=True)
class SessionMasks:
    """What one session has masked."""

    scope: MaskScope
    columns: WireColumns
    names: tuple[str, ...]  # "schema.table.column", for the log
    #: Columns the policy's own masks name that the database does not have (a typo, or
    #: a table renamed by a migration, masked then only by its kept OID): for the log.
    missing: tuple[str, ...] = ()
    #: The masked columns by OID, attribute number and mask index, for later lookups.
    masked: tuple[Masked, ...] = ()


def _literal(value: str) -> str:
    # An escape string literal reads the same whatever standard_conforming_strings says;
    # names hold no NUL or control characters (rules.Mask).
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def lookup_sql(masks: Sequence[Mask], kept: Sequence[Masked] = ()) -> str:
    """One query listing each masked column (``c`` rows: table OID, attnum, schema,
    table, column, mask index), each view reading one (``v`` rows), and each column whose
    writes would tell whether a value of a masked column exists (``o`` rows, with the
    unique index or foreign key that would tell).  Columns of ``kept`` (OID, attnum, mask
    index: masked by an earlier lookup) stay masked while they exist, renamed or not."""
    wanted = []
    for index, mask in enumerate(masks):
        for column in mask.columns:
            schema, table, name = parse_column(column)
            wanted.append(f"({_literal(schema)},{_literal(table)},{_literal(name)},{index})")
    by_oid = ""
    if kept:
        values = ",".join(f"({oid}::pg_catalog.oid,{att},{index})" for oid, att, index in kept)
        by_oid = (
            "UNION ALL SELECT a.attrelid, a.attname, k.mask "
            f"FROM (VALUES {values}) k(reloid, attnum, mask) "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = k.reloid AND a.attnum = k.attnum "
            "AND NOT a.attisdropped "
        )
    return (
        "WITH RECURSIVE wanted(nsp, rel, col, mask) AS (VALUES " + ",".join(wanted) + "), base AS ("
        "SELECT reloid, attname, min(mask) AS mask FROM ("
        "SELECT c.oid AS reloid, a.attname, w.mask "
        "FROM wanted w "
        "JOIN pg_catalog.pg_namespace n ON n.nspname = w.nsp "
        "JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = w.rel "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
        "AND NOT a.attisdropped AND (w.col = '*' OR a.attname = w.col) "
        + by_oid
        + ") named GROUP BY 1, 2"
        # Inheritance children and partitions hold the same columns (by name, maybe at
        # other attribute numbers) and can be selected directly.
        "), rels(reloid, attname, mask) AS ("
        "SELECT reloid, attname, mask FROM base "
        "UNION "
        "SELECT i.inhrelid, r.attname, r.mask FROM rels r "
        "JOIN pg_catalog.pg_inherits i ON i.inhparent = r.reloid"
        # Their parents (and theirs) return the masked table's rows too, under the
        # parent's OID: the column of the same name is masked there as well.
        "), ancestors(reloid, attname, mask) AS ("
        "SELECT i.inhparent, b.attname, b.mask FROM base b "
        "JOIN pg_catalog.pg_inherits i ON i.inhrelid = b.reloid "
        "UNION "
        "SELECT i.inhparent, u.attname, u.mask FROM ancestors u "
        "JOIN pg_catalog.pg_inherits i ON i.inhrelid = u.reloid"
        "), cols AS ("
        "SELECT r.reloid, a.attnum, n.nspname, c.relname, a.attname, min(r.mask) AS mask "
        "FROM (SELECT * FROM rels UNION SELECT * FROM ancestors) r "
        "JOIN pg_catalog.pg_class c ON c.oid = r.reloid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = r.reloid AND a.attname = r.attname "
        "AND NOT a.attisdropped "
        "GROUP BY 1, 2, 3, 4, 5"
        "), views(oid) AS ("
        "SELECT r.ev_class FROM pg_catalog.pg_depend d "
        "JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid "
        "JOIN cols ON d.refobjid = cols.reloid AND d.refobjsubid = cols.attnum "
        "WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND r.ev_class <> cols.reloid "
        "UNION "
        "SELECT r.ev_class FROM views v JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid "
        "JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid "
        "WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND r.ev_class <> v.oid"
        # Columns whose writes answer whether a value exists: masked columns in a unique
        # or exclusion index (plain or on an expression), and the columns of foreign keys
        # that reference a masked column.
        "), oracles(reloid, attnum, what) AS ("
        # A key column of a unique or exclusion index...
        "SELECT cols.reloid, cols.attnum, CASE WHEN i.indisexclusion THEN 'exclusion index ' "
        "ELSE 'unique index ' END || ic.relname::text FROM cols "
        "JOIN pg_catalog.pg_index i ON i.indrelid = cols.reloid "
        "AND (i.indisunique OR i.indisexclusion) "
        "AND cols.attnum = ANY ((i.indkey::pg_catalog.int2[])[0:i.indnkeyatts - 1]) "
        "JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid "
        # ...a column of its expressions or predicate (the index depends on it)...
        "UNION "
        "SELECT cols.reloid, cols.attnum, CASE WHEN i.indisexclusion THEN 'exclusion index ' "
        "ELSE 'unique index ' END || ic.relname::text FROM cols "
        "JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND d.refobjid = cols.reloid AND d.refobjsubid = cols.attnum "
        "AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "JOIN pg_catalog.pg_index i ON i.indexrelid = d.objid "
        "AND (i.indisunique OR i.indisexclusion) "
        "JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid "
        # ...or of an exclusion constraint's expressions (its constraint depends on it).
        "UNION "
        "SELECT cols.reloid, cols.attnum, CASE WHEN k.contype = 'x' THEN 'exclusion index ' "
        "ELSE 'unique index ' END || ic.relname::text FROM cols "
        "JOIN pg_catalog.pg_depend d ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND d.refobjid = cols.reloid AND d.refobjsubid = cols.attnum "
        "AND d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass "
        "JOIN pg_catalog.pg_constraint k ON k.oid = d.objid AND k.contype IN ('u', 'p', 'x') "
        "JOIN pg_catalog.pg_class ic ON ic.oid = k.conindid "
        "UNION "
        "SELECT k.conrelid, k.conkey[g.i], 'foreign key ' || k.conname::text FROM cols "
        "JOIN pg_catalog.pg_constraint k ON k.contype = 'f' AND k.confrelid = cols.reloid "
        "CROSS JOIN LATERAL pg_catalog.generate_subscripts(k.confkey, 1) AS g(i) "
        "WHERE k.confkey[g.i] = cols.attnum"
        # Functions and procedures defined in the database (not in the system catalog,
        # not an extension's, not another session's temporary ones): their bodies are out
        # of the gateway's sight. And the views that call them, directly or through views.
        "), functions(oid, nspname, proname) AS ("
        "SELECT p.oid, n.nspname, p.proname "
        "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.oid >= 16384 AND n.nspname NOT LIKE 'pg\\_temp\\_%' "
        "AND NOT EXISTS (SELECT FROM pg_catalog.pg_depend d "
        "WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid "
        "AND d.deptype = 'e')"
        "), calling_views(oid, fname) AS ("
        "SELECT r.ev_class, f.nspname::text || '.' || f.proname::text FROM functions f "
        "JOIN pg_catalog.pg_depend d ON d.refobjid = f.oid "
        "AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass "
        "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid "
        "UNION "
        "SELECT r.ev_class, v.fname FROM calling_views v JOIN pg_catalog.pg_depend d "
        "ON d.refobjid = v.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
        "AND d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
        "JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid AND r.ev_class <> v.oid"
        ") "
        "SELECT 'c', reloid::int8, attnum::int4, nspname::text, relname::text, attname::text, "
        "mask, '' FROM cols "
        "UNION ALL "
        "SELECT 'v', c.oid::int8, 0, n.nspname::text, c.relname::text, '', -1, '' "
        "FROM (SELECT DISTINCT oid FROM views) v JOIN pg_catalog.pg_class c ON c.oid = v.oid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "UNION ALL "
        "SELECT DISTINCT 'f', 0::int8, 0, nspname::text, proname::text, '', -1, '' "
        "FROM functions "
        "UNION ALL "
        "SELECT DISTINCT 'w', c.oid::int8, 0, n.nspname::text, c.relname::text, '', -1, "
        "cv.fname FROM calling_views cv JOIN pg_catalog.pg_class c ON c.oid = cv.oid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "UNION ALL "
        "SELECT 'o', o.reloid::int8, o.attnum::int4, n.nspname::text, c.relname::text, "
        "a.attname::text, -1, o.what "
        "FROM oracles o JOIN pg_catalog.pg_class c ON c.oid = o.reloid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = o.reloid AND a.attnum = o.attnum"
    )


def named_columns(masks: Sequence[Mask]) -> dict[tuple[str, str], set[str]]:
    """The columns the masks name, by (schema, table) (``*``: every column)."""
    tables: dict[tuple[str, str], set[str]] = {}
    for mask in masks:
        for spec in mask.columns:
            schema, table, column = parse_column(spec)
            tables.setdefault((schema, table), set()).add(column)
    return tables


def _values(body: bytes) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body)
    at = 2
    out: list[str | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, at)
        at += 4
        if length < 0:
            out.append(None)
            continue
        out.append(body[at : at + length].decode("utf-8", "replace"))
        at += length
    return out


def _failed(reason: str) -> GatewayError:
    log.error("masking: the catalog lookup failed: %s", reason)
    return GatewayError(
        errors.INTERNAL_ERROR,
        "pgwarden could not look up the columns this session must see masked",
        hint="The session is refused rather than shown unmasked data; see the gateway log.",
    )


async def resolve(
    stream: PgStream, masks: Sequence[Mask], kept: Sequence[Masked] = ()
) -> SessionMasks:
    """Looks the masked columns up on a logged-in upstream connection (ReadyForQuery
    received, nothing else pending); leaves it ready for the client's first message.
    Any failure is a :class:`GatewayError`: the session does not start unmasked."""
    sql = lookup_sql(masks, kept)
    stream.write(_wire.encode_message(_Q, sql.encode() + b"\0"))
    rows: list[list[str | None]] = []
    error: str | None = None
    while True:
        try:
            tag, body = await stream.read_message()
        except ConnectionClosed:
            raise _failed("the server closed the connection") from None
        if tag == _D:
            try:
                rows.append(_values(body))
            except (struct.error, UnicodeDecodeError) as exc:
                raise _failed(f"malformed DataRow ({exc})") from None
        elif tag == _E:
            error = _wire.decode_fields(body).get("M", "(no message)")
        elif tag == _Z:
            break
        elif tag not in (_T, _C, _N, _S):
            raise _failed(f"unexpected message {chr(tag)!r}")
    if error is not None:
        raise _failed(error)
    tables: dict[tuple[str, str], set[str]] = {}
    views: set[tuple[str, str]] = set()
    columns: WireColumns = []
    names = []
    oracles: dict[tuple[str, str], dict[str, str]] = {}
    functions: set[tuple[str, str]] = set()
    calling_views: dict[tuple[str, str], str] = {}
    tables_found: set[tuple[str, str, str]] = set()
    masked: list[Masked] = []
    trusted = [p for mask in masks for p in mask.trusted_functions]
    for kind, oid, attnum, schema, table, column, index, what in rows:
        if oid is None or schema is None or table is None:
            continue
        if kind == "v":
            views.add((schema, table))
            continue
        if kind == "o":
            if column is not None:
                oracles.setdefault((schema, table), {})[column] = what or ""
            continue
        if kind == "f":
            if not any(fnmatchcase(f"{schema}.{table}", p) for p in trusted):
                functions.add((schema, table))
            continue
        if kind == "w":
            if what and not any(fnmatchcase(what, p) for p in trusted):
                calling_views.setdefault((schema, table), what)
            continue
        if attnum is None or column is None or index is None:
            continue
        mask = masks[int(index)]
        replacement = None if mask.style == "null" else mask.replacement.encode()
        keep = mask.keep_last if mask.style == "partial" else 0
        name = format_column((schema, table, column))
        columns.append((int(oid), int(attnum), replacement, name, keep))
        masked.append((int(oid), int(attnum), int(index)))
        tables.setdefault((schema, table), set()).add(column)
        tables_found.add((schema, table, column))
        names.append(name)
    # Configured names the catalog does not have (yet) are still kept from being read
    # around the mask by name.
    for key, named in named_columns(masks).items():
        tables.setdefault(key, set()).update(named - {"*"})
    scope = MaskScope(
        {k: frozenset(v) for k, v in tables.items()},
        frozenset(views),
        oracles,
        frozenset(functions),
        calling_views,
    )
    found_tables = {(c[0], c[1]) for c in tables_found}
    missing = tuple(
        format_column(parts)
        for mask in masks
        if not mask.name.startswith("(")  # the built-in ones name optional views
        for parts in map(parse_column, mask.columns)
        if (parts[0], parts[1]) not in found_tables
        or (parts[2] != "*" and parts not in tables_found)
    )
    return SessionMasks(
        scope=scope, columns=columns, names=tuple(names), missing=missing, masked=tuple(masked)
    )

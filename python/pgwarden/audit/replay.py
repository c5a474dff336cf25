"""``pgwarden replay``: a recorded session as a psql-like transcript.

For each statement: who ran it and when, the decision, the SQL, then what the client got,
decoded from the server messages the recording kept (RowDescription, DataRow,
CommandComplete, ErrorResponse, NoticeResponse, CopyData) and laid out as psql's default
"aligned" format does (centred headers, numbers right-aligned, ``(n rows)``), so a
transcript can be read side by side with the client's own screen.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pgwarden.audit import records as kinds
from pgwarden.audit.records import Record

# Type OIDs psql right-aligns (print.c, column_type_alignment).
_NUMERIC_OIDS: Final = frozenset({20, 21, 23, 26, 28, 29, 700, 701, 790, 1700, 5069})
_ERROR_FIELDS: Final = {
    "S": "severity",
    "V": "severity",
    "M": "message",
    "D": "detail",
    "H": "hint",
}


@dataclass
class Column:
    name: str
    type_oid: int
    binary: bool


@dataclass
class ResultSet:
    columns: list[Column] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)


def _messages(data: bytes) -> Iterator[tuple[str, bytes]]:
    pos = 0
    while pos + 5 <= len(data):
        tag = chr(data[pos])
        (length,) = struct.unpack_from("!i", data, pos + 1)
        body = data[pos + 5 : pos + 1 + length]
        pos += 1 + length
        yield tag, body


def _cstring(body: bytes, pos: int) -> tuple[str, int]:
    end = body.index(b"\0", pos)
    return body[pos:end].decode("utf-8", "replace"), end + 1


def _row_description(body: bytes) -> list[Column]:
    (count,) = struct.unpack_from("!h", body, 0)
    pos = 2
    cols = []
    for _ in range(count):
        name, pos = _cstring(body, pos)
        _table, _attnum, type_oid, _len, _mod, fmt = struct.unpack_from("!ihihih", body, pos)
        pos += 18
        cols.append(Column(name, type_oid, fmt == 1))
    return cols


def _binary_value(raw: bytes, type_oid: int) -> str:
    try:
        if type_oid == 16:
            return "t" if raw[:1] == b"\x01" else "f"
        if type_oid in (21, 23, 20) and len(raw) in (2, 4, 8):
            return str(int.from_bytes(raw, "big", signed=True))
        if type_oid == 26 and len(raw) == 4:
            return str(int.from_bytes(raw, "big"))
        if type_oid == 700 and len(raw) == 4:
            return repr(struct.unpack("!f", raw)[0])
        if type_oid == 701 and len(raw) == 8:
            return repr(struct.unpack("!d", raw)[0])
        if type_oid in (25, 1043, 1042, 19, 114, 142):
            return raw.decode("utf-8")
        if type_oid == 3802 and raw[:1] == b"\x01":
            return raw[1:].decode("utf-8")
        if type_oid == 2950 and len(raw) == 16:
            h = raw.hex()
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    except (UnicodeDecodeError, struct.error):
        pass
    return "\\x" + raw.hex()


def _data_row(body: bytes, columns: Sequence[Column]) -> list[str | None]:
    (count,) = struct.unpack_from("!h", body, 0)
    pos = 2
    values: list[str | None] = []
    for i in range(count):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        raw = body[pos : pos + length]
        pos += length
        col = columns[i] if i < len(columns) else None
        if col is not None and col.binary:
            values.append(_binary_value(raw, col.type_oid))
        else:
            values.append(raw.decode("utf-8", "replace"))
    return values


def _fields(body: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = _cstring(body, pos + 1)
        out.setdefault(code, value)
    return out


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int, right: bool) -> str:
    gap = " " * max(0, width - _width(text))
    return gap + text if right else text + gap


def format_aligned(result: ResultSet, total_rows: int | None = None) -> list[str]:
    """psql's aligned table (border 1), footer included.  ``total_rows`` is the row count
    the server reported, when the recording kept fewer rows than the client got."""
    cols = result.columns
    right = [c.type_oid in _NUMERIC_OIDS for c in cols]
    cells = [[(v if v is not None else "").split("\n") for v in row] for row in result.rows]
    widths = [_width(c.name) for c in cols]
    for row in cells:
        for j, lines in enumerate(row[: len(cols)]):
            widths[j] = max(widths[j], *(_width(x) for x in lines))
    header = []
    for j, c in enumerate(cols):
        gap = widths[j] - _width(c.name)
        header.append(" " * (gap // 2) + c.name + " " * ((gap + 1) // 2))
    out = [" " + " | ".join(header) + " ", "-+-".join("-" * w for w in widths).join("--")]
    last = len(cols) - 1
    for row in cells:
        height = max((len(lines) for lines in row), default=1)
        for k in range(height):
            line = " "
            for j in range(len(cols)):
                lines = row[j] if j < len(row) else [""]
                more = k + 1 < len(lines)
                if k >= len(lines):
                    # This cell has no more lines: pad, except in the last column.
                    cell = "" if j == last else " " * widths[j]
                elif right[j]:
                    cell = _pad(lines[k], widths[j], True)
                elif j == last and not more:
                    cell = lines[k]  # psql does not pad the last column on the right
                else:
                    cell = _pad(lines[k], widths[j], False)
                if j < last:
                    line += cell + ("+" if more else " ") + "| "
                else:
                    line += cell + ("+" if more else "")
            out.append(line)
    n = len(result.rows) if total_rows is None else total_rows
    out.append(f"({n} row{'' if n == 1 else 's'})")
    out.append("")
    return out


def render_result(data: bytes) -> list[str]:
    """What psql would print for these server messages (results, tags, errors, notices)."""
    out: list[str] = []
    current: ResultSet | None = None
    copying = False
    for tag, body in _messages(data):
        if tag == "T":
            current = ResultSet(columns=_row_description(body))
        elif tag == "D":
            if current is None:
                count = struct.unpack_from("!h", body, 0)[0]
                current = ResultSet(
                    columns=[Column(f"?column{i + 1}?", 25, False) for i in range(count)]
                )
            current.rows.append(_data_row(body, current.columns))
        elif tag in ("C", "s"):
            command = _cstring(body, 0)[0] if tag == "C" else ""
            if current is not None:
                verb, _, count = command.rpartition(" ")
                total = int(count) if verb in ("SELECT", "FETCH") and count.isdigit() else None
                out.extend(format_aligned(current, total))
                current = None
            elif copying:
                copying = False
            elif command:
                out.append(command)
        elif tag == "H":
            copying = True
        elif tag == "d" and copying:
            out.append(body.decode("utf-8", "replace").rstrip("\n"))
        elif tag in ("E", "N"):
            if current is not None:
                out.extend(format_aligned(current))
                current = None
            fields = _fields(body)
            severity = fields.get("V") or fields.get("S") or ("ERROR" if tag == "E" else "NOTICE")
            out.append(f"{severity}:  {fields.get('M', '')}")
            if fields.get("D"):
                out.append(f"DETAIL:  {fields['D']}")
            if fields.get("H"):
                out.append(f"HINT:  {fields['H']}")
    if current is not None:
        out.extend(format_aligned(current))
    return out


def _when(ts_us: Any) -> str:
    t = dt.datetime.fromtimestamp(int(ts_us) / 1e6, tz=dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d} UTC"


def _who(session: Record) -> str:
    user = session.get("user") or {}
    if isinstance(user, str):
        user = {"name": user}
    parts = [str(user.get("name") or user.get("id") or "?")]
    if user.get("roles"):
        parts.append(f"(roles {', '.join(str(r) for r in user['roles'])})")
    if session.get("upstream_user"):
        parts.append(f"as {session['upstream_user']}")
    if session.get("database"):
        parts.append(f"on {session['database']}")
    if session.get("client_address"):
        parts.append(f"from {session['client_address']}")
    return " ".join(parts)


def transcript(records: Sequence[Record]) -> str:
    """The transcript of one session's records (see :func:`read_session`)."""
    lines: list[str] = []
    statements: dict[int, Record] = {}
    decisions: dict[int, Record] = {}
    session: Record = {}
    # A prepared statement's columns come with its first execution after a Describe only.
    columns: dict[str, str] = {}
    for r in records:
        kind = r.get("type")
        if kind == kinds.SESSION:
            session = r
            lines.append(f"-- session {r.get('session')}: {_who(r)}, {_when(r['ts'])}")
            lines.append("")
        elif kind == kinds.REFUSED:
            lines.append(
                f"-- connection {r.get('session')} refused {_when(r['ts'])}: "
                f"{r.get('sqlstate')} {r.get('message')}"
            )
        elif kind == kinds.STMT:
            statements[int(r["n"])] = r
        elif kind == kinds.DECISION:
            decisions[int(r["n"])] = r
        elif kind == kinds.END:
            stmt = statements.pop(int(r["n"]), None)
            sql = str((stmt or {}).get("sql", ""))
            if r.get("columns") is not None:
                columns[sql] = str(r["columns"])
            elif sql in columns and r.get("result") is not None:
                r = {**r, "columns": columns[sql]}
            lines.extend(_statement(stmt, r, decisions.pop(int(r["n"]), None)))
        elif kind == kinds.SESSION_END:
            for stmt in statements.values():
                lines.extend(_statement(stmt, None, decisions.get(int(stmt["n"]))))
            statements.clear()
            reason = r.get("reason") or "ended"
            lines.append(f"-- session ended {_when(r['ts'])}: {reason}")
    for stmt in statements.values():
        lines.extend(_statement(stmt, None, decisions.get(int(stmt["n"]))))
    if session and not any(r.get("type") == kinds.SESSION_END for r in records):
        lines.append("-- (no end recorded: the session is still open, or the gateway stopped)")
    return "\n".join(lines) + "\n"


def _statement(stmt: Record | None, end: Record | None, decision: Record | None) -> list[str]:
    source = stmt or end or {}
    n = source.get("n", "?")
    ts = (stmt or end or {}).get("ts", 0)
    verdict = str((decision or stmt or {}).get("decision") or "allow")
    head = f"-- [{n}] {_when(ts)} · {verdict}"
    if end is not None:
        head += f" · {int(end.get('duration_us') or 0) / 1000:.3f} ms"
        if end.get("sqlstate"):
            head += f" · SQLSTATE {end['sqlstate']}"
    else:
        head += " · no end recorded"
    out = [head]
    if stmt is not None:
        sql = stmt.get("sql")
        if sql is None and stmt.get("function_oid") is not None:
            sql = f"-- fast-path function call, oid {stmt['function_oid']}"
        text = str(sql if sql is not None else "").rstrip()
        out.append(text if text.endswith(";") or text.startswith("--") else text + ";")
        if stmt.get("params"):
            out.append(f"-- parameters: {stmt['params']}")
    if end is not None:
        result = end.get("result")
        if result is not None:
            data = base64.b64decode(result)
            if end.get("columns") is not None:
                # A prepared statement's rows: its columns came with an earlier Describe.
                data = base64.b64decode(end["columns"]) + data
            out.extend(render_result(data))
        elif end.get("sqlstate"):
            out.append(f"ERROR:  {end.get('error') or ''}")
        elif end.get("command_tag"):
            out.append(str(end["command_tag"]))
        omitted = end.get("result_omitted")
        if isinstance(omitted, dict) and (omitted.get("rows") or omitted.get("bytes")):
            out.append(
                f"-- recording cut: {omitted.get('rows', 0)} more row(s), "
                f"{omitted.get('bytes', 0)} bytes not kept"
            )
    if out[-1] != "":
        out.append("")
    return out

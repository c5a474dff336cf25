"""``pgwarden replay``: a recorded session as a psql-like transcript.

For each statement: who ran it and when, the decision, the SQL, then what the client got,
decoded from the server messages the recording kept (RowDescription, DataRow,
CommandComplete, ErrorResponse, NoticeResponse, CopyData) and laid out as psql's default
"aligned" format does (centred headers, numbers right-aligned, ``(n rows)``), so a
transcript can be read side by side with the client's own screen.  The statements are
rendered in Rust (``pgwarden._wire.render_statement``, crate ``rust/ship``), which is also
what the shipper's result log records carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orjson import dumps

from pgwarden import _wire
from pgwarden.audit import records as kinds
from pgwarden.audit.records import Record


def _when(ts_us: Any) -> str:
    return _wire.format_time(int(ts_us))


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
    verdict = (decision or {}).get("decision")
    return _wire.render_statement(
        None if stmt is None else dumps(stmt),
        None if end is None else dumps(end),
        None if verdict is None else str(verdict),
    )

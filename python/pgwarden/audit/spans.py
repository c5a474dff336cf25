"""Audit records -> OpenTelemetry spans (the SDK's ``ReadableSpan``, ready to export).

One trace per session.  The session span (kind SERVER: the gateway serving a client) is the
parent of one span per statement (kind CLIENT: the gateway as PostgreSQL's client), whatever
the protocol: a simple Query, an extended Parse/Bind/Execute (one span, at the Execute), a
fast-path FunctionCall.  A refused connection is a session span with an error status.
Ids come from :mod:`pgwarden.audit.ids` and times from the records, so rebuilding a span
from the same records gives the same span.  docs/audit.md lists every attribute.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Final, Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from pgwarden import __version__
from pgwarden.audit import ids, sql
from pgwarden.audit.records import Record

DB_SYSTEM: Final = "postgresql"
SESSION_SPAN_NAME: Final = "pgwarden session"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.37.0"
INTERRUPTED: Final = "interrupted"
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)

QueryTextMode = Literal["full", "sanitised", "none"]


def _ns(us: int) -> int:
    return int(us) * 1000


def _context(trace: int, span: int) -> SpanContext:
    return SpanContext(trace, span, is_remote=False, trace_flags=_SAMPLED)


_UNSET: Final = Status(StatusCode.UNSET)
_CACHE_LIMIT: Final = 8192


@functools.lru_cache(maxsize=1024)
def _verb(command_tag: str | None) -> str | None:
    """The command of a CommandComplete tag: 'INSERT 0 1' -> 'INSERT', 'CREATE TABLE'."""
    if not command_tag:
        return None
    words = [w for w in command_tag.split(" ") if not w.isdigit()]
    return " ".join(words) or None


class SpanBuilder:
    """Builds the spans of one gateway deployment (one resource)."""

    def __init__(self, resource: Resource, query_text: QueryTextMode = "full") -> None:
        self.resource = resource
        self.query_text = query_text
        self.scope = InstrumentationScope("pgwarden.audit", __version__, SCHEMA_URL)
        # Per-session attributes and parent context, built once per session.
        self._bases: dict[tuple[Any, ...], tuple[dict[str, Any], SpanContext]] = {}

    def _session_base(
        self, session: Mapping[str, Any], sid: str
    ) -> tuple[dict[str, Any], SpanContext]:
        key = (session.get("stream"), session.get("seq"), sid)
        found = self._bases.get(key)
        if found is None:
            base: dict[str, Any] = {}
            self._connection(session, base)
            self._identity(session, base)
            base["pgwarden.session.id"] = sid
            parent = _context(ids.trace_id(sid), ids.session_span_id(sid))
            if len(self._bases) >= _CACHE_LIMIT:
                self._bases.clear()
            found = self._bases[key] = (base, parent)
        return found

    # --- shared attributes ---------------------------------------------------------------

    @staticmethod
    def _identity(session: Mapping[str, Any], out: dict[str, Any]) -> None:
        user = session.get("user") or {}
        if isinstance(user, str):
            user = {"name": user}
        if user.get("id") or user.get("name"):
            out["user.id"] = str(user.get("id") or user.get("name"))
        if user.get("name"):
            out["user.name"] = str(user["name"])
        roles = user.get("roles")
        if roles:
            out["user.roles"] = [str(r) for r in roles]
        if user.get("email"):
            out["user.email"] = str(user["email"])
        if user.get("issuer"):
            out["pgwarden.identity.issuer"] = str(user["issuer"])
        if user.get("rule"):
            out["pgwarden.identity.rule"] = str(user["rule"])
        if user.get("grant"):
            out["pgwarden.identity.grant"] = str(user["grant"])
        if session.get("upstream_user"):
            out["pgwarden.upstream.role"] = str(session["upstream_user"])

    @staticmethod
    def _connection(session: Mapping[str, Any], out: dict[str, Any]) -> None:
        out["db.system.name"] = DB_SYSTEM
        if session.get("database"):
            out["db.namespace"] = str(session["database"])
        if session.get("server_address"):
            out["server.address"] = str(session["server_address"])
        if session.get("server_port"):
            out["server.port"] = int(session["server_port"])
        if session.get("client_address"):
            out["client.address"] = str(session["client_address"])

    @staticmethod
    def _spool(record: Mapping[str, Any], verified: bool, out: dict[str, Any]) -> None:
        out["pgwarden.spool.stream"] = str(record.get("stream", ""))
        out["pgwarden.spool.seq"] = int(record.get("seq", 0))
        out["pgwarden.chain.hash"] = str(record.get("hash", ""))
        out["pgwarden.chain.verified"] = verified

    # --- statements ---------------------------------------------------------------------

    def statement(
        self,
        session: Mapping[str, Any] | None,
        stmt: Record,
        end: Record | None,
        *,
        verified: bool = True,
        interrupted_at_us: int | None = None,
    ) -> ReadableSpan:
        """The span of one statement: its ``stmt`` record and ``end`` record (None when the
        statement never finished: then it ends at ``interrupted_at_us``)."""
        session = session or {}
        sid = str(stmt["session"])
        n = int(stmt["n"])
        base, parent = self._session_base(session, sid)
        attrs = dict(base)
        text = stmt.get("sql")
        info = sql.analyze(text) if text else sql.QueryInfo(parsed=False)
        if text is not None:
            shown = self._query_text(text)
            if shown is not None:
                attrs["db.query.text"] = shown
        tag = end.get("command_tag") if end else None
        operation = info.operation
        if info.statements <= 1:
            operation = _verb(tag) or operation
        if operation:
            attrs["db.operation.name"] = operation
        if info.summary:
            attrs["db.query.summary"] = info.summary
        if info.collection:
            attrs["db.collection.name"] = info.collection
        if info.procedure:
            attrs["db.stored_procedure.name"] = info.procedure
        if info.statements > 1:
            attrs["db.operation.batch.size"] = info.statements
        if text is not None and not info.parsed:
            attrs["pgwarden.query.parsed"] = False
        params = stmt.get("params")
        if isinstance(params, list) and info.statements <= 1:
            for i, value in enumerate(params):
                if value is not None:
                    attrs[f"db.query.parameter.{i}"] = str(value)
        if stmt.get("function_oid") is not None:
            attrs["pgwarden.function.oid"] = int(stmt["function_oid"])
        attrs["pgwarden.statement.number"] = n
        attrs["pgwarden.protocol"] = str(stmt.get("protocol", ""))
        self._spool(stmt, verified, attrs)
        if "decision" in stmt or "masked_columns" in stmt:
            self._policy(stmt, attrs)
        start_us = int(stmt["ts"])
        status = _UNSET
        if end is not None:
            end_us = int(end["ts"])
            start_us = min(start_us, end_us - int(end.get("duration_us") or 0))
            if tag:
                attrs["pgwarden.command_tag"] = str(tag)
            if end.get("data_rows") is not None:
                attrs["db.response.returned_rows"] = int(end["data_rows"])
            elif end.get("rows") is not None and _verb(tag) in ("SELECT", "FETCH"):
                attrs["db.response.returned_rows"] = int(end["rows"])
            if end.get("rows") is not None:
                attrs["pgwarden.statement.rows"] = int(end["rows"])
            sqlstate = end.get("sqlstate")
            if sqlstate:
                attrs["db.response.status_code"] = str(sqlstate)
                attrs["error.type"] = str(sqlstate)
                status = Status(StatusCode.ERROR, str(end.get("error") or sqlstate))
            if end.get("result") is not None:
                attrs["pgwarden.result.recorded"] = True
            omitted = end.get("result_omitted")
            if isinstance(omitted, dict) and omitted.get("rows"):
                attrs["pgwarden.result.omitted_rows"] = int(omitted["rows"])
            attrs["pgwarden.outcome"] = "completed"
            attrs["pgwarden.chain.end_hash"] = str(end.get("hash", ""))
        else:
            end_us = max(start_us, interrupted_at_us or start_us)
            attrs["pgwarden.outcome"] = INTERRUPTED
            attrs["error.type"] = INTERRUPTED
            status = Status(
                StatusCode.ERROR,
                "outcome unknown: the session or the gateway ended before the statement did",
            )
        return ReadableSpan(
            name=self.statement_span_name(attrs),
            context=_context(parent.trace_id, ids.statement_span_id(sid, n)),
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.CLIENT,
            status=status,
            start_time=_ns(start_us),
            end_time=_ns(end_us),
            instrumentation_scope=self.scope,
        )

    @staticmethod
    def _policy(stmt: Record, attrs: dict[str, Any]) -> None:
        """The statement policy's decision, rule and version, and the masked columns."""
        for key, name in (
            ("decision", "decision"),
            ("rule", "rule"),
            ("policy_version", "version"),
        ):
            if stmt.get(key) is not None:
                attrs[f"pgwarden.policy.{name}"] = str(stmt[key])
        if stmt.get("masked_columns"):
            attrs["pgwarden.masked_columns"] = [str(c) for c in stmt["masked_columns"]]

    def _query_text(self, text: str) -> str | None:
        if self.query_text == "full":
            return text
        if self.query_text == "sanitised":
            return sql.sanitise(text)
        return None

    @staticmethod
    def statement_span_name(attrs: Mapping[str, Any]) -> str:
        """OpenTelemetry's database span name rule: ``{db.query.summary}``, else
        ``{db.operation.name} {target}``, else ``{target}``, else ``{db.system.name}``;
        target is db.collection.name, db.stored_procedure.name, db.namespace, or
        server.address:server.port, the first one set."""
        summary = attrs.get("db.query.summary")
        if summary:
            return str(summary)
        target = (
            attrs.get("db.collection.name")
            or attrs.get("db.stored_procedure.name")
            or attrs.get("db.namespace")
        )
        if not target and attrs.get("server.address"):
            target = f"{attrs['server.address']}:{attrs.get('server.port', 5432)}"
        operation = attrs.get("db.operation.name")
        if operation and target:
            return f"{operation} {target}"
        return str(target or operation or DB_SYSTEM)

    # --- sessions -----------------------------------------------------------------------

    def session(
        self,
        session: Record,
        end: Record | None,
        *,
        verified: bool = True,
        interrupted_at_us: int | None = None,
        statements: int | None = None,
    ) -> ReadableSpan:
        """The span of a session: from its ``session`` record to its ``session_end``."""
        sid = str(session["session"])
        attrs: dict[str, Any] = {}
        self._connection(session, attrs)
        self._identity(session, attrs)
        attrs["pgwarden.session.id"] = sid
        if session.get("application_name"):
            attrs["pgwarden.session.application_name"] = str(session["application_name"])
        if session.get("tls") is not None:
            attrs["pgwarden.session.tls"] = bool(session["tls"])
        self._spool(session, verified, attrs)
        status = _UNSET
        start_us = int(session["ts"])
        if end is not None:
            end_us = int(end["ts"])
            attrs["pgwarden.session.end_reason"] = str(end.get("reason") or "")
            if end.get("statements") is not None:
                attrs["pgwarden.session.statements"] = int(end["statements"])
            if end.get("sqlstate"):
                attrs["pgwarden.session.end_sqlstate"] = str(end["sqlstate"])
            attrs["pgwarden.outcome"] = "completed"
        else:
            end_us = max(start_us, interrupted_at_us or start_us)
            attrs["pgwarden.session.end_reason"] = INTERRUPTED
            attrs["pgwarden.outcome"] = INTERRUPTED
            if statements is not None:
                attrs["pgwarden.session.statements"] = statements
        trace = ids.trace_id(sid)
        return ReadableSpan(
            name=SESSION_SPAN_NAME,
            context=_context(trace, ids.session_span_id(sid)),
            parent=None,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.SERVER,
            status=status,
            start_time=_ns(start_us),
            end_time=_ns(end_us),
            instrumentation_scope=self.scope,
        )

    def refused(self, record: Record, *, verified: bool = True) -> ReadableSpan:
        """The span of a connection refused before its session began."""
        sid = str(record["session"])
        attrs: dict[str, Any] = {}
        self._connection(record, attrs)
        self._identity(record, attrs)
        attrs["pgwarden.session.id"] = sid
        attrs["pgwarden.session.refused"] = True
        if record.get("stage"):
            attrs["pgwarden.session.refused_at"] = str(record["stage"])
        sqlstate = str(record.get("sqlstate") or "")
        if sqlstate:
            attrs["db.response.status_code"] = sqlstate
            attrs["error.type"] = sqlstate
        attrs["pgwarden.outcome"] = "refused"
        self._spool(record, verified, attrs)
        ts = int(record["ts"])
        start = int(record.get("started") or ts)
        trace = ids.trace_id(sid)
        return ReadableSpan(
            name=SESSION_SPAN_NAME,
            context=_context(trace, ids.session_span_id(sid)),
            parent=None,
            resource=self.resource,
            attributes=attrs,
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, str(record.get("message") or sqlstate)),
            start_time=_ns(min(start, ts)),
            end_time=_ns(ts),
            instrumentation_scope=self.scope,
        )

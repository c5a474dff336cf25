"""Audit records -> OpenTelemetry spans, by the Rust assembler (rust/ship), configured here.

One trace per session.  The session span (kind SERVER: the gateway serving a client) is the
parent of one span per statement (kind CLIENT: the gateway as PostgreSQL's client), whatever
the protocol: a simple Query, an extended Parse/Bind/Execute (one span, at the Execute), a
fast-path FunctionCall.  A refused connection is a session span with an error status.
Ids are derived from the session id and statement number (:mod:`pgwarden.audit.ids`) and
times come from the records, so rebuilding a span from the same records gives the same
span.  A statement span is named ``{db.query.summary}``, else ``{db.operation.name}
{target}``, else ``{target}``, else ``postgresql``, where target is db.collection.name,
db.stored_procedure.name, db.namespace or server.address:server.port, the first one set.
docs/audit.md lists every attribute.

The assembler verifies the hash chain, pairs each ``stmt`` with its ``end``, builds the
spans and encodes the OTLP requests in one call per batch; what the SQL says
(:func:`pgwarden.audit.sql.analyze`, PostgreSQL's parser) is asked once per query shape
(the text with its literals replaced, read by PostgreSQL's scanner).
"""

from __future__ import annotations

from typing import Final, Literal

from opentelemetry.sdk.resources import Resource

from pgwarden import __version__, _wire
from pgwarden.audit import sql
from pgwarden.audit.recording import STARTS

DB_SYSTEM: Final = "postgresql"
SESSION_SPAN_NAME: Final = "pgwarden session"
SCOPE_NAME: Final = "pgwarden.audit"
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.37.0"

QueryTextMode = Literal["full", "sanitised", "none"]

Analysis = tuple[bool, int, str | None, str | None, str | None, str | None]


def analysis(text: str) -> Analysis:
    """:func:`sql.analyze` as the assembler takes it."""
    info = sql.analyze(text)
    return (
        info.parsed,
        info.statements,
        info.operation,
        info.collection,
        info.procedure,
        info.summary,
    )


def new_assembler(
    *,
    key: bytes,
    resource: Resource,
    query_text: QueryTextMode,
    request_spans: int,
    request_bytes: int,
    query_text_max_bytes: int,
    recording: bool,
    result_logs: bool,
    state: bytes | None,
) -> _wire.SpanAssembler:
    """An assembler for one stream, resuming from a checkpoint's ``state`` (JSON)."""
    return _wire.SpanAssembler(
        key=key,
        resource=dict(resource.attributes),
        resource_schema_url=resource.schema_url or "",
        scope_name=SCOPE_NAME,
        scope_version=__version__,
        scope_schema_url=SCHEMA_URL,
        query_text=query_text,
        request_spans=request_spans,
        request_bytes=request_bytes,
        query_text_max_bytes=query_text_max_bytes,
        recorded=sorted(STARTS) if recording else [],
        result_logs=result_logs,
        state=state,
        analyze=analysis,
    )

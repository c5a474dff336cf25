"""Typed surface of the compiled wire codec (``rust/py`` over ``rust/wire``).

The hot path is :class:`SessionCodec`: one call per received chunk, in each
direction.  Everything else is used during the startup phase only.
"""

from collections.abc import Callable
from typing import Any, Final, Literal, TypeAlias, final

__all__ = [
    "CANCEL_REQUEST_CODE",
    "DEFAULT_MAX_MESSAGE_LEN",
    "DEFAULT_MAX_STARTUP_LEN",
    "EV_ERROR",
    "EV_EXECUTE",
    "EV_FUNCTION_CALL",
    "EV_PARSE",
    "EV_QUERY",
    "EV_READY",
    "EV_TERMINATE",
    "GSSENC_REQUEST_CODE",
    "SSL_REQUEST_CODE",
    "AuditSpool",
    "AuditSpoolError",
    "AuditSpoolFull",
    "MessageFramer",
    "SessionCodec",
    "SpanAssembler",
    "StartupPacket",
    "WireError",
    "decode_authentication",
    "decode_backend_key_data",
    "decode_fields",
    "decode_negotiate_protocol_version",
    "decode_parameter_status",
    "decode_sasl_mechanisms",
    "encode_authentication",
    "encode_backend_key_data",
    "encode_cancel_request",
    "encode_error",
    "encode_message",
    "encode_negotiate_protocol_version",
    "encode_notice",
    "encode_parameter_status",
    "encode_password",
    "encode_ready_for_query",
    "encode_sasl_initial_response",
    "encode_sasl_response",
    "encode_ssl_request",
    "encode_startup",
    "format_time",
    "number_blind_key",
    "read_startup",
    "render_statement",
    "verify_chain",
]

# --- constants -----------------------------------------------------------------

SSL_REQUEST_CODE: Final[int]  # 80877103
GSSENC_REQUEST_CODE: Final[int]  # 80877104
CANCEL_REQUEST_CODE: Final[int]  # 80877102
DEFAULT_MAX_STARTUP_LEN: Final[int]  # 10000, as PostgreSQL's MAX_STARTUP_PACKET_LENGTH
DEFAULT_MAX_MESSAGE_LEN: Final[int]  # 1 GiB - 1, as PostgreSQL's PQ_LARGE_MESSAGE_LIMIT

# Client -> server event kinds (first element of a ClientEvent tuple).
EV_QUERY: Final[int]  # (EV_QUERY, sql, n, start, end); n: the audit's statement number, 0: none
EV_PARSE: Final[int]  # (EV_PARSE, statement_name, sql, start, end)
EV_EXECUTE: Final[int]  # (EV_EXECUTE, portal_name, sql, n, start, end)
EV_FUNCTION_CALL: Final[int]  # (EV_FUNCTION_CALL, function_oid, start, end)
EV_TERMINATE: Final[int]  # (EV_TERMINATE, start, end)
# Server -> client event kinds.
EV_READY: Final[int]  # (EV_READY, status) status is "I", "T" or "E"
EV_ERROR: Final[int]  # (EV_ERROR, severity, sqlstate, message)

ClientEvent: TypeAlias = tuple[int | str, ...]
ServerEvent: TypeAlias = tuple[int | str, ...]

class WireError(Exception):
    """A malformed or oversized message.  ``str(err)`` is a human-readable reason.

    The gateway answers it with an ErrorResponse, SQLSTATE 08P01 (protocol_violation).
    """

# --- startup phase ---------------------------------------------------------------

@final
class StartupPacket:
    """One untyped startup-phase packet sent by a client."""

    @property
    def kind(self) -> Literal["ssl", "gssenc", "cancel", "startup"]: ...
    @property
    def major(self) -> int: ...
    @property
    def minor(self) -> int: ...
    @property
    def params(self) -> list[tuple[str, str]]:
        """StartupMessage parameters, in wire order (``_pq_.*`` options included)."""
    @property
    def process_id(self) -> int:
        """CancelRequest process id (0 for other kinds)."""
    @property
    def secret_key(self) -> bytes:
        """CancelRequest secret key: 4 bytes in protocol 3.0, up to 256 in 3.2."""

def read_startup(buf: bytes, max_len: int = ...) -> tuple[StartupPacket, int] | None:
    """Decode one startup packet from the front of ``buf``.

    Returns ``(packet, consumed_bytes)``, or ``None`` when more bytes are needed.
    Raises :class:`WireError` for a length below 8 or above ``max_len``, an unknown
    request code, a protocol major version other than 3, or malformed parameters.
    """

@final
class MessageFramer:
    """Incremental framer for typed messages (tag byte + int32 length + body)."""

    def __new__(cls, max_message_len: int = ...) -> MessageFramer: ...
    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Append ``data``; return every complete message as ``(tag, body)``."""
    def take_pending(self) -> bytes:
        """Return and clear the bytes of a not-yet-complete message."""

# Decoders for the startup/authentication phase.
def decode_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}, e.g. {"C": "42P01"}."""

def decode_authentication(body: bytes) -> tuple[int, bytes]:
    """Authentication* body -> (auth code, remaining payload)."""

def decode_parameter_status(body: bytes) -> tuple[str, str]: ...
def decode_backend_key_data(body: bytes) -> tuple[int, bytes]: ...
def decode_negotiate_protocol_version(body: bytes) -> tuple[int, list[str]]: ...
def decode_sasl_mechanisms(body: bytes) -> list[str]:
    """AuthenticationSASL payload (after the auth code) -> mechanism names."""

# Encoders: each returns a whole message, tag and length included.
def encode_message(tag: int, body: bytes) -> bytes: ...
def encode_error(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """ErrorResponse with S, V, C, M (and D, H when given)."""

def encode_notice(severity: str, sqlstate: str, message: str) -> bytes: ...
def encode_startup(params: list[tuple[str, str]], major: int = 3, minor: int = 0) -> bytes: ...
def encode_ssl_request() -> bytes: ...
def encode_cancel_request(process_id: int, secret_key: bytes) -> bytes: ...
def encode_authentication(code: int, payload: bytes = b"") -> bytes: ...
def encode_password(password: bytes) -> bytes:
    """PasswordMessage ('p'); ``password`` is sent as a C string."""

def encode_sasl_initial_response(mechanism: str, data: bytes) -> bytes: ...
def encode_sasl_response(data: bytes) -> bytes: ...
def encode_parameter_status(name: str, value: str) -> bytes: ...
def encode_backend_key_data(process_id: int, secret_key: bytes) -> bytes: ...
def encode_ready_for_query(status: str) -> bytes: ...
def encode_negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes: ...

# --- relay phase (hot path) --------------------------------------------------------

@final
class SessionCodec:
    """Both directions of one relayed session after authentication.

    ``feed_client`` / ``feed_server`` take one received chunk each and return
    ``(bytes_to_forward, events_or_None)``.  When nothing is rewritten the returned
    bytes object *is* the input object (no copy).  Client messages are forwarded only
    once complete (so a statement can still be refused); large CopyData is streamed.
    Server messages are streamed: a DataRow or CopyData larger than a chunk is never
    buffered whole.  Event offsets ``start``/``end`` index into the returned bytes.

    A Query or Parse whose text is not UTF-8 is not a :class:`WireError`: it is replaced
    by a statement the server fails, whose error the client gets as ERROR 22021 (see
    rust/wire/src/refusal.rs); no client event is reported for it.

    ``context_json`` is a pre-encoded JSON object body (without braces), e.g.
    ``'"session":"a1","user":"alice"'``, spliced into every statement record.
    """

    def __new__(
        cls,
        *,
        max_message_len: int = ...,
        context_json: str = "",
        record_statements: bool = False,
        client_events: bool = False,
        max_param_bytes: int = 1024,
        audit: AuditSpool | None = None,
        audit_session: str = "",
        audit_params: bool = False,
        audit_strict: bool = True,
        capture_rows: int = 0,
        capture_bytes: int = 0,
    ) -> SessionCodec:
        """With ``audit``, the codec writes each statement's ``stmt`` record into the spool
        before handing back the bytes that carry it, and its ``end`` record when the
        server finishes it (with up to ``capture_rows`` rows / ``capture_bytes`` bytes of
        the result as forwarded, when non-zero).  In strict mode (``audit_strict``) a
        record that cannot be stored makes ``feed_client`` raise :class:`AuditSpoolFull`
        or :class:`AuditSpoolError` instead of returning bytes to forward.
        """
    def mask_columns(self, columns: list[tuple[int, int, bytes | None, str, int]]) -> None:
        """Masks these table columns, ``(table_oid, attnum, replacement, name,
        keep_last)``, in every result from now on: a column of a text type (text, varchar,
        char, name) shows ``replacement`` (followed by the value's last ``keep_last``
        characters when that is not 0, if the value is longer), any other, or any column
        when ``replacement`` is ``None``, NULL.  An Execute that does not directly follow
        the client's Describe of its portal is forwarded behind a Describe of the portal
        the codec adds, whose answer only the masker sees, so every execution is masked
        by its columns as the server has them then; rows it still cannot place are
        masked whole.  The audit's ``end`` record of a statement lists the ``name`` of
        each column it masked (``masked_columns``; ``*`` for rows masked whole); an
        ErrorResponse about a masked table loses its DETAIL."""
    def feed_client(self, data: bytes) -> tuple[bytes, list[ClientEvent] | None]: ...
    def feed_server(self, data: bytes) -> tuple[bytes, list[ServerEvent] | None]: ...
    def take_records(self) -> bytes:
        """JSON lines, one per finished statement since the last call (may be empty).

        Fields: ``ts``, the ``context_json`` members, ``protocol`` ("simple",
        "extended" or "function_call"), ``statement``, ``params`` (extended and
        function calls), ``function_oid`` (function calls), ``duration_us``,
        ``command_tag``, ``rows``, ``sqlstate``, ``error``.  See rust/wire/README.md.
        """
    @property
    def transaction_status(self) -> str:
        """Last ReadyForQuery status: "I", "T" or "E"."""
    @property
    def in_flight(self) -> int:
        """Statements sent to the server and not yet finished."""
    @property
    def pending_requests(self) -> int:
        """Requests awaiting a response (statements, Parse, Bind, Describe, Close, Sync).

        Zero means the server owes the client nothing: a safe point to end the session.
        """
    @property
    def held_client_bytes(self) -> int:
        """Client bytes held back because their message is not complete yet."""
    @property
    def server_bytes_owed(self) -> int:
        """Bytes of the current server message the client is still owed.

        0 when what was forwarded to the client ends at a message boundary: the only place
        the gateway may write a message of its own.  Otherwise, feeding ``feed_server`` at
        most this many bytes cannot go past the end of the message (for a header forwarded
        in part it is the rest of the header; feed that, then ask again).
        """
    @property
    def audit_dropped(self) -> int:
        """Audit records this session could not store (relaxed audit only)."""
    @property
    def counters(self) -> tuple[int, int, int]:
        """``(statements, client bytes, server bytes)`` relayed so far: Query, Execute and
        FunctionCall messages, and the bytes received from each side."""

# --- audit spool -------------------------------------------------------------------

def verify_chain(key: bytes, prev: bytes, lines: list[bytes]) -> tuple[bytes, list[int]]:
    """Check sealed record ``lines`` (no newlines) as a continuation of the chain at ``prev``.

    Returns the hash of the last line and the indices of the lines that do not verify.
    """

def number_blind_key(sql: str) -> str | None:
    """A key under which texts that differ only in their numeric constants share a decision
    (each run of digits that begins a token becomes ``?``); None when the text has a double
    quote (digits may then begin a quoted name)."""

def format_time(ts_us: int) -> str:
    """A record time (microseconds since the epoch) as transcripts write it:
    ``2026-11-27 09:02:32.874 UTC``."""

def render_statement(
    stmt: bytes | None,
    end: bytes | None,
    decision: str | None = None,
    columns: str | None = None,
) -> list[str]:
    """One recorded statement as transcript lines (the last one empty): its ``stmt`` and
    ``end`` records as JSON (either may be missing), the decision record's verdict, and
    the RowDescription (base64) to use when the ``end`` carries none."""

@final
class SpanAssembler:
    """One audit stream's records to OTLP ``ExportTraceServiceRequest`` bodies.

    ``process`` verifies the hash chain, pairs ``stmt`` with ``end`` records, builds the
    spans and encodes them; its result is staged until ``commit`` (after the backend
    acknowledged it) or ``rollback``.  ``analyze(sql)`` is called once per query shape and
    returns (parsed, statements, operation, collection, procedure, summary).
    """

    def __new__(
        cls,
        *,
        key: bytes,
        resource: dict[str, Any],
        resource_schema_url: str,
        scope_name: str,
        scope_version: str,
        scope_schema_url: str,
        query_text: str,
        request_spans: int,
        request_bytes: int,
        query_text_max_bytes: int,
        recorded: list[str],
        result_logs: bool,
        state: bytes | None,
        analyze: Callable[[str], tuple[bool, int, str | None, str | None, str | None, str | None]],
    ) -> SpanAssembler: ...
    def process(
        self, chunks: list[tuple[bytes, int]], writer_alive: bool
    ) -> tuple[
        list[bytes],
        int,
        list[tuple[str, bytes]],
        list[bytes],
        list[tuple[int | None, str]],
        int,
        bool,
    ]:
        """Assemble the next lines, given as chunks ``data[:end]`` of newline-separated
        lines: (span requests, span count, [(session, recorded lines)], log requests
        (``ExportLogsServiceRequest``, a statement's result per record, with
        ``result_logs``), [(line index, problem)], chain failures, finishing)."""
    def commit(self) -> None:
        """Make the staged batch the stream's state."""
    def rollback(self) -> None:
        """Forget the staged batch."""
    def state(self) -> bytes:
        """The committed state, as checkpoint JSON."""
    def open_counts(self) -> tuple[int, int, int]:
        """(open sessions, open statements, last seq) of the committed state."""

class AuditSpoolError(Exception):
    """An audit record could not be stored (I/O error, or the spool is closed)."""

class AuditSpoolFull(AuditSpoolError):
    """The audit spool is at its configured bound: new statements are refused."""

@final
class AuditSpool:
    """This process's stream in the audit spool: sealed records in memory-mapped segments.

    A record is in the page cache (so it survives the death of this process) when the
    call that stored it returns.  ``fsync`` is "always", "interval" or "never".  The
    spool's disk usage, every stream of ``directory`` included, is kept under
    ``max_bytes``: past it, new statements and sessions are refused.
    """

    def __new__(
        cls,
        directory: str,
        stream: str,
        key: bytes,
        *,
        segment_bytes: int = 16777216,
        max_bytes: int = 1073741824,
        fsync: str = "interval",
        fsync_interval_ms: int = 200,
        usage_interval_ms: int = 100,
        open_members: str = "",
    ) -> AuditSpool: ...
    def append(self, kind: str, members: str, *, new: bool = False) -> int:
        """Store a record of type ``kind`` with ``members`` (JSON members, no braces).

        Returns its seq.  ``new=True`` (a new session) is refused with
        :class:`AuditSpoolFull` when the spool is at its bound.
        """
    def close(self) -> None:
        """Write the ``close`` record, fsync, stop the background threads."""
    def sync(self) -> int:
        """fdatasync what is stored (without the GIL); returns the durable seq."""
    def refresh_usage(self) -> None:
        """Measure the spool's disk usage now."""
    @property
    def stream(self) -> str: ...
    @property
    def directory(self) -> str:
        """This stream's directory."""
    @property
    def written_seq(self) -> int: ...
    @property
    def synced_seq(self) -> int: ...
    @property
    def usage_bytes(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def full(self) -> bool:
        """A new statement would be refused right now."""
    @property
    def records_dropped(self) -> int: ...
    @property
    def notify_fd(self) -> int | None:
        """An eventfd that becomes readable after each fsync (fsync="always")."""

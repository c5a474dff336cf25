"""Where the shipper delivers the trail, and how it learns that a delivery was accepted.

Every sink exports one batch synchronously and answers True only when the backend has
accepted all of it: the official OTLP exporters (HTTP/protobuf or gRPC) report
``SpanExportResult.SUCCESS`` only for a successful response; the console and file sinks
after the write (and, for the file, fsync).  The SDK's BatchSpanProcessor, whose queue
drops spans silently when full, is not used at all: the spool is the queue.

An accepted OTLP request can still carry a *partial success*: the backend took the
request but refused some of its spans or log records, and the protocol forbids sending
the request again.  The exporters read it from the response (the official ones ignore
it) and the sink hands it to the shipper with the batch (``ShipBatch.rejections``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import requests
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
from opentelemetry.exporter.http.transport._base import BaseHTTPResult, BaseHTTPTransport
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
    OTLPLogExporter as OTLPGrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as OTLPGrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as OTLPHttpLogExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as OTLPHttpSpanExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource

from pgwarden import __version__
from pgwarden.audit.console import format_request
from pgwarden.audit.spool import Lines, write_durably
from pgwarden.config import AuditSettings

DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
SPANS = "spans"
LOG_RECORDS = "log records"


@dataclass(frozen=True)
class Accepted:
    """The backend accepted a request.  ``rejected`` > 0 is an OTLP partial success: it
    refused that many of the request's spans (or log records), which must not be sent
    again; ``message`` is its explanation (with nothing rejected, a warning)."""

    rejected: int = 0
    message: str = ""


ACCEPTED = Accepted()


@dataclass(frozen=True)
class Rejection:
    """A partial success, as the shipper reports (and keeps) it."""

    signal: str  # "spans" or "log records"
    rejected: int
    message: str
    #: The request as it was sent (OTLP ExportTraceServiceRequest or
    #: ExportLogsServiceRequest, protobuf).
    request: bytes = field(repr=False, default=b"")

    @property
    def sent(self) -> int:
        """How many spans or log records the request carried."""
        if self.signal == SPANS:
            return len(request_span_ids(self.request))
        decoded = ExportLogsServiceRequest.FromString(self.request)
        return sum(len(sl.log_records) for rl in decoded.resource_logs for sl in rl.scope_logs)


@dataclass
class ShipBatch:
    """One delivery: the sealed record lines it covers, and what they became, encoded in
    Rust: OTLP ``ExportTraceServiceRequest`` bodies and, with result logs,
    ``ExportLogsServiceRequest`` bodies."""

    lines: Lines = field(default_factory=Lines)
    requests: list[bytes] = field(default_factory=list)
    span_count: int = 0
    log_requests: list[bytes] = field(default_factory=list)
    #: Partial successes of the accepted requests (filled in by the sink).
    rejections: list[Rejection] = field(default_factory=list)


class EncodedExporter(Protocol):
    def export_encoded(self, request: bytes) -> Accepted | None:
        """Send one encoded export request: what the backend said once it accepted it,
        None if it did not."""
        ...

    def shutdown(self) -> None: ...


class AuditSink(Protocol):
    #: Whether the sink delivers spans (the shipper builds none for a sink of records).
    needs_spans: bool

    def export(self, batch: ShipBatch) -> bool:
        """Deliver the batch; True only if the backend accepted all of it."""
        ...

    def shutdown(self) -> None: ...


def build_resource(audit: AuditSettings, listen_port: int) -> Resource:
    """service.name, service.instance.id, service.version, and the configured extras."""
    instance = audit.service_instance_id or f"{socket.gethostname()}:{listen_port}"
    return Resource.create(
        {
            **audit.resource_attributes,
            "service.name": audit.service_name,
            "service.instance.id": instance,
            "service.version": __version__,
        }
    )


class TelemetrySink:
    """Spans (and optionally log records) through OpenTelemetry exporters."""

    needs_spans = True

    def __init__(self, spans: EncodedExporter, logs: EncodedExporter | None) -> None:
        self.spans = spans
        self.logs = logs

    def export(self, batch: ShipBatch) -> bool:
        # Every request must succeed (a failed batch is delivered again whole, with the
        # same span ids).
        # A partial success is not retried (OTLP forbids it): it goes with the batch to
        # the shipper, which reports it and keeps the records.
        rejections: list[Rejection] = []
        for request in batch.requests:
            answer = self.spans.export_encoded(request)
            if answer is None:
                return False
            if answer.rejected or answer.message:
                rejections.append(Rejection(SPANS, answer.rejected, answer.message, request))
        if self.logs is not None:
            for request in batch.log_requests:
                answer = self.logs.export_encoded(request)
                if answer is None:
                    return False
                if answer.rejected or answer.message:
                    rejections.append(
                        Rejection(LOG_RECORDS, answer.rejected, answer.message, request)
                    )
        batch.rejections = rejections
        return True

    def shutdown(self) -> None:
        self.spans.shutdown()
        if self.logs is not None:
            self.logs.shutdown()


class ConsoleSpanWriter:
    """One JSON object per span on a text stream (the demo's exporter)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def export_encoded(self, request: bytes) -> Accepted | None:
        self.out.write(format_request(request))
        self.out.flush()
        return ACCEPTED

    def shutdown(self) -> None:
        if self.out not in (sys.stdout, sys.stderr):
            self.out.close()


class RecordFileSink:
    """Appends the sealed records themselves to a file (verifiable with ``audit verify``)."""

    needs_spans = False

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, batch: ShipBatch) -> bool:
        if not batch.lines:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(self.path, batch.lines.joined(), append=True)
        return True

    def shutdown(self) -> None:
        return None


def _http_session(url: str) -> requests.Session:
    """A session that reads the proxy settings of the environment once.

    requests re-reads ``os.environ`` for proxies on every request (about a millisecond per
    export here, a tenth of the shipper's work); the environment of a running shipper does
    not change, so it is read here, once.
    """
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(url))
    session.trust_env = False
    return session


def _ca_bundle(audit: AuditSettings) -> str | None:
    """``certificate_file``, else the bundle requests would take from the environment (the
    session does not read it; the exporter sets the session's ``verify`` itself)."""
    if audit.certificate_file is not None:
        return str(audit.certificate_file)
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def _http_url(endpoint: str, signal: str) -> str:
    base = endpoint.rstrip("/")
    scheme_and_host = base.split("://", 1)[-1]
    if "/" in scheme_and_host:
        return endpoint  # a full URL: used as given
    return f"{base}/v1/{signal}"


def _grpc_target(endpoint: str) -> tuple[str, bool]:
    """(host:port, insecure) from an http(s):// endpoint or a bare host:port."""
    if endpoint.startswith("https://"):
        return endpoint[len("https://") :].rstrip("/"), False
    if endpoint.startswith("http://"):
        return endpoint[len("http://") :].rstrip("/"), True
    return endpoint, True


def build_sink(audit: AuditSettings, out: IO[str] | None = None) -> AuditSink:
    """The sink ``audit.exporter`` names, configured from the settings."""
    headers = dict(audit.headers)
    if audit.exporter == "file":
        if audit.export_path is None:
            raise ValueError("audit.exporter = 'file' needs audit.export_path")
        return RecordFileSink(audit.export_path)
    if audit.exporter == "console":
        stream: IO[str] = out or sys.stdout
        if audit.export_path is not None:
            stream = audit.export_path.open("a", encoding="utf-8")
        return TelemetrySink(ConsoleSpanWriter(stream), None)
    client_cert = str(audit.client_certificate_file) if audit.client_certificate_file else None
    client_key = str(audit.client_key_file) if audit.client_key_file else None
    if audit.exporter == "otlp_http":
        endpoint = audit.endpoint or DEFAULT_HTTP_ENDPOINT
        tls: dict[str, Any] = {
            "certificate_file": _ca_bundle(audit),
            "client_certificate_file": client_cert,
            "client_key_file": client_key,
            "compression": HttpCompression(audit.compression),
        }
        spans = HttpSpanExporter(
            endpoint=_http_url(endpoint, "traces"),
            session=_http_session(_http_url(endpoint, "traces")),
            headers=headers,
            timeout=audit.timeout_seconds,
            **tls,
        )
        logs = (
            HttpLogExporter(
                endpoint=_http_url(endpoint, "logs"),
                session=_http_session(_http_url(endpoint, "logs")),
                headers=headers,
                timeout=audit.timeout_seconds,
                **tls,
            )
            if audit.recording_logs
            else None
        )
        return TelemetrySink(spans, logs)
    import grpc  # type: ignore[import-untyped]

    target, insecure = _grpc_target(audit.endpoint or DEFAULT_GRPC_ENDPOINT)
    credentials = None
    if not insecure and (audit.certificate_file or audit.client_certificate_file):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(audit.certificate_file),
            private_key=_read(audit.client_key_file),
            certificate_chain=_read(audit.client_certificate_file),
        )
    channel: dict[str, Any] = {
        "endpoint": target,
        "insecure": insecure,
        "credentials": credentials,
        "headers": headers or None,
        "timeout": audit.timeout_seconds,
        "compression": grpc.Compression.Gzip
        if audit.compression == "gzip"
        else grpc.Compression.NoCompression,
    }
    grpc_spans = GrpcSpanExporter(**channel)
    grpc_logs = GrpcLogExporter(**channel) if audit.recording_logs else None
    return TelemetrySink(grpc_spans, grpc_logs)


def partial_success(body: bytes, content_type: str, response: Any, count_field: str) -> Accepted:
    """The partial success in an OTLP response body (protobuf, or JSON when the backend
    answers in JSON); an empty or unreadable body says nothing was refused."""
    if not body:
        return ACCEPTED
    rejected, message = 0, ""
    try:
        if "json" in content_type.lower():
            partial = json.loads(body).get("partialSuccess") or {}
            first, *rest = count_field.split("_")
            rejected = int(partial.get(first + "".join(w.capitalize() for w in rest), 0))
            message = str(partial.get("errorMessage", ""))
        else:
            return answer_of(response.FromString(body), count_field)
    except (ValueError, TypeError, AttributeError, DecodeError):
        return ACCEPTED
    return Accepted(rejected, message) if rejected or message else ACCEPTED


def answer_of(response: Any, count_field: str) -> Accepted:
    """What a decoded Export*ServiceResponse says was refused."""
    partial = response.partial_success
    rejected = int(getattr(partial, count_field))
    if not rejected and not partial.error_message:
        return ACCEPTED
    return Accepted(rejected, partial.error_message)


class _KeepsResponse(BaseHTTPTransport):
    """The exporter's own transport, keeping the last response for its body."""

    def __init__(self, inner: BaseHTTPTransport) -> None:
        self.inner = inner
        self.last: BaseHTTPResult | None = None

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        data: bytes | None = None,
    ) -> BaseHTTPResult:
        self.last = self.inner.request(method, url, headers=headers, timeout=timeout, data=data)
        return self.last

    def is_connection_error(self, exception: Exception | None) -> bool:
        return self.inner.is_connection_error(exception)

    def close(self) -> None:
        self.inner.close()


class _HttpSendsEncoded:
    """Mixed into an official OTLP/HTTP exporter: requests encoded in Rust go through its
    own client (its retries, timeout, headers, compression and TLS), and the accepted
    response's partial success is read."""

    _response: Any
    _count_field: str

    def _keep_responses(self) -> _KeepsResponse | None:
        """The client's transport, wrapped to keep responses (None: a client without one,
        whose responses cannot be read)."""
        client = cast(Any, self)._client
        kept = getattr(client, "_transport", None)
        if kept is None or isinstance(kept, _KeepsResponse):
            return kept
        wrapped = _KeepsResponse(kept)
        client._transport = wrapped
        return wrapped

    def export_encoded(self, request: bytes) -> Accepted | None:
        exporter = cast(Any, self)
        if getattr(exporter, "_shutdown", False):
            return None
        kept = self._keep_responses()
        if kept is not None:
            kept.last = None
        if not exporter._client.export(request).success:
            return None
        last = kept.last if kept is not None else None
        if last is None:
            return ACCEPTED
        try:
            body = last.content()
            content_type = last.headers().get("Content-Type", "")
        except Exception:  # an unreadable body says nothing about what was refused
            return ACCEPTED
        return partial_success(body, content_type, self._response, self._count_field)


class HttpSpanExporter(_HttpSendsEncoded, OTLPHttpSpanExporter):
    """The official OTLP/HTTP span exporter, for requests encoded in Rust."""

    _response = ExportTraceServiceResponse
    _count_field = "rejected_spans"


class HttpLogExporter(_HttpSendsEncoded, OTLPHttpLogExporter):
    """The official OTLP/HTTP log exporter, for requests encoded in Rust."""

    _response = ExportLogsServiceResponse
    _count_field = "rejected_log_records"


class _Encoded:
    """An encoded request passed through the gRPC exporter's export path."""

    def __init__(self, request: bytes) -> None:
        self.request = request

    def __len__(self) -> int:
        return 1


class _EncodedStub:
    """A generated service stub's ``Export`` with a request that is already its
    encoding: the bytes go out as they are (no serializer), the response is decoded as
    the generated stub decodes it."""

    method: str
    response: Any
    count_field: str

    def __init__(self, channel: Any) -> None:
        self._call = channel.unary_unary(
            self.method,
            request_serializer=None,
            response_deserializer=self.response.FromString,
            _registered_method=True,
        )
        #: The last response (its partial success).
        self.last: Any = None

    def Export(self, request: bytes, **kwargs: Any) -> Any:
        self.last = self._call(request, **kwargs)
        return self.last


class _EncodedTraceServiceStub(_EncodedStub):
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    response = ExportTraceServiceResponse
    count_field = "rejected_spans"


class _EncodedLogsServiceStub(_EncodedStub):
    method = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
    response = ExportLogsServiceResponse
    count_field = "rejected_log_records"


class _SendsEncoded:
    """Mixed into an official OTLP/gRPC exporter (its channel, retries, reconnection,
    metadata, compression and TLS): requests encoded in Rust are sent as they are.

    The generated stub would serialize a request object: decoding a 2 MiB request into
    one and encoding it again cost about 10 µs of CPU per span, more than the shipper's
    whole work per span over HTTP.
    """

    _encoded_stub: type[_EncodedStub]

    def _initialize_channel_and_stub(self) -> None:
        # Also called when the exporter reconnects after UNAVAILABLE.
        exporter = cast(Any, self)
        exporter._stub = self._encoded_stub
        cast(Any, super())._initialize_channel_and_stub()

    def export_encoded(self, request: bytes) -> Accepted | None:
        exporter = cast(Any, self)
        stub = exporter._client
        if isinstance(stub, _EncodedStub):
            stub.last = None
        if exporter._export(_Encoded(request)) is not exporter._result.SUCCESS:
            return None
        # The stub that answered (a reconnection makes a new one).
        stub = exporter._client
        if not isinstance(stub, _EncodedStub) or stub.last is None:
            return ACCEPTED
        return answer_of(stub.last, self._encoded_stub.count_field)

    def _translate_data(self, data: Any) -> Any:
        if isinstance(data, _Encoded):
            return data.request
        # SDK spans or log records (``export``): the official encoder's request, as bytes.
        return cast(Any, super())._translate_data(data).SerializeToString()


class GrpcSpanExporter(_SendsEncoded, OTLPGrpcSpanExporter):
    """The official OTLP/gRPC span exporter, for requests encoded in Rust."""

    _encoded_stub = _EncodedTraceServiceStub


class GrpcLogExporter(_SendsEncoded, OTLPGrpcLogExporter):
    """The official OTLP/gRPC log exporter, for requests encoded in Rust."""

    _encoded_stub = _EncodedLogsServiceStub


def request_span_ids(request: bytes) -> list[tuple[int, int]]:
    """(trace id, span id) of each span of an encoded request: what a backend de-duplicates on."""
    decoded = ExportTraceServiceRequest.FromString(request)
    return [
        (int.from_bytes(span.trace_id, "big"), int.from_bytes(span.span_id, "big"))
        for rs in decoded.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]

"""A real OTLP receiver for the tests: HTTP/protobuf (http.server) and gRPC (grpcio).

It decodes the requests with opentelemetry-proto, keeps every span and log record it
accepted (a retried delivery shows up twice, as a real backend would see it) and lets a
test wait for what it expects.  ``refuse_spans`` / ``refuse_logs`` make it refuse some of
a request as backends do (too old, too large, over quota): the request is accepted with
an OTLP partial success naming how many were refused and why.
``OtlpReceiver(port=...)`` can be started on a port chosen
in advance, so a test can point a gateway at a backend that is not there yet.
"""

from __future__ import annotations

import gzip
import ssl
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from pgwarden.pgcluster import find_free_port


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    resource: dict[str, Any]
    scope: str
    transport: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.trace_id, self.span_id)


@dataclass
class ReceivedLog:
    trace_id: str
    span_id: str
    body: Any
    attributes: dict[str, Any]
    event_name: str
    resource: dict[str, Any]
    severity_number: int = 0
    severity_text: str = ""
    time_ns: int = 0
    observed_ns: int = 0
    flags: int = 0
    scope: str = ""


#: Decides whether the receiver refuses a span or log record: the reason, or None.
Refusal = Callable[[Any], "str | None"]


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    logs: list[ReceivedLog] = field(default_factory=list)
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    refuse_spans: Refusal | None = None
    refuse_logs: Refusal | None = None
    #: What was refused (each time it was sent).
    refused_spans: list[ReceivedSpan] = field(default_factory=list)
    refused_logs: list[ReceivedLog] = field(default_factory=list)
    #: Over TLS: the common name of each request's client certificate (None: none).
    client_names: list[str | None] = field(default_factory=list)

    def _split(self, got: list[Any], refuse: Refusal | None) -> tuple[list[Any], list[Any], str]:
        if refuse is None:
            return got, [], ""
        kept, refused, reasons = [], [], []
        for item in got:
            reason = refuse(item)
            if reason is None:
                kept.append(item)
            else:
                refused.append(item)
                reasons.append(reason)
        return kept, refused, "; ".join(sorted(set(reasons)))

    def add_traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, via: str
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        got = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=attributes(s.attributes),
                            status_code=s.status.code,
                            status_message=s.status.message,
                            resource=resource,
                            scope=ss.scope.name,
                            transport=via,
                        )
                    )
        kept, refused, reason = self._split(got, self.refuse_spans)
        with self.lock:
            self.spans.extend(kept)
            self.refused_spans.extend(refused)
            self.requests += 1
        reply = trace_service_pb2.ExportTraceServiceResponse()
        if refused:
            reply.partial_success.rejected_spans = len(refused)
            reply.partial_success.error_message = reason
        return reply

    def add_logs(
        self, request: logs_service_pb2.ExportLogsServiceRequest
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        got = []
        for rl in request.resource_logs:
            resource = attributes(rl.resource.attributes)
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    got.append(
                        ReceivedLog(
                            trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(),
                            body=any_value(r.body),
                            attributes=attributes(r.attributes),
                            event_name=r.event_name,
                            resource=resource,
                            severity_number=r.severity_number,
                            severity_text=r.severity_text,
                            time_ns=r.time_unix_nano,
                            observed_ns=r.observed_time_unix_nano,
                            flags=r.flags,
                            scope=sl.scope.name,
                        )
                    )
        kept, refused, reason = self._split(got, self.refuse_logs)
        with self.lock:
            self.logs.extend(kept)
            self.refused_logs.extend(refused)
            self.requests += 1
        reply = logs_service_pb2.ExportLogsServiceResponse()
        if refused:
            reply.partial_success.rejected_log_records = len(refused)
            reply.partial_success.error_message = reason
        return reply


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        _note_grpc_peer(self.store, context)
        return self.store.add_traces(request, "grpc")


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(self, request: Any, context: Any) -> Any:
        _note_grpc_peer(self.store, context)
        return self.store.add_logs(request)


def _note_grpc_peer(store: _Store, context: Any) -> None:
    names = context.auth_context().get("x509_common_name")
    with store.lock:
        store.client_names.append(names[0].decode() if names else None)


def _common_name(certificate: dict[str, Any] | None) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@dataclass(frozen=True)
class ReceiverTls:
    """The receiver's certificate, and the CA its clients' certificates must chain to
    (a client without one is refused)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path


def _http_handler(store: _Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            with store.lock:
                store.headers.append({k.lower(): v for k, v in self.headers.items()})
                if isinstance(self.connection, ssl.SSLSocket):
                    store.client_names.append(_common_name(self.connection.getpeercert()))
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path.endswith("/v1/traces"):
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                reply = store.add_traces(request, "http").SerializeToString()
            elif self.path.endswith("/v1/logs"):
                logs = logs_service_pb2.ExportLogsServiceRequest()
                logs.ParseFromString(body)
                reply = store.add_logs(logs).SerializeToString()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


class OtlpReceiver:
    """An OTLP/HTTP or OTLP/gRPC endpoint on 127.0.0.1."""

    def __init__(
        self, transport: str = "http", port: int | None = None, tls: ReceiverTls | None = None
    ) -> None:
        assert transport in ("http", "grpc")
        self.transport = transport
        self.tls = tls
        self.port = port if port is not None else find_free_port()
        self.store = _Store()
        self._http: ThreadingHTTPServer | None = None
        self._grpc: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        if self.transport == "http":
            self._http = ThreadingHTTPServer(("127.0.0.1", self.port), _http_handler(self.store))
            self._http.daemon_threads = True
            if self.tls is not None:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
                context.load_verify_locations(self.tls.client_ca_file)
                context.verify_mode = ssl.CERT_REQUIRED
                self._http.socket = context.wrap_socket(self._http.socket, server_side=True)
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        else:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
                _TraceService(self.store), server
            )
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(
                _LogsService(self.store), server
            )
            if self.tls is None:
                server.add_insecure_port(f"127.0.0.1:{self.port}")
            else:
                credentials = grpc.ssl_server_credentials(
                    [(self.tls.key_file.read_bytes(), self.tls.cert_file.read_bytes())],
                    root_certificates=self.tls.client_ca_file.read_bytes(),
                    require_client_auth=True,
                )
                server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
            server.start()
            self._grpc = server
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what arrived -----------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        with self.store.lock:
            return list(self.store.spans)

    def logs(self) -> list[ReceivedLog]:
        with self.store.lock:
            return list(self.store.logs)

    def refused_spans(self) -> list[ReceivedSpan]:
        with self.store.lock:
            return list(self.store.refused_spans)

    def refused_logs(self) -> list[ReceivedLog]:
        with self.store.lock:
            return list(self.store.refused_logs)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 30.0
    ) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds; return the spans (raise on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"OTLP receiver: condition not met after {timeout} s "
                    f"({len(spans)} spans received)"
                )
            time.sleep(0.05)

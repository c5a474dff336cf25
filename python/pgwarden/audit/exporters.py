"""Where the shipper delivers the trail, and how it learns that a delivery was accepted.

Every sink exports one batch synchronously and answers True only when the backend has
accepted all of it: the official OTLP exporters (HTTP/protobuf or gRPC) report
``SpanExportResult.SUCCESS`` only for a successful response; the console and file sinks
after the write (and, for the file, fsync).  The SDK's BatchSpanProcessor, whose queue
drops spans silently when full, is not used at all: the spool is the queue.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult

from pgwarden import __version__
from pgwarden.config import AuditSettings

DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"


@dataclass
class ShipBatch:
    """One delivery: the sealed record lines it covers, and what they became."""

    lines: list[bytes] = field(default_factory=list)
    spans: list[ReadableSpan] = field(default_factory=list)
    logs: list[ReadableLogRecord] = field(default_factory=list)


class AuditSink(Protocol):
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

    def __init__(self, spans: SpanExporter, logs: LogRecordExporter | None) -> None:
        self._spans = spans
        self._logs = logs

    def export(self, batch: ShipBatch) -> bool:
        if batch.spans and self._spans.export(batch.spans) is not SpanExportResult.SUCCESS:
            return False
        if batch.logs and self._logs is not None:
            return self._logs.export(batch.logs) is LogRecordExportResult.SUCCESS
        return True

    def shutdown(self) -> None:
        self._spans.shutdown()
        if self._logs is not None:
            self._logs.shutdown()  # type: ignore[no-untyped-call]


class RecordFileSink:
    """Appends the sealed records themselves to a file (verifiable with ``audit verify``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, batch: ShipBatch) -> bool:
        if not batch.lines:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(b"".join(line + b"\n" for line in batch.lines))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def shutdown(self) -> None:
        return None


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
            return TelemetrySink(
                ConsoleSpanExporter(out=stream, formatter=lambda s: s.to_json(indent=None) + "\n"),
                None,
            )
        return TelemetrySink(ConsoleSpanExporter(out=stream), None)
    certificate = str(audit.certificate_file) if audit.certificate_file else None
    if audit.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = audit.endpoint or DEFAULT_HTTP_ENDPOINT
        spans = OTLPSpanExporter(
            endpoint=_http_url(endpoint, "traces"),
            certificate_file=certificate,
            headers=headers,
            timeout=audit.timeout_seconds,
        )
        logs = (
            OTLPLogExporter(
                endpoint=_http_url(endpoint, "logs"),
                certificate_file=certificate,
                headers=headers,
                timeout=audit.timeout_seconds,
            )
            if audit.recording_logs
            else None
        )
        return TelemetrySink(spans, logs)
    import grpc  # type: ignore[import-untyped]
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
        OTLPLogExporter as GrpcLogExporter,
    )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpanExporter,
    )

    target, insecure = _grpc_target(audit.endpoint or DEFAULT_GRPC_ENDPOINT)
    credentials = None
    if not insecure and audit.certificate_file is not None:
        credentials = grpc.ssl_channel_credentials(audit.certificate_file.read_bytes())
    grpc_spans = GrpcSpanExporter(
        endpoint=target,
        insecure=insecure,
        credentials=credentials,
        headers=headers or None,
        timeout=audit.timeout_seconds,
    )
    grpc_logs = (
        GrpcLogExporter(
            endpoint=target,
            insecure=insecure,
            credentials=credentials,
            headers=headers or None,
            timeout=audit.timeout_seconds,
        )
        if audit.recording_logs
        else None
    )
    return TelemetrySink(grpc_spans, grpc_logs)


def span_ids(spans: Sequence[ReadableSpan]) -> list[tuple[int, int]]:
    """(trace id, span id) of each span: what a backend de-duplicates on."""
    return [(s.context.trace_id, s.context.span_id) for s in spans if s.context is not None]

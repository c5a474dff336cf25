"""What one OTLP export costs the audit shipper, by transport, against a local sink.

    python benches/export_cost.py [--spans 2048] [--requests 30]

The shipper's Rust assembler encodes each request; the official exporter sends it. This
measures the second step alone: the CPU time of this process (every thread: gRPC does its
I/O on its own) per request and per span, and the wall time, for

* ``otlp_http``: pgwarden's ``HttpSpanExporter`` (the official OTLP/HTTP exporter's client);
* ``otlp_grpc``: pgwarden's ``GrpcSpanExporter`` (the official OTLP/gRPC exporter's channel
  and retries, the encoded request sent as it is);
* ``otlp_grpc, request decoded and encoded again``: the same channel through the generated
  ``TraceServiceStub``, which needs an ``ExportTraceServiceRequest`` object, so each
  request is decoded and serialized once more (what an exporter fed encoded bytes
  through the generated stub pays);
* ``compression = gzip`` over each transport (``audit.compression``);
* an empty request over each transport: the fixed cost of one export.

The requests are statement spans shaped like pgwarden's (the same attribute keys, about
1 KB each); ``benches/otlp_sink.py`` receives them without decoding. Figures only: nothing
here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from grpc import Compression as grpc_compression  # type: ignore[import-untyped]
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

from pgwarden.audit.exporters import GrpcSpanExporter, HttpSpanExporter, _http_session
from pgwarden.pgcluster import find_free_port

SINK = Path(__file__).resolve().parent / "otlp_sink.py"

_STATEMENT_ATTRIBUTES = {
    "db.system.name": "postgresql",
    "db.namespace": "postgres",
    "server.address": "127.0.0.1",
    "client.address": "127.0.0.1",
    "user.id": "agent-7f3c2a",
    "user.name": "ci-agent@example.com",
    "pgwarden.identity.issuer": "https://issuer.example.com",
    "pgwarden.upstream.role": "app_readonly",
    "pgwarden.session.id": "e0e934a8d14e3cea",
    "db.query.text": "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
    "db.operation.name": "SELECT",
    "db.query.summary": "SELECT pgbench_accounts",
    "db.collection.name": "pgbench_accounts",
    "pgwarden.protocol": "extended",
    "pgwarden.spool.stream": "20261127T090230Z-12865-w0-3c740c",
    "pgwarden.chain.hash": "7ecb0384bd960e66c006cd676723f68dc39f20c99455be6defdd1edbe0d24fd3",
    "pgwarden.command_tag": "SELECT 1",
    "pgwarden.outcome": "completed",
    "pgwarden.chain.end_hash": "077d62ac8fcca93164a0a775666507f3fd643d70475dd2dfb335bf65d619e429",
}


def build_request(spans: int) -> bytes:
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    for i in range(spans):
        span = scope_spans.spans.add()
        span.trace_id = os.urandom(16)
        span.span_id = os.urandom(8)
        span.parent_span_id = os.urandom(8)
        span.name = "SELECT pgbench_accounts"
        span.kind = 3
        span.start_time_unix_nano = 1_795_770_152_874_276_000 + i * 1000
        span.end_time_unix_nano = span.start_time_unix_nano + 200_000
        for key, value in _STATEMENT_ATTRIBUTES.items():
            attribute = span.attributes.add()
            attribute.key = key
            attribute.value.string_value = value
        for key, number in (
            ("server.port", 5432),
            ("db.response.returned_rows", 1),
            ("pgwarden.statement.number", i + 1),
            ("pgwarden.spool.seq", 2 * i + 3),
        ):
            attribute = span.attributes.add()
            attribute.key = key
            attribute.value.int_value = number
        verified = span.attributes.add()
        verified.key = "pgwarden.chain.verified"
        verified.value.bool_value = True
    return request.SerializeToString()


def measure(send: Callable[[], object], requests: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per request, after a few warm-up requests."""
    for _ in range(3):
        if not send():
            raise RuntimeError("the sink refused an export")
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        if not send():
            raise RuntimeError("the sink refused an export")
    return (time.process_time() - cpu) / requests, (time.perf_counter() - wall) / requests


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="export_cost.py", description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=2048, help="spans per request")
    parser.add_argument("--requests", type=int, default=30, help="requests measured per row")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    http_port, grpc_port = find_free_port(), find_free_port()
    sink = subprocess.Popen(
        [sys.executable, str(SINK), "--port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/stats", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        body = build_request(args.spans)
        url = f"http://127.0.0.1:{http_port}/v1/traces"
        http = HttpSpanExporter(endpoint=url, session=_http_session(url), timeout=30)
        grpc = GrpcSpanExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True, timeout=30)
        http_gzip = HttpSpanExporter(
            endpoint=url, session=_http_session(url), timeout=30, compression=Compression.Gzip
        )
        grpc_gzip = GrpcSpanExporter(
            endpoint=f"127.0.0.1:{grpc_port}",
            insecure=True,
            timeout=30,
            compression=grpc_compression.Gzip,
        )
        generated = TraceServiceStub(grpc._channel)

        def decoded_again() -> bool:
            generated.Export(ExportTraceServiceRequest.FromString(body), timeout=30)
            return True

        rows: list[tuple[str, int, Callable[[], object]]] = [
            ("otlp_http", args.spans, lambda: http.export_encoded(body)),
            ("otlp_grpc", args.spans, lambda: grpc.export_encoded(body)),
            ("otlp_grpc, request decoded and encoded again", args.spans, decoded_again),
            ("otlp_http, compression = gzip", args.spans, lambda: http_gzip.export_encoded(body)),
            ("otlp_grpc, compression = gzip", args.spans, lambda: grpc_gzip.export_encoded(body)),
            ("otlp_http, empty request", 0, lambda: http.export_encoded(b"")),
            ("otlp_grpc, empty request", 0, lambda: grpc.export_encoded(b"")),
        ]
        print(
            f"{args.spans} spans per request, {len(body) / 1024:.0f} KiB; "
            f"{args.requests} requests per row"
        )
        print(f"{'export':<46} {'CPU ms/request':>15} {'CPU µs/span':>12} {'wall ms':>9}")
        for name, spans, send in rows:
            cpu, wall = measure(send, args.requests)
            per_span = f"{cpu * 1e6 / spans:.2f}" if spans else "-"
            print(f"{name:<46} {cpu * 1e3:>15.2f} {per_span:>12} {wall * 1e3:>9.2f}")
        for exporter in (http, grpc, http_gzip, grpc_gzip):
            exporter.shutdown()
    finally:
        sink.terminate()
        sink.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())

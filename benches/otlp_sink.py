"""A minimal OTLP receiver for the benchmark: accepts, counts, answers success.

    python benches/otlp_sink.py --port 4318 [--grpc-port 4317] [--parent-pid PID] [--max-seconds S]

``POST /v1/traces`` and ``POST /v1/logs`` are read whole (``Content-Length`` or chunked)
and answered ``200`` with an empty body of type ``application/x-protobuf``, which is a
valid empty ``Export*ServiceResponse``.  Nothing is decoded, decompressed or stored, so
the sink costs as little CPU as an HTTP/1.1 server in Python can: what the benchmark
measures is pgwarden's shipper, not a collector.  Connections are kept alive.

With ``--grpc-port`` it also serves OTLP/gRPC (grpcio): ``TraceService/Export`` and
``LogsService/Export`` take the request as bytes, undecoded, count it under
``/v1/traces`` or ``/v1/logs`` and answer an empty response.  Its message limit is
grpcio's default (4 MiB), as an OpenTelemetry Collector's is.

``GET /stats`` returns the counts as JSON: requests and body bytes per path, the time of
the last request (Unix seconds) and the sink's own CPU seconds.

It listens on 127.0.0.1 only, and stops by itself when the process that started it
(``--parent-pid``) is gone or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

EXPORT_PATHS: Final = ("/v1/traces", "/v1/logs")
_CHUNK: Final = 1 << 20
_WATCH_INTERVAL: Final = 0.5


class Counters:
    """What the sink received; shared by the connection threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = {path: 0 for path in EXPORT_PATHS}
        self.bytes = {path: 0 for path in EXPORT_PATHS}
        self.rejected = 0
        self.last_request_unix: float | None = None
        self.started_unix = time.time()

    def add(self, path: str, size: int) -> None:
        with self._lock:
            self.requests[path] += 1
            self.bytes[path] += size
            self.last_request_unix = time.time()

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": sum(self.requests.values()),
                "bytes": sum(self.bytes.values()),
                "paths": {
                    path: {"requests": self.requests[path], "bytes": self.bytes[path]}
                    for path in EXPORT_PATHS
                },
                "rejected": self.rejected,
                "last_request_unix": self.last_request_unix,
                "started_unix": self.started_unix,
                "cpu_seconds": round(time.process_time(), 3),
            }


class SinkServer(ThreadingHTTPServer):
    daemon_threads = True
    counters: Counters


class SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the OTLP exporter reuses its connection
    server: SinkServer

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            size = self._drain_body()
        except ValueError as exc:
            self.server.counters.reject()
            self._answer(400, b"", "text/plain")
            self.log_error("bad request body: %s", exc)
            self.close_connection = True
            return
        if path not in EXPORT_PATHS:
            self.server.counters.reject()
            self._answer(404, b"", "text/plain")
            return
        self.server.counters.add(path, size)
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/stats":
            self._answer(404, b"", "text/plain")
            return
        body = json.dumps(self.server.counters.as_json()).encode()
        self._answer(200, body, "application/json")

    def _drain_body(self) -> int:
        """Reads and discards the request body; returns its size on the wire."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ValueError("connection closed inside a chunked body")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return total
                self._discard(size)
                self.rfile.readline(1024)  # CRLF after the chunk
                total += size
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError(f"negative Content-Length {length}")
        self._discard(length)
        return length

    def _discard(self, size: int) -> None:
        while size > 0:
            data = self.rfile.read(min(size, _CHUNK))
            if not data:
                raise ValueError("connection closed inside the body")
            size -= len(data)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # one line per request would cost more than the request

    def log_error(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"otlp_sink: {format % args}\n")


_GRPC_SERVICES: Final = {
    "opentelemetry.proto.collector.trace.v1.TraceService": "/v1/traces",
    "opentelemetry.proto.collector.logs.v1.LogsService": "/v1/logs",
}


def start_grpc(counters: Counters, port: int) -> Any:
    """OTLP/gRPC on 127.0.0.1:``port``: every export counted, undecoded, and accepted."""
    from concurrent import futures

    import grpc  # type: ignore[import-untyped]

    def export_handler(path: str) -> Any:
        def export(request: bytes, _context: Any) -> bytes:
            counters.add(path, len(request))
            return b""  # an empty Export*ServiceResponse

        # No (de)serializers: the request arrives as its bytes.
        return grpc.unary_unary_rpc_method_handler(export)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(service, {"Export": export_handler(path)})
            for service, path in _GRPC_SERVICES.items()
        ]
    )
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port} for OTLP/gRPC")
    server.start()
    return server


def _watch(server: SinkServer, parent_pid: int | None, deadline: float) -> None:
    """Stops the server when the parent is gone or the time is up."""
    while time.monotonic() < deadline:
        if parent_pid is not None and os.getppid() != parent_pid:
            break
        time.sleep(_WATCH_INTERVAL)
    server.shutdown()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="otlp_sink.py", description="Count OTLP export requests on 127.0.0.1."
    )
    parser.add_argument(
        "--port", type=int, required=True, help="TCP port on 127.0.0.1 (OTLP/HTTP, /stats)"
    )
    parser.add_argument("--grpc-port", type=int, help="also serve OTLP/gRPC on this port")
    parser.add_argument(
        "--parent-pid", type=int, help="stop when this process is no longer the parent"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=6 * 3600.0, help="stop after this long"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server = SinkServer(("127.0.0.1", args.port), SinkHandler)
    server.counters = Counters()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    threading.Thread(
        target=_watch,
        args=(server, args.parent_pid, time.monotonic() + args.max_seconds),
        name="otlp-sink-watch",
        daemon=True,
    ).start()
    grpc_server = start_grpc(server.counters, args.grpc_port) if args.grpc_port else None
    print(f"otlp_sink listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    if args.grpc_port:
        print(f"otlp_sink listening for OTLP/gRPC on 127.0.0.1:{args.grpc_port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        if grpc_server is not None:
            grpc_server.stop(grace=None)
        print(f"otlp_sink stopped: {json.dumps(server.counters.as_json())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

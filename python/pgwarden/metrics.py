"""Prometheus metrics: what the gateway is doing, for a scraper.

With ``metrics_listen = "127.0.0.1:9187"``, worker 0 answers ``GET /metrics`` on that
address in the Prometheus text format (version 0.0.4).  Every worker publishes its figures
once a second into a shared anonymous mapping made before the workers are forked (one
region per worker, which only that worker writes), so one scrape sees all of them, each
series labelled with its ``worker``: a worker that is restarted starts its counters from
zero again, as a restarted process would.  The audit figures (spool, undelivered records,
shipper) are read from the audit directory at each scrape, as ``pgwarden audit status``
reads them.

A worker's statement and byte counts come from its sessions' codecs (Query, Execute and
FunctionCall messages; bytes received from each side), summed over its open sessions and
those that ended, so they move once a second, not per statement: the statements' path
pays nothing for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import anyio
import anyio.abc

from pgwarden.config import Settings, split_host_port
from pgwarden.statement_gate import StatementGate

if TYPE_CHECKING:
    from pgwarden.gateway import Gateway

log = logging.getLogger(__name__)

PUBLISH_SECONDS: Final = 1.0
#: Connections refused before their session started, counted by SQLSTATE; others: "other".
REFUSAL_SQLSTATES: Final = ("28P01", "28000", "53300", "53400", "08006", "08P01", "0A000")

#: A worker's published figures, in order (name, type, help).
FIGURES: Final = (
    ("sessions_open", "gauge", "Sessions relaying now."),
    (
        "sessions_total",
        "counter",
        "Sessions started (the caller authenticated, the server logged in).",
    ),
    ("statements_total", "counter", "Query, Execute and FunctionCall messages clients sent."),
    (
        "statements_refused_total",
        "counter",
        "Statements refused by the policy, the masks or the role-change guard.",
    ),
    ("client_bytes_total", "counter", "Bytes received from clients during their sessions."),
    ("server_bytes_total", "counter", "Bytes received from PostgreSQL during sessions."),
    ("resident_memory_bytes", "gauge", "The worker process's resident memory."),
)
_REFUSED_FIGURES: Final = (*REFUSAL_SQLSTATES, "other")
_SLOTS: Final = len(FIGURES) + len(_REFUSED_FIGURES)
_REGION: Final = struct.Struct(f"<{_SLOTS}Q")


class MetricsBoard:
    """The workers' published figures, in memory they share (see the module)."""

    def __init__(self, workers: int, listen: str) -> None:
        self.workers = workers
        self.listen = listen
        self._map = mmap.mmap(-1, workers * _REGION.size)  # MAP_SHARED across fork

    @classmethod
    def for_settings(cls, settings: Settings) -> MetricsBoard | None:
        if settings.metrics_listen is None:
            return None
        return cls(settings.workers, settings.metrics_listen)

    def publish(self, worker: int, values: Sequence[int]) -> None:
        _REGION.pack_into(self._map, worker * _REGION.size, *(max(0, v) for v in values))

    def forget_worker(self, worker: int) -> None:
        """A worker died: its sessions are gone, its counters start again with the next."""
        self.publish(worker, [0] * _SLOTS)

    def read(self) -> list[tuple[int, ...]]:
        return [_REGION.unpack_from(self._map, i * _REGION.size) for i in range(self.workers)]


def _resident_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    return 0


class WorkerMetrics:
    """One worker's figures, published to the board once a second."""

    def __init__(self, board: MetricsBoard, gateway: Gateway, worker_index: int) -> None:
        self.board = board
        self.gateway = gateway
        self.worker_index = worker_index
        self.sessions_total = 0
        self._ended = [0, 0, 0]  # statements, client bytes, server bytes of ended sessions
        self._refused = dict.fromkeys(_REFUSED_FIGURES, 0)

    def session_started(self) -> None:
        self.sessions_total += 1

    def session_ended(self, counters: tuple[int, int, int]) -> None:
        for i, value in enumerate(counters):
            self._ended[i] += value

    def connection_refused(self, sqlstate: str | None) -> None:
        key = sqlstate if sqlstate in self._refused else "other"
        self._refused[key] += 1

    def values(self) -> list[int]:
        live = [0, 0, 0]
        open_sessions = 0
        for session in list(self.gateway.sessions):
            relay = session.relay
            if relay is None:
                continue
            open_sessions += 1
            for i, value in enumerate(relay.codec.counters):
                live[i] += value
        hook = self.gateway.client_event_hook
        refused = hook.refused if isinstance(hook, StatementGate) else 0
        statements, client_bytes, server_bytes = (
            a + b for a, b in zip(live, self._ended, strict=True)
        )
        return [
            open_sessions,
            self.sessions_total,
            statements,
            refused,
            client_bytes,
            server_bytes,
            _resident_bytes(),
            *(self._refused[key] for key in _REFUSED_FIGURES),
        ]

    def publish(self) -> None:
        self.board.publish(self.worker_index, self.values())

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.publish()
        task_status.started()
        try:
            while True:
                await anyio.sleep(PUBLISH_SECONDS)
                self.publish()
        finally:
            with contextlib.suppress(Exception):
                self.publish()


# --- the endpoint ----------------------------------------------------------------------------


def render(board: MetricsBoard, settings: Settings) -> str:
    """The scrape: every worker's figures, then the audit trail's."""
    lines: list[str] = []
    rows = board.read()
    for index, (name, kind, text) in enumerate(FIGURES):
        metric = f"pgwarden_{name}"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        lines += [f'{metric}{{worker="{w}"}} {row[index]}' for w, row in enumerate(rows)]
    metric = "pgwarden_connections_refused_total"
    lines += [
        f"# HELP {metric} Connections refused before their session started, by SQLSTATE.",
        f"# TYPE {metric} counter",
    ]
    for w, row in enumerate(rows):
        for offset, sqlstate in enumerate(_REFUSED_FIGURES):
            value = row[len(FIGURES) + offset]
            lines.append(f'{metric}{{worker="{w}",sqlstate="{sqlstate}"}} {value}')
    lines += _audit_lines(settings)
    return "\n".join(lines) + "\n"


def _audit_lines(settings: Settings) -> list[str]:
    directory = settings.audit.directory
    if directory is None:
        return []
    from pgwarden.audit.status import audit_status

    try:
        status = audit_status(directory, settings.audit.max_spool_bytes)
    except OSError as exc:
        log.warning("metrics: the audit directory cannot be read: %s", exc)
        return []
    age = status.oldest_undelivered_seconds
    figures: tuple[tuple[str, str, float], ...] = (
        ("audit_spool_bytes", "Disk the spool's segments take.", status.spool_bytes),
        (
            "audit_spool_limit_bytes",
            "max_spool_bytes: new statements are refused past it.",
            status.max_spool_bytes,
        ),
        (
            "audit_undelivered_records",
            "Records written and not acknowledged by the backend yet.",
            status.undelivered,
        ),
        (
            "audit_oldest_undelivered_seconds",
            "Age of the oldest record not acknowledged yet (0: none).",
            round(age or 0.0, 3),
        ),
        (
            "audit_shipper_up",
            "1 while a shipper holds the audit directory's lock.",
            int(status.shipper_running),
        ),
        (
            "audit_rejected_requests",
            "Requests the backend partly refused, kept under rejected/.",
            status.rejected_requests,
        ),
    )
    lines = []
    for name, text, value in figures:
        lines += [f"# HELP pgwarden_{name} {text}", f"# TYPE pgwarden_{name} gauge"]
        lines.append(f"pgwarden_{name} {value}")
    return lines


_REQUEST_TIMEOUT: Final = 5.0
_EXPOSITION: Final = "text/plain; version=0.0.4; charset=utf-8"


def bind_metrics(listen: str) -> socket.socket:
    """The metrics endpoint's listening socket, bound before the event loop starts: an
    address in use is a clear start-up error (OSError naming it)."""
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {listen}: {exc.strerror}") from exc


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1, one request per connection (worker 0)."""

    def __init__(self, board: MetricsBoard, settings: Settings, sock: socket.socket) -> None:
        self.board = board
        self.settings = settings
        self.sock = sock

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        server = await asyncio.start_server(self._answer, sock=self.sock)
        async with server:
            log.info("metrics on http://%s/metrics", self.board.listen)
            task_status.started()
            await server.serve_forever()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(_REQUEST_TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                await _send(writer, 405, "method not allowed\n", "text/plain")
            elif parts[1].split("?", 1)[0] != "/metrics":
                await _send(writer, 404, "not found: try /metrics\n", "text/plain")
            else:
                body = await anyio.to_thread.run_sync(render, self.board, self.settings)
                await _send(writer, 200, body, _EXPOSITION, head=parts[0] == "HEAD")
        except OSError:
            pass  # the scraper went away
        finally:
            writer.close()


async def _send(
    writer: asyncio.StreamWriter, status: int, body: str, content_type: str, *, head: bool = False
) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    data = body.encode()
    writer.write(
        (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + (b"" if head else data)
    )
    await writer.drain()

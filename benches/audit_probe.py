"""What the audit shipper of one pgwarden target has delivered, and what is still waiting.

The gateway writes records into memory-mapped segment files under
``<audit.directory>/spool/<stream>/<first seq>.seg`` (one stream per gateway process);
each segment is allocated whole and its unwritten rest is zero bytes.  The shipper
writes ``checkpoint.json`` next to them (the next segment and byte offset to read, and
the seq of the last record delivered) every 3 seconds while it delivers and at
once when it runs out of work, and deletes (or recycles as ``.free-*.seg``) the
segments behind it.  So, from outside and without stopping anything:

* records written   = the seq of the last complete record in the newest segment;
* records delivered = the checkpoint's seq (up to about a second behind the shipper);
* backlog bytes     = from the checkpoint's position to the end of the written data.

The benchmark also counts what reached its OTLP sink (``benches/otlp_sink.py``,
``GET /stats``): request and byte counts, which move whenever the shipper exports.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pgwarden.audit.spool import SEGMENT_SUFFIX, Checkpoint, segment_names
from proxies import ManagedProcess, ProxyError, free_port

SINK_SCRIPT: Final = Path(__file__).resolve().parent / "otlp_sink.py"
_HEAD: Final = re.compile(rb'\{"seq":(\d+),')
_TAIL_WINDOWS: Final = (64 * 1024, 1024 * 1024, 16 * 1024 * 1024)


# --- the OTLP sink -----------------------------------------------------------------------


@dataclass(frozen=True)
class SinkStats:
    requests: int
    bytes: int
    cpu_seconds: float
    rejected: int


class OtlpSink:
    """``benches/otlp_sink.py`` as a child process on free loopback ports: OTLP/HTTP (and
    ``GET /stats``) on ``port``, OTLP/gRPC on ``grpc_port``."""

    def __init__(self, process: ManagedProcess, port: int, grpc_port: int) -> None:
        self.process = process
        self.port = port
        self.grpc_port = grpc_port

    def endpoint(self, exporter: str = "otlp_http") -> str:
        """``audit.endpoint`` for pgwarden's ``audit.exporter`` (OTLP/HTTP: the exporter
        appends /v1/traces, /v1/logs)."""
        port = self.grpc_port if exporter == "otlp_grpc" else self.port
        return f"http://127.0.0.1:{port}"

    def stats(self, timeout: float = 5.0) -> SinkStats:
        url = f"{self.endpoint()}/stats"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data: dict[str, Any] = json.loads(response.read())
        return SinkStats(
            requests=int(data["requests"]),
            bytes=int(data["bytes"]),
            cpu_seconds=float(data["cpu_seconds"]),
            rejected=int(data["rejected"]),
        )


def start_sink(directory: Path, name: str) -> OtlpSink:
    """Starts a sink and waits until it answers ``GET /stats``."""
    directory.mkdir(parents=True, exist_ok=True)
    port, grpc_port = free_port(), free_port()
    process = ManagedProcess(name, directory / f"{name}.log")
    process.spawn(
        [
            sys.executable,
            str(SINK_SCRIPT),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--parent-pid",
            str(os.getpid()),
        ],
        env=os.environ,
        cwd=directory,
    )
    sink = OtlpSink(process, port, grpc_port)
    deadline = time.monotonic() + 15
    while True:
        if not process.alive:
            raise ProxyError(f"{name} exited during startup:\n{process.log_tail()}")
        try:
            sink.stats(timeout=1.0)
            return sink
        except (OSError, urllib.error.URLError, ValueError) as exc:
            if time.monotonic() > deadline:
                process.stop()
                raise ProxyError(f"{name} did not answer within 15 s: {exc}") from exc
        time.sleep(0.05)


# --- the spool ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolState:
    """One look at an audit directory (every stream summed) and at its sink."""

    at: float
    """time.monotonic() of the look."""
    written_records: int
    delivered_records: int
    backlog_bytes: int
    segments: int
    """Segment files holding records not delivered yet."""
    segment_bytes: int
    """Their size on disk (allocated whole: ``audit.segment_bytes`` each)."""
    files: int
    """Every segment file with records, delivered or not (``.prepared-*`` and
    ``.free-*`` ones left out)."""
    file_bytes: int
    sink: SinkStats | None

    @property
    def backlog_records(self) -> int:
        return max(0, self.written_records - self.delivered_records)


class SpoolProbe:
    """Reads the spool of one audit directory without disturbing writer or shipper."""

    def __init__(self, directory: Path, sink: OtlpSink | None) -> None:
        self.spool = directory / "spool"
        self.sink = sink
        # Where the written data of a segment ends, for segments that are complete (a
        # newer one exists): they never change again.
        self._ends: dict[Path, int] = {}

    def look(self) -> SpoolState:
        written = delivered = backlog = segments = segment_bytes = files = file_bytes = 0
        try:
            streams = sorted(p for p in self.spool.iterdir() if p.is_dir())
        except FileNotFoundError:
            streams = []
        for stream in streams:
            names = segment_names(stream)
            checkpoint = _checkpoint(stream)
            delivered += checkpoint.seq
            last_end = 0
            for index, name in enumerate(names):
                newest = index == len(names) - 1
                try:
                    size = (stream / name).stat().st_size
                except FileNotFoundError:
                    continue  # deleted by the shipper meanwhile
                files += 1
                file_bytes += size
                if name < checkpoint.segment and not newest:
                    continue  # delivered, not deleted yet
                end = self._data_end(stream / name, complete=not newest)
                if newest:
                    last_end = end
                if name >= checkpoint.segment:
                    pending = end - (checkpoint.offset if name == checkpoint.segment else 0)
                    if pending > 0:
                        backlog += pending
                        segments += 1
                        segment_bytes += size
            if names:
                last = names[-1]
                written += _last_seq(stream / last, last_end, fallback=_first_seq(last) - 1)
        for path in list(self._ends):
            if not path.exists():
                del self._ends[path]
        return SpoolState(
            at=time.monotonic(),
            written_records=written,
            delivered_records=delivered,
            backlog_bytes=backlog,
            segments=segments,
            segment_bytes=segment_bytes,
            files=files,
            file_bytes=file_bytes,
            sink=self._sink_stats(),
        )

    def _sink_stats(self) -> SinkStats | None:
        if self.sink is None:
            return None
        try:
            return self.sink.stats()
        except (OSError, ValueError, KeyError):
            return None  # the sink died: the process check reports it after the run

    def _data_end(self, path: Path, *, complete: bool) -> int:
        cached = self._ends.get(path)
        if cached is not None:
            return cached
        end = _first_zero(path)
        if complete:
            self._ends[path] = end
        return end


@dataclass(frozen=True)
class _Checkpoint:
    segment: str
    offset: int
    seq: int


def _checkpoint(stream: Path) -> _Checkpoint:
    """The shipper's checkpoint; none yet means nothing delivered, from the start."""
    try:
        loaded = Checkpoint.load(stream)
    except ValueError:  # a damaged checkpoint file: count nothing as delivered
        return _Checkpoint("", 0, 0)
    position = loaded.position
    return _Checkpoint(
        segment=position.segment if position else "",
        offset=position.offset if position else 0,
        seq=loaded.seq,
    )


def _first_seq(name: str) -> int:
    try:
        return int(name[: -len(SEGMENT_SUFFIX)])
    except ValueError:
        return 1


def _first_zero(path: Path) -> int:
    """Offset of the first zero byte: records never contain one (JSON escapes NUL) and the
    unwritten rest of a segment is all zeros, so a binary search finds the data's end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        low, high = 0, os.fstat(fd).st_size
        while low < high:
            middle = (low + high) // 2
            byte = os.pread(fd, 1, middle)
            if not byte or byte == b"\0":
                high = middle
            else:
                low = middle + 1
        return low
    finally:
        os.close(fd)


def _last_seq(path: Path, end: int, *, fallback: int) -> int:
    """The seq of the last complete record before ``end`` (``fallback`` if none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return fallback
    try:
        for window in _TAIL_WINDOWS:
            start = max(0, end - window)
            data = os.pread(fd, end - start, start)
            complete = data.rfind(b"\n")
            if complete < 0:
                if start == 0:
                    return fallback
                continue
            # The head of the last complete line: a line start followed by {"seq":N,
            line_start = data.rfind(b"\n", 0, complete) + 1
            if line_start == 0 and start > 0:
                continue  # the line began before the window
            head = _HEAD.match(data, line_start)
            return int(head[1]) if head else fallback
        return fallback
    finally:
        os.close(fd)


# --- after a run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Drain:
    outcome: str
    """``drained`` (every record written was delivered), ``stalled`` (nothing moved for
    ``quiet`` seconds with records left) or ``timeout``."""
    seconds: float
    """From ``since`` to the look that saw the outcome."""
    state: SpoolState


def wait_drained(
    probe: SpoolProbe,
    *,
    since: float,
    timeout: float,
    quiet: float,
    poll: float = 0.1,
    on_poll: Callable[[SpoolState], None] | None = None,
) -> Drain:
    """Polls until the shipper has delivered everything written, bounded by ``timeout``."""
    deadline = since + timeout
    moved_at = time.monotonic()
    previous: tuple[int, ...] | None = None
    while True:
        state = probe.look()
        if on_poll is not None:
            on_poll(state)
        if state.backlog_records == 0:
            return Drain("drained", state.at - since, state)
        marks = (
            state.written_records,
            state.delivered_records,
            state.backlog_bytes,
            state.segment_bytes,
            state.sink.bytes if state.sink else 0,
        )
        if marks != previous:
            previous, moved_at = marks, state.at
        elif state.at - moved_at >= quiet:
            return Drain("stalled", state.at - since, state)
        if state.at >= deadline:
            return Drain("timeout", state.at - since, state)
        time.sleep(poll)

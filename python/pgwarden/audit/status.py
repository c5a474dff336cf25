"""``pgwarden audit status``: how far the audit trail is from the backend, read from disk.

For each stream in the spool: whether its writer (a gateway process) still runs, the last
record it wrote, the last record the shipper's checkpoint says the backend acknowledged,
and the time of the oldest record not acknowledged yet.  With the spool's size against
its bound, whether a shipper runs, and the requests kept under ``rejected/``, it answers
what a health check asks: is the audit backend keeping up?  Nothing here talks to the
gateway or the shipper, so it works while either is down.

The checkpoint is written every few seconds while the shipper is busy
(``CHECKPOINT_INTERVAL_SECONDS``), so what it reports as undelivered may include records
delivered in the last few seconds: never the other way round.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from pgwarden.audit.spool import (
    REJECTED_LOGS_SUFFIX,
    REJECTED_TRACES_SUFFIX,
    AuditPaths,
    Checkpoint,
    StreamReader,
    list_streams,
    lock_held,
    segment_names,
    spool_usage,
    writer_alive,
)

#: Bytes read back from the end of a segment's data to find its last whole record.
_TAIL_BYTES: Final = 64 << 10


@dataclass
class StreamStatus:
    stream: str
    writer_running: bool
    #: The last record written (seq and time, microseconds since the epoch); 0 if none.
    written_seq: int = 0
    written_ts: int = 0
    #: The last record the backend acknowledged, by the checkpoint; 0 if none yet.
    delivered_seq: int = 0
    #: Records written and not acknowledged yet.
    undelivered: int = 0
    #: Time of the oldest record not acknowledged yet (0: none).
    oldest_undelivered_ts: int = 0
    open_sessions: int = 0


@dataclass
class AuditStatus:
    directory: str
    spool_bytes: int
    max_spool_bytes: int
    shipper_running: bool
    rejected_requests: int
    streams: list[StreamStatus] = field(default_factory=list)
    #: When this was read (microseconds since the epoch).
    now_ts: int = 0

    @property
    def undelivered(self) -> int:
        return sum(s.undelivered for s in self.streams)

    @property
    def oldest_undelivered_seconds(self) -> float | None:
        """Age of the oldest record not acknowledged yet, in seconds (None: none)."""
        times = [s.oldest_undelivered_ts for s in self.streams if s.oldest_undelivered_ts]
        if not times:
            return None
        return max(0.0, (self.now_ts - min(times)) / 1e6)

    def to_json(self) -> str:
        data: dict[str, Any] = asdict(self)
        data["undelivered"] = self.undelivered
        data["oldest_undelivered_seconds"] = self.oldest_undelivered_seconds
        return json.dumps(data, indent=2)

    def summary(self) -> str:
        share = 100 * self.spool_bytes / self.max_spool_bytes if self.max_spool_bytes else 0.0
        lines = [
            f"audit directory {self.directory}",
            f"spool: {self.spool_bytes / (1 << 20):.1f} MiB of segments, {share:.0f} % of "
            f"max_spool_bytes {self.max_spool_bytes / (1 << 20):.0f} MiB (new statements "
            "are refused at 100 %)",
            f"shipper: {'running' if self.shipper_running else 'NOT running'}",
        ]
        for s in self.streams:
            writer = "writer running" if s.writer_running else "writer ended"
            behind = ""
            if s.oldest_undelivered_ts:
                seconds = max(0.0, (self.now_ts - s.oldest_undelivered_ts) / 1e6)
                behind = f", the oldest {seconds:.1f} s old"
            lines.append(
                f"stream {s.stream} ({writer}): written up to seq {s.written_seq}, delivered "
                f"up to seq {s.delivered_seq}: {s.undelivered} record(s) undelivered{behind}; "
                f"{s.open_sessions} session(s) open"
            )
        if self.rejected_requests:
            lines.append(
                f"rejected: {self.rejected_requests} request(s) the backend partly refused, "
                "kept under rejected/"
            )
        age = self.oldest_undelivered_seconds
        lines.append(
            f"undelivered: {self.undelivered} record(s)"
            + (f", the oldest {age:.1f} s old" if age is not None else "")
        )
        return "\n".join(lines)


def _data_end(fd: int, size: int) -> int:
    """Where a segment's records end: segments are allocated whole and zero-filled, and
    records never hold a NUL byte, so the first NUL ends them (a binary search)."""
    low, high = 0, size  # data[:low] has no NUL; data[high] is NUL or the end
    while low < high:
        middle = (low + high) // 2
        if os.pread(fd, 1, middle) == b"\0":
            high = middle
        else:
            low = middle + 1
    return low


def last_record(stream_dir: Path) -> dict[str, Any] | None:
    """The last whole record written to a stream (None: none yet)."""
    for name in reversed(segment_names(stream_dir)):
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(stream_dir / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                end = _data_end(fd, os.fstat(fd).st_size)
                start = max(0, end - _TAIL_BYTES)
                tail = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
            last = tail.rfind(b"\n")
            if last < 0:
                continue
            begin = tail.rfind(b"\n", 0, last) + 1
            if begin == 0 and start > 0:
                continue  # one record longer than the tail read: not worth more here
            with contextlib.suppress(ValueError):
                record: dict[str, Any] = json.loads(tail[begin:last])
                return record
    return None


def stream_status(stream_dir: Path) -> StreamStatus:
    status = StreamStatus(stream=stream_dir.name, writer_running=writer_alive(stream_dir))
    checkpoint = Checkpoint.load(stream_dir)
    status.delivered_seq = checkpoint.seq
    status.open_sessions = len(checkpoint.open_sessions)
    last = last_record(stream_dir)
    if last is None:
        return status
    status.written_seq = int(last.get("seq", 0))
    status.written_ts = int(last.get("ts", 0))
    status.undelivered = max(0, status.written_seq - status.delivered_seq)
    if status.undelivered:
        first = StreamReader(stream_dir, checkpoint.position).read(1)
        with contextlib.suppress(ValueError, IndexError):
            status.oldest_undelivered_ts = int(json.loads(first[0]).get("ts", 0))
    return status


def audit_status(directory: Path, max_spool_bytes: int) -> AuditStatus:
    paths = AuditPaths(directory)
    rejected = 0
    with contextlib.suppress(FileNotFoundError):
        rejected = sum(
            1
            for name in os.listdir(paths.rejected)
            if name.endswith((REJECTED_TRACES_SUFFIX, REJECTED_LOGS_SUFFIX))
        )
    return AuditStatus(
        directory=str(directory),
        spool_bytes=spool_usage(paths.spool),
        max_spool_bytes=max_spool_bytes,
        shipper_running=lock_held(paths.shipper_lock),
        rejected_requests=rejected,
        streams=[stream_status(s) for s in list_streams(paths.spool)],
        now_ts=time.time_ns() // 1000,
    )

"""The audit spool on disk: its layout, and reading it back.

::

    <audit.directory>/
      chain.key                       generated HMAC key (when none is configured)
      shipper.lock                    flock held by the running shipper
      spool/<stream>/writer.lock      flock held by the gateway process writing the stream
      spool/<stream>/<seq>.seg        segment files, named after the seq of their first record
      spool/<stream>/.free-<seq>.seg  delivered segments the writer may reuse
      spool/<stream>/checkpoint.json  what the shipper has delivered (and still holds open)
      recorded/<stream>/<seq>.seg     delivered segments kept as session recordings
      recorded/<stream>/sessions.idx  where each session of the stream starts

A *stream* is what one gateway process wrote in its lifetime (the Rust ``AuditSpool``,
``rust/wire/src/audit_spool.rs``).  Segment files are allocated whole and filled from the
start; the unwritten rest is zero bytes.  A reader follows ``segment_end`` records from
one segment to the next and stops at the first zero byte or incomplete line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, overload

from pgwarden.audit.records import Record

SPOOL_DIR: Final = "spool"
RECORDED_DIR: Final = "recorded"
#: OTLP requests a backend accepted while refusing part of them (a partial success), kept
#: as ``<stream>-seq<seq>-<n>`` plus one of these suffixes.
REJECTED_DIR: Final = "rejected"
REJECTED_TRACES_SUFFIX: Final = ".traces.binpb"
REJECTED_LOGS_SUFFIX: Final = ".logs.binpb"
#: Session recordings of earlier versions (one file of records per session).
SESSIONS_DIR: Final = "sessions"
SHIPPER_LOCK: Final = "shipper.lock"
WRITER_LOCK: Final = "writer.lock"
CHECKPOINT: Final = "checkpoint.json"
SEGMENT_SUFFIX: Final = ".seg"
#: A delivered segment given back to its (live) writer to reuse.
FREE_PREFIX: Final = ".free-"
#: Reads start small (a reader that keeps up finds little new data) and grow while
#: every read comes back full.
_READ_CHUNK_MIN: Final = 64 << 10
_READ_CHUNK_MAX: Final = 1 << 20
_SEGMENT_END_MARK: Final = b'"type":"segment_end"'
#: How often the shipper writes a busy stream's checkpoint (and fsyncs the recording's
#: index, moves or frees segments); an idle one is checkpointed at once.  Between
#: checkpoints, delivered batches are only in memory: a shipper killed meanwhile delivers
#: them again, with the same span ids.
CHECKPOINT_INTERVAL_SECONDS: Final = 3.0


@dataclass(frozen=True)
class AuditPaths:
    """Where everything of one audit directory lives."""

    root: Path

    @property
    def spool(self) -> Path:
        return self.root / SPOOL_DIR

    @property
    def recorded(self) -> Path:
        return self.root / RECORDED_DIR

    @property
    def rejected(self) -> Path:
        return self.root / REJECTED_DIR

    @property
    def shipper_lock(self) -> Path:
        return self.root / SHIPPER_LOCK


def new_stream_id(worker: int) -> str:
    """A stream id: sortable by start time, unique per process lifetime."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}-{os.getpid()}-w{worker}-{secrets.token_hex(3)}"


def list_streams(spool: Path) -> list[Path]:
    """Stream directories, oldest first."""
    try:
        return sorted(p for p in spool.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def segment_names(stream_dir: Path) -> list[str]:
    """Segment files of a stream in order (prepared, not yet used ones excluded)."""
    try:
        names = os.listdir(stream_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(SEGMENT_SUFFIX) and not n.startswith("."))


def stream_segments(stream_dirs: Sequence[Path]) -> list[Path]:
    """One stream's segment files in order, wherever each is (its ``recorded/`` and
    ``spool/`` directories); a name found in several is taken from the first."""
    where: dict[str, Path] = {}
    for stream_dir in stream_dirs:
        for name in segment_names(stream_dir):
            where.setdefault(name, stream_dir / name)
    return [where[name] for name in sorted(where)]


def write_durably(path: Path, data: bytes, *, append: bool = False) -> None:
    """Write ``data`` to ``path`` (created mode 0600; appended to, or replacing what it
    held) and fsync it."""
    mode = os.O_APPEND if append else os.O_TRUNC
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the entries of ``path`` (created, renamed, removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cached(path: Path) -> None:
    """Ask the kernel to drop ``path``'s pages from the page cache (those written back and
    no longer mapped; dirty ones are written back first).  For files written once and
    read rarely, such as kept recordings: left cached they push out pages that are used,
    PostgreSQL's among them, and the kernel must reclaim them later."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """Whether a process holds an flock on ``path`` (a writer's or the shipper's lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def writer_alive(stream_dir: Path) -> bool:
    """Whether the process that writes this stream still runs (it holds an flock)."""
    return lock_held(stream_dir / WRITER_LOCK)


def spool_usage(spool: Path) -> int:
    """Bytes of segment files in the spool (every stream)."""
    total = 0
    for stream in list_streams(spool):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(stream):
                if entry.name.endswith(SEGMENT_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat().st_size
    return total


@dataclass(frozen=True)
class Position:
    """A place in a stream: a segment file and a byte offset in it."""

    segment: str
    offset: int


class Lines(Sequence[bytes]):
    """The record lines of one read, kept as the chunks of segment data they came in.

    ``chunks`` holds ``(data, end)`` pairs: ``data[:end]`` is whole lines separated by
    newlines (``data[end]`` is the last one's newline).  The shipper hands the chunks to
    Rust as they are; lines become Python objects only when indexed or iterated (splitting
    every line in Python cost about as much as assembling its span).
    """

    __slots__ = ("_split", "chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[tuple[bytes, int]] = []
        #: Bytes of the lines, newlines included.
        self.size = 0
        self._split: list[bytes] | None = None

    def add(self, data: bytes, end: int) -> None:
        self.chunks.append((data, end))
        self.size += end + 1
        self._split = None

    def lines(self) -> list[bytes]:
        """Every line, without newline (split once, then kept)."""
        if self._split is None:
            out: list[bytes] = []
            for data, end in self.chunks:
                out.extend(data[:end].split(b"\n"))
            self._split = out
        return self._split

    def joined(self) -> bytes:
        """The lines as written: each followed by its newline."""
        return b"".join(data[: end + 1] for data, end in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def __len__(self) -> int:
        return len(self.lines())

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> list[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | list[bytes]:
        return self.lines()[index]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.lines())


class StreamReader:
    """Reads the record lines of one stream from a position onwards.

    :meth:`read` returns whole chunks of lines (:class:`Lines`); where a line was is worked
    out only when asked (:meth:`locate`), for error messages.
    """

    def __init__(self, stream_dir: Path, position: Position | None) -> None:
        self.stream_dir = stream_dir
        if position is None:
            names = segment_names(stream_dir)
            position = Position(names[0], 0) if names else None
        self.position = position
        # Where each chunk of the last read starts: (segment, offset).
        self._origins: list[tuple[str, int]] = []
        self._lines = Lines()
        self._chunk = _READ_CHUNK_MIN

    def read(self, max_bytes: int) -> Lines:
        """Complete lines available now, whole chunks until ``max_bytes`` or more are read;
        advances the reader."""
        out = Lines()
        self._origins = []
        while out.size < max_bytes and self.position is not None:
            if not self._read_segment(out):
                break
        self._lines = out
        return out

    def locate(self, index: int) -> tuple[str, int]:
        """(segment, byte offset) of line ``index`` of the last read."""
        first = 0
        for (segment, offset), (data, end) in zip(self._origins, self._lines.chunks, strict=True):
            count = data.count(b"\n", 0, end) + 1
            if index < first + count:
                at = 0
                for _ in range(index - first):
                    at = data.index(b"\n", at, end) + 1
                return segment, offset + at
            first += count
        return "?", 0

    def _read_segment(self, out: Lines) -> bool:
        """Reads a chunk of the current segment; True if the read may go on (more in this
        segment, or it moved on to the next one)."""
        pos = self.position
        assert pos is not None
        try:
            fd = os.open(self.stream_dir / pos.segment, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            size = self._chunk
            while True:
                data = os.pread(fd, size, pos.offset)
                end = data.find(b"\0")
                if end < 0:
                    end = len(data)
                full = end == len(data) == size
                self._chunk = (
                    min(_READ_CHUNK_MAX, size * 2) if full else max(_READ_CHUNK_MIN, size // 2)
                )
                last = data.rfind(b"\n", 0, end)
                if last >= 0:
                    break
                if end < len(data) or len(data) < size:
                    return False  # nothing complete yet (or a line being written)
                size *= 4  # one line longer than the chunk
            self._origins.append((pos.segment, pos.offset))
            out.add(data, last)
            tail_start = data.rfind(b"\n", 0, last) + 1
            if data.find(_SEGMENT_END_MARK, tail_start, min(last, tail_start + 200)) >= 0:
                self.position = Position(str(json.loads(data[tail_start:last]).get("next")), 0)
                return True
            self.position = Position(pos.segment, pos.offset + last + 1)
            # The chunk ended mid-data: there may be more in this segment.
            return end == len(data) and len(data) == size and self._more_in(fd)
        finally:
            os.close(fd)

    def _more_in(self, fd: int) -> bool:
        assert self.position is not None
        return bool(os.pread(fd, 1, self.position.offset).strip(b"\0"))


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of a file of records (a segment or an exported file)."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n")
            if not line or line[0] == 0:
                return
            yield number, line


@dataclass
class Checkpoint:
    """What the shipper delivered from a stream, and what it still holds open.

    Records before ``position`` are acknowledged by the backend, except the ``session`` and
    ``stmt`` records still open (no ``session_end`` / ``end`` yet), which are carried here so
    that the segments holding them can be deleted.
    """

    position: Position | None = None
    seq: int = 0
    prev_hash: str = "00" * 32
    last_ts: int = 0
    stream_info: Record = field(default_factory=dict)
    open_sessions: dict[str, Record] = field(default_factory=dict)
    open_statements: dict[str, Record] = field(default_factory=dict)
    closed: bool = False

    @classmethod
    def load(cls, stream_dir: Path) -> Checkpoint:
        try:
            data: dict[str, Any] = json.loads((stream_dir / CHECKPOINT).read_bytes())
        except FileNotFoundError:
            return cls()
        pos = data.get("position")
        loaded = cls._from(data)
        loaded.position = Position(pos["segment"], int(pos["offset"])) if pos else None
        return loaded

    def state_json(self) -> bytes:
        """Everything but the position, as the span assembler resumes from it."""
        return json.dumps(self._state(), separators=(",", ":")).encode()

    @classmethod
    def from_state(cls, state: bytes) -> Checkpoint:
        """A checkpoint (position not set) from the span assembler's state."""
        return cls._from(json.loads(state))

    @classmethod
    def _from(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(
            seq=int(data.get("seq", 0)),
            prev_hash=str(data.get("prev_hash", "00" * 32)),
            last_ts=int(data.get("last_ts", 0)),
            stream_info=dict(data.get("stream_info") or {}),
            open_sessions=dict(data.get("open_sessions") or {}),
            open_statements=dict(data.get("open_statements") or {}),
            closed=bool(data.get("closed", False)),
        )

    def _state(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "last_ts": self.last_ts,
            "stream_info": self.stream_info,
            "open_sessions": self.open_sessions,
            "open_statements": self.open_statements,
            "closed": self.closed,
        }

    def copy(self) -> Checkpoint:
        return Checkpoint(
            position=self.position,
            seq=self.seq,
            prev_hash=self.prev_hash,
            last_ts=self.last_ts,
            stream_info=dict(self.stream_info),
            open_sessions=dict(self.open_sessions),
            open_statements=dict(self.open_statements),
            closed=self.closed,
        )

    def save(self, stream_dir: Path) -> None:
        """Atomically replace the stream's checkpoint (write, fsync, rename, fsync dir)."""
        data = {
            "position": (
                {"segment": self.position.segment, "offset": self.position.offset}
                if self.position
                else None
            ),
            **self._state(),
        }
        path = stream_dir / CHECKPOINT
        tmp = stream_dir / f".{CHECKPOINT}.tmp"
        with tmp.open("wb") as handle:
            handle.write(json.dumps(data, separators=(",", ":")).encode())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_directory(stream_dir)

"""Session recordings: the delivered spool segments, kept, and an index of the sessions.

A recording is not a second copy of the records.  Once the backend has acknowledged every
record of a segment, the shipper moves the segment file from ``spool/<stream>/`` to
``recorded/<stream>/`` (a rename) instead of deleting it; each stream's
``recorded/<stream>/sessions.idx`` says where each of its sessions starts (``<session id>
<seq>`` per line).  The records keep their hash chain: ``pgwarden audit verify`` checks a
recorded stream like a spooled one.  The ``end`` records carry each statement's result as
the client saw it, within the recording caps.

``pgwarden replay`` finds the session in the indexes and reads the stream's segments from
the one holding the session's first record, recorded or still in the spool, until its
``session_end`` (:func:`read_session`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from pgwarden.audit import records as kinds
from pgwarden.audit.records import Record
from pgwarden.audit.spool import (
    RECORDED_DIR,
    SEGMENT_SUFFIX,
    SESSIONS_DIR,
    SPOOL_DIR,
    drop_cached,
    fsync_directory,
    list_streams,
    segment_names,
    stream_segments,
)

#: The record types a replay shows.
RECORDED: Final = frozenset(
    {kinds.SESSION, kinds.REFUSED, kinds.STMT, kinds.DECISION, kinds.END, kinds.SESSION_END}
)
#: The records that start a session (and so an index entry).
STARTS: Final = frozenset({kinds.SESSION, kinds.REFUSED})
#: The records after which a session has nothing more.
ENDS: Final = frozenset({kinds.SESSION_END, kinds.REFUSED})
INDEX: Final = "sessions.idx"
_SESSION_ID: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
#: The head of every record (rust/wire/src/audit_record.rs, RecordBody::begin).
_SEQ: Final = re.compile(rb'\{"seq":(\d+),')


def check_session_id(session_id: str) -> str:
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    return session_id


class SessionRecorder:
    """Keeps one stream's delivered segments and indexes the sessions that start in it.

    The shipper hands it the session-starting records of each delivered batch
    (:meth:`add_lines`), calls :meth:`write` after the delivery and :meth:`sync` before
    each checkpoint, and :meth:`keep` for each segment the checkpoint leaves behind, then
    :meth:`release`.
    """

    def __init__(self, recorded: Path, stream: str) -> None:
        #: ``recorded/<stream>``.
        self.directory = recorded / stream
        self._pending: list[bytes] = []
        self._unsynced = False
        self._moved = False
        #: Kept segments still in the page cache: moved since the last release, and moved
        #: before it (see :meth:`release`).
        self._fresh: list[Path] = []
        self._aged: list[Path] = []

    def _ensure_directory(self) -> None:
        """Create ``recorded/<stream>`` (and ``recorded/``) durably, once."""
        if self.directory.is_dir():
            return
        for path in (self.directory.parent, self.directory):
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                fsync_directory(path.parent)

    def add(self, kind: str, session: str, line: bytes) -> None:
        """One delivered record (read as far as its head)."""
        if kind in STARTS:
            self.add_lines(session, line + b"\n")

    def add_lines(self, session: str, lines: bytes) -> None:
        """Newline-terminated session-starting records of one session."""
        for line in lines.splitlines():
            found = _SEQ.match(line)
            if found is not None:
                self._pending.append(f"{session} {int(found[1])}\n".encode())

    def discard(self) -> None:
        """Forget what was buffered (its delivery failed; it will be read again)."""
        self._pending.clear()

    def write(self) -> None:
        """Append the buffered index entries (not yet fsynced)."""
        if not self._pending:
            return
        self._ensure_directory()
        data = b"".join(self._pending)
        fd = os.open(
            self.directory / INDEX, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self._unsynced = True
        self._pending.clear()

    def sync(self) -> None:
        """fsync the index and the directory the segments moved into."""
        if self._unsynced:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.directory / INDEX, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._unsynced = False
        if self._moved:
            fsync_directory(self.directory)
            self._moved = False

    def keep(self, segment: Path, length: int | None = None) -> None:
        """Move a delivered segment into the recording (cut to ``length`` bytes if given:
        the unwritten rest of a stream's last segment)."""
        self._ensure_directory()
        if length is not None:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(segment, length)
        kept = self.directory / segment.name
        segment.rename(kept)
        self._fresh.append(kept)
        self._moved = True

    def release(self, *, everything: bool = False) -> None:
        """Drop the kept segments from the page cache: they are read again only by a
        replay or a check.  Only those moved before the previous call, by default: a
        segment delivered within the gateway's sync interval may still be dirty or mapped,
        and such pages stay cached.  ``everything`` when the writer is gone."""
        ready = self._aged + self._fresh if everything else self._aged
        self._aged = [] if everything else self._fresh
        self._fresh = []
        for path in ready:
            drop_cached(path)

    def flush(self) -> None:
        self.write()
        self.sync()


def prune(root: Path, max_age_seconds: float, now: float) -> int:
    """Delete the recorded segments last written more than ``max_age_seconds`` before
    ``now``, oldest first in each stream (what is left still verifies: a check starts at
    the first segment left).  A stream with no segment left, none in the spool and an index
    as old goes whole.  Returns the number of segments deleted."""
    removed = 0
    for stream_dir in list_streams(root / RECORDED_DIR):
        for name in segment_names(stream_dir):
            path = stream_dir / name
            try:
                if now - path.stat().st_mtime <= max_age_seconds:
                    break
                path.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if segment_names(stream_dir) or segment_names(root / SPOOL_DIR / stream_dir.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - (stream_dir / INDEX).stat().st_mtime <= max_age_seconds:
                continue
        shutil.rmtree(stream_dir, ignore_errors=True)
    return removed


def find_session(root: Path, session_id: str) -> tuple[str, int] | None:
    """(stream, seq of its first record) of a recorded session, from the indexes."""
    prefix = f"{check_session_id(session_id)} ".encode()
    recorded = root / RECORDED_DIR
    try:
        streams = sorted(os.listdir(recorded))
    except FileNotFoundError:
        return None
    for stream in streams:
        try:
            data = (recorded / stream / INDEX).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
        for line in data.splitlines():
            if line.startswith(prefix):
                with contextlib.suppress(ValueError):
                    return stream, int(line[len(prefix) :])
    return None


def _segments_from(root: Path, stream: str, seq: int) -> Iterator[Path]:
    """The stream's segments, recorded then still spooled, from the one holding ``seq``."""
    paths = stream_segments([root / RECORDED_DIR / stream, root / SPOOL_DIR / stream])
    first = 0
    for i, path in enumerate(paths):
        with contextlib.suppress(ValueError):
            if int(path.name.removesuffix(SEGMENT_SUFFIX)) <= seq:
                first = i
    yield from paths[first:]


def read_session(root: Path, session_id: str) -> list[Record]:
    """A session's records in order, from the audit directory ``root``.

    Raises FileNotFoundError when no recording holds the session.
    """
    return [record for record, _ in session_lines(root, session_id)]


def session_lines(root: Path, session_id: str) -> list[tuple[Record, bytes]]:
    """A session's records in order, each with its line as sealed (``pgwarden replay
    --records``).  Raises FileNotFoundError when no recording holds the session."""
    located = find_session(root, session_id)
    if located is None:
        legacy = root / SESSIONS_DIR / f"{check_session_id(session_id)}.jsonl"
        return _read_jsonl(legacy)  # recordings of earlier versions; raises if absent
    stream, seq = located
    needle = f'"session":"{session_id}"'.encode()
    out: list[tuple[Record, bytes]] = []
    for path in _segments_from(root, stream, seq):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # moved between listing and reading: the other place
            try:
                data = (root / RECORDED_DIR / stream / path.name).read_bytes()
            except FileNotFoundError:
                continue  # removed meanwhile
        limit = data.find(b"\0")
        if limit < 0:
            limit = len(data)
        pos = data.find(needle, 0, limit)
        while pos >= 0:
            start = data.rfind(b"\n", 0, pos) + 1
            stop = data.find(b"\n", pos)
            if stop < 0:
                break  # a record being written
            line = data[start:stop]
            record: Record = json.loads(line)
            if record.get("session") == session_id and int(record.get("seq", 0)) >= seq:
                if record.get("type") in RECORDED:
                    out.append((record, line))
                if record.get("type") in ENDS:
                    return out
            pos = data.find(needle, stop, limit)
    if not out:
        raise FileNotFoundError(session_id)
    return out


def _read_jsonl(path: Path) -> list[tuple[Record, bytes]]:
    seen: set[tuple[str, int]] = set()
    out: list[tuple[Record, bytes]] = []
    with path.open("rb") as handle:
        for raw in handle:
            line = raw.strip()
            if not line:
                continue
            record: Record = json.loads(line)
            key = (str(record.get("stream")), int(record.get("seq", 0)))
            if key not in seen:
                seen.add(key)
                out.append((record, line))
    out.sort(key=lambda pair: (str(pair[0].get("stream")), int(pair[0].get("seq", 0))))
    return out

"""Session recordings: each session's audit records in a file of its own.

The shipper appends a session's ``session``, ``stmt``, ``decision``, ``end`` (with the
result as the client saw it, within the recording caps) and ``session_end`` records to
``<audit.directory>/sessions/<session id>.jsonl`` once the backend has acknowledged them,
and fsyncs before it lets the spool forget them.  The lines are the sealed spool records,
unchanged.  ``pgwarden replay`` reads them back (:func:`read_session`).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Final

from pgwarden.audit import records as kinds
from pgwarden.audit.records import Record

RECORDED: Final = frozenset(
    {kinds.SESSION, kinds.REFUSED, kinds.STMT, kinds.DECISION, kinds.END, kinds.SESSION_END}
)
_SESSION_ID: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")


def session_file(directory: Path, session_id: str) -> Path:
    if not _SESSION_ID.fullmatch(session_id):
        raise ValueError(f"not a session id: {session_id!r}")
    return directory / f"{session_id}.jsonl"


class SessionRecorder:
    """Buffers recorded lines per session; appends them once delivered; fsyncs on demand.

    The shipper calls :meth:`write` after each acknowledged delivery and :meth:`sync` before
    each checkpoint: a recording is on disk before the spool may forget its records.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pending: dict[str, list[bytes]] = defaultdict(list)
        self._unsynced: set[str] = set()

    def add(self, kind: str, session: str, line: bytes) -> None:
        if kind in RECORDED:
            self._pending[session].append(line + b"\n")

    def add_lines(self, session: str, lines: bytes) -> None:
        """Newline-terminated recorded lines of one session (already filtered by kind)."""
        self._pending[session].append(lines)

    def discard(self) -> None:
        """Forget what was buffered (its delivery failed; it will be read again)."""
        self._pending.clear()

    def write(self) -> None:
        """Append everything buffered to the session files (not yet fsynced)."""
        if not self._pending:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        for session, lines in self._pending.items():
            path = session_file(self.directory, session)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(b"".join(lines))
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self._unsynced.add(session)
        self._pending.clear()

    def sync(self) -> None:
        """fsync every session file written since the last sync."""
        for session in self._unsynced:
            try:
                fd = os.open(session_file(self.directory, session), os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._unsynced.clear()

    def flush(self) -> None:
        """Append and fsync everything buffered."""
        self.write()
        self.sync()


def read_session(directory: Path, session_id: str) -> list[Record]:
    """A session's records in order, each once (a retried delivery may repeat lines)."""
    path = session_file(directory, session_id)
    seen: set[tuple[str, int]] = set()
    out: list[Record] = []
    with path.open("rb") as handle:
        for raw in handle:
            raw = raw.strip()
            if not raw:
                continue
            record: Record = json.loads(raw)
            key = (str(record.get("stream")), int(record.get("seq", 0)))
            if key in seen:
                continue
            seen.add(key)
            out.append(record)
    out.sort(key=lambda r: (str(r.get("stream")), int(r.get("seq", 0))))
    return out

"""``pgwarden audit verify``: check the hash chain of a spool or of an exported file.

A path may be an audit directory (its ``recorded/`` and ``spool/`` streams; a stream's
segments in both places are read as one), its ``spool/`` or ``recorded/`` directory, one
stream directory, one segment file, or a file of records written by the ``file`` exporter
(several streams interleaved).  Each stream is checked on its own: consecutive ``seq``
numbers, and each record's hash equal to ``HMAC(key, previous hash || record)``.  The first
broken or missing link of each stream is reported with where it is.  With several keys
(after a key rotation), each stream is checked with the one its first link verifies
with.  A check can start in the middle of a stream (without session recording, the
shipper deletes what the backend acknowledged): it then starts at a ``segment`` record,
whose ``prev`` names the hash before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgwarden.audit import chain
from pgwarden.audit import records as kinds
from pgwarden.audit.spool import (
    RECORDED_DIR,
    SPOOL_DIR,
    list_streams,
    segment_names,
    stream_segments,
)


@dataclass
class Break:
    stream: str
    seq: int | None
    where: str
    reason: str

    def __str__(self) -> str:
        at = f"seq {self.seq}" if self.seq is not None else "a record"
        return f"stream {self.stream}: {at} at {self.where}: {self.reason}"


@dataclass
class StreamResult:
    stream: str
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    anchored: bool = True  # the first record links to the start of the stream
    breaks: list[Break] = field(default_factory=list)


@dataclass
class VerifyReport:
    streams: dict[str, StreamResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(not s.breaks for s in self.streams.values())

    @property
    def records(self) -> int:
        return sum(s.records for s in self.streams.values())

    def first_break(self) -> Break | None:
        for s in self.streams.values():
            if s.breaks:
                return s.breaks[0]
        return None

    def summary(self) -> str:
        lines = []
        for s in self.streams.values():
            span = f"seq {s.first_seq}..{s.last_seq}" if s.records else "empty"
            state = "OK" if not s.breaks else f"BROKEN ({len(s.breaks)} bad link(s))"
            start = "" if s.anchored else " (starts after delivered records)"
            lines.append(f"{s.stream}: {s.records} records, {span}{start}: {state}")
            if s.breaks:
                lines.append(f"  first broken link: {s.breaks[0]}")
        lines.extend(self.notes)
        verdict = "OK" if self.ok else "BROKEN"
        lines.append(f"{verdict}: {self.records} records in {len(self.streams)} stream(s) checked")
        return "\n".join(lines)


class _Checker:
    def __init__(self, keys: Sequence[bytes], report: VerifyReport) -> None:
        self.keys = list(keys)
        self.report = report
        self.heads: dict[str, tuple[int, bytes]] = {}  # stream -> (last seq, last hash)
        #: The key each stream is sealed with: the first that verifies its first link
        #: (after a key rotation, older streams verify with an earlier key).
        self.stream_keys: dict[str, bytes] = {}

    def _key(self, stream: str, prev: bytes, line: bytes) -> bytes:
        key = self.stream_keys.get(stream)
        if key is None:
            key = chain.key_for(self.keys, prev, line) or self.keys[0]
            self.stream_keys[stream] = key
        return key

    def check(self, line: bytes, where: str, stream_hint: str | None = None) -> None:
        try:
            record = json.loads(line)
            stream = str(record["stream"])
            seq = int(record["seq"])
        except (ValueError, KeyError, TypeError):
            name = stream_hint or "?"
            result = self.report.streams.setdefault(name, StreamResult(name))
            result.breaks.append(Break(name, None, where, "not a valid record (bad JSON)"))
            return
        result = self.report.streams.setdefault(stream, StreamResult(stream))
        head = self.heads.get(stream)
        if head is None:
            kind = record.get("type")
            if kind == kinds.OPEN:
                prev = chain.GENESIS
            elif kind == kinds.SEGMENT and isinstance(record.get("prev"), str):
                prev = bytes.fromhex(record["prev"])
                result.anchored = False
            else:
                # The link before the first record cannot be checked: trust its own hash.
                prev = None
                result.anchored = False
            result.first_seq = seq
        else:
            last_seq, prev = head
            if seq != last_seq + 1:
                missing = (
                    f"records {last_seq + 1}..{seq - 1} are missing"
                    if seq > last_seq + 1
                    else f"out of order: seq {seq} after {last_seq}"
                )
                result.breaks.append(Break(stream, seq, where, missing))
        try:
            body, stored = chain.unseal(line)
        except chain.NotSealed as exc:
            result.breaks.append(Break(stream, seq, where, str(exc)))
            stored = prev or chain.GENESIS
        else:
            if prev is not None and (
                chain.chain_hash(self._key(stream, prev, line), prev, body) != stored
            ):
                result.breaks.append(
                    Break(
                        stream,
                        seq,
                        where,
                        "hash mismatch: the record was changed, a record before it was "
                        "removed or changed, or the key is not the one it was sealed with",
                    )
                )
        self.heads[stream] = (seq, stored)
        result.records += 1
        result.last_seq = seq


def _stream_lines(stream_dirs: list[Path]) -> Iterator[tuple[bytes, str]]:
    """The lines of one stream's segments, wherever each is (recorded or spooled)."""
    for path in stream_segments(stream_dirs):
        data = path.read_bytes()
        name = f"{path.parent.name}/{path.name}"
        pos = 0
        line_no = 0
        while pos < len(data) and data[pos] != 0:
            nl = data.find(b"\n", pos)
            line_no += 1
            if nl < 0:
                yield b"", f"{name}:{line_no} (torn: no end of line)"
                break
            yield data[pos:nl], f"{name}:{line_no}"
            pos = nl + 1


def verify_path(path: Path, key: bytes | Sequence[bytes]) -> VerifyReport:
    """Check every record under ``path`` (see the module docstring for what it may be)
    with ``key``, or with whichever of several keys each stream was sealed with."""
    report = VerifyReport()
    checker = _Checker([key] if isinstance(key, bytes) else key, report)
    if path.is_dir():
        places = [p for p in (path / RECORDED_DIR, path / SPOOL_DIR) if p.is_dir()]
        if not places:
            places = [path]
        streams: dict[str, list[Path]] = {}
        for place in places:
            for stream_dir in [place] if segment_names(place) else list_streams(place):
                streams.setdefault(stream_dir.name, []).append(stream_dir)
        for name in sorted(streams):
            for line, where in _stream_lines(streams[name]):
                if not line:
                    report.notes.append(f"note: {where}: the writer stopped mid-record")
                    continue
                checker.check(line, where, name)
        return report
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.rstrip(b"\n")
            if not line or line[0] == 0:
                break
            checker.check(line, f"{path.name}:{number}")
    return report

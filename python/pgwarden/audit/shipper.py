"""The shipper: drains the spool to the backend, deleting only what the backend accepted.

One process per audit directory (an flock on ``shipper.lock``), started and supervised by
``pgwarden serve`` or run alone as ``pgwarden audit ship``.  For each stream, oldest first,
it reads the records after the stream's checkpoint, checks the hash chain, turns them into
spans (a statement's span when its ``end`` arrives, a session's at ``session_end``),
exports the batch synchronously and, only when the exporter reports success, appends the
session recordings, writes the new checkpoint (which carries the records still open) and
deletes the segments behind it.  A failed export changes nothing: the same records are
read again and give the same spans with the same ids.

A stream whose writer died (kill -9, crash: its flock is free) is finished from what it
holds: statements and sessions without an end become "interrupted" spans.  Streams left
by earlier runs are shipped first, which is how a restarted gateway replays its spool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Final

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from orjson import loads  # the shipper parses every record: ~4x faster than json

from pgwarden import _wire
from pgwarden.audit import chain, ids, replay
from pgwarden.audit import records as kinds
from pgwarden.audit.exporters import AuditSink, ShipBatch, build_resource, build_sink
from pgwarden.audit.recording import SessionRecorder
from pgwarden.audit.records import Record, statement_key
from pgwarden.audit.spans import SpanBuilder
from pgwarden.audit.spool import (
    FREE_PREFIX,
    AuditPaths,
    Checkpoint,
    Position,
    StreamReader,
    list_streams,
    segment_names,
    writer_alive,
)
from pgwarden.config import Settings

log = logging.getLogger(__name__)

_LOCK_RETRY_SECONDS: Final = 0.2
#: How often a stream's checkpoint is written (and recordings fsynced, segments freed).
#: Between checkpoints, delivered batches are only in memory: a shipper killed meanwhile
#: delivers them again, with the same span ids.
CHECKPOINT_INTERVAL_SECONDS: Final = 1.0
#: Delivered segments handed back to a live writer for reuse (the rest are deleted).
FREE_SEGMENTS_KEPT: Final = 1
#: The head every record starts with (rust/wire/src/audit_record.rs, RecordBody::begin),
#: and the session member that follows it in session, statement and end records.
_HEAD: Final = re.compile(
    rb'\{"seq":(\d+),"stream":"[^"]*","ts":\d+,"type":"([a-z_]+)"(?:,"session":"([^"]*)")?'
)


class StreamShipper:
    """Ships one stream, batch by batch, from its checkpoint."""

    def __init__(
        self,
        stream_dir: Path,
        *,
        key: bytes,
        builder: SpanBuilder,
        recordings: Path | None,
        recording_logs: bool,
        batch_size: int,
    ) -> None:
        self.dir = stream_dir
        self.key = key
        self.builder = builder
        self.recordings = recordings
        self.recording_logs = recording_logs
        self.batch_size = batch_size
        self.state = Checkpoint.load(stream_dir)
        self.reader = StreamReader(stream_dir, self.state.position)
        self.recorder = SessionRecorder(recordings) if recordings is not None else None
        self.saved = self.state.copy()  # what the checkpoint file says
        self._last_save = time.monotonic()
        self.chain_failures = 0
        self.delivered_spans = 0
        self.spans = True  # build spans (a sink of records needs none)

    # --- one step ---------------------------------------------------------------------

    def step(self, sink: AuditSink) -> str:
        """Deliver the next batch: 'idle', 'delivered', 'failed' or 'finished'."""
        alive = writer_alive(self.dir)
        # Several export requests' worth per step (many more for a sink of records, which
        # costs one write and one fsync per step): fewer system calls when behind.
        lines = self.reader.read(self.batch_size * (8 if self.spans else 128))
        work = self.state.copy()
        batch = ShipBatch()
        recorder = self.recorder
        if recorder is not None:
            recorder.discard()
        bad = self._verify_chain(work, lines)
        if self.spans:
            for index, line in enumerate(lines):
                self._apply(work, index, line, batch, recorder, index not in bad)
        else:
            self._pass_through(work, lines, batch, recorder)
        finishing = work.closed or (not lines and not alive)
        if finishing:
            self._interrupt_all(work, batch, recorder)
        if not lines and not finishing:
            return "idle"
        try:
            delivered = sink.export(batch)
        except Exception:  # an exporter bug or a local I/O error: retried like a refusal
            log.exception("audit export raised; records stay in the spool")
            delivered = False
        if not delivered:
            if recorder is not None:
                recorder.discard()
            self.reader = StreamReader(self.dir, self.state.position)
            return "failed"
        if recorder is not None:
            recorder.write()
        work.position = self.reader.position
        self.state = work
        self.delivered_spans += len(batch.spans)
        if finishing:
            if recorder is not None:
                recorder.sync()
            shutil.rmtree(self.dir, ignore_errors=True)
            return "finished"
        if time.monotonic() - self._last_save >= CHECKPOINT_INTERVAL_SECONDS:
            self.checkpoint()
        return "delivered"

    def checkpoint(self) -> None:
        """Make what was delivered permanent: recordings fsynced, checkpoint written, the
        segments behind it removed."""
        self._last_save = time.monotonic()
        if self.state.position == self.saved.position and self.state.seq == self.saved.seq:
            return
        if self.recorder is not None:
            self.recorder.sync()
        self.state.save(self.dir)
        self.saved = self.state.copy()
        self._delete_behind(self.state.position)

    def _delete_behind(self, position: Position | None) -> None:
        """Remove the segments before ``position``; a live writer gets a couple back to
        reuse (``.free-*``: refilling a mapped file costs less than a new one)."""
        if position is None:
            return
        alive = writer_alive(self.dir)
        free = sum(1 for name in os.listdir(self.dir) if name.startswith(FREE_PREFIX))
        for name in segment_names(self.dir):
            if name >= position.segment:
                break
            with contextlib.suppress(FileNotFoundError):
                if alive and free < FREE_SEGMENTS_KEPT:
                    (self.dir / name).rename(self.dir / f"{FREE_PREFIX}{name}")
                    free += 1
                else:
                    (self.dir / name).unlink()

    # --- records -> spans -------------------------------------------------------------

    def _where(self, index: int) -> str:
        segment, offset = self.reader.locate(index)
        return f"{segment} byte {offset}"

    def _verify_chain(self, work: Checkpoint, lines: list[bytes]) -> set[int]:
        """Check the batch against the hash chain (in Rust); the indices that fail."""
        if not lines:
            return set()
        prev = bytes.fromhex(work.prev_hash)
        if work.seq == 0:
            # No checkpoint yet: the stream's first record names the hash before it.
            with contextlib.suppress(ValueError, TypeError):
                prev = bytes.fromhex(str(json.loads(lines[0]).get("prev", "00" * 32)))
        last, bad = _wire.verify_chain(self.key, prev, lines)
        work.prev_hash = last.hex()
        for index in bad:
            self.chain_failures += 1
            log.error(
                "audit stream %s: the record at %s does not match the hash chain",
                self.dir.name,
                self._where(index),
            )
        return set(bad)

    def _pass_through(
        self,
        work: Checkpoint,
        lines: list[bytes],
        batch: ShipBatch,
        recorder: SessionRecorder | None,
    ) -> None:
        """A sink of records needs no spans: the lines go as they are, read only as far as
        their head (seq, type, session; the layout the Rust writer guarantees)."""
        batch.lines.extend(lines)
        match = _HEAD.match
        for line in lines:
            head = match(line)
            if head is None:
                self.chain_failures += 1
                log.error("audit stream %s: unreadable record head", self.dir.name)
                continue
            seq = int(head[1])
            if work.seq and seq != work.seq + 1:
                log.error(
                    "audit stream %s: records %d..%d are missing",
                    self.dir.name,
                    work.seq + 1,
                    seq - 1,
                )
            work.seq = seq
            kind = head[2].decode()
            if kind == kinds.CLOSE:
                work.closed = True
            elif recorder is not None and head[3] is not None:
                recorder.add(kind, head[3].decode(), line)

    def _apply(
        self,
        work: Checkpoint,
        index: int,
        line: bytes,
        batch: ShipBatch,
        recorder: SessionRecorder | None,
        verified: bool,
    ) -> None:
        batch.lines.append(line)
        try:
            record: Record = loads(line)
        except ValueError:
            self.chain_failures += 1
            log.error("audit stream %s: unreadable record at %s", self.dir.name, self._where(index))
            return
        seq = int(record.get("seq", 0))
        if work.seq and seq != work.seq + 1:
            verified = False
            log.error(
                "audit stream %s: records %d..%d are missing", self.dir.name, work.seq + 1, seq - 1
            )
        work.seq = seq
        if not verified:
            record["_unverified"] = True
        kind = record.get("type")
        work.last_ts = max(work.last_ts, int(record.get("ts", 0)))
        session = str(record.get("session", ""))
        if recorder is not None and session:
            recorder.add(str(kind), session, line)
        if kind == kinds.STMT:
            work.open_statements[statement_key(session, int(record["n"]))] = record
        elif kind == kinds.END:
            key = statement_key(session, int(record["n"]))
            stmt = work.open_statements.pop(key, None)
            if stmt is None:  # its stmt record was lost: keep what the end says
                stmt = {
                    "session": session,
                    "n": record["n"],
                    "ts": record["ts"],
                    "_unverified": True,
                }
            if self.spans:
                batch.spans.append(
                    self.builder.statement(
                        work.open_sessions.get(session),
                        stmt,
                        record,
                        verified=verified and not stmt.get("_unverified"),
                    )
                )
            if self.recording_logs and record.get("result") is not None:
                batch.logs.append(self._result_log(stmt, record))
        elif kind == kinds.DECISION:
            key = statement_key(session, int(record["n"]))
            if key in work.open_statements:
                merged = dict(work.open_statements[key])
                for field in ("decision", "rule", "policy_version", "masked_columns"):
                    if field in record:
                        merged[field] = record[field]
                work.open_statements[key] = merged
        elif kind == kinds.SESSION:
            work.open_sessions[session] = record
        elif kind == kinds.SESSION_END:
            prefix = session + "/"
            for key in [k for k in work.open_statements if k.startswith(prefix)]:
                stmt = work.open_statements.pop(key)
                if not self.spans:
                    continue
                batch.spans.append(
                    self.builder.statement(
                        work.open_sessions.get(session),
                        stmt,
                        None,
                        verified=not stmt.get("_unverified"),
                        interrupted_at_us=int(record["ts"]),
                    )
                )
            opened = work.open_sessions.pop(session, None)
            if opened is not None and self.spans:
                batch.spans.append(
                    self.builder.session(
                        opened,
                        record,
                        verified=verified and not opened.get("_unverified"),
                    )
                )
        elif kind == kinds.REFUSED:
            if self.spans:
                batch.spans.append(self.builder.refused(record, verified=verified))
        elif kind == kinds.OPEN:
            work.stream_info = {
                k: v for k, v in record.items() if k not in ("prev", "hash", "type")
            }
        elif kind == kinds.CLOSE:
            work.closed = True

    def _interrupt_all(
        self, work: Checkpoint, batch: ShipBatch, recorder: SessionRecorder | None
    ) -> None:
        """The stream is over: whatever is still open ends now, as interrupted."""
        at = work.last_ts
        if not self.spans:
            work.open_statements.clear()
            work.open_sessions.clear()
            return
        for stmt in work.open_statements.values():
            session = work.open_sessions.get(str(stmt.get("session")))
            batch.spans.append(
                self.builder.statement(
                    session, stmt, None, verified=not stmt.get("_unverified"), interrupted_at_us=at
                )
            )
        for session in work.open_sessions.values():
            batch.spans.append(
                self.builder.session(
                    session, None, verified=not session.get("_unverified"), interrupted_at_us=at
                )
            )
        work.open_statements.clear()
        work.open_sessions.clear()

    def _result_log(self, stmt: Record, end: Record) -> ReadableLogRecord:
        session = str(stmt["session"])
        n = int(stmt["n"])
        body = "\n".join(replay._statement(stmt, end, None))
        span = NonRecordingSpan(
            SpanContext(
                ids.trace_id(session),
                ids.statement_span_id(session, n),
                is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )
        )
        record = LogRecord(
            timestamp=int(end["ts"]) * 1000,
            observed_timestamp=time.time_ns(),
            context=set_span_in_context(span),
            severity_text="INFO",
            severity_number=SeverityNumber.INFO,
            body=body,
            attributes={
                "pgwarden.session.id": session,
                "pgwarden.statement.number": n,
                "pgwarden.spool.seq": int(end.get("seq", 0)),
                "db.system.name": "postgresql",
            },
            event_name="pgwarden.statement.result",
        )
        return ReadableLogRecord(record, self.builder.resource, self.builder.scope)


class Shipper:
    """Ships every stream of an audit directory until stopped."""

    def __init__(self, settings: Settings, sink: AuditSink | None = None) -> None:
        audit = settings.audit
        if audit.directory is None:
            raise ValueError("audit.directory is not set: there is no spool to ship")
        self.settings = settings
        self.paths = AuditPaths(audit.directory)
        self.key = chain.load_or_create_key(audit.chain_key_bytes(), audit.directory)
        self.sink = sink if sink is not None else build_sink(audit)
        self.builder = SpanBuilder(build_resource(audit, settings.listen_port), audit.query_text)
        self.streams: dict[str, StreamShipper] = {}
        self._backoff = 0.0
        self.exports_failed = 0

    def _stream(self, stream_dir: Path) -> StreamShipper:
        shipper = self.streams.get(stream_dir.name)
        if shipper is None:
            audit = self.settings.audit
            shipper = StreamShipper(
                stream_dir,
                key=self.key,
                builder=self.builder,
                recordings=self.paths.sessions if audit.recording else None,
                recording_logs=audit.recording_logs,
                batch_size=audit.batch_size,
            )
            shipper.spans = getattr(self.sink, "needs_spans", True)
            self.streams[stream_dir.name] = shipper
        return shipper

    def ship_once(self) -> tuple[bool, bool]:
        """One pass over every stream: (anything delivered, any export failed)."""
        progressed = failed = False
        live = set()
        for stream_dir in list_streams(self.paths.spool):
            live.add(stream_dir.name)
            shipper = self._stream(stream_dir)
            while True:
                outcome = shipper.step(self.sink)
                if outcome == "failed":
                    failed = True
                    break
                if outcome == "idle":
                    break
                progressed = True
                if outcome == "finished":
                    self.streams.pop(stream_dir.name, None)
                    log.info("audit stream %s shipped and removed", stream_dir.name)
                    break
            if failed:
                break
        for name in list(self.streams):
            if name not in live:
                self.streams.pop(name, None)
        return progressed, failed

    def run(self, stop: threading.Event, *, until_empty: bool = False) -> int:
        """Ship until ``stop`` is set (or, with ``until_empty``, until nothing is left)."""
        audit = self.settings.audit
        self.paths.spool.mkdir(parents=True, exist_ok=True)
        lock_fd = self._lock(stop)
        if lock_fd is None:
            return 0
        try:
            log.info("audit shipper: shipping %s (%s)", self.paths.spool, audit.exporter)
            try:
                return self._loop(stop, until_empty)
            finally:
                for shipper in self.streams.values():
                    if shipper.dir.exists():
                        shipper.checkpoint()
        finally:
            self.sink.shutdown()
            os.close(lock_fd)

    def _loop(self, stop: threading.Event, until_empty: bool) -> int:
        audit = self.settings.audit
        while not stop.is_set():
            progressed, failed = self.ship_once()
            if failed:
                self.exports_failed += 1
                self._backoff = min(audit.retry_max_seconds, max(0.5, self._backoff * 2))
                log.warning(
                    "audit export failed; records stay in the spool, retry in %.1f s",
                    self._backoff,
                )
                if until_empty and self.exports_failed >= 3:
                    return 1
                stop.wait(self._backoff)
                continue
            self._backoff = 0.0
            if not progressed:
                for shipper in self.streams.values():
                    shipper.checkpoint()  # idle: make everything delivered permanent
                if until_empty and not self._anything_left():
                    return 0
                stop.wait(audit.poll_interval_ms / 1000)
        return 0

    def _anything_left(self) -> bool:
        """Open sessions or statements, or a stream not seen yet (after an idle pass)."""
        return any(
            s.state.open_statements or s.state.open_sessions for s in self.streams.values()
        ) or any(p.name not in self.streams for p in list_streams(self.paths.spool))

    def _lock(self, stop: threading.Event) -> int | None:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.paths.shipper_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        waited = False
        while not stop.is_set():
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not waited:
                    log.info(
                        "audit shipper: another shipper holds %s; waiting", self.paths.shipper_lock
                    )
                    waited = True
                stop.wait(_LOCK_RETRY_SECONDS)
        os.close(fd)
        return None

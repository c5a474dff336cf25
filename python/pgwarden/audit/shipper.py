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
import shutil
import threading
import time
from pathlib import Path
from typing import Final

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from pgwarden.audit import chain, ids, replay
from pgwarden.audit import records as kinds
from pgwarden.audit.exporters import AuditSink, ShipBatch, build_resource, build_sink
from pgwarden.audit.recording import SessionRecorder
from pgwarden.audit.records import Record, statement_key
from pgwarden.audit.spans import SpanBuilder
from pgwarden.audit.spool import (
    AuditPaths,
    Checkpoint,
    Position,
    SpoolLine,
    StreamReader,
    list_streams,
    segment_names,
    writer_alive,
)
from pgwarden.config import Settings

log = logging.getLogger(__name__)

_LOCK_RETRY_SECONDS: Final = 0.2


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
        self.chain_failures = 0
        self.delivered_spans = 0

    # --- one step ---------------------------------------------------------------------

    def step(self, sink: AuditSink) -> str:
        """Deliver the next batch: 'idle', 'delivered', 'failed' or 'finished'."""
        alive = writer_alive(self.dir)
        lines = self.reader.read(self.batch_size * 2)
        work = self.state.copy()
        batch = ShipBatch()
        recorder = SessionRecorder(self.recordings) if self.recordings is not None else None
        for spool_line in lines:
            self._apply(work, spool_line, batch, recorder)
        finishing = work.closed or (not lines and not alive)
        if finishing:
            self._interrupt_all(work, batch, recorder)
        if not lines and not finishing:
            return "idle"
        if not sink.export(batch):
            self.reader = StreamReader(self.dir, self.state.position)
            return "failed"
        if recorder is not None:
            recorder.flush()
        work.position = self.reader.position
        if finishing:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.state = work
            self.delivered_spans += len(batch.spans)
            return "finished"
        work.save(self.dir)
        self.state = work
        self.delivered_spans += len(batch.spans)
        self._delete_behind(work.position)
        return "delivered"

    def _delete_behind(self, position: Position | None) -> None:
        if position is None:
            return
        for name in segment_names(self.dir):
            if name >= position.segment:
                break
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()

    # --- records -> spans -------------------------------------------------------------

    def _verify(self, work: Checkpoint, spool_line: SpoolLine, record: Record) -> bool:
        prev = bytes.fromhex(work.prev_hash)
        if record.get("type") in (kinds.SEGMENT, kinds.OPEN) and work.seq == 0:
            prev = bytes.fromhex(str(record.get("prev", "00" * 32)))
        try:
            ok, stored = chain.check(self.key, prev, spool_line.line)
        except chain.NotSealed:
            ok, stored = False, prev
        seq = int(record.get("seq", 0))
        if work.seq and seq != work.seq + 1:
            ok = False
            log.error(
                "audit stream %s: records %d..%d are missing",
                self.dir.name,
                work.seq + 1,
                seq - 1,
            )
        if not ok:
            self.chain_failures += 1
            log.error(
                "audit stream %s: record seq %d (%s at byte %d) does not match the hash chain",
                self.dir.name,
                seq,
                spool_line.segment,
                spool_line.offset,
            )
        work.prev_hash = stored.hex()
        work.seq = seq
        return ok

    def _apply(
        self,
        work: Checkpoint,
        spool_line: SpoolLine,
        batch: ShipBatch,
        recorder: SessionRecorder | None,
    ) -> None:
        batch.lines.append(spool_line.line)
        try:
            record: Record = json.loads(spool_line.line)
        except ValueError:
            self.chain_failures += 1
            log.error("audit stream %s: unreadable record at byte %d", self.dir.name, 0)
            return
        verified = self._verify(work, spool_line, record)
        if not verified:
            record["_unverified"] = True
        kind = record.get("type")
        work.last_ts = max(work.last_ts, int(record.get("ts", 0)))
        session = str(record.get("session", ""))
        if recorder is not None and session:
            recorder.add(str(kind), session, spool_line.line)
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
            span = self.builder.statement(
                work.open_sessions.get(session),
                stmt,
                record,
                verified=verified and not stmt.get("_unverified"),
            )
            batch.spans.append(span)
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
            if opened is not None:
                batch.spans.append(
                    self.builder.session(
                        opened,
                        record,
                        verified=verified and not opened.get("_unverified"),
                    )
                )
        elif kind == kinds.REFUSED:
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
                    if until_empty and not self._anything_left():
                        return 0
                    stop.wait(audit.poll_interval_ms / 1000)
            return 0
        finally:
            self.sink.shutdown()
            os.close(lock_fd)

    def _anything_left(self) -> bool:
        return any(
            s.state.open_statements or s.state.open_sessions or writer_alive(s.dir)
            for s in self.streams.values()
        ) or any(
            name not in self.streams for name in (p.name for p in list_streams(self.paths.spool))
        )

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

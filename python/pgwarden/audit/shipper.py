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
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from opentelemetry.sdk.resources import Resource

from pgwarden import _wire
from pgwarden.audit import chain
from pgwarden.audit import records as kinds
from pgwarden.audit.exporters import (
    SPANS,
    AuditSink,
    Rejection,
    ShipBatch,
    build_resource,
    build_sink,
)
from pgwarden.audit.recording import SessionRecorder, prune
from pgwarden.audit.spans import QueryTextMode, new_assembler
from pgwarden.audit.spool import (
    CHECKPOINT_INTERVAL_SECONDS,
    FREE_PREFIX,
    REJECTED_LOGS_SUFFIX,
    REJECTED_TRACES_SUFFIX,
    AuditPaths,
    Checkpoint,
    Lines,
    Position,
    StreamReader,
    fsync_directory,
    list_streams,
    segment_names,
    write_durably,
    writer_alive,
)
from pgwarden.config import Settings

log = logging.getLogger(__name__)

_LOCK_RETRY_SECONDS: Final = 0.2
#: Bytes of records read per step: about eight export requests' worth (a statement's two
#: records take some 700 bytes), at most 4 MiB: fewer system calls when behind, and not
#: too much to send again when a request of the step fails.  A sink of records takes far
#: more per step (it costs one write and one fsync per step).
STEP_RECORD_BYTES_PER_SPAN: Final = 700
STEP_BYTES_SPANS: Final = 4 << 20
STEP_BYTES_RECORDS: Final = 64 << 20
#: The longest the shipper lets records gather while statements keep coming (it waits
#: until about one request's worth is there, at least a poll interval).
GATHER_MAX_SECONDS: Final = 1.0
#: Idle passes in a row (a second of them at the default poll interval) after which the
#: shipper polls less often: the wait doubles per idle pass, up to GATHER_MAX_SECONDS.
IDLE_PASSES_BEFORE_BACKOFF: Final = 10
#: Delivered segments handed back to a live writer for reuse (the rest are deleted).
FREE_SEGMENTS_KEPT: Final = 1
#: How often the recordings are swept for segments past audit.recording_retention_hours.
RETENTION_SWEEP_SECONDS: Final = 3600.0
#: The head every record starts with (rust/wire/src/audit_record.rs, RecordBody::begin),
#: and the session member that follows it in session, statement and end records.
_HEAD: Final = re.compile(
    rb'\{"seq":(\d+),"stream":"[^"]*","ts":\d+,"type":"([a-z_]+)"(?:,"session":"([^"]*)")?'
)


class StreamShipper:
    """Ships one stream, batch by batch, from its checkpoint.

    With a sink of spans, each batch is one call into the Rust assembler (chain check,
    spans, OTLP encoding); with a sink of records, the lines go as they are.
    """

    def __init__(
        self,
        stream_dir: Path,
        *,
        keys: Sequence[bytes],
        resource: Resource,
        query_text: QueryTextMode,
        query_text_max_bytes: int,
        spans: bool,
        recordings: Path | None,
        recording_logs: bool,
        batch_size: int,
        request_bytes: int,
        rejected: Path,
    ) -> None:
        self.dir = stream_dir
        #: Where requests the backend partly refused are kept.
        self.rejected_dir = rejected
        self.recordings = recordings
        self.recording_logs = recording_logs
        self.batch_size = batch_size
        self.spans = spans
        self.state = Checkpoint.load(stream_dir)
        self.reader = StreamReader(stream_dir, self.state.position)
        #: The key this stream was sealed with: the current one, or after a key rotation
        #: the earlier key its first unread record verifies with.
        self.key = self._stream_key(keys)
        self.recorder = (
            SessionRecorder(recordings, stream_dir.name) if recordings is not None else None
        )
        self.assembler = (
            new_assembler(
                key=self.key,
                resource=resource,
                query_text=query_text,
                request_spans=batch_size,
                request_bytes=request_bytes,
                query_text_max_bytes=query_text_max_bytes,
                recording=recordings is not None,
                result_logs=recording_logs,
                state=self.state.state_json(),
            )
            if spans
            else None
        )
        self.saved = self.state.copy()  # what the checkpoint file says
        self._last_save = time.monotonic()
        self.chain_failures = 0
        self.delivered_spans = 0
        #: The last read was a full batch: more is waiting.
        self.behind = False

    def _stream_key(self, keys: Sequence[bytes]) -> bytes:
        if len(keys) == 1:
            return keys[0]
        first = StreamReader(self.dir, self.state.position).read(1)
        if not first:
            return keys[0]
        prev = bytes.fromhex(self.state.prev_hash)
        if self.state.seq == 0:
            with contextlib.suppress(ValueError, TypeError):
                prev = bytes.fromhex(str(json.loads(first[0]).get("prev", "00" * 32)))
        key = chain.key_for(keys, prev, first[0])
        if key is None:
            return keys[0]  # reported as a broken chain when the records are read
        if key != keys[0]:
            log.info("audit stream %s: sealed with an earlier chain key", self.dir.name)
        return key

    # --- one step ---------------------------------------------------------------------

    def step(self, sink: AuditSink) -> str:
        """Deliver the next batch: 'idle', 'delivered', 'failed' or 'finished'."""
        alive = writer_alive(self.dir)
        max_bytes = (
            min(STEP_BYTES_SPANS, 8 * self.batch_size * STEP_RECORD_BYTES_PER_SPAN)
            if self.spans
            else STEP_BYTES_RECORDS
        )
        lines = self.reader.read(max_bytes)
        self.behind = lines.size >= max_bytes
        recorder = self.recorder
        if recorder is not None:
            recorder.discard()
        batch = ShipBatch(lines=lines)
        if self.assembler is not None:
            work = self.state
            finishing = self._assemble(self.assembler, lines, alive, batch)
        else:
            work = self.state.copy()
            bad = self._verify_chain(work, lines)
            for index in bad:
                log.error(
                    "audit stream %s: the record at %s does not match the hash chain",
                    self.dir.name,
                    self._where(index),
                )
            self._pass_through(work, lines, recorder)
            finishing = work.closed or (not lines and not alive)
            if finishing:
                work.open_statements.clear()
                work.open_sessions.clear()
        if not lines and not finishing:
            if self.assembler is not None:
                self.assembler.rollback()
            return "idle"
        try:
            delivered = sink.export(batch)
        except Exception:  # an exporter bug or a local I/O error: retried like a refusal
            log.exception("audit export raised; records stay in the spool")
            delivered = False
        if not delivered:
            if recorder is not None:
                recorder.discard()
            if self.assembler is not None:
                self.assembler.rollback()
            self.reader = StreamReader(self.dir, self.state.position)
            return "failed"
        if self.assembler is not None:
            self.assembler.commit()
            work = Checkpoint.from_state(self.assembler.state())
        for number, rejection in enumerate(batch.rejections):
            self._report(rejection, work.seq, number)
        if recorder is not None:
            recorder.write()
        work.position = self.reader.position
        self.state = work
        self.delivered_spans += batch.span_count
        if finishing:
            if recorder is not None:
                self._keep_all(recorder)
                recorder.sync()
                recorder.release(everything=True)
            shutil.rmtree(self.dir, ignore_errors=True)
            return "finished"
        if time.monotonic() - self._last_save >= CHECKPOINT_INTERVAL_SECONDS:
            self.checkpoint()
        return "delivered"

    def _report(self, rejection: Rejection, seq: int, number: int) -> None:
        """An OTLP partial success: the backend accepted the request but refused some of
        what it carried.  The protocol forbids sending it again, so it is not lost
        silently: logged, and the request kept as it was sent (protobuf, ready to be
        posted again to a backend that takes it)."""
        if not rejection.rejected:
            log.warning(
                "audit stream %s: the backend accepted %s with a warning: %s",
                self.dir.name,
                rejection.signal,
                rejection.message or "(no message)",
            )
            return
        suffix = REJECTED_TRACES_SUFFIX if rejection.signal == SPANS else REJECTED_LOGS_SUFFIX
        path = self.rejected_dir / f"{self.dir.name}-seq{seq}-{number}{suffix}"
        try:
            sent = rejection.sent
        except Exception:  # a request the backend could read, so this should not happen
            sent = -1
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            write_durably(path, rejection.request)
            fsync_directory(self.rejected_dir)
            kept = f"the request is kept in {path}"
        except OSError as exc:
            kept = f"the request could not be kept ({exc})"
        log.error(
            "audit stream %s: the backend accepted a request of %s %s but refused %d of them "
            "(OTLP partial success; records up to seq %d): %s. The protocol forbids sending "
            "them again; %s",
            self.dir.name,
            sent if sent >= 0 else "?",
            rejection.signal,
            rejection.rejected,
            seq,
            rejection.message or "(no message)",
            kept,
        )

    def _assemble(
        self, assembler: _wire.SpanAssembler, lines: Lines, alive: bool, batch: ShipBatch
    ) -> bool:
        """Records to OTLP requests (Rust); returns whether the stream is finishing."""
        requests, count, recorded, log_requests, problems, failures, finishing = assembler.process(
            lines.chunks, alive
        )
        self.chain_failures += failures
        for index, problem in problems:
            where = self._where(index) if index is not None else "?"
            log.error("audit stream %s: %s (at %s)", self.dir.name, problem, where)
        batch.requests = requests
        batch.span_count = count
        if self.recorder is not None:
            for session, data in recorded:
                self.recorder.add_lines(session, data)
        batch.log_requests = log_requests
        return finishing

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
        if self.recorder is not None:
            self.recorder.sync()  # the moves
            self.recorder.release()

    def _keep_all(self, recorder: SessionRecorder) -> None:
        """A finished stream: every segment into the recording, the last one cut where its
        records end (or dropped, when it has none)."""
        position = self.reader.position
        for name in segment_names(self.dir):
            length = position.offset if position and name == position.segment else None
            with contextlib.suppress(FileNotFoundError):
                if length == 0:
                    (self.dir / name).unlink()
                else:
                    recorder.keep(self.dir / name, length)

    def _delete_behind(self, position: Position | None) -> None:
        """Move the segments before ``position`` into the recording, or without one remove
        them; a live writer gets a couple back to reuse (``.free-*``: refilling a mapped
        file costs less than a new one)."""
        if position is None:
            return
        alive = writer_alive(self.dir)
        free = sum(1 for name in os.listdir(self.dir) if name.startswith(FREE_PREFIX))
        for name in segment_names(self.dir):
            if name >= position.segment:
                break
            with contextlib.suppress(FileNotFoundError):
                if self.recorder is not None:
                    self.recorder.keep(self.dir / name)
                elif alive and free < FREE_SEGMENTS_KEPT:
                    (self.dir / name).rename(self.dir / f"{FREE_PREFIX}{name}")
                    free += 1
                else:
                    (self.dir / name).unlink()

    # --- records ----------------------------------------------------------------------

    def _where(self, index: int) -> str:
        segment, offset = self.reader.locate(index)
        return f"{segment} byte {offset}"

    def _verify_chain(self, work: Checkpoint, lines: Lines) -> set[int]:
        """Check the batch against the hash chain (in Rust); the indices that fail."""
        if not lines:
            return set()
        prev = bytes.fromhex(work.prev_hash)
        if work.seq == 0:
            # No checkpoint yet: the stream's first record names the hash before it.
            with contextlib.suppress(ValueError, TypeError):
                prev = bytes.fromhex(str(json.loads(lines[0]).get("prev", "00" * 32)))
        last, bad = _wire.verify_chain(self.key, prev, lines.lines())
        work.prev_hash = last.hex()
        self.chain_failures += len(bad)
        return set(bad)

    def _pass_through(
        self, work: Checkpoint, lines: Lines, recorder: SessionRecorder | None
    ) -> None:
        """A sink of records needs no spans: the lines go as they are, read only as far as
        their head (seq, type, session; the layout the Rust writer guarantees)."""
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


class Shipper:
    """Ships every stream of an audit directory until stopped."""

    def __init__(self, settings: Settings, sink: AuditSink | None = None) -> None:
        audit = settings.audit
        if audit.directory is None:
            raise ValueError("audit.directory is not set: there is no spool to ship")
        self.settings = settings
        self.paths = AuditPaths(audit.directory)
        self.key = chain.load_or_create_key(audit.chain_key_bytes(), audit.directory)
        self.keys = [self.key, *audit.previous_chain_keys()]
        self.sink = sink if sink is not None else build_sink(audit)
        self.resource = build_resource(audit, settings.listen_port)
        self.streams: dict[str, StreamShipper] = {}
        self._backoff = 0.0
        self._idle_passes = 0
        self.exports_failed = 0
        #: Spans delivered since start, every stream.
        self.delivered_spans = 0

    def _stream(self, stream_dir: Path) -> StreamShipper:
        shipper = self.streams.get(stream_dir.name)
        if shipper is None:
            audit = self.settings.audit
            shipper = StreamShipper(
                stream_dir,
                keys=self.keys,
                resource=self.resource,
                query_text=audit.query_text,
                query_text_max_bytes=audit.query_text_max_bytes,
                spans=getattr(self.sink, "needs_spans", True),
                recordings=self.paths.recorded if audit.recording else None,
                recording_logs=audit.recording_logs,
                batch_size=audit.batch_size,
                request_bytes=audit.max_request_bytes,
                rejected=self.paths.rejected,
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
            spans_before = shipper.delivered_spans
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
                if not shipper.behind:
                    break  # caught up with this stream: what comes next waits for a poll
            self.delivered_spans += shipper.delivered_spans - spans_before
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
                    if shipper.recorder is not None:
                        shipper.recorder.release(everything=True)
        finally:
            self.sink.shutdown()
            os.close(lock_fd)

    def sweep_recordings(self) -> int:
        """Delete the recorded segments past ``audit.recording_retention_hours`` (none
        when it is 0); the number deleted."""
        hours = self.settings.audit.recording_retention_hours
        if hours <= 0:
            return 0
        removed = prune(self.paths.root, hours * 3600, time.time())
        if removed:
            log.info("audit recordings: deleted %d segment(s) older than %g h", removed, hours)
        return removed

    def _loop(self, stop: threading.Event, until_empty: bool) -> int:
        audit = self.settings.audit
        previous_pass = time.monotonic()
        next_sweep = previous_pass
        while not stop.is_set():
            started = time.monotonic()
            if started >= next_sweep:
                next_sweep = started + RETENTION_SWEEP_SECONDS
                try:
                    self.sweep_recordings()
                except OSError:
                    log.exception("audit recordings: the retention sweep failed")
            spans_before = self.delivered_spans
            progressed, failed = self.ship_once()
            gathered = (self.delivered_spans - spans_before, started - previous_pass)
            previous_pass = started
            self._idle_passes = 0 if (progressed or failed) else self._idle_passes + 1
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
            if progressed and not any(s.behind for s in self.streams.values()):
                # Caught up: let records gather, so that a busy gateway is shipped in
                # batches rather than a few records per read.
                stop.wait(self.gather_seconds(*gathered))
            elif not progressed:
                for shipper in self.streams.values():
                    shipper.checkpoint()  # idle: make everything delivered permanent
                if until_empty and not self._anything_left():
                    return 0
                stop.wait(self.idle_seconds(self._idle_passes))
        return 0

    def idle_seconds(self, idle_passes: int) -> float:
        """How long to wait after ``idle_passes`` passes in a row found nothing: a poll
        interval, then, after :data:`IDLE_PASSES_BEFORE_BACKOFF`, twice as long per idle
        pass, at most :data:`GATHER_MAX_SECONDS` (never less than the poll interval).  An
        idle shipper then costs about a tenth of the CPU of one polling every 100 ms, and
        the first statement after a quiet spell is shipped within a second, as a busy
        stream's are."""
        poll = self.settings.audit.poll_interval_ms / 1000
        doublings = min(idle_passes - IDLE_PASSES_BEFORE_BACKOFF, 16)
        if doublings <= 0:
            return poll
        return max(poll, min(poll * (1 << doublings), GATHER_MAX_SECONDS))

    def gather_seconds(self, spans: int, seconds: float) -> float:
        """How long to let records gather after a pass that caught up, having delivered
        ``spans`` written over ``seconds``: a poll interval; while statements keep coming
        (a pass of at least an eighth of a request), until about one full request is
        there, at most :data:`GATHER_MAX_SECONDS`.  Each pass costs some milliseconds of
        its own (the reads, an HTTP request, the checkpoint): at 5,000 statements a
        second, passes every poll interval took about a third of the shipper's CPU."""
        audit = self.settings.audit
        poll = audit.poll_interval_ms / 1000
        if spans < audit.batch_size / 8 or seconds <= 0:
            return poll
        until_full = audit.batch_size / (spans / seconds)
        return max(poll, min(until_full, GATHER_MAX_SECONDS))

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

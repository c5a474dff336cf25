"""The JSON-lines statement log: records from ``SessionCodec.take_records()`` appended to a sink.

Sessions call :meth:`StatementLog.append` (an in-memory append, no I/O) when a ReadyForQuery
passes and when they end; :meth:`StatementLog.run` writes the accumulated bytes every
``flush_interval`` seconds in a worker thread, so a slow disk never stalls the event loop, and
once more on shutdown.  :meth:`StatementLog.request_reopen` (on SIGHUP, after logrotate renamed
the file) switches to a freshly opened file at a record boundary.  This is an operator's log,
not the durable audit spool.
"""

from __future__ import annotations

import logging
import os
import sys

import anyio
import anyio.abc
import anyio.to_thread

log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = 0.2
# Past this, appends flush early instead of waiting for the timer.
_EARLY_FLUSH_BYTES = 1024 * 1024


class StatementLog:
    """Batched writer of statement records to a file path, or stdout for ``-``."""

    def __init__(self, target: str, *, flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        self.target = target
        self._flush_interval = flush_interval
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._fd: int | None = None
        # Records appended before a reopen request: they belong in the file open until then.
        self._before_reopen: list[bytes] = []
        self._reopen_requested = False
        self._wakeup = anyio.Event()
        self.records_written = 0

    def append(self, records: bytes) -> None:
        """Queue JSON lines (already newline-terminated) for the next flush."""
        if not records:
            return
        self._pending.append(records)
        self._pending_bytes += len(records)
        if self._pending_bytes >= _EARLY_FLUSH_BYTES:
            self._wakeup.set()

    def request_reopen(self) -> bool:
        """Reopen the file by its name at the next flush; False for stdout (nothing to reopen).

        Everything appended so far still goes to the file open now, everything appended
        later to the new one: the switch falls between two records, none is lost or split.
        The writes themselves stay in :meth:`run`'s task, so they never race the switch.
        """
        if self.target == "-":
            return False
        self._before_reopen.extend(self._pending)
        self._pending, self._pending_bytes = [], 0
        self._reopen_requested = True
        self._wakeup.set()
        return True

    def _open(self) -> int:
        if self.target == "-":
            return sys.stdout.fileno()
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _write(self, chunks: list[bytes]) -> None:
        # One write() per batch on an O_APPEND descriptor: batches from several worker
        # processes sharing the file never interleave inside a line.
        if self._fd is None:
            self._fd = self._open()
        view = memoryview(b"".join(chunks))
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    async def flush(self) -> None:
        """Write everything appended so far (switching files first if a reopen is due)."""
        if self._reopen_requested:
            await self._reopen()
        if not self._pending:
            return
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        await self._write_batch(chunks)

    async def _write_batch(self, chunks: list[bytes]) -> None:
        try:
            await anyio.to_thread.run_sync(self._write, chunks)
        except OSError as exc:
            log.error("statement log %s: write failed: %s", self.target, exc)

    async def _reopen(self) -> None:
        before, self._before_reopen = self._before_reopen, []
        self._reopen_requested = False
        if before:
            await self._write_batch(before)
        try:
            new_fd = await anyio.to_thread.run_sync(self._open)
        except OSError as exc:
            # Losing records would be worse than writing them to the renamed file.
            log.error(
                "statement log %s: cannot reopen (%s); still writing to the file open before",
                self.target,
                exc,
            )
            return
        old_fd, self._fd = self._fd, new_fd
        if old_fd is not None:
            os.close(old_fd)
        log.info("statement log %s reopened", self.target)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush periodically until cancelled, then flush what is left and close."""
        if self.target != "-":
            # Fail at start-up, not at the first statement, when the path is unusable.
            self._fd = await anyio.to_thread.run_sync(self._open)
        task_status.started()
        try:
            while True:
                with anyio.move_on_after(self._flush_interval):
                    await self._wakeup.wait()
                self._wakeup = anyio.Event()
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()
                if self._fd is not None and self.target != "-":
                    os.close(self._fd)
                self._fd = None

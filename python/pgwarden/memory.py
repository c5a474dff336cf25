"""What a worker process does about its own memory: sessions' memory given back after
they end, and an open-file limit that fits two sockets per session.

**Ended sessions.**  A session's objects form reference cycles (the session and its relay,
each transport and its protocol, uvloop's TLS protocol and its transport), so they, and
the OpenSSL state a TLS session holds (about 30 KiB), are freed only by Python's cyclic
garbage collector, whose full collections grow rarer as a process holds more objects.
What is freed stays resident in glibc's heap besides.  Measured (300 TLS sessions through
one worker, opened and closed 16 times): the worker grew from 43 to 125 MiB with no
plateau, while one ``gc.collect()`` found 32 unreachable objects per ended session and
``malloc_trim(0)`` afterwards brought the worker back to 33 MiB.  So every
``memory_trim_seconds``, when sessions have ended since the last look, the worker runs a
full collection and then ``malloc_trim(0)`` (glibc only).  The objects the worker made
before it served (modules, settings, the policy) are frozen out of the collector's scans
at start (``gc.freeze()``), so a collection walks only what sessions made: a few
milliseconds rather than about 20.

**Open files.**  Each session holds two sockets (client and upstream).  A soft limit of
1,024 (a common default) would refuse the 500th session with "too many open files"; the
worker raises its soft limit to the hard limit at start, as far as 1,048,576.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import resource
import time
from collections.abc import Callable
from typing import Final

import anyio
import anyio.abc

log = logging.getLogger(__name__)

#: Highest soft open-file limit asked for (a hard limit of "unlimited" or 2^30 would only
#: make loops over descriptor numbers slower).
MAX_OPEN_FILES: Final = 1 << 20


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Collects ended sessions' objects and gives the freed heap back to the system (see
    the module)."""

    def __init__(self, interval_seconds: float, sessions_ended: Callable[[], int]) -> None:
        self.interval_seconds = interval_seconds
        self._sessions_ended = sessions_ended
        self._seen = sessions_ended()
        self._trim = _malloc_trim()
        self.trims = 0

    def trim_if_sessions_ended(self) -> bool:
        """Collects and trims when a session ended since the last call; True if it did."""
        ended = self._sessions_ended()
        if ended == self._seen:
            return False
        self._seen = ended
        started = time.perf_counter()
        collected = gc.collect()
        collect_ms = (time.perf_counter() - started) * 1000
        released = self._trim(0) if self._trim is not None else 0
        self.trims += 1
        log.debug(
            "%d ended session(s) so far: %d unreachable object(s) collected in %.1f ms, "
            "heap trimmed in %.1f ms (%s)",
            ended,
            collected,
            collect_ms,
            (time.perf_counter() - started) * 1000 - collect_ms,
            "memory released" if released else "nothing to release",
        )
        return True

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        # What exists now lives as long as the process: out of every later collection
        # (until the trimmer stops: a process that goes on, a test's, collects it again).
        gc.freeze()
        try:
            task_status.started()
            if self._trim is None:
                log.debug("no malloc_trim in this C library: freed heap is left to the allocator")
            while True:
                await anyio.sleep(self.interval_seconds)
                self.trim_if_sessions_ended()
        finally:
            gc.unfreeze()


def raise_open_file_limit() -> tuple[int, int]:
    """Raises the soft open-file limit to the hard one (at most :data:`MAX_OPEN_FILES`);
    returns (old soft limit, new soft limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
            return soft, soft
        return soft, wanted
    return soft, soft

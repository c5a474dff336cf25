"""What a worker process does about its own memory: the heap that ended sessions freed
given back to the system, and an open-file limit that fits two sockets per session.

**Freed heap.**  glibc's ``malloc`` keeps the pages of freed memory resident, and sessions
that come and go (a TLS session's OpenSSL state is about 30 KiB) leave its heap
fragmented, so that later sessions do not reuse all of it: 300 TLS sessions opened and
closed again and again through one worker made it grow round after round (44 to 58 MiB
in 8 rounds, and on).  So every ``memory_trim_seconds``, when sessions have ended since
the last look, the worker calls ``malloc_trim(0)`` (glibc only; elsewhere nothing is
done), which takes well under a millisecond to a few, and the worker stays level.

(A session's own objects are freed as soon as it ends, by reference counting: the
session lets go of its relay, the one reference cycle between them.  Before it did, an
ended session's objects, OpenSSL state included, waited for a full garbage collection,
and a worker grew from 43 to 125 MiB in 16 such rounds.)

**Open files.**  Each session holds two sockets (client and upstream).  A soft limit of
1,024 (a common default) would refuse the 500th session with "too many open files"; the
worker raises its soft limit to the hard limit at start, as far as 1,048,576.
"""

from __future__ import annotations

import ctypes
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
    """Gives the heap that ended sessions freed back to the system (see the module)."""

    def __init__(self, interval_seconds: float, sessions_ended: Callable[[], int]) -> None:
        self.interval_seconds = interval_seconds
        self._sessions_ended = sessions_ended
        self._seen = sessions_ended()
        self._trim = _malloc_trim()

    def trim_if_sessions_ended(self) -> None:
        """Trims when a session ended since the last call."""
        ended = self._sessions_ended()
        if ended == self._seen or self._trim is None:
            return
        self._seen = ended
        started = time.perf_counter()
        released = self._trim(0)
        log.debug(
            "%d ended session(s) so far: heap trimmed in %.1f ms (%s)",
            ended,
            (time.perf_counter() - started) * 1000,
            "memory released" if released else "nothing to release",
        )

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        if self._trim is None:
            log.debug("no malloc_trim in this C library: freed heap is left to the allocator")
            return
        while True:
            await anyio.sleep(self.interval_seconds)
            self.trim_if_sessions_ended()


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

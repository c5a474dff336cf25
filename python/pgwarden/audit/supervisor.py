"""The shipper as a child of ``pgwarden serve``: started first, restarted if it dies.

The child is ``python -m pgwarden audit ship --parent-pid <serve pid>``; it reads the same
settings (``PGWARDEN_*`` and ``PGWARDEN_CONFIG`` are inherited), lowers its own CPU
priority, and asks Linux to SIGTERM it if ``serve`` disappears (kill -9 included), so an
orphan never ships next to the next gateway's shipper (the shipper lock serialises them
anyway).  Stopping sends SIGTERM and, after a grace period, SIGKILL: killing a shipper
mid-export loses nothing, the records stay in the spool until acknowledged.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Final

from pgwarden.signals import GATEWAY_SIGNALS

log = logging.getLogger(__name__)

_WATCH_INTERVAL: Final = 0.5
_RESTART_BACKOFF: Final = 1.0


def shipper_command(parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "pgwarden", "audit", "ship", "--parent-pid", str(parent_pid)]


class ShipperSupervisor:
    """Keeps one shipper process running until :meth:`stop`."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._spawn()
        self._watcher = threading.Thread(
            target=self._watch, name="audit-shipper-watch", daemon=True
        )
        self._watcher.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._process = subprocess.Popen(
                shipper_command(os.getpid()),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
            log.info("audit shipper started (pid %d)", self._process.pid)

    def _watch(self) -> None:
        # The watcher blocks the gateway's signals (see pgwarden.signals).
        signal.pthread_sigmask(signal.SIG_BLOCK, GATEWAY_SIGNALS)
        while not self._stopping.wait(_WATCH_INTERVAL):
            process = self._process
            if process is None or process.poll() is None:
                continue
            if self._stopping.is_set():
                return
            log.error(
                "audit shipper (pid %d) exited with status %s; restarting",
                process.pid,
                process.returncode,
            )
            self.restarts += 1
            if self._stopping.wait(_RESTART_BACKOFF):
                return
            self._spawn()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the shipper, wait for it, SIGKILL it if it does not exit in time."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            deadline = time.monotonic() + grace_seconds
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if process.poll() is None:
                log.warning("audit shipper did not stop in %.0f s; killing it", grace_seconds)
                process.kill()
                process.wait()
        if self._watcher is not None:
            self._watcher.join(timeout=2)

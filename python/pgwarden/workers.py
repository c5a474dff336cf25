"""Worker processes: ``workers`` copies of the gateway sharing one port (SO_REUSEPORT).

The supervisor forks before any event loop exists, waits for every worker to be listening,
then announces the port once.  It forwards SIGTERM/SIGINT to the workers (each drains on its
own) and SIGHUP (each reopens its statement log and re-reads the statement policy), restarts
a worker that dies while serving, and exits 0 when all have stopped after a shutdown signal.
Workers find each other for CancelRequest forwarding through unix sockets in a private
runtime directory named after the port.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

from pgwarden.cancel import default_runtime_dir, ensure_runtime_dir
from pgwarden.config import Settings
from pgwarden.metrics import MetricsBoard
from pgwarden.server import bind_listeners, format_address, run_worker
from pgwarden.session_limits import SessionLedger
from pgwarden.signals import GATEWAY_SIGNALS

log = logging.getLogger(__name__)

_READY_TIMEOUT_SECONDS = 30.0
_RESTART_BACKOFF_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker if the supervisor dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker_main(
    settings: Settings,
    index: int,
    port: int,
    runtime_dir: Path,
    ready_fd: int | None,
    ledger: SessionLedger | None,
    metrics_board: MetricsBoard | None,
) -> int:
    # A SIGHUP forwarded before this worker's loop handles it must not end the worker (its
    # default action); the statement log it has yet to open is opened by its current name.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GATEWAY_SIGNALS)
    _die_with_parent()
    try:
        listeners = bind_listeners(settings.listen_host, port, reuse_port=True)
    except OSError as exc:
        log.error(
            "worker %d: cannot listen on %s: %s",
            index,
            format_address(settings.listen_host, port),
            exc,
        )
        return 1

    def ready() -> None:
        log.debug("worker %d (pid %d) ready", index, os.getpid())
        if ready_fd is not None:
            os.write(ready_fd, bytes([index]))

    try:
        run_worker(
            settings,
            listeners,
            worker_index=index,
            runtime_dir=runtime_dir,
            on_ready=ready,
            ledger=ledger,
            metrics_board=metrics_board,
        )
    except OSError as exc:  # an address in use (the metrics endpoint), and the like
        log.error("worker %d: %s", index, exc)
        return 1
    except Exception:
        log.exception("worker %d failed", index)
        return 1
    return 0


class _Supervisor:
    def __init__(self, settings: Settings, port: int, runtime_dir: Path) -> None:
        self.settings = settings
        self.port = port
        self.runtime_dir = runtime_dir
        self.children: dict[int, int] = {}  # pid -> worker index
        self.started_at: dict[int, float] = {}  # worker index -> start time
        self.stopping = False
        self.close_in_child: list[int] = []  # supervisor-only descriptors
        # Made before any worker is forked, so that they all share it.
        self.ledger = SessionLedger.for_settings(settings, runtime_dir / "sessions.lock")
        self.metrics_board = MetricsBoard.for_settings(settings)

    def spawn(self, index: int, ready_fd: int | None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            for fd in self.close_in_child:
                with contextlib.suppress(OSError):
                    os.close(fd)
            try:
                code = _worker_main(
                    self.settings,
                    index,
                    self.port,
                    self.runtime_dir,
                    ready_fd,
                    self.ledger,
                    self.metrics_board,
                )
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index
        self.started_at[index] = time.monotonic()

    def reap(self) -> list[tuple[int, int]]:
        """Collect exited workers: ``[(index, exit status)]``."""
        exited = []
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self.children.pop(pid, None)
            if index is not None:
                exited.append((index, os.waitstatus_to_exitcode(status)))
        return exited

    def signal_all(self, signo: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)


def supervise(settings: Settings) -> int:
    """Fork ``settings.workers`` workers and look after them until shutdown."""
    signal.pthread_sigmask(signal.SIG_BLOCK, GATEWAY_SIGNALS)
    # Port 0: pick one now and keep it reserved (bound, never listening) for every worker.
    reservation: list[socket.socket] = []
    port = settings.listen_port
    if port == 0:
        reservation = bind_listeners(settings.listen_host, 0, reuse_port=True)
        port = reservation[0].getsockname()[1]
    runtime_dir = settings.runtime_dir or default_runtime_dir(port)
    ensure_runtime_dir(runtime_dir)
    supervisor = _Supervisor(settings, port, runtime_dir)
    ready_read, ready_write = os.pipe()
    supervisor.close_in_child = [ready_read, *(sock.fileno() for sock in reservation)]
    try:
        for index in range(settings.workers):
            supervisor.spawn(index, ready_write)
        os.close(ready_write)
        if not _wait_ready(supervisor, ready_read, settings.workers):
            supervisor.stopping = True
            supervisor.signal_all(signal.SIGTERM)
            _wait_children(supervisor, deadline=time.monotonic() + 10)
            return 1
        log.info("pgwarden listening on %s", format_address(settings.listen_host, port))
        log.info("%d workers running", settings.workers)
        return _supervise_loop(supervisor)
    finally:
        os.close(ready_read)
        for sock in reservation:
            sock.close()
        with contextlib.suppress(OSError):
            for leftover in [*runtime_dir.glob("cancel-*.sock"), runtime_dir / "sessions.lock"]:
                leftover.unlink(missing_ok=True)
            runtime_dir.rmdir()


def _wait_ready(supervisor: _Supervisor, ready_read: int, count: int) -> bool:
    ready: set[int] = set()
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while len(ready) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.error("workers did not start in %.0f s", _READY_TIMEOUT_SECONDS)
            return False
        readable, _, _ = select.select([ready_read], [], [], min(remaining, 0.2))
        if readable:
            data = os.read(ready_read, 256)
            if not data:
                log.error("a worker exited before it was ready")
                return False
            ready.update(data)
        for index, code in supervisor.reap():
            log.error("worker %d exited during startup (status %d)", index, code)
            return False
        if signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 0) is not None:
            return False
    return True


def _supervise_loop(supervisor: _Supervisor) -> int:
    settings = supervisor.settings
    deadline: float | None = None
    pending_restarts: dict[int, float] = {}
    while True:
        info = signal.sigtimedwait(GATEWAY_SIGNALS, 0.5)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            if supervisor.stopping:
                log.info("second signal: workers close all sessions now")
            else:
                log.info("received %s: stopping workers", signal.Signals(info.si_signo).name)
                supervisor.stopping = True
                deadline = time.monotonic() + settings.drain_timeout_seconds + 30
            supervisor.signal_all(signal.SIGTERM)
        elif info is not None and info.si_signo == signal.SIGHUP:
            # Also while draining: the workers still write the statement log until they exit.
            log.info("received SIGHUP: forwarding to %d worker(s)", len(supervisor.children))
            supervisor.signal_all(signal.SIGHUP)
        for index, code in supervisor.reap():
            if supervisor.stopping:
                log.debug("worker %d stopped (status %d)", index, code)
                continue
            log.error("worker %d exited unexpectedly (status %d); restarting", index, code)
            if supervisor.ledger is not None:
                supervisor.ledger.forget_worker(index)  # its sessions ended with it
            if supervisor.metrics_board is not None:
                supervisor.metrics_board.forget_worker(index)
            elapsed = time.monotonic() - supervisor.started_at.get(index, 0.0)
            delay = _RESTART_BACKOFF_SECONDS if elapsed < _RESTART_BACKOFF_SECONDS else 0.0
            pending_restarts[index] = time.monotonic() + delay
        if not supervisor.stopping:
            now = time.monotonic()
            for index, when in list(pending_restarts.items()):
                if when <= now:
                    del pending_restarts[index]
                    supervisor.spawn(index, None)
        elif not supervisor.children:
            log.info("pgwarden stopped")
            return 0
        elif deadline is not None and time.monotonic() > deadline:
            log.error("workers did not stop in time; killing them")
            supervisor.signal_all(signal.SIGKILL)
            deadline = None


def _wait_children(supervisor: _Supervisor, deadline: float) -> None:
    while supervisor.children and time.monotonic() < deadline:
        supervisor.reap()
        time.sleep(0.05)
    supervisor.signal_all(signal.SIGKILL)
    supervisor.reap()

"""Listening sockets, the accept loop, and the signals of one gateway process.

SIGTERM/SIGINT stop it (a drain first); SIGHUP reopens the statement log, for log rotation,
and re-reads the statement policy.

anyio gives the structure (a task per session inside a task group, cancel scopes for the
drain); the data path underneath is asyncio Protocols on raw transports (``pgwarden.relay``),
on uvloop when it is installed.  ``workers > 1`` is handled by ``pgwarden.workers``, which
forks processes that each run :func:`run_worker` on a port shared with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.abc

from pgwarden.cancel import CancelForwarder
from pgwarden.config import Settings
from pgwarden.gateway import Gateway
from pgwarden.memory import HeapTrimmer, raise_open_file_limit
from pgwarden.metrics import MetricsBoard, MetricsServer, bind_metrics
from pgwarden.session_limits import SessionLedger

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
# Accept errors that mean "out of resources right now": wait a little, keep serving.
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)


_UNUSABLE_ADDRESS_ERRORS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listeners(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address ``host`` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[object, ...]] = set()
    try:
        for family, type_, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                # Every address on the port the first one was given.
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                shown = format_address(str(address[0]), int(address[1]))
                if len(sockets) > 1 and exc.errno in _UNUSABLE_ADDRESS_ERRORS:
                    # e.g. "localhost" resolving to ::1 on a host without IPv6
                    log.warning("not listening on %s: %s", shown, exc.strerror)
                    sockets.pop().close()
                    continue
                raise OSError(exc.errno, f"cannot listen on {shown}: {exc.strerror}") from exc
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _peer_host(address: object) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "local"


async def _accept_loop(
    listener: socket.socket, gateway: Gateway, sessions: anyio.abc.TaskGroup
) -> None:
    loop = asyncio.get_running_loop()
    is_tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
    while True:
        try:
            conn, address = await loop.sock_accept(listener)
        except OSError as exc:
            if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                log.error("accept failed: %s", exc)
                await anyio.sleep(0.1)
                continue
            raise
        conn.setblocking(False)
        if is_tcp:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sessions.start_soon(gateway.handle_connection, conn, _peer_host(address))


async def serve(
    settings: Settings,
    listeners: list[socket.socket],
    *,
    worker_index: int = 0,
    cancel_forwarder: CancelForwarder | None = None,
    on_ready: Callable[[], None] | None = None,
    gateway: Gateway | None = None,
    ledger: SessionLedger | None = None,
    metrics_board: MetricsBoard | None = None,
    metrics_socket: socket.socket | None = None,
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Serve until a stop signal, then drain: the coroutine a worker process runs.

    A second stop signal during the drain ends every session at once.  SIGHUP, at any time
    until then, reopens the statement log.
    """
    if gateway is None:
        gateway = Gateway(
            settings,
            worker_index=worker_index,
            cancel_forwarder=cancel_forwarder,
            ledger=ledger,
            metrics_board=metrics_board,
        )
    # The SIGHUP handler is in place before the statement log opens its file: a rotation
    # can never fall between the two unnoticed.
    with (
        anyio.open_signal_receiver(*stop_signals) as signals,
        anyio.open_signal_receiver(signal.SIGHUP) as hangups,
    ):
        async with anyio.create_task_group() as services:
            services.start_soon(_reopen_on_hangup, gateway, hangups)
            if gateway.statement_log is not None:
                await services.start(gateway.statement_log.run)
            if cancel_forwarder is not None:
                await services.start(cancel_forwarder.serve, gateway.cancels)
            if gateway.identity is not None:
                await services.start(gateway.identity.run)
            if gateway.mask_watch is not None:
                await services.start(gateway.mask_watch.run)
            if gateway.metrics is not None:
                await services.start(gateway.metrics.run)
                if metrics_socket is not None:
                    endpoint = MetricsServer(gateway.metrics.board, settings, metrics_socket)
                    await services.start(endpoint.serve)
            if settings.memory_trim_seconds > 0:
                trimmer = HeapTrimmer(settings.memory_trim_seconds, lambda: gateway.sessions_ended)
                await services.start(trimmer.run)
            async with anyio.create_task_group() as sessions:
                accepting = anyio.CancelScope()

                async def accept_all() -> None:
                    with accepting:
                        async with anyio.create_task_group() as accept_group:
                            for listener in listeners:
                                accept_group.start_soon(_accept_loop, listener, gateway, sessions)

                sessions.start_soon(accept_all)
                if on_ready is not None:
                    on_ready()
                received: signal.Signals | None = None
                async for signum in signals:
                    received = signum
                    break
                log.info(
                    "received %s: no new connections, draining %d session(s)",
                    received.name if received is not None else "signal",
                    len(gateway.sessions),
                )
                accepting.cancel()
                for listener in listeners:
                    listener.close()
                await _drain(gateway, settings.drain_timeout_seconds, signals)
                sessions.cancel_scope.cancel()
            services.cancel_scope.cancel()
    gateway.close()
    log.info("pgwarden stopped")


async def _reopen_on_hangup(gateway: Gateway, hangups: AsyncIterator[signal.Signals]) -> None:
    """SIGHUP: reopen the statement log by its name (after logrotate renamed the file), load
    the TLS certificate and key files again (a renewed certificate), and read the statement
    policy file again.

    Settings are not re-read: the listeners, identity issuers and upstream credentials they
    describe are built once at start-up, so a changed file needs a restart.
    """
    async for _ in hangups:
        gateway.reload_tls()
        gateway.reload_policy()
        statement_log = gateway.statement_log
        if statement_log is not None and statement_log.request_reopen():
            log.info(
                "received SIGHUP: reopening statement log %s (settings are not re-read)",
                statement_log.target,
            )
        else:
            log.info("received SIGHUP: no statement log file to reopen (settings are not re-read)")


async def _drain(
    gateway: Gateway, drain_seconds: float, signals: AsyncIterator[signal.Signals]
) -> None:
    """Idle sessions end now; busy ones get ``drain_seconds`` (or until another signal)."""
    gateway.begin_drain()
    with anyio.move_on_after(drain_seconds):
        async with anyio.create_task_group() as waiting:

            async def another_signal() -> None:
                async for _ in signals:
                    log.info("second signal: closing all sessions now")
                    waiting.cancel_scope.cancel()
                    return

            waiting.start_soon(another_signal)
            await gateway.wait_sessions_closed()
            waiting.cancel_scope.cancel()
    if gateway.sessions:
        log.info("drain timeout: terminating %d busy session(s)", len(gateway.sessions))
        gateway.terminate_all()
        with anyio.move_on_after(15):
            await gateway.wait_sessions_closed()


def event_loop_options() -> tuple[str, dict[str, object]]:
    """anyio backend and options: asyncio on uvloop when it is importable."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio", {}
    return "asyncio", {"use_uvloop": True}


def run_worker(
    settings: Settings,
    listeners: list[socket.socket],
    *,
    worker_index: int = 0,
    runtime_dir: Path | None = None,
    on_ready: Callable[[], None] | None = None,
    ledger: SessionLedger | None = None,
    metrics_board: MetricsBoard | None = None,
) -> None:
    """Run one gateway process's event loop until it has drained.

    ``runtime_dir`` is set for the workers of a supervisor: they forward CancelRequests to
    each other, and they stop on SIGTERM only.  Ctrl-C in a terminal reaches the supervisor
    and its workers alike; the supervisor turns it into one SIGTERM per worker, which a
    worker's own SIGINT would otherwise double into "close everything now".
    """
    forwarder = CancelForwarder(runtime_dir, worker_index) if runtime_dir is not None else None
    stop_signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
    if runtime_dir is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_signals = (signal.SIGTERM,)
    # SIGHUP's default action ends the process: ignore it while serve() has no handler for
    # it (before the loop starts, and after it removed its handler on the way out).  A file
    # opened after an ignored SIGHUP is opened by its current name anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Worker 0 serves the metrics; bound here, so that an address in use stops it at once.
    metrics_socket = (
        bind_metrics(settings.metrics_listen)
        if settings.metrics_listen is not None and worker_index == 0
        else None
    )
    previous, soft = raise_open_file_limit()
    if soft != previous:
        log.debug("open-file limit raised from %d to %d", previous, soft)
    backend, options = event_loop_options()

    async def main() -> None:
        await serve(
            settings,
            listeners,
            worker_index=worker_index,
            cancel_forwarder=forwarder,
            on_ready=on_ready,
            ledger=ledger,
            metrics_board=metrics_board,
            metrics_socket=metrics_socket,
            stop_signals=stop_signals,
        )

    try:
        anyio.run(main, backend=backend, backend_options=options)
    finally:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if metrics_socket is not None:
            metrics_socket.close()


def run(settings: Settings) -> int:
    """``pgwarden serve``: one process, or a supervisor of ``settings.workers`` processes."""
    if settings.workers > 1:
        from pgwarden.workers import supervise

        return supervise(settings)
    listeners = bind_listeners(settings.listen_host, settings.listen_port, reuse_port=False)
    port = listeners[0].getsockname()[1]

    def announce() -> None:
        log.info("pgwarden listening on %s", format_address(settings.listen_host, port))

    try:
        run_worker(settings, listeners, on_ready=announce)
    finally:
        for listener in listeners:
            listener.close()
    return 0

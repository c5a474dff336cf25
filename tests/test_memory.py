"""A worker's own memory and file descriptors: sessions that have ended give their memory
back, and the open-file limit a gateway inherits does not cap its sessions."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from harness import GatewayLauncher, GatewayProcess, StartGateway
from pgwarden.memory import MAX_OPEN_FILES

MIB = 1024 * 1024


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for process {pid}")


def open_and_close_tls_sessions(gateway: GatewayProcess, count: int) -> None:
    sessions: list[psycopg.Connection[Any]] = []
    try:
        for _ in range(count):
            conn = gateway.connect(sslmode="require", autocommit=True)
            sessions.append(conn)
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for conn in sessions:
            conn.close()


def test_ended_tls_sessions_give_their_memory_back(start_gateway: StartGateway) -> None:
    """An ended session's objects (the OpenSSL state of a TLS session among them) go when
    it ends, and the worker gives the heap they freed back: while a session and its relay
    held each other, each round of 100 TLS sessions left the worker about 3 MiB larger."""
    trim_seconds = 0.2
    gateway = start_gateway({"memory_trim_seconds": trim_seconds})
    open_and_close_tls_sessions(gateway, 100)
    _settle(trim_seconds)
    first = pss_bytes(gateway.pid)
    for _ in range(4):
        open_and_close_tls_sessions(gateway, 100)
    _settle(trim_seconds)
    grown = pss_bytes(gateway.pid) - first
    assert grown < 2 * MIB, f"the worker grew by {grown / MIB:.1f} MiB over 400 ended sessions"


def _settle(trim_seconds: float) -> None:
    """Long enough for the sessions' closes to complete and a trim to follow them."""
    time.sleep(1.0 + 2 * trim_seconds)


@contextlib.contextmanager
def inherited_open_file_limit(soft: int) -> Iterator[int]:
    """Processes started inside inherit ``soft`` as their soft open-file limit; yields
    the hard limit."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_an_inherited_low_open_file_limit_does_not_cap_sessions(
    gateway_launcher: GatewayLauncher,
) -> None:
    """Two sockets per session: with a soft limit of 64 a worker that kept it would refuse
    sessions after about 25 ("too many open files")."""
    with inherited_open_file_limit(64) as hard:
        gateway = gateway_launcher.start()
    try:
        limits = Path(f"/proc/{gateway.pid}/limits").read_text()
        row = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        soft_now = int(row.split()[3])
        assert soft_now == min(hard, MAX_OPEN_FILES)
        sessions = [gateway.connect(autocommit=True) for _ in range(60)]
        try:
            for conn in sessions:
                assert conn.execute("select 1").fetchone() == (1,)
        finally:
            for conn in sessions:
                conn.close()
    finally:
        gateway.terminate()

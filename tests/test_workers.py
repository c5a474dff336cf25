"""Several worker processes sharing the port: sessions, cancels and crashes across them."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors

from harness import GatewayProcess, StartGateway, backends_running, background, wait_until


def worker_pids(gateway: GatewayProcess) -> list[int]:
    children = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_sessions_spread_over_workers(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"workers": 2})
    assert len(worker_pids(gateway)) == 2
    connections = [gateway.connect(autocommit=True) for _ in range(12)]
    try:
        for i, conn in enumerate(connections):
            assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
    finally:
        for conn in connections:
            conn.close()


def test_cancel_reaches_the_owning_worker(
    start_gateway: StartGateway, superuser: psycopg.Connection[Any]
) -> None:
    """A CancelRequest arrives on a new connection, on whichever worker the kernel picks."""
    gateway = start_gateway({"workers": 2})
    for _ in range(6):
        cancel_one_query(gateway, superuser)


def cancel_one_query(gateway: GatewayProcess, superuser: psycopg.Connection[Any]) -> None:
    tag = "w" + uuid.uuid4().hex[:10]
    with gateway.connect(autocommit=True) as conn:
        with background(lambda: conn.execute(f"select pg_sleep(30) /* {tag} */")) as outcome:
            assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
            started = time.monotonic()
            conn.cancel_safe(timeout=10)
            outcome["thread"].join(10)
        assert isinstance(outcome.get("error"), errors.QueryCanceled), outcome
        assert time.monotonic() - started < 5
        assert conn.execute("select 1").fetchone() == (1,)


def test_killed_worker_is_replaced(start_gateway: StartGateway) -> None:
    gateway = start_gateway({"workers": 2})
    first = worker_pids(gateway)
    os.kill(first[0], signal.SIGKILL)
    assert wait_until(
        lambda: len(worker_pids(gateway)) == 2 and first[0] not in worker_pids(gateway), 15
    ), "the supervisor should start a new worker"
    assert gateway.alive()
    for _ in range(6):
        with gateway.connect() as conn:
            assert conn.execute("select 'served'").fetchone() == ("served",)

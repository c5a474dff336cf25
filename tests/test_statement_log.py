"""The per-statement JSON-lines log: one record per statement, with what a reviewer needs."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from harness import (
    CLIENT_USER,
    OTHER_CLIENT_PASSWORD,
    OTHER_CLIENT_USER,
    SCRAM_PASSWORD,
    GatewayProcess,
    StartGateway,
    wait_until,
)

REQUIRED_FIELDS = {"user", "statement", "params", "command_tag", "rows", "sqlstate", "duration_us"}


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records_with(
    path: Path, tag: str, expected: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Records whose statement contains ``tag``; waits for ``expected`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in read_records(path) if tag in str(r.get("statement", ""))]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def logged_gateway(start_gateway: StartGateway, tmp_path: Path) -> tuple[GatewayProcess, Path]:
    log = tmp_path / "statements.jsonl"
    gateway = start_gateway({"statement_log": str(log), "statement_log_max_param_bytes": 64})
    return gateway, log


def test_simple_extended_and_error_statements(
    logged_gateway: tuple[GatewayProcess, Path],
) -> None:
    gateway, log = logged_gateway
    tag = "t" + uuid.uuid4().hex[:10]
    simple = f"select 1 as one /* {tag} */"
    extended = f"select %t::int + %t::int as total, %t::text as label /* {tag} */"
    failing = f"select * from missing_table_{tag}"
    insert = f"insert into log_target select g from generate_series(1, 3) g /* {tag} */"
    with gateway.connect(autocommit=True) as conn:
        conn.execute("create temp table log_target (n int)")
        assert conn.execute(simple).fetchone() == (1,)
        assert conn.execute(extended, ("40", "2", "forty-two")).fetchone() == (42, "forty-two")
        with pytest.raises(errors.UndefinedTable):
            conn.execute(failing)
        assert conn.execute(insert).rowcount == 3

    records = records_with(log, tag, 4)
    by_statement = {r["statement"]: r for r in records}
    assert len(records) == 4, json.dumps(records, indent=1)
    for record in records:
        assert record["user"] == CLIENT_USER
        assert isinstance(record["duration_us"], int) and record["duration_us"] >= 0

    first = by_statement[simple]
    assert first["command_tag"] == "SELECT 1"
    assert first["rows"] == 1
    assert first["sqlstate"] in (None, "00000")

    second = by_statement[
        extended.replace("%t", "$1", 1).replace("%t", "$2", 1).replace("%t", "$3")
    ]
    assert second["params"] == ["40", "2", "forty-two"]
    assert second["command_tag"] == "SELECT 1"
    assert second["rows"] == 1

    error = by_statement[failing]
    assert error["sqlstate"] == "42P01"

    inserted = by_statement[insert]
    assert inserted["command_tag"] == "INSERT 0 3"
    assert inserted["rows"] == 3

    # Every record has the same fields, so that a reader need not guess (a simple query's
    # params are null or []).
    for record in records:
        assert record.keys() >= REQUIRED_FIELDS, f"missing {REQUIRED_FIELDS - record.keys()}"
    assert not first["params"]


def test_records_follow_order_and_user(
    logged_gateway: tuple[GatewayProcess, Path],
) -> None:
    gateway, log = logged_gateway
    tag = "o" + uuid.uuid4().hex[:10]
    with gateway.connect(
        user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD, autocommit=True
    ) as conn:
        for i in range(20):
            conn.execute(f"select {i} /* {tag} */")
    records = records_with(log, tag, 20)
    assert [r["statement"] for r in records] == [f"select {i} /* {tag} */" for i in range(20)]
    assert {r["user"] for r in records} == {OTHER_CLIENT_USER}


def test_long_parameters_are_truncated(logged_gateway: tuple[GatewayProcess, Path]) -> None:
    gateway, log = logged_gateway
    tag = "p" + uuid.uuid4().hex[:10]
    with gateway.connect(autocommit=True) as conn:
        conn.execute(f"select length(%t) /* {tag} */", ("z" * 10000,))
    (record,) = records_with(log, tag, 1)
    (param,) = record["params"]
    assert isinstance(param, str) and param.startswith("zzzz")
    assert len(param.encode()) < 200


def test_prepared_statement_executions_each_logged(
    logged_gateway: tuple[GatewayProcess, Path],
) -> None:
    gateway, log = logged_gateway
    tag = "x" + uuid.uuid4().hex[:10]
    with gateway.connect(autocommit=True) as conn:
        for i in range(6):
            conn.execute(f"select %t::int /* {tag} */", (str(i),), prepare=True)
    records = records_with(log, tag, 6)
    assert [r["params"] for r in records] == [[str(i)] for i in range(6)]


def test_upstream_password_never_logged(logged_gateway: tuple[GatewayProcess, Path]) -> None:
    gateway, log = logged_gateway
    with gateway.connect(autocommit=True) as conn:
        conn.execute("select current_user")
        with pytest.raises(psycopg.Error):
            conn.execute("select * from pg_authid")
    time.sleep(0.5)
    assert SCRAM_PASSWORD not in log.read_text()
    assert SCRAM_PASSWORD not in gateway.stderr


# --- reopening on SIGHUP (log rotation by renaming) ----------------------------------------

REOPENED_LINE = re.compile(r"\[(\d+)\] INFO pgwarden\.statement_log: statement log .* reopened")


def reopened_pids(gateway: GatewayProcess) -> list[int]:
    return [int(match.group(1)) for match in REOPENED_LINE.finditer(gateway.stderr)]


def worker_pids(gateway: GatewayProcess) -> list[int]:
    children = Path(f"/proc/{gateway.pid}/task/{gateway.pid}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reopens_the_log_after_a_rename(
    start_gateway: StartGateway, tmp_path: Path, workers: int
) -> None:
    """What logrotate does without copytruncate: rename the file, then SIGHUP the gateway."""
    log = tmp_path / "statements.jsonl"
    rotated = tmp_path / "statements.jsonl.1"
    gateway = start_gateway({"statement_log": str(log), "workers": workers})
    writers = [gateway.pid] if workers == 1 else worker_pids(gateway)
    tag = "r" + uuid.uuid4().hex[:10]

    # Several connections, so that with workers every worker has sessions; one of them keeps
    # running statements throughout, so the switch happens while records are being written.
    connections = [gateway.connect(autocommit=True) for _ in range(8)]
    sent: list[str] = []
    stop = threading.Event()

    def keep_writing() -> None:
        with gateway.connect(autocommit=True) as conn:
            i = 0
            while not stop.is_set() or i < 20:
                statement = f"select {i} /* {tag} steady */"
                conn.execute(statement)
                sent.append(statement)
                i += 1
                time.sleep(0.005)

    writer = threading.Thread(target=keep_writing, daemon=True)
    try:
        writer.start()
        for n, conn in enumerate(connections):
            conn.execute(f"select {n} /* {tag} before */")
        assert len(records_with(log, f"{tag} before", len(connections))) == len(connections)

        os.rename(log, rotated)
        os.kill(gateway.pid, signal.SIGHUP)
        assert wait_until(lambda: sorted(reopened_pids(gateway)) == sorted(writers), 10), (
            f"every process writing the log should reopen it; stderr:\n{gateway.stderr}"
        )

        # Sessions opened before the rotation write to the new file from now on.
        for n, conn in enumerate(connections):
            conn.execute(f"select {n} /* {tag} after */")
    finally:
        stop.set()
        writer.join(30)
        for conn in connections:
            conn.close()
    assert not writer.is_alive()
    assert gateway.alive()

    new = records_with(log, f"{tag} after", len(connections))
    old = read_records(rotated)
    assert [r for r in old if f"{tag} after" in r["statement"]] == []
    assert len([r for r in old if f"{tag} before" in r["statement"]]) == len(connections)
    assert [r for r in new if f"{tag} before" in r["statement"]] == []
    assert len([r for r in new if f"{tag} after" in r["statement"]]) == len(connections)

    # The steady session's statements: none lost, none twice, and the switch is one point in
    # its sequence (the old file has a prefix, the new file the rest).
    assert wait_until(
        lambda: (
            len(records_with(rotated, f"{tag} steady", 0, timeout=0))
            + len(records_with(log, f"{tag} steady", 0, timeout=0))
            == len(sent)
        ),
        10,
    )
    steady_old = [
        r["statement"] for r in read_records(rotated) if f"{tag} steady" in r["statement"]
    ]
    steady_new = [r["statement"] for r in read_records(log) if f"{tag} steady" in r["statement"]]
    assert steady_old + steady_new == sent
    assert steady_new, "the steady session went on writing after the rotation"


def test_sighup_without_statement_log_keeps_serving(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    os.kill(gateway.pid, signal.SIGHUP)
    assert wait_until(lambda: "received SIGHUP" in gateway.stderr, 10), gateway.stderr
    assert gateway.alive()
    with gateway.connect() as conn:
        assert conn.execute("select 'still serving'").fetchone() == ("still serving",)

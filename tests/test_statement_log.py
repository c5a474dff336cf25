"""The per-statement JSON-lines log: one record per statement, with what a reviewer needs."""

from __future__ import annotations

import json
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

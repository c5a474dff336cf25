"""pgbench through the gateway: initialisation (COPY) and all three query modes."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from harness import GatewayProcess, create_database, run_tool
from pgwarden.pgcluster import TemporaryCluster

BENCH_DATABASE = "bench"


@pytest.fixture(scope="module")
def bench_db(cluster: TemporaryCluster, gateway: GatewayProcess) -> Iterator[str]:
    create_database(cluster, BENCH_DATABASE)
    env = {**gateway.env(), "PGDATABASE": BENCH_DATABASE}
    result = run_tool(["pgbench", "-i", "-s", "1", "-q"], env, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stderr
    yield BENCH_DATABASE
    cluster.psql(f"drop database if exists {BENCH_DATABASE} with (force)")


def test_init_created_tables(cluster: TemporaryCluster, bench_db: str) -> None:
    counts = cluster.psql(
        "select (select count(*) from pgbench_accounts), (select count(*) from pgbench_branches)",
        dbname=bench_db,
    )
    assert counts.strip() == "100000|1"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_run(gateway: GatewayProcess, bench_db: str, mode: str) -> None:
    env = {**gateway.env(), "PGDATABASE": bench_db}
    result = run_tool(
        ["pgbench", "-n", "-T", "3", "-c", "4", "-j", "2", "-M", mode], env, timeout=120
    )
    assert result.returncode == 0, result.stderr + result.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert processed, result.stdout
    assert int(processed.group(1)) > 100, result.stdout
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    assert failed is None or int(failed.group(1)) == 0, result.stdout
    assert "error" not in result.stderr.lower(), result.stderr

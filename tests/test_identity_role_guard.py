"""The client cannot change the session's role: SET ROLE, SET SESSION AUTHORIZATION and
RESET ROLE (and set_config('role')) are refused with 42501, with psql, psycopg and asyncpg,
in the simple and the extended protocol, with the session and its transaction state left
exactly as PostgreSQL would leave them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import TEST_DATABASE, GatewayLauncher, GatewayProcess, run_tool, wait_until
from identity_support import (
    ANALYST_PASSWORD,
    ANALYST_ROLE,
    AUDIENCE,
    PRIVILEGED_ROLE,
    asyncpg_connect,
    create_identity_roles,
    identity_settings,
    running_gateway,
    token_dsn,
    tool_env,
)
from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.identity.role_guard import role_change
from pgwarden.pgcluster import TemporaryCluster

ROLE_CHANGES = [
    f"set role {PRIVILEGED_ROLE}",
    f"SET LOCAL ROLE {PRIVILEGED_ROLE}",
    "reset role",
    f"set session authorization {PRIVILEGED_ROLE}",
    "RESET SESSION AUTHORIZATION",
    f"select set_config('role', '{PRIVILEGED_ROLE}', false)",
    f'SET "Role" TO {PRIVILEGED_ROLE}',
    f'SET U&"r\\006Fle" TO {PRIVILEGED_ROLE}',
    f"select 1; set role {PRIVILEGED_ROLE}",
]


@pytest.fixture(scope="module")
def dev_issuer() -> Iterator[DevIssuer]:
    with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def statement_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("role-guard") / "statements.jsonl"


@pytest.fixture(scope="module")
def guarded_gateway(
    gateway_launcher: GatewayLauncher,
    cluster: TemporaryCluster,
    dev_issuer: DevIssuer,
    statement_log: Path,
) -> Iterator[GatewayProcess]:
    create_identity_roles(cluster)
    settings = identity_settings(dev_issuer)
    settings["statement_log"] = str(statement_log)
    with running_gateway(gateway_launcher, settings) as gateway:
        yield gateway


@pytest.fixture
def token(dev_issuer: DevIssuer) -> str:
    return dev_issuer.mint("u-alice", groups=["analysts"])


def test_role_change_is_possible_on_a_direct_connection(
    guarded_gateway: GatewayProcess, cluster: TemporaryCluster
) -> None:
    """The premise: without the gateway, the mapped role can become another one."""
    with psycopg.connect(
        host=cluster.host,
        port=cluster.port,
        user=ANALYST_ROLE,
        password=ANALYST_PASSWORD,
        dbname=TEST_DATABASE,
        autocommit=True,
    ) as conn:
        conn.execute(f"set role {PRIVILEGED_ROLE}")
        assert conn.execute("select current_user").fetchone() == (PRIVILEGED_ROLE,)


@pytest.mark.parametrize("sql", ROLE_CHANGES)
def test_grammar_finds_the_role_change(sql: str) -> None:
    assert role_change(sql) is not None
    assert role_change("set search_path = public") is None
    assert role_change("select 'set role x'") is None


def test_psql_simple_protocol(guarded_gateway: GatewayProcess, token: str) -> None:
    script = "\n".join(
        [
            f"set role {PRIVILEGED_ROLE};",
            "reset role;",
            f"set session authorization {PRIVILEGED_ROLE};",
            "select current_user || '|' || session_user as who;",
        ]
    )
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-v", "VERBOSITY=verbose", "-c", script],
        tool_env(guarded_gateway, token),
    )
    # psql -c sends the whole script as one Query: refused as a whole.
    assert "42501" in result.stderr, result.stderr
    assert "SET ROLE is not allowed through pgwarden" in result.stderr
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-v", "VERBOSITY=verbose"],
        tool_env(guarded_gateway, token),
        input=script + "\n",
    )
    assert result.stderr.count("ERROR:  42501") == 3, result.stderr
    assert result.stdout.strip() == f"{ANALYST_ROLE}|{ANALYST_ROLE}"


@pytest.mark.parametrize("sql", ROLE_CHANGES)
def test_psycopg_extended_protocol(guarded_gateway: GatewayProcess, token: str, sql: str) -> None:
    with psycopg.connect(token_dsn(guarded_gateway, token), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="not allowed"):
            conn.execute(sql)
        row = conn.execute("select current_user, session_user").fetchone()
        assert row == (ANALYST_ROLE, ANALYST_ROLE)


def test_psycopg_transaction_is_aborted_like_postgresql_would(
    guarded_gateway: GatewayProcess, token: str
) -> None:
    with psycopg.connect(token_dsn(guarded_gateway, token)) as conn:
        conn.execute("create temporary table t (x int)")
        conn.execute("insert into t values (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"set role {PRIVILEGED_ROLE}")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select current_user").fetchone() == (ANALYST_ROLE,)


def test_psycopg_pipeline_keeps_responses_in_order(
    guarded_gateway: GatewayProcess, token: str
) -> None:
    with psycopg.connect(token_dsn(guarded_gateway, token), autocommit=True) as conn:
        with conn.pipeline() as pipeline:
            first = conn.execute("select 'before'")
            pipeline.sync()
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("reset role")
                pipeline.sync()
            after = conn.execute("select 'after', current_user")
        assert first.fetchone() == ("before",)
        assert after.fetchone() == ("after", ANALYST_ROLE)


@pytest.mark.anyio
async def test_asyncpg_simple_and_prepared(guarded_gateway: GatewayProcess, token: str) -> None:
    conn = await asyncpg_connect(guarded_gateway, token)
    try:
        for sql in (f"set role {PRIVILEGED_ROLE}", "reset role", "reset session authorization"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)  # simple protocol
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(sql)  # extended protocol (Parse/Describe/Flush, then Sync)
        row = await conn.fetchrow("select current_user, session_user")
        assert tuple(row) == (ANALYST_ROLE, ANALYST_ROLE)
    finally:
        await conn.close()


def test_statement_record_keeps_what_the_client_sent(
    guarded_gateway: GatewayProcess, token: str, statement_log: Path
) -> None:
    marker = "set role pgw_privileged -- record-me"
    with (
        psycopg.connect(token_dsn(guarded_gateway, token), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute(marker)

    def record() -> dict[str, Any] | None:
        for line in statement_log.read_text().splitlines() if statement_log.exists() else []:
            item = json.loads(line)
            if item.get("statement") == marker:
                return dict(item)
        return None

    assert wait_until(lambda: record() is not None, 5)
    found = record()
    assert found is not None
    assert found["sqlstate"] == "42501"
    assert found["user"] == "u-alice"


def test_syntax_errors_still_reach_the_client(guarded_gateway: GatewayProcess, token: str) -> None:
    with psycopg.connect(token_dsn(guarded_gateway, token), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("selec 1")
        assert conn.execute("select 1").fetchone() == (1,)


def test_verdicts_are_shared_by_texts_differing_in_numbers() -> None:
    from pgwarden.identity import role_guard

    role_guard._verdicts.clear()
    assert role_change("select * from t where id = 1") is None
    assert role_change("select * from t where id = 2") is None
    assert len(role_guard._verdicts) == 1
    assert role_change(f"set role {PRIVILEGED_ROLE}1") == "SET ROLE"  # digits in a name
    assert role_change("select set_config('role', 'r2', false)") is not None
    assert role_change("select set_config('work_mem', '64', false)") is None
    assert len(role_guard._verdicts) == 4

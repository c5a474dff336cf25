"""The statement policy: every Query and Parse allowed or refused by the rules of a policy
file, with psql, psycopg (simple, extended, pipeline) and asyncpg through a real gateway;
the refusal is a 42501 the server itself raises, in order, with the transaction state
PostgreSQL would leave; reloads on SIGHUP; a broken file is a clear error."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest

from harness import (
    CLIENT_USER,
    OTHER_CLIENT_PASSWORD,
    OTHER_CLIENT_USER,
    SCRAM_ROLE,
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    gateway_environment,
    run_pgwarden,
    run_tool,
    settings_env,
    stop_and_check,
    wait_until,
)
from pgwarden.policy.analysis import analyse
from pgwarden.policy.engine import PolicyEngine
from pgwarden.policy.rules import PolicyError, parse_policy

POLICY = f"""
default = "deny"
version = "test-1"

[[rule]]
name = "no server files"
functions = ["pg_read_file", "pg_ls_dir"]
action = "deny"
message = "Server files are not readable through the gateway."

[[rule]]
name = "{OTHER_CLIENT_USER} reads"
users = ["{OTHER_CLIENT_USER}"]
statements = ["read", "transaction", "session"]
action = "allow"

[[rule]]
name = "no ddl"
statements = ["ddl", "admin", "code"]
action = "deny"

[[rule]]
name = "{CLIENT_USER} works on the policy tables"
users = ["{CLIENT_USER}"]
statements = ["read", "write", "transaction", "session"]
tables = ["public.policy_*", "policy_*", "pg_catalog.*"]
action = "allow"
"""


# --- the policy, without a gateway -------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        ("select * from t", ["read"]),
        ("with d as (delete from t returning *) select * from d", ["write"]),
        ("select * from t for update", ["write"]),
        ("select * into t2 from t", ["ddl"]),
        ("explain delete from t", ["read"]),
        ("explain analyze delete from t", ["write"]),
        ("explain (analyze false) delete from t", ["read"]),
        ("copy t to stdout", ["read"]),
        ("copy t from stdin", ["write"]),
        ("copy t to '/tmp/x'", ["admin"]),
        ("copy (select 1) to program 'true'", ["admin"]),
        ("prepare p as delete from t", ["write"]),
        ("truncate t", ["write"]),
        ("drop table t", ["ddl"]),
        ("create index on t (a)", ["ddl"]),
        ("grant select on t to public", ["admin"]),
        ("do $$ begin end $$", ["code"]),
        ("call p()", ["code"]),
        ("begin", ["transaction"]),
        ("set search_path = x", ["session"]),
        ("set role postgres", ["admin"]),
        ("reset session authorization", ["admin"]),
        ("select 1; drop table t", ["read", "ddl"]),
    ],
)
def test_statement_classes(sql: str, kinds: list[str]) -> None:
    assert [s.kind for s in analyse(sql).statements] == kinds


def test_tables_functions_and_parameters_are_read_from_the_tree() -> None:
    analysis = analyse(
        "with c as (select * from a.one) select pg_catalog.pg_read_file($2) from c, two"
    )
    (statement,) = analysis.statements
    assert sorted(statement.tables) == ["a.one", "two"]  # the WITH query's name is not a table
    assert statement.functions == ("pg_read_file",)
    assert analysis.parameters == 2
    assert analyse("drop schema s cascade").statements[0].tables == ("s.*",)
    assert analyse("drop table a.x, y").statements[0].tables == ("a.x", "y")
    assert analyse("comment on table a.x is 'x'").statements[0].tables == ("a.x",)
    assert analyse("comment on column a.x.c is null").statements[0].tables == ("a.x",)
    assert analyse("comment on column x.c is null").statements[0].tables == ("x",)
    assert analyse("security label on table y is 'l'").statements[0].tables == ("y",)
    assert analyse("comment on schema s is 'x'").statements[0].tables == ()
    assert not analyse("selec 1").parsed


def _decide(policy: str, sql: str, user: str = CLIENT_USER) -> Any:
    engine = PolicyEngine(parse_policy(policy.encode()))
    return engine.decide(engine.rules_for(user, (), SCRAM_ROLE), sql)


def test_rules_decide_in_order_and_allow_rules_cover_every_table() -> None:
    assert _decide(POLICY, "select * from policy_items").allowed
    assert _decide(POLICY, "update public.policy_items set n = 1").allowed
    # An allow rule must cover every relation; a deny rule any one of them.
    outside = _decide(POLICY, "select * from policy_items join secrets using (id)")
    assert not outside.allowed and outside.rule is None
    assert "no rule allows this read statement" in outside.message
    dropped = _decide(POLICY, "drop table policy_items")
    assert (dropped.rule, dropped.sqlstate, dropped.kind) == ("no ddl", "42501", "ddl")
    files = _decide(POLICY, "select pg_read_file('/etc/passwd')")
    assert files.rule == "no server files" and files.hint is not None
    # Every statement of a text must be allowed.
    assert not _decide(POLICY, "select 1 from policy_items; drop table policy_items").allowed
    assert _decide(POLICY, "begin; select 1 from policy_items; commit").allowed
    # Another user: read only, whatever the table.
    assert _decide(POLICY, "select * from secrets", OTHER_CLIENT_USER).allowed
    assert not _decide(POLICY, "delete from policy_items", OTHER_CLIENT_USER).allowed
    unparsable = _decide(POLICY, "selec 1")
    assert (unparsable.allowed, unparsable.sqlstate) == (False, "42601")


def test_names_without_a_schema_are_judged_against_the_callers_search_path() -> None:
    policy = """
[[rule]]
name = "payroll is off limits"
tables = ["hr.payroll"]
action = "deny"
[[rule]]
name = "the shop"
tables = ["shop.*", "orders"]
action = "allow"
"""
    # An unqualified name may resolve to any schema: a deny rule catches it by name...
    assert _decide(policy, "select * from payroll").rule == "payroll is off limits"
    # ...and a schema-bound allow pattern does not cover it (pg_catalog comes first).
    assert _decide(policy, "select * from shop.customers").allowed
    assert not _decide(policy, "select * from pg_authid").allowed
    assert not _decide(policy, "select * from customers").allowed
    assert _decide(policy, "select * from orders").allowed  # a name-only pattern does
    assert not _decide(policy, "drop schema hr cascade").allowed  # matched: default deny
    assert _decide(policy, "drop schema hr cascade").rule == "payroll is off limits"


def test_deny_patterns_match_any_letter_case_and_allow_patterns_exactly() -> None:
    policy = """
[[rule]]
name = "payroll is off limits"
tables = ["HR.Payroll"]
action = "deny"
[[rule]]
name = "the ORM's tables"
tables = ["public.Customer", "public.order_*"]
action = "allow"
"""
    # HR.Payroll in SQL is hr.payroll; as a catalog name it is "HR"."Payroll": both refused.
    for sql in ["select * from hr.payroll", 'select * from "HR"."Payroll"', "table HR.PAYROLL"]:
        assert _decide(policy, sql).rule == "payroll is off limits", sql
    assert _decide(policy, 'select * from public."Customer"').allowed
    assert not _decide(policy, "select * from public.customer").allowed  # another table
    assert not _decide(policy, 'select * from public."Order_lines"').allowed
    with pytest.raises(PolicyError, match="without quotes"):
        parse_policy(b'[[rule]]\nname = "r"\naction = "deny"\ntables = [\'public."T"\']\n')


def test_function_patterns_deny_in_any_letter_case_and_allow_exactly() -> None:
    policy = """
[[rule]]
name = "no file reads"
functions = ["PG_READ_FILE"]
action = "deny"
[[rule]]
name = "reports"
statements = ["read"]
functions = ["count", "report_*"]
action = "allow"
"""
    for sql in ["select pg_read_file('x')", "select \"pg_read_file\"('x')"]:
        assert _decide(policy, sql).rule == "no file reads", sql
    assert _decide(policy, "select count(*), report_total(1) from t").allowed
    # "Report_total" (quoted) is another function than report_total: not covered.
    assert not _decide(policy, 'select "Report_total"(1)').allowed
    for pattern in ("pg_catalog.pg_read_file", '\\"Count\\"'):
        with pytest.raises(PolicyError, match="without schema or quotes"):
            parse_policy(
                f'[[rule]]\nname = "r"\naction = "deny"\nfunctions = ["{pattern}"]\n'.encode()
            )


def test_default_allow_and_fast_path_calls() -> None:
    policy = 'default = "allow"\n[[rule]]\nname = "no code"\nstatements = ["code"]\naction = "deny"'
    engine = PolicyEngine(parse_policy(policy.encode()))
    rules = engine.rules_for("anyone", (), "r")
    assert engine.decide(rules, "drop table t").allowed
    assert not engine.decide(rules, "do $$ begin end $$").allowed
    assert not engine.decide_call(rules, 2078).allowed
    assert PolicyEngine(parse_policy(b"")).version == parse_policy(b"").version  # file hash


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("default = ", "invalid TOML"),
        ('default = "maybe"', "default"),
        ('[[rule]]\nname = "x"\naction = "deny"\nstatements = ["writes"]', "unknown statement"),
        ('[[rule]]\nname = "x"\naction = "deny"\ncolour = "red"', "rule.0.colour"),
        ('[[rule]]\nname = "x"\naction = "deny"\n[[rule]]\nname = "x"\naction = "allow"', "unique"),
        ('[[rule]]\nname = "a $x$ b"\naction = "deny"', "printable ASCII"),
        ('[[rule]]\nname = "x"', "action"),
    ],
)
def test_broken_policy_files_are_clear_errors(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(text.encode(), "p.toml")


# --- through the gateway ----------------------------------------------------------------


@pytest.fixture(scope="module")
def policy_tables(gateway_launcher: GatewayLauncher) -> None:
    cluster = gateway_launcher.cluster
    with psycopg.connect(cluster.dsn(dbname="gwtest"), autocommit=True) as conn:
        conn.execute(
            "drop table if exists policy_items, vault_secrets;"
            "create table policy_items (id int primary key, n int);"
            "create table vault_secrets (id int primary key, s text);"
            f"grant all on policy_items, vault_secrets to {SCRAM_ROLE}"
        )


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def guarded(
    start_gateway: StartGateway, policy_file: Path, policy_tables: None, tmp_path: Path
) -> Iterator[GatewayProcess]:
    yield start_gateway(
        {"policy_file": str(policy_file), "statement_log": str(tmp_path / "statements.jsonl")}
    )


def _reset(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.settings and _direct(gateway), autocommit=True) as conn:
        conn.execute("truncate policy_items, vault_secrets")


def _direct(gateway: GatewayProcess) -> str:
    upstream = gateway.settings["upstream"]
    return (
        f"host={upstream['host']} port={upstream['port']} dbname=gwtest "
        f"user={upstream['user']} password={upstream['password']}"
    )


def test_psql_refused_statement_and_the_session_goes_on(guarded: GatewayProcess) -> None:
    _reset(guarded)
    script = "insert into policy_items values (1, 1);\ndrop table policy_items;\n"
    script += "select pg_read_file('/etc/hostname');\nselect count(*) from policy_items;\n"
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-v", "VERBOSITY=verbose"], guarded.env(), input=script
    )
    assert 'ERROR:  42501: permission denied by pgwarden policy: rule "no ddl"' in result.stderr
    assert "refuses this ddl statement" in result.stderr
    assert 'rule "no server files" refuses this read statement' in result.stderr
    assert "HINT:  Server files are not readable through the gateway." in result.stderr
    assert result.stdout.splitlines() == ["INSERT 0 1", "1"], result.stdout
    with psycopg.connect(_direct(guarded)) as conn:  # the table is still there
        assert conn.execute("select count(*) from policy_items").fetchone() == (1,)
    assert wait_until(lambda: 'refused by policy test-1: rule "no ddl" (ddl)' in guarded.stderr, 10)
    log_file = Path(guarded.settings["statement_log"])

    def drop_record() -> dict[str, Any] | None:
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        records = [json.loads(line) for line in lines]
        return next((r for r in records if "drop table" in str(r.get("statement"))), None)

    assert wait_until(lambda: drop_record() is not None, 10)
    drop = drop_record()
    assert drop is not None
    assert drop["sqlstate"] == "42501"  # the log keeps the client's text


def test_psycopg_extended_protocol_with_parameters(guarded: GatewayProcess) -> None:
    _reset(guarded)
    with guarded.connect(autocommit=True) as conn:
        conn.execute("insert into policy_items values (%s, %s)", (1, 10))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no rule allows"):
            conn.execute("insert into vault_secrets values (%s, %s)", (1, "x"))
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no rule allows"):
            conn.execute("delete from vault_secrets where id = %s", (1,), prepare=True)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no server files"):
            conn.execute("select pg_read_file(%s)", ("/etc/hostname",), binary=True)
        assert conn.execute("select n from policy_items where id = %s", (1,)).fetchone() == (10,)


def test_refusal_inside_a_transaction_aborts_it_as_postgresql_would(
    guarded: GatewayProcess,
) -> None:
    _reset(guarded)
    with guarded.connect() as conn:
        conn.execute("insert into policy_items values (1, 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("drop table policy_items")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1 from policy_items")
        conn.rollback()
        assert conn.execute("select count(*) from policy_items").fetchone() == (0,)


def test_pipeline_answers_stay_in_order(guarded: GatewayProcess) -> None:
    _reset(guarded)
    with guarded.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline() as pipeline:
            first = conn.execute("insert into policy_items values (1, 1) returning id")
            pipeline.sync()
            conn.execute("truncate vault_secrets")
            conn.execute("insert into policy_items values (2, 2)")  # skipped: same sync
            pipeline.sync()
        assert first.fetchone() == (1,)
        ids = conn.execute("select id from policy_items order by id").fetchall()
        assert ids == [(1,)]


def test_asyncpg_prepared_statements(guarded: GatewayProcess) -> None:
    _reset(guarded)

    async def main() -> None:
        conn = await guarded.connect_asyncpg()
        try:
            await conn.execute("insert into policy_items values ($1, $2)", 1, 1)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="no rule"):
                await conn.execute("delete from vault_secrets where id = $1", 7)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="no ddl"):
                await conn.execute("alter table policy_items add column x int")
            assert await conn.fetchval("select n from policy_items where id = $1", 1) == 1
        finally:
            await conn.close()

    anyio.run(main)


def test_rules_follow_the_identity(guarded: GatewayProcess) -> None:
    _reset(guarded)
    with guarded.connect(
        user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD, autocommit=True
    ) as conn:
        assert conn.execute("select count(*) from vault_secrets").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no rule allows"):
            conn.execute("insert into policy_items values (1, 1)")


def test_sighup_reloads_and_a_broken_file_keeps_the_policy(
    guarded: GatewayProcess, policy_file: Path
) -> None:
    _reset(guarded)

    def insert_secret() -> Exception | None:
        try:
            with guarded.connect(autocommit=True) as conn:
                conn.execute("insert into vault_secrets values (1, 's') on conflict do nothing")
        except psycopg.errors.InsufficientPrivilege as exc:
            return exc
        return None

    assert insert_secret() is not None
    policy_file.write_text(POLICY.replace('"public.policy_*"', '"public.policy_*", "*secrets"'))
    guarded.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "statement policy test-1 reloaded" in guarded.stderr, 10)
    assert insert_secret() is None
    policy_file.write_text("default = [")
    guarded.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "statement policy not reloaded" in guarded.stderr, 10)
    assert "invalid TOML" in guarded.stderr
    assert insert_secret() is None  # the reloaded policy is still in force
    with (
        guarded.connect(autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("drop table vault_secrets")


def test_a_reload_ends_the_sessions_it_treats_otherwise(
    guarded: GatewayProcess, policy_file: Path
) -> None:
    """A statement prepared under the old policy would keep its verdict: a reload that
    changes the rules for a session ends it (57P01); sessions whose rules did not change
    go on, and new sessions get the new policy."""
    _reset(guarded)
    affected = guarded.connect(autocommit=True)
    unaffected = guarded.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD)
    affected.execute("prepare add_item as insert into policy_items values (1, 1)")
    assert unaffected.execute("select 1").fetchone() == (1,)
    policy_file.write_text(
        POLICY.replace('version = "test-1"', 'version = "test-2"').replace(
            'statements = ["read", "write", "transaction", "session"]',
            'statements = ["read", "transaction", "session"]',
        )
    )
    guarded.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "ended 1 session(s) it treats otherwise" in guarded.stderr, 10)
    with pytest.raises(psycopg.Error) as caught:
        affected.execute("execute add_item")
    assert caught.value.sqlstate == "57P01", caught.value
    assert "policy for this session changed (version test-1 to test-2)" in str(caught.value)
    assert unaffected.execute("select 2").fetchone() == (2,)
    unaffected.close()
    with (
        guarded.connect(autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("insert into policy_items values (1, 1)")
    with psycopg.connect(_direct(guarded)) as direct:
        assert direct.execute("select count(*) from policy_items").fetchone() == (0,)


def test_serve_refuses_a_broken_policy_file(
    gateway_launcher: GatewayLauncher, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('[[rule]]\nname = "x"\naction = "deny"\nstatements = ["writes"]\n')
    for path, problem in ((broken, "unknown statement class"), (tmp_path / "none", "cannot read")):
        settings = {**gateway_launcher.default_settings(), "policy_file": str(path)}
        result = run_pgwarden("serve", env=gateway_environment(settings_env(settings)))
        assert result.returncode == 2, result.stderr
        assert "invalid setting policy_file" in result.stderr and problem in result.stderr


def test_without_a_policy_nothing_is_filtered(start_gateway: StartGateway) -> None:
    gateway = start_gateway()
    with gateway.connect(autocommit=True) as conn:
        conn.execute("create temporary table t (a int)")
        conn.execute("drop table t")
    stop_and_check(gateway)


def test_refusals_reach_the_audit_with_the_decision(
    start_gateway: StartGateway, policy_file: Path, policy_tables: None, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    spans_file = tmp_path / "spans.jsonl"
    gateway = start_gateway(
        {
            "policy_file": str(policy_file),
            "audit": {
                "directory": str(directory),
                "exporter": "console",
                "export_path": str(spans_file),
                "poll_interval_ms": 50,
            },
        }
    )
    _reset(gateway)
    with gateway.connect(autocommit=True) as conn:
        conn.execute("select count(*) from policy_items")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("drop table policy_items")
        statement = conn.cursor()
        for _ in range(2):  # prepared once, refused at each execution
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                statement.execute("delete from vault_secrets where id = %s", (1,), prepare=True)

    def spans() -> list[dict[str, Any]]:
        text = spans_file.read_text() if spans_file.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def by_text(sql: str) -> list[dict[str, Any]]:
        return [s for s in spans() if s.get("attributes", {}).get("db.query.text") == sql]

    assert wait_until(lambda: len(by_text("delete from vault_secrets where id = $1")) == 2, 20)
    (allowed,) = by_text("select count(*) from policy_items")
    # Allowed by the policy its session runs under: no rule on the span, the version.
    assert allowed["attributes"]["pgwarden.policy.decision"] == "allow"
    assert allowed["attributes"]["pgwarden.policy.version"] == "test-1"
    assert "pgwarden.policy.rule" not in allowed["attributes"]
    (dropped,) = by_text("drop table policy_items")
    attributes = dropped["attributes"]
    assert attributes["pgwarden.policy.decision"] == "deny"
    assert attributes["pgwarden.policy.rule"] == "no ddl"
    assert attributes["pgwarden.policy.version"] == "test-1"
    assert attributes["db.response.status_code"] == "42501"
    assert 'rule "no ddl" refuses' in dropped["status"]["description"]
    for span in by_text("delete from vault_secrets where id = $1"):
        assert span["attributes"]["pgwarden.policy.decision"] == "deny"
        assert span["attributes"]["pgwarden.policy.rule"] == "(default)"
    session_id = attributes["pgwarden.session.id"]
    stop_and_check(gateway)
    replay = run_pgwarden("replay", session_id, "--dir", str(directory))
    assert replay.returncode == 0, replay.stderr
    assert "· deny · " in replay.stdout
    assert (
        'drop table policy_items;\nERROR:  permission denied by pgwarden policy: rule "no ddl"'
        in (replay.stdout)
    )


def test_policy_check_command(policy_file: Path, tmp_path: Path) -> None:
    def check(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_pgwarden("policy", "check", *args, stdin=stdin)

    allowed = check(str(policy_file), "--user", CLIENT_USER, "-c", "select * from policy_items")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "policy test-1, 4 rules, 0 masks, default deny" in allowed.stdout
    assert "allow  [read] select * from policy_items" in allowed.stdout
    refused = check(str(policy_file), "--user", OTHER_CLIENT_USER, stdin="select 1\ndrop table t\n")
    assert refused.returncode == 1
    assert "allow  [read] select 1" in refused.stdout
    assert 'deny   [ddl] drop table t\n       42501 (rule "no ddl")' in refused.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text("default = [")
    result = check(str(broken), "-c", "select 1")
    assert result.returncode == 2 and "invalid TOML" in result.stderr


def test_texts_differing_in_numbers_share_a_decision_but_not_explain() -> None:
    engine = PolicyEngine(parse_policy(POLICY.encode()))
    rules = engine.rules_for(CLIENT_USER, (), SCRAM_ROLE)
    assert engine.decide(rules, "select * from policy_items where id = 1").allowed
    assert engine.decide(rules, "select * from policy_items where id = 22").allowed
    assert len(engine._decisions) == 1  # one decision for both texts
    # Digits in names are kept: another table is another decision.
    assert engine.decide(rules, "select * from policy_items2 where id = 1").allowed
    assert len(engine._decisions) == 2
    assert not engine.decide(rules, "select * from vault_secrets1 where id = 1").allowed
    # EXPLAIN's options are numbers: ANALYZE 0 plans, ANALYZE 1 runs the statement.
    other = engine.rules_for(OTHER_CLIENT_USER, (), SCRAM_ROLE)
    assert engine.decide(other, "explain (analyze 0) delete from policy_items").allowed
    assert not engine.decide(other, "explain (analyze 1) delete from policy_items").allowed
    # Subjects with the same rules share their decisions.
    assert engine.rules_for("carol", (), SCRAM_ROLE) is engine.rules_for("dave", (), "x")


def test_bulk_texts_are_decided_but_not_kept() -> None:
    from pgwarden.policy import analysis

    engine = PolicyEngine(parse_policy(POLICY.encode()))
    rules = engine.rules_for(CLIENT_USER, (), SCRAM_ROLE)
    rows = ",".join(f"({i}, '{'x' * 40}{i}')" for i in range(1000))
    bulk = f"insert into policy_items values {rows}"
    assert len(bulk) > analysis.CACHED_TEXT_CHARS
    before = analysis._analyse_cached.cache_info().currsize
    assert engine.decide(rules, bulk).allowed
    assert not engine.decide(rules, bulk.replace("policy_items", "vault_secrets")).allowed
    assert analysis._analyse_cached.cache_info().currsize == before
    assert not engine._decisions


def test_the_example_policy_in_deploy_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "deploy" / "policy.example.toml"
    engine = PolicyEngine(parse_policy(example.read_bytes(), str(example)))
    agents = engine.rules_for("someone", ("agents",), "app_ro")
    assert engine.decide(agents, "select * from app.orders").allowed
    assert not engine.decide(agents, "delete from app.orders").allowed
    assert not engine.decide(agents, "select pg_read_file('/etc/passwd')").allowed
    service = engine.rules_for("svc", (), "app_rw")
    assert engine.decide(service, "update app.orders set status = 'paid' where id = 1").allowed
    assert not engine.decide(service, "drop table app.orders").allowed


def test_a_refused_fast_path_call_ends_the_session(guarded: GatewayProcess, tmp_path: Path) -> None:
    # psql's \lo_import writes the large object through libpq's fast-path interface
    # (FunctionCall messages): a code statement the policy cannot name, refused here.
    source = tmp_path / "blob.txt"
    source.write_text("contents")
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-v", "VERBOSITY=verbose", "-c", f"\\lo_import {source}"],
        guarded.env(),
    )
    assert result.returncode != 0
    assert (
        'FATAL:  42501: permission denied by pgwarden policy: rule "no ddl" refuses this code '
        "statement" in result.stderr
    ), result.stderr
    # The gateway's log is read by a thread of the harness: it may lag the client.
    assert wait_until(lambda: "refused a fast-path call" in guarded.stderr, 10), guarded.stderr
    with guarded.connect(autocommit=True) as conn:  # other sessions go on
        assert conn.execute("select count(*) from policy_items").fetchone() is not None

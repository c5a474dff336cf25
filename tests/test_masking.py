"""Column masking: the policy's masked columns come back masked to the identities they
apply to, with psql, psycopg (text and binary, prepared), asyncpg and a raw client; the
statements that would read them around the mask are refused with 42501; others see the
real values; the session recording holds what the caller saw."""

from __future__ import annotations

import base64
import json
import re
import signal
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import psycopg
import pytest

import pgproto
from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    OTHER_CLIENT_PASSWORD,
    OTHER_CLIENT_USER,
    SCRAM_ROLE,
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    run_pgwarden,
    run_tool,
    wait_until,
)
from pgwarden.audit.recording import INDEX
from pgwarden.policy.mask_catalog import lookup_sql
from pgwarden.policy.mask_check import MaskScope, refusal_reason
from pgwarden.policy.mask_watch import APPLICATION_NAME
from pgwarden.policy.names import parse_column
from pgwarden.policy.rules import PolicyError, parse_policy

POLICY = f"""
default = "allow"
version = "mask-1"

[[mask]]
name = "customer contact"
columns = ["public.mask_customers.email", "public.mask_customers.phone",
           "public.mask_customers.ssn_last4"]
users = ["{CLIENT_USER}"]

[[mask]]
name = "notes vanish"
columns = ["public.mask_customers.note"]
users = ["{CLIENT_USER}"]
style = "null"
"""

ROWS = [
    (1, "Ada", "ada@example.com", "+44 20 7946 0001", 1234, "vip"),
    (2, "Grace", "grace@example.com", None, 5678, None),
]
MASKED = [
    (1, "Ada", "****", "****", None, None),
    (2, "Grace", "****", None, None, None),
]


@pytest.fixture(scope="module")
def mask_tables(gateway_launcher: GatewayLauncher) -> None:
    cluster = gateway_launcher.cluster
    with psycopg.connect(cluster.dsn(dbname="gwtest"), autocommit=True) as conn:
        conn.execute(
            "drop view if exists mask_contacts, mask_contacts2;"
            "drop table if exists mask_customers, mask_copy;"
            "create table mask_customers (id int primary key, name text not null, email text,"
            " phone varchar(20), ssn_last4 int, note text);"
            "create table mask_copy (v text);"
            "create view mask_contacts as select id, email from mask_customers;"
            "create view mask_contacts2 as select * from mask_contacts;"
            f"grant all on mask_customers, mask_copy, mask_contacts, mask_contacts2 to {SCRAM_ROLE}"
        )
        with conn.cursor() as cur:
            cur.executemany("insert into mask_customers values (%s, %s, %s, %s, %s, %s)", ROWS)


@pytest.fixture
def masked(
    start_gateway: StartGateway, mask_tables: None, tmp_path: Path
) -> Iterator[GatewayProcess]:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    yield start_gateway({"policy_file": str(policy)})


SELECT_ALL = "select * from mask_customers order by id"


@dataclass
class Scratch:
    """A test's own tables beside the module's, and a gateway masking some of their
    columns; the tables are dropped when the test ends."""

    admin: psycopg.Connection[Any]
    start_gateway: StartGateway
    tmp_path: Path
    drop: str = ""

    def tables(self, drop: str, create: str) -> None:
        self.drop = drop
        self.admin.execute(f"{drop};{create}")

    def gateway(self, columns: str, more: str = "", **settings: Any) -> GatewayProcess:
        """A gateway whose second mask ("notes vanish", NULL) covers ``columns`` (TOML
        strings) instead of the note, with ``more`` of its keys."""
        policy = self.tmp_path / "policy.toml"
        policy.write_text(POLICY.replace('"public.mask_customers.note"]', f"{columns}]") + more)
        return self.start_gateway({"policy_file": str(policy), **settings})


@pytest.fixture
def scratch(
    start_gateway: StartGateway,
    gateway_launcher: GatewayLauncher,
    mask_tables: None,
    tmp_path: Path,
) -> Iterator[Scratch]:
    dsn = gateway_launcher.cluster.dsn(dbname="gwtest")
    with psycopg.connect(dsn, autocommit=True) as admin:
        made = Scratch(admin, start_gateway, tmp_path)
        try:
            yield made
        finally:
            if made.drop:
                admin.execute(made.drop)


def test_psql_sees_masked_values_and_refused_workarounds(masked: GatewayProcess) -> None:
    script = "\n".join(
        [
            SELECT_ALL + ";",
            "select lower(email) from mask_customers;",
            "select id from mask_customers where email like 'ada%';",
            "\\copy mask_customers to stdout",
            "select * from mask_contacts;",
            "select count(*) from mask_customers;",
            "select table_to_xml('mask_customers', true, false, '');",
        ]
    )
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-F", ",", "-v", "VERBOSITY=verbose"],
        masked.env(),
        input=script,
    )
    lines = result.stdout.splitlines()
    assert lines == ["1,Ada,****,****,,", "2,Grace,****,,,", "2"], result.stdout
    errors = result.stderr
    assert "ERROR:  42501: permission denied by pgwarden masking: email is used in an " in errors
    assert "email is used in WHERE (public.mask_customers)" in errors
    assert "COPY TO sends masked columns as CopyData" in errors
    assert "the view public.mask_contacts reads masked columns" in errors
    assert "HINT:  Masked columns can be selected as they are" in errors
    assert "cannot call table_to_xml: what it reads is out of the gateway's sight" in errors
    assert "ada@" not in result.stdout


def test_other_identities_see_the_real_values(masked: GatewayProcess) -> None:
    with masked.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        assert conn.execute(SELECT_ALL).fetchall() == ROWS
        assert conn.execute("select lower(email) from mask_customers where id = 1").fetchone() == (
            "ada@example.com",
        )


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("prepare", [False, True])
def test_psycopg_extended_protocol(masked: GatewayProcess, binary: bool, prepare: bool) -> None:
    with masked.connect(autocommit=True) as conn:
        for _ in range(3):  # prepared: executed again without a new Parse
            rows = conn.execute(
                "select * from mask_customers where id >= %s order by id",
                (1,),
                binary=binary,
                prepare=prepare,
            ).fetchall()
            assert rows == MASKED
        # Plain columns keep their origin through subqueries, WITH queries and joins.
        got = conn.execute(
            "with c as (select id, email from mask_customers)"
            " select s.e, c.email from (select id, email as e from mask_customers) s"
            " join c using (id) where s.id = %s",
            (2,),
            binary=binary,
        ).fetchone()
        assert got == ("****", "****")
        for sql in [
            "select email || '' from mask_customers where id = %s",
            "select row_to_json(c) from mask_customers c where id = %s",
            "select email from mask_customers where id = %s union select 'x'",
            "select (select email from mask_customers where id = %s)",
            "select id from mask_customers where id = %s order by email",
            "insert into mask_copy select email from mask_customers where id = %s",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgwarden masking"):
                conn.execute(sql, (1,), binary=binary)
        assert conn.execute("select count(*) from mask_copy").fetchone() == (0,)


def test_asyncpg_executes_described_statements(masked: GatewayProcess) -> None:
    async def main() -> None:
        conn = await masked.connect_asyncpg()
        try:
            for _ in range(2):  # the second time from asyncpg's statement cache
                rows = await conn.fetch(SELECT_ALL)
                assert [tuple(r) for r in rows] == MASKED
            stmt = await conn.prepare("select email, ssn_last4 from mask_customers where id = $1")
            assert tuple(await stmt.fetchrow(1)) == ("****", None)
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError, match="masking"):
                await conn.fetch("select to_jsonb(c.*) from mask_customers c")
            assert await conn.fetchval("select name from mask_customers where id = $1", 2) == (
                "Grace"
            )
        finally:
            await conn.close()

    anyio.run(main)


def _rows(messages: list[pgproto.Message]) -> list[list[bytes | None]]:
    out = []
    for m in messages:
        if m.tag != b"D":
            continue
        (count,) = struct.unpack_from("!h", m.body)
        at, values = 2, []
        for _ in range(count):
            (length,) = struct.unpack_from("!i", m.body, at)
            at += 4
            values.append(None if length < 0 else m.body[at : at + length])
            at += max(length, 0)
        out.append(values)
    return out


def test_errors_about_a_masked_table_keep_their_detail_to_themselves(
    masked: GatewayProcess,
) -> None:
    """A constraint violation's DETAIL shows the failing row ("Failing row contains (1,
    null, ada@example.com, ...)"): for a masked table it is withheld."""
    with masked.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.NotNullViolation) as caught:
            conn.execute("update mask_customers set name = null where id = 1")
        diag = caught.value.diag
        assert diag.message_detail is not None
        assert "withheld" in diag.message_detail and "ada@" not in diag.message_detail
        assert diag.table_name == "mask_customers" and diag.column_name == "name"
    with masked.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        with pytest.raises(psycopg.errors.NotNullViolation) as caught:
            conn.execute("update mask_customers set name = null where id = 1")
        assert "ada@example.com" in (caught.value.diag.message_detail or "")


STATS_SQL = (
    "select tablename, attname, most_common_vals, histogram_bounds from pg_stats"
    " where tablename in ('mask_customers', 'mask_owned') and attname in ('email', 'kind')"
    " order by 1, 2"
)
STATS_EXT_SQL = "select most_common_vals from pg_stats_ext where statistics_name = 'mask_owned_st'"


@pytest.fixture
def analysed(gateway_launcher: GatewayLauncher, mask_tables: None) -> Iterator[None]:
    """The masked table analysed, and a table the session's role owns with extended
    (MCV) statistics: pg_stats_ext shows a table's statistics to its owner only."""
    with psycopg.connect(gateway_launcher.cluster.dsn(dbname="gwtest"), autocommit=True) as conn:
        conn.execute(
            "drop table if exists mask_owned;"
            "create table mask_owned (kind text, size int);"
            "insert into mask_owned select 'k' || (i % 3), i % 2 from generate_series(1, 300) i;"
            f"alter table mask_owned owner to {SCRAM_ROLE};"
            "create statistics mask_owned_st (mcv) on kind, size from mask_owned;"
            "analyze mask_customers, mask_owned"
        )
        yield
        conn.execute("drop table mask_owned")


def test_statistics_views_do_not_show_sample_values(masked: GatewayProcess, analysed: None) -> None:
    """pg_stats (most common values, histogram bounds) and pg_stats_ext hold sample values
    of the columns a role may read: a session with masks sees them NULL and cannot compute
    with them; a session without masks sees them."""
    with masked.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        rows = conn.execute(STATS_SQL).fetchall()
        assert [r[:2] for r in rows] == [("mask_customers", "email"), ("mask_owned", "kind")]
        assert "ada@example.com" in str(rows[0][3]) and "k1" in str(rows[1][2])
        assert "k1" in str(conn.execute(STATS_EXT_SQL).fetchone())
        (own,) = conn.execute(
            "select query from pg_stat_activity where pid = pg_backend_pid()"
        ).fetchone()
        assert "pg_stat_activity" in own
    with masked.connect(autocommit=True) as conn:
        rows = conn.execute(STATS_SQL).fetchall()
        assert rows == [
            ("mask_customers", "email", None, None),
            ("mask_owned", "kind", None, None),
        ]
        assert conn.execute(STATS_EXT_SQL).fetchall() == [(None,)]
        for sql in (
            "select histogram_bounds::text from pg_stats",
            "select array_to_string(most_common_vals, ',') from pg_catalog.pg_stats_ext",
            "select attname from pg_stats where most_common_vals is not null",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgwarden masking"):
                conn.execute(sql)
        # Other sessions' statements, literals included, are masked too.
        assert conn.execute(
            "select query from pg_stat_activity where pid = pg_backend_pid()"
        ).fetchall() == [(None,)]
        # The rest of the view stays readable.
        assert conn.execute(
            "select null_frac, n_distinct from pg_stats"
            " where tablename = 'mask_owned' and attname = 'size'"
        ).fetchone() == (0.0, 2.0)


def test_pg_stat_statements_does_not_show_statement_texts(
    masked: GatewayProcess, gateway_launcher: GatewayLauncher
) -> None:
    """The extension keeps utility statements' texts with their literals, and shows a
    role's statements to its other sessions."""
    dsn = gateway_launcher.cluster.dsn(dbname="gwtest")
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("create extension if not exists pg_stat_statements")
    secret = "select 'ada@example.com' as e into temp mask_stmt_secret"
    with masked.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        conn.execute(secret)
        seen = conn.execute("select query from pg_stat_statements").fetchall()
        assert (secret,) in seen  # the unmasked identity of the same role sees it
    with masked.connect(autocommit=True) as conn:
        rows = conn.execute("select calls, query from pg_stat_statements").fetchall()
        assert rows and all(query is None for _, query in rows)
        for sql in [
            "select query from pg_stat_statements(true)",
            "select upper(query) from pg_stat_statements",
            "select calls from pg_stat_statements where query like '%ada%'",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgwarden masking"):
                conn.execute(sql)


def test_the_statement_log_names_the_masked_columns(
    start_gateway: StartGateway, mask_tables: None, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    log_path = tmp_path / "statements.jsonl"
    gateway = start_gateway({"policy_file": str(policy), "statement_log": str(log_path)})
    with gateway.connect(autocommit=True) as conn:
        conn.execute("select name, email from mask_customers where id = 1").fetchall()
        conn.execute("select name from mask_customers where id = 1").fetchall()

    def records() -> list[dict[str, object]]:
        if not log_path.exists():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines()]

    assert wait_until(lambda: len(records()) >= 2, 10)
    masked, plain = records()[-2:]
    assert masked["masked_columns"] == ["public.mask_customers.email"]
    assert plain["masked_columns"] is None


def test_pg_dump_cannot_copy_a_masked_table_out(masked: GatewayProcess) -> None:
    result = run_tool(["pg_dump", "--data-only", "-t", "mask_customers"], masked.env())
    assert result.returncode != 0
    assert "permission denied by pgwarden masking: COPY TO sends masked columns" in result.stderr
    assert "ada@example.com" not in result.stdout
    other = run_tool(
        ["pg_dump", "--data-only", "-t", "mask_customers"],
        masked.env(OTHER_CLIENT_USER, OTHER_CLIENT_PASSWORD),
    )
    assert other.returncode == 0 and "ada@example.com" in other.stdout, other.stderr


def test_pipelined_statements_are_masked_in_order(masked: GatewayProcess) -> None:
    with masked.connect(autocommit=True) as conn, conn.pipeline():
        cursors = [
            conn.execute("select email from mask_customers where id = %s", (1,)),
            conn.execute("select name from mask_customers where id = %s", (1,)),
            conn.execute("select phone, id from mask_customers where id = %s", (1,), binary=True),
        ]
        results = [c.fetchall() for c in cursors]
    assert results == [[("****",)], [("Ada",)], [("****", 1)]]


def _function_call(oid: int, *text_args: str) -> bytes:
    """A fast-path FunctionCall message: text arguments, text result."""
    body = struct.pack("!IhhH", oid, 1, 0, len(text_args))
    for arg in text_args:
        body += struct.pack("!i", len(arg.encode())) + arg.encode()
    return pgproto.message(b"F", body + struct.pack("!h", 0))


def test_a_fast_path_call_ends_a_masked_session(masked: GatewayProcess) -> None:
    """A fast-path call of table_to_xml answers with a FunctionCallResponse holding the
    table, no row to mask: a session with masks is ended at its first such call; a
    session without masks makes it."""
    with masked.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        (oid,) = conn.execute("select 'pg_catalog.table_to_xml'::regproc::oid").fetchone()
    call = _function_call(oid, "mask_customers", "t", "f", "")
    other = pgproto.RawConnection.open(masked.host, masked.port)
    other.startup(OTHER_CLIENT_USER, "gwtest")
    other.authenticate(OTHER_CLIENT_PASSWORD)
    other.send(call)
    replies = other.read_until(b"Z")
    assert [m.tag for m in replies] == [b"V", b"Z"]
    assert b"ada@example.com" in replies[0].body
    other.close()
    conn = pgproto.RawConnection.open(masked.host, masked.port)
    conn.startup(CLIENT_USER, "gwtest")
    conn.authenticate(CLIENT_PASSWORD)
    conn.send(call)
    error = conn.read_error_or_close()
    assert error is not None and error.sqlstate == "42501"
    assert "cannot make fast-path function calls" in error.fields["M"]
    assert conn.read_error_or_close() is None  # the session is over
    assert wait_until(lambda: "refused a fast-path call (by masking" in masked.stderr, 5)


def test_each_execution_is_masked_by_the_columns_the_server_has_now(
    masked: GatewayProcess,
) -> None:
    """A client that executes without describing, or executes again a statement it
    described once, is masked by the portal's columns as the server has them at that
    execution (the gateway describes the portal itself): a description made earlier
    can go stale when the statement is planned again against another table of the same
    name, or when an EXECUTE or FETCH it runs points elsewhere."""
    conn = pgproto.RawConnection.open(masked.host, masked.port)
    conn.startup(CLIENT_USER, "gwtest")
    conn.authenticate(CLIENT_PASSWORD)
    run = pgproto.bind(statement="s") + pgproto.execute() + pgproto.sync()
    # Never described.
    conn.send(
        pgproto.parse("select id, email from mask_customers where id = 1")
        + pgproto.bind()
        + pgproto.execute()
        + pgproto.sync()
    )
    assert _rows(conn.read_until(b"Z")) == [[b"1", b"****"]]
    # Described against a decoy that shadows the masked table, executed after the decoy
    # is gone: PostgreSQL plans the statement again, now on the masked table, with the
    # same result columns.
    conn.simple_query(
        "create temp table pg_temp.mask_customers (id int, email text);"
        "insert into pg_temp.mask_customers values (1, 'decoy')"
    )
    conn.send(
        pgproto.parse("select id, email from mask_customers where id = 1", name="s")
        + pgproto.describe_statement("s")
        + pgproto.sync()
    )
    conn.read_until(b"Z")
    conn.send(run)
    assert _rows(conn.read_until(b"Z")) == [[b"1", b"decoy"]]
    conn.simple_query("drop table pg_temp.mask_customers")
    conn.send(run)
    assert _rows(conn.read_until(b"Z")) == [[b"1", b"****"]]
    # An EXECUTE described while its prepared statement read other columns.
    conn.simple_query("prepare p as select id, name from mask_customers where id = 1")
    conn.send(
        pgproto.parse("execute p", name="e") + pgproto.describe_statement("e") + pgproto.sync()
    )
    conn.read_until(b"Z")
    conn.simple_query(
        "deallocate p; prepare p as select id, email from mask_customers where id = 1"
    )
    conn.send(pgproto.bind(statement="e") + pgproto.execute() + pgproto.sync())
    assert _rows(conn.read_until(b"Z")) == [[b"1", b"****"]]
    # Described by portal right before its execution: used as it is.
    conn.send(
        pgproto.parse("select id, email from mask_customers where id = 1")
        + pgproto.bind()
        + pgproto.describe_portal()
        + pgproto.execute()
        + pgproto.sync()
    )
    replies = conn.read_until(b"Z")
    assert [m.tag for m in replies].count(b"T") == 1
    assert _rows(replies) == [[b"1", b"****"]]
    conn.send(pgproto.terminate())


def test_cursors_and_sql_prepared_statements(masked: GatewayProcess) -> None:
    with masked.connect() as conn:
        conn.execute("declare c cursor for select id, email from mask_customers order by id")
        assert conn.execute("fetch all from c").fetchall() == [(1, "****"), (2, "****")]
        conn.rollback()
        conn.execute("prepare p as select email, note from mask_customers where id = 1")
        assert conn.execute("execute p").fetchone() == ("****", None)
    with masked.connect() as conn, conn.cursor(name="server_side") as cur:
        cur.execute("select email from mask_customers order by id")
        assert cur.fetchall() == [("****",), ("****",)]


def test_the_audit_holds_what_the_caller_saw(
    start_gateway: StartGateway, mask_tables: None, tmp_path: Path
) -> None:
    """The session recording is taken after masking: the replay shows the masked values,
    and no real value of a masked column is anywhere in the spool or the spans; the
    statement's span names the columns it masked."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    directory = tmp_path / "audit"
    export = tmp_path / "trail.jsonl"
    gateway = start_gateway(
        {
            "policy_file": str(policy),
            "audit": {
                "directory": str(directory),
                "exporter": "console",
                "export_path": str(export),
                "poll_interval_ms": 50,
            },
        }
    )
    with gateway.connect(autocommit=True) as conn:
        assert conn.execute(SELECT_ALL).fetchall() == MASKED
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select upper(email) from mask_customers")

    def recorded() -> list[str]:
        return [
            line.split()[0]
            for index in directory.glob(f"recorded/*/{INDEX}")
            for line in index.read_text().splitlines()
        ]

    assert wait_until(lambda: bool(recorded()) and export.exists(), 30)
    (session,) = recorded()
    assert wait_until(
        lambda: "upper(email)" in run_pgwarden("replay", session, "--dir", str(directory)).stdout,
        30,
    )
    transcript = run_pgwarden("replay", session, "--dir", str(directory)).stdout
    assert "ada@example.com" not in transcript
    assert "  1 | Ada   | ****  | ****  |           | " in transcript, transcript
    assert " · masked public.mask_customers.email, public.mask_customers.phone," in transcript
    assert "deny" in transcript and "permission denied by pgwarden masking" in transcript
    spans = [json.loads(x) for x in export.read_text().splitlines() if x.startswith("{")]
    (select,) = [s for s in spans if s["attributes"].get("db.query.text") == SELECT_ALL]
    assert select["attributes"]["pgwarden.masked_columns"] == [
        f"public.mask_customers.{c}" for c in ("email", "phone", "ssn_last4", "note")
    ]
    # Allowed by the policy the session ran under; refused by the masking check.
    assert select["attributes"]["pgwarden.policy.decision"] == "allow"
    assert select["attributes"]["pgwarden.policy.version"] == "mask-1"
    (refused,) = [s for s in spans if "upper(email)" in s["attributes"].get("db.query.text", "")]
    assert refused["attributes"]["pgwarden.policy.decision"] == "deny"
    assert refused["attributes"]["pgwarden.policy.rule"] == "(masking)"
    (session_span,) = [s for s in spans if "pgwarden.session.end_reason" in s["attributes"]]
    assert session_span["attributes"]["pgwarden.policy.version"] == "mask-1"
    stored = b"".join(p.read_bytes() for p in directory.rglob("*") if p.is_file())
    stored += export.read_bytes()
    # The recorded results are base64 inside the records: decode every one of them.
    results = []
    for line in stored.replace(b"\0", b"").splitlines():
        if not line.startswith(b"{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for field in ("result", "columns"):
            if isinstance(record, dict) and isinstance(record.get(field), str):
                results.append(base64.b64decode(record[field]))
    assert any(b"****" in r for r in results), "no recorded result found"
    for secret in (b"ada@example.com", b"grace@example.com", b"+44 20 7946", b"1234", b"vip"):
        assert secret not in stored
        assert not any(secret in r for r in results)


def test_children_and_partitions_are_masked_and_masked_tables_keep_their_names(
    scratch: Scratch,
) -> None:
    scratch.tables(
        "drop table if exists mask_parts, mask_kid, mask_ev",
        "create table mask_parts (id int, email text) partition by range (id);"
        # Only one partition masked: its parent returns its rows too.
        "create table mask_ev (id int, email text) partition by range (id);"
        "create table mask_ev_hot partition of mask_ev for values from (0) to (100);"
        "create table mask_ev_cold partition of mask_ev for values from (100) to (200);"
        "insert into mask_ev values (1, 'hot@example.com'), (150, 'cold@example.com');"
        f"grant select on mask_ev, mask_ev_hot, mask_ev_cold to {SCRAM_ROLE};"
        "create table mask_parts_low partition of mask_parts for values from (0) to (100);"
        "create table mask_kid (extra int, email text) inherits (mask_customers);"
        "insert into mask_parts values (1, 'p@example.com');"
        f"grant select on mask_parts, mask_parts_low, mask_kid to {SCRAM_ROLE}",
    )
    gateway = scratch.gateway('"public.mask_parts.email", "public.mask_ev_hot.email"')
    scratch.admin.execute("insert into mask_kid values (9, 'Kid', 'kid@example.com')")
    with gateway.connect(autocommit=True) as conn:
        # The child's email is at another attribute number than the parent's.
        assert conn.execute("select name, email from mask_kid").fetchall() == [("Kid", "****")]
        assert conn.execute("select * from mask_parts_low").fetchall() == [(1, None)]
        assert conn.execute("select email from mask_parts").fetchall() == [(None,)]
        assert conn.execute("select id, email from mask_ev order by id").fetchall() == [
            (1, None),
            (150, None),
        ]
        assert conn.execute("table mask_ev_hot").fetchall() == [(1, None)]
        assert conn.execute("table mask_ev_cold").fetchall() == [(150, "cold@example.com")]
        for sql in [
            "alter table mask_customers rename column email to contact",
            "alter table mask_customers rename to mask_people",
            "create table mask_child () inherits (mask_customers)",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masked table"):
                conn.execute(sql)


def test_quoted_mixed_case_names_are_masked_and_guarded(scratch: Scratch) -> None:
    # Tables an ORM creates ("Person", "eMail"), and a view and an inheritance child of
    # a lower-case masked table with quoted names: the catalog keeps their case.
    scratch.tables(
        'drop view if exists "Mask_View"; drop table if exists "Mask_Person", "Mask_Kid"',
        'create table "Mask_Person" (id int, "eMail" text, name text);'
        """insert into "Mask_Person" values (1, 'p@example.com', 'Pat');"""
        'create view "Mask_View" as select id, email from mask_customers;'
        'create table "Mask_Kid" () inherits (mask_customers);'
        """insert into "Mask_Kid" values (7, 'Kid', 'kid@example.com');"""
        f'grant select on "Mask_Person", "Mask_View", "Mask_Kid" to {SCRAM_ROLE}',
    )
    gateway = scratch.gateway('"public.mask_customers.note", \'public."Mask_Person"."eMail"\'')
    with gateway.connect(autocommit=True) as conn:
        assert conn.execute('select * from "Mask_Person"').fetchall() == [(1, None, "Pat")]
        assert conn.execute('select name, email from "Mask_Kid"').fetchall() == [("Kid", "****")]
        for sql, reason in [
            ('select upper("eMail") from "Mask_Person"', "used in an expression"),
            ('select id from public."Mask_Person" where "eMail" > \'\'', "WHERE"),
            ('select upper(email) from "Mask_Kid"', "used in an expression"),
            ('select * from "Mask_View"', 'the view public."Mask_View" reads masked'),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=reason):
                conn.execute(sql)
    with gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        assert conn.execute('select "eMail" from "Mask_Person"').fetchall() == [("p@example.com",)]
        assert conn.execute('select email from "Mask_View" order by id').fetchall() == [
            ("ada@example.com",),
            ("grace@example.com",),
            ("kid@example.com",),
        ]


def test_sessions_end_when_their_masked_relations_change(scratch: Scratch) -> None:
    scratch.tables(
        "drop table if exists mask_w, mask_w_other, mask_w_renamed;"
        " drop function if exists mask_w_fn",
        "create table mask_w (id int, email text) partition by list (id);"
        "create table mask_w_1 partition of mask_w for values in (1);"
        "insert into mask_w values (1, 'one@example.com');"
        f"grant select on mask_w, mask_w_1 to {SCRAM_ROLE}",
    )
    gateway = scratch.gateway('"public.mask_w.email"', mask_recheck_seconds=0.3)

    def ended(conn: psycopg.Connection[Any], change: str) -> None:
        with pytest.raises(psycopg.errors.AdminShutdown, match=change):
            for _ in range(50):
                conn.execute("select 1")
                time.sleep(0.1)

    masked = gateway.connect(autocommit=True)
    plain = gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD, autocommit=True)
    assert masked.execute("select * from mask_w").fetchall() == [(1, None)]
    # DDL that touches no masked relation leaves the session alone; a new function is
    # refused to it from the next recheck on.
    scratch.admin.execute(
        "create table mask_w_other (id int, email text);"
        "create function mask_w_fn() returns int language sql as 'select 1';"
        f"grant execute on function mask_w_fn to {SCRAM_ROLE}"
    )
    time.sleep(1.0)
    assert masked.execute("select email from mask_w_1").fetchall() == [(None,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot call mask_w_fn"):
        masked.execute("select mask_w_fn()")

    # The gateway's lookup connection, lost, is replaced at the next round.
    lost = scratch.admin.execute(
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s",
        (APPLICATION_NAME,),
    ).fetchall()
    assert lost == [(True,)]
    # A new partition: selected directly, its rows carry its own OID.
    scratch.admin.execute(
        "create table mask_w_2 partition of mask_w for values in (2);"
        "insert into mask_w values (2, 'two@example.com');"
        f"grant select on mask_w_2 to {SCRAM_ROLE}"
    )
    ended(masked, r"relations masked for this session changed \(public\.mask_w_2\.email\)")
    with gateway.connect(autocommit=True) as again:  # no stale lookup for it
        assert again.execute("table mask_w_2").fetchall() == [(2, None)]
        assert again.execute("select email from mask_w order by id").fetchall() == [
            (None,),
            (None,),
        ]
        # The masked table dropped and created again by a migration.
        scratch.admin.execute(
            "drop table mask_w; create table mask_w (id int, email text);"
            "insert into mask_w values (3, 'three@example.com');"
            f"grant select on mask_w to {SCRAM_ROLE}"
        )
        ended(again, r"changed \(public\.mask_w\.email")
    with gateway.connect(autocommit=True) as third:
        assert third.execute("table mask_w").fetchall() == [(3, None)]
        # Sessions without masks are not concerned.
        assert plain.execute("select email from mask_w").fetchall() == [("three@example.com",)]
        # Renamed by a migration: the gateway keeps the table masked by its OID, ends
        # the sessions that knew it by its old name, and tells the operator.
        scratch.admin.execute("alter table mask_w rename to mask_w_renamed")
        ended(third, r"changed \(public\.mask_w\.email, public\.mask_w_renamed\.email\)")
    assert wait_until(
        lambda: "masks public.mask_w.email, which database gwtest does not have" in gateway.stderr,
        5,
    ), gateway.stderr
    with gateway.connect(autocommit=True) as fourth:
        assert fourth.execute("table mask_w_renamed").fetchall() == [(3, None)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="used in an expression"):
            fourth.execute("select upper(email) from mask_w_renamed")
    plain.close()
    masked.close()
    assert gateway.alive()


def test_writes_that_would_tell_whether_a_masked_value_exists_are_refused(scratch: Scratch) -> None:
    scratch.tables(
        "drop table if exists mask_orders, mask_accounts, mask_logins",
        "create table mask_accounts (id int primary key, email text unique, name text);"
        "create table mask_orders"
        " (id int, account_email text references mask_accounts (email));"
        "create table mask_logins (id int, login text, note text);"
        "create unique index on mask_logins (lower(login));"
        "insert into mask_accounts values (1, 'ada@example.com', 'Ada');"
        "insert into mask_logins values (1, 'Ada', 'n');"
        f"grant all on mask_accounts, mask_orders, mask_logins to {SCRAM_ROLE}",
    )
    gateway = scratch.gateway('"public.mask_accounts.email", "public.mask_logins.login"')
    with gateway.connect(autocommit=True) as conn:
        for sql, why in [
            (
                "insert into mask_accounts (id, email) values (2, 'ada@example.com')",
                "writing email of mask_accounts would tell whether a value of a masked"
                " column exists (unique index mask_accounts_email_key)",
            ),
            (
                "insert into mask_accounts values (2, 'ada@example.com')",
                "unique index mask_accounts_email_key",
            ),
            (
                "insert into mask_accounts (id) values (2)"
                " on conflict (id) do update set email = 'ada@example.com'",
                "writing email",
            ),
            ("update mask_accounts set email = 'x@example.com' where id = 1", "email"),
            (
                "insert into mask_orders values (1, 'ada@example.com')",
                "writing account_email of mask_orders would tell whether a value of a "
                "masked column exists (foreign key mask_orders_account_email_fkey)",
            ),
            (
                "with w as (insert into mask_orders (account_email) values ('a')"
                " returning id) select * from w",
                "account_email",
            ),
            ("update mask_logins set login = 'ADA' where id = 1", "mask_logins_lower_idx"),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match=re.escape(why)):
                conn.execute(sql)
        with (
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="writing email"),
            conn.cursor().copy("copy mask_accounts from stdin") as copy,
        ):
            copy.write_row((3, "grace@example.com", "Grace"))
        # Writes that set none of those columns go through.
        conn.execute("insert into mask_accounts (id, name) values (2, 'Bob')")
        conn.execute("update mask_accounts set name = 'Bobby' where id = 2")
        conn.execute("insert into mask_orders (id) values (7)")
        conn.execute("update mask_logins set note = 'm' where id = 1")
        assert conn.execute("select * from mask_accounts order by id").fetchall() == [
            (1, None, "Ada"),  # the "notes vanish" mask: NULL
            (2, None, "Bobby"),
        ]
    # Unmasked, the same write is the oracle the refusal closes.
    with (
        gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn,
        pytest.raises(psycopg.errors.UniqueViolation),
    ):
        conn.execute("insert into mask_accounts (id, email) values (5, 'ada@example.com')")


def test_functions_defined_in_the_database_are_refused_unless_trusted(scratch: Scratch) -> None:
    scratch.tables(
        "drop view if exists mask_fn_view2, mask_fn_view, mask_fn_safe_view;"
        " drop function if exists mask_fn_email, mask_fn_safe; drop procedure if exists mask_proc",
        "create function mask_fn_email(i int) returns text language plpgsql"
        " as $$ begin return (select email from mask_customers where id = i); end $$;"
        "create function mask_fn_safe() returns int language sql as 'select 42';"
        "create procedure mask_proc() language plpgsql"
        " as $$ begin raise notice '%', (select email from mask_customers limit 1); end $$;"
        f"grant execute on function mask_fn_email, mask_fn_safe to {SCRAM_ROLE};"
        f"grant execute on procedure mask_proc to {SCRAM_ROLE};"
        # A view calling the function, and one over that view: the body is as opaque.
        "create view mask_fn_view as select id, mask_fn_email(id) as e from mask_customers;"
        "create view mask_fn_view2 as select e from mask_fn_view;"
        "create view mask_fn_safe_view as select mask_fn_safe() as n;"
        f"grant select on mask_fn_view, mask_fn_view2, mask_fn_safe_view to {SCRAM_ROLE}",
    )
    gateway = scratch.gateway(
        '"public.mask_customers.note"', more='trusted_functions = ["public.mask_fn_s*"]\n'
    )
    with gateway.connect(autocommit=True) as conn:
        for sql, name in [
            ("select mask_fn_email(1)", "mask_fn_email"),
            ("select * from public.mask_fn_email(2)", "public.mask_fn_email"),
            ("select id from mask_copy where v = mask_fn_email(1)", "mask_fn_email"),
            ("call mask_proc()", "mask_proc"),
        ]:
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege,
                match=f"a session with masked columns cannot call {re.escape(name)}: a function",
            ):
                conn.execute(sql)
        for view in ["mask_fn_view", "mask_fn_view2"]:
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege,
                match=f"the view public.{view} calls public.mask_fn_email, a function defined",
            ):
                conn.execute(f"select * from {view}")
        assert conn.execute("select mask_fn_safe()").fetchone() == (42,)  # trusted
        assert conn.execute("table mask_fn_safe_view").fetchone() == (42,)
        assert conn.execute(
            "select upper(name), now() is not null from mask_customers where id = 1"
        ).fetchone() == ("ADA", True)  # built-in ones
    with gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD) as conn:
        assert conn.execute("select mask_fn_email(1)").fetchone() == ("ada@example.com",)
        assert conn.execute("select e from mask_fn_view2 order by 1").fetchone() == (
            "ada@example.com",
        )


def test_partial_masks_keep_the_end_of_text_values(
    start_gateway: StartGateway, mask_tables: None, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default = "allow"\n[[mask]]\nname = "ends"\nstyle = "partial"\nkeep_last = 4\n'
        'replacement = "..."\n'
        'columns = ["public.mask_customers.phone", "public.mask_customers.name",'
        ' "public.mask_customers.ssn_last4"]\n'
    )
    gateway = start_gateway({"policy_file": str(policy)})
    with gateway.connect() as conn:
        rows = conn.execute("select name, phone, ssn_last4 from mask_customers order by id")
        # "Ada" has no more than four characters: the replacement alone; an int is NULL.
        assert rows.fetchall() == [("...", "...0001", None), ("...race", None, None)]


def test_a_reload_that_adds_a_mask_ends_the_sessions_it_masks(masked: GatewayProcess) -> None:
    """Masks are looked up when a session starts: a reload that changes a live session's
    masks ends it, and its next session is masked the new way."""
    policy = Path(masked.settings["policy_file"])
    other = {"user": OTHER_CLIENT_USER, "password": OTHER_CLIENT_PASSWORD}
    watched = masked.connect(**other)
    assert watched.execute("select email from mask_customers where id = 1").fetchone() == (
        "ada@example.com",
    )
    untouched = masked.connect()
    policy.write_text(
        POLICY
        + f"""
[[mask]]
name = "emails for {OTHER_CLIENT_USER}"
columns = ["public.mask_customers.email"]
users = ["{OTHER_CLIENT_USER}"]
"""
    )
    masked.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "ended 1 session(s) it treats otherwise" in masked.stderr, 10)
    with pytest.raises(psycopg.Error) as caught:
        watched.execute("select email from mask_customers where id = 1")
    assert caught.value.sqlstate == "57P01", caught.value
    assert untouched.execute("select email from mask_customers where id = 1").fetchone() == (
        "****",
    )
    with masked.connect(**other) as conn:
        assert conn.execute("select email from mask_customers where id = 1").fetchone() == ("****",)


def test_masks_in_the_policy_file_are_checked() -> None:
    with pytest.raises(PolicyError, match=r"columns are named schema\.table\.column"):
        parse_policy(b'[[mask]]\nname = "m"\ncolumns = ["customers.email"]\n')
    with pytest.raises(PolicyError, match=r"trusted functions are 'schema\.name' glob patterns"):
        parse_policy(b'[[mask]]\nname = "m"\ncolumns = ["a.b.c"]\ntrusted_functions = ["f"]\n')
    bad_names = ["public.customers.email from x", "a.b.c, d", "a.b.c as d", "a.*.c", 'a.b.\\"*\\"']
    for bad in bad_names:
        with pytest.raises(PolicyError, match=r"columns are named schema\.table\.column"):
            parse_policy(f'[[mask]]\nname = "m"\ncolumns = ["{bad}"]\n'.encode())
    with pytest.raises(PolicyError, match="must be unique"):
        parse_policy(
            b'[[rule]]\nname = "m"\naction = "allow"\n'
            b'[[mask]]\nname = "m"\ncolumns = ["public.t.c"]\n'
        )
    loaded = parse_policy(POLICY.encode())
    assert "E'public',E'mask_customers',E'email',0" in lookup_sql(loaded.policy.mask)


@pytest.mark.parametrize(
    ("written", "parts", "canonical"),
    [
        ("public.customers.email", ("public", "customers", "email"), "public.customers.email"),
        ("Shop.Customers.EMAIL", ("shop", "customers", "email"), "shop.customers.email"),
        ('public."Customer"."eMail"', ("public", "Customer", "eMail"), 'public."Customer"."eMail"'),
        ('public."Customer".*', ("public", "Customer", "*"), 'public."Customer".*'),
        ('"my schema"."a""b".c', ("my schema", 'a"b', "c"), '"my schema"."a""b".c'),
        ('public."user"."select"', ("public", "user", "select"), 'public."user"."select"'),
        ('public.t."it\'s"', ("public", "t", "it's"), 'public.t."it\'s"'),
    ],
)
def test_mask_columns_are_sql_names(written: str, parts: tuple[str, ...], canonical: str) -> None:
    [mask] = parse_policy(
        b'[[mask]]\nname = "m"\ncolumns = [' + json.dumps(written).encode() + b"]\n"
    ).policy.mask
    assert mask.columns == (canonical,)
    assert parse_column(mask.columns[0]) == parts
    # The lookup's literals carry the names as they are, quotes and all.
    schema, table, column = (p.replace("'", "''") for p in parts)
    assert f"E'{schema}',E'{table}',E'{column}',0" in lookup_sql((mask,))


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("select * from customers", False),
        ("select c.email from customers c join orders o on o.cid = c.id", False),
        ("select e from (select email as e from customers) s", False),
        ("copy customers (id) to stdout", False),
        ("copy customers from stdin", False),
        ("update customers set email = 'x' where id = 1", False),
        ("explain select email from customers where id = 1", False),
        ("explain select id from customers where email < 'b'", True),
        ("explain (costs off) select lower(email) from customers", True),
        ("select * from other.customers", False),
        ("select upper(e) from (select email as e from customers) s", True),
        ("select x from (select email from customers) s(x)", True),
        ("select upper(e) from customers as c(i, n, e)", True),
        ("select upper(z) from (customers cross join t) as j(a, b, z)", True),
        ("select j.email from (customers cross join t) as j", False),
        ("select upper(f) from (select e as f from (select email as e from customers) s) s2", True),
        ("select x.g || '' from (select e as g from (select email as e from customers) a) x", True),
        ("select i from public.customers c(i, n, e) where e like 'a%'", True),
        ("select c.id, v.x from customers c, (values (1)) v(x)", False),
        ("with w(x) as (select 1) select email, x from customers, w", False),
        ("select email from customers order by 1", True),
        ("select id from customers group by email", True),
        ("select distinct on (email) id from customers", True),
        ("select 1 from customers join t using (email)", True),
        ("select * from customers natural join t", True),
        ("select jsonb_agg(c) from customers c", True),
        ("select * from customers, lateral (select upper(email)) z", True),
        ("delete from customers where id = 1 returning *", True),
        ("create view v as select * from customers", True),
        ("explain analyze insert into t select email from customers", True),
        ("select * from contacts", True),
        ("do $$ begin raise notice '%', (select email from customers limit 1); end $$", True),
        ("create function f() returns text language sql as 'select email from customers'", True),
        ("create procedure p() language sql begin atomic select 1; end", True),
        ("call p()", False),
        ("select table_to_xml('customers', true, false, '')", True),
        ("select query_to_xml('select email from customers', true, false, '')", True),
        ("select pg_catalog.cursor_to_xml('c', 10, true, false, '')", True),
        ("select * from ts_stat('select to_tsvector(email) from customers')", True),
        ("select ts_rewrite('a'::tsquery, 'select t, s from aliases')", True),
        ("select ts_rewrite('a'::tsquery, 'a'::tsquery, 'b'::tsquery)", False),
        ("select * from dblink('dbname=x', 'select email from customers') t(e text)", True),
        ("select table_to_xmlschema('customers', true, false, '')", False),
        ("select * from pg_logical_slot_peek_changes('s', null, null)", True),
        ("select pg_read_binary_file('base/5/16384')", True),
        ("select query from pg_stat_get_activity(null)", True),
        ("select distinct email from customers", True),
        ("select distinct id from customers", False),
        ("select id, email from customers group by rollup(1)", False),
        ("select email, id from customers group by rollup(1)", True),
        ("select id, email from customers group by cube((1, 2))", True),
        ("select id, email from customers group by grouping sets ((1), (2), ())", True),
        (
            "with recursive t(id) as (select id from customers union all select id + 1 from t)"
            " search depth first by id set o select * from t",
            True,
        ),
    ],
)
def test_statements_that_read_around_the_mask(sql: str, refused: bool) -> None:
    scope = MaskScope(
        {("public", "customers"): frozenset({"email"})}, frozenset({("public", "contacts")})
    )
    assert (refusal_reason(sql, scope) is not None) == refused


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ('select upper("eMail") from "Person"', True),
        ('select upper("eMail") from public."Person"', True),
        ("select upper(email) from person", False),  # another table: person, not "Person"
        ('select upper(email) from "PERSON"', False),
        ('select * from "Contacts"', True),
        ("select * from contacts", False),
    ],
)
def test_quoted_names_match_the_catalog_exactly(sql: str, refused: bool) -> None:
    scope = MaskScope(
        {("public", "Person"): frozenset({"eMail"})}, frozenset({("public", "Contacts")})
    )
    assert (refusal_reason(sql, scope) is not None) == refused


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("insert into customers (id, email) values (1, 'a')", True),
        ("insert into customers values (1, 'n', 'a')", True),
        ("insert into customers (id, name) values (1, 'n')", False),
        ("insert into public.customers (id) values (1) on conflict (id) do nothing", False),
        ("insert into other.customers (email) values ('a')", False),
        ("update customers set email = 'a'", True),
        ("update customers set (name, email) = ('n', 'a')", True),
        ("update customers set name = 'n'", False),
        ("merge into customers c using t on true when not matched then insert values (1)", True),
        ("merge into customers c using t on true when matched then update set name = 'x'", False),
        ("copy customers from stdin", True),
        ("copy customers (id, name) from stdin", False),
        ("copy orders (cid, customer_email) from stdin", True),
        ("explain analyze insert into orders (customer_email) values ('a')", True),
        ("prepare p as update orders set customer_email = $1", True),
        ("insert into orders (cid) values (1)", False),
        ("delete from orders where cid = 1", False),
    ],
)
def test_writes_to_columns_that_would_answer_for_a_masked_value(sql: str, refused: bool) -> None:
    scope = MaskScope(
        {("public", "customers"): frozenset({"email"})},
        frozenset(),
        {
            ("public", "customers"): {"email": "unique index customers_email_key"},
            ("public", "orders"): {"customer_email": "foreign key orders_customer_email_fkey"},
        },
    )
    assert (refusal_reason(sql, scope) is not None) == refused


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("select app.email_of(1)", True),
        ("select email_of(1)", True),  # whatever schema search_path finds it in
        ("select other.email_of(1)", False),  # no such function in the database
        ("select * from email_of(1) e", True),
        ("call app.report()", True),
        ("select 1 where exists (select report())", True),
        ("select upper('x'), now(), pg_catalog.lower('y')", False),
    ],
)
def test_functions_defined_in_the_database(sql: str, refused: bool) -> None:
    scope = MaskScope(
        {("public", "customers"): frozenset({"email"})},
        frozenset(),
        None,
        frozenset({("app", "email_of"), ("app", "report")}),
    )
    assert (refusal_reason(sql, scope) is not None) == refused


def test_verdicts_are_shared_across_numbers_but_not_column_positions() -> None:
    scope = MaskScope({("public", "people"): frozenset({"email"})}, frozenset())
    assert refusal_reason("select email, id from people where id = 1", scope) is None
    assert refusal_reason("select email, id from people where id = 2", scope) is None
    assert refusal_reason("select lower(email) from people where id = 1", scope)
    assert refusal_reason("select lower(email) from people where id = 2", scope)
    # The same text with another number names another output column.
    assert refusal_reason("select email, id from people order by 2", scope) is None
    assert refusal_reason("select email, id from people order by 1", scope)
    assert refusal_reason("select email, id from people order by 2", scope) is None
    assert refusal_reason("select distinct on (1) email, id from people", scope)
    assert refusal_reason("select email, id from people group by rollup(2)", scope) is None
    assert refusal_reason("select email, id from people group by rollup(1)", scope)


def test_policy_check_applies_the_masks(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    args = ["policy", "check", str(policy), "--user", CLIENT_USER]
    result = run_pgwarden(*args, "-c", SELECT_ALL, "-c", "select upper(email) from mask_customers")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 masks, default allow" in result.stdout
    assert "masks for user alice" in result.stdout and "customer contact (" in result.stdout
    assert f"allow  [read] {SELECT_ALL}" in result.stdout
    assert "42501 (masking): email is used in an expression" in result.stdout
    other = run_pgwarden(
        "policy",
        "check",
        str(policy),
        "--user",
        OTHER_CLIENT_USER,
        "-c",
        "select upper(email) from mask_customers",
    )
    assert other.returncode == 0 and "masks for user bob, groups -, role -: none" in other.stdout

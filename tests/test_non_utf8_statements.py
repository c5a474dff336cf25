"""Statement text that is not UTF-8 (after ``SET client_encoding``) is refused, not fatal.

The caller gets an ERROR 22021 (character_not_in_repertoire) with a hint, exactly where
PostgreSQL itself would answer the statement, and the session goes on; the refused text
never reaches PostgreSQL, and PostgreSQL's own rules after an error still hold (a
transaction block is failed, the extended protocol skips to Sync).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    TEST_DATABASE,
    GatewayProcess,
    StartGateway,
    run_tool,
)
from otlp_receiver import OtlpReceiver
from pgproto import (
    Message,
    RawConnection,
    bind,
    connect_authenticated,
    data_rows,
    execute,
    message,
    parse,
    query,
    sync,
)

REFUSED_INSERT = b"insert into words values ('caf\xe9')"


def latin1_query(sql: bytes = REFUSED_INSERT) -> bytes:
    return message(b"Q", sql + b"\0")


def latin1_parse(sql: bytes = REFUSED_INSERT, name: str = "") -> bytes:
    return message(b"P", name.encode() + b"\0" + sql + b"\0" + b"\0\0")


def assert_refused(error: Message) -> None:
    fields = error.fields
    assert error.tag == b"E", error
    assert fields["S"] == "ERROR", fields
    assert fields["C"] == "22021", fields
    assert fields["M"] == "statement text is not valid UTF-8", fields
    assert "client_encoding UTF8" in fields["H"], fields
    assert "0xe9" in fields["D"], fields


def tags(messages: list[Message]) -> bytes:
    return b"".join(m.tag for m in messages)


@pytest.fixture
def latin1_session(gateway: GatewayProcess) -> Iterator[RawConnection]:
    """A session that switched to LATIN1 after startup, with an empty temp table."""
    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    conn.simple_query("create temp table words (w text)")
    assert tags(conn.simple_query("set client_encoding to 'LATIN1'"))[-1:] == b"Z"
    yield conn
    conn.close()


def word_count(conn: RawConnection) -> int:
    [[count]] = data_rows(conn.simple_query("select count(*) from words"))
    assert count is not None
    return int(count)


def test_simple_query_is_refused_and_the_session_goes_on(latin1_session: RawConnection) -> None:
    conn = latin1_session
    conn.send(latin1_query())
    answer = conn.read_until(b"Z")
    assert tags(answer) == b"EZ"
    assert_refused(answer[0])
    assert answer[1].body == b"I"
    assert word_count(conn) == 0, "the refused insert must not have run"
    # Back in UTF8, the same text goes through.
    conn.simple_query("set client_encoding to 'UTF8'")
    assert tags(conn.simple_query("insert into words values ('café')")) == b"CZ"
    assert word_count(conn) == 1


def test_refusal_fails_the_transaction_like_any_error(latin1_session: RawConnection) -> None:
    conn = latin1_session
    conn.simple_query("begin")
    conn.simple_query("insert into words values ('before')")
    conn.send(latin1_query())
    answer = conn.read_until(b"Z")
    assert_refused(answer[0])
    assert answer[-1].body == b"E", "the transaction block is failed"
    after = conn.simple_query("select 1")
    assert after[0].sqlstate == "25P02", after[0].fields
    commit = conn.simple_query("commit")
    assert commit[0].body.startswith(b"ROLLBACK")
    assert word_count(conn) == 0


def test_pipelined_queries_keep_their_order(latin1_session: RawConnection) -> None:
    conn = latin1_session
    conn.send(query("select 'one'") + latin1_query() + query("select 'three'"))
    answer = []
    for _ in range(3):
        answer += conn.read_until(b"Z")
    assert tags(answer) == b"TDCZEZTDCZ"
    assert_refused(answer[4])
    assert data_rows(answer) == [[b"one"], [b"three"]]


def test_extended_parse_is_refused_then_skipped_to_sync(latin1_session: RawConnection) -> None:
    conn = latin1_session
    conn.send(latin1_parse() + bind() + execute() + sync())
    answer = conn.read_until(b"Z")
    assert tags(answer) == b"EZ", "exactly one ErrorResponse, then ReadyForQuery"
    assert_refused(answer[0])
    assert answer[1].body == b"I"
    assert word_count(conn) == 0

    # A named statement: refused, and its name stays free.
    conn.send(latin1_parse(name="s1") + sync())
    answer = conn.read_until(b"Z")
    assert tags(answer) == b"EZ"
    assert_refused(answer[0])
    conn.send(parse("select 'ok'", name="s1") + bind(statement="s1") + execute() + sync())
    answer = conn.read_until(b"Z")
    assert tags(answer) == b"12DCZ"
    assert data_rows(answer) == [[b"ok"]]


def raw_bind(portal: bytes, statement: bytes) -> bytes:
    """A Bind of a statement without parameters, its names given as raw bytes."""
    return message(b"B", portal + b"\0" + statement + b"\0" + b"\0\0" * 3)


def test_portal_names_in_the_client_encoding_work_as_on_postgres(
    latin1_session: RawConnection,
) -> None:
    # Names need not be UTF-8: PostgreSQL reads them in the client encoding (LATIN1 'é').
    conn = latin1_session
    portal = b"p\xe9"
    conn.send(
        parse("select 'ok'", name="s1")
        + raw_bind(portal, b"s1")
        + message(b"D", b"P" + portal + b"\0")
        + message(b"E", portal + b"\0" + b"\0\0\0\0")
        + message(b"C", b"P" + portal + b"\0")
        + sync()
    )
    answer = conn.read_until(b"Z")
    assert tags(answer) == b"12TDC3Z", answer
    assert data_rows(answer) == [[b"ok"]]
    assert tags(conn.simple_query("select 'after'")) == b"TDCZ"


def test_names_invalid_in_the_client_encoding_get_postgres_own_error(
    gateway: GatewayProcess,
) -> None:
    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    try:
        # Under UTF8 the server refuses the name (22021), the batch skips to Sync, and
        # the session goes on.
        conn.send(parse("select 'still here'", name="s1") + sync())
        assert tags(conn.read_until(b"Z")) == b"1Z"
        conn.send(raw_bind(b"p\xff", b"s1") + execute() + sync())
        answer = conn.read_until(b"Z")
        assert tags(answer) == b"EZ", answer
        assert answer[0].fields["C"] == "22021", answer[0].fields
        assert "0xff" in answer[0].fields["M"], answer[0].fields
        conn.send(raw_bind(b"", b"s1") + execute() + sync())
        answer = conn.read_until(b"Z")
        assert tags(answer) == b"2DCZ", answer
        assert data_rows(answer) == [[b"still here"]]
    finally:
        conn.close()


def test_psycopg_gets_character_not_in_repertoire(gateway: GatewayProcess) -> None:
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        conn.execute("set client_encoding to 'LATIN1'")
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire) as caught:
            conn.execute("select 'café'")
        assert caught.value.diag.message_primary == "statement text is not valid UTF-8"
        assert "client_encoding UTF8" in (caught.value.diag.message_hint or "")
        assert conn.execute("select 'ascii is fine'").fetchone() == ("ascii is fine",)
        conn.execute("set client_encoding to 'UTF8'")
        assert conn.execute("select 'café'").fetchone() == ("café",)


def test_psql_script_reports_and_continues(gateway: GatewayProcess, tmp_path: Path) -> None:
    script = tmp_path / "latin1.sql"
    script.write_bytes(
        b"set client_encoding to 'LATIN1';\n"
        b"select 'caf\xe9' as word;\n"
        b"set client_encoding to 'UTF8';\n"
        b"select 'still ' || 'here';\n"
    )
    result = run_tool(
        ["psql", "--no-psqlrc", "--quiet", "--tuples-only", "--no-align", "-f", str(script)],
        {**gateway.env(), "PGCLIENTENCODING": "UTF8"},
        errors="replace",
    )
    assert "ERROR:  statement text is not valid UTF-8" in result.stderr
    assert "HINT:  pgwarden reads statements as UTF-8" in result.stderr
    assert result.stdout.strip() == "still here"


def test_refused_statement_is_logged_and_audited(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    log = tmp_path / "statements.jsonl"
    with OtlpReceiver("http") as receiver:
        gateway = start_gateway(
            {
                "statement_log": str(log),
                "audit": {
                    "directory": str(tmp_path / "audit"),
                    "exporter": "otlp_http",
                    "endpoint": receiver.endpoint,
                    "poll_interval_ms": 50,
                    "timeout_seconds": 5,
                },
            }
        )
        conn, _ = connect_authenticated(
            gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
        )
        conn.simple_query("set client_encoding to 'LATIN1'")
        conn.send(latin1_query(b"select 'caf\xe9' as audited"))
        assert_refused(conn.read_until(b"Z")[0])
        assert tags(conn.simple_query("select 'after'")) == b"TDCZ"
        conn.close()

        recorded = "select 'caf\ufffd' as audited"
        spans = receiver.wait_for(
            lambda spans: any(s.attributes.get("db.query.text") == recorded for s in spans),
            timeout=60,
        )
        [span] = [s for s in spans if s.attributes.get("db.query.text") == recorded]
        assert span.attributes["db.response.status_code"] == "22021", span.attributes

    deadline = time.monotonic() + 10
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        records = [json.loads(line) for line in lines]
        refused = [r for r in records if r["statement"] == recorded]
        if refused or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(refused) == 1, records
    assert refused[0]["sqlstate"] == "22021"
    assert refused[0]["error"] == "statement text is not valid UTF-8"

"""psycopg 3 through the gateway: result formats, pipeline, COPY, cursors, notifications."""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from harness import GatewayProcess

SAMPLE_QUERY = """
select 42::int4 as i4, 9000000000::int8 as i8, 1.25::float8 as f8, 12.345::numeric as num,
       'hé llo'::text as txt, '\\xdeadbeef'::bytea as bin, true as flag, null::int as nothing,
       '2024-02-29 12:34:56+00'::timestamptz as ts, '2024-02-29'::date as d,
       array[1, 2, 3]::int4[] as arr, '{"a": [1, 2]}'::jsonb as doc,
       '6b2a7b1e-8a49-4f39-9a0c-0f7d6c2b1a11'::uuid as id
"""

EXPECTED_ROW = (
    42,
    9000000000,
    1.25,
    decimal.Decimal("12.345"),
    "hé llo",
    b"\xde\xad\xbe\xef",
    True,
    None,
    datetime.datetime(2024, 2, 29, 12, 34, 56, tzinfo=datetime.UTC),
    datetime.date(2024, 2, 29),
    [1, 2, 3],
    {"a": [1, 2]},
    uuid.UUID("6b2a7b1e-8a49-4f39-9a0c-0f7d6c2b1a11"),
)


@pytest.fixture
def conn(gateway: GatewayProcess) -> Iterator[psycopg.Connection[Any]]:
    with gateway.connect(options="-c timezone=UTC") as connection:
        yield connection


def test_text_results(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(SAMPLE_QUERY).fetchone()
    assert row == EXPECTED_ROW


def test_binary_results(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor(binary=True) as cur:
        cur.execute(SAMPLE_QUERY)
        assert cur.fetchone() == EXPECTED_ROW
        assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1


def test_parameters_round_trip_binary(conn: psycopg.Connection[Any]) -> None:
    values = (7, "text with 'quotes' and ünïcode", b"\x00\x01\xff", None, [1.5, 2.5])
    with conn.cursor(binary=True) as cur:
        cur.execute("select %b, %b, %b, %b::int, %b::float8[]", values)
        assert cur.fetchone() == values


def test_prepared_statement_reused(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table counter (n int)")
    for i in range(10):
        conn.execute("insert into counter values (%s)", (i,), prepare=True)
    assert conn.execute("select sum(n) from counter").fetchone() == (45,)
    prepared = conn.execute("select count(*) from pg_prepared_statements").fetchone()
    assert prepared is not None and prepared[0] >= 1


def test_transaction_status_visible(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute("select 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_pipeline_mode(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table p (id int primary key, v text)")
    with conn.pipeline(), conn.cursor() as cur:
        for i in range(200):
            cur.execute("insert into p values (%s, %s)", (i, f"v{i}"))
        cur.execute("select count(*), max(id) from p")
        result = cur.fetchone()
    assert result == (200, 199)


def test_error_in_pipeline(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True
    conn.execute("create temp table p (id int primary key)")
    with pytest.raises(errors.UniqueViolation), conn.pipeline() as pipeline:
        conn.execute("insert into p values (1)")
        pipeline.sync()  # commits the first batch
        conn.execute("insert into p values (2)")
        conn.execute("insert into p values (1)")  # fails: the batch up to Sync rolls back
        conn.execute("insert into p values (3)")  # skipped until Sync
    assert conn.execute("select array_agg(id) from p").fetchone() == ([1],)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_error_then_connection_still_usable(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(errors.UndefinedTable) as info:
        conn.execute("select * from missing_table")
    assert info.value.sqlstate == "42P01"
    conn.rollback()
    assert conn.execute("select 'ok'").fetchone() == ("ok",)


def test_copy_text_in_and_out(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table c (id int, name text, created date)")
    rows = [(i, f"name\t{i}\n", datetime.date(2024, 1, 1 + i % 28)) for i in range(3000)]
    with conn.cursor() as cur:
        with cur.copy("copy c (id, name, created) from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 3000
        with cur.copy("copy (select id, name, created from c order by id) to stdout") as copy:
            copy.set_types(["int4", "text", "date"])
            assert list(copy.rows()) == rows


def test_copy_binary_in_and_out(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table cb (id int8, payload bytea, score float8)")
    rows = [(i, bytes([i % 256]) * (i % 50), i / 7) for i in range(3000)]
    with conn.cursor() as cur:
        with cur.copy("copy cb from stdin (format binary)") as copy:
            copy.set_types(["int8", "bytea", "float8"])
            for row in rows:
                copy.write_row(row)
        with cur.copy("copy (select * from cb order by id) to stdout (format binary)") as copy:
            copy.set_types(["int8", "bytea", "float8"])
            assert list(copy.rows()) == rows


def test_copy_raw_blocks(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table raw (line text)")
    data = "".join(f"line {i}\n" for i in range(10000)).encode()
    with conn.cursor() as cur:
        with cur.copy("copy raw from stdin") as copy:
            for start in range(0, len(data), 7919):  # blocks cut mid-row on purpose
                copy.write(data[start : start + 7919])
        out = b""
        with cur.copy("copy raw to stdout") as copy:
            for block in copy:
                out += bytes(block)
    assert out == data


def test_copy_error_is_reported(conn: psycopg.Connection[Any]) -> None:
    conn.execute("create temp table ce (id int)")
    conn.commit()
    with (
        pytest.raises(errors.InvalidTextRepresentation),
        conn.cursor() as cur,
        cur.copy("copy ce from stdin") as copy,
    ):
        copy.write("1\n2\nthree\n4\n")
    conn.rollback()
    assert conn.execute("select count(*) from ce").fetchone() == (0,)


def test_server_side_cursor(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor(name="big_cursor") as cur:
        cur.itersize = 1000
        cur.execute("select g, md5(g::text) from generate_series(1, 50000) g")
        total = count = 0
        for g, digest in cur:
            total += g
            count += 1
            assert len(digest) == 32
    assert (count, total) == (50000, 50000 * 50001 // 2)


def test_server_side_cursor_scroll(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor(name="scrolling", scrollable=True) as cur:
        cur.execute("select g from generate_series(1, 100) g")
        cur.scroll(49)
        assert cur.fetchone() == (50,)
        cur.scroll(0, mode="absolute")
        assert cur.fetchmany(2) == [(1,), (2,)]


def test_listen_notify_between_two_sessions(gateway: GatewayProcess) -> None:
    with (
        gateway.connect(autocommit=True) as listener,
        gateway.connect(autocommit=True, user="bob", password="bob-client-pw") as sender,
    ):
        listener.execute("listen pgwarden_events")
        sender.execute("notify pgwarden_events, 'first'")
        sender.execute("select pg_notify('pgwarden_events', 'second')")
        received = [n.payload for n in listener.notifies(timeout=10, stop_after=2)]
        assert received == ["first", "second"]


def test_notice_handler(conn: psycopg.Connection[Any]) -> None:
    notices: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda diag: notices.append((diag.severity, diag.message_primary)))
    conn.execute("do $$ begin raise notice 'first notice'; raise warning 'then a warning'; end $$")
    assert notices == [("NOTICE", "first notice"), ("WARNING", "then a warning")]


def test_many_statements_in_one_session(conn: psycopg.Connection[Any]) -> None:
    conn.autocommit = True
    total = 0
    for i in range(2000):
        row = conn.execute("select %s::int * 2", (i,)).fetchone()
        assert row is not None
        total += row[0]
    assert total == 2 * sum(range(2000))


def test_identifier_and_literal_composition(conn: psycopg.Connection[Any]) -> None:
    query = sql.SQL("select {} as {}").format(sql.Literal("it's"), sql.Identifier("Odd Name"))
    with conn.cursor() as cur:
        cur.execute(query)
        assert cur.description is not None and cur.description[0].name == "Odd Name"
        assert cur.fetchone() == ("it's",)

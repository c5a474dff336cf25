"""asyncpg through the gateway.

asyncpg prepares statements with Parse/Describe/Flush and no Sync, then waits for the
answer: a gateway that holds messages until Sync hangs it.
"""

from __future__ import annotations

import asyncio
import decimal
import io
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from harness import GatewayProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(gateway: GatewayProcess) -> AsyncIterator[asyncpg.Connection]:
    connection = await gateway.connect_asyncpg()
    try:
        yield connection
    finally:
        await connection.close(timeout=5)


async def test_fetch_with_parameters(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("select g, g * $1::int as x from generate_series(1, $2::int) g", 3, 5)
    assert [(r["g"], r["x"]) for r in rows] == [(i, 3 * i) for i in range(1, 6)]


async def test_prepared_statement(conn: asyncpg.Connection) -> None:
    stmt = await asyncio.wait_for(conn.prepare("select $1::int + 1 as next, $2::text as t"), 10)
    assert [a.name for a in stmt.get_attributes()] == ["next", "t"]
    for i in range(50):
        assert await stmt.fetchrow(i, "x") == (i + 1, "x")


async def test_types_round_trip(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "select $1::jsonb as j, $2::int8[] as a, $3::bytea as b, $4::numeric as n",
        '{"k": "v"}',
        [1, 2, None],
        b"\x00\xff",
        decimal.Decimal("1.50"),
    )
    assert row is not None
    assert row["j"] == '{"k": "v"}'
    assert row["a"] == [1, 2, None]
    assert row["b"] == b"\x00\xff"
    assert str(row["n"]) == "1.50"


async def test_executemany(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table em (id int primary key, name text)")
    await conn.executemany("insert into em values ($1, $2)", [(i, f"n{i}") for i in range(1000)])
    assert await conn.fetchval("select count(*) from em") == 1000


async def test_error_then_usable(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        await conn.fetch("select * from no_such_table where id = $1", 1)
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.execute("select 1/0")
    assert await conn.fetchval("select 'ok'") == "ok"


async def test_transaction_rollback(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table tx (id int)")
    with pytest.raises(RuntimeError):
        async with conn.transaction():
            await conn.execute("insert into tx values (1)")
            raise RuntimeError("roll back")
    async with conn.transaction():
        await conn.execute("insert into tx values (2)")
    assert await conn.fetchval("select array_agg(id) from tx") == [2]


async def test_copy_records_to_table_and_copy_from_query(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table cr (id int, name text, score float8)")
    records = [(i, f"name {i}", i / 3) for i in range(5000)]
    result = await conn.copy_records_to_table("cr", records=records)
    assert result == "COPY 5000"
    buffer = io.BytesIO()
    result = await conn.copy_from_query(
        "select id, name from cr where id < $1 order by id", 3, output=buffer, format="csv"
    )
    assert result == "COPY 3"
    assert buffer.getvalue() == b"0,name 0\n1,name 1\n2,name 2\n"


async def test_copy_to_table_from_source(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table ct (id int, name text)")
    data = "".join(f"{i}\tname {i}\n" for i in range(2000)).encode()
    result = await conn.copy_to_table("ct", source=io.BytesIO(data))
    assert result == "COPY 2000"
    assert await conn.fetchval("select sum(id) from ct") == sum(range(2000))


async def test_cursor_in_transaction(conn: asyncpg.Connection) -> None:
    count = 0
    async with conn.transaction():
        async for record in conn.cursor("select g from generate_series(1, 20000) g", prefetch=500):
            count += 1
            assert record["g"] == count
    assert count == 20000


async def test_timeout_cancels_query_and_connection_stays_usable(
    conn: asyncpg.Connection,
) -> None:
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await conn.execute("select pg_sleep(10)", timeout=1)
    assert time.monotonic() - started < 5
    assert await asyncio.wait_for(conn.fetchval("select 1"), 5) == 1
    assert not conn.is_closed()


async def test_listen_with_add_listener(gateway: GatewayProcess, conn: asyncpg.Connection) -> None:
    received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        received.put_nowait((channel, payload))

    await conn.add_listener("asyncpg_events", on_notify)
    sender = await gateway.connect_asyncpg()
    try:
        await sender.execute("notify asyncpg_events, 'hello'")
        await sender.execute("select pg_notify('asyncpg_events', $1)", "world")
    finally:
        await sender.close()
    first = await asyncio.wait_for(received.get(), 10)
    second = await asyncio.wait_for(received.get(), 10)
    assert [first, second] == [("asyncpg_events", "hello"), ("asyncpg_events", "world")]
    await conn.remove_listener("asyncpg_events", on_notify)


async def test_pool_of_connections(gateway: GatewayProcess) -> None:
    pool = await asyncpg.create_pool(**gateway.asyncpg_options(), min_size=4, max_size=4)
    assert pool is not None
    try:
        results = await asyncio.gather(
            *(pool.fetchval("select $1::int * 10", i) for i in range(100))
        )
        assert results == [i * 10 for i in range(100)]
    finally:
        await asyncio.wait_for(pool.close(), 10)

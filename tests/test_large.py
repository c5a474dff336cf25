"""Large values, long results, and bounded gateway memory under a slow client."""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import time
from typing import Any

import pytest

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    TEST_DATABASE,
    GatewayProcess,
    StartGateway,
    rss_kib,
)
from pgproto import connect_authenticated, query
from pgwarden.pgcluster import TemporaryCluster

BIG = 20 * 1024 * 1024  # over 16 MiB: past any "medium" buffer a proxy might assume


def test_20_mib_text_parameter_both_directions(gateway: GatewayProcess) -> None:
    value = os.urandom(BIG // 2).hex()  # 20 MiB of text
    digest = hashlib.sha256(value.encode()).hexdigest()
    with gateway.connect() as conn:
        conn.execute("create temp table big (id serial, v text)")
        row = conn.execute("insert into big (v) values (%s) returning id, length(v)", (value,))
        assert row.fetchone() == (1, len(value))
        assert conn.execute("select sha256(convert_to(v, 'UTF8')) from big").fetchone() == (
            bytes.fromhex(digest),
        )
        with conn.cursor(binary=True) as cur:
            cur.execute("select v from big")
            fetched = cur.fetchone()
        assert fetched is not None
        assert hashlib.sha256(fetched[0].encode()).hexdigest() == digest


def test_20_mib_bytea_generated_by_server(gateway: GatewayProcess) -> None:
    with gateway.connect() as conn:
        row = conn.execute(
            "select v, sha256(v) from (select convert_to(repeat('pgwarden', %s), 'SQL_ASCII') v) s",
            (BIG // 8,),
        ).fetchone()
    assert row is not None
    value, digest = row
    assert len(value) == BIG
    assert hashlib.sha256(value).digest() == digest


@pytest.mark.anyio
async def test_20_mib_with_asyncpg(gateway: GatewayProcess) -> None:
    value = os.urandom(BIG)
    conn = await gateway.connect_asyncpg()
    try:
        echoed, digest = await asyncio.wait_for(
            conn.fetchrow("select $1::bytea, sha256($1::bytea)", value), 60
        )
    finally:
        await conn.close()
    assert echoed == value
    assert digest == hashlib.sha256(value).digest()


@pytest.mark.slow
def test_two_million_rows_binary_stream(gateway: GatewayProcess) -> None:
    count = total = 0
    with gateway.connect() as conn, conn.cursor(binary=True) as cur:
        for (g,) in cur.stream("select g from generate_series(1, 2000000) g", size=5000):
            count += 1
            total += g
    assert count == 2_000_000
    assert total == 2_000_000 * 2_000_001 // 2


@pytest.mark.slow
@pytest.mark.anyio
async def test_two_million_rows_asyncpg_cursor(gateway: GatewayProcess) -> None:
    conn = await gateway.connect_asyncpg()
    count = 0
    try:
        async with conn.transaction():
            cursor = conn.cursor("select g from generate_series(1, 2000000) g", prefetch=20000)
            async for _record in cursor:
                count += 1
    finally:
        await conn.close()
    assert count == 2_000_000


@pytest.mark.slow
def test_slow_client_keeps_gateway_memory_bounded(
    start_gateway: StartGateway, cluster: TemporaryCluster, superuser: Any
) -> None:
    """A client that does not read must stall the upstream, not grow the gateway.

    The result is ~130 MB; without backpressure the gateway would buffer most of it.
    """
    gateway = start_gateway()
    marker = "backpressure-" + os.urandom(4).hex()
    warm, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    warm.simple_query("select g, repeat('x', 100) from generate_series(1, 20000) g")
    warm.close()
    time.sleep(0.5)
    baseline = gateway.rss_kib()

    conn, _ = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE, rcvbuf=65536
    )
    conn.send(
        query(f"select g, repeat('x', 100) /* {marker} */ from generate_series(1, 1000000) g")
    )
    peak = baseline
    # Phase 1: do not read at all.
    for _ in range(15):
        time.sleep(0.2)
        peak = max(peak, rss_kib(gateway.pid))
    stalled = superuser.execute(
        "select wait_event from pg_stat_activity where query like %s and pid <> pg_backend_pid()",
        (f"%{marker}%",),
    ).fetchall()
    # Phase 2: read slowly, then phase 3: drain at full speed.
    received = 0
    deadline = time.monotonic() + 2
    conn.sock.settimeout(30)
    while time.monotonic() < deadline:
        chunk = conn.sock.recv(16384)
        assert chunk
        received += len(chunk)
        time.sleep(0.01)
        peak = max(peak, rss_kib(gateway.pid))
    tail = b""
    samples = 0
    while True:
        chunk = conn.sock.recv(1 << 20)
        assert chunk, "connection closed before the result ended"
        received += len(chunk)
        tail = (tail + chunk)[-64:]
        samples += 1
        if samples % 64 == 0:
            peak = max(peak, rss_kib(gateway.pid))
        # CommandComplete "SELECT 1000000" then ReadyForQuery 'I' end the result.
        if tail.endswith(b"Z" + struct.pack("!i", 5) + b"I"):
            break
    conn.close()
    growth_mib = (peak - baseline) / 1024
    print(
        f"gateway RSS baseline {baseline / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
        f"growth {growth_mib:.1f} MiB while {received / 1e6:.0f} MB went to a slow client"
    )
    assert b"SELECT 1000000\x00" in tail
    assert received > 120_000_000
    assert stalled and stalled[0][0] == "ClientWrite", (
        f"upstream backend should be blocked writing to the gateway, saw {stalled}"
    )
    assert growth_mib < 64

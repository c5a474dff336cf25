"""CancelRequest through the gateway: the right query is cancelled, and only that one."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    TEST_DATABASE,
    GatewayProcess,
    backends_running,
    background,
    wait_until,
)
from pgproto import RawConnection, cancel_request, connect_authenticated, data_rows, query


def test_psycopg_cancel_cancels_only_that_query(
    gateway: GatewayProcess, superuser: psycopg.Connection[Any]
) -> None:
    tag = "c" + uuid.uuid4().hex[:10]
    with gateway.connect(autocommit=True) as victim, gateway.connect(autocommit=True) as other:
        with (
            background(
                lambda: other.execute("select 'other done', pg_sleep(3)").fetchone()
            ) as other_outcome,
            background(lambda: victim.execute(f"select pg_sleep(30) /* {tag} */")) as outcome,
        ):
            assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
            started = time.monotonic()
            victim.cancel_safe(timeout=10)
            outcome["thread"].join(10)
            elapsed = time.monotonic() - started
        assert isinstance(outcome.get("error"), errors.QueryCanceled), outcome
        assert elapsed < 5
        assert other_outcome.get("result", ("",))[0] == "other done", other_outcome
        assert victim.execute("select 'victim usable'").fetchone() == ("victim usable",)


def test_legacy_cancel(gateway: GatewayProcess, superuser: psycopg.Connection[Any]) -> None:
    tag = "c" + uuid.uuid4().hex[:10]
    with gateway.connect(autocommit=True) as conn:
        with background(lambda: conn.execute(f"select pg_sleep(30) /* {tag} */")) as outcome:
            assert wait_until(lambda: bool(backends_running(superuser, tag)), 10)
            conn.pgconn.get_cancel().cancel()
            outcome["thread"].join(10)
        assert isinstance(outcome.get("error"), errors.QueryCanceled), outcome


@pytest.mark.anyio
async def test_asyncpg_timeout_cancels_the_right_query(gateway: GatewayProcess) -> None:
    slow = await gateway.connect_asyncpg()
    bystander = await gateway.connect_asyncpg()
    try:
        other = asyncio.ensure_future(bystander.fetchval("select 'survived' from pg_sleep(2)"))
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await slow.fetchval("select pg_sleep(20)", timeout=1)
        assert time.monotonic() - started < 5
        assert await asyncio.wait_for(other, 10) == "survived"
        assert await slow.fetchval("select 'slow usable'") == "slow usable"
    finally:
        await slow.close()
        await bystander.close()


def test_cancel_with_wrong_key_cancels_nothing(gateway: GatewayProcess) -> None:
    conn, startup = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    key_data = [m for m in startup if m.tag == b"K"]
    assert len(key_data) == 1, "the gateway must send BackendKeyData"
    process_id = int.from_bytes(key_data[0].body[:4], "big")
    secret = key_data[0].body[4:]
    conn.send(query("select 'not cancelled' from pg_sleep(1.5)"))
    time.sleep(0.3)

    forged = bytes(b ^ 0xFF for b in secret)
    for pid, key in ((process_id, forged), (process_id + 1, secret), (0, os.urandom(4))):
        attacker = RawConnection.open(gateway.host, gateway.port)
        attacker.send(cancel_request(pid, key))
        assert attacker.read_error_or_close(5) is None  # no reply, just a close
        attacker.close()

    messages = conn.read_until(b"Z", timeout=10)
    assert not [m for m in messages if m.tag == b"E"], [m.fields for m in messages]
    assert data_rows(messages) == [[b"not cancelled"]]
    conn.close()


def test_raw_cancel_request_interrupts_query(gateway: GatewayProcess) -> None:
    conn, startup = connect_authenticated(
        gateway.host, gateway.port, CLIENT_USER, CLIENT_PASSWORD, TEST_DATABASE
    )
    key = next(m for m in startup if m.tag == b"K").body
    conn.send(query("select pg_sleep(30)"))
    time.sleep(0.5)
    canceller = RawConnection.open(gateway.host, gateway.port)
    canceller.send(cancel_request(int.from_bytes(key[:4], "big"), key[4:]))
    canceller.read_error_or_close(5)
    canceller.close()
    messages = conn.read_until(b"Z", timeout=10)
    assert [m.sqlstate for m in messages if m.tag == b"E"] == ["57014"]
    conn.close()

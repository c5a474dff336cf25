"""Session limits: ``max_connections_per_identity`` and ``max_client_connections`` refuse
sessions past them with FATAL 53300, count across workers, and give a session's place
back when it ends, or when its worker dies."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import (
    CLIENT_USER,
    OTHER_CLIENT_PASSWORD,
    OTHER_CLIENT_USER,
    TEST_DATABASE,
    GatewayProcess,
    StartGateway,
    wait_until,
)
from identity_support import (
    ANALYST_ROLE,
    AUDIENCE,
    client_tls,
    create_identity_roles,
    identity_settings,
    token_dsn,
)
from pgwarden.client_auth import Identity
from pgwarden.errors import GatewayError
from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.pgcluster import TemporaryCluster
from pgwarden.session_limits import SLOTS, SessionLedger
from test_workers import worker_pids


def refused(gateway: GatewayProcess, **options: Any) -> asyncpg.PostgresError:
    """The error a login gets (asyncpg: libpq's connection errors carry no SQLSTATE)."""

    async def login() -> None:
        conn = await asyncpg.connect(**gateway.asyncpg_options(**options))
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as caught:
        asyncio.run(login())
    return caught.value


@pytest.fixture
def sessions() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_one_identity_past_its_limit_is_refused_and_others_go_on(
    start_gateway: StartGateway, sessions: ExitStack
) -> None:
    gateway = start_gateway({"max_connections_per_identity": 2})
    first = sessions.enter_context(gateway.connect(autocommit=True))
    sessions.enter_context(gateway.connect(autocommit=True))
    error = refused(gateway)
    assert error.sqlstate == "53300"
    assert f'too many connections for identity "{CLIENT_USER}"' in str(error)
    # Another caller is not held back by this one's sessions.
    other = sessions.enter_context(
        gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD, autocommit=True)
    )
    assert other.execute("select 1").fetchone() == (1,)
    # A session that ends gives its place back.
    first.close()
    assert wait_until(lambda: _connects(gateway), 5)


def test_a_login_that_fails_after_it_was_counted_gives_its_place_back(
    start_gateway: StartGateway, sessions: ExitStack
) -> None:
    """Counted once authenticated, a session the server then refuses (no such database)
    must not keep its place."""
    gateway = start_gateway({"max_connections_per_identity": 1})
    for _ in range(3):
        assert refused(gateway, database="no_such_database").sqlstate == "3D000"
    held = sessions.enter_context(gateway.connect(autocommit=True))
    assert held.execute("select 1").fetchone() == (1,)


def _connects(gateway: GatewayProcess) -> bool:
    try:
        with gateway.connect(autocommit=True) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_the_gateway_past_its_limit_refuses_everyone(
    start_gateway: StartGateway, sessions: ExitStack
) -> None:
    gateway = start_gateway({"max_client_connections": 3})
    for _ in range(2):
        sessions.enter_context(gateway.connect(autocommit=True))
    sessions.enter_context(
        gateway.connect(user=OTHER_CLIENT_USER, password=OTHER_CLIENT_PASSWORD, autocommit=True)
    )
    for login in ({}, {"user": OTHER_CLIENT_USER, "password": OTHER_CLIENT_PASSWORD}):
        error = refused(gateway, **login)
        assert error.sqlstate == "53300"
        assert "sorry, too many clients already" in str(error)


def test_limits_count_the_sessions_of_every_worker(
    start_gateway: StartGateway, sessions: ExitStack
) -> None:
    """Six sessions land on two workers as the kernel spreads them; a count per worker
    would let up to twelve through."""
    gateway = start_gateway({"workers": 2, "max_connections_per_identity": 6})
    opened = [sessions.enter_context(gateway.connect(autocommit=True)) for _ in range(6)]
    for _ in range(4):
        assert refused(gateway).sqlstate == "53300"
    # A worker killed with sessions open: they are gone, and so are their places.
    victim = worker_pids(gateway)[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(
        lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway), 15
    )
    alive = [conn for conn in opened if _still_serves(conn)]
    lost = len(opened) - len(alive)
    for _ in range(lost):
        sessions.enter_context(gateway.connect(autocommit=True))
    assert refused(gateway).sqlstate == "53300"


def _still_serves(conn: psycopg.Connection[Any]) -> bool:
    try:
        return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_a_mapping_rule_limits_the_sessions_of_each_identity_it_matches(
    start_gateway: StartGateway, cluster: TemporaryCluster, sessions: ExitStack
) -> None:
    """Token identities: the limit counts one caller (issuer and subject) however it
    names itself at login, and each identity the rule matches has its own."""
    create_identity_roles(cluster)
    with DevIssuer(audience=AUDIENCE) as issuer:
        rules = [
            {
                "name": "agents",
                "groups": ["agents"],
                "roles": [ANALYST_ROLE],
                "databases": [TEST_DATABASE],
                "max_connections": 2,
            }
        ]
        gateway = start_gateway(identity_settings(issuer, rules=rules))
        alice = issuer.mint("u-alice", email="alice@example.com", groups=["agents"])
        for user in ("someone", "u-alice"):
            sessions.enter_context(psycopg.connect(token_dsn(gateway, alice, user=user)))
        error = refused(gateway, user="other-name", password=alice, ssl=client_tls())
        assert error.sqlstate == "53300"
        assert "too many connections for identity" in str(error)
        assert "(at most 2 at once)" in str(error)
        bob = issuer.mint("u-bob", email="bob@example.com", groups=["agents"])
        for _ in range(2):
            sessions.enter_context(psycopg.connect(token_dsn(gateway, bob)))


def test_the_ledger_reuses_the_places_of_identities_gone() -> None:
    """Identities come and go: a worker's table keeps counting after many more distinct
    callers than it has slots, and refuses (fails closed) only when that many are open."""
    ledger = SessionLedger(1, max_total=None, max_per_identity=2)
    for round_no in range(3):
        admitted = [ledger.admit(Identity(name=f"agent-{round_no}-{i}")) for i in range(SLOTS)]
        assert ledger.open_sessions() == SLOTS
        with pytest.raises(GatewayError, match="too many distinct identities"):
            ledger.admit(Identity(name=f"agent-{round_no}-extra"))
        for admission in admitted:
            ledger.release(admission)
        assert ledger.open_sessions() == 0
    same = Identity(name="agent")
    kept = [ledger.admit(same), ledger.admit(same)]
    with pytest.raises(GatewayError, match='too many connections for identity "agent" '):
        ledger.admit(same)
    ledger.release(kept[0])
    assert ledger.open_sessions(same) == 1
    ledger.admit(same)

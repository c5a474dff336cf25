"""Audit spans carry the token identity: subject, name, groups, issuer, mapped role, rule.

A real development OIDC issuer mints the token; psql, psycopg and asyncpg connect with it
through a gateway that ships its audit trail to a real OTLP receiver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness import TEST_DATABASE, GatewayLauncher, run_tool
from identity_support import (
    ANALYST_ROLE,
    AUDIENCE,
    asyncpg_connect,
    create_identity_roles,
    identity_settings,
    running_gateway,
    token_dsn,
    tool_env,
)
from otlp_receiver import OtlpReceiver, ReceivedSpan
from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.pgcluster import TemporaryCluster

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3


@pytest.fixture(scope="module")
def issuer(cluster: TemporaryCluster) -> Iterator[DevIssuer]:
    create_identity_roles(cluster)
    with DevIssuer(audience=AUDIENCE) as dev:
        yield dev


def test_every_client_statement_carries_the_token_identity(
    gateway_launcher: GatewayLauncher, issuer: DevIssuer, tmp_path: Path
) -> None:
    token = issuer.mint("u-alice", email="alice@example.com", groups=["analysts"])
    with OtlpReceiver("grpc") as receiver:
        settings = identity_settings(issuer)
        settings["audit"] = {
            "directory": str(tmp_path / "audit"),
            "exporter": "otlp_grpc",
            "endpoint": receiver.endpoint,
            "poll_interval_ms": 50,
        }
        with running_gateway(gateway_launcher, settings) as gateway:
            psql = run_tool(
                ["psql", "--no-psqlrc", "-X", "-c", "select 'from psql' as client"],
                tool_env(gateway, token),
            )
            assert psql.returncode == 0, psql.stderr
            with psycopg.connect(token_dsn(gateway, token)) as conn:
                conn.execute("select %s::text as client", ("from psycopg",))

            async def with_asyncpg() -> None:
                conn = await asyncpg_connect(gateway, token)
                try:
                    await conn.fetch("select 'from asyncpg' as client")
                finally:
                    await conn.close()

            asyncio.run(with_asyncpg())
            texts = {
                "select 'from psql' as client",
                "select $1::text as client",
                "select 'from asyncpg' as client",
            }

            def complete(spans: list[ReceivedSpan]) -> bool:
                mine = [s for s in spans if s.attributes.get("db.query.text") in texts]
                sessions = {s.attributes["pgwarden.session.id"] for s in mine}
                ended = {
                    s.attributes.get("pgwarden.session.id")
                    for s in spans
                    if s.kind == SPAN_KIND_SERVER
                }
                return len(mine) == 3 and sessions <= ended

            spans = receiver.wait_for(complete, timeout=60)
    sessions = {s.span_id: s for s in spans if s.kind == SPAN_KIND_SERVER}
    for text in texts:
        (span,) = [s for s in spans if s.attributes.get("db.query.text") == text]
        a = span.attributes
        assert span.kind == SPAN_KIND_CLIENT
        assert a["user.id"] == "u-alice"
        assert a["user.email"] == "alice@example.com"
        assert a["user.roles"] == ["analysts"]
        assert a["pgwarden.identity.issuer"] == issuer.issuer
        assert a["pgwarden.identity.rule"] == "analysts"
        assert a["pgwarden.upstream.role"] == ANALYST_ROLE
        assert a["db.namespace"] == TEST_DATABASE
        session = sessions[span.parent_span_id]
        assert session.trace_id == span.trace_id
        assert session.attributes["user.id"] == "u-alice"
        assert session.attributes["pgwarden.session.tls"] is True

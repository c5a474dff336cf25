"""Shared pieces of the identity tests: upstream roles, a dev issuer, gateway settings."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from harness import (
    TEST_DATABASE,
    GatewayLauncher,
    GatewayProcess,
    settings_env,
    stop_and_check,
)
from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.pgcluster import TemporaryCluster

AUDIENCE = "pgwarden-tests"

# Upstream roles identities are mapped to; only the gateway's settings hold their passwords.
ANALYST_ROLE = "pgw_analyst"
ANALYST_PASSWORD = "analyst-upstream-Secret-4c1d"
CI_ROLE = "pgw_ci"
CI_PASSWORD = "ci-upstream-Secret-8e2f"
AUDITOR_ROLE = "pgw_auditor"
AUDITOR_PASSWORD = "auditor-upstream-Secret-0b7a"
# A role the analyst is a member of: SET ROLE to it works on a direct connection.
PRIVILEGED_ROLE = "pgw_privileged"

ROLE_PASSWORDS = {
    ANALYST_ROLE: ANALYST_PASSWORD,
    CI_ROLE: CI_PASSWORD,
    AUDITOR_ROLE: AUDITOR_PASSWORD,
}


def create_identity_roles(cluster: TemporaryCluster) -> None:
    statements = ["set password_encryption = 'scram-sha-256'"]
    for role, password in ROLE_PASSWORDS.items():
        statements.append(
            f"do $$begin if not exists (select from pg_roles where rolname = '{role}') then "
            f"create role {role} login password '{password}'; end if; end$$"
        )
    statements.append(
        f"do $$begin if not exists (select from pg_roles where rolname = '{PRIVILEGED_ROLE}') "
        f"then create role {PRIVILEGED_ROLE} nologin; end if; end$$"
    )
    statements.append(f"grant {PRIVILEGED_ROLE} to {ANALYST_ROLE}")
    roles = ", ".join(ROLE_PASSWORDS)
    statements.append(f"grant connect on database {TEST_DATABASE} to {roles}")
    cluster.psql(";\n".join(statements) + ";")


def identity_settings(
    *issuers: DevIssuer,
    rules: list[dict[str, Any]] | None = None,
    **identity: Any,
) -> dict[str, Any]:
    """Gateway settings with ``identity`` configured for ``issuers`` (first: people, RSA)."""
    issuer_list = [
        {
            "issuer": issuer.issuer,
            "audience": [AUDIENCE],
            "algorithms": ["RS256", "ES256"],
            "leeway_seconds": 0,
        }
        for issuer in issuers
    ]
    default_rules = [
        {"name": "blocked", "action": "deny", "subjects": ["mallory"]},
        {
            "name": "analysts",
            "groups": ["analysts"],
            "roles": [ANALYST_ROLE, AUDITOR_ROLE],
            "databases": [TEST_DATABASE],
        },
    ]
    settings: dict[str, Any] = {
        "issuers": issuer_list,
        "rules": rules if rules is not None else default_rules,
        "roles": [{"name": role, "password": pw} for role, pw in ROLE_PASSWORDS.items()],
        "jwks_min_refresh_seconds": 60,
    }
    settings.update(identity)
    return {"identity": settings}


def token_dsn(
    gateway: GatewayProcess, token: str, user: str = "someone", **options: str | int
) -> str:
    """libpq connection string with ``token`` as the password, TLS on."""
    merged: dict[str, str | int] = {"sslmode": "require", **options}
    return gateway.dsn(user=user, password=token, **merged)


def client_tls() -> ssl.SSLContext:
    """TLS for asyncpg without certificate checks (as sslmode=require)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def asyncpg_connect(
    gateway: GatewayProcess, token: str, user: str = "someone", **kwargs: Any
) -> asyncpg.Connection:
    return await gateway.connect_asyncpg(
        **{"user": user, "password": token, "ssl": client_tls(), **kwargs}
    )


def tool_env(gateway: GatewayProcess, token: str, user: str = "someone") -> dict[str, str]:
    """Environment for psql through the gateway with ``token`` as the password, TLS on."""
    return {**gateway.env(user=user, password=token), "PGSSLMODE": "require"}


def gateway_cli_env(gateway: GatewayProcess) -> dict[str, str]:
    """The gateway's own settings as ``PGWARDEN_*`` variables (for ``pgwarden grants``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    env.update(settings_env(gateway.settings))
    return env


def read_events(path: Path) -> list[dict[str, Any]]:
    """Connection events from a statement log file."""
    events = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if str(record.get("event", "")).startswith("connection."):
                events.append(record)
    return events


def events_in_stderr(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """Connection events the gateway logged (no statement log configured)."""
    found = []
    for line in gateway.stderr.splitlines():
        if "pgwarden.connections:" in line:
            found.append(json.loads(line.split("pgwarden.connections: ", 1)[1]))
    return found


# --- gateways -------------------------------------------------------------------------------


@contextlib.contextmanager
def running_gateway(
    launcher: GatewayLauncher, settings: Mapping[str, Any]
) -> Iterator[GatewayProcess]:
    gateway = launcher.start(settings)
    try:
        yield gateway
    finally:
        stop_and_check(gateway)

"""Sessions end on time: at token expiry (with a grace for a running statement) and when the
time-bound grant they use is revoked (``pgwarden grants``, through the admin socket)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import psycopg
import pytest

from harness import (
    StartGateway,
    backends_running,
    gateway_command,
    wait_until,
)
from identity_support import (
    ANALYST_ROLE,
    AUDIENCE,
    AUDITOR_ROLE,
    create_identity_roles,
    gateway_cli_env,
    identity_settings,
    read_events,
    token_dsn,
)
from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.pgcluster import TemporaryCluster

pytestmark = pytest.mark.usefixtures("identity_roles")


@pytest.fixture(scope="module")
def identity_roles(cluster: TemporaryCluster) -> None:
    create_identity_roles(cluster)


@pytest.fixture(scope="module")
def dev_issuer() -> Iterator[DevIssuer]:
    with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


def _fatal(conn: psycopg.Connection[object], sql: str = "select 1") -> psycopg.Error:
    with pytest.raises(psycopg.Error) as caught:
        conn.execute(sql)
    return caught.value


# --- token expiry -----------------------------------------------------------------------------


def test_idle_session_ends_when_the_token_expires(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    log_path = tmp_path / "statements.jsonl"
    settings = identity_settings(dev_issuer, expiry_grace_seconds=1)
    settings["statement_log"] = str(log_path)
    gateway = start_gateway(settings)
    token = dev_issuer.mint("u-alice", groups=["analysts"], ttl_seconds=3)
    conn = psycopg.connect(token_dsn(gateway, token), autocommit=True)
    assert conn.execute("select current_user").fetchone() == (ANALYST_ROLE,)
    time.sleep(3.8)
    error = _fatal(conn)
    assert error.sqlstate == "57P01", error
    assert "access token expired at" in str(error)
    assert conn.closed
    assert wait_until(
        lambda: any(e.get("reason") == "token_expired" for e in read_events(log_path)), 5
    )


def test_running_statement_gets_the_grace_then_is_cancelled(
    start_gateway: StartGateway, dev_issuer: DevIssuer, superuser: psycopg.Connection[object]
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer, expiry_grace_seconds=1.5))
    token = dev_issuer.mint("u-alice", groups=["analysts"], ttl_seconds=2)
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    conn = psycopg.connect(token_dsn(gateway, token), autocommit=True)
    error = _fatal(conn, "select pg_sleep(30) -- expiry-victim")
    ended_at = time.time()
    assert error.sqlstate == "57P01", error
    assert "access token expired" in str(error)
    # At exp + grace (leeway 0 in these settings), not when the statement would have ended.
    assert expires_at + 1.5 - 0.2 <= ended_at < expires_at + 1.5 + 3, ended_at - expires_at
    # The statement does not run on unobserved upstream.
    assert wait_until(lambda: not backends_running(superuser, "expiry-victim"), 10)


def test_statement_finishing_within_the_grace_completes(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer, expiry_grace_seconds=5))
    token = dev_issuer.mint("u-alice", groups=["analysts"], ttl_seconds=2)
    conn = psycopg.connect(token_dsn(gateway, token), autocommit=True)
    started = time.monotonic()
    # Expiry happens one second into this statement; it has 5 s of grace to finish.
    assert conn.execute("select pg_sleep(3), 'done'").fetchone() == ("", "done")
    assert time.monotonic() - started < 5
    error = _fatal(conn)
    assert error.sqlstate == "57P01"


# --- grants ----------------------------------------------------------------------------------


def grants_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("grants", *args),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_grant_lets_an_identity_in_and_revoking_it_ends_its_sessions(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    settings = identity_settings(
        dev_issuer,
        user_field="role",
        grants_file=str(tmp_path / "grants.json"),
        admin_dir=str(tmp_path / "admin"),
        grants_poll_seconds=60,  # the admin socket, not the poll, must make it immediate
    )
    gateway = start_gateway(settings)
    env = gateway_cli_env(gateway)
    token = dev_issuer.mint("contractor-7", email="c7@example.com", groups=["contractors"])

    # No rule matches the contractor: default deny.
    with pytest.raises(psycopg.OperationalError, match="default deny"):
        psycopg.connect(token_dsn(gateway, token, user=AUDITOR_ROLE))

    added = grants_cli(
        env,
        "add",
        "--subject",
        "contractor-7",
        "--role",
        AUDITOR_ROLE,
        "--for",
        "10m",
        "--reason",
        "incident 42",
    )
    assert added.returncode == 0, added.stderr
    grant_id = added.stdout.split(":", 1)[0]
    assert "1 gateway worker(s) updated" in added.stdout, added.stdout

    conn = psycopg.connect(token_dsn(gateway, token, user=AUDITOR_ROLE), autocommit=True)
    assert conn.execute("select current_user").fetchone() == (AUDITOR_ROLE,)
    # The grant is for the auditor role only.
    with pytest.raises(psycopg.OperationalError, match="not allowed"):
        psycopg.connect(token_dsn(gateway, token, user=ANALYST_ROLE))

    listed = grants_cli(env, "list", "--json")
    assert [g["id"] for g in json.loads(listed.stdout)] == [grant_id]
    sessions = grants_cli(env, "sessions")
    assert json.loads(sessions.stdout)[0]["sessions"][0]["grant"] == grant_id

    revoked = grants_cli(env, "revoke", grant_id)
    assert revoked.returncode == 0, revoked.stderr
    assert "1 session(s) ended" in revoked.stdout, revoked.stdout
    error = _fatal(conn)
    assert error.sqlstate == "57P01"
    assert f"grant {grant_id} was revoked" in str(error)
    with pytest.raises(psycopg.OperationalError, match="default deny"):
        psycopg.connect(token_dsn(gateway, token, user=AUDITOR_ROLE))


def test_grant_expiry_ends_the_session_and_the_file_is_watched(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    from pgwarden.identity.grants import Grant, GrantStore

    grants_file = tmp_path / "grants.json"
    gateway = start_gateway(
        identity_settings(
            dev_issuer,
            grants_file=str(grants_file),
            grants_poll_seconds=0.3,
            expiry_grace_seconds=1,
        )
    )
    # Written straight to the file (no admin socket): the gateway's poll picks it up.
    expires_at = time.time() + 4
    GrantStore(grants_file).add(
        Grant(id="g-short", subject="contractor-8", role=AUDITOR_ROLE, expires_at=expires_at)
    )
    token = dev_issuer.mint("contractor-8", groups=["contractors"])

    def connect() -> psycopg.Connection[object] | None:
        try:
            return psycopg.connect(token_dsn(gateway, token), autocommit=True)
        except psycopg.OperationalError:
            return None

    conn: psycopg.Connection[object] | None = None

    def connected() -> bool:
        nonlocal conn
        conn = connect()
        return conn is not None

    assert wait_until(connected, 3)
    assert conn is not None
    assert conn.execute("select current_user").fetchone() == (AUDITOR_ROLE,)
    time.sleep(max(0.0, expires_at - time.time()) + 0.6)
    error = _fatal(conn)
    assert error.sqlstate == "57P01"
    assert "grant g-short" in str(error) and "expired at" in str(error)


def test_grants_cli_checks_its_input(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    gateway = start_gateway(
        identity_settings(dev_issuer, grants_file=str(tmp_path / "grants.json"))
    )
    env = gateway_cli_env(gateway)
    unknown = grants_cli(env, "add", "--subject", "x", "--role", "postgres", "--for", "1h")
    assert unknown.returncode == 2
    assert "not in identity.roles" in unknown.stderr
    past = grants_cli(
        env, "add", "--subject", "x", "--role", AUDITOR_ROLE, "--until", "2001-01-01T00:00:00Z"
    )
    assert past.returncode == 2
    missing = grants_cli(env, "revoke", "g-nothere")
    assert missing.returncode == 1
    # The default admin directory (/tmp/pgwarden-<uid>-<port>) is found from the settings.
    added = grants_cli(env, "add", "--subject", "x", "--role", AUDITOR_ROLE, "--for", "1h")
    assert added.returncode == 0, added.stderr
    assert "1 gateway worker(s) updated" in added.stdout


def test_grant_changes_reach_every_worker(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    gateway = start_gateway(
        identity_settings(
            dev_issuer,
            grants_file=str(tmp_path / "grants.json"),
            grants_poll_seconds=60,
        )
        | {"workers": 2}
    )
    env = gateway_cli_env(gateway)
    token = dev_issuer.mint("contractor-9", groups=["contractors"])
    added = grants_cli(
        env, "add", "--subject", "contractor-9", "--role", AUDITOR_ROLE, "--for", "5m"
    )
    assert "2 gateway worker(s) updated" in added.stdout, added.stdout + added.stderr
    grant_id = added.stdout.split(":", 1)[0]
    # Whichever worker the kernel hands them to, new connections see the grant.
    connections = [psycopg.connect(token_dsn(gateway, token), autocommit=True) for _ in range(6)]
    revoked = grants_cli(env, "revoke", grant_id)
    assert "6 session(s) ended" in revoked.stdout, revoked.stdout
    for conn in connections:
        assert _fatal(conn).sqlstate == "57P01"

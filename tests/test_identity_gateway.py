"""OIDC tokens through the gateway with real clients (psql, psycopg, asyncpg).

A development issuer serves discovery and JWKS on loopback; the gateway validates tokens
against it, maps identities to upstream roles and logs in as them with credentials only its
settings hold.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import jwt
import psycopg
import pytest

from harness import (
    TEST_DATABASE,
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    run_tool,
    wait_until,
)
from identity_support import (
    ANALYST_PASSWORD,
    ANALYST_ROLE,
    AUDIENCE,
    AUDITOR_ROLE,
    CI_ROLE,
    asyncpg_connect,
    create_identity_roles,
    events_in_stderr,
    identity_settings,
    read_events,
    running_gateway,
    token_dsn,
    tool_env,
)
from pgproto import RawConnection
from pgwarden.identity.dev_issuer import JWKS_PATH, DevIssuer, SigningKey
from pgwarden.pgcluster import TemporaryCluster

pytestmark = pytest.mark.usefixtures("identity_roles")


@pytest.fixture(scope="module")
def identity_roles(cluster: TemporaryCluster) -> None:
    create_identity_roles(cluster)


@pytest.fixture(scope="module")
def dev_issuer() -> Iterator[DevIssuer]:
    """An issuer shared by the module's tests (which must not rotate its keys)."""
    with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


@pytest.fixture
def fresh_issuer() -> Iterator[DevIssuer]:
    """An issuer of the test's own: rotate, retire and count requests freely."""
    with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def shared_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("identity-log") / "statements.jsonl"


@pytest.fixture(scope="module")
def token_gateway(
    gateway_launcher: GatewayLauncher, dev_issuer: DevIssuer, identity_roles: None, shared_log: Path
) -> Any:
    """One gateway for the tests that need no special settings (statement log on)."""
    settings = identity_settings(dev_issuer, max_token_bytes=4096)
    settings["statement_log"] = str(shared_log)
    with running_gateway(gateway_launcher, settings) as gateway:
        yield gateway


def analyst_token(issuer: DevIssuer, **kwargs: Any) -> str:
    return issuer.mint("u-alice", email="alice@example.com", groups=["analysts"], **kwargs)


# --- a valid token works with every client --------------------------------------------------


def test_psql_with_a_token(token_gateway: GatewayProcess, dev_issuer: DevIssuer) -> None:
    token = analyst_token(dev_issuer)
    result = run_tool(
        ["psql", "--no-psqlrc", "-At", "-c", "select current_user, session_user"],
        tool_env(token_gateway, token),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{ANALYST_ROLE}|{ANALYST_ROLE}"


def test_psycopg_with_a_token(token_gateway: GatewayProcess, dev_issuer: DevIssuer) -> None:
    with psycopg.connect(token_dsn(token_gateway, analyst_token(dev_issuer))) as conn:
        assert conn.info.pgconn.ssl_in_use
        row = conn.execute("select current_user, session_user, current_database()").fetchone()
        assert row == (ANALYST_ROLE, ANALYST_ROLE, TEST_DATABASE)
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)


@pytest.mark.anyio
async def test_asyncpg_with_a_token(token_gateway: GatewayProcess, dev_issuer: DevIssuer) -> None:
    conn = await asyncpg_connect(token_gateway, analyst_token(dev_issuer))
    try:
        row = await conn.fetchrow("select current_user, session_user")
        assert tuple(row) == (ANALYST_ROLE, ANALYST_ROLE)
        statement = await conn.prepare("select $1::int * 2")
        assert await statement.fetchval(21) == 42
    finally:
        await conn.close()


def test_the_client_never_sees_the_upstream_credential(
    token_gateway: GatewayProcess, dev_issuer: DevIssuer
) -> None:
    raw = RawConnection.open(token_gateway.host, token_gateway.port)
    import ssl

    from pgproto import SSL_REQUEST_CODE, request_code_message, startup_message

    raw.send(request_code_message(SSL_REQUEST_CODE))
    assert raw.read_byte() == b"S"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw.sock = context.wrap_socket(raw.sock)
    raw.send(startup_message([("user", "someone"), ("database", TEST_DATABASE)]))
    messages = raw.authenticate(analyst_token(dev_issuer))
    messages += raw.simple_query("select 1")
    raw.close()
    assert ANALYST_PASSWORD.encode() not in raw.received


# --- refusals, with the SQLSTATE a client can act on ------------------------------------------


async def refused(gateway: GatewayProcess, token: str, user: str = "someone") -> Exception:
    with pytest.raises(asyncpg.PostgresError) as caught:
        conn = await asyncpg_connect(gateway, token, user=user)
        await conn.close()
    for part in token.split("."):
        if len(part) > 8:
            assert part not in str(caught.value)
    return caught.value


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("case", "sqlstate", "text"),
    [
        ("expired", "28P01", "token expired at 20"),
        ("not_yet_valid", "28P01", "token not valid before 20"),
        ("wrong_issuer", "28P01", "issuer not trusted"),
        ("wrong_audience", "28P01", "audience mismatch"),
        ("alg_none", "28P01", "alg none"),
        ("hs256_with_public_key", "28P01", "HS256 is not allowed"),
        ("tampered", "28P01", "signature verification failed"),
        ("unknown_kid", "28P01", "unknown kid"),
        ("oversize", "28P01", "token too large"),
        ("not_a_token", "28P01", "not a token"),
        ("no_rule", "28000", "no role mapping rule matches this identity (default deny)"),
        ("deny_rule", "28000", "access denied by rule 'blocked'"),
    ],
)
async def test_refused_with_the_right_sqlstate(
    token_gateway: GatewayProcess,
    dev_issuer: DevIssuer,
    case: str,
    sqlstate: str,
    text: str,
) -> None:
    now = int(time.time())
    claims = jwt.decode(analyst_token(dev_issuer), options={"verify_signature": False})
    header, payload, signature = analyst_token(dev_issuer).split(".")
    tokens = {
        "expired": lambda: analyst_token(dev_issuer, claims={"exp": now - 30, "iat": now - 90}),
        "not_yet_valid": lambda: analyst_token(dev_issuer, claims={"nbf": now + 600}),
        "wrong_issuer": lambda: analyst_token(dev_issuer, claims={"iss": "https://evil.example"}),
        "wrong_audience": lambda: analyst_token(dev_issuer, audience="another-service"),
        "alg_none": lambda: jwt.encode(claims, None, algorithm="none"),
        "hs256_with_public_key": lambda: _hs256(claims, dev_issuer.current_key.public_pem()),
        "tampered": lambda: f"{header}.{_with_claim(payload, 'sub', 'u-bob')}.{signature}",
        "unknown_kid": lambda: analyst_token(dev_issuer, key=SigningKey.generate("EC")),
        "oversize": lambda: analyst_token(dev_issuer, claims={"pad": "x" * 5000}),
        "not_a_token": lambda: "a-static-password",
        "no_rule": lambda: dev_issuer.mint("u-carol", groups=["sales"]),
        "deny_rule": lambda: dev_issuer.mint("mallory", groups=["analysts"]),
    }
    error = await refused(token_gateway, tokens[case]())
    assert error.sqlstate == sqlstate, error
    assert text in str(error)


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{b64(header)}.{b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _with_claim(payload: str, name: str, value: str) -> str:
    import base64
    import json

    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims[name] = value
    return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()


def test_plaintext_token_refused_when_tls_is_required(
    token_gateway: GatewayProcess, dev_issuer: DevIssuer
) -> None:
    conn = RawConnection.open(token_gateway.host, token_gateway.port)
    conn.startup("someone", TEST_DATABASE)
    first = conn.read_message()
    conn.close()
    # Refused before the password is even asked for: the token never crosses in clear.
    assert first.tag == b"E", first
    assert first.sqlstate == "28000"
    assert "accepted only over TLS" in first.fields["M"]
    with pytest.raises(psycopg.OperationalError, match="accepted only over TLS"):
        psycopg.connect(token_dsn(token_gateway, analyst_token(dev_issuer), sslmode="disable"))


def test_plaintext_allowed_by_the_dev_setting(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer, allow_plaintext_password=True))
    dsn = token_dsn(gateway, analyst_token(dev_issuer), sslmode="disable")
    with psycopg.connect(dsn) as conn:
        assert not conn.info.pgconn.ssl_in_use
        assert conn.execute("select current_user").fetchone() == (ANALYST_ROLE,)


# --- events -----------------------------------------------------------------------------------


def test_every_connection_produces_an_event(
    token_gateway: GatewayProcess, dev_issuer: DevIssuer, shared_log: Path
) -> None:
    token = analyst_token(dev_issuer)
    with psycopg.connect(token_dsn(token_gateway, token, application_name="events")) as conn:
        conn.execute("select 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(token_dsn(token_gateway, analyst_token(dev_issuer, audience="nope")))

    def both_seen() -> bool:
        kinds = [e["event"] for e in read_events(shared_log)]
        return "connection.accepted" in kinds and "connection.ended" in kinds

    assert wait_until(both_seen, 5)
    events = read_events(shared_log)
    accepted = [e for e in events if e["event"] == "connection.accepted"][-1]
    assert accepted["issuer"] == dev_issuer.issuer
    assert accepted["subject"] == "u-alice"
    assert accepted["email"] == "alice@example.com"
    assert accepted["groups"] == ["analysts"]
    assert accepted["role"] == ANALYST_ROLE
    assert accepted["rule"] == "analysts"
    assert accepted["client_addr"] == "127.0.0.1"
    assert accepted["tls"] is True
    refused_events = [e for e in events if e["event"] == "connection.refused"]
    audience = [e for e in refused_events if e.get("reason") == "audience_mismatch"][-1]
    assert audience["issuer"] == dev_issuer.issuer
    assert audience["sqlstate"] == "28P01"
    assert audience["client_addr"] == "127.0.0.1"
    # No line of the log holds a token or a credential.
    text = shared_log.read_text()
    assert token.split(".")[2] not in text
    assert ANALYST_PASSWORD not in text
    # Statement records say who ran them.
    records = [
        json_line
        for json_line in map(_json, text.splitlines())
        if json_line.get("statement") == "select 1"
    ]
    assert records and records[-1]["user"] == "alice@example.com"
    assert records[-1]["upstream_user"] == ANALYST_ROLE


def _json(line: str) -> dict[str, Any]:
    import json

    value: dict[str, Any] = json.loads(line)
    return value


def test_events_go_to_the_gateway_log_without_a_statement_log(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer))
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(token_dsn(gateway, dev_issuer.mint("u-dave", groups=["nobody"])))
    assert wait_until(lambda: bool(events_in_stderr(gateway)), 5)
    event = events_in_stderr(gateway)[-1]
    assert event["event"] == "connection.refused"
    assert event["reason"] == "no_rule"
    assert event["subject"] == "u-dave"


def test_refusals_before_authentication_produce_events_too(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer) | {"require_client_tls": True})
    conn = RawConnection.open(gateway.host, gateway.port)
    conn.startup("someone", TEST_DATABASE)
    error = conn.read_error_or_close()
    conn.close()
    assert error is not None and error.sqlstate == "28000"
    assert wait_until(lambda: bool(events_in_stderr(gateway)), 5)
    event = events_in_stderr(gateway)[-1]
    assert (event["event"], event["reason"], event["sqlstate"]) == (
        "connection.refused",
        "startup",
        "28000",
    )
    assert event["client_addr"] == "127.0.0.1"


# --- startup parameters and the user field ------------------------------------------------------


def test_identity_changing_startup_parameters_refused(
    token_gateway: GatewayProcess, dev_issuer: DevIssuer
) -> None:
    token = analyst_token(dev_issuer)
    for options in ("-c role=pgw_privileged", "-c session_authorization=postgres"):
        with pytest.raises(psycopg.OperationalError, match='startup parameter "options"'):
            psycopg.connect(token_dsn(token_gateway, token, options=options))
    # search_path passes unless the policy protects it.
    with psycopg.connect(token_dsn(token_gateway, token, options="")) as conn:
        conn.execute("select 1")


@pytest.mark.anyio
async def test_protected_parameters_stripped_and_recorded(
    start_gateway: StartGateway, dev_issuer: DevIssuer, tmp_path: Path
) -> None:
    log_path = tmp_path / "statements.jsonl"
    settings = identity_settings(dev_issuer, startup_parameters="strip", protect_search_path=True)
    settings["statement_log"] = str(log_path)
    gateway = start_gateway(settings)
    conn = await asyncpg_connect(
        gateway,
        analyst_token(dev_issuer),
        server_settings={"search_path": "pg_catalog", "role": "pgw_privileged"},
    )
    try:
        row = await conn.fetchrow("select current_user, current_setting('search_path')")
        assert row[0] == ANALYST_ROLE
        assert row[1] == '"$user", public'  # the server's default: the parameter was stripped
    finally:
        await conn.close()
    assert wait_until(
        lambda: any(e["event"] == "connection.accepted" for e in read_events(log_path)), 5
    )
    accepted = [e for e in read_events(log_path) if e["event"] == "connection.accepted"][-1]
    assert accepted["withheld_params"] == ["role", "search_path"]


@pytest.mark.anyio
async def test_user_field_selects_among_allowed_roles(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer, user_field="role"))
    token = analyst_token(dev_issuer)
    for role in (ANALYST_ROLE, AUDITOR_ROLE):
        conn = await asyncpg_connect(gateway, token, user=role)
        assert await conn.fetchval("select current_user") == role
        await conn.close()
    error = await refused(gateway, token, user=CI_ROLE)
    assert error.sqlstate == "28000"
    assert f"role '{CI_ROLE}' is not allowed" in str(error)


@pytest.mark.anyio
async def test_user_field_must_match_the_token(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(dev_issuer, user_field="identity"))
    token = analyst_token(dev_issuer)
    for user in ("u-alice", "Alice@Example.com"):
        conn = await asyncpg_connect(gateway, token, user=user)
        assert await conn.fetchval("select current_user") == ANALYST_ROLE
        await conn.close()
    error = await refused(gateway, token, user="u-bob")
    assert error.sqlstate == "28000"
    assert "does not match the token" in str(error)


@pytest.mark.anyio
async def test_database_not_allowed(token_gateway: GatewayProcess, dev_issuer: DevIssuer) -> None:
    with pytest.raises(asyncpg.PostgresError) as caught:
        await asyncpg_connect(token_gateway, analyst_token(dev_issuer), database="postgres")
    assert caught.value.sqlstate == "28000"
    assert "database 'postgres' is not allowed" in str(caught.value)


# --- several issuers, rotation, the unknown-kid flood ---------------------------------------


@pytest.mark.anyio
async def test_a_person_and_a_ci_workload_issuer_side_by_side(
    start_gateway: StartGateway, dev_issuer: DevIssuer
) -> None:
    with DevIssuer(audience=AUDIENCE, key=SigningKey.generate("EC")) as ci:
        rules = [
            {
                "name": "deploys from main",
                "issuer": ci.issuer,
                "claims": {"repository": "acme/app", "ref": "refs/heads/main"},
                "roles": [CI_ROLE],
            },
            {
                "name": "analysts",
                "issuer": dev_issuer.issuer,
                "groups": ["analysts"],
                "roles": [ANALYST_ROLE],
            },
        ]
        settings = identity_settings(dev_issuer, ci, rules=rules)
        settings["identity"]["issuers"][1]["groups_claim"] = None
        gateway = start_gateway(settings)

        def workload(ref: str) -> str:
            return ci.mint(
                f"repo:acme/app:ref:{ref}",
                claims={"repository": "acme/app", "ref": ref, "groups": ["analysts"]},
            )

        conn = await asyncpg_connect(gateway, workload("refs/heads/main"))
        assert await conn.fetchval("select current_user") == CI_ROLE
        await conn.close()
        conn = await asyncpg_connect(gateway, analyst_token(dev_issuer))
        assert await conn.fetchval("select current_user") == ANALYST_ROLE
        await conn.close()
        # A branch build does not match; its "groups" claim is not read for this issuer.
        error = await refused(gateway, workload("refs/heads/feature"))
        assert error.sqlstate == "28000"


@pytest.mark.anyio
async def test_key_rotation_mid_run(start_gateway: StartGateway, fresh_issuer: DevIssuer) -> None:
    gateway = start_gateway(identity_settings(fresh_issuer, jwks_min_refresh_seconds=1))
    old_token = analyst_token(fresh_issuer)
    before = await asyncpg_connect(gateway, old_token)  # stays open across the rotation
    assert await before.fetchval("select 1") == 1

    await anyio.sleep(1.1)  # the unknown-kid rate limit allows a refresh again
    fresh_issuer.rotate(retire_old=True)
    fetches = fresh_issuer.requests[JWKS_PATH]
    conn = await asyncpg_connect(gateway, analyst_token(fresh_issuer))
    assert await conn.fetchval("select current_user") == ANALYST_ROLE
    await conn.close()
    assert fresh_issuer.requests[JWKS_PATH] == fetches + 1
    assert await before.fetchval("select 2") == 2  # sessions already open are unaffected
    await before.close()


@pytest.mark.anyio
async def test_flood_of_unknown_kids_does_not_flood_the_jwks_endpoint(
    start_gateway: StartGateway, fresh_issuer: DevIssuer
) -> None:
    gateway = start_gateway(identity_settings(fresh_issuer, jwks_min_refresh_seconds=60))
    conn = await asyncpg_connect(gateway, analyst_token(fresh_issuer))
    await conn.close()
    assert wait_until(lambda: fresh_issuer.requests[JWKS_PATH] >= 1, 5)
    baseline = fresh_issuer.requests[JWKS_PATH]

    junk = [analyst_token(fresh_issuer, key=SigningKey.generate("EC")) for _ in range(10)]
    sqlstates: list[str] = []

    async def attempt(token: str) -> None:
        sqlstates.append((await refused(gateway, token)).sqlstate)

    async with anyio.create_task_group() as group:
        for token in junk * 4:
            group.start_soon(attempt, token)
    assert sqlstates == ["28P01"] * 40
    assert fresh_issuer.requests[JWKS_PATH] - baseline <= 1

"""``pgwarden demo``: a gateway in front of a throwaway PostgreSQL, ready in seconds.

The walkthrough: a temporary cluster with a small ``shop`` database, an upstream role
whose SCRAM password only the gateway holds, a development TLS certificate, a development
OIDC issuer (discovery and JWKS over HTTP on loopback, see
:mod:`pgwarden.identity.dev_issuer`) that mints the token used as the password, a config
file mapping the token's identity to the upstream role, and the gateway itself
(``pgwarden serve``) recording every statement to a JSON-lines file.  A few
:class:`DemoStep` statements are then run through the gateway with ``psql`` and the audit
records they produced are printed, so the audit trail is on screen within a minute.
Ctrl-C stops the gateway and removes everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from pgwarden.identity.dev_issuer import DevIssuer
from pgwarden.pgcluster import FAST_UNSAFE_SETTINGS, TemporaryCluster, find_free_port
from pgwarden.tls import generate_dev_certificate

DEFAULT_PORT = 6432
DEMO_DATABASE = "shop"
UPSTREAM_ROLE = "shop_app"
CLIENT_USER = "demo"
# The demo's identity: the token's subject and group, mapped to UPSTREAM_ROLE by a rule.
DEMO_SUBJECT = "demo"
DEMO_GROUP = "demo-users"
TOKEN_AUDIENCE = "pgwarden"
TOKEN_LIFETIME_SECONDS = 12 * 3600
GATEWAY_READY_LINE = re.compile(r"pgwarden listening on \S+:(\d+)")
GATEWAY_START_TIMEOUT = 30.0

SAMPLE_SCHEMA = """
create schema shop;
create table shop.customers (
    id         bigint generated always as identity primary key,
    name       text not null,
    email      text not null unique,
    phone      text,
    created_at timestamptz not null default now()
);
create table shop.orders (
    id          bigint generated always as identity primary key,
    customer_id bigint not null references shop.customers (id),
    total_cents integer not null check (total_cents >= 0),
    status      text not null check (status in ('placed', 'paid', 'shipped', 'cancelled')),
    placed_at   timestamptz not null
);
create index on shop.orders (customer_id);

insert into shop.customers (name, email, phone, created_at)
select 'Customer ' || g,
       'customer' || g || '@example.com',
       '+1-555-' || lpad((g % 10000)::text, 4, '0'),
       timestamptz '2024-01-01' + g * interval '37 minutes'
from generate_series(1, 1000) g;

insert into shop.orders (customer_id, total_cents, status, placed_at)
select 1 + (g * 7919) % 1000,
       500 + (g * 104729) % 50000,
       (array['placed', 'paid', 'shipped', 'cancelled'])[1 + g % 4],
       timestamptz '2024-02-01' + g * interval '11 minutes'
from generate_series(1, 5000) g;

analyze shop.customers;
analyze shop.orders;
"""


class DemoArgs(Protocol):
    """What ``pgwarden demo`` parses from its command line."""

    port: int | None
    keep: bool


@dataclass(frozen=True)
class DemoStep:
    """One statement the walkthrough runs through the gateway, and what it shows."""

    title: str
    sql: str
    explanation: str


#: The walkthrough, in order.
DEMO_STEPS: tuple[DemoStep, ...] = (
    DemoStep(
        title="An ordinary query",
        sql="select c.name, count(o.id) as orders, round(sum(o.total_cents) / 100.0, 2) as spent "
        "from shop.customers c join shop.orders o on o.customer_id = c.id "
        "group by c.name order by spent desc limit 3",
        explanation="Allowed, forwarded upstream as the role the token maps to, and recorded.",
    ),
    DemoStep(
        title="Who am I upstream",
        sql="select current_user, session_user",
        explanation="The gateway logged in as the mapped role, with a password only it holds.",
    ),
    DemoStep(
        title="A destructive statement",
        sql="drop table shop.orders",
        explanation='Refused by the statement policy (42501, rule "no schema changes"): the '
        "server raises the gateway's error in the statement's place, and the audit keeps "
        "the statement the client sent.",
    ),
    DemoStep(
        title="A masked column",
        sql="select id, name, email, phone from shop.customers order by id limit 3",
        explanation="The policy masks the customers' email and phone for the demo group (mask "
        '"customer contact details"): the gateway rewrites those values in the result rows, '
        "and the audit records that it did (masked_columns).",
    ),
    DemoStep(
        title="Reading around the mask",
        sql="select name from shop.customers where email like 'customer1@%'",
        explanation="Refused (42501): a masked column may be selected as it is, not filtered, "
        "computed with, sorted or copied elsewhere.",
    ),
    DemoStep(
        title="A role change",
        sql="set role postgres",
        explanation="Refused by pgwarden (42501): the role comes from the identity, not the "
        "client.",
    ),
)


@dataclass
class DemoEnvironment:
    """Everything the demo created; all of it lives under ``cluster.base_dir``."""

    cluster: TemporaryCluster
    gateway_port: int
    metrics_port: int = field(default_factory=lambda: find_free_port("127.0.0.1"))
    upstream_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    issuer: DevIssuer | None = None
    client_token: str = ""
    gateway: subprocess.Popen[bytes] | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @property
    def directory(self) -> Path:
        return self.cluster.base_dir

    @property
    def config_file(self) -> Path:
        return self.directory / "pgwarden.toml"

    @property
    def statement_log(self) -> Path:
        return self.directory / "statements.jsonl"

    @property
    def policy_file(self) -> Path:
        return self.directory / "policy.toml"

    @property
    def audit_dir(self) -> Path:
        return self.directory / "audit"

    @property
    def audit_spans(self) -> Path:
        """Where the demo's shipper writes the audit spans (console exporter, one per line)."""
        return self.directory / "audit-spans.jsonl"

    @property
    def gateway_log(self) -> Path:
        return self.directory / "gateway.log"

    @property
    def upstream_password_file(self) -> Path:
        return self.directory / "upstream.password"

    @property
    def issuer_state_dir(self) -> Path:
        return self.directory / "dev-issuer"

    def client_dsn(self) -> str:
        """What a user pastes: host, port, user, database; the password comes from the env."""
        return (
            f"host=127.0.0.1 port={self.gateway_port} user={CLIENT_USER} "
            f"dbname={DEMO_DATABASE} sslmode=require"
        )


class DemoError(RuntimeError):
    """The demo could not be set up; the message says what failed."""


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(args: DemoArgs) -> int:
    """Run the demo until Ctrl-C; returns the process exit code."""
    print("pgwarden demo: starting a temporary PostgreSQL...", flush=True)
    # SIGTERM (a supervisor, `timeout`, a closed terminal) cleans up exactly like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    cluster = TemporaryCluster(settings={**FAST_UNSAFE_SETTINGS, "max_connections": 50})
    env = DemoEnvironment(cluster=cluster, gateway_port=_choose_port(args.port))
    try:
        cluster.start()
        prepare_upstream(env)
        env.tls_cert_file, env.tls_key_file = generate_dev_certificate(env.directory)
        start_issuer(env)
        write_gateway_config(env)
        start_gateway(env)
        print_connection_help(env)
        for step in DEMO_STEPS:
            run_step(env, step)
        print("\nCtrl-C to stop.", flush=True)
        return wait_for_interrupt(env)
    except DemoError as exc:
        print(f"pgwarden demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_gateway(env)
        if env.issuer is not None:
            env.issuer.stop()
        if args.keep:
            cluster.stop()
            print(f"pgwarden demo: kept {env.directory} (PostgreSQL data, config, logs)")
        else:
            cluster.cleanup()
            print("pgwarden demo: stopped and cleaned up.")


# --- setting up ------------------------------------------------------------------------


def _choose_port(requested: int | None) -> int:
    """The requested port; for the default one, any free port if 6432 is taken."""
    if requested is not None and requested != DEFAULT_PORT:
        return requested
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", DEFAULT_PORT))
        except OSError:
            port = find_free_port()
            print(f"pgwarden demo: port {DEFAULT_PORT} is in use, using {port}", flush=True)
            return port
    return DEFAULT_PORT


def prepare_upstream(env: DemoEnvironment) -> None:
    """Create the sample database and the role the gateway logs in as (SCRAM)."""
    cluster = env.cluster
    cluster.psql(f"create database {DEMO_DATABASE}")
    cluster.psql(SAMPLE_SCHEMA, dbname=DEMO_DATABASE)
    password = env.upstream_password.replace("'", "''")
    cluster.psql(
        f"set password_encryption = 'scram-sha-256';\n"
        f"create role {UPSTREAM_ROLE} login password '{password}';\n"
        f"grant connect on database {DEMO_DATABASE} to {UPSTREAM_ROLE};\n",
    )
    cluster.psql(
        f"grant usage on schema shop to {UPSTREAM_ROLE};\n"
        f"grant select, insert, update on all tables in schema shop to {UPSTREAM_ROLE};\n",
        dbname=DEMO_DATABASE,
    )
    env.upstream_password_file.write_text(env.upstream_password + "\n", encoding="utf-8")
    env.upstream_password_file.chmod(0o600)


def start_issuer(env: DemoEnvironment) -> None:
    """The development OIDC issuer (a thread of this process) and the demo's token."""
    env.issuer = DevIssuer(audience=TOKEN_AUDIENCE).start()
    env.issuer.save_state(env.issuer_state_dir)
    env.client_token = env.issuer.mint(
        DEMO_SUBJECT, groups=[DEMO_GROUP], ttl_seconds=TOKEN_LIFETIME_SECONDS
    )


def gateway_config(env: DemoEnvironment) -> dict[str, object]:
    """The gateway's settings for the demo, as written to the TOML file."""
    return {
        "listen_host": "127.0.0.1",
        "listen_port": env.gateway_port,
        "tls_cert_file": env.tls_cert_file,
        "tls_key_file": env.tls_key_file,
        "statement_log": str(env.statement_log),
        "policy_file": str(env.policy_file),
        "metrics_listen": f"127.0.0.1:{env.metrics_port}",
        "audit": {
            "directory": str(env.audit_dir),
            "exporter": "console",
            "export_path": str(env.audit_spans),
            "poll_interval_ms": 100,
        },
        "upstream": {
            "host": env.cluster.host,
            "port": env.cluster.port,
            "user": UPSTREAM_ROLE,
            "password_file": str(env.upstream_password_file),
            "tls": "disable",
        },
        "identity": {
            "issuers": [
                {
                    "issuer": env.issuer.issuer if env.issuer is not None else None,
                    "audience": [TOKEN_AUDIENCE],
                    "algorithms": ["RS256"],
                }
            ],
            "rules": [
                {
                    "name": "demo users",
                    "groups": [DEMO_GROUP],
                    "roles": [UPSTREAM_ROLE],
                    "databases": [DEMO_DATABASE],
                    # One caller cannot take every backend: past it, FATAL 53300.
                    "max_connections": 10,
                }
            ],
            "roles": [{"name": UPSTREAM_ROLE, "password_file": str(env.upstream_password_file)}],
        },
    }


#: The demo's statement policy (docs/policy.md).
DEMO_POLICY: Final = f"""\
# pgwarden statement policy: the first rule that matches a statement decides it.
default = "deny"
version = "demo-1"

[[rule]]
name = "no server files"
functions = ["pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_import",
             "lo_export", "dblink*"]
action = "deny"
message = "Server files and remote connections are not reachable through the gateway."

[[rule]]
name = "no schema changes"
statements = ["ddl", "admin", "code"]
action = "deny"
message = "Schema changes go through migrations, not through the gateway."

[[rule]]
name = "demo users work on the shop"
groups = ["{DEMO_GROUP}"]
statements = ["read", "write", "transaction", "session"]
tables = ["shop.*", "pg_catalog.*", "information_schema.*"]
action = "allow"

[[mask]]
name = "customer contact details"
columns = ["shop.customers.email", "shop.customers.phone"]
groups = ["{DEMO_GROUP}"]
"""


def write_gateway_config(env: DemoEnvironment) -> None:
    env.policy_file.write_text(DEMO_POLICY, encoding="utf-8")
    env.config_file.write_text(
        "# pgwarden demo configuration (pgwarden serve --config THIS_FILE)\n"
        + toml_document(gateway_config(env)),
        encoding="utf-8",
    )
    env.config_file.chmod(0o600)


def toml_document(table: Mapping[str, object]) -> str:
    """TOML for a table of strings, numbers, booleans, sub-tables and arrays of tables."""
    lines: list[str] = []
    _toml_table(lines, table, prefix="")
    return "\n".join(lines) + "\n"


def _toml_table(lines: list[str], table: Mapping[str, object], prefix: str) -> None:
    nested: list[tuple[str, Mapping[str, object]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, object]]]] = []
    for key, value in table.items():
        if value is None:  # TOML has no null: an absent key means the default
            continue
        if isinstance(value, Mapping):
            nested.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, sub in nested:
        lines.extend(["", f"[{prefix}{key}]"])
        _toml_table(lines, sub, prefix=f"{prefix}{key}.")
    for key, items in arrays:
        for item in items:
            lines.extend(["", f"[[{prefix}{key}]]"])
            _toml_table(lines, item, prefix=f"{prefix}{key}.")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string (no "\/" escapes from json.dumps) is a valid TOML basic string.
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def start_gateway(env: DemoEnvironment) -> None:
    """Run ``pgwarden serve`` and wait for its listening line."""
    log = env.gateway_log.open("wb")
    try:
        env.gateway = subprocess.Popen(
            [sys.executable, "-m", "pgwarden", "serve", "--config", str(env.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is ours to handle; the gateway gets SIGTERM
            env={k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")},
        )
    finally:
        log.close()
    deadline = time.monotonic() + GATEWAY_START_TIMEOUT
    while time.monotonic() < deadline:
        ready = GATEWAY_READY_LINE.search(_read_text(env.gateway_log))
        if ready:
            env.gateway_port = int(ready.group(1))  # the real one when asked for port 0
            return
        if env.gateway.poll() is not None:
            raise DemoError(
                f"the gateway exited with code {env.gateway.returncode}:\n"
                + _read_text(env.gateway_log)
            )
        time.sleep(0.1)
    raise DemoError(f"the gateway did not start listening in time:\n{_read_text(env.gateway_log)}")


def stop_gateway(env: DemoEnvironment, timeout: float = 10.0) -> None:
    gateway = env.gateway
    if gateway is None or gateway.poll() is not None:
        return
    gateway.send_signal(signal.SIGTERM)
    try:
        gateway.wait(timeout)
    except subprocess.TimeoutExpired:
        gateway.kill()
        gateway.wait()


def wait_for_interrupt(env: DemoEnvironment) -> int:
    """Block until Ctrl-C (exit 0) or until the gateway dies on its own (exit 1)."""
    assert env.gateway is not None
    code = env.gateway.wait()
    print(
        f"pgwarden demo: the gateway exited with code {code}; its log is {env.gateway_log}",
        file=sys.stderr,
    )
    return 1


# --- the walkthrough ---------------------------------------------------------------------


def print_connection_help(env: DemoEnvironment) -> None:
    issuer_url = env.issuer.issuer if env.issuer is not None else "?"
    psql_command = (
        f"PGPASSWORD={shlex.quote(env.client_token)} psql {shlex.quote(env.client_dsn())}"
    )
    print(
        f"""
pgwarden is running on 127.0.0.1:{env.gateway_port}, in front of PostgreSQL on \
127.0.0.1:{env.cluster.port}.
The password is an OIDC token for subject {DEMO_SUBJECT!r} (group {DEMO_GROUP!r}), minted by
a development issuer at {issuer_url}; a rule maps that group to role
{UPSTREAM_ROLE!r}, which the gateway logs in as with a password only it knows.

Connect with psql (paste this; the token is valid for {TOKEN_LIFETIME_SECONDS // 3600} hours):

    {psql_command}

Mint a token for someone else (the group decides the role; others are refused):

    pgwarden dev-issuer mint --state-dir {env.issuer_state_dir} --subject you \\
        --group {DEMO_GROUP}

Statement log (one JSON line per statement):

    tail -f {env.statement_log}

Audit trail: every statement spooled before it runs, shipped as OpenTelemetry spans (here
by the console exporter, one JSON span per line; an OTLP endpoint in production):

    tail -f {env.audit_spans}
    pgwarden audit verify {env.audit_dir} --config {env.config_file}
    pgwarden replay SESSION_ID --config {env.config_file}    (pgwarden.session.id of a span)

Prometheus metrics (sessions, statements, refusals, bytes, the audit backlog):

    curl -s http://127.0.0.1:{env.metrics_port}/metrics | grep -v '^#'

Gateway config: {env.config_file}
Gateway log:    {env.gateway_log}
""",
        flush=True,
    )


def run_step(env: DemoEnvironment, step: DemoStep) -> None:
    """Run one step through the gateway with psql; show its output and its audit records."""
    before = _count_lines(env.statement_log)
    print(f"--- {step.title}: {step.explanation}\n    {step.sql}\n", flush=True)
    result = subprocess.run(
        [_psql_path(env.cluster), "--no-psqlrc", "--command", step.sql, env.client_dsn()],
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": env.client_token, "PGCONNECT_TIMEOUT": "10"},
        timeout=60,
        check=False,
    )
    print(_indent(result.stdout + result.stderr), flush=True)
    records = _wait_for_records(env.statement_log, after=before)
    statements = [r for r in records if "statement" in r]
    if not statements:
        print(f"    (no statement record in {env.statement_log} yet)", flush=True)
    if step is DEMO_STEPS[0]:
        # Once: the identity side of the audit trail (who connected, how, as which role).
        for record in records:
            if record.get("event") == "connection.accepted":
                print(f"\nConnection event written to {env.statement_log.name}:", flush=True)
                print(_indent(json.dumps(record, indent=2)), flush=True)
    for record in statements:
        print(f"\nAudit record written to {env.statement_log.name}:", flush=True)
        print(_indent(json.dumps(record, indent=2)), flush=True)
    span = _wait_for_span(env.audit_spans, step.sql)
    if span is None:
        print(f"    (no audit span in {env.audit_spans.name} yet)", flush=True)
    else:
        print(f"\nAudit span shipped to {env.audit_spans.name}:", flush=True)
        print(_indent(json.dumps(_span_summary(span), indent=2)), flush=True)


def _wait_for_span(path: Path, sql: str, timeout: float = 10.0) -> dict[str, object] | None:
    """The statement span for ``sql`` once the shipper has written it (console exporter)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in _read_text(path).splitlines():
            with contextlib.suppress(ValueError):
                span = json.loads(line)
                attributes = span.get("attributes") if isinstance(span, dict) else None
                if isinstance(attributes, dict) and attributes.get("db.query.text") == sql:
                    return dict(span)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _span_summary(span: Mapping[str, object]) -> dict[str, object]:
    """The parts of a span worth a look: its name, ids, status and attributes."""
    context = span.get("context")
    context = context if isinstance(context, dict) else {}
    return {
        "name": span.get("name"),
        "trace_id": context.get("trace_id"),
        "span_id": context.get("span_id"),
        "parent_id": span.get("parent_id"),
        "start_time": span.get("start_time"),
        "end_time": span.get("end_time"),
        "status": span.get("status"),
        "attributes": span.get("attributes"),
    }


def _wait_for_records(path: Path, after: int, timeout: float = 5.0) -> list[dict[str, object]]:
    """Records appended after line ``after``, once a statement record is among them.

    The log is written shortly after the reply; connection events (``"event"``) share it.
    """
    deadline = time.monotonic() + timeout
    while True:
        records: list[dict[str, object]] = []
        for line in _read_text(path).splitlines()[after:]:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        if any("statement" in r for r in records) or time.monotonic() >= deadline:
            return records
        time.sleep(0.1)


def _psql_path(cluster: TemporaryCluster) -> str:
    bundled = cluster.bindir / "psql"
    return str(bundled) if bundled.is_file() else "psql"


def _count_lines(path: Path) -> int:
    return len(_read_text(path).splitlines())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())

"""Every statement through the gateway arrives at a real OTLP receiver as a span.

psql (simple protocol), psycopg (extended protocol, parameters) and asyncpg (named
prepared statements, Parse/Describe/Flush then Bind/Execute/Sync), each against a receiver
speaking OTLP over HTTP/protobuf and over gRPC: the statement spans carry the database
conventions' attributes and the caller's identity, and hang under their session's span.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from harness import (
    CLIENT_USER,
    SCRAM_ROLE,
    TEST_DATABASE,
    GatewayProcess,
    StartGateway,
    gateway_command,
    gateway_environment,
    run_tool,
    settings_env,
)
from otlp_receiver import OtlpReceiver, ReceivedSpan

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2


@pytest.fixture(params=["http", "grpc"])
def receiver(request: pytest.FixtureRequest) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(request.param) as rx:
        yield rx


def audit_settings(directory: Path, receiver: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "audit": {
            "directory": str(directory),
            "exporter": "otlp_http" if receiver.transport == "http" else "otlp_grpc",
            "endpoint": receiver.endpoint,
            "poll_interval_ms": 50,
            "timeout_seconds": 5,
            "service_instance_id": "gw-test-1",
            **extra,
        }
    }


def spans_of_session(spans: list[ReceivedSpan], session_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("pgwarden.session.id") == session_id]


def statement_span(spans: list[ReceivedSpan], text: str) -> ReceivedSpan:
    matches = [s for s in spans if s.attributes.get("db.query.text") == text]
    assert len(matches) == 1, f"{len(matches)} spans for {text!r}"
    return matches[0]


def session_complete(rx: OtlpReceiver, text: str) -> list[ReceivedSpan]:
    """Wait for the statement with this text and the end of its session; its spans."""

    def ready(spans: list[ReceivedSpan]) -> bool:
        mine = [s for s in spans if s.attributes.get("db.query.text") == text]
        if not mine:
            return False
        sid = mine[0].attributes["pgwarden.session.id"]
        return any(
            s.kind == SPAN_KIND_SERVER and s.attributes.get("pgwarden.session.id") == sid
            for s in spans
        )

    spans = rx.wait_for(ready, timeout=60)
    sid = statement_span(spans, text).attributes["pgwarden.session.id"]
    return spans_of_session(spans, sid)


def check_common(span: ReceivedSpan, session: ReceivedSpan, gateway: GatewayProcess) -> None:
    """What every statement span carries: conventions, identity, parentage, spool."""
    upstream = gateway.settings["upstream"]
    a = span.attributes
    assert span.kind == SPAN_KIND_CLIENT
    assert span.trace_id == session.trace_id
    assert span.parent_span_id == session.span_id
    assert a["db.system.name"] == "postgresql"
    assert a["db.namespace"] == TEST_DATABASE
    assert a["server.address"] == upstream["host"]
    assert a["server.port"] == upstream["port"]
    assert a["client.address"] == "127.0.0.1"
    assert a["user.id"] == CLIENT_USER
    assert a["user.name"] == CLIENT_USER
    assert a["pgwarden.upstream.role"] == SCRAM_ROLE
    assert re.fullmatch(r"[0-9a-f]{16}", a["pgwarden.session.id"])
    assert isinstance(a["pgwarden.spool.seq"], int) and a["pgwarden.spool.seq"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", a["pgwarden.chain.hash"])
    assert a["pgwarden.chain.verified"] is True
    assert span.start_ns <= span.end_ns
    assert session.start_ns <= span.start_ns <= span.end_ns <= session.end_ns
    assert span.resource["service.name"] == "pgwarden"
    assert span.resource["service.instance.id"] == "gw-test-1"
    assert span.scope == "pgwarden.audit"


def the_session(spans: list[ReceivedSpan]) -> ReceivedSpan:
    sessions = [s for s in spans if s.kind == SPAN_KIND_SERVER]
    assert len(sessions) == 1
    session = sessions[0]
    assert session.name == "pgwarden session"
    assert session.parent_span_id == ""
    assert session.attributes["user.name"] == CLIENT_USER
    assert session.attributes["pgwarden.outcome"] == "completed"
    return session


def test_psql_statements_arrive_as_spans(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver))
    script = (
        "create temp table audit_psql (id int primary key, name text);\n"
        "insert into audit_psql values (1, 'one'), (2, 'two');\n"
        "select id, name from audit_psql where id >= 1 order by id;\n"
        "select * from audit_psql_missing;\n"
    )
    result = run_tool(["psql", "--no-psqlrc", "-X", "-f", "-"], gateway.env(), input=script)
    assert "does not exist" in result.stderr
    spans = session_complete(receiver, "select * from audit_psql_missing;")
    session = the_session(spans)
    assert session.attributes["pgwarden.session.application_name"] == "psql"
    assert session.attributes["pgwarden.session.end_reason"] == "client_terminate"

    create = statement_span(spans, "create temp table audit_psql (id int primary key, name text);")
    check_common(create, session, gateway)
    assert create.attributes["db.operation.name"] == "CREATE TABLE"
    assert create.attributes["pgwarden.protocol"] == "simple"

    insert = statement_span(spans, "insert into audit_psql values (1, 'one'), (2, 'two');")
    check_common(insert, session, gateway)
    assert insert.name == "INSERT audit_psql"
    assert insert.attributes["db.operation.name"] == "INSERT"
    assert insert.attributes["db.collection.name"] == "audit_psql"
    assert insert.attributes["pgwarden.command_tag"] == "INSERT 0 2"
    assert insert.attributes["pgwarden.statement.rows"] == 2
    assert insert.attributes["db.response.returned_rows"] == 0

    select = statement_span(spans, "select id, name from audit_psql where id >= 1 order by id;")
    check_common(select, session, gateway)
    assert select.name == "SELECT audit_psql"
    assert select.attributes["db.query.summary"] == "SELECT audit_psql"
    assert select.attributes["db.response.returned_rows"] == 2
    assert select.status_code != STATUS_ERROR
    assert "db.response.status_code" not in select.attributes

    failed = statement_span(spans, "select * from audit_psql_missing;")
    check_common(failed, session, gateway)
    assert failed.attributes["db.response.status_code"] == "42P01"
    assert failed.attributes["error.type"] == "42P01"
    assert failed.status_code == STATUS_ERROR
    assert "does not exist" in failed.status_message
    # Statement numbers and spool order follow the session.
    numbers = [s.attributes["pgwarden.statement.number"] for s in (create, insert, select, failed)]
    assert numbers == sorted(numbers)
    seqs = [s.attributes["pgwarden.spool.seq"] for s in (create, insert, select, failed)]
    assert seqs == sorted(seqs)
    # Span ids are unique within the trace.
    assert len({s.span_id for s in spans}) == len(spans)


def test_psycopg_extended_protocol_with_opt_in_parameters(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver, record_parameters=True))
    with gateway.connect(autocommit=True) as conn:
        conn.execute("create temp table audit_pg (id int, secret text)")
        # %t: text format; %b: binary format (kept as hex: \x0007 for an int2 7).
        conn.execute("insert into audit_pg values (%t, %t)", (7, "s3cr3t"))
        rows = conn.execute("select secret from audit_pg where id = %b", (7,)).fetchall()
        assert rows == [("s3cr3t",)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1 / %s", (0,))
    spans = session_complete(receiver, "select 1 / $1")
    session = the_session(spans)
    insert = statement_span(spans, "insert into audit_pg values ($1, $2)")
    check_common(insert, session, gateway)
    assert insert.attributes["pgwarden.protocol"] == "extended"
    assert insert.attributes["db.query.parameter.0"] == "7"
    assert insert.attributes["db.query.parameter.1"] == "s3cr3t"
    select = statement_span(spans, "select secret from audit_pg where id = $1")
    check_common(select, session, gateway)
    assert select.attributes["db.response.returned_rows"] == 1
    assert select.attributes["db.query.parameter.0"] == "\\x0007"
    failed = statement_span(spans, "select 1 / $1")
    assert failed.attributes["db.response.status_code"] == "22012"
    assert failed.status_code == STATUS_ERROR
    # One span per statement: parse, bind and execute are not separate spans.
    texts = [s.attributes.get("db.query.text") for s in spans if s.kind == SPAN_KIND_CLIENT]
    assert texts.count("insert into audit_pg values ($1, $2)") == 1


def test_parameters_are_not_recorded_by_default(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver))
    with gateway.connect(autocommit=True) as conn:
        conn.execute("select %s::text as audit_default_params", ("hidden-value",))
    spans = session_complete(receiver, "select $1::text as audit_default_params")
    span = statement_span(spans, "select $1::text as audit_default_params")
    assert not any(k.startswith("db.query.parameter.") for k in span.attributes)


def test_asyncpg_prepared_statements(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver))

    async def work() -> None:
        conn = await gateway.connect_asyncpg()
        try:
            stmt = await conn.prepare("select generate_series(1, $1::int) as n")
            assert len(await stmt.fetch(3)) == 3
            assert len(await stmt.fetch(5)) == 5
            await conn.execute("select pg_sleep(0) as asyncpg_marker")
        finally:
            await conn.close()

    asyncio.run(work())
    spans = session_complete(receiver, "select pg_sleep(0) as asyncpg_marker")
    session = the_session(spans)
    series = [
        s
        for s in spans
        if s.attributes.get("db.query.text") == "select generate_series(1, $1::int) as n"
    ]
    # Two executions of one prepared statement: two spans, each with its own row count.
    assert sorted(s.attributes["db.response.returned_rows"] for s in series) == [3, 5]
    for span in series:
        check_common(span, session, gateway)
        assert span.attributes["pgwarden.protocol"] == "extended"
        assert span.attributes["db.operation.name"] == "SELECT"


def test_sanitised_query_text(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    if receiver.transport == "grpc":
        pytest.skip("query text handling does not depend on the transport")
    gateway = start_gateway(
        audit_settings(
            tmp_path / "audit",
            receiver,
            query_text="sanitised",
            headers={"authorization": "Bearer audit-token-1"},
        )
    )
    result = run_tool(
        ["psql", "--no-psqlrc", "-X", "-c", "select 'card-4111' as pan, 42 as n"], gateway.env()
    )
    assert result.returncode == 0, result.stderr
    spans = receiver.wait_for(
        lambda spans: (
            any(s.attributes.get("db.query.summary") == "SELECT" for s in spans)
            and any(s.kind == SPAN_KIND_SERVER for s in spans)
        )
    )
    texts = [s.attributes.get("db.query.text") for s in spans if s.kind == SPAN_KIND_CLIENT]
    assert "select $1 as pan, $2 as n" in texts
    assert not any("4111" in str(s.attributes) for s in spans)
    # Configured OTLP headers reach the backend.
    assert all(h.get("authorization") == "Bearer audit-token-1" for h in receiver.store.headers)


def test_long_statements_stay_within_the_receivers_message_limit(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """A gRPC receiver refuses messages over 4 MiB: five 900 KB statements read in one
    batch must not become one 4.5 MB request (it would be refused, and retried, forever),
    and a 1.5 MB statement's span carries its first MiB."""
    if receiver.transport == "http":
        pytest.skip("the 4 MiB message limit is OTLP/gRPC's")
    # A long poll interval: every statement is in the spool when the shipper next reads.
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver, poll_interval_ms=3000))
    texts = [f"select length('{str(i) * 900_000}') as long_{i}" for i in range(5)]
    huge = "select length('" + "y" * 1_500_000 + "') as huge"
    with psycopg.connect(gateway.dsn(), autocommit=True) as conn:
        for text in [*texts, huge]:
            conn.execute(text.encode())
    spans = receiver.wait_for(
        lambda spans: sum(1 for s in spans if "pgwarden.statement.number" in s.attributes) >= 6,
        timeout=60,
    )
    shown = {s.attributes.get("db.query.text") for s in spans}
    assert all(text in shown for text in texts)
    cut = next(s for s in spans if s.attributes.get("pgwarden.query.text_bytes"))
    assert cut.attributes["pgwarden.query.text_bytes"] == len(huge)
    assert cut.attributes["db.query.text"] == huge[: 1 << 20]
    assert receiver.store.requests >= 2, "5.5 MB of statements went in several requests"


def shipper_pids(parent: int) -> list[int]:
    """The ``pgwarden audit ship`` children of ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"ship" in argv:
            pids.append(int(entry.name))
    return pids


def blocked_signals(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigBlk for {pid}")


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_restarted_shipper_ships_survives_hangups_and_stops_with_the_gateway(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """A shipper that dies is restarted and ships; a burst of SIGHUP (log rotation) leaves
    the worker supervisor and its shipper running; SIGTERM then stops everything promptly
    (the shipper within its grace period, not killed after it)."""
    if receiver.transport == "grpc":
        pytest.skip("shipper supervision does not depend on the transport")
    gateway = start_gateway({**audit_settings(tmp_path / "audit", receiver), "workers": 2})
    [first] = wait_until(lambda: shipper_pids(gateway.pid), 15, "the shipper")
    os.kill(first, signal.SIGKILL)
    [second] = wait_until(
        lambda: [p for p in shipper_pids(gateway.pid) if p != first], 15, "a new shipper"
    )
    # Started from a thread that blocks the gateway's signals; once running it takes SIGTERM.
    wait_until(
        lambda: not blocked_signals(second) & (1 << (signal.SIGTERM - 1)),
        15,
        "the new shipper to unblock SIGTERM",
    )
    for _ in range(200):
        os.kill(gateway.pid, signal.SIGHUP)
        time.sleep(0.003)
    assert gateway.alive(), gateway.stderr
    assert shipper_pids(gateway.pid) == [second]
    text = "select 'shipped by the restarted shipper' as after_restart"
    result = run_tool(["psql", "--no-psqlrc", "-X", "-c", text], gateway.env())
    assert result.returncode == 0, result.stderr
    receiver.wait_for(lambda spans: any(s.attributes.get("db.query.text") == text for s in spans))
    started = time.monotonic()
    assert gateway.terminate() == 0, gateway.stderr
    assert time.monotonic() - started < 8, "the shipper ignored SIGTERM until killed"
    assert "did not stop" not in gateway.stderr
    assert not Path(f"/proc/{second}").exists()


def test_refused_connection_gets_a_span(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    gateway = start_gateway(audit_settings(tmp_path / "audit", receiver))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(gateway.dsn(password="wrong-password"))
    spans = receiver.wait_for(
        lambda spans: any(s.attributes.get("pgwarden.session.refused") for s in spans)
    )
    refused = next(s for s in spans if s.attributes.get("pgwarden.session.refused"))
    assert refused.name == "pgwarden session"
    assert refused.kind == SPAN_KIND_SERVER
    assert refused.status_code == STATUS_ERROR
    assert refused.attributes["error.type"] == "28P01"
    assert refused.attributes["db.response.status_code"] == "28P01"
    assert refused.attributes["user.name"] == CLIENT_USER
    assert refused.attributes["client.address"] == "127.0.0.1"
    assert refused.attributes["pgwarden.session.refused_at"] == "authentication"


def test_workers_each_write_a_stream_and_one_shipper_ships_all(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    if receiver.transport == "grpc":
        pytest.skip("worker processes do not depend on the transport")
    gateway = start_gateway({**audit_settings(tmp_path / "audit", receiver), "workers": 2})
    texts = [f"select {i} as from_worker_test" for i in range(12)]
    for text in texts:
        result = run_tool(["psql", "--no-psqlrc", "-X", "-c", text], gateway.env())
        assert result.returncode == 0, result.stderr
    spans = receiver.wait_for(
        lambda spans: set(texts) <= {s.attributes.get("db.query.text") for s in spans},
        timeout=60,
    )
    streams = {
        s.attributes["pgwarden.spool.stream"]
        for s in spans
        if s.attributes.get("db.query.text") in texts
    }
    assert 1 <= len(streams) <= 2
    assert all(re.search(r"-w[01]-", stream) for stream in streams)


def ship_until_empty(settings: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``pgwarden audit ship --until-empty`` with the gateway's settings; it must succeed."""
    done = subprocess.run(
        gateway_command("audit", "ship", "--until-empty"),
        env=gateway_environment(settings_env(settings)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_shipper_run_apart_with_audit_ship(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """``audit.start_shipper = false``: records wait until ``pgwarden audit ship`` runs."""
    if receiver.transport == "grpc":
        pytest.skip("the command does not depend on the transport")
    settings = audit_settings(tmp_path / "audit", receiver, start_shipper=False)
    gateway = start_gateway(settings)
    result = run_tool(
        ["psql", "--no-psqlrc", "-X", "-c", "select 'shipped apart' as marker"], gateway.env()
    )
    assert result.returncode == 0, result.stderr
    time.sleep(1.0)
    assert not receiver.spans()
    # The gateway still runs (its stream stays open): --until-empty waits for the open
    # session only, which psql has closed, so the command returns once all is delivered.
    ship_until_empty(settings)
    texts = {s.attributes.get("db.query.text") for s in receiver.spans()}
    assert "select 'shipped apart' as marker" in texts


def test_spans_the_backend_refuses_are_reported_kept_and_not_sent_again(
    start_gateway: StartGateway, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """An OTLP partial success (the backend accepts the request but refuses some spans):
    OTLP forbids sending the request again, so the shipper says so on its log, with the
    backend's reason, and keeps the request as it was sent; the rest is delivered."""
    reason = "span is older than this backend's retention"
    receiver.store.refuse_spans = lambda span: (
        reason if "refuse me" in str(span.attributes.get("db.query.text")) else None
    )
    directory = tmp_path / "audit"
    settings = audit_settings(directory, receiver, start_shipper=False)
    gateway = start_gateway(settings)
    texts = ["select 'before' as a", "select 'refuse me' as b", "select 'after' as c"]
    command = ["psql", "--no-psqlrc", "-X"]
    for text in texts:
        command += ["-c", text]
    result = run_tool(command, gateway.env())
    assert result.returncode == 0, result.stderr
    first = ship_until_empty(settings)
    delivered = {s.attributes.get("db.query.text") for s in receiver.spans()}
    assert {texts[0], texts[2]} <= delivered
    assert texts[1] not in delivered
    refused = receiver.refused_spans()
    assert [s.attributes["db.query.text"] for s in refused] == [texts[1]]
    assert "refused 1 of them" in first.stderr, first.stderr
    assert reason in first.stderr
    kept = sorted((directory / "rejected").glob("*.traces.binpb"))
    assert len(kept) == 1, kept
    assert kept[0].name in first.stderr
    # The request kept is the one the backend got: the refused span is in it, whole.
    request = ExportTraceServiceRequest.FromString(kept[0].read_bytes())
    spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
    kept_ids = {s.span_id.hex() for s in spans}
    assert refused[0].span_id in kept_ids
    assert kept_ids - {refused[0].span_id} <= {s.span_id for s in receiver.spans()}
    # Shipping again sends nothing again: the partial success was an acknowledgement.
    requests = receiver.store.requests
    ship_until_empty(settings)
    assert receiver.store.requests == requests
    assert len(receiver.refused_spans()) == 1
    # `audit resend` while the backend still refuses it: kept, status 1.
    env = gateway_environment(settings_env(settings))
    again = run_tool(gateway_command("audit", "resend", str(kept[0])), env)
    assert again.returncode == 1, again.stderr
    assert "refused again" in again.stdout and kept[0].exists()
    assert len(receiver.refused_spans()) == 2
    # Once the backend takes it: delivered, the file removed, the span there once.
    receiver.store.refuse_spans = None
    again = run_tool(gateway_command("audit", "resend", str(kept[0])), env)
    assert again.returncode == 0, again.stderr
    assert f"{kept[0]}: delivered" in again.stdout
    assert not kept[0].exists()
    arrived = [s for s in receiver.spans() if s.attributes.get("db.query.text") == texts[1]]
    assert [s.span_id for s in arrived] == [refused[0].span_id]

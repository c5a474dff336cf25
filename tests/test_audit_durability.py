"""The spool is the queue: nothing is lost when the backend or the gateway fails.

- backend down: records wait in the spool; when it is back, each arrives exactly once;
- spool full: new statements are refused with SQLSTATE 53400, and accepted again once the
  backend has drained the spool;
- kill -9 of the gateway under pgbench load: after a restart, every statement PostgreSQL
  itself logged (log_statement = all) has its span at the receiver.
"""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from harness import (
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    GatewayCertificates,
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    stop_and_check,
    wait_until,
)
from otlp_receiver import OtlpReceiver, ReceivedSpan
from pgwarden.audit.spool import (
    AuditPaths,
    Checkpoint,
    StreamReader,
    list_streams,
    segment_names,
)
from pgwarden.pgcluster import FAST_UNSAFE_SETTINGS, TemporaryCluster, find_free_port

SPAN_KIND_SERVER = 2


def audit(directory: Path, endpoint: str, **extra: Any) -> dict[str, Any]:
    return {
        "audit": {
            "directory": str(directory),
            "exporter": "otlp_http",
            "endpoint": endpoint,
            "timeout_seconds": 1,
            "retry_max_seconds": 1,
            "poll_interval_ms": 50,
            **extra,
        }
    }


def spooled(directory: Path, kind: str) -> list[bytes]:
    """Record lines of one type waiting in the spool: after each stream's checkpoint,
    the position up to which the backend has acknowledged everything."""
    out = []
    for stream in list_streams(AuditPaths(directory).spool):
        start = Checkpoint.load(stream).position
        for line in StreamReader(stream, start).read(1_000_000):
            if f'"type":"{kind}"'.encode() in line[:160]:
                out.append(line)
    return out


def test_backend_down_then_back_delivers_every_record_once(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    receiver = OtlpReceiver("http", port=find_free_port())  # not listening yet
    gateway = start_gateway(audit(directory, receiver.endpoint))
    with gateway.connect(autocommit=True) as conn:
        for i in range(25):
            conn.execute(f"select {i} as audit_backend_down")
    texts = {f"select {i} as audit_backend_down" for i in range(25)}

    # The backend is unreachable: every record waits in the spool, and keeps waiting.
    time.sleep(2.5)
    stmts = [line for line in spooled(directory, "stmt") if b"audit_backend_down" in line]
    assert len(stmts) == 25
    assert len(spooled(directory, "session_end")) == 1

    with receiver:
        spans = receiver.wait_for(
            lambda spans: (
                texts <= {s.attributes.get("db.query.text") for s in spans}
                and any(s.kind == SPAN_KIND_SERVER for s in spans)
            ),
            timeout=60,
        )
        time.sleep(1.0)  # anything sent twice would have arrived by now
        spans = receiver.spans()
    keys = [s.key for s in spans]
    assert len(keys) == len(set(keys)), "a record was delivered twice"
    mine = [s for s in spans if s.attributes.get("db.query.text") in texts]
    assert len(mine) == 25
    # Delivered records are behind the checkpoint (their segment is deleted once full).
    assert wait_until(lambda: not spooled(directory, "stmt"), timeout=10)


def test_full_spool_refuses_statements_with_53400(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    receiver = OtlpReceiver("http", port=find_free_port())
    gateway = start_gateway(
        audit(directory, receiver.endpoint, max_spool_bytes=64 * 1024, segment_bytes=16 * 1024)
    )
    refused: psycopg.Error | None = None
    executed = 0
    with gateway.connect(autocommit=True) as conn:
        for i in range(5000):
            try:
                conn.execute(f"select {i} as filling_the_spool_with_some_padding_text")
            except psycopg.Error as exc:
                refused = exc
                break
            executed += 1
    assert refused is not None, "the spool never filled"
    assert refused.sqlstate == "53400"
    assert "audit spool is full" in str(refused)
    assert executed > 20
    # The refused statement never reached PostgreSQL, and never will: its text is not in
    # the spool either.
    assert not any(
        f"select {executed} as filling".encode() in line for line in spooled(directory, "stmt")
    )
    # New sessions are refused at the door, with the same SQLSTATE.
    with pytest.raises(psycopg.OperationalError, match="audit spool is full"):
        psycopg.connect(gateway.dsn())

    async def connect() -> None:
        conn = await gateway.connect_asyncpg()
        await conn.close()

    with pytest.raises(asyncpg.PostgresError) as again:
        asyncio.run(connect())
    assert again.value.sqlstate == "53400"

    # The backend comes back: the spool drains and statements are accepted again.
    with receiver:
        receiver.wait_for(
            lambda spans: any(
                s.attributes.get("db.query.text")
                == "select 0 as filling_the_spool_with_some_padding_text"
                for s in spans
            ),
            timeout=60,
        )

        def accepted() -> bool:
            try:
                with gateway.connect(autocommit=True) as conn:
                    conn.execute("select 'accepted again'")
                return True
            except psycopg.Error:
                return False

        assert wait_until(accepted, timeout=30, interval=0.5)


# --- kill -9 under load -------------------------------------------------------------------

# log_line_prefix is "%m [%p] %q%u@%d " (pgwarden.pgcluster.BASE_SETTINGS).
LOGGED = re.compile(
    r"^\S+ \S+ UTC \[\d+\] (?P<user>[^@\s]*)@(?P<db>\S*) "
    r"LOG:  (?:statement|execute [^:]*): (?P<sql>.*)$"
)


@pytest.fixture(scope="module")
def logging_cluster() -> Iterator[TemporaryCluster]:
    """A PostgreSQL that logs every statement it receives."""
    settings = {
        **FAST_UNSAFE_SETTINGS,
        "max_connections": 50,
        "log_statement": "all",
        "log_min_messages": "warning",
    }
    with TemporaryCluster(settings=settings) as pg:
        pg.psql(
            f"""
            set password_encryption = 'scram-sha-256';
            create role {SCRAM_ROLE} login password '{SCRAM_PASSWORD}';
            create database auditbench owner {SCRAM_ROLE};
            """
        )
        subprocess.run(
            ["pgbench", "-i", "-s", "1", "-q", "auditbench"],
            env=pg.env("auditbench"),
            check=True,
            capture_output=True,
        )
        pg.psql(f"grant all on all tables in schema public to {SCRAM_ROLE}", dbname="auditbench")
        yield pg


def logged_statements(cluster: TemporaryCluster, user: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in cluster.log_file.read_text(errors="replace").splitlines():
        match = LOGGED.match(line)
        if match and match["user"] == user and match["db"] == "auditbench":
            counts[match["sql"]] += 1
    return counts


def test_kill_9_under_load_then_restart_loses_no_statement(
    logging_cluster: TemporaryCluster, gateway_certs: GatewayCertificates, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    launcher = GatewayLauncher(logging_cluster, gateway_certs)
    with OtlpReceiver("http") as receiver:
        settings = {
            **audit(directory, receiver.endpoint, timeout_seconds=10),
            "upstream": {"database": "auditbench"},
        }
        gateway: GatewayProcess = launcher.start(settings)
        env = {**gateway.env(), "PGDATABASE": "auditbench"}
        bench = subprocess.Popen(
            ["pgbench", "-n", "-S", "-c", "4", "-j", "2", "-T", "30", "auditbench"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(4)
            gateway.process.send_signal(signal.SIGKILL)
            gateway.process.wait(10)
            bench.wait(30)
        finally:
            if bench.poll() is None:
                bench.kill()
        assert bench.returncode != 0, "pgbench should have lost its connections"
        # The dead gateway's stream is still in the spool; a new gateway ships it.
        assert any(segment_names(s) for s in list_streams(AuditPaths(directory).spool))

        restarted = launcher.start(settings)
        try:
            logged = logged_statements(logging_cluster, SCRAM_ROLE)
            assert sum(logged.values()) > 1000, "the load did not run"

            def texts(spans: list[ReceivedSpan]) -> collections.Counter[str]:
                return collections.Counter(
                    str(s.attributes["db.query.text"])
                    for s in spans
                    if "db.query.text" in s.attributes
                )

            def cut_session(spans: list[ReceivedSpan]) -> bool:
                return any(
                    s.kind == SPAN_KIND_SERVER
                    and s.attributes.get("pgwarden.outcome") == "interrupted"
                    for s in spans
                )

            def complete(spans: list[ReceivedSpan]) -> bool:
                # Every logged statement, and the sessions the kill cut (the dead stream's
                # last step, shipped after its statements).
                have = texts(spans)
                return all(have[sql] >= n for sql, n in logged.items()) and cut_session(spans)

            try:
                spans = receiver.wait_for(complete, timeout=180)
            except TimeoutError:
                have = texts(receiver.spans())
                missing = {sql: n - have[sql] for sql, n in logged.items() if have[sql] < n}
                assert cut_session(receiver.spans()), "no interrupted session span"
                pytest.fail(f"{len(missing)} logged statements have no span: {list(missing)[:5]}")
            interrupted = [
                s for s in spans if s.attributes.get("pgwarden.outcome") == "interrupted"
            ]
            # The sessions cut by the kill end as interrupted, not lost.
            assert any(s.kind == SPAN_KIND_SERVER for s in interrupted)
            # Delivery is at least once: a batch whose acknowledgement was lost (a slow
            # backend, a shipper stopped mid-export) comes again, as the very same spans.
            first: dict[tuple[str, str], ReceivedSpan] = {}
            for span in spans:
                seen = first.setdefault(span.key, span)
                assert (seen.name, seen.attributes, seen.start_ns, seen.end_ns) == (
                    span.name,
                    span.attributes,
                    span.start_ns,
                    span.end_ns,
                )
        finally:
            stop_and_check(restarted)


def test_fsync_always_holds_statements_until_their_records_are_on_disk(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Group commit: statements still flow, in order, while each waits for its fdatasync."""
    directory = tmp_path / "audit"
    with OtlpReceiver("http") as receiver:
        gateway = start_gateway(audit(directory, receiver.endpoint, fsync="always"))
        with gateway.connect(autocommit=True) as conn:
            conn.execute("create temp table synced (n int)")
            for i in range(50):
                conn.execute("insert into synced values (%s)", (i,))
            with conn.pipeline():
                cursors = [conn.execute("select %s::int + 1000", (i,)) for i in range(20)]
            assert [c.fetchone() for c in cursors] == [(i + 1000,) for i in range(20)]
            assert conn.execute("select count(*) from synced").fetchone() == (50,)
        receiver.wait_for(
            lambda spans: (
                sum(
                    s.attributes.get("db.query.text") == "insert into synced values ($1)"
                    for s in spans
                )
                == 50
            ),
            timeout=60,
        )

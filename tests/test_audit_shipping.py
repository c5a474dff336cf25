"""The shipper and its building blocks, on a spool written by the real codec in-process.

The gateway is not needed here: an ``AuditTrail`` and a ``SessionCodec`` fed with protocol
bytes write exactly what a session writes.  The exports go to a real OTLP receiver.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otlp_receiver import OtlpReceiver, ReceiverTls
from pgwarden import _wire
from pgwarden.audit import ids, sql
from pgwarden.audit.exporters import (
    ACCEPTED,
    Accepted,
    GrpcSpanExporter,
    ShipBatch,
    partial_success,
    request_span_ids,
)
from pgwarden.audit.recording import read_session
from pgwarden.audit.replay import transcript
from pgwarden.audit.shipper import Shipper
from pgwarden.audit.spool import (
    AuditPaths,
    StreamReader,
    iter_lines,
    list_streams,
    segment_names,
)
from pgwarden.audit.status import audit_status
from pgwarden.audit.trail import AuditTrail
from pgwarden.audit.verify import verify_path
from pgwarden.config import Settings
from pgwarden.pgcluster import find_free_port

SESSION = "0123456789abcdef"


def message(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack("!i", len(body) + 4) + body


def row_description(*names: str) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += name.encode() + b"\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
    return message(b"T", body)


def data_row(*values: bytes) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += struct.pack("!i", len(v)) + v
    return message(b"D", body)


def simple_session(trail: AuditTrail, session: str, queries: list[str]) -> None:
    """One session running ``queries`` over the simple protocol, each returning one row."""
    trail.session_started(
        session,
        identity=None,
        client_address="10.0.0.9",
        database="shop",
        upstream_user="app_rw",
        application_name="unit",
        tls=True,
    )
    codec = _wire.SessionCodec(**trail.codec_options(session))
    for q in queries:
        codec.feed_client(message(b"Q", q.encode() + b"\0"))
        codec.feed_server(
            row_description("n")
            + data_row(b"1")
            + message(b"C", b"SELECT 1\0")
            + message(b"Z", b"I")
        )
    trail.session_ended(session, "client_terminate")


def settings_for(directory: Path, **audit: Any) -> Settings:
    return Settings(audit={"directory": str(directory), "segment_bytes": 16 * 1024, **audit})


class FlakySink:
    """A sink that refuses the first ``failures`` deliveries, then records what it gets."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.batches: list[ShipBatch] = []

    def export(self, batch: ShipBatch) -> bool:
        if self.failures > 0:
            self.failures -= 1
            return False
        self.batches.append(batch)
        return True

    def shutdown(self) -> None:
        return None


def test_failed_exports_keep_records_and_retries_give_the_same_ids(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "audit", retry_max_seconds=0.1, poll_interval_ms=10)
    trail = AuditTrail(settings)
    simple_session(trail, SESSION, [f"select {i}" for i in range(200)])
    trail.close()
    sink = FlakySink(failures=2)
    shipper = Shipper(settings, sink=sink)
    # A refused delivery leaves the checkpoint where it was.
    progressed, failed = shipper.ship_once()
    assert failed and not progressed
    (stream,) = list_streams(AuditPaths(tmp_path / "audit").spool)
    assert not (stream / "checkpoint.json").exists()
    assert shipper.run(threading.Event(), until_empty=True) == 0
    spans = [i for batch in sink.batches for r in batch.requests for i in request_span_ids(r)]
    assert len(spans) == 201  # 200 statements and the session
    assert len(set(spans)) == 201
    assert not list_streams(AuditPaths(tmp_path / "audit").spool)  # all delivered
    # The same records always make the same ids (the documented derivation).
    assert (ids.trace_id(SESSION), ids.session_span_id(SESSION)) in spans
    assert (ids.trace_id(SESSION), ids.statement_span_id(SESSION, 200)) in spans


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_result_log_records_carry_the_replayed_statement(tmp_path: Path, transport: str) -> None:
    with OtlpReceiver(transport) as receiver:
        settings = settings_for(
            tmp_path / "audit",
            exporter="otlp_http" if transport == "http" else "otlp_grpc",
            endpoint=receiver.endpoint,
            recording_logs=True,
            service_instance_id="unit-1",
            resource_attributes={"deployment.environment.name": "test"},
            batch_size=2,
        )
        trail = AuditTrail(settings)
        simple_session(trail, SESSION, ["select n from numbers", "select 2", "select 3"])
        trail.close()
        assert Shipper(settings).run(threading.Event(), until_empty=True) == 0
        spans = receiver.spans()
        logs = receiver.logs()
    statements = sorted((s for s in spans if s.kind == 3), key=lambda s: s.start_ns)
    assert statements[0].name == "SELECT numbers"
    assert statements[0].resource["deployment.environment.name"] == "test"
    assert statements[0].resource["service.instance.id"] == "unit-1"
    # One log per recorded statement, correlated with its span, two per request.
    assert len(logs) == 3
    by_span = {(log.trace_id, log.span_id): log for log in logs}
    assert set(by_span) == {(s.trace_id, s.span_id) for s in statements}
    log = by_span[(statements[0].trace_id, statements[0].span_id)]
    assert log.event_name == "pgwarden.statement.result"
    assert (log.severity_number, log.severity_text, log.flags) == (9, "INFO", 1)
    assert log.resource == statements[0].resource
    assert log.scope == "pgwarden.audit"
    assert log.time_ns == statements[0].end_ns
    assert log.observed_ns == log.time_ns  # the same on every delivery of the record
    # pgwarden.spool.seq: the end record's, the one after the statement's own.
    assert log.attributes == {
        "pgwarden.session.id": SESSION,
        "pgwarden.statement.number": 1,
        "pgwarden.spool.seq": statements[0].attributes["pgwarden.spool.seq"] + 1,
        "db.system.name": "postgresql",
    }
    assert " n \n---\n 1\n(1 row)" in log.body
    # The body is the statement's block of `pgwarden replay`.
    text = transcript(read_session(tmp_path / "audit", SESSION))
    for received in logs:
        assert received.body.startswith("-- [")
        assert received.body in text


def test_grpc_backend_down_then_up_gets_every_span_once(tmp_path: Path) -> None:
    """Over OTLP/gRPC the encoded requests are sent as they are, also on the channel the
    exporter opens again after UNAVAILABLE: every record reaches the backend once it is up."""
    port = find_free_port()
    settings = settings_for(
        tmp_path / "audit",
        exporter="otlp_grpc",
        endpoint=f"http://127.0.0.1:{port}",
        # Long enough that the backend's answer is not cut off while the reopened channel
        # connects: a request timed out after the backend took it is sent again (at least
        # once), and this test counts exact deliveries.
        timeout_seconds=5,
        retry_max_seconds=0.1,
    )
    trail = AuditTrail(settings)
    simple_session(trail, SESSION, [f"select {i}" for i in range(300)])
    trail.close()
    shipper = Shipper(settings)
    progressed, failed = shipper.ship_once()  # nothing listens: UNAVAILABLE
    assert failed and not progressed
    with OtlpReceiver("grpc", port=port) as receiver:
        assert shipper.run(threading.Event(), until_empty=True) == 0
        spans = receiver.spans()
    assert len(spans) == 301  # 300 statements and the session
    assert len({s.key for s in spans}) == 301
    texts = {s.attributes.get("db.query.text") for s in spans if s.kind == 3}
    assert texts == {f"select {i}" for i in range(300)}
    assert all(s.transport == "grpc" for s in spans)


def test_grpc_exporter_still_exports_sdk_spans(tmp_path: Path) -> None:
    """The gRPC exporter keeps the official exporter's ``export`` for SDK spans."""
    with OtlpReceiver("grpc") as receiver:
        exporter = GrpcSpanExporter(endpoint=f"127.0.0.1:{receiver.port}", insecure=True)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        with provider.get_tracer("unit").start_as_current_span("made by the sdk") as span:
            span.set_attribute("db.system.name", "postgresql")
        provider.shutdown()
        (received,) = receiver.spans()
    assert received.name == "made by the sdk"
    assert received.attributes == {"db.system.name": "postgresql"}


def test_spool_suffix_verifies_after_delivered_segments_are_deleted(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    settings = settings_for(directory)
    trail = AuditTrail(settings)
    simple_session(trail, SESSION, [f"select {i} -- {'x' * 80}" for i in range(300)])
    stream = Path(trail.spool.directory)
    assert len(segment_names(stream)) > 3
    key = (directory / "chain.key").read_bytes().strip()
    # The shipper delivers and deletes the first segments while the writer is still open.
    sink = FlakySink(failures=0)
    shipper = Shipper(settings, sink=sink)
    while shipper.ship_once()[0]:
        pass
    for stream_shipper in shipper.streams.values():
        stream_shipper.checkpoint()  # what the shipper does every few seconds
    remaining = segment_names(stream)
    assert remaining[0] != "00000000000000000001.seg"
    report = verify_path(stream, key)
    assert report.ok, report.summary()
    (result,) = report.streams.values()
    assert not result.anchored  # checked from a `segment` record's prev hash
    trail.close()


def test_busy_streams_gather_about_a_request_and_idle_ones_poll_less_often(tmp_path: Path) -> None:
    shipper = Shipper(
        settings_for(tmp_path / "audit", batch_size=2048, poll_interval_ms=100),
        sink=FlakySink(failures=0),
    )
    assert shipper.gather_seconds(0, 0.1) == pytest.approx(0.1)
    assert shipper.gather_seconds(20, 0.1) == pytest.approx(0.1)  # a trickle: poll
    assert shipper.gather_seconds(500, 0.1) == pytest.approx(0.41, rel=0.01)  # 5,000/s
    assert shipper.gather_seconds(3000, 0.1) == pytest.approx(0.1)  # full requests anyway
    assert shipper.gather_seconds(300, 1.0) == pytest.approx(1.0)  # at most a second
    slow = Shipper(
        settings_for(tmp_path / "audit2", batch_size=2048, poll_interval_ms=3000),
        sink=FlakySink(failures=0),
    )
    assert slow.gather_seconds(500, 0.1) == pytest.approx(3.0)  # never below the poll
    # Idle: the poll interval for a second of idle passes, then doubling up to a second.
    waits = [shipper.idle_seconds(n) for n in range(1, 16)]
    assert waits[:10] == [pytest.approx(0.1)] * 10
    assert waits[10:14] == [pytest.approx(0.2), pytest.approx(0.4), pytest.approx(0.8), 1.0]
    assert waits[14] == 1.0
    assert slow.idle_seconds(40) == pytest.approx(3.0)  # never below the poll


def test_reader_returns_every_line_once_and_locates_it(tmp_path: Path) -> None:
    """Chunked reads across segment ends give each record once, in order, and say where
    each one is (the position a shipper's error message names)."""
    directory = tmp_path / "audit"
    trail = AuditTrail(settings_for(directory))
    simple_session(trail, SESSION, [f"select {i} -- {'y' * (i % 97)}" for i in range(400)])
    trail.close()
    stream = Path(trail.spool.directory)
    names = segment_names(stream)
    assert len(names) > 3
    expected = []
    for name in names:
        data = (stream / name).read_bytes()
        offset = 0
        for _, line in iter_lines(stream / name):
            expected.append((line, name, offset))
            offset += len(line) + 1
        assert data[offset:].strip(b"\0") == b""

    reader = StreamReader(stream, None)
    got: list[tuple[bytes, str, int]] = []
    while True:
        lines = reader.read(3000)  # smaller than a segment: several reads per segment
        if not lines:
            break
        assert lines.size == sum(len(line) + 1 for line in lines)
        for index, line in enumerate(lines):
            got.append((line, *reader.locate(index)))
        assert lines.joined() == b"".join(line + b"\n" for line in lines)
    assert got == expected


@pytest.mark.parametrize(
    ("query", "summary", "operation", "collection"),
    [
        (
            "SELECT * FROM wuser_table WHERE username = 'x'",
            "SELECT wuser_table",
            "SELECT",
            "wuser_table",
        ),
        (
            "INSERT INTO shipping_details (order_id, address) "
            "SELECT order_id, address FROM orders WHERE order_id = 1",
            "INSERT shipping_details SELECT orders",
            "INSERT",
            None,
        ),
        (
            "SELECT * FROM songs, artists WHERE songs.artist_id = artists.id",
            "SELECT songs artists",
            "SELECT",
            None,
        ),
        (
            "SELECT order_date FROM (SELECT * FROM orders o JOIN customers c "
            "ON o.customer_id = c.customer_id) s",
            "SELECT SELECT orders customers",
            "SELECT",
            None,
        ),
        ('SELECT * FROM "song list"', "SELECT song list", "SELECT", "song list"),
        ("CALL refresh_totals(1)", "CALL refresh_totals", "CALL", None),
        ("select 1; select 2", "BATCH SELECT", "BATCH SELECT", None),
        ("begin", "BEGIN", "BEGIN", None),
    ],
)
def test_query_summary_follows_the_conventions(
    query: str, summary: str, operation: str, collection: str | None
) -> None:
    info = sql.analyze(query)
    assert info.summary == summary
    assert info.operation == operation
    assert info.collection == collection


def test_sanitising_uses_the_parser_and_fails_closed() -> None:
    assert (
        sql.sanitise("select * from t where card = '4111 1111' and n in (1, 2.5)")
        == "select * from t where card = $1 and n in ($2, $3)"
    )
    assert sql.sanitise("select 'unterminated") is None


def test_statements_differing_in_literals_or_table_names(tmp_path: Path) -> None:
    """Analyses are shared per query shape: literals do not matter, table names do (even
    numeric suffixes, which libpg_query's fingerprint ignores)."""
    with OtlpReceiver("http") as receiver:
        settings = settings_for(tmp_path / "audit", endpoint=receiver.endpoint)
        trail = AuditTrail(settings)
        queries = [
            "select * from orders_2024_01 where id = 1",
            "select * from orders_2024_02 where id = 1",
            "select * from orders_2024_01 where id = 2",
            "select * from orders_2024_01 where id = 'x'",
        ]
        simple_session(trail, SESSION, queries)
        trail.close()
        assert Shipper(settings).run(threading.Event(), until_empty=True) == 0
        spans = {s.attributes["db.query.text"]: s for s in receiver.spans() if s.kind == 3}
    assert [spans[q].attributes["db.collection.name"] for q in queries] == [
        "orders_2024_01",
        "orders_2024_02",
        "orders_2024_01",
        "orders_2024_01",
    ]
    assert spans[queries[1]].name == "SELECT orders_2024_02"


def test_partial_success_is_read_from_protobuf_and_json_responses() -> None:
    """What an accepted OTLP/HTTP response says was refused (the official exporters do
    not look): protobuf, or JSON from a backend that answers in JSON."""
    traces, protobuf = ExportTraceServiceResponse, "application/x-protobuf"

    def read(body: bytes, content_type: str = protobuf) -> Accepted:
        return partial_success(body, content_type, traces, "rejected_spans")

    reply = traces()
    reply.partial_success.rejected_spans = 3
    reply.partial_success.error_message = "too old"
    assert read(reply.SerializeToString()) == Accepted(3, "too old")
    as_json = b'{"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": "quota"}}'
    answer = partial_success(
        as_json, "application/json", ExportLogsServiceResponse, "rejected_log_records"
    )
    assert answer == Accepted(2, "quota")
    # A warning alone, an empty body, or one that is not OTLP: nothing refused.
    warning = traces()
    warning.partial_success.error_message = "attribute truncated"
    assert read(warning.SerializeToString()) == Accepted(0, "attribute truncated")
    for junk in (b"", b"\xff\xfe not protobuf", b"<html>ok</html>"):
        assert read(junk, "text/html") == ACCEPTED
    assert read(b"{}", "application/json") == ACCEPTED


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_result_log_records_the_backend_refuses_are_kept(
    tmp_path: Path, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A partial success on the logs request: reported and kept like refused spans, and
    the statements' spans are delivered."""
    with OtlpReceiver(transport) as receiver:
        receiver.store.refuse_logs = lambda log: (
            "log record too large" if "select 2" in log.body else None
        )
        settings = settings_for(
            tmp_path / "audit",
            exporter="otlp_http" if transport == "http" else "otlp_grpc",
            endpoint=receiver.endpoint,
            recording_logs=True,
        )
        trail = AuditTrail(settings)
        simple_session(trail, SESSION, ["select 1", "select 2", "select 3"])
        trail.close()
        shipper = Shipper(settings)
        with caplog.at_level("WARNING", logger="pgwarden.audit.shipper"):
            assert shipper.run(threading.Event(), until_empty=True) == 0
        spans = [s for s in receiver.spans() if s.kind == 3]
        logs = receiver.logs()
        refused = receiver.refused_logs()
    assert len(spans) == 3
    assert len(logs) == 2 and len(refused) == 1
    assert "select 2" in refused[0].body
    kept = list((tmp_path / "audit" / "rejected").glob("*.logs.binpb"))
    assert len(kept) == 1
    request = ExportLogsServiceRequest.FromString(kept[0].read_bytes())
    bodies = [
        r.body.string_value
        for rl in request.resource_logs
        for sl in rl.scope_logs
        for r in sl.log_records
    ]
    assert any("select 2" in b for b in bodies)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("refused 1 of them" in e and "log record too large" in e for e in errors), errors


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_export_over_mutual_tls_compressed(tmp_path: Path, transport: str) -> None:
    """An https backend that requires a client certificate: with only the CA the
    handshake is refused and the records stay in the spool; with the client certificate
    and key everything arrives, gzip-compressed as configured."""
    ca = trustme.CA()
    files = {name: tmp_path / name for name in ("ca.pem", "rx.pem", "rx.key", "me.pem", "me.key")}
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    for cert, pem, key in (
        (ca.issue_cert("localhost", "127.0.0.1"), "rx.pem", "rx.key"),
        (ca.issue_cert("pgwarden-shipper", common_name="pgwarden-shipper"), "me.pem", "me.key"),
    ):
        files[pem].write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(files[key]))
    tls = ReceiverTls(files["rx.pem"], files["rx.key"], client_ca_file=files["ca.pem"])
    with OtlpReceiver(transport, tls=tls) as receiver:
        common: dict[str, Any] = {
            "exporter": "otlp_http" if transport == "http" else "otlp_grpc",
            "endpoint": receiver.endpoint,
            "certificate_file": str(files["ca.pem"]),
            "timeout_seconds": 2,
        }
        trail = AuditTrail(settings_for(tmp_path / "audit", **common))
        simple_session(trail, SESSION, ["select 1", "select 2"])
        trail.close()
        refused = Shipper(settings_for(tmp_path / "audit", **common))
        try:
            assert refused.ship_once() == (False, True)
        finally:
            refused.sink.shutdown()
        assert not receiver.spans()
        assert list_streams(AuditPaths(tmp_path / "audit").spool)  # still spooled
        settings = settings_for(
            tmp_path / "audit",
            **common,
            client_certificate_file=str(files["me.pem"]),
            client_key_file=str(files["me.key"]),
            compression="gzip",
        )
        assert Shipper(settings).run(threading.Event(), until_empty=True) == 0
        spans = receiver.spans()
        names = set(receiver.store.client_names)
        headers = list(receiver.store.headers)
    assert len([s for s in spans if s.kind == 3]) == 2
    assert names == {"pgwarden-shipper"}
    if transport == "http":
        assert headers and all(h.get("content-encoding") == "gzip" for h in headers)


def test_client_certificate_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="must be set together"):
        Settings(audit={"endpoint": "https://otel:4318", "client_certificate_file": "/c.pem"})
    with pytest.raises(ValueError, match="needs an https:// endpoint"):
        Settings(
            audit={
                "endpoint": "http://otel:4318",
                "client_certificate_file": "/c.pem",
                "client_key_file": "/c.key",
            }
        )


def audit_status_cli(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    return subprocess.run(
        [sys.executable, "-m", "pgwarden", "audit", "status", "--dir", str(directory), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_shows_the_backlog_until_the_backend_has_it(tmp_path: Path) -> None:
    """``pgwarden audit status``: records written but not acknowledged, how old the oldest
    is, the spool against its bound; ``--max-lag`` fails while something is waiting."""
    directory = tmp_path / "audit"
    settings = settings_for(
        directory, exporter="file", export_path=str(tmp_path / "delivered.records")
    )
    before = time.time_ns() // 1000
    trail = AuditTrail(settings)
    simple_session(trail, SESSION, [f"select {n}" for n in range(200)])
    status = audit_status(directory, settings.audit.max_spool_bytes)
    (stream,) = status.streams
    assert stream.writer_running and not status.shipper_running
    assert len(segment_names(directory / "spool" / stream.stream)) > 1  # the last one is read
    # open, session, 200 statement and end records, session end: all waiting.
    assert stream.written_seq >= 404 and stream.delivered_seq == 0
    assert stream.undelivered == stream.written_seq
    assert before <= stream.oldest_undelivered_ts <= stream.written_ts <= status.now_ts
    assert 0 < status.spool_bytes < status.max_spool_bytes
    waiting = audit_status_cli(directory, "--json", "--max-lag", "0")
    assert waiting.returncode == 1, waiting.stderr
    assert json.loads(waiting.stdout)["undelivered"] == stream.undelivered

    shipper = Shipper(settings)
    assert shipper.ship_once() == (True, False)
    for shipped in shipper.streams.values():
        shipped.checkpoint()  # as the shipper does when it is idle
    (stream,) = audit_status(directory, settings.audit.max_spool_bytes).streams
    assert stream.undelivered == 0 and stream.delivered_seq == stream.written_seq
    caught_up = audit_status_cli(directory, "--max-lag", "0")
    assert caught_up.returncode == 0, caught_up.stderr
    assert "undelivered: 0 record(s)" in caught_up.stdout
    trail.close()


def test_records_of_before_a_key_rotation_still_verify(tmp_path: Path) -> None:
    """The chain key is rotated: the old key goes to previous_chain_key_files. The stream
    sealed with it still ships as verified, and `audit verify` checks each stream with its
    own key; without the old key both would call it broken."""
    directory = tmp_path / "audit"
    old_key = tmp_path / "old.key"
    old_key.write_bytes(b"the key before the rotation\n")
    before = settings_for(directory, chain_key_file=str(old_key))
    trail = AuditTrail(before)
    simple_session(trail, "00000000000000aa", ["select 1"])
    trail.close()
    new_key = tmp_path / "new.key"
    new_key.write_bytes(b"the key after it\n")
    with OtlpReceiver("http") as receiver:
        after = settings_for(
            directory,
            chain_key_file=str(new_key),
            previous_chain_key_files=[str(old_key)],
            exporter="otlp_http",
            endpoint=receiver.endpoint,
        )
        trail = AuditTrail(after)
        simple_session(trail, "00000000000000bb", ["select 2"])
        trail.close()
        shutil.copytree(directory, tmp_path / "copy")
        assert Shipper(after).run(threading.Event(), until_empty=True) == 0
        spans = receiver.spans()
        # The same spool shipped knowing only the new key: the old stream does not verify.
        receiver.store.spans.clear()
        only_new = settings_for(
            tmp_path / "copy",
            chain_key_file=str(new_key),
            exporter="otlp_http",
            endpoint=receiver.endpoint,
        )
        assert Shipper(only_new).run(threading.Event(), until_empty=True) == 0
        unknown = receiver.spans()
    verified = {s.attributes["pgwarden.session.id"]: [] for s in spans}
    for span in spans:
        verified[span.attributes["pgwarden.session.id"]].append(
            span.attributes["pgwarden.chain.verified"]
        )
    assert verified == {"00000000000000aa": [True, True], "00000000000000bb": [True, True]}
    by_session = {s.attributes["pgwarden.session.id"]: s for s in unknown}
    assert by_session["00000000000000aa"].attributes["pgwarden.chain.verified"] is False
    assert by_session["00000000000000bb"].attributes["pgwarden.chain.verified"] is True
    # audit verify: the recordings of both streams, each with its key.
    keys = [b"the key after it", b"the key before the rotation"]
    assert verify_path(directory, keys).ok
    assert not verify_path(directory, keys[0]).ok
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgwarden",
            "audit",
            "verify",
            str(directory),
            "--key-file",
            str(new_key),
            "--key-file",
            str(old_key),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "OK:" in cli.stdout

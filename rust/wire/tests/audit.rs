//! Audit records written by `SessionCodec` into an `AuditSpool`: a statement's `stmt`
//! record is stored before the bytes that carry it are handed back, its `end` record
//! (with the result as forwarded) when the server finishes it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use pgwarden_wire::audit_record::verify_line;
use pgwarden_wire::{
    AuditConfig, AuditSpool, CaptureLimits, FsyncPolicy, SessionCodec, SessionConfig, SpoolError,
    SpoolOptions, WireError,
};
use serde_json::Value;

const KEY: &[u8] = b"audit-test-key";

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!(
        "pgwarden-audit-it-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spool(dir: &Path, segment: usize, max: u64) -> Arc<AuditSpool> {
    AuditSpool::open(SpoolOptions {
        directory: dir.to_owned(),
        stream: "s".into(),
        key: KEY.to_vec(),
        segment_bytes: segment,
        max_bytes: max,
        fsync: FsyncPolicy::Never,
        usage_interval: Duration::from_millis(10),
        open_members: String::new(),
    })
    .unwrap()
}

fn codec(spool: &Arc<AuditSpool>, params: bool, capture: bool) -> SessionCodec {
    SessionCodec::new(SessionConfig {
        audit: Some(AuditConfig {
            spool: spool.clone(),
            session_id: "sess1".into(),
            record_params: params,
            capture: CaptureLimits {
                max_rows: if capture { 10 } else { 0 },
                max_bytes: if capture { 4096 } else { 0 },
            },
            strict: true,
        }),
        ..SessionConfig::default()
    })
}

/// Every record of the stream so far, checked against the hash chain.
fn stream_records(dir: &Path) -> Vec<Value> {
    let stream = dir.join("s");
    let mut names: Vec<_> = std::fs::read_dir(&stream)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut prev = [0u8; 32];
    let mut out = Vec::new();
    for n in names {
        let data = std::fs::read(stream.join(n)).unwrap();
        for line in data.split(|&b| b == b'\n') {
            if line.is_empty() || line[0] == 0 {
                break;
            }
            prev = verify_line(KEY, &prev, line).expect("chain holds");
            out.push(serde_json::from_slice(line).unwrap());
        }
    }
    out
}

fn of_type<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["type"] == kind).collect()
}

#[test]
fn simple_query_is_recorded_before_it_is_forwarded() {
    let dir = temp_dir("simple");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, true);
    codec.feed_client(&query("SELECT a FROM t")).unwrap();
    // The statement's record is in the spool as soon as its bytes are handed back.
    let before = stream_records(&dir);
    let stmts = of_type(&before, "stmt");
    assert_eq!(stmts.len(), 1);
    assert_eq!(stmts[0]["sql"], "SELECT a FROM t");
    assert_eq!(stmts[0]["session"], "sess1");
    assert_eq!(stmts[0]["n"], 1);
    assert_eq!(stmts[0]["protocol"], "simple");
    assert!(of_type(&before, "end").is_empty());

    let response = cat(&[
        row_description(&["a"]),
        data_row(&[Some(b"1")]),
        data_row(&[Some(b"2")]),
        command_complete("SELECT 2"),
        ready(b'I'),
    ]);
    // Split mid-row: the capture follows the stream, not the chunks.
    let (a, b) = response.split_at(20);
    codec.feed_server(a).unwrap();
    codec.feed_server(b).unwrap();
    let after = stream_records(&dir);
    let ends = of_type(&after, "end");
    assert_eq!(ends.len(), 1);
    let end = ends[0];
    assert_eq!(end["n"], 1);
    assert_eq!(end["command_tag"], "SELECT 2");
    assert_eq!(end["rows"], 2);
    assert_eq!(end["data_rows"], 2);
    assert!(end["sqlstate"].is_null());
    let result = base64::engine::general_purpose::STANDARD
        .decode(end["result"].as_str().unwrap())
        .unwrap();
    assert_eq!(result, response, "the result is kept exactly as forwarded");
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn extended_protocol_is_one_statement_with_opt_in_parameters() {
    let dir = temp_dir("extended");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, true, false);
    let client = cat(&[
        parse("", "SELECT $1::int"),
        bind("", "", &[], &[Some(b"42")]),
        describe_portal(""),
        execute("", 0),
        sync(),
    ]);
    codec.feed_client(&client).unwrap();
    codec
        .feed_server(&cat(&[
            parse_complete(),
            bind_complete(),
            row_description(&["int4"]),
            data_row(&[Some(b"42")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]))
        .unwrap();
    let records = stream_records(&dir);
    let stmts = of_type(&records, "stmt");
    assert_eq!(stmts.len(), 1, "parse, bind and execute make one statement");
    assert_eq!(stmts[0]["protocol"], "extended");
    assert_eq!(stmts[0]["sql"], "SELECT $1::int");
    assert_eq!(stmts[0]["params"], serde_json::json!(["42"]));
    let ends = of_type(&records, "end");
    assert_eq!(ends[0]["command_tag"], "SELECT 1");
    assert!(ends[0].get("result").is_none(), "recording is off");
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn parameters_are_left_out_unless_asked_for() {
    let dir = temp_dir("noparams");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, false);
    codec
        .feed_client(&cat(&[
            parse("", "SELECT $1"),
            bind("", "", &[], &[Some(b"secret")]),
            execute("", 0),
            sync(),
        ]))
        .unwrap();
    let records = stream_records(&dir);
    assert!(of_type(&records, "stmt")[0].get("params").is_none());
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn failed_parse_gets_a_statement_and_an_error() {
    let dir = temp_dir("parse");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, false);
    codec
        .feed_client(&cat(&[parse("", "SELEC 1"), sync()]))
        .unwrap();
    codec
        .feed_server(&cat(&[error("42601", "syntax error"), ready(b'I')]))
        .unwrap();
    let records = stream_records(&dir);
    let stmts = of_type(&records, "stmt");
    assert_eq!(stmts.len(), 1);
    assert_eq!(stmts[0]["sql"], "SELEC 1");
    let ends = of_type(&records, "end");
    assert_eq!(ends[0]["sqlstate"], "42601");
    assert_eq!(ends[0]["error"], "syntax error");
    assert_eq!(ends[0]["n"], stmts[0]["n"]);
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn strict_mode_refuses_a_statement_the_spool_cannot_take() {
    let dir = temp_dir("full");
    let spool = spool(&dir, 4096, 2 * 4096);
    let mut codec = codec(&spool, false, false);
    let mut refused = None;
    for i in 0..1000 {
        let q = query(&format!("SELECT {i} -- padding padding padding padding"));
        match codec.feed_client(&q) {
            Ok(_) => {
                codec
                    .feed_server(&cat(&[command_complete("SELECT 1"), ready(b'I')]))
                    .unwrap();
            }
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    match refused {
        Some(WireError::Audit(SpoolError::Full { .. })) => {}
        other => panic!("expected a full spool, got {other:?}"),
    }
    // The session cannot continue: every later call fails too.
    assert!(codec.feed_client(&query("SELECT 1")).is_err());
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_error_at_bind_belongs_to_the_statement_and_skipped_ones_are_closed() {
    let dir = temp_dir("bind");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, false);
    // The planner folds `1 / $1` at Bind time: the error arrives for the Bind.  A second,
    // pipelined statement before the same Sync is skipped by the server.
    codec
        .feed_client(&cat(&[
            parse("", "SELECT 1 / $1"),
            bind("", "", &[], &[Some(b"0")]),
            describe_portal(""),
            execute("", 0),
            parse("", "SELECT 2"),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
        ]))
        .unwrap();
    codec
        .feed_server(&cat(&[
            parse_complete(),
            error("22012", "division by zero"),
            ready(b'I'),
        ]))
        .unwrap();
    let records = stream_records(&dir);
    let stmts = of_type(&records, "stmt");
    let ends = of_type(&records, "end");
    assert_eq!(
        stmts.len(),
        2,
        "one record per statement, none for the Bind"
    );
    assert_eq!(ends.len(), 2, "every recorded statement ends");
    assert_eq!(ends[0]["n"], stmts[0]["n"]);
    assert_eq!(ends[0]["sqlstate"], "22012");
    assert_eq!(ends[0]["error"], "division by zero");
    assert_eq!(stmts[1]["sql"], "SELECT 2");
    assert_eq!(ends[1]["n"], stmts[1]["n"]);
    assert_eq!(ends[1]["sqlstate"], "22012");
    assert!(ends[1]["error"]
        .as_str()
        .unwrap()
        .starts_with("not executed"));
    assert_eq!(codec.in_flight(), 0);
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn rows_of_a_described_statement_are_recorded_with_its_columns() {
    let dir = temp_dir("describe");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, true);
    // asyncpg: Parse + Describe + Flush first, then Bind + Execute + Sync.
    codec
        .feed_client(&cat(&[
            parse("s1", "SELECT n FROM t"),
            describe_stmt("s1"),
            flush(),
        ]))
        .unwrap();
    let columns = row_description(&["n"]);
    codec
        .feed_server(&cat(&[
            parse_complete(),
            parameter_description(&[]),
            columns.clone(),
        ]))
        .unwrap();
    codec
        .feed_client(&cat(&[bind("", "s1", &[], &[]), execute("", 0), sync()]))
        .unwrap();
    // An Execute's result ends at CommandComplete; ReadyForQuery answers the Sync.
    let rows = cat(&[data_row(&[Some(b"1")]), command_complete("SELECT 1")]);
    codec
        .feed_server(&cat(&[bind_complete(), rows.clone(), ready(b'I')]))
        .unwrap();
    let records = stream_records(&dir);
    let end = of_type(&records, "end")[0];
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.decode(end["columns"].as_str().unwrap()).unwrap(),
        columns
    );
    assert_eq!(b64.decode(end["result"].as_str().unwrap()).unwrap(), rows);

    // libpq: Bind, Describe of the portal, Execute, Sync for every execution.  Each
    // execution after a Describe records the columns; one without a Describe does not.
    let round = |codec: &mut SessionCodec, describe: bool, columns: &[u8]| {
        let mut client = vec![bind("", "s1", &[], &[])];
        let mut server = vec![bind_complete()];
        if describe {
            client.push(describe_portal(""));
            server.push(columns.to_vec());
        }
        client.extend([execute("", 0), sync()]);
        server.extend([
            data_row(&[Some(b"1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]);
        codec.feed_client(&cat(&client)).unwrap();
        codec.feed_server(&cat(&server)).unwrap();
    };
    let renamed = row_description(&["m"]);
    round(&mut codec, true, &columns);
    round(&mut codec, true, &columns);
    round(&mut codec, false, &columns);
    round(&mut codec, true, &renamed);
    let records = stream_records(&dir);
    let ends = of_type(&records, "end");
    assert_eq!(ends.len(), 5);
    let recorded: Vec<Option<Vec<u8>>> = ends[1..]
        .iter()
        .map(|e| e["columns"].as_str().map(|c| b64.decode(c).unwrap()))
        .collect();
    assert_eq!(
        recorded,
        [Some(columns.clone()), Some(columns), None, Some(renamed)]
    );
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn each_statement_record_has_its_own_outcome_and_time() {
    // A session reuses its finished statements' buffers: nothing of one statement's
    // outcome (error, tag, rows, result) may show in the next one's record.
    let dir = temp_dir("reuse");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = codec(&spool, false, true);
    let micros = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let t0 = micros();
    // The statement is parsed once: each round is then Bind, Execute, Sync, so the
    // drafts a round reuses are the ones the statement before it finished.
    codec
        .feed_client(&cat(&[parse("s1", "SELECT n FROM t"), sync()]))
        .unwrap();
    codec
        .feed_server(&cat(&[parse_complete(), ready(b'I')]))
        .unwrap();
    let extended = cat(&[bind("", "s1", &[], &[]), execute("", 0), sync()]);
    let simple = |codec: &mut SessionCodec, sql: &str, response: &[u8]| {
        codec.feed_client(&query(sql)).unwrap();
        codec.feed_server(response).unwrap();
    };
    let rows_of = |v: &[u8]| {
        cat(&[
            row_description(&["a"]),
            data_row(&[Some(v)]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ])
    };
    let failed = error("42P01", "relation \"t\" does not exist");
    let failed_simple = cat(&[failed.clone(), ready(b'I')]);
    let empty = cat(&[empty_query(), ready(b'I')]);
    // Simple statements, each reusing the one draft the statement before it finished.
    simple(&mut codec, "SELECT 1", &rows_of(b"1"));
    simple(&mut codec, "", &empty);
    simple(&mut codec, "SELECT n FROM t", &failed_simple);
    simple(&mut codec, "SELECT 2", &rows_of(b"2"));
    // Extended: an error at Execute, then the same statement succeeding.
    codec.feed_client(&extended).unwrap();
    codec
        .feed_server(&cat(&[bind_complete(), failed.clone(), ready(b'I')]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    codec.feed_client(&extended).unwrap();
    let rows = cat(&[data_row(&[Some(b"7")]), command_complete("SELECT 1")]);
    codec
        .feed_server(&cat(&[bind_complete(), rows.clone(), ready(b'I')]))
        .unwrap();
    let t1 = micros();

    let records = stream_records(&dir);
    let ends = of_type(&records, "end");
    assert_eq!(ends.len(), 6);
    let b64 = base64::engine::general_purpose::STANDARD;
    let result = |e: &Value| b64.decode(e["result"].as_str().unwrap()).unwrap();
    let ok = |e: &Value, tag: Option<&str>, rows: Option<u64>, data_rows: u64, bytes: &[u8]| {
        assert!(e["sqlstate"].is_null() && e["error"].is_null(), "{e}");
        assert_eq!(e["command_tag"].as_str(), tag, "{e}");
        assert_eq!(e["rows"].as_u64(), rows, "{e}");
        assert_eq!(e["data_rows"], data_rows, "{e}");
        assert_eq!(result(e), bytes, "{e}");
    };
    let err = |e: &Value, bytes: &[u8]| {
        assert_eq!(e["sqlstate"], "42P01", "{e}");
        assert!(e["command_tag"].is_null() && e["rows"].is_null(), "{e}");
        assert_eq!(e["data_rows"], 0, "{e}");
        assert_eq!(result(e), bytes, "{e}");
    };
    ok(ends[0], Some("SELECT 1"), Some(1), 1, &rows_of(b"1"));
    ok(ends[1], None, None, 0, &empty);
    err(ends[2], &failed_simple);
    ok(ends[3], Some("SELECT 1"), Some(1), 1, &rows_of(b"2"));
    err(ends[4], &failed);
    ok(ends[5], Some("SELECT 1"), Some(1), 1, &rows);

    // Times come from the clock reading taken for each message: within the test's span,
    // an end never before its statement, and later statements later.
    let stmts = of_type(&records, "stmt");
    let ts = |r: &Value| r["ts"].as_u64().unwrap();
    for (s, e) in stmts.iter().zip(&ends) {
        assert_eq!(s["n"], e["n"]);
        assert!(t0 <= ts(s) && ts(s) <= ts(e) && ts(e) <= t1, "{s} {e}");
    }
    assert!(ts(stmts[5]) >= ts(ends[4]) + 2_000);
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn query_and_execute_events_carry_their_audit_number() {
    let dir = temp_dir("event-n");
    let spool = spool(&dir, 1 << 16, 1 << 30);
    let mut codec = SessionCodec::new(SessionConfig {
        client_events: true,
        audit: Some(AuditConfig {
            spool: spool.clone(),
            session_id: "sess1".into(),
            record_params: false,
            capture: CaptureLimits {
                max_rows: 0,
                max_bytes: 0,
            },
            strict: true,
        }),
        ..SessionConfig::default()
    });
    codec
        .feed_client(&cat(&[
            query("SELECT 1"),
            parse("s", "SELECT 2"),
            bind("", "s", &[], &[]),
            execute("", 0),
            bind("", "s", &[], &[]),
            execute("", 0),
            sync(),
        ]))
        .unwrap();
    let numbers: Vec<(&str, u64)> = codec
        .client_events()
        .iter()
        .filter_map(|e| match e {
            pgwarden_wire::ClientEvent::Query { sql, n, .. } => Some((&**sql, *n)),
            pgwarden_wire::ClientEvent::Execute { sql, n, .. } => Some((&**sql, *n)),
            _ => None,
        })
        .collect();
    assert_eq!(numbers, [("SELECT 1", 1), ("SELECT 2", 2), ("SELECT 2", 3)]);
    let records = stream_records(&dir);
    let stmts: Vec<(String, u64)> = of_type(&records, "stmt")
        .iter()
        .map(|r| {
            (
                r["sql"].as_str().unwrap().to_owned(),
                r["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        stmts,
        [
            ("SELECT 1".into(), 1),
            ("SELECT 2".into(), 2),
            ("SELECT 2".into(), 3)
        ],
        "the numbers are the records' own"
    );
    spool.close().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

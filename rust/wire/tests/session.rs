//! Relay behaviour of `SessionCodec` on realistic exchanges.

mod common;

use common::*;
use pgwarden_wire::backend::TransactionStatus;
use pgwarden_wire::masker::DataRowMasker;
use pgwarden_wire::{
    backend::RowDescription, ClientEvent, Forward, ServerEvent, SessionCodec, SessionConfig,
    WireError,
};
use serde_json::json;

fn run(codec: &mut SessionCodec, client: &[u8], server: &[u8]) -> (Outcome, Outcome) {
    let mut c = Outcome::default();
    let mut s = Outcome::default();
    feed_client_chunks(codec, &[client], &mut c);
    feed_server_chunks(codec, &[server], &mut s);
    assert_eq!(c.forwarded, client);
    assert_eq!(s.forwarded, server);
    (c, s)
}

#[test]
fn simple_query_record_and_events() {
    let mut codec = SessionCodec::new(recording());
    let client = query("SELECT * FROM t");
    let (c, s) = run(
        &mut codec,
        &client,
        &cat(&[
            row_description(&["a"]),
            data_row(&[Some(b"1")]),
            data_row(&[Some(b"2")]),
            command_complete("SELECT 2"),
            ready(b'I'),
        ]),
    );
    assert_eq!(
        c.client_events,
        vec![ClientEvent::Query {
            sql: "SELECT * FROM t".into(),
            n: 0,
            start: 0,
            end: client.len()
        }]
    );
    assert_eq!(
        s.server_events,
        vec![ServerEvent::Ready(TransactionStatus::Idle)]
    );
    assert_eq!(
        records(&mut codec),
        vec![
            json!({"session":"t1","protocol":"simple","statement":"SELECT * FROM t","params":null,
            "command_tag":"SELECT 2","rows":2,"sqlstate":null,"error":null,"masked_columns":null})
        ]
    );
    assert_eq!(codec.in_flight(), 0);
}

#[test]
fn multi_statement_query_sums_rows_and_keeps_first_error() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &query("INSERT INTO t VALUES (1),(2); SELECT 1; SELECT x"),
        &cat(&[
            command_complete("INSERT 0 2"),
            row_description(&["?column?"]),
            data_row(&[Some(b"1")]),
            command_complete("SELECT 1"),
            error("42703", "column \"x\" does not exist"),
            ready(b'I'),
        ]),
    );
    let r = records(&mut codec);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["rows"], 3);
    assert_eq!(r[0]["command_tag"], "SELECT 1");
    assert_eq!(r[0]["sqlstate"], "42703");
    assert_eq!(r[0]["error"], "column \"x\" does not exist");
}

#[test]
fn empty_query_and_tagless_command() {
    let mut codec = SessionCodec::new(recording());
    run(&mut codec, &query(""), &cat(&[empty_query(), ready(b'I')]));
    run(
        &mut codec,
        &query("BEGIN"),
        &cat(&[command_complete("BEGIN"), ready(b'T')]),
    );
    let r = records(&mut codec);
    assert_eq!(r[0]["command_tag"], serde_json::Value::Null);
    assert_eq!(r[0]["rows"], serde_json::Value::Null);
    assert_eq!(r[1]["command_tag"], "BEGIN");
    assert_eq!(codec.transaction_status(), TransactionStatus::InTransaction);
}

/// pgbench -M extended: Parse/Bind/Describe/Execute/Sync per statement.
#[test]
fn extended_protocol_pgbench_style() {
    let mut codec = SessionCodec::new(recording());
    let client = cat(&[
        parse("", "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
        bind("", "", &[], &[Some(b"42")]),
        describe_portal(""),
        execute("", 0),
        sync(),
    ]);
    let (c, _) = run(
        &mut codec,
        &client,
        &cat(&[
            parse_complete(),
            bind_complete(),
            row_description(&["abalance"]),
            data_row(&[Some(b"0")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    );
    let sql: std::sync::Arc<str> = "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into();
    let p_len = parse("", &sql).len();
    let b_len = bind("", "", &[], &[Some(b"42")]).len();
    let d_len = describe_portal("").len();
    let e_start = p_len + b_len + d_len;
    assert_eq!(
        c.client_events,
        vec![
            ClientEvent::Parse {
                name: "".into(),
                sql: sql.clone(),
                start: 0,
                end: p_len
            },
            ClientEvent::Execute {
                portal: "".into(),
                sql: sql.clone(),
                n: 0,
                start: e_start,
                end: e_start + execute("", 0).len()
            },
        ]
    );
    assert_eq!(
        records(&mut codec),
        vec![
            json!({"session":"t1","protocol":"extended","statement":&*sql,"params":["42"],
            "command_tag":"SELECT 1","rows":1,"sqlstate":null,"error":null,"masked_columns":null})
        ]
    );
}

#[test]
fn named_statement_portal_params_and_suspension() {
    let mut codec = SessionCodec::new(SessionConfig {
        max_param_bytes: 4,
        ..recording()
    });
    run(
        &mut codec,
        &cat(&[
            parse("s1", "SELECT * FROM big WHERE a = $1 AND b = $2 AND c = $3"),
            sync(),
        ]),
        &cat(&[parse_complete(), ready(b'I')]),
    );
    run(
        &mut codec,
        &cat(&[
            bind(
                "c1",
                "s1",
                &[0, 1, 0],
                &[Some(b"hello world"), Some(&[1, 2]), None],
            ),
            execute("c1", 2),
            execute("c1", 2),
            sync(),
        ]),
        &cat(&[
            bind_complete(),
            data_row(&[Some(b"1")]),
            data_row(&[Some(b"2")]),
            portal_suspended(),
            data_row(&[Some(b"3")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    );
    let r = records(&mut codec);
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0]["params"],
        json!(["hell...[truncated, 11 bytes]", "\\x0102", null])
    );
    assert_eq!(r[0]["rows"], 2);
    assert_eq!(r[0]["command_tag"], serde_json::Value::Null);
    assert_eq!(r[1]["rows"], 1);
    assert_eq!(r[1]["command_tag"], "SELECT 1");
}

/// asyncpg prepares with Parse/Describe/Flush and no Sync; a failing Parse must still
/// produce a record, and the Sync sent afterwards is answered by ReadyForQuery.
#[test]
fn asyncpg_failing_parse_with_flush() {
    let mut codec = SessionCodec::new(recording());
    let (_, s) = run(
        &mut codec,
        &cat(&[
            parse("__asyncpg_stmt_1__", "SELEC 1"),
            describe_stmt("__asyncpg_stmt_1__"),
            flush(),
        ]),
        &error("42601", "syntax error at or near \"SELEC\""),
    );
    assert!(
        matches!(&s.server_events[0], ServerEvent::Error { sqlstate, .. } if sqlstate == "42601")
    );
    assert_eq!(codec.in_flight(), 0);
    let r = records(&mut codec);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["statement"], "SELEC 1");
    assert_eq!(r[0]["protocol"], "extended");
    assert_eq!(r[0]["sqlstate"], "42601");
    // Messages sent before the Sync are skipped by the server: no record, no wait.
    run(
        &mut codec,
        &cat(&[describe_stmt("x"), sync()]),
        &ready(b'I'),
    );
    assert!(records(&mut codec).is_empty());
    // And the session continues normally.
    run(
        &mut codec,
        &cat(&[
            parse("", "SELECT 1"),
            bind("", "", &[], &[]),
            execute("", 0),
            sync(),
        ]),
        &cat(&[
            parse_complete(),
            bind_complete(),
            data_row(&[Some(b"1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    );
    assert_eq!(records(&mut codec).len(), 1);
}

/// A pipeline where the first Execute fails: later Executes before Sync never run.
#[test]
fn pipelined_error_drops_skipped_executes() {
    let mut codec = SessionCodec::new(recording());
    let client = cat(&[
        parse("", "INSERT INTO t VALUES (1)"),
        bind("", "", &[], &[]),
        execute("", 0),
        parse("", "SELECT 2"),
        bind("", "", &[], &[]),
        execute("", 0),
        sync(),
    ]);
    let mut c = Outcome::default();
    feed_client_chunks(&mut codec, &[&client], &mut c);
    assert_eq!(codec.in_flight(), 2);
    let mut s = Outcome::default();
    feed_server_chunks(
        &mut codec,
        &[&cat(&[
            parse_complete(),
            bind_complete(),
            error("23505", "duplicate key"),
        ])],
        &mut s,
    );
    assert_eq!(codec.in_flight(), 0);
    feed_server_chunks(&mut codec, &[&ready(b'I')], &mut s);
    let r = records(&mut codec);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["statement"], "INSERT INTO t VALUES (1)");
    assert_eq!(r[0]["sqlstate"], "23505");
}

#[test]
fn copy_from_stdin_streams_copy_data() {
    let mut codec = SessionCodec::new(recording());
    run(&mut codec, &query("COPY t FROM STDIN"), &copy_in_response());
    // A large CopyData arrives in pieces: each piece is forwarded at once, unchanged.
    let big = vec![b'x'; 100_000];
    let msg = copy_data(&big);
    let mut forwarded = Vec::new();
    for piece in msg.chunks(7_000) {
        let fwd = codec.feed_client(piece).unwrap();
        assert_eq!(fwd, Forward::Unchanged);
        forwarded.extend_from_slice(piece);
    }
    assert_eq!(codec.held_client_bytes(), 0);
    run(
        &mut codec,
        &copy_done(),
        &cat(&[command_complete("COPY 1000"), ready(b'I')]),
    );
    let r = records(&mut codec);
    assert_eq!(r[0]["rows"], 1000);
    assert_eq!(r[0]["command_tag"], "COPY 1000");
}

#[test]
fn copy_to_stdout_and_copy_fail() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &query("COPY t TO STDOUT"),
        &cat(&[
            copy_out_response(),
            server_copy_data(b"1\ta\n"),
            server_copy_data(b"2\tb\n"),
            server_copy_done(),
            command_complete("COPY 2"),
            ready(b'I'),
        ]),
    );
    let mut fail = Vec::new();
    pgwarden_wire::frontend::FrontendMessage::CopyFail("client gave up").encode(&mut fail);
    run(&mut codec, &query("COPY t FROM STDIN"), &copy_in_response());
    run(
        &mut codec,
        &cat(&[copy_data(b"1\n"), fail]),
        &cat(&[
            error("57014", "COPY from stdin failed: client gave up"),
            ready(b'I'),
        ]),
    );
    let r = records(&mut codec);
    assert_eq!(r[0]["rows"], 2);
    assert_eq!(r[1]["sqlstate"], "57014");
}

#[test]
fn function_call_is_recorded() {
    let mut codec = SessionCodec::new(recording());
    let (c, _) = run(
        &mut codec,
        &function_call(1598, &[Some(&[0, 0, 0, 7])]),
        &cat(&[function_call_response(Some(b"abc")), ready(b'I')]),
    );
    assert!(matches!(
        c.client_events[0],
        ClientEvent::FunctionCall {
            function_oid: 1598,
            ..
        }
    ));
    let r = records(&mut codec);
    assert_eq!(r[0]["protocol"], "function_call");
    assert_eq!(r[0]["function_oid"], 1598);
    assert_eq!(r[0]["params"], json!(["\\x00000007"]));
}

#[test]
fn terminate_is_reported_even_without_client_events() {
    let mut codec = SessionCodec::new(SessionConfig::default());
    let client = cat(&[query("SELECT 1"), terminate()]);
    let fwd = codec.feed_client(&client).unwrap();
    assert_eq!(fwd, Forward::Unchanged);
    let q = query("SELECT 1").len();
    assert_eq!(
        codec.client_events(),
        &[ClientEvent::Terminate {
            start: q,
            end: q + 5
        }]
    );
    assert!(codec.take_records().is_empty());
}

#[test]
fn incomplete_client_message_is_held_until_complete() {
    let mut codec = SessionCodec::new(recording());
    let a = query("SELECT 1");
    let b = query("SELECT 2");
    let mut chunk1 = a.clone();
    chunk1.extend_from_slice(&b[..6]);
    assert_eq!(
        codec.feed_client(&chunk1).unwrap(),
        Forward::Prefix(a.len())
    );
    assert_eq!(codec.held_client_bytes(), 6);
    let fwd = codec.feed_client(&b[6..]).unwrap();
    assert_eq!(fwd, Forward::Buffered);
    assert_eq!(codec.client_buffer(), &b[..]);
    assert!(
        matches!(&codec.client_events()[0], ClientEvent::Query { start: 0, end, .. } if *end == b.len())
    );
}

#[test]
fn server_bytes_pass_through_untouched_even_mid_message() {
    let mut codec = SessionCodec::new(recording());
    codec.feed_client(&query("SELECT big")).unwrap();
    let row = data_row(&[Some(&vec![7u8; 20 << 20])]);
    let stream = cat(&[
        row_description(&["b"]),
        row,
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    for piece in stream.chunks(65_536) {
        assert_eq!(codec.feed_server(piece).unwrap(), Forward::Unchanged);
    }
    assert_eq!(records(&mut codec)[0]["rows"], 1);
}

#[test]
fn portals_are_forgotten_at_idle() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &cat(&[parse("", "SELECT 1"), bind("p", "", &[], &[]), sync()]),
        &cat(&[parse_complete(), bind_complete(), ready(b'I')]),
    );
    let (c, _) = run(
        &mut codec,
        &cat(&[execute("p", 0), sync()]),
        &cat(&[error("34000", "portal \"p\" does not exist"), ready(b'I')]),
    );
    assert!(matches!(&c.client_events[0], ClientEvent::Execute { sql, .. } if sql.is_empty()));
}

#[test]
fn close_statement_forgets_its_text() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &cat(&[parse("s", "SELECT 1"), close_stmt("s"), sync()]),
        &cat(&[parse_complete(), close_complete(), ready(b'I')]),
    );
    let (c, _) = run(
        &mut codec,
        &cat(&[bind("", "s", &[], &[]), execute("", 0), sync()]),
        &cat(&[
            error("26000", "prepared statement \"s\" does not exist"),
            ready(b'I'),
        ]),
    );
    assert!(matches!(&c.client_events[0], ClientEvent::Execute { sql, .. } if sql.is_empty()));
    let r = records(&mut codec);
    assert_eq!(
        r.len(),
        1,
        "the failed Bind is recorded, the skipped Execute is not"
    );
    assert_eq!(r[0]["sqlstate"], "26000");
}

#[test]
fn describe_statement_round_trip_keeps_queue_aligned() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &cat(&[parse("s", "SELECT $1::int"), describe_stmt("s"), sync()]),
        &cat(&[
            parse_complete(),
            parameter_description(&[23]),
            row_description(&["int4"]),
            ready(b'I'),
        ]),
    );
    run(
        &mut codec,
        &cat(&[parse("n", "UPDATE t SET a = 1"), describe_stmt("n"), sync()]),
        &cat(&[
            parse_complete(),
            parameter_description(&[]),
            no_data(),
            ready(b'I'),
        ]),
    );
    assert_eq!(codec.in_flight(), 0);
    assert!(records(&mut codec).is_empty());
    // A Parse/Sync without Execute: no statement in flight, yet responses are owed.
    codec
        .feed_client(&cat(&[parse("m", "SELECT 1"), sync()]))
        .unwrap();
    assert_eq!((codec.in_flight(), codec.pending_requests()), (0, 2));
    codec
        .feed_server(&cat(&[parse_complete(), ready(b'I')]))
        .unwrap();
    assert_eq!(codec.pending_requests(), 0);
}

#[test]
fn async_messages_do_not_disturb_tracking() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &query("SELECT 1"),
        &cat(&[
            notice("hello"),
            parameter_status("TimeZone", "UTC"),
            data_row(&[Some(b"1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    );
    assert_eq!(records(&mut codec)[0]["rows"], 1);
}

#[test]
fn fatal_error_without_pending_statement_is_an_event_only() {
    let mut codec = SessionCodec::new(recording());
    let (_, s) = run(
        &mut codec,
        b"",
        &error(
            "57P01",
            "terminating connection due to administrator command",
        ),
    );
    assert_eq!(s.server_events.len(), 1);
    assert!(records(&mut codec).is_empty());
}

#[test]
fn oversized_and_malformed_input_is_refused() {
    let mut codec = SessionCodec::new(SessionConfig {
        max_message_len: 1000,
        ..SessionConfig::default()
    });
    assert!(matches!(
        codec.feed_client(&[b'Q', 0x7f, 0xff, 0xff, 0xff]),
        Err(WireError::TooLong { .. })
    ));
    // The stream cannot be resynchronised: later calls fail too.
    assert!(codec.feed_client(&query("SELECT 1")).is_err());
    assert_eq!(codec.held_client_bytes(), 0);

    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(matches!(
        codec.feed_client(&[b'S', 0, 0, 0, 3]),
        Err(WireError::TooShort { .. })
    ));
    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(matches!(
        codec.feed_client(b"p\0\0\0\x05x"),
        Err(WireError::UnknownTag { .. })
    ));
    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(matches!(
        codec.feed_server(b"?\0\0\0\x04"),
        Err(WireError::UnknownTag { .. })
    ));
    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(codec.feed_server(b"Z\0\0\0\x05X").is_err());
    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(codec.feed_server(b"1\0\0\0\x05X").is_err());
    let mut codec = SessionCodec::new(SessionConfig::default());
    assert!(
        codec.feed_client(b"Q\0\0\0\x06\xff\xfe").is_err(),
        "a Query without its terminator is malformed, UTF-8 or not"
    );
}

/// Portal and statement names are bytes in the client encoding (here LATIN1 'é'): a Bind,
/// Execute, Describe and Close naming them go to the server unchanged, and the Execute is
/// traced back to its statement's text.  (Under UTF8 the server refuses such a name with
/// 22021 itself, and the session goes on.)
#[test]
fn names_that_are_not_utf8_are_passed_through_and_tracked() {
    let mut codec = SessionCodec::new(recording());
    run(
        &mut codec,
        &cat(&[parse("s1", "SELECT 1"), sync()]),
        &cat(&[parse_complete(), ready(b'I')]),
    );
    let bind_latin1 = raw_message(b'B', b"p\xe9\0s1\0\0\0\0\0\0\0");
    let execute_latin1 = raw_message(b'E', b"p\xe9\0\0\0\0\0");
    let describe_latin1 = raw_message(b'D', b"Pp\xe9\0");
    let close_latin1 = raw_message(b'C', b"Pp\xe9\0");
    let client = cat(&[
        bind_latin1.clone(),
        describe_latin1.clone(),
        execute_latin1.clone(),
        close_latin1.clone(),
        sync(),
    ]);
    let (c, _) = run(
        &mut codec,
        &client,
        &cat(&[
            bind_complete(),
            row_description(&["?column?"]),
            data_row(&[Some(b"1")]),
            command_complete("SELECT 1"),
            close_complete(),
            ready(b'I'),
        ]),
    );
    assert_eq!(c.forwarded, client, "forwarded unchanged");
    let e_start = bind_latin1.len() + describe_latin1.len();
    assert_eq!(
        c.client_events,
        vec![ClientEvent::Execute {
            portal: "p\u{FFFD}".into(),
            sql: "SELECT 1".into(),
            n: 0,
            start: e_start,
            end: e_start + execute_latin1.len()
        }]
    );
    let r = records(&mut codec);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["statement"], "SELECT 1");
    assert_eq!(r[0]["rows"], 1);
}

// --- statements refused in place (text not UTF-8) -----------------------------------------

fn raw_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn latin1_query() -> Vec<u8> {
    raw_message(b'Q', b"SELECT 'caf\xe9'\0")
}

fn latin1_parse(name: &str) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.extend_from_slice(b"\0SELECT 'caf\xe9' WHERE $1\0\0\0");
    raw_message(b'P', &body)
}

/// The server's answer to the replacement statement.
fn syntax_error() -> Vec<u8> {
    error("42601", "syntax error at or near \"pgwarden\"")
}

/// (tag, body) of every message in `bytes`.
fn messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        out.push((bytes[0], bytes[5..1 + len].to_vec()));
        bytes = &bytes[1 + len..];
    }
    out
}

fn field(body: &[u8], code: u8) -> Option<String> {
    pgwarden_wire::backend::Fields::decode(body, "test")
        .unwrap()
        .get(code)
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

fn assert_refusal_error(body: &[u8]) {
    assert_eq!(field(body, b'C').as_deref(), Some("22021"));
    assert_eq!(field(body, b'S').as_deref(), Some("ERROR"));
    assert_eq!(
        field(body, b'M').as_deref(),
        Some("statement text is not valid UTF-8")
    );
    assert!(field(body, b'H').unwrap().contains("client_encoding UTF8"));
    assert!(field(body, b'D').unwrap().contains("0xe9 at offset 11"));
}

#[test]
fn non_utf8_query_is_replaced_and_answered_with_22021() {
    let mut codec = SessionCodec::new(recording());
    let mut c = Outcome::default();
    feed_client_chunks(&mut codec, &[&latin1_query()], &mut c);
    assert!(
        c.client_events.is_empty(),
        "nothing left for a policy to decide"
    );
    let sent = messages(&c.forwarded);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, b'Q');
    assert!(sent[0].1.starts_with(b"pgwarden refused this statement"));
    assert!(!c.forwarded.windows(4).any(|w| w == b"caf\xe9"));

    let mut s = Outcome::default();
    let answer = cat(&[syntax_error(), ready(b'T')]);
    feed_server_chunks(&mut codec, &[&answer], &mut s);
    let got = messages(&s.forwarded);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, b'E');
    assert_refusal_error(&got[0].1);
    assert_eq!(got[1], (b'Z', b"T".to_vec()));
    assert!(
        matches!(&s.server_events[0], ServerEvent::Error { sqlstate, .. } if sqlstate == "22021")
    );
    let r = records(&mut codec);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["statement"], "SELECT 'caf\u{fffd}'");
    assert_eq!(r[0]["sqlstate"], "22021");
    assert_eq!(codec.in_flight(), 0);

    // Back to the zero-copy path once the answer is through.
    let next = cat(&[command_complete("SELECT 1"), ready(b'I')]);
    codec.feed_client(&query("SELECT 1")).unwrap();
    assert_eq!(codec.feed_server(&next).unwrap(), Forward::Unchanged);
}

#[test]
fn refused_query_behind_a_pipelined_result_keeps_response_order() {
    let first = cat(&[
        row_description(&["a"]),
        data_row(&[Some(b"1")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    let server = cat(&[first.clone(), syntax_error(), ready(b'I')]);
    // Every split of the server stream, one split of it before the refusal is known (a
    // header forwarded in part in the fast mode, then completed in the holding one).
    for cut in 1..server.len() {
        let mut codec = SessionCodec::new(SessionConfig::default());
        let mut c = Outcome::default();
        let mut s = Outcome::default();
        feed_client_chunks(&mut codec, &[&query("SELECT 1")], &mut c);
        let early = cut.min(first.len() - 1);
        feed_server_chunks(&mut codec, &[&server[..early]], &mut s);
        feed_client_chunks(&mut codec, &[&latin1_query()], &mut c);
        let rest: Vec<&[u8]> = server[early..].chunks(cut.max(1)).collect();
        feed_server_chunks(&mut codec, &rest, &mut s);
        let got = messages(&s.forwarded);
        assert_eq!(&s.forwarded[..first.len()], &first[..], "cut {cut}");
        assert_eq!(got.len(), 6, "cut {cut}");
        assert_refusal_error(&got[4].1);
        assert_eq!(got[5], (b'Z', b"I".to_vec()));
        assert_eq!(codec.server_bytes_owed(), 0);
    }
}

#[test]
fn non_utf8_parse_fails_at_its_place_and_the_batch_skips_to_sync() {
    let mut codec = SessionCodec::new(recording());
    let client = cat(&[
        latin1_parse(""),
        bind("", "", &[], &[Some(b"t")]),
        execute("", 0),
        sync(),
    ]);
    let mut c = Outcome::default();
    feed_client_chunks(&mut codec, &[&client], &mut c);
    let sent = messages(&c.forwarded);
    assert_eq!(
        sent.iter().map(|m| m.0).collect::<Vec<_>>(),
        b"PBES".to_vec()
    );
    assert!(
        sent[0].1.starts_with(b"\0pgwarden refused"),
        "same (unnamed) name"
    );
    assert!(c
        .client_events
        .iter()
        .all(|e| !matches!(e, ClientEvent::Parse { .. })));
    // The server fails the Parse and skips Bind and Execute.
    let mut s = Outcome::default();
    feed_server_chunks(&mut codec, &[&cat(&[syntax_error(), ready(b'I')])], &mut s);
    let got = messages(&s.forwarded);
    assert_eq!(got.len(), 2);
    assert_refusal_error(&got[0].1);
    assert_eq!(got[1].0, b'Z');
    assert_eq!(codec.pending_requests(), 0);
    let r = records(&mut codec);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["statement"], "SELECT 'caf\u{fffd}' WHERE $1");
    assert_eq!(r[0]["sqlstate"], "22021");
}

#[test]
fn another_answer_to_a_refused_statement_is_forwarded_as_it_is() {
    let mut codec = SessionCodec::new(SessionConfig::default());
    codec.feed_client(&latin1_query()).unwrap();
    let mut fatal = Vec::new();
    pgwarden_wire::backend::Fields::encode_pairs(
        &mut fatal,
        b'E',
        &[
            (b'S', b"FATAL"),
            (b'V', b"FATAL"),
            (b'C', b"57P01"),
            (b'M', b"bye"),
        ],
    );
    let mut s = Outcome::default();
    feed_server_chunks(&mut codec, &[&fatal], &mut s);
    assert_eq!(s.forwarded, fatal);
}

#[test]
fn server_bytes_owed_tracks_the_message_being_forwarded() {
    let mut codec = SessionCodec::new(SessionConfig::default());
    codec.feed_client(&query("SELECT 'x'")).unwrap();
    let row = data_row(&[Some(&[b'x'; 100])]);
    assert_eq!(codec.server_bytes_owed(), 0);
    codec.feed_server(&row[..3]).unwrap();
    assert_eq!(codec.server_bytes_owed(), 2, "the rest of the header");
    codec.feed_server(&row[3..5]).unwrap();
    assert_eq!(codec.server_bytes_owed(), row.len() - 5);
    codec.feed_server(&row[5..50]).unwrap();
    assert_eq!(codec.server_bytes_owed(), row.len() - 50);
    codec.feed_server(&row[50..]).unwrap();
    assert_eq!(codec.server_bytes_owed(), 0);
}

#[test]
fn held_bytes_follow_what_arrived_not_the_announced_length() {
    let mut codec = SessionCodec::new(SessionConfig {
        max_message_len: 1 << 20,
        ..SessionConfig::default()
    });
    // A Query announcing 1 MiB - 1 of which 10 bytes arrived.
    let mut partial = vec![b'Q', 0x00, 0x0f, 0xff, 0xff];
    partial.extend_from_slice(b"SELECT 1; ");
    assert_eq!(codec.feed_client(&partial).unwrap(), Forward::Prefix(0));
    assert_eq!(codec.held_client_bytes(), partial.len());
    // One byte over the limit is refused from the header alone.
    let mut codec = SessionCodec::new(SessionConfig {
        max_message_len: 1 << 20,
        ..SessionConfig::default()
    });
    assert!(matches!(
        codec.feed_client(&[b'Q', 0x00, 0x10, 0x00, 0x01]),
        Err(WireError::TooLong {
            len: 1_048_577,
            limit: 1_048_576
        })
    ));
    assert!(matches!(
        codec.feed_server(&[b'D', 0x7f, 0xff, 0xff, 0xff]),
        Err(WireError::TooLong { .. })
    ));
}

#[test]
fn pipeline_depth_is_bounded() {
    let mut codec = SessionCodec::new(SessionConfig::default());
    let syncs = sync().repeat(pgwarden_wire::statements::MAX_PENDING_REQUESTS);
    codec.feed_client(&syncs).unwrap();
    assert_eq!(
        codec.pending_requests(),
        pgwarden_wire::statements::MAX_PENDING_REQUESTS
    );
    assert!(matches!(
        codec.feed_client(&sync()),
        Err(WireError::PipelineTooDeep { .. })
    ));
}

/// Uppercases every text value: stands in for the masking policy.
struct Shout {
    wanted: bool,
}

impl DataRowMasker for Shout {
    fn describe(&mut self, description: &RowDescription<'_>) {
        self.wanted = description.fields().any(|f| f.name == b"secret");
    }
    fn wants_rows(&mut self, _statement: Option<&str>) -> bool {
        self.wanted
    }
    fn mask_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool {
        out.extend(row.iter().map(u8::to_ascii_uppercase));
        true
    }
}

#[test]
fn masker_rewrites_only_rows_it_wants_at_any_chunking() {
    let stream = cat(&[
        row_description(&["secret"]),
        data_row(&[Some(b"abc")]),
        data_row(&[Some(&vec![b'q'; 5000])]),
        command_complete("SELECT 2"),
        ready(b'I'),
        row_description(&["public"]),
        data_row(&[Some(b"xyz")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    let expected = cat(&[
        row_description(&["secret"]),
        data_row(&[Some(b"ABC")]),
        data_row(&[Some(&vec![b'Q'; 5000])]),
        command_complete("SELECT 2"),
        ready(b'I'),
        row_description(&["public"]),
        data_row(&[Some(b"xyz")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    for size in [1, 2, 3, 5, 7, 64, 1000, 4999, stream.len()] {
        let mut codec = SessionCodec::new(SessionConfig::default());
        codec.set_masker(Some(Box::new(Shout { wanted: false })));
        let mut out = Outcome::default();
        let chunks: Vec<&[u8]> = stream.chunks(size).collect();
        feed_server_chunks(&mut codec, &chunks, &mut out);
        assert_eq!(out.forwarded, expected, "chunk size {size}");
        assert_eq!(out.server_events.len(), 2);
    }
}

/// A client that executes a statement it described once (or never) gets a Describe of
/// the portal sent before each Execute, whose answer only the masker sees: the columns
/// the server has now, not those of a description that may have gone stale.
#[test]
fn masked_sessions_describe_each_portal_they_execute() {
    let setup = cat(&[parse("s", "select secret"), describe_stmt("s"), sync()]);
    let run = cat(&[bind("", "s", &[], &[]), execute("", 0), sync()]);
    let described = cat(&[
        bind("", "s", &[], &[]),
        describe_portal(""),
        execute("", 0),
        sync(),
    ]);
    let mut codec = SessionCodec::new(recording());
    codec.set_masker(Some(Box::new(Shout { wanted: false })));
    let mut out = Outcome::default();
    feed_client_chunks(&mut codec, &[&setup, &run, &described], &mut out);
    let expected = cat(&[setup.clone(), described.clone(), described.clone()]);
    assert_eq!(out.forwarded, expected);
    // The Execute event points at the Execute message, after the inserted Describe.
    let executes: Vec<_> = out
        .client_events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Execute { start, end, .. } => Some((*start, *end)),
            _ => None,
        })
        .collect();
    let first = setup.len() + bind("", "s", &[], &[]).len() + describe_portal("").len();
    assert_eq!(executes[0], (first, first + execute("", 0).len()));

    let server = cat(&[
        parse_complete(),
        row_description(&["public"]),
        ready(b'I'),
        // The gateway's Describe: the statement now returns "secret".
        bind_complete(),
        row_description(&["secret"]),
        data_row(&[Some(b"abc")]),
        command_complete("SELECT 1"),
        ready(b'I'),
        // The client's own Describe: forwarded.
        bind_complete(),
        row_description(&["secret"]),
        data_row(&[Some(b"def")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    let client_sees = cat(&[
        parse_complete(),
        row_description(&["public"]),
        ready(b'I'),
        bind_complete(),
        data_row(&[Some(b"ABC")]),
        command_complete("SELECT 1"),
        ready(b'I'),
        bind_complete(),
        row_description(&["secret"]),
        data_row(&[Some(b"DEF")]),
        command_complete("SELECT 1"),
        ready(b'I'),
    ]);
    for size in [1, 2, 3, 7, 64, server.len()] {
        let mut codec = SessionCodec::new(recording());
        codec.set_masker(Some(Box::new(Shout { wanted: false })));
        feed_client_chunks(
            &mut codec,
            &[&setup, &run, &described],
            &mut Outcome::default(),
        );
        let mut got = Outcome::default();
        let chunks: Vec<&[u8]> = server.chunks(size).collect();
        feed_server_chunks(&mut codec, &chunks, &mut got);
        assert_eq!(got.forwarded, client_sees, "chunk size {size}");
        assert_eq!(codec.pending_requests(), 0);
        let records = String::from_utf8(codec.take_records()).unwrap();
        assert_eq!(records.lines().count(), 2, "{records}");
    }
}

#[test]
fn the_gateways_describe_answers_nodata_and_errors_as_the_execute_would() {
    let mut codec = SessionCodec::new(recording());
    codec.set_masker(Some(Box::new(Shout { wanted: false })));
    let client = cat(&[
        bind("", "s", &[], &[]),
        execute("", 0),
        sync(),
        execute("gone", 0),
        sync(),
    ]);
    feed_client_chunks(&mut codec, &[&client], &mut Outcome::default());
    let server = cat(&[
        bind_complete(),
        no_data(),
        command_complete("INSERT 0 1"),
        ready(b'I'),
        // Describe of a portal that does not exist: the server skips the Execute.
        error("34000", "portal \"gone\" does not exist"),
        ready(b'I'),
    ]);
    let mut got = Outcome::default();
    feed_server_chunks(&mut codec, &[&server], &mut got);
    let client_sees = cat(&[
        bind_complete(),
        command_complete("INSERT 0 1"),
        ready(b'I'),
        error("34000", "portal \"gone\" does not exist"),
        ready(b'I'),
    ]);
    assert_eq!(got.forwarded, client_sees);
    assert_eq!(codec.pending_requests(), 0);
    let records = String::from_utf8(codec.take_records()).unwrap();
    assert!(records.contains("34000"), "{records}");
}

#[test]
fn counters_count_statements_and_bytes_in_any_chunking() {
    for config in [SessionConfig::default(), recording()] {
        let mut codec = SessionCodec::new(config);
        let client = cat(&[
            query("SELECT 1; SELECT 2"),
            parse("s", "SELECT $1"),
            bind("", "s", &[], &[Some(b"7")]),
            execute("", 0),
            sync(),
            function_call(1598, &[]),
            copy_data(b"ignored"),
        ]);
        let server = cat(&[command_complete("SELECT 1"), ready(b'I')]);
        // One byte at a time: a message counts once, when it is whole.
        let pieces: Vec<&[u8]> = client.chunks(1).collect();
        let mut c = Outcome::default();
        feed_client_chunks(&mut codec, &pieces, &mut c);
        let mut s = Outcome::default();
        feed_server_chunks(&mut codec, &[&server], &mut s);
        let counters = codec.counters();
        assert_eq!(counters.statements, 3, "Query, Execute, FunctionCall");
        assert_eq!(counters.client_bytes, client.len() as u64);
        assert_eq!(counters.server_bytes, server.len() as u64);
    }
}

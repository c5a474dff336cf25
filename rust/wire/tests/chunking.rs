//! Chunking invariance: however a valid stream is split into reads, the relay forwards
//! the same bytes and reports the same events and records.

mod common;

use common::*;
use pgwarden_wire::{SessionCodec, SessionConfig};
use proptest::prelude::*;

/// A client stream exercising every relayed frontend message.
fn client_stream() -> Vec<u8> {
    let mut fail = Vec::new();
    pgwarden_wire::frontend::FrontendMessage::CopyFail("stop").encode(&mut fail);
    cat(&[
        query("SELECT aid FROM pgbench_accounts LIMIT 3"),
        parse("s1", "SELECT $1::text, $2::bytea"),
        describe_stmt("s1"),
        sync(),
        bind(
            "p1",
            "s1",
            &[0, 1],
            &[Some("é€".as_bytes()), Some(&[0, 255])],
        ),
        execute("p1", 1),
        execute("p1", 0),
        sync(),
        query("COPY t FROM STDIN"),
        copy_data(&vec![b'c'; 3000]),
        copy_data(b""),
        copy_done(),
        query("COPY t FROM STDIN"),
        fail,
        function_call(1598, &[None]),
        parse("", "SELEC"),
        flush(),
        sync(),
        close_stmt("s1"),
        sync(),
        terminate(),
    ])
}

/// The server's answer to `client_stream`, with a large DataRow in the middle.
fn server_stream(big_row: usize) -> Vec<u8> {
    cat(&[
        row_description(&["aid"]),
        data_row(&[Some(b"1")]),
        data_row(&[Some(&vec![b'r'; big_row])]),
        data_row(&[None]),
        command_complete("SELECT 3"),
        ready(b'I'),
        parse_complete(),
        parameter_description(&[25, 17]),
        row_description(&["text", "bytea"]),
        ready(b'I'),
        bind_complete(),
        data_row(&[Some(b"x"), Some(b"y")]),
        portal_suspended(),
        command_complete("SELECT 0"),
        ready(b'I'),
        copy_in_response(),
        command_complete("COPY 1"),
        ready(b'I'),
        copy_in_response(),
        error("57014", "COPY from stdin failed: stop"),
        ready(b'I'),
        function_call_response(None),
        ready(b'I'),
        error("42601", "syntax error at or near \"SELEC\""),
        ready(b'I'),
        close_complete(),
        notice("bye"),
        ready(b'I'),
    ])
}

fn split<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.push(0);
    points.push(data.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &data[w[0]..w[1]]).collect()
}

fn relay(client: &[&[u8]], server: &[&[u8]]) -> (Outcome, Outcome, Vec<serde_json::Value>) {
    let mut codec = SessionCodec::new(recording());
    let mut c = Outcome::default();
    let mut s = Outcome::default();
    feed_client_chunks(&mut codec, client, &mut c);
    feed_server_chunks(&mut codec, server, &mut s);
    assert_eq!(codec.in_flight(), 0);
    assert_eq!(codec.held_client_bytes(), 0);
    (c, s, records(&mut codec))
}

#[test]
fn every_single_split_point() {
    let client = client_stream();
    let server = server_stream(300);
    let reference = relay(&[&client], &[&server]);
    assert_eq!(reference.0.forwarded, client);
    assert_eq!(reference.1.forwarded, server);
    assert_eq!(reference.2.len(), 7, "{:#?}", reference.2);
    for i in 0..=client.len() {
        assert_eq!(
            relay(&[&client[..i], &client[i..]], &[&server]),
            reference,
            "client split {i}"
        );
    }
    for i in 0..=server.len() {
        assert_eq!(
            relay(&[&client], &[&server[..i], &server[i..]]),
            reference,
            "server split {i}"
        );
    }
}

#[test]
fn byte_at_a_time() {
    let client = client_stream();
    let server = server_stream(5000);
    let reference = relay(&[&client], &[&server]);
    let c: Vec<&[u8]> = client.chunks(1).collect();
    let s: Vec<&[u8]> = server.chunks(1).collect();
    assert_eq!(relay(&c, &s), reference);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_chunkings(
        client_cuts in proptest::collection::vec(any::<usize>(), 0..40),
        server_cuts in proptest::collection::vec(any::<usize>(), 0..40),
        big_row in prop_oneof![Just(0usize), 1..70_000usize, Just(17 << 20)],
    ) {
        let client = client_stream();
        let server = server_stream(big_row);
        let reference = relay(&[&client], &[&server]);
        let got = relay(&split(&client, &client_cuts), &split(&server, &server_cuts));
        prop_assert_eq!(got, reference);
    }

    /// Framing alone (no records, no events) agrees with the recording relay.
    #[test]
    fn pass_through_matches(server_cuts in proptest::collection::vec(any::<usize>(), 0..20)) {
        let client = client_stream();
        let server = server_stream(1000);
        let mut codec = SessionCodec::new(SessionConfig::default());
        let mut c = Outcome::default();
        let mut s = Outcome::default();
        feed_client_chunks(&mut codec, &[&client], &mut c);
        feed_server_chunks(&mut codec, &split(&server, &server_cuts), &mut s);
        prop_assert_eq!(c.forwarded, client);
        prop_assert_eq!(s.forwarded, server);
        prop_assert_eq!(codec.in_flight(), 0);
        prop_assert_eq!(c.client_events.len(), 1); // Terminate only
        prop_assert!(codec.take_records().is_empty());
    }
}

//! Builders for realistic message streams, shared by the integration tests.
#![allow(dead_code)]

use pgwarden_wire::arrays::{write_i16s, write_oids, write_values};
use pgwarden_wire::backend::{
    BackendMessage, FieldDescription, Fields, RowDescription, TransactionStatus,
};
use pgwarden_wire::frontend::{Bind, Close, Describe, Execute, FrontendMessage, Query, Target};
use pgwarden_wire::writer::MessageWriter;
use pgwarden_wire::{ClientEvent, Forward, ServerEvent, SessionCodec, SessionConfig};

pub fn query(sql: &str) -> Vec<u8> {
    enc_f(FrontendMessage::Query(Query { sql }))
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = MessageWriter::typed(&mut b, b'P');
    w.cstr(name.as_bytes()).cstr(sql.as_bytes());
    write_oids(&mut w, &[]);
    w.finish();
    b
}

pub fn bind(portal: &str, stmt: &str, formats: &[i16], params: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    Bind::encode_parts(&mut b, portal, stmt, formats, params, &[]);
    b
}

pub fn describe_stmt(name: &str) -> Vec<u8> {
    enc_f(FrontendMessage::Describe(Describe {
        target: Target::Statement,
        name: name.as_bytes(),
    }))
}

pub fn describe_portal(name: &str) -> Vec<u8> {
    enc_f(FrontendMessage::Describe(Describe {
        target: Target::Portal,
        name: name.as_bytes(),
    }))
}

pub fn close_stmt(name: &str) -> Vec<u8> {
    enc_f(FrontendMessage::Close(Close {
        target: Target::Statement,
        name: name.as_bytes(),
    }))
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    enc_f(FrontendMessage::Execute(Execute {
        portal: portal.as_bytes(),
        max_rows,
    }))
}

pub fn sync() -> Vec<u8> {
    enc_f(FrontendMessage::Sync)
}

pub fn flush() -> Vec<u8> {
    enc_f(FrontendMessage::Flush)
}

pub fn terminate() -> Vec<u8> {
    enc_f(FrontendMessage::Terminate)
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    enc_f(FrontendMessage::CopyData(data))
}

pub fn copy_done() -> Vec<u8> {
    enc_f(FrontendMessage::CopyDone)
}

pub fn function_call(oid: u32, args: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = MessageWriter::typed(&mut b, b'F');
    w.u32(oid);
    write_i16s(&mut w, &[1]);
    write_values(&mut w, args);
    w.i16(1);
    w.finish();
    b
}

fn enc_f(m: FrontendMessage<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    b
}

fn enc_b(m: BackendMessage<'_>) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    b
}

pub fn parse_complete() -> Vec<u8> {
    enc_b(BackendMessage::ParseComplete)
}

pub fn bind_complete() -> Vec<u8> {
    enc_b(BackendMessage::BindComplete)
}

pub fn close_complete() -> Vec<u8> {
    enc_b(BackendMessage::CloseComplete)
}

pub fn no_data() -> Vec<u8> {
    enc_b(BackendMessage::NoData)
}

pub fn portal_suspended() -> Vec<u8> {
    enc_b(BackendMessage::PortalSuspended)
}

pub fn empty_query() -> Vec<u8> {
    enc_b(BackendMessage::EmptyQueryResponse)
}

pub fn parameter_description(oids: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = MessageWriter::typed(&mut b, b't');
    write_oids(&mut w, oids);
    w.finish();
    b
}

pub fn row_description(names: &[&str]) -> Vec<u8> {
    let fields: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| FieldDescription {
            name: n.as_bytes(),
            table_oid: 16_390,
            column_attnum: i as i16 + 1,
            type_oid: 25,
            type_len: -1,
            type_modifier: -1,
            format: 0,
        })
        .collect();
    let mut b = Vec::new();
    RowDescription::encode_fields(&mut b, &fields);
    b
}

pub fn data_row(values: &[Option<&[u8]>]) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = MessageWriter::typed(&mut b, b'D');
    write_values(&mut w, values);
    w.finish();
    b
}

pub fn command_complete(tag: &str) -> Vec<u8> {
    enc_b(BackendMessage::CommandComplete { tag })
}

pub fn ready(status: u8) -> Vec<u8> {
    enc_b(BackendMessage::ReadyForQuery(
        TransactionStatus::from_byte(status).unwrap(),
    ))
}

pub fn error(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    Fields::encode_pairs(
        &mut b,
        b'E',
        &[
            (b'S', b"ERROR"),
            (b'V', b"ERROR"),
            (b'C', sqlstate.as_bytes()),
            (b'M', message.as_bytes()),
        ],
    );
    b
}

pub fn notice(message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    Fields::encode_pairs(
        &mut b,
        b'N',
        &[(b'S', b"NOTICE"), (b'M', message.as_bytes())],
    );
    b
}

pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    enc_b(BackendMessage::ParameterStatus {
        name: name.as_bytes(),
        value: value.as_bytes(),
    })
}

pub fn copy_in_response() -> Vec<u8> {
    copy_response(b'G')
}

pub fn copy_out_response() -> Vec<u8> {
    copy_response(b'H')
}

fn copy_response(tag: u8) -> Vec<u8> {
    let mut b = Vec::new();
    let mut w = MessageWriter::typed(&mut b, tag);
    w.u8(0);
    write_i16s(&mut w, &[0, 0]);
    w.finish();
    b
}

pub fn server_copy_data(data: &[u8]) -> Vec<u8> {
    enc_b(BackendMessage::CopyData(data))
}

pub fn server_copy_done() -> Vec<u8> {
    enc_b(BackendMessage::CopyDone)
}

pub fn function_call_response(v: Option<&[u8]>) -> Vec<u8> {
    enc_b(BackendMessage::FunctionCallResponse(v))
}

pub fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

pub fn recording() -> SessionConfig {
    SessionConfig {
        record_statements: true,
        client_events: true,
        context_json: "\"session\":\"t1\"".into(),
        ..SessionConfig::default()
    }
}

/// Everything one direction produced over a sequence of chunks, with event offsets made
/// absolute (relative to the concatenated forwarded bytes) so chunkings compare equal.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub forwarded: Vec<u8>,
    pub client_events: Vec<ClientEvent>,
    pub server_events: Vec<ServerEvent>,
}

pub fn feed_client_chunks(codec: &mut SessionCodec, chunks: &[&[u8]], acc: &mut Outcome) {
    for chunk in chunks {
        let fwd = codec.feed_client(chunk).expect("valid client stream");
        let base = acc.forwarded.len();
        let out = fwd.select(chunk, codec.client_buffer());
        if fwd == Forward::Unchanged {
            assert_eq!(out.as_ptr(), chunk.as_ptr());
        }
        acc.forwarded.extend_from_slice(out);
        for ev in codec.client_events() {
            acc.client_events.push(shift(ev.clone(), base));
        }
    }
}

pub fn feed_server_chunks(codec: &mut SessionCodec, chunks: &[&[u8]], acc: &mut Outcome) {
    for chunk in chunks {
        let fwd = codec.feed_server(chunk).expect("valid server stream");
        acc.forwarded
            .extend_from_slice(fwd.select(chunk, codec.server_buffer()));
        acc.server_events
            .extend(codec.server_events().iter().cloned());
    }
}

fn shift(ev: ClientEvent, base: usize) -> ClientEvent {
    match ev {
        ClientEvent::Query { sql, n, start, end } => ClientEvent::Query {
            sql,
            n,
            start: start + base,
            end: end + base,
        },
        ClientEvent::Parse {
            name,
            sql,
            start,
            end,
        } => ClientEvent::Parse {
            name,
            sql,
            start: start + base,
            end: end + base,
        },
        ClientEvent::Execute {
            portal,
            sql,
            n,
            start,
            end,
        } => ClientEvent::Execute {
            portal,
            sql,
            n,
            start: start + base,
            end: end + base,
        },
        ClientEvent::FunctionCall {
            function_oid,
            start,
            end,
        } => ClientEvent::FunctionCall {
            function_oid,
            start: start + base,
            end: end + base,
        },
        ClientEvent::Terminate { start, end } => ClientEvent::Terminate {
            start: start + base,
            end: end + base,
        },
    }
}

/// Parsed records (JSON lines) without the time-dependent fields.
pub fn records(codec: &mut SessionCodec) -> Vec<serde_json::Value> {
    let raw = codec.take_records();
    let text = String::from_utf8(raw).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            assert!(o.remove("ts").unwrap().as_str().unwrap().ends_with('Z'));
            assert!(o.remove("duration_us").unwrap().is_u64());
            v
        })
        .collect()
}

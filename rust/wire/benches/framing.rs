//! Relay framing throughput.  Run:
//! `cargo bench -p pgwarden-wire --bench framing -- --warm-up-time 1 --measurement-time 3`

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgwarden_wire::arrays::write_values;
use pgwarden_wire::backend::{BackendMessage, FieldDescription, RowDescription, TransactionStatus};
use pgwarden_wire::frontend::{FrontendMessage, Query};
use pgwarden_wire::writer::MessageWriter;
use pgwarden_wire::{FsyncPolicy, SessionCodec, SessionConfig};

use common::{
    extended_response, extended_round, prepare_select, prepared_response, prepared_round,
    BenchSpool,
};

/// Typical socket read size.
const CHUNK: usize = 64 * 1024;

fn backend(m: BackendMessage<'_>, out: &mut Vec<u8>) {
    m.encode(out);
}

fn row_description(out: &mut Vec<u8>, columns: usize) {
    let f = FieldDescription {
        name: b"abalance",
        table_oid: 16_397,
        column_attnum: 3,
        type_oid: 23,
        type_len: 4,
        type_modifier: -1,
        format: 0,
    };
    RowDescription::encode_fields(out, &vec![f; columns]);
}

fn data_row(out: &mut Vec<u8>, values: &[&[u8]]) {
    let mut w = MessageWriter::typed(out, b'D');
    let vals: Vec<Option<&[u8]>> = values.iter().map(|v| Some(*v)).collect();
    write_values(&mut w, &vals);
    w.finish();
}

/// Responses to pgbench's select-only statement: one single-column row each.
fn pgbench_select_responses(n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        row_description(&mut out, 1);
        data_row(&mut out, &[format!("{}", i % 10_000).as_bytes()]);
        backend(
            BackendMessage::CommandComplete { tag: "SELECT 1" },
            &mut out,
        );
        backend(
            BackendMessage::ReadyForQuery(TransactionStatus::Idle),
            &mut out,
        );
    }
    out
}

/// One result of `rows` pgbench_accounts-like rows (aid, bid, abalance, filler char(84)).
fn small_rows_result(rows: usize) -> Vec<u8> {
    let mut out = Vec::new();
    row_description(&mut out, 4);
    let filler = [b' '; 84];
    for i in 0..rows {
        let aid = format!("{i}");
        data_row(&mut out, &[aid.as_bytes(), b"1", b"0", &filler]);
    }
    backend(
        BackendMessage::CommandComplete {
            tag: "SELECT 100000",
        },
        &mut out,
    );
    backend(
        BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        &mut out,
    );
    out
}

fn large_rows_result(rows: usize, size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    row_description(&mut out, 1);
    let value = vec![b'x'; size];
    for _ in 0..rows {
        data_row(&mut out, &[&value]);
    }
    backend(
        BackendMessage::CommandComplete { tag: "SELECT 16" },
        &mut out,
    );
    backend(
        BackendMessage::ReadyForQuery(TransactionStatus::Idle),
        &mut out,
    );
    out
}

fn bench_server(c: &mut Criterion) {
    let mut g = c.benchmark_group("server");
    for (name, stream) in [
        ("pgbench_select_responses", pgbench_select_responses(20_000)),
        ("small_rows_100B", small_rows_result(100_000)),
        ("large_rows_1MiB", large_rows_result(16, 1 << 20)),
    ] {
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_function(name, |b| {
            let mut codec = SessionCodec::new(SessionConfig::default());
            b.iter(|| {
                for chunk in stream.chunks(CHUNK) {
                    black_box(codec.feed_server(black_box(chunk)).unwrap());
                }
            })
        });
    }
    g.finish();
}

fn query(sql: &str) -> Vec<u8> {
    let mut out = Vec::new();
    FrontendMessage::Query(Query { sql }).encode(&mut out);
    out
}

fn recorded() -> SessionConfig {
    SessionConfig {
        record_statements: true,
        client_events: true,
        context_json: "\"session\":\"bench\",\"user\":\"alice\"".into(),
        ..SessionConfig::default()
    }
}

fn bench_client(c: &mut Criterion) {
    let mut g = c.benchmark_group("client");
    let statements: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            query(&format!(
                "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                i * 97
            ))
        })
        .collect();
    let total: usize = statements.iter().map(Vec::len).sum();
    g.throughput(Throughput::Bytes(total as u64));
    // A fresh codec per batch: without server responses the request queue would grow.
    let with_events = || {
        SessionCodec::new(SessionConfig {
            client_events: true,
            ..SessionConfig::default()
        })
    };
    g.bench_function("pgbench_simple_queries_events", |b| {
        b.iter_batched(
            with_events,
            |mut codec| {
                for s in &statements {
                    black_box(codec.feed_client(black_box(s)).unwrap());
                }
                codec
            },
            BatchSize::SmallInput,
        )
    });
    let stream = statements.concat();
    g.bench_function("pgbench_simple_queries_one_chunk", |b| {
        b.iter_batched(
            || SessionCodec::new(SessionConfig::default()),
            |mut codec| {
                for chunk in stream.chunks(CHUNK) {
                    black_box(codec.feed_client(black_box(chunk)).unwrap());
                }
                codec
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // One pgbench -M extended round trip per iteration, both directions, recorded.
    let mut g = c.benchmark_group("session");
    let prepare = prepare_select();
    let rounds: Vec<Vec<u8>> = (0..1000).map(|i| extended_round(i * 97)).collect();
    let response = extended_response();
    let bytes: usize = rounds.iter().map(Vec::len).sum::<usize>() + rounds.len() * response.len();
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("pgbench_extended_roundtrips_passthrough", |b| {
        let mut codec = SessionCodec::new(SessionConfig::default());
        codec.feed_client(&prepare).unwrap();
        b.iter(|| {
            for r in &rounds {
                black_box(codec.feed_client(black_box(r)).unwrap());
                black_box(codec.feed_server(black_box(&response)).unwrap());
            }
        })
    });
    g.bench_function("pgbench_extended_roundtrips_recorded", |b| {
        let mut codec = SessionCodec::new(recorded());
        codec.feed_client(&prepare).unwrap();
        b.iter(|| {
            for r in &rounds {
                black_box(codec.feed_client(black_box(r)).unwrap());
                black_box(codec.feed_server(black_box(&response)).unwrap());
            }
            black_box(codec.take_records());
        })
    });
    // The same with audit on: a `stmt` and an `end` record per round trip, sealed into the
    // hash chain and stored in a mapped spool segment (a fresh spool per batch); then
    // pgbench -M prepared's round trip (libpq: Bind, Describe, Execute, Sync), audited.
    let prepared: Vec<Vec<u8>> = (0..1000).map(|i| prepared_round(i * 97)).collect();
    for (name, rounds, response) in [
        ("pgbench_extended_roundtrips_audited", &rounds, &response),
        (
            "pgbench_prepared_roundtrips_audited",
            &prepared,
            &prepared_response(),
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let spool = BenchSpool::open(4 << 20, FsyncPolicy::Never);
                    let mut codec = spool.codec();
                    codec.feed_client(&prepare).unwrap();
                    (spool, codec)
                },
                |(spool, mut codec)| {
                    for r in rounds {
                        black_box(codec.feed_client(black_box(r)).unwrap());
                        black_box(codec.feed_server(black_box(response)).unwrap());
                    }
                    (spool, codec)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench_server, bench_client);
criterion_main!(benches);

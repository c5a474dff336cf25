//! The audit record path without criterion, for profilers: `cargo run --release -p
//! pgwarden-wire --example audit_loop [N]` runs N pgbench -M extended round trips through a
//! codec writing to a real spool (`NO_AUDIT=1`: the same without audit).
use std::hint::black_box;
use std::time::{Duration, Instant};

use pgwarden_wire::arrays::{write_i16s, write_values};
use pgwarden_wire::backend::{BackendMessage, TransactionStatus};
use pgwarden_wire::frontend::{Bind, Execute, FrontendMessage};
use pgwarden_wire::writer::MessageWriter;
use pgwarden_wire::{
    AuditConfig, AuditSpool, CaptureLimits, FsyncPolicy, SessionCodec, SessionConfig, SpoolOptions,
};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("pgwarden-audit-loop-{}", std::process::id()));
    let spool = AuditSpool::open(SpoolOptions {
        directory: dir.clone(),
        stream: "bench".into(),
        key: b"pgwarden-bench-chain-key".to_vec(),
        segment_bytes: 16 << 20,
        max_bytes: 4 << 30,
        fsync: FsyncPolicy::Interval(Duration::from_millis(200)),
        usage_interval: Duration::from_secs(1),
        open_members: String::new(),
    })
    .unwrap();
    let audit = std::env::var_os("NO_AUDIT").is_none();
    let mut codec = SessionCodec::new(SessionConfig {
        audit: audit.then(|| AuditConfig {
            spool: spool.clone(),
            session_id: "0123456789abcdef".into(),
            record_params: false,
            capture: CaptureLimits {
                max_rows: 100,
                max_bytes: 64 * 1024,
            },
            strict: true,
        }),
        ..SessionConfig::default()
    });
    let mut prepare = Vec::new();
    let mut w = MessageWriter::typed(&mut prepare, b'P');
    w.cstr(b"P0_1")
        .cstr(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
    write_i16s(&mut w, &[]);
    w.finish();
    codec.feed_client(&prepare).unwrap();
    let mut response = Vec::new();
    BackendMessage::BindComplete.encode(&mut response);
    {
        let mut w = MessageWriter::typed(&mut response, b'D');
        write_values(&mut w, &[Some(b"0".as_slice())]);
        w.finish();
    }
    BackendMessage::CommandComplete { tag: "SELECT 1" }.encode(&mut response);
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut response);
    let round = |aid: u32| {
        let mut out = Vec::new();
        let aid = aid.to_string();
        Bind::encode_parts(&mut out, "", "P0_1", &[], &[Some(aid.as_bytes())], &[]);
        FrontendMessage::Execute(Execute {
            portal: b"",
            max_rows: 0,
        })
        .encode(&mut out);
        FrontendMessage::Sync.encode(&mut out);
        out
    };
    let rounds: Vec<Vec<u8>> = (0..1000).map(|i| round(i * 97)).collect();
    let t = Instant::now();
    for i in 0..n {
        black_box(codec.feed_client(&rounds[i % 1000]).unwrap());
        black_box(codec.feed_server(&response).unwrap());
    }
    println!(
        "{:.3} us per round trip (audit {audit})",
        t.elapsed().as_secs_f64() / n as f64 * 1e6
    );
    let _ = spool.close();
    let _ = std::fs::remove_dir_all(dir);
}

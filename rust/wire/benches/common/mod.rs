//! pgbench's extended-protocol round trip and an audited session, shared by the criterion
//! benchmarks and the `audit_loop` example.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgwarden_wire::arrays::{write_i16s, write_values};
use pgwarden_wire::backend::{BackendMessage, TransactionStatus};
use pgwarden_wire::frontend::{Bind, Execute, FrontendMessage};
use pgwarden_wire::writer::MessageWriter;
use pgwarden_wire::{
    AuditConfig, AuditSpool, CaptureLimits, FsyncPolicy, SessionCodec, SessionConfig, SpoolOptions,
};

/// pgbench -M extended's Parse of the select-only statement.
pub fn prepare_select() -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::typed(&mut out, b'P');
    w.cstr(b"P0_1")
        .cstr(b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
    write_i16s(&mut w, &[]);
    w.finish();
    out
}

/// pgbench -M extended: Bind/Execute/Sync of the prepared select-only statement.
pub fn extended_round(aid: usize) -> Vec<u8> {
    round_trip(aid, false)
}

/// pgbench -M prepared (libpq's `PQsendQueryPrepared`): Bind, Describe of the portal,
/// Execute, Sync.
pub fn prepared_round(aid: usize) -> Vec<u8> {
    round_trip(aid, true)
}

fn round_trip(aid: usize, describe: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let aid = aid.to_string();
    Bind::encode_parts(&mut out, "", "P0_1", &[], &[Some(aid.as_bytes())], &[]);
    if describe {
        let mut w = MessageWriter::typed(&mut out, b'D');
        w.u8(b'P').cstr(b"");
        w.finish();
    }
    FrontendMessage::Execute(Execute {
        portal: b"",
        max_rows: 0,
    })
    .encode(&mut out);
    FrontendMessage::Sync.encode(&mut out);
    out
}

/// The server's answer to [`prepared_round`]: the portal's RowDescription, then the row.
pub fn prepared_response() -> Vec<u8> {
    response(true)
}

/// The server's answer to [`extended_round`]: one single-column row.
pub fn extended_response() -> Vec<u8> {
    response(false)
}

fn response(described: bool) -> Vec<u8> {
    let mut out = Vec::new();
    BackendMessage::BindComplete.encode(&mut out);
    if described {
        let mut w = MessageWriter::typed(&mut out, b'T');
        w.i16(1).cstr(b"abalance");
        w.i32(16390).i16(3).i32(23).i16(4).i32(-1).i16(0);
        w.finish();
    }
    let mut w = MessageWriter::typed(&mut out, b'D');
    write_values(&mut w, &[Some(b"0".as_slice())]);
    w.finish();
    BackendMessage::CommandComplete { tag: "SELECT 1" }.encode(&mut out);
    BackendMessage::ReadyForQuery(TransactionStatus::Idle).encode(&mut out);
    out
}

/// A spool in a directory of its own, removed when dropped.
pub struct BenchSpool {
    spool: Arc<AuditSpool>,
    dir: PathBuf,
}

impl BenchSpool {
    pub fn open(segment_bytes: usize, fsync: FsyncPolicy) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgwarden-bench-spool-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let spool = AuditSpool::open(SpoolOptions {
            directory: dir.clone(),
            stream: "bench".into(),
            key: b"pgwarden-bench-chain-key".to_vec(),
            segment_bytes,
            max_bytes: 4 << 30,
            fsync,
            usage_interval: Duration::from_secs(1),
            open_members: String::new(),
        })
        .expect("open a spool");
        BenchSpool { spool, dir }
    }

    /// A session writing to this spool as `pgwarden serve` does with audit on: strict,
    /// results recorded with the default caps, parameters not recorded.
    pub fn codec(&self) -> SessionCodec {
        SessionCodec::new(SessionConfig {
            audit: Some(AuditConfig {
                spool: self.spool.clone(),
                session_id: "0123456789abcdef".into(),
                record_params: false,
                capture: CaptureLimits {
                    max_rows: 100,
                    max_bytes: 64 * 1024,
                },
                strict: true,
            }),
            ..SessionConfig::default()
        })
    }
}

impl Drop for BenchSpool {
    fn drop(&mut self) {
        let _ = self.spool.close();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

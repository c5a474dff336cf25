//! The audit record path without criterion, for profilers: `cargo run --release -p
//! pgwarden-wire --example audit_loop [N]` runs N `pgbench -S -M prepared` round trips
//! (Bind, Describe, Execute, Sync) through a codec writing to a real spool (`NO_AUDIT=1`:
//! the same without audit; `ROUND=bind`: Bind, Execute, Sync only).
#[path = "../benches/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use pgwarden_wire::{FsyncPolicy, SessionCodec, SessionConfig};

use common::{
    extended_response, extended_round, prepare_select, prepared_response, prepared_round,
    BenchSpool,
};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().unwrap());
    let spool = BenchSpool::open(16 << 20, FsyncPolicy::Interval(Duration::from_millis(200)));
    let audit = std::env::var_os("NO_AUDIT").is_none();
    let mut codec = if audit {
        spool.codec()
    } else {
        SessionCodec::new(SessionConfig::default())
    };
    codec.feed_client(&prepare_select()).unwrap();
    let describe = std::env::var("ROUND").map_or(true, |r| r != "bind");
    let response = if describe {
        prepared_response()
    } else {
        extended_response()
    };
    let round = if describe {
        prepared_round
    } else {
        extended_round
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
}

//! Times the assembler over a stream's segments, in order:
//! `CHAIN_KEY=... cargo run --release --example assemble SEG...` (`ONLY_PROCESS=1`: skip
//! the parsing phases; `ROUNDS=N`: the best of N passes; `RESULT_LOGS=1`: the result log
//! records too, as with `recording_logs`).
use std::time::Instant;

use pgwarden_ship::records::Line;
use pgwarden_ship::spans::QueryText;
use pgwarden_ship::{AssemblerConfig, QueryAnalyzer, QueryInfo, StreamAssembler};

struct Fixed;

impl QueryAnalyzer for Fixed {
    fn analyze(&mut self, _sql: &str) -> QueryInfo {
        QueryInfo {
            parsed: true,
            statements: 1,
            operation: Some("SELECT".into()),
            collection: Some("t".into()),
            procedure: None,
            summary: Some("SELECT t".into()),
        }
    }
}

fn main() {
    let mut data = Vec::new();
    for path in std::env::args().skip(1) {
        data.extend(std::fs::read(path).expect("read"));
    }
    let lines: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty() && l[0] == b'{')
        .collect();
    let n = lines.len() as f64;
    if std::env::var_os("ONLY_PROCESS").is_none() {
        phases(&lines, n);
        minimal(&lines, n);
    }
    assemble(&lines, n);
}

fn phases(lines: &[&[u8]], n: f64) {
    let t = Instant::now();
    for l in lines {
        std::hint::black_box(pgwarden_wire::audit_record::unseal(l).ok());
    }
    println!(
        "unseal        {:.2} us/line",
        t.elapsed().as_secs_f64() / n * 1e6
    );
    let t = Instant::now();
    for l in lines {
        std::hint::black_box(Line::parse(l).ok());
    }
    println!(
        "parse         {:.2} us/line",
        t.elapsed().as_secs_f64() / n * 1e6
    );
    let t = Instant::now();
    for l in lines {
        if let Ok(line) = Line::parse(l) {
            if let Some(sql) = line.sql.as_deref() {
                std::hint::black_box(pgwarden_ship::shape::query_shape(sql));
            }
        }
    }
    println!(
        "parse+shape   {:.2} us/line",
        t.elapsed().as_secs_f64() / n * 1e6
    );
}

fn assemble(lines: &[&[u8]], n: f64) {
    let config = AssemblerConfig {
        key: std::env::var("CHAIN_KEY")
            .unwrap_or_else(|_| "k".into())
            .into_bytes(),
        resource: vec![],
        resource_schema_url: String::new(),
        scope_name: "pgwarden.audit".into(),
        scope_version: "0".into(),
        scope_schema_url: String::new(),
        query_text: QueryText::Full,
        request_spans: 512,
        request_bytes: 3 << 20,
        query_text_max_bytes: 1 << 20,
        // As the shipper does with recording on (pgwarden.audit.recording.RECORDED).
        recorded: ["session", "refused"].map(String::from).to_vec(),
        result_logs: std::env::var_os("RESULT_LOGS").is_some(),
    };
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut best = f64::MAX;
    let mut spans = 0;
    for _ in 0..rounds.max(1) {
        let mut asm = StreamAssembler::new(config.clone(), Default::default());
        let t = Instant::now();
        spans = 0;
        for chunk in lines.chunks(4096) {
            let out = asm.process(chunk, true, &mut Fixed);
            // As the binding does: each request copied once, into the buffer it is sent from.
            for request in &out.requests {
                std::hint::black_box(request.to_vec());
            }
            spans += out.spans;
            if !out.problems.is_empty() && spans < 600 {
                eprintln!(
                    "{} problems, first: {:?}",
                    out.problems.len(),
                    out.problems[0]
                );
            }
            asm.commit();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "process       {:.2} us/line, {:.2} us/span ({spans} spans, best of {rounds})",
        best / n * 1e6,
        best / spans.max(1) as f64 * 1e6
    );
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Minimal<'a> {
    seq: u64,
    ts: u64,
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow, default)]
    session: Option<&'a str>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(borrow, default)]
    sql: Option<&'a str>,
}

pub fn minimal(lines: &[&[u8]], n: f64) {
    let t = Instant::now();
    let mut ok = 0;
    for l in lines {
        if std::hint::black_box(serde_json::from_slice::<Minimal<'_>>(l)).is_ok() {
            ok += 1;
        }
    }
    println!(
        "minimal parse {:.2} us/line ({ok} ok)",
        t.elapsed().as_secs_f64() / n * 1e6
    );
    let t = Instant::now();
    for l in lines {
        std::hint::black_box(serde_json::from_slice::<serde::de::IgnoredAny>(l).ok());
    }
    println!(
        "ignored parse {:.2} us/line",
        t.elapsed().as_secs_f64() / n * 1e6
    );
}

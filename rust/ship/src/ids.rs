//! Deterministic trace and span ids (the same rule as `pgwarden.audit.ids`): a retry or a
//! replay of the spool builds the same ids, so a backend can drop duplicates.

use sha2::{Digest, Sha256};

fn derive<const N: usize>(parts: &[&str]) -> [u8; N] {
    let mut h = Sha256::new();
    h.update(b"pgwarden");
    for p in parts {
        h.update(b"\0");
        h.update(p.as_bytes());
    }
    let digest = h.finalize();
    let mut out = [0u8; N];
    out.copy_from_slice(&digest[..N]);
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1; // all-zero ids are invalid in OpenTelemetry
    }
    out
}

/// The 128-bit trace id of a session.
pub fn trace_id(session: &str) -> [u8; 16] {
    derive(&["trace", session])
}

/// The span id of a session's span (the statements' parent).
pub fn session_span_id(session: &str) -> [u8; 8] {
    derive(&["span", session, "session"])
}

/// The span id of statement `n` of a session.
pub fn statement_span_id(session: &str, n: u64) -> [u8; 8] {
    StatementIds::new(session).span_id(n)
}

/// [`statement_span_id`] for the statements of one session: the hash of the common
/// prefix is computed once.
#[derive(Debug, Clone)]
pub struct StatementIds(Sha256);

impl StatementIds {
    pub fn new(session: &str) -> Self {
        let mut h = Sha256::new();
        for part in ["pgwarden", "span", session, "statement"] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        StatementIds(h)
    }

    pub fn span_id(&self, n: u64) -> [u8; 8] {
        let mut h = self.0.clone();
        let mut number = itoa::Buffer::new();
        h.update(number.format(n).as_bytes());
        let digest = h.finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        if out == [0; 8] {
            out[7] = 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_the_documented_rule() {
        // sha256(b"pgwarden\0span\0abc\0statement\012")[:8]
        let mut h = Sha256::new();
        h.update(b"pgwarden\0span\0abc\0statement\x0012");
        assert_eq!(statement_span_id("abc", 12), h.finalize()[..8]);
        assert_ne!(statement_span_id("abc", 12), statement_span_id("abc", 13));
        assert_ne!(trace_id("a"), trace_id("b"));
    }
}

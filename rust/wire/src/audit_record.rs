//! Audit records: one JSON object per line, sealed into a hash chain.
//!
//! A record is a JSON object `B` (`{"seq":..,"stream":..,"ts":..,"type":..,...}`).  Its
//! chain hash is `HMAC-SHA256(key, prev || B)`, where `prev` is the 32-byte hash of the
//! record before it in the same stream (32 zero bytes for the first).  The stored line is
//! `B` with the hash spliced in as its last member, then a newline:
//!
//! ```text
//! {"seq":7,...,"sql":"SELECT 1","hash":"<64 lowercase hex digits>"}\n
//! ```
//!
//! so a verifier recovers `B` by cutting the fixed-size `,"hash":"..."` member out.  A
//! record changed, removed or reordered breaks the chain at that point; forging a new
//! chain needs the key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::record::{json_str, write_u64};

type HmacSha256 = Hmac<Sha256>;

/// Length of a chain hash.
pub const HASH_LEN: usize = 32;

/// The member spliced before the closing brace: `,"hash":"` + 64 hex + `"`.
const HASH_MEMBER_PREFIX: &[u8] = b",\"hash\":\"";
/// Bytes a sealed line has beyond its body (hash member and newline).
pub const SEAL_OVERHEAD: usize = HASH_MEMBER_PREFIX.len() + 2 * HASH_LEN + 1 + 1;

/// The running state of one stream's hash chain.
#[derive(Clone)]
pub struct RecordChain {
    keyed: HmacSha256,
    prev: [u8; HASH_LEN],
}

impl std::fmt::Debug for RecordChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RecordChain")
            .field("prev", &hex(&self.prev))
            .finish()
    }
}

impl RecordChain {
    /// A chain keyed with `key`, starting from `prev` (zeros for a new stream).
    pub fn new(key: &[u8], prev: [u8; HASH_LEN]) -> Self {
        RecordChain {
            // HMAC accepts keys of any length.
            keyed: HmacSha256::new_from_slice(key).expect("HMAC takes any key length"),
            prev,
        }
    }

    /// Hash of the last record sealed and committed.
    pub fn prev(&self) -> [u8; HASH_LEN] {
        self.prev
    }

    /// The hash `body` would get after the current record.
    pub fn hash_of(&self, body: &[u8]) -> [u8; HASH_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(&self.prev);
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// [`hash_of`](Self::hash_of) for a body given as its parts (a sealed line without its
    /// hash member is the line's head and a closing brace): nothing is copied.
    pub fn hash_of_parts(&self, parts: &[&[u8]]) -> [u8; HASH_LEN] {
        let mut mac = self.keyed.clone();
        mac.update(&self.prev);
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Appends the sealed line for `body` (a complete JSON object) to `out` and returns
    /// its hash.  The chain does not move until [`commit`](Self::commit): a line that
    /// could not be stored must not become anyone's `prev`.
    pub fn seal(&self, body: &[u8], out: &mut Vec<u8>) -> [u8; HASH_LEN] {
        debug_assert_eq!(body.last(), Some(&b'}'));
        let hash = self.hash_of(body);
        out.reserve(body.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&body[..body.len() - 1]);
        out.extend_from_slice(HASH_MEMBER_PREFIX);
        push_hex(out, &hash);
        out.extend_from_slice(b"\"}\n");
        hash
    }

    /// Makes `hash` (returned by [`seal`](Self::seal)) the chain's new head.
    pub fn commit(&mut self, hash: [u8; HASH_LEN]) {
        self.prev = hash;
    }
}

/// Why a line does not continue a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainBreak {
    /// Not a sealed record line (no hash member where it belongs).
    NotSealed,
    /// The stored hash differs from the one computed from the previous record and the body.
    Mismatch,
}

/// Splits a sealed line (without its newline) into the body it was sealed from and the
/// stored hash.
pub fn unseal(line: &[u8]) -> Result<(Vec<u8>, [u8; HASH_LEN]), ChainBreak> {
    let (head, hash) = unseal_parts(line)?;
    let mut body = Vec::with_capacity(head.len() + 1);
    body.extend_from_slice(head);
    body.push(b'}');
    Ok((body, hash))
}
/// [`unseal`] without copying: the body is the returned head followed by `}`.
pub fn unseal_parts(line: &[u8]) -> Result<(&[u8], [u8; HASH_LEN]), ChainBreak> {
    let tail = HASH_MEMBER_PREFIX.len() + 2 * HASH_LEN + 2;
    if line.len() < tail + 2 || !line.ends_with(b"\"}") {
        return Err(ChainBreak::NotSealed);
    }
    let cut = line.len() - tail;
    if &line[cut..cut + HASH_MEMBER_PREFIX.len()] != HASH_MEMBER_PREFIX {
        return Err(ChainBreak::NotSealed);
    }
    let hex_digits = &line[cut + HASH_MEMBER_PREFIX.len()..line.len() - 2];
    let hash = parse_hex(hex_digits).ok_or(ChainBreak::NotSealed)?;
    Ok((&line[..cut], hash))
}

/// Checks that `line` continues the chain whose head is `prev`; returns its hash.
pub fn verify_line(
    key: &[u8],
    prev: &[u8; HASH_LEN],
    line: &[u8],
) -> Result<[u8; HASH_LEN], ChainBreak> {
    let (body, stored) = unseal(line)?;
    let expected = RecordChain::new(key, *prev).hash_of(&body);
    // Constant-time comparison is not needed: the verifier holds the key.
    if expected == stored {
        Ok(stored)
    } else {
        Err(ChainBreak::Mismatch)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex is ASCII")
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Digits of 32 bytes at a time into a stack buffer, then one copy: a push per digit
    // checks the capacity each time (a fifth of sealing a record).
    for chunk in bytes.chunks(HASH_LEN) {
        let mut digits = [0u8; 2 * HASH_LEN];
        for (pair, b) in digits.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0x0f)];
        }
        out.extend_from_slice(&digits[..2 * chunk.len()]);
    }
}

fn parse_hex(digits: &[u8]) -> Option<[u8; HASH_LEN]> {
    /// Lowercase hex digit -> its value; anything else -> 0x10 (an invalid bit).  A table
    /// rather than a match: the digits of a hash are random, and a branch per digit
    /// mispredicts about every other digit (the shipper decodes two hashes a statement).
    const NIBBLE: [u8; 256] = {
        let mut table = [0x10u8; 256];
        let mut i = 0;
        while i < 10 {
            table[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            table[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        table
    };
    if digits.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    let mut invalid = 0u8;
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (high, low) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        invalid |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    (invalid & 0x10 == 0).then_some(out)
}

/// Builds the body of one record: the common head, then members appended by the caller.
///
/// ```text
/// {"seq":<seq>,"stream":"<stream>","ts":<µs since the epoch>,"type":"<kind>", ...}
/// ```
#[derive(Debug, Default)]
pub struct RecordBody {
    buf: Vec<u8>,
}

impl RecordBody {
    /// Starts a record; `stream_json` is the stream id already encoded as a JSON string.
    pub fn begin(&mut self, seq: u64, stream_json: &str, ts_us: u64, kind: &str) {
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(b"{\"seq\":");
        write_u64(b, seq);
        b.extend_from_slice(b",\"stream\":");
        b.extend_from_slice(stream_json.as_bytes());
        b.extend_from_slice(b",\"ts\":");
        write_u64(b, ts_us);
        b.extend_from_slice(b",\"type\":\"");
        b.extend_from_slice(kind.as_bytes());
        b.push(b'"');
    }

    /// Length of the body so far (after [`begin`](Self::begin): the head's length).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends `,"name":` and returns the buffer for the value.
    pub fn key(&mut self, name: &str) -> &mut Vec<u8> {
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\":");
        &mut self.buf
    }

    pub fn str(&mut self, name: &str, value: &str) {
        json_str(self.key(name), value);
    }

    pub fn opt_str(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(name, v),
            None => self.key(name).extend_from_slice(b"null"),
        }
    }

    pub fn u64(&mut self, name: &str, value: u64) {
        write_u64(self.key(name), value);
    }

    /// A value that is already JSON (an array, an object, a pre-encoded string).
    pub fn raw(&mut self, name: &str, json: &[u8]) {
        self.key(name).extend_from_slice(json);
    }

    /// Members already encoded as JSON (`"a":1,"b":"x"`), without braces.
    pub fn members(&mut self, json_members: &str) {
        let m = json_members.trim();
        if !m.is_empty() {
            self.buf.push(b',');
            self.buf.extend_from_slice(m.as_bytes());
        }
    }

    /// The bytes so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Closes the object and returns its bytes.
    pub fn finish(&mut self) -> &[u8] {
        self.buf.push(b'}');
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(seq: u64, extra: &str) -> Vec<u8> {
        let mut b = RecordBody::default();
        b.begin(seq, "\"s1\"", 1_700_000_000_000_000, "stmt");
        b.str("sql", extra);
        b.u64("n", 3);
        b.finish().to_vec()
    }

    #[test]
    fn body_layout() {
        let b = body(7, "SELECT \"x\"");
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"seq":7,"stream":"s1","ts":1700000000000000,"type":"stmt","sql":"SELECT \"x\"","n":3}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["seq"], 7);
    }

    #[test]
    fn seal_and_verify_chain() {
        let key = b"k".repeat(32);
        let mut chain = RecordChain::new(&key, [0; HASH_LEN]);
        let mut lines = Vec::new();
        for i in 1..=3 {
            let mut line = Vec::new();
            let h = chain.seal(&body(i, "SELECT 1"), &mut line);
            chain.commit(h);
            lines.push(line);
        }
        // Each line is valid JSON ending in a newline, with the hash as last member.
        for l in &lines {
            assert_eq!(l.last(), Some(&b'\n'));
            let v: serde_json::Value = serde_json::from_slice(&l[..l.len() - 1]).unwrap();
            assert_eq!(v["hash"].as_str().unwrap().len(), 64);
        }
        let mut prev = [0; HASH_LEN];
        for l in &lines {
            prev = verify_line(&key, &prev, &l[..l.len() - 1]).unwrap();
        }
        assert_eq!(prev, chain.prev());

        // A changed byte, a wrong key or a skipped record break the chain.
        let mut tampered = lines[1].clone();
        let at = tampered.windows(8).position(|w| w == b"SELECT 1").unwrap();
        tampered[at + 7] = b'2';
        let p0 = verify_line(&key, &[0; HASH_LEN], &lines[0][..lines[0].len() - 1]).unwrap();
        assert_eq!(
            verify_line(&key, &p0, &tampered[..tampered.len() - 1]),
            Err(ChainBreak::Mismatch)
        );
        assert_eq!(
            verify_line(b"other", &[0; HASH_LEN], &lines[0][..lines[0].len() - 1]),
            Err(ChainBreak::Mismatch)
        );
        assert_eq!(
            verify_line(&key, &p0, &lines[2][..lines[2].len() - 1]),
            Err(ChainBreak::Mismatch)
        );
        assert_eq!(
            verify_line(&key, &p0, b"{\"seq\":1}"),
            Err(ChainBreak::NotSealed)
        );
    }

    #[test]
    fn unsealed_body_roundtrip() {
        let chain = RecordChain::new(b"key", [9; HASH_LEN]);
        let b = body(1, "x");
        let mut line = Vec::new();
        let h = chain.seal(&b, &mut line);
        let (back, stored) = unseal(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, b);
        assert_eq!(stored, h);
        assert_eq!(line.len(), b.len() + SEAL_OVERHEAD);
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
        let long: Vec<u8> = (0..=70).collect();
        let expected: String = long.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&long), expected);
    }

    #[test]
    fn hex_parses_back_and_refuses_anything_but_lowercase_digits() {
        let bytes: [u8; HASH_LEN] = std::array::from_fn(|i| (i * 37 + 11) as u8);
        assert_eq!(parse_hex(hex(&bytes).as_bytes()), Some(bytes));
        let good = hex(&bytes).into_bytes();
        for bad in [b'A', b'F', b'g', b'/', b':', b'`', b' ', 0, 0xff] {
            for at in [0, 1, 31, 63] {
                let mut digits = good.clone();
                digits[at] = bad;
                assert_eq!(parse_hex(&digits), None, "{bad:#x} at {at}");
            }
        }
        assert_eq!(parse_hex(&good[..62]), None);
    }

    #[test]
    fn numbers() {
        let mut b = Vec::new();
        write_u64(&mut b, 0);
        b.push(b' ');
        write_u64(&mut b, u64::MAX);
        assert_eq!(b, b"0 18446744073709551615");
    }
}

//! The per-statement record: one JSON object per line, as the audit spool stores it.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends `s` as a JSON string (quoted, escaped).
pub(crate) fn json_str(buf: &mut Vec<u8>, s: &str) {
    // Most strings in a record (ids, SQL text, command tags) need no escape: one pass
    // over the bytes that does not stop early (it vectorises), then one copy.
    let plain = !s.bytes().fold(false, |seen, b| {
        seen | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        buf.reserve(s.len() + 2);
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
        return;
    }
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

/// Renders one parameter value for the record.  Text-format values are strings,
/// binary ones hex; values over `max_bytes` are cut and marked with their full size.
pub(crate) fn json_param(buf: &mut Vec<u8>, value: Option<&[u8]>, binary: bool, max_bytes: usize) {
    let Some(v) = value else {
        buf.extend_from_slice(b"null");
        return;
    };
    let cut = v.len() > max_bytes;
    let shown = if cut { &v[..max_bytes] } else { v };
    let text = if binary {
        None
    } else {
        match std::str::from_utf8(shown) {
            Ok(t) => Some(t),
            // Cutting may split a UTF-8 sequence: keep the whole characters before it.
            Err(e) if cut && e.error_len().is_none() => {
                std::str::from_utf8(&shown[..e.valid_up_to()]).ok()
            }
            // Text-format bytes that are not UTF-8 are shown as hex rather than lost.
            Err(_) => None,
        }
    };
    if !cut {
        if let Some(t) = text {
            json_str(buf, t);
            return;
        }
    }
    let mut s = String::with_capacity(shown.len() * 2 + 32);
    match text {
        Some(t) => s.push_str(t),
        None => {
            s.push_str("\\x");
            for b in shown {
                let _ = write!(s, "{b:02x}");
            }
        }
    }
    if cut {
        let _ = write!(s, "...[truncated, {} bytes]", v.len());
    }
    json_str(buf, &s);
}

/// RFC 3339 UTC timestamp with microseconds, e.g. `2026-11-26T07:26:08.123456Z`,
/// written digit by digit (one per statement record: formatting machinery shows up).
pub(crate) fn write_timestamp(buf: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let sod = secs % 86_400;
    buf.push(b'"');
    digits(buf, y.clamp(0, 9999) as u64, 4);
    buf.push(b'-');
    digits(buf, u64::from(m), 2);
    buf.push(b'-');
    digits(buf, u64::from(day), 2);
    buf.push(b'T');
    digits(buf, sod / 3600, 2);
    buf.push(b':');
    digits(buf, sod / 60 % 60, 2);
    buf.push(b':');
    digits(buf, sod % 60, 2);
    buf.push(b'.');
    digits(buf, u64::from(d.subsec_micros()), 6);
    buf.extend_from_slice(b"Z\"");
}

/// Appends `v` as exactly `width` decimal digits (zero-padded).
fn digits(buf: &mut Vec<u8>, mut v: u64, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// Appends `v` in decimal.
pub(crate) fn write_u64(buf: &mut Vec<u8>, v: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".into(),
            "quote \" and backslash \\".into(),
            "tab\tnewline\ncontrol \u{1} \u{1f} del \u{7f}".into(),
            "é ü 漢字 🎉 \u{2028}".into(),
        ];
        samples.extend((0u8..=0x7f).map(|b| format!("a{}z", b as char)));
        for text in &samples {
            let mut ours = Vec::new();
            json_str(&mut ours, text);
            assert_eq!(ours, serde_json::to_vec(text).unwrap(), "{text:?}");
        }
    }

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut b = Vec::new();
        f(&mut b);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_micros(1_795_677_968_123_456);
        assert_eq!(
            s(|b| write_timestamp(b, t)),
            "\"2026-11-26T07:26:08.123456Z\""
        );
        assert_eq!(
            s(|b| write_timestamp(b, UNIX_EPOCH)),
            "\"1970-01-01T00:00:00.000000Z\""
        );
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert!(s(|b| write_timestamp(b, leap)).starts_with("\"2000-02-29T"));
    }

    #[test]
    fn params() {
        assert_eq!(s(|b| json_param(b, None, false, 10)), "null");
        assert_eq!(s(|b| json_param(b, Some(b"a\"b"), false, 10)), r#""a\"b""#);
        assert_eq!(
            s(|b| json_param(b, Some(&[1, 2]), true, 10)),
            r#""\\x0102""#
        );
        assert_eq!(
            s(|b| json_param(b, Some(b"abcdef"), false, 3)),
            r#""abc...[truncated, 6 bytes]""#
        );
        // A cut inside a multi-byte character keeps the whole characters before it.
        assert_eq!(
            s(|b| json_param(b, Some("aéé".as_bytes()), false, 2)),
            r#""a...[truncated, 5 bytes]""#
        );
        // Text-format bytes that are not UTF-8 are shown as hex rather than lost.
        assert_eq!(s(|b| json_param(b, Some(&[0xff]), false, 10)), r#""\\xff""#);
    }
}

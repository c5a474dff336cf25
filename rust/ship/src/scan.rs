//! Record lines read without a general JSON parser, for the lines that make up nearly all
//! of a spool.
//!
//! The gateway's writer (`rust/wire/src/audit_record.rs`) puts each record on one line as a
//! compact JSON object: no whitespace, keys without escapes, and only scalar values in the
//! `stmt` and `end` records.  [`scan`] reads exactly that shape.  On anything else it
//! returns `None`, and [`Line::parse`](crate::records::Line::parse) reads the line with the
//! full parser instead, so a line reads the same either way and a malformed one gets the
//! full parser's error.  "Anything else" is: whitespace, a string with an escape, a nested
//! object or array, a duplicate field, a number that is not a plain integer in range, `null`
//! where the field takes none, a missing `type`, or bytes after the object.

use std::borrow::Cow;

use serde::de::IgnoredAny;

use crate::records::Line;

/// The line read as the gateway writes it into `line` (a default one), or `None` to leave
/// it to the full parser (`line` then holds part of it).
pub(crate) fn scan<'a>(text: &'a str, line: &mut Line<'a>) -> Option<()> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    s.expect(b'{')?;
    let mut kind = None;
    let mut seen = 0u32;
    loop {
        let key = s.key()?;
        // Each field once: a repeated one is an error for the full parser.
        let mut once = |bit: u32| -> Option<()> {
            let bit = 1u32 << bit;
            (seen & bit == 0).then(|| seen |= bit)
        };
        // An optional field: `null` or the value its reader takes.
        macro_rules! opt {
            ($bit:expr, $field:ident, $read:expr) => {{
                once($bit)?;
                s.opt_into(&mut line.$field, $read)?
            }};
        }
        match key {
            "seq" => {
                once(0)?;
                line.seq = s.unsigned()?;
            }
            "ts" => {
                once(1)?;
                line.ts = s.unsigned()?;
            }
            "type" => {
                once(2)?;
                kind = Some(s.text()?);
            }
            "stream" => opt!(3, stream, Scanner::text),
            "session" => opt!(4, session, Scanner::text),
            "hash" => opt!(5, hash, Scanner::text),
            "protocol" => opt!(6, protocol, Scanner::text),
            "sql" => opt!(7, sql, Scanner::text),
            "command_tag" => opt!(8, command_tag, Scanner::text),
            "sqlstate" => opt!(9, sqlstate, Scanner::text),
            "error" => opt!(10, error, Scanner::text),
            "client_address" => opt!(11, client_address, Scanner::text),
            "database" => opt!(12, database, Scanner::text),
            "upstream_user" => opt!(13, upstream_user, Scanner::text),
            "server_address" => opt!(14, server_address, Scanner::text),
            "application_name" => opt!(15, application_name, Scanner::text),
            "reason" => opt!(16, reason, Scanner::text),
            "message" => opt!(17, message, Scanner::text),
            "stage" => opt!(18, stage, Scanner::text),
            "n" => opt!(19, n, Scanner::unsigned),
            "duration_us" => opt!(20, duration_us, Scanner::unsigned),
            "started" => opt!(21, started, Scanner::unsigned),
            "function_oid" => opt!(22, function_oid, Scanner::signed),
            "rows" => opt!(23, rows, Scanner::signed),
            "data_rows" => opt!(24, data_rows, Scanner::signed),
            "server_port" => opt!(25, server_port, Scanner::signed),
            "statements" => opt!(26, statements, Scanner::signed),
            "tls" => opt!(27, tls, Scanner::boolean),
            // The recorded result stays in the line as written; it is not read here.
            "result" => opt!(28, result, |s: &mut Scanner| s.string().map(|_| IgnoredAny)),
            // Fields holding any JSON value (parameters, identity, policy decision): the
            // full parser reads them.
            "params" | "result_omitted" | "user" | "decision" | "rule" | "policy_version"
            | "masked_columns" => return None,
            // A field a line does not keep: a scalar is skipped, anything nested goes to
            // the full parser.
            _ => s.skip_scalar()?,
        }
        match s.next()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    if s.at != s.bytes.len() {
        return None;
    }
    line.kind = kind?;
    Some(())
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// `"key":`, the key plain ASCII letters, digits and underscores.
    fn key(&mut self) -> Option<&'a str> {
        /// The bytes a key is made of (ASCII letters, digits, `_`).
        const KEY: [bool; 256] = {
            let mut table = [false; 256];
            let mut b = 0;
            while b < 256 {
                let c = b as u8;
                table[b] = c.is_ascii_alphanumeric() || c == b'_';
                b += 1;
            }
            table
        };
        self.expect(b'"')?;
        let start = self.at;
        loop {
            let b = self.next()?;
            if b == b'"' {
                break;
            }
            if !KEY[usize::from(b)] {
                return None;
            }
        }
        let key = &self.text[start..self.at - 1];
        self.expect(b':')?;
        Some(key)
    }

    /// A string without escapes or control characters, borrowed from the line.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let len = memchr::memchr2(b'"', b'\\', &self.bytes[start..])?;
        let body = &self.bytes[start..start + len];
        // An escape, or a control character (not allowed raw in JSON): the full parser
        // decides.  (`min` over the bytes vectorises; a search that stops early does not.)
        if self.bytes[start + len] != b'"' || body.iter().copied().min().unwrap_or(b' ') < 0x20 {
            return None;
        }
        self.at = start + len + 1;
        Some(&self.text[start..start + len])
    }

    fn text(&mut self) -> Option<Cow<'a, str>> {
        self.string().map(Cow::Borrowed)
    }

    /// `null` (as `None`) or the value `read` reads, into an optional field.
    fn opt_into<T>(
        &mut self,
        field: &mut Option<T>,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<()> {
        *field = self.or_null(read)?;
        Some(())
    }

    /// `null` as `None`, or the value `read` reads.
    fn or_null<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.bytes[self.at..].starts_with(b"null") {
            self.at += 4;
            return Some(None);
        }
        read(self).map(Some)
    }

    /// `0` or digits without a leading zero, within u64; nothing after them that could
    /// continue a number.
    fn unsigned(&mut self) -> Option<u64> {
        let start = self.at;
        // The value as the digits go: no overflow below 20 digits (u64 has 20).
        let mut value = 0u64;
        let mut digits = 0;
        for &b in &self.bytes[start..] {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
            digits += 1;
        }
        if digits == 0 || (digits > 1 && self.bytes[start] == b'0') {
            return None;
        }
        if matches!(
            self.bytes.get(start + digits),
            Some(b'.' | b'e' | b'E' | b'-' | b'+')
        ) {
            return None;
        }
        self.at = start + digits;
        if digits < 20 {
            Some(value)
        } else {
            self.text[start..self.at].parse().ok()
        }
    }

    /// An unsigned integer, or `-` and a positive one, within i64.
    fn signed(&mut self) -> Option<i64> {
        if self.peek()? == b'-' {
            self.at += 1;
            let magnitude = self.unsigned()?;
            if magnitude == 0 {
                return None; // "-0": left to the full parser
            }
            return 0i64.checked_sub_unsigned(magnitude);
        }
        i64::try_from(self.unsigned()?).ok()
    }

    fn boolean(&mut self) -> Option<bool> {
        for (word, value) in [(&b"true"[..], true), (&b"false"[..], false)] {
            if self.bytes[self.at..].starts_with(word) {
                self.at += word.len();
                return Some(value);
            }
        }
        None
    }

    /// A field this shape does not read: a string, an integer, `true`, `false` or `null`.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'-' | b'0'..=b'9' => self.signed().map(drop),
            b'n' if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Some(())
            }
            _ => self.boolean().map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STMT: &str = r#"{"seq":100,"stream":"20261127T000114Z-9773-w0-0a091b","ts":1795737677072030,"type":"stmt","session":"c229ac89ef4b4960","n":4,"protocol":"extended","sql":"SELECT abalance FROM pgbench_accounts WHERE aid = $1;","hash":"429644e6b614a4c5143b52264d968e81e0d869e49d2f9eecd821d3d125a94634"}"#;
    const END: &str = r#"{"seq":101,"stream":"20261127T000114Z-9773-w0-0a091b","ts":1795737677072185,"type":"end","session":"8dcf0fa69bc1676f","n":3,"duration_us":1595,"command_tag":"SELECT 1","rows":1,"data_rows":1,"sqlstate":null,"columns":"VAAAACEAAWFiYWxhbmNlAAAAQAYAAwAAABcABP////8AAA==","result":"RAAAAAsAAQAAAAEwQwAAAA1TRUxFQ1QgMQA=","hash":"e5da435c246f242202c40e70d800b1b32b634fd29d64d408dea09d2d704dfe01"}"#;

    fn scan_line(text: &str) -> Option<Line<'_>> {
        let mut line = Line::default();
        scan(text, &mut line).map(|()| line)
    }

    fn full(text: &str) -> Result<Line<'_>, String> {
        sonic_rs::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn statement_records_as_written_take_the_scan_and_read_as_the_full_parser_reads_them() {
        for text in [STMT, END] {
            let fast = scan_line(text).expect("a record as the gateway writes it is scanned");
            assert_eq!(format!("{fast:?}"), format!("{:?}", full(text).unwrap()));
        }
        let end = scan_line(END).unwrap();
        assert_eq!(end.kind, "end");
        assert_eq!((end.n, end.rows, end.sqlstate), (Some(3), Some(1), None));
        assert!(end.result.is_some());
        assert!(matches!(
            end.session,
            Some(Cow::Borrowed("8dcf0fa69bc1676f"))
        ));
    }

    #[test]
    fn what_the_scan_does_not_take_is_left_to_the_full_parser() {
        for text in [
            r#"{"type":"stmt","sql":"SELECT \"a\""}"#, // an escape
            r#"{"type":"stmt", "n":1}"#,               // whitespace
            r#"{"type":"stmt","n":1,"n":2}"#,          // a duplicate field
            r#"{"type":"stmt","n":01}"#,               // a leading zero
            r#"{"type":"stmt","n":1.0}"#,              // not an integer
            r#"{"type":"stmt","n":-1}"#,               // negative where unsigned
            r#"{"type":"stmt","rows":-0}"#,
            r#"{"type":"stmt","seq":null}"#, // null where the field takes none
            r#"{"type":"stmt","n":18446744073709551616}"#, // out of range
            r#"{"type":"session","user":{"id":"u"}}"#, // a nested value
            r#"{"type":"stmt","other":[1]}"#,
            r#"{"type":"stmt"} "#,          // after the object
            r#"{"type":"stmt","sql":"SEL"#, // cut short
            r#"{"seq":1}"#,                 // no type
            r#"{}"#,
        ] {
            assert!(scan_line(text).is_none(), "{text}");
        }
    }

    #[test]
    fn numbers_up_to_the_limits_read_as_the_full_parser_reads_them() {
        for (text, n) in [
            (r#"{"type":"stmt","n":0}"#, 0),
            (
                r#"{"type":"stmt","n":9999999999999999999}"#,
                9_999_999_999_999_999_999,
            ),
            (r#"{"type":"stmt","n":18446744073709551615}"#, u64::MAX),
        ] {
            assert_eq!(scan_line(text).unwrap().n, Some(n), "{text}");
            assert_eq!(full(text).unwrap().n, Some(n), "{text}");
        }
        let text = r#"{"type":"end","rows":-9223372036854775808,"data_rows":9223372036854775807}"#;
        let fast = scan_line(text).unwrap();
        assert_eq!(
            (fast.rows, fast.data_rows),
            (Some(i64::MIN), Some(i64::MAX))
        );
        assert!(scan_line(r#"{"type":"end","rows":9223372036854775808}"#).is_none());
    }

    #[test]
    fn unknown_scalar_fields_are_skipped_as_the_full_parser_skips_them() {
        let text = r#"{"type":"end","columns":"VA==","x":-12,"y":true,"z":null,"n":7}"#;
        let fast = scan_line(text).unwrap();
        assert_eq!(fast.n, Some(7));
        assert_eq!(format!("{fast:?}"), format!("{:?}", full(text).unwrap()));
    }

    /// The fields `Line` deserialises, as its derived `Deserialize` names them.
    fn line_fields() -> &'static [&'static str] {
        use serde::de::{Error, Visitor};
        use serde::Deserialize;

        struct Names<'n>(&'n mut &'static [&'static str]);
        impl<'de> serde::Deserializer<'de> for Names<'_> {
            type Error = serde::de::value::Error;

            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Error::custom("field names only"))
            }

            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(Error::custom("field names only"))
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = Line::deserialize(Names(&mut fields));
        fields
    }

    /// A field added to `Line` and not to the scan would be skipped as unknown: every
    /// field, with every kind of scalar, reads the same through both or is left alone.
    #[test]
    fn every_field_of_a_line_reads_the_same_through_the_scan() {
        let fields = line_fields();
        assert!(fields.len() >= 36 && fields.contains(&"sql") && fields.contains(&"type"));
        let mut scanned = 0;
        for field in fields {
            for value in [r#""s""#, "7", "-7", "true", "null"] {
                let text = if *field == "type" {
                    format!(r#"{{"type":{value}}}"#)
                } else {
                    format!(r#"{{"type":"stmt","{field}":{value}}}"#)
                };
                if let Some(fast) = scan_line(&text) {
                    scanned += 1;
                    let slow = full(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                    assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{text}");
                }
            }
        }
        assert!(
            scanned > fields.len(),
            "the scan read {scanned} of the samples"
        );
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9 $;=*.é\"\\\\\n-]{0,12}"
                    .prop_map(|s| serde_json::to_string(&s).unwrap()),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("0".to_owned()),
                Just("-0".to_owned()),
                Just("01".to_owned()),
                Just("1.5".to_owned()),
                Just("[1,\"a\"]".to_owned()),
                Just("{\"k\":1}".to_owned()),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            // Every field of a line, and some it does not keep.
            let keys = vec![
                "seq",
                "ts",
                "type",
                "stream",
                "session",
                "hash",
                "protocol",
                "sql",
                "command_tag",
                "sqlstate",
                "error",
                "client_address",
                "database",
                "upstream_user",
                "server_address",
                "application_name",
                "reason",
                "message",
                "stage",
                "n",
                "duration_us",
                "started",
                "function_oid",
                "rows",
                "data_rows",
                "server_port",
                "statements",
                "tls",
                "result",
                "params",
                "result_omitted",
                "user",
                "decision",
                "rule",
                "policy_version",
                "masked_columns",
                "columns",
                "prev",
                "Type",
                "x_1",
            ];
            proptest::sample::select(keys).prop_map(str::to_owned)
        }

        fn record() -> impl Strategy<Value = String> {
            (
                prop::collection::vec((key(), value()), 0..10),
                prop_oneof![Just("\"stmt\"".to_owned()), value()],
                any::<prop::sample::Index>(),
            )
                .prop_map(|(fields, kind, at)| {
                    let mut parts: Vec<String> =
                        fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    parts.insert(at.index(parts.len() + 1), format!("\"type\":{kind}"));
                    format!("{{{}}}", parts.join(","))
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            /// Whatever the scan reads, the full parser reads the same; what it leaves
            /// alone the full parser still reads (or refuses) on its own.
            #[test]
            fn scan_agrees_with_the_full_parser(
                text in record(),
                cut in any::<prop::sample::Index>(),
                flip in any::<Option<(prop::sample::Index, u8)>>(),
            ) {
                let mut end = cut.index(text.len() + 1);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let mut variants = vec![text.clone(), text[..end].to_owned()];
                if let Some((at, byte)) = flip {
                    let mut bytes = text.clone().into_bytes();
                    let i = at.index(bytes.len());
                    bytes[i] = byte & 0x7f;
                    if let Ok(text) = String::from_utf8(bytes) {
                        variants.push(text);
                    }
                }
                for text in &variants {
                    if let Some(fast) = scan_line(text) {
                        let slow = full(text);
                        prop_assert!(slow.is_ok(), "scanned, but the full parser refuses {text}: {slow:?}");
                        prop_assert_eq!(format!("{fast:?}"), format!("{:?}", slow.unwrap()));
                    }
                }
            }
        }
    }
}

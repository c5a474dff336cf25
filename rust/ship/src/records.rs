//! Audit record lines as the gateway writes them (python/pgwarden/audit/records.py lists
//! every type and field).  [`Line`] borrows from the sealed line; the records a stream
//! keeps open across batches (`session`, `stmt`) are owned, and serialise as the record
//! objects they came from, which is how a shipper checkpoint carries them.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One record line, parsed without copying its strings where JSON allows.
#[derive(Debug, Default, Deserialize)]
pub struct Line<'a> {
    #[serde(default)]
    pub seq: u64,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub stream: Option<Cow<'a, str>>,
    #[serde(default)]
    pub ts: u64,
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub session: Option<Cow<'a, str>>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub hash: Option<Cow<'a, str>>,
    // stmt
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub protocol: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub sql: Option<Cow<'a, str>>,
    #[serde(default)]
    pub params: Option<Vec<Value>>,
    #[serde(default)]
    pub function_oid: Option<i64>,
    // end
    #[serde(default)]
    pub duration_us: Option<u64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub command_tag: Option<Cow<'a, str>>,
    #[serde(default)]
    pub rows: Option<i64>,
    #[serde(default)]
    pub data_rows: Option<i64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub sqlstate: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub error: Option<Cow<'a, str>>,
    #[serde(default)]
    pub result: Option<IgnoredAny>,
    #[serde(default)]
    pub result_omitted: Option<Value>,
    // session, refused
    #[serde(default)]
    pub user: Option<Value>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub client_address: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub database: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub upstream_user: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub server_address: Option<Cow<'a, str>>,
    #[serde(default)]
    pub server_port: Option<i64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub application_name: Option<Cow<'a, str>>,
    #[serde(default)]
    pub tls: Option<bool>,
    // session_end, refused
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub reason: Option<Cow<'a, str>>,
    #[serde(default)]
    pub statements: Option<i64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub message: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    pub stage: Option<Cow<'a, str>>,
    #[serde(default)]
    pub started: Option<u64>,
    // decision
    #[serde(default)]
    pub decision: Option<Value>,
    #[serde(default)]
    pub rule: Option<Value>,
    #[serde(default)]
    pub policy_version: Option<Value>,
    #[serde(default)]
    pub masked_columns: Option<Value>,
}

impl<'a> Line<'a> {
    /// Parses one record line.  A line in the shape the gateway writes (nearly every
    /// `stmt` and `end` record) is read by [`crate::scan`]; any other, and any malformed
    /// one, by sonic-rs (its SIMD string scanning reads a line in about half the time
    /// serde_json takes, and it borrows unescaped strings the same way).  Both read a line
    /// the same.
    pub fn parse(raw: &'a [u8]) -> Result<Line<'a>, String> {
        let mut line = Line::default();
        line.parse_into(raw)?;
        Ok(line)
    }

    /// [`parse`](Self::parse) into a default `Line` (`self`), which is how the assembler
    /// reads: a `Line` is some 800 bytes, and returning one by value copied it several
    /// times per record.  On an error `self` holds part of the line.
    pub fn parse_into(&mut self, raw: &'a [u8]) -> Result<(), String> {
        // Validated as UTF-8 once, whole: the parsers then read each string without
        // validating it again.
        let text = std::str::from_utf8(raw).map_err(|e| e.to_string())?;
        if crate::scan::scan(text, self).is_some() {
            return Ok(());
        }
        *self = sonic_rs::from_str(text).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// An optional string borrowed from the line unless it has escapes.  (Serde borrows a
/// `Cow<str>` field, but not one inside an `Option`: that would allocate each string.)
fn borrowed<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Cow<'de, str>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or null")
        }

        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }

        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }

        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    d.deserialize_option(Text)
}

/// A `stmt` record waiting for its `end` (possibly across batches and checkpoints).  Within
/// a batch it borrows from the batch's lines; what is still open after the batch is kept
/// as `StmtRec<'static>`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StmtRec<'a> {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub stream: Cow<'a, str>,
    #[serde(default)]
    pub ts: u64,
    #[serde(default)]
    pub session: Cow<'a, str>,
    #[serde(default)]
    pub n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Cow<'static, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_oid: Option<i64>,
    #[serde(default)]
    pub hash: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked_columns: Option<Value>,
    #[serde(rename = "_unverified", default, skip_serializing_if = "is_false")]
    pub unverified: bool,
}

impl StmtRec<'_> {
    /// The record with its strings owned, to outlive the batch it was read in.
    pub fn into_owned(self) -> StmtRec<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        StmtRec {
            seq: self.seq,
            stream: own(self.stream),
            ts: self.ts,
            session: own(self.session),
            n: self.n,
            protocol: self.protocol,
            sql: self.sql.map(own),
            params: self.params,
            function_oid: self.function_oid,
            hash: own(self.hash),
            decision: self.decision,
            rule: self.rule,
            policy_version: self.policy_version,
            masked_columns: self.masked_columns,
            unverified: self.unverified,
        }
    }
}

/// A `session` record whose `session_end` has not been read yet.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SessionRec {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub stream: String,
    #[serde(default)]
    pub ts: u64,
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<bool>,
    /// The statement policy the session runs under: its statements without a
    /// `decision` record were allowed by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    #[serde(rename = "_unverified", default, skip_serializing_if = "is_false")]
    pub unverified: bool,
}

/// The protocols a record names, without a string per statement.
fn protocol_name(name: &str) -> Cow<'static, str> {
    match name {
        "simple" => Cow::Borrowed("simple"),
        "extended" => Cow::Borrowed("extended"),
        "function_call" => Cow::Borrowed("function_call"),
        other => Cow::Owned(other.to_owned()),
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn owned(s: &Option<Cow<'_, str>>) -> Option<String> {
    s.as_ref().map(|c| c.to_string())
}

impl<'a> Line<'a> {
    pub fn session_id(&self) -> &str {
        self.session.as_deref().unwrap_or("")
    }

    /// The `stmt` record, its strings borrowed from the line where the line borrows them.
    pub fn into_stmt(self, unverified: bool) -> StmtRec<'a> {
        StmtRec {
            seq: self.seq,
            stream: self.stream.unwrap_or_default(),
            ts: self.ts,
            session: self.session.unwrap_or_default(),
            n: self.n.unwrap_or(0),
            protocol: self.protocol.as_deref().map(protocol_name),
            sql: self.sql,
            params: self.params,
            function_oid: self.function_oid,
            hash: self.hash.unwrap_or_default(),
            unverified,
            ..StmtRec::default()
        }
    }

    pub fn session_rec(&self, unverified: bool) -> SessionRec {
        SessionRec {
            seq: self.seq,
            stream: self.stream.as_deref().unwrap_or("").to_owned(),
            ts: self.ts,
            session: self.session_id().to_owned(),
            hash: self.hash.as_deref().unwrap_or("").to_owned(),
            user: self.user.clone(),
            client_address: owned(&self.client_address),
            database: owned(&self.database),
            upstream_user: owned(&self.upstream_user),
            server_address: owned(&self.server_address),
            server_port: self.server_port,
            application_name: owned(&self.application_name),
            tls: self.tls,
            policy_version: self
                .policy_version
                .as_ref()
                .and_then(Value::as_str)
                .map(str::to_owned),
            unverified,
        }
    }
}

/// How a statement is named across records and in a checkpoint: `session/n`.
pub fn statement_key(session: &str, n: u64) -> String {
    let mut key = String::with_capacity(session.len() + 21);
    statement_key_into(&mut key, session, n);
    key
}

/// [`statement_key`] into `key` (cleared first), for lookups that need no new string.
pub fn statement_key_into(key: &mut String, session: &str, n: u64) {
    key.clear();
    key.push_str(session);
    key.push('/');
    key.push_str(itoa::Buffer::new().format(n));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_borrowed_unless_escaped_and_null_is_none() {
        let raw = r#"{"seq":3,"type":"stmt","session":"s1","sql":"SELECT \"a\" FROM t","hash":"ab","error":null,"stream":"w0"}"#;
        let line = Line::parse(raw.as_bytes()).unwrap();
        assert!(matches!(line.session, Some(Cow::Borrowed("s1"))));
        assert!(matches!(line.stream, Some(Cow::Borrowed("w0"))));
        assert!(matches!(line.hash, Some(Cow::Borrowed("ab"))));
        match &line.sql {
            Some(Cow::Owned(s)) => assert_eq!(s, r#"SELECT "a" FROM t"#),
            other => panic!("escaped text should be unescaped into its own string: {other:?}"),
        }
        assert_eq!(line.error, None);
        assert_eq!(line.protocol, None);
        let wrong = Line::parse(br#"{"type":"stmt","sql":5}"#);
        assert!(wrong.unwrap_err().contains("a string or null"));
        // Anything after the object, or a line cut short, is not a record.
        assert!(Line::parse(br#"{"type":"stmt"} {"type":"end"}"#).is_err());
        assert!(Line::parse(br#"{"type":"stmt","sql":"SEL"#).is_err());
        assert!(Line::parse(br#"{"type":"stmt","n":-1}"#).is_err());
        assert!(Line::parse(b"{\"type\":\"stmt\",\"sql\":\"\xff\"}")
            .unwrap_err()
            .contains("utf-8"));
    }
}

//! Refusing a statement whose text is not UTF-8, in place, without ending the session.
//!
//! pgwarden reads statement text as UTF-8 (to record it, and to parse and decide on it),
//! but a client can switch `client_encoding` after startup (`SET client_encoding`,
//! `set_config`, `options=-c ...`) and send bytes that are not UTF-8.  Such a Query or
//! Parse is well-formed: ending the session with a protocol violation would punish a
//! mistake the client can recover from.
//!
//! The refusal must keep what PostgreSQL guarantees after an error: the transaction is
//! marked failed (or the implicit one rolled back), the extended protocol skips to Sync,
//! and responses stay in order behind pipelined requests.  Only the server can do the
//! first two, so the refused message is replaced, at its place in the stream, by one the
//! server rejects in its raw parser, before it runs anything: a Query, or a Parse under
//! the client's statement name.  A failing named Parse leaves that name as it was; an
//! unnamed one drops the unnamed statement (PostgreSQL does so before parsing), so a
//! later Bind cannot run an older unnamed statement the records would not show.  The
//! server's ErrorResponse to it (42601) is then replaced by the
//! gateway's own, SQLSTATE 22021 (character_not_in_repertoire) with a hint, which is what
//! PostgreSQL itself answers for text invalid in the client encoding.  No byte of the
//! refused statement reaches the server.

use crate::arrays::OidArray;
use crate::backend::{field, Fields};
use crate::error::Result;
use crate::frontend::tag;
use crate::reader::BodyReader;
use crate::writer::MessageWriter;

/// The replacement statement: a syntax error at its first word in every PostgreSQL
/// version, and readable in the server log next to the error it causes.
const REPLACEMENT_SQL: &[u8] = b"pgwarden refused this statement: its text is not valid UTF-8";
/// Statement name of the replacement Parse when the client's name is not UTF-8 itself
/// (a named Parse that fails changes nothing).
const REPLACEMENT_NAME: &[u8] = b"pgwarden_refused_statement";
/// SQLSTATE of the server's answer to the replacement (syntax_error).
const SERVER_ANSWER: &[u8] = b"42601";

pub const SQLSTATE: &str = "22021";
pub const MESSAGE: &str = "statement text is not valid UTF-8";
pub const HINT: &str = "pgwarden reads statements as UTF-8: use client_encoding UTF8 \
(SET client_encoding TO 'UTF8', or PGCLIENTENCODING=UTF8 for libpq clients).";

/// One refused message, from the client side until the server has answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The field that is not UTF-8 ("statement text", "prepared statement name").
    field: &'static str,
    /// Offset of the first invalid byte in that field, and the byte.
    offset: usize,
    byte: u8,
    /// The server's error was replaced (a Query is answered by one ErrorResponse only).
    pub(crate) answered: bool,
}

/// A well-formed Query or Parse that is refused because a string in it is not UTF-8.
#[derive(Debug)]
pub(crate) struct NonUtf8Statement {
    pub(crate) refusal: Refusal,
    /// The statement text as the audit and the statement log record it (invalid bytes
    /// shown as U+FFFD).
    pub(crate) sql: String,
    /// Parse: the client's statement name, when it is UTF-8.
    pub(crate) name: Option<String>,
    /// The message that goes to the server in its place.
    pub(crate) replacement: Vec<u8>,
}

fn first_invalid(bytes: &[u8]) -> Option<(usize, u8)> {
    let e = std::str::from_utf8(bytes).err()?;
    Some((e.valid_up_to(), bytes[e.valid_up_to()]))
}

/// `Some` when `body` is a Query or Parse that is well-formed except that its statement
/// name or text is not UTF-8.  Anything else (a truncated body, another message) is
/// `None`: the caller reports its own decoding error.
pub(crate) fn non_utf8_statement(msg_tag: u8, body: &[u8]) -> Option<NonUtf8Statement> {
    let (name, sql) = match msg_tag {
        tag::QUERY => {
            let mut r = BodyReader::new(body, "Query");
            let sql = r.cstr().ok()?;
            r.finish().ok()?;
            (None, sql)
        }
        tag::PARSE => {
            let mut r = BodyReader::new(body, "Parse");
            let name = r.cstr().ok()?;
            let sql = r.cstr().ok()?;
            OidArray::read(&mut r).ok()?;
            r.finish().ok()?;
            (Some(name), sql)
        }
        _ => return None,
    };
    let (field, (offset, byte)) = match first_invalid(sql) {
        Some(at) => ("statement text", at),
        None => ("prepared statement name", first_invalid(name?)?),
    };
    let name = name.and_then(|n| std::str::from_utf8(n).ok());
    let mut replacement = Vec::with_capacity(REPLACEMENT_SQL.len() + 40);
    let mut w = MessageWriter::typed(&mut replacement, msg_tag);
    if msg_tag == tag::PARSE {
        let replacement_name = name.map_or(REPLACEMENT_NAME, str::as_bytes);
        w.cstr(replacement_name).cstr(REPLACEMENT_SQL).i16(0);
    } else {
        w.cstr(REPLACEMENT_SQL);
    }
    w.finish();
    Some(NonUtf8Statement {
        refusal: Refusal {
            field,
            offset,
            byte,
            answered: false,
        },
        sql: String::from_utf8_lossy(sql).into_owned(),
        name: name.map(str::to_owned),
        replacement,
    })
}

impl Refusal {
    /// Writes the gateway's ErrorResponse body into `out` when `server_error` (an
    /// ErrorResponse body) is the server's expected answer to the replacement.  Any other
    /// error (a FATAL at shutdown, say) is the client's to see as it is.
    pub(crate) fn replace_error(&self, server_error: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let fields = Fields::decode(server_error, "ErrorResponse")?;
        if self.answered
            || fields.get(field::SQLSTATE) != Some(SERVER_ANSWER)
            || fields.severity() != Some(b"ERROR".as_slice())
        {
            return Ok(false);
        }
        let detail = format!(
            "The {} has the byte 0x{:02x} at offset {}, which is not valid UTF-8; \
             the session's client_encoding is probably not UTF8.",
            self.field, self.byte, self.offset
        );
        out.clear();
        for (code, value) in [
            (field::SEVERITY, b"ERROR".as_slice()),
            (field::SEVERITY_NONLOCALIZED, b"ERROR"),
            (field::SQLSTATE, SQLSTATE.as_bytes()),
            (field::MESSAGE, MESSAGE.as_bytes()),
            (field::DETAIL, detail.as_bytes()),
            (field::HINT, HINT.as_bytes()),
        ] {
            out.push(code);
            out.extend_from_slice(value);
            out.push(0);
        }
        out.push(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::{FrontendMessage, Parse, Query};

    #[test]
    fn query_and_parse_with_latin1_text_are_refused() {
        let q = non_utf8_statement(tag::QUERY, b"SELECT 'caf\xe9'\0").unwrap();
        assert_eq!(q.sql, "SELECT 'caf\u{fffd}'");
        assert_eq!((q.refusal.offset, q.refusal.byte), (11, 0xe9));
        let FrontendMessage::Query(Query { sql }) =
            FrontendMessage::decode(q.replacement[0], &q.replacement[5..]).unwrap()
        else {
            panic!()
        };
        assert_eq!(sql.as_bytes(), REPLACEMENT_SQL);

        let p = non_utf8_statement(tag::PARSE, b"s1\0SELECT '\xff'\0\0\x01\0\0\0\x19").unwrap();
        assert_eq!(p.refusal.field, "statement text");
        let FrontendMessage::Parse(Parse { name, .. }) =
            FrontendMessage::decode(p.replacement[0], &p.replacement[5..]).unwrap()
        else {
            panic!()
        };
        assert_eq!(name, "s1");
        assert_eq!(p.name.as_deref(), Some("s1"));

        let n = non_utf8_statement(tag::PARSE, b"\xe9\0SELECT 1\0\0\0").unwrap();
        assert_eq!(n.refusal.field, "prepared statement name");
        assert_eq!(n.name, None);
        let FrontendMessage::Parse(Parse { name, .. }) =
            FrontendMessage::decode(n.replacement[0], &n.replacement[5..]).unwrap()
        else {
            panic!()
        };
        assert_eq!(name.as_bytes(), REPLACEMENT_NAME);
    }

    #[test]
    fn malformed_or_valid_messages_are_not_refusals() {
        assert!(non_utf8_statement(tag::QUERY, b"SELECT 1\0").is_none());
        assert!(non_utf8_statement(tag::QUERY, b"SELECT '\xe9'").is_none()); // no NUL
        assert!(non_utf8_statement(tag::QUERY, b"SELECT '\xe9'\0x").is_none()); // trailing
        assert!(non_utf8_statement(tag::PARSE, b"\0SELECT '\xe9'\0\0").is_none()); // short
        assert!(non_utf8_statement(tag::BIND, b"\xe9\0\0\0\0\0\0\0\0").is_none());
    }

    #[test]
    fn only_the_expected_server_error_is_replaced() {
        let r = Refusal {
            field: "statement text",
            offset: 3,
            byte: 0xe9,
            answered: false,
        };
        let mut out = Vec::new();
        let syntax = b"SERROR\0VERROR\0C42601\0Msyntax error\0\0";
        assert!(r.replace_error(syntax, &mut out).unwrap());
        let f = Fields::decode(&out, "ErrorResponse").unwrap();
        assert_eq!(f.get(field::SQLSTATE), Some(b"22021".as_slice()));
        assert_eq!(f.get(field::HINT), Some(HINT.as_bytes()));
        let fatal = b"SFATAL\0VFATAL\0C57P01\0Mterminating\0\0";
        assert!(!r.replace_error(fatal, &mut out).unwrap());
        let answered = Refusal {
            answered: true,
            ..r
        };
        assert!(!answered.replace_error(syntax, &mut out).unwrap());
    }
}

//! Client-to-server (frontend) messages after startup, with symmetric decode/encode.
//! Decoding borrows from the body: names, SQL text and values are slices, not copies.
//! Text fields must be UTF-8: the gateway refuses another `client_encoding` at startup,
//! and text it cannot read is refused rather than guessed at (a Query or Parse in place,
//! see [`crate::refusal`]).

use crate::arrays::{Int16Array, OidArray, ValueList};
use crate::error::{Direction, Result, WireError};
use crate::reader::BodyReader;
use crate::writer::MessageWriter;

/// Frontend message type bytes.
pub mod tag {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const DESCRIBE: u8 = b'D';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    /// PasswordMessage, SASLInitialResponse, SASLResponse and GSSResponse share it.
    pub const AUTH_RESPONSE: u8 = b'p';
}

/// Query: simple-protocol SQL (may hold several statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a str,
}

/// Parse: prepares `sql` as statement `name` ("" = unnamed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    pub sql: &'a str,
    pub param_types: OidArray<'a>,
}

/// Bind: creates portal `portal` from statement `statement` with parameter values.
///
/// Statement and portal names here, in Execute, Describe and Close are opaque bytes: the
/// server reads them in the client encoding (and refuses bytes invalid in it, 22021), and
/// the gateway only needs them to match a Bind to its Parse and an Execute to its Bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub param_formats: Int16Array<'a>,
    pub params: ValueList<'a>,
    pub result_formats: Int16Array<'a>,
}

impl Bind<'_> {
    /// Format of parameter `i`: no codes = all text, one code = applies to all.
    pub fn param_format(&self, i: usize) -> i16 {
        match self.param_formats.len() {
            0 => 0,
            1 => self.param_formats.get(0).unwrap_or(0),
            _ => self.param_formats.get(i).unwrap_or(0),
        }
    }
}

/// Execute: runs portal `portal`, at most `max_rows` rows (0 = all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a [u8],
    pub max_rows: i32,
}

/// What Describe and Close name: a prepared statement (`'S'`) or a portal (`'P'`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    fn read(r: &mut BodyReader<'_>, what: &'static str) -> Result<Self> {
        match r.u8()? {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            _ => Err(WireError::malformed(what)),
        }
    }

    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// Describe: asks for a statement's or portal's parameter/row description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Describe<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

/// Close: drops a prepared statement or portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close<'a> {
    pub target: Target,
    pub name: &'a [u8],
}

/// FunctionCall: the fast-path interface, calls a function by OID with arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionCall<'a> {
    pub function_oid: u32,
    pub arg_formats: Int16Array<'a>,
    pub args: ValueList<'a>,
    pub result_format: i16,
}

/// One frontend message of the relay phase, plus the `'p'` authentication responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query(Query<'a>),
    Parse(Parse<'a>),
    Bind(Bind<'a>),
    Execute(Execute<'a>),
    Describe(Describe<'a>),
    Close(Close<'a>),
    Sync,
    Flush,
    CopyData(&'a [u8]),
    CopyDone,
    /// CopyFail: aborts COPY FROM STDIN with a client-chosen error message.
    CopyFail(&'a str),
    FunctionCall(FunctionCall<'a>),
    Terminate,
    /// `'p'`: its meaning depends on the authentication exchange in progress; decode
    /// the body with [`PasswordMessage`], [`SaslInitialResponse`] or [`SaslResponse`].
    AuthResponse(&'a [u8]),
}

impl<'a> FrontendMessage<'a> {
    /// Decodes the body of a message with type byte `tag`.
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self> {
        Ok(match tag {
            tag::QUERY => FrontendMessage::Query(Query::decode(body)?),
            tag::PARSE => FrontendMessage::Parse(Parse::decode(body)?),
            tag::BIND => FrontendMessage::Bind(Bind::decode(body)?),
            tag::EXECUTE => FrontendMessage::Execute(Execute::decode(body)?),
            tag::DESCRIBE => FrontendMessage::Describe(Describe::decode(body)?),
            tag::CLOSE => FrontendMessage::Close(Close::decode(body)?),
            tag::SYNC => empty(body, "Sync", FrontendMessage::Sync)?,
            tag::FLUSH => empty(body, "Flush", FrontendMessage::Flush)?,
            tag::COPY_DATA => FrontendMessage::CopyData(body),
            tag::COPY_DONE => empty(body, "CopyDone", FrontendMessage::CopyDone)?,
            tag::COPY_FAIL => {
                let mut r = BodyReader::new(body, "CopyFail");
                let msg = r.cstr_utf8()?;
                r.finish()?;
                FrontendMessage::CopyFail(msg)
            }
            tag::FUNCTION_CALL => FrontendMessage::FunctionCall(FunctionCall::decode(body)?),
            tag::TERMINATE => empty(body, "Terminate", FrontendMessage::Terminate)?,
            tag::AUTH_RESPONSE => FrontendMessage::AuthResponse(body),
            _ => {
                return Err(WireError::UnknownTag {
                    tag,
                    direction: Direction::Frontend,
                })
            }
        })
    }

    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Query(_) => tag::QUERY,
            FrontendMessage::Parse(_) => tag::PARSE,
            FrontendMessage::Bind(_) => tag::BIND,
            FrontendMessage::Execute(_) => tag::EXECUTE,
            FrontendMessage::Describe(_) => tag::DESCRIBE,
            FrontendMessage::Close(_) => tag::CLOSE,
            FrontendMessage::Sync => tag::SYNC,
            FrontendMessage::Flush => tag::FLUSH,
            FrontendMessage::CopyData(_) => tag::COPY_DATA,
            FrontendMessage::CopyDone => tag::COPY_DONE,
            FrontendMessage::CopyFail(_) => tag::COPY_FAIL,
            FrontendMessage::FunctionCall(_) => tag::FUNCTION_CALL,
            FrontendMessage::Terminate => tag::TERMINATE,
            FrontendMessage::AuthResponse(_) => tag::AUTH_RESPONSE,
        }
    }

    /// Appends the whole message, tag and length included.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = MessageWriter::typed(buf, self.tag());
        match self {
            FrontendMessage::Query(q) => {
                w.cstr(q.sql.as_bytes());
            }
            FrontendMessage::Parse(p) => {
                w.cstr(p.name.as_bytes()).cstr(p.sql.as_bytes());
                p.param_types.write(&mut w);
            }
            FrontendMessage::Bind(b) => {
                w.cstr(b.portal).cstr(b.statement);
                b.param_formats.write(&mut w);
                b.params.write(&mut w);
                b.result_formats.write(&mut w);
            }
            FrontendMessage::Execute(e) => {
                w.cstr(e.portal).i32(e.max_rows);
            }
            FrontendMessage::Describe(d) => {
                w.u8(d.target.byte()).cstr(d.name);
            }
            FrontendMessage::Close(c) => {
                w.u8(c.target.byte()).cstr(c.name);
            }
            FrontendMessage::CopyData(data) | FrontendMessage::AuthResponse(data) => {
                w.bytes(data);
            }
            FrontendMessage::CopyFail(msg) => {
                w.cstr(msg.as_bytes());
            }
            FrontendMessage::FunctionCall(f) => {
                w.u32(f.function_oid);
                f.arg_formats.write(&mut w);
                f.args.write(&mut w);
                w.i16(f.result_format);
            }
            FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::CopyDone
            | FrontendMessage::Terminate => {}
        }
        w.finish();
    }
}

fn empty<'a>(
    body: &[u8],
    what: &'static str,
    m: FrontendMessage<'a>,
) -> Result<FrontendMessage<'a>> {
    if body.is_empty() {
        Ok(m)
    } else {
        Err(WireError::malformed(what))
    }
}

impl<'a> Query<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Query");
        let sql = r.cstr_utf8()?;
        r.finish()?;
        Ok(Query { sql })
    }
}

impl<'a> Describe<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Describe");
        let target = Target::read(&mut r, "Describe")?;
        let name = r.cstr()?;
        r.finish()?;
        Ok(Describe { target, name })
    }
}

impl<'a> Close<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Close");
        let target = Target::read(&mut r, "Close")?;
        let name = r.cstr()?;
        r.finish()?;
        Ok(Close { target, name })
    }
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Parse");
        let name = r.cstr_utf8()?;
        let sql = r.cstr_utf8()?;
        let param_types = OidArray::read(&mut r)?;
        r.finish()?;
        Ok(Parse {
            name,
            sql,
            param_types,
        })
    }
}

impl<'a> Bind<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Bind");
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        let param_formats = Int16Array::read(&mut r)?;
        let params = ValueList::read(&mut r, "Bind parameters")?;
        let result_formats = Int16Array::read(&mut r)?;
        r.finish()?;
        // PostgreSQL: "bind message has %d parameter formats but %d parameters".
        if param_formats.len() > 1 && param_formats.len() != params.len() {
            return Err(WireError::malformed("Bind parameter formats"));
        }
        Ok(Bind {
            portal,
            statement,
            param_formats,
            params,
            result_formats,
        })
    }

    /// Appends a Bind built from plain slices.
    pub fn encode_parts(
        buf: &mut Vec<u8>,
        portal: &str,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<&[u8]>],
        result_formats: &[i16],
    ) {
        let mut w = MessageWriter::typed(buf, tag::BIND);
        w.cstr(portal.as_bytes()).cstr(statement.as_bytes());
        crate::arrays::write_i16s(&mut w, param_formats);
        crate::arrays::write_values(&mut w, params);
        crate::arrays::write_i16s(&mut w, result_formats);
        w.finish();
    }
}

impl<'a> Execute<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Execute");
        let portal = r.cstr()?;
        let max_rows = r.i32()?;
        r.finish()?;
        Ok(Execute { portal, max_rows })
    }
}

impl<'a> FunctionCall<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "FunctionCall");
        let function_oid = r.u32()?;
        let arg_formats = Int16Array::read(&mut r)?;
        let args = ValueList::read(&mut r, "FunctionCall arguments")?;
        let result_format = r.i16()?;
        r.finish()?;
        Ok(FunctionCall {
            function_oid,
            arg_formats,
            args,
            result_format,
        })
    }
}

/// PasswordMessage (`'p'` after AuthenticationCleartextPassword / MD5Password).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordMessage<'a> {
    pub password: &'a [u8],
}

impl<'a> PasswordMessage<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "PasswordMessage");
        let password = r.cstr()?;
        r.finish()?;
        Ok(PasswordMessage { password })
    }

    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = MessageWriter::typed(buf, tag::AUTH_RESPONSE);
        w.cstr(self.password);
        w.finish();
    }
}

/// SASLInitialResponse (`'p'` after AuthenticationSASL): chosen mechanism and the
/// client-first message (`None` is length -1, no initial response).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    pub data: Option<&'a [u8]>,
}

impl<'a> SaslInitialResponse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "SASLInitialResponse");
        let mechanism = r.cstr_utf8()?;
        let data = r.value()?;
        r.finish()?;
        Ok(SaslInitialResponse { mechanism, data })
    }

    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = MessageWriter::typed(buf, tag::AUTH_RESPONSE);
        w.cstr(self.mechanism.as_bytes()).value(self.data);
        w.finish();
    }
}

/// SASLResponse and GSSResponse (`'p'` during SASL / GSSAPI exchanges): opaque data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslResponse<'a> {
    pub data: &'a [u8],
}

impl<'a> SaslResponse<'a> {
    pub fn decode(body: &'a [u8]) -> Self {
        SaslResponse { data: body }
    }

    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = MessageWriter::typed(buf, tag::AUTH_RESPONSE);
        w.bytes(self.data);
        w.finish();
    }
}

/// GSSResponse carries the same shape as SASLResponse.
pub type GssResponse<'a> = SaslResponse<'a>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framer::FrameIter;

    fn roundtrip(m: FrontendMessage<'_>) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let mut it = FrameIter::new(&buf, 1 << 30);
        let f = it.next().unwrap().unwrap();
        assert!(it.next().is_none());
        assert_eq!(f.tag, m.tag());
        assert_eq!(FrontendMessage::decode(f.tag, f.body).unwrap(), m);
    }

    fn bind_bytes() -> Vec<u8> {
        let mut buf = Vec::new();
        Bind::encode_parts(
            &mut buf,
            "p1",
            "s1",
            &[0, 1, 0],
            &[Some(b"42"), Some(&[1, 2]), None],
            &[1],
        );
        buf
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(FrontendMessage::Query(Query {
            sql: "SELECT 1; SELECT 'é'",
        }));
        let mut oids = Vec::new();
        let mut w = MessageWriter::typed(&mut oids, b'P');
        w.cstr(b"s1").cstr(b"SELECT $1::int, $2");
        crate::arrays::write_oids(&mut w, &[23, 0]);
        w.finish();
        let p = FrontendMessage::decode(b'P', &oids[5..]).unwrap();
        let FrontendMessage::Parse(parse) = p else {
            panic!()
        };
        assert_eq!(parse.param_types.iter().collect::<Vec<_>>(), vec![23, 0]);
        roundtrip(p);
        let b = bind_bytes();
        let bm = FrontendMessage::decode(b'B', &b[5..]).unwrap();
        roundtrip(bm);
        roundtrip(FrontendMessage::Execute(Execute {
            portal: b"",
            max_rows: 0,
        }));
        roundtrip(FrontendMessage::Describe(Describe {
            target: Target::Statement,
            name: b"s1",
        }));
        roundtrip(FrontendMessage::Close(Close {
            target: Target::Portal,
            name: b"p",
        }));
        roundtrip(FrontendMessage::Sync);
        roundtrip(FrontendMessage::Flush);
        roundtrip(FrontendMessage::CopyData(b"1\tx\n"));
        roundtrip(FrontendMessage::CopyDone);
        roundtrip(FrontendMessage::CopyFail("aborted by user"));
        roundtrip(FrontendMessage::Terminate);
        roundtrip(FrontendMessage::AuthResponse(b"secret\0"));
        let mut fc = Vec::new();
        let mut w = MessageWriter::typed(&mut fc, b'F');
        w.u32(1598);
        crate::arrays::write_i16s(&mut w, &[1]);
        crate::arrays::write_values(&mut w, &[Some(&[0, 0, 0, 7])]);
        w.i16(1);
        w.finish();
        let f = FrontendMessage::decode(b'F', &fc[5..]).unwrap();
        assert!(matches!(
            f,
            FrontendMessage::FunctionCall(FunctionCall {
                function_oid: 1598,
                ..
            })
        ));
        roundtrip(f);
    }

    #[test]
    fn bind_accessors() {
        let b = bind_bytes();
        let Ok(FrontendMessage::Bind(bind)) = FrontendMessage::decode(b'B', &b[5..]) else {
            panic!()
        };
        assert_eq!((bind.portal, bind.statement), (&b"p1"[..], &b"s1"[..]));
        let vals: Vec<_> = bind.params.iter().collect();
        assert_eq!(vals, vec![Some(&b"42"[..]), Some(&[1u8, 2][..]), None]);
        assert_eq!(
            (0..3).map(|i| bind.param_format(i)).collect::<Vec<_>>(),
            vec![0, 1, 0]
        );
        assert_eq!(bind.result_formats.iter().collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn psql_query_capture() {
        // psql sending `select 1;` (captured).
        let bytes = b"Q\x00\x00\x00\x0eselect 1;\x00";
        let mut it = FrameIter::new(bytes, 1 << 30);
        let f = it.next().unwrap().unwrap();
        assert_eq!(
            FrontendMessage::decode(f.tag, f.body).unwrap(),
            FrontendMessage::Query(Query { sql: "select 1;" })
        );
    }

    #[test]
    fn auth_responses_roundtrip() {
        let mut buf = Vec::new();
        PasswordMessage { password: b"tok" }.encode(&mut buf);
        assert_eq!(PasswordMessage::decode(&buf[5..]).unwrap().password, b"tok");
        let s = SaslInitialResponse {
            mechanism: "SCRAM-SHA-256",
            data: Some(b"n,,n=,r=abc"),
        };
        let mut buf = Vec::new();
        s.encode(&mut buf);
        assert_eq!(SaslInitialResponse::decode(&buf[5..]).unwrap(), s);
        let mut buf = Vec::new();
        SaslResponse { data: b"c=biws" }.encode(&mut buf);
        assert_eq!(SaslResponse::decode(&buf[5..]).data, b"c=biws");
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for (tag, body) in [
            (b'Q', &b"no terminator"[..]),
            (b'Q', b"a\0trailing"),
            (b'P', b"s\0q\0\xff\xff"),
            (b'B', b"\0\0\0\x01\0"),
            (b'B', b"\0\0\0\0\0\x01\x7f\xff\xff\xff\0\0"),
            (b'E', b"\0\0\0"),
            (b'D', b"X\0"),
            (b'S', b"x"),
            (b'Q', b"\xff\xfe\0"),
        ] {
            assert!(
                FrontendMessage::decode(tag, body).is_err(),
                "{tag} {body:?}"
            );
        }
        assert_eq!(
            FrontendMessage::decode(b'Z', b"").unwrap_err(),
            WireError::UnknownTag {
                tag: b'Z',
                direction: Direction::Frontend
            }
        );
    }
}

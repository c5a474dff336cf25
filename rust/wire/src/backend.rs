//! Server-to-client (backend) messages, with symmetric decode/encode.  Decoding borrows
//! from the body.  Free text chosen by the server (error fields, parameter values,
//! notification payloads, column names) stays as bytes: it is in the session's
//! encoding and decoding it must never fail the stream.

use crate::arrays::{Int16Array, NameList, OidArray, ValueList};
use crate::error::{Direction, Result, WireError};
use crate::reader::BodyReader;
use crate::writer::MessageWriter;

/// Backend message type bytes.
pub mod tag {
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const NO_DATA: u8 = b'n';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
}

/// Authentication request codes (first Int32 of an Authentication message).
pub mod auth_code {
    pub const OK: i32 = 0;
    pub const KERBEROS_V5: i32 = 2;
    pub const CLEARTEXT_PASSWORD: i32 = 3;
    pub const MD5_PASSWORD: i32 = 5;
    pub const GSS: i32 = 7;
    pub const GSS_CONTINUE: i32 = 8;
    pub const SSPI: i32 = 9;
    pub const SASL: i32 = 10;
    pub const SASL_CONTINUE: i32 = 11;
    pub const SASL_FINAL: i32 = 12;
}

/// Authentication* messages, by request code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Gss,
    GssContinue(&'a [u8]),
    Sspi,
    /// AuthenticationSASL: the mechanisms the server offers, e.g. SCRAM-SHA-256.
    Sasl(NameList<'a>),
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
}

impl<'a> Authentication<'a> {
    pub fn code(&self) -> i32 {
        match self {
            Authentication::Ok => auth_code::OK,
            Authentication::KerberosV5 => auth_code::KERBEROS_V5,
            Authentication::CleartextPassword => auth_code::CLEARTEXT_PASSWORD,
            Authentication::Md5Password { .. } => auth_code::MD5_PASSWORD,
            Authentication::Gss => auth_code::GSS,
            Authentication::GssContinue(_) => auth_code::GSS_CONTINUE,
            Authentication::Sspi => auth_code::SSPI,
            Authentication::Sasl(_) => auth_code::SASL,
            Authentication::SaslContinue(_) => auth_code::SASL_CONTINUE,
            Authentication::SaslFinal(_) => auth_code::SASL_FINAL,
        }
    }

    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "Authentication");
        let code = r.i32()?;
        let m = match code {
            auth_code::OK => Authentication::Ok,
            auth_code::KERBEROS_V5 => Authentication::KerberosV5,
            auth_code::CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
            auth_code::MD5_PASSWORD => Authentication::Md5Password { salt: r.array()? },
            auth_code::GSS => Authentication::Gss,
            auth_code::GSS_CONTINUE => Authentication::GssContinue(r.rest()),
            auth_code::SSPI => Authentication::Sspi,
            auth_code::SASL => {
                Authentication::Sasl(NameList::read_terminated(&mut r, "AuthenticationSASL")?)
            }
            auth_code::SASL_CONTINUE => Authentication::SaslContinue(r.rest()),
            auth_code::SASL_FINAL => Authentication::SaslFinal(r.rest()),
            _ => return Err(WireError::malformed("Authentication request code")),
        };
        r.finish()?;
        Ok(m)
    }

    fn write(&self, w: &mut MessageWriter<'_>) {
        w.i32(self.code());
        match self {
            Authentication::Md5Password { salt } => {
                w.bytes(salt);
            }
            Authentication::GssContinue(d)
            | Authentication::SaslContinue(d)
            | Authentication::SaslFinal(d) => {
                w.bytes(d);
            }
            Authentication::Sasl(names) => {
                w.bytes(names.raw()).u8(0);
            }
            _ => {}
        }
    }
}

/// Splits an Authentication body into its code and the payload after it (as the
/// startup phase in Python consumes it).
pub fn split_authentication(body: &[u8]) -> Result<(i32, &[u8])> {
    let mut r = BodyReader::new(body, "Authentication");
    let code = r.i32()?;
    Ok((code, r.rest()))
}

/// Appends an Authentication message from a request code and the payload after it,
/// for codes the caller builds itself (the inverse of [`split_authentication`]).
pub fn encode_authentication_raw(buf: &mut Vec<u8>, code: i32, payload: &[u8]) {
    let mut w = MessageWriter::typed(buf, tag::AUTHENTICATION);
    w.i32(code).bytes(payload);
    w.finish();
}

/// Appends a NegotiateProtocolVersion: the newest minor version this side supports
/// and the `_pq_.` options it does not recognise.
pub fn encode_negotiate_protocol_version(
    buf: &mut Vec<u8>,
    newest_minor: u32,
    unsupported: &[&str],
) {
    let mut w = MessageWriter::typed(buf, tag::NEGOTIATE_PROTOCOL_VERSION);
    w.u32(newest_minor).i32(unsupported.len() as i32);
    for name in unsupported {
        w.cstr(name.as_bytes());
    }
    w.finish();
}

/// NegotiateProtocolVersion body -> (newest minor version, unrecognised options).
pub fn decode_negotiate_protocol_version(body: &[u8]) -> Result<(u32, NameList<'_>)> {
    let mut r = BodyReader::new(body, "NegotiateProtocolVersion");
    let newest_minor = r.u32()?;
    let n =
        usize::try_from(r.i32()?).map_err(|_| WireError::malformed("NegotiateProtocolVersion"))?;
    let unsupported = NameList::read_counted(&mut r, n, "NegotiateProtocolVersion")?;
    r.finish()?;
    Ok((newest_minor, unsupported))
}

/// Decodes the AuthenticationSASL payload (after the request code): mechanism names.
pub fn decode_sasl_mechanisms(payload: &[u8]) -> Result<NameList<'_>> {
    let mut r = BodyReader::new(payload, "AuthenticationSASL");
    let names = NameList::read_terminated(&mut r, "AuthenticationSASL")?;
    r.finish()?;
    Ok(names)
}

/// ReadyForQuery transaction status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (statements refused until rollback).
    Failed,
}

impl TransactionStatus {
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            b'I' => Ok(TransactionStatus::Idle),
            b'T' => Ok(TransactionStatus::InTransaction),
            b'E' => Ok(TransactionStatus::Failed),
            _ => Err(WireError::malformed("ReadyForQuery status")),
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// ErrorResponse / NoticeResponse fields: `(code byte, value)` pairs, ended by a zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    raw: &'a [u8],
}

/// Field codes of ErrorResponse / NoticeResponse.
pub mod field {
    pub const SEVERITY: u8 = b'S';
    /// Severity, never localized (PostgreSQL 9.6+).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const SQLSTATE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const DETAIL: u8 = b'D';
    pub const HINT: u8 = b'H';
}

impl<'a> Fields<'a> {
    pub fn decode(body: &'a [u8], what: &'static str) -> Result<Self> {
        let mut r = BodyReader::new(body, what);
        loop {
            if r.u8()? == 0 {
                break;
            }
            r.cstr()?;
        }
        r.finish()?;
        Ok(Fields { raw: body })
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut r = BodyReader::new(self.raw, "fields");
        std::iter::from_fn(move || {
            let code = r.u8().ok().filter(|c| *c != 0)?;
            Some((code, r.cstr().ok()?))
        })
    }

    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// Severity for a machine: the non-localized `V` field, else `S`.
    pub fn severity(&self) -> Option<&'a [u8]> {
        self.get(field::SEVERITY_NONLOCALIZED)
            .or_else(|| self.get(field::SEVERITY))
    }

    /// Appends a whole ErrorResponse (`tag` = `'E'`) or NoticeResponse (`'N'`).
    pub fn encode_pairs(buf: &mut Vec<u8>, tag: u8, pairs: &[(u8, &[u8])]) {
        let mut w = MessageWriter::typed(buf, tag);
        for (code, value) in pairs {
            w.u8(*code).cstr(value);
        }
        w.u8(0);
        w.finish();
    }
}

/// One column of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    pub name: &'a [u8],
    /// OID of the source table, 0 when the column is not a plain table column.
    pub table_oid: u32,
    /// Attribute number in that table, 0 otherwise.
    pub column_attnum: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_modifier: i32,
    pub format: i16,
}

/// RowDescription, its columns viewed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowDescription<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> RowDescription<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self> {
        let mut r = BodyReader::new(body, "RowDescription");
        let count = r.count16()?;
        let start = body.len() - r.remaining();
        for _ in 0..count {
            read_field(&mut r)?;
        }
        r.finish()?;
        Ok(RowDescription {
            count,
            raw: &body[start..],
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The field descriptions as received (after the field count).
    pub fn raw_fields(&self) -> &'a [u8] {
        self.raw
    }

    pub fn fields(&self) -> impl Iterator<Item = FieldDescription<'a>> + 'a {
        let mut r = BodyReader::new(self.raw, "RowDescription");
        let mut left = self.count;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            read_field(&mut r).ok()
        })
    }

    /// Appends a RowDescription built from field descriptions.
    pub fn encode_fields(buf: &mut Vec<u8>, fields: &[FieldDescription<'_>]) {
        let mut w = MessageWriter::typed(buf, tag::ROW_DESCRIPTION);
        w.i16(fields.len() as i16);
        for f in fields {
            w.cstr(f.name)
                .u32(f.table_oid)
                .i16(f.column_attnum)
                .u32(f.type_oid)
                .i16(f.type_len)
                .i32(f.type_modifier)
                .i16(f.format);
        }
        w.finish();
    }
}

fn read_field<'a>(r: &mut BodyReader<'a>) -> Result<FieldDescription<'a>> {
    Ok(FieldDescription {
        name: r.cstr()?,
        table_oid: r.u32()?,
        column_attnum: r.i16()?,
        type_oid: r.u32()?,
        type_len: r.i16()?,
        type_modifier: r.i32()?,
        format: r.i16()?,
    })
}

/// CopyInResponse / CopyOutResponse / CopyBothResponse: overall format (0 text,
/// 1 binary) and per-column formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResponse<'a> {
    pub format: u8,
    pub column_formats: Int16Array<'a>,
}

/// One backend message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication(Authentication<'a>),
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    /// BackendKeyData: the cancel key (4 bytes in 3.0, up to 256 in 3.2).
    BackendKeyData {
        process_id: u32,
        secret_key: &'a [u8],
    },
    ReadyForQuery(TransactionStatus),
    RowDescription(RowDescription<'a>),
    DataRow(ValueList<'a>),
    CommandComplete {
        tag: &'a str,
    },
    EmptyQueryResponse,
    ErrorResponse(Fields<'a>),
    NoticeResponse(Fields<'a>),
    CopyInResponse(CopyResponse<'a>),
    CopyOutResponse(CopyResponse<'a>),
    CopyBothResponse(CopyResponse<'a>),
    CopyData(&'a [u8]),
    CopyDone,
    NotificationResponse {
        process_id: u32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    ParameterDescription(OidArray<'a>),
    NoData,
    ParseComplete,
    BindComplete,
    CloseComplete,
    PortalSuspended,
    /// NegotiateProtocolVersion: newest minor version supported and the `_pq_.`
    /// options the server did not recognise.
    NegotiateProtocolVersion {
        newest_minor: u32,
        unsupported: NameList<'a>,
    },
    /// FunctionCallResponse: the result value, `None` for NULL.
    FunctionCallResponse(Option<&'a [u8]>),
}

impl<'a> BackendMessage<'a> {
    /// Decodes the body of a message with type byte `tag`.
    pub fn decode(tag: u8, body: &'a [u8]) -> Result<Self> {
        use BackendMessage as M;
        Ok(match tag {
            tag::AUTHENTICATION => M::Authentication(Authentication::decode(body)?),
            tag::PARAMETER_STATUS => {
                let (name, value) = decode_parameter_status(body)?;
                M::ParameterStatus { name, value }
            }
            tag::BACKEND_KEY_DATA => {
                let (process_id, secret_key) = decode_backend_key_data(body)?;
                M::BackendKeyData {
                    process_id,
                    secret_key,
                }
            }
            tag::READY_FOR_QUERY => {
                let mut r = BodyReader::new(body, "ReadyForQuery");
                let s = TransactionStatus::from_byte(r.u8()?)?;
                r.finish()?;
                M::ReadyForQuery(s)
            }
            tag::ROW_DESCRIPTION => M::RowDescription(RowDescription::decode(body)?),
            tag::DATA_ROW => {
                let mut r = BodyReader::new(body, "DataRow");
                let v = ValueList::read(&mut r, "DataRow")?;
                r.finish()?;
                M::DataRow(v)
            }
            tag::COMMAND_COMPLETE => M::CommandComplete {
                tag: decode_command_complete(body)?,
            },
            tag::EMPTY_QUERY_RESPONSE => empty(body, "EmptyQueryResponse", M::EmptyQueryResponse)?,
            tag::ERROR_RESPONSE => M::ErrorResponse(Fields::decode(body, "ErrorResponse")?),
            tag::NOTICE_RESPONSE => M::NoticeResponse(Fields::decode(body, "NoticeResponse")?),
            tag::COPY_IN_RESPONSE => M::CopyInResponse(copy_response(body)?),
            tag::COPY_OUT_RESPONSE => M::CopyOutResponse(copy_response(body)?),
            tag::COPY_BOTH_RESPONSE => M::CopyBothResponse(copy_response(body)?),
            tag::COPY_DATA => M::CopyData(body),
            tag::COPY_DONE => empty(body, "CopyDone", M::CopyDone)?,
            tag::NOTIFICATION_RESPONSE => {
                let mut r = BodyReader::new(body, "NotificationResponse");
                let m = M::NotificationResponse {
                    process_id: r.u32()?,
                    channel: r.cstr()?,
                    payload: r.cstr()?,
                };
                r.finish()?;
                m
            }
            tag::PARAMETER_DESCRIPTION => {
                let mut r = BodyReader::new(body, "ParameterDescription");
                let oids = OidArray::read(&mut r)?;
                r.finish()?;
                M::ParameterDescription(oids)
            }
            tag::NO_DATA => empty(body, "NoData", M::NoData)?,
            tag::PARSE_COMPLETE => empty(body, "ParseComplete", M::ParseComplete)?,
            tag::BIND_COMPLETE => empty(body, "BindComplete", M::BindComplete)?,
            tag::CLOSE_COMPLETE => empty(body, "CloseComplete", M::CloseComplete)?,
            tag::PORTAL_SUSPENDED => empty(body, "PortalSuspended", M::PortalSuspended)?,
            tag::NEGOTIATE_PROTOCOL_VERSION => {
                let (newest_minor, unsupported) = decode_negotiate_protocol_version(body)?;
                M::NegotiateProtocolVersion {
                    newest_minor,
                    unsupported,
                }
            }
            tag::FUNCTION_CALL_RESPONSE => {
                let mut r = BodyReader::new(body, "FunctionCallResponse");
                let v = r.value()?;
                r.finish()?;
                M::FunctionCallResponse(v)
            }
            _ => {
                return Err(WireError::UnknownTag {
                    tag,
                    direction: Direction::Backend,
                })
            }
        })
    }

    pub fn tag(&self) -> u8 {
        use BackendMessage as M;
        match self {
            M::Authentication(_) => tag::AUTHENTICATION,
            M::ParameterStatus { .. } => tag::PARAMETER_STATUS,
            M::BackendKeyData { .. } => tag::BACKEND_KEY_DATA,
            M::ReadyForQuery(_) => tag::READY_FOR_QUERY,
            M::RowDescription(_) => tag::ROW_DESCRIPTION,
            M::DataRow(_) => tag::DATA_ROW,
            M::CommandComplete { .. } => tag::COMMAND_COMPLETE,
            M::EmptyQueryResponse => tag::EMPTY_QUERY_RESPONSE,
            M::ErrorResponse(_) => tag::ERROR_RESPONSE,
            M::NoticeResponse(_) => tag::NOTICE_RESPONSE,
            M::CopyInResponse(_) => tag::COPY_IN_RESPONSE,
            M::CopyOutResponse(_) => tag::COPY_OUT_RESPONSE,
            M::CopyBothResponse(_) => tag::COPY_BOTH_RESPONSE,
            M::CopyData(_) => tag::COPY_DATA,
            M::CopyDone => tag::COPY_DONE,
            M::NotificationResponse { .. } => tag::NOTIFICATION_RESPONSE,
            M::ParameterDescription(_) => tag::PARAMETER_DESCRIPTION,
            M::NoData => tag::NO_DATA,
            M::ParseComplete => tag::PARSE_COMPLETE,
            M::BindComplete => tag::BIND_COMPLETE,
            M::CloseComplete => tag::CLOSE_COMPLETE,
            M::PortalSuspended => tag::PORTAL_SUSPENDED,
            M::NegotiateProtocolVersion { .. } => tag::NEGOTIATE_PROTOCOL_VERSION,
            M::FunctionCallResponse(_) => tag::FUNCTION_CALL_RESPONSE,
        }
    }

    /// Appends the whole message, tag and length included.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        use BackendMessage as M;
        let mut w = MessageWriter::typed(buf, self.tag());
        match self {
            M::Authentication(a) => a.write(&mut w),
            M::ParameterStatus { name, value } => {
                w.cstr(name).cstr(value);
            }
            M::BackendKeyData {
                process_id,
                secret_key,
            } => {
                w.u32(*process_id).bytes(secret_key);
            }
            M::ReadyForQuery(s) => {
                w.u8(s.byte());
            }
            M::RowDescription(rd) => {
                w.i16(rd.count as i16).bytes(rd.raw);
            }
            M::DataRow(v) => v.write(&mut w),
            M::CommandComplete { tag } => {
                w.cstr(tag.as_bytes());
            }
            M::ErrorResponse(f) | M::NoticeResponse(f) => {
                w.bytes(f.raw);
            }
            M::CopyInResponse(c) | M::CopyOutResponse(c) | M::CopyBothResponse(c) => {
                w.u8(c.format);
                c.column_formats.write(&mut w);
            }
            M::CopyData(d) => {
                w.bytes(d);
            }
            M::NotificationResponse {
                process_id,
                channel,
                payload,
            } => {
                w.u32(*process_id).cstr(channel).cstr(payload);
            }
            M::ParameterDescription(oids) => oids.write(&mut w),
            M::NegotiateProtocolVersion {
                newest_minor,
                unsupported,
            } => {
                w.u32(*newest_minor)
                    .i32(unsupported.len() as i32)
                    .bytes(unsupported.raw());
            }
            M::FunctionCallResponse(v) => {
                w.value(*v);
            }
            M::EmptyQueryResponse
            | M::CopyDone
            | M::NoData
            | M::ParseComplete
            | M::BindComplete
            | M::CloseComplete
            | M::PortalSuspended => {}
        }
        w.finish();
    }
}

fn empty<'a>(body: &[u8], what: &'static str, m: BackendMessage<'a>) -> Result<BackendMessage<'a>> {
    if body.is_empty() {
        Ok(m)
    } else {
        Err(WireError::malformed(what))
    }
}

fn copy_response(body: &[u8]) -> Result<CopyResponse<'_>> {
    let mut r = BodyReader::new(body, "Copy*Response");
    let format = r.u8()?;
    let column_formats = Int16Array::read(&mut r)?;
    r.finish()?;
    Ok(CopyResponse {
        format,
        column_formats,
    })
}

/// ParameterStatus body -> (name, value).
pub fn decode_parameter_status(body: &[u8]) -> Result<(&[u8], &[u8])> {
    let mut r = BodyReader::new(body, "ParameterStatus");
    let name = r.cstr()?;
    let value = r.cstr()?;
    r.finish()?;
    Ok((name, value))
}

/// BackendKeyData body -> (process id, secret key of 4..=256 bytes).
pub fn decode_backend_key_data(body: &[u8]) -> Result<(u32, &[u8])> {
    let mut r = BodyReader::new(body, "BackendKeyData");
    let pid = r.u32()?;
    let key = r.rest();
    if key.len() < 4 || key.len() > crate::startup::MAX_CANCEL_KEY_LEN {
        return Err(WireError::malformed("BackendKeyData secret key length"));
    }
    Ok((pid, key))
}

/// CommandComplete body -> command tag, e.g. `SELECT 5`, `INSERT 0 1`.
pub fn decode_command_complete(body: &[u8]) -> Result<&str> {
    let mut r = BodyReader::new(body, "CommandComplete");
    let t = r.cstr_utf8()?;
    r.finish()?;
    Ok(t)
}

/// The row count a command tag reports, if any: `SELECT n`, `INSERT oid n`, `UPDATE n`,
/// `DELETE n`, `MERGE n`, `COPY n`, `FETCH n`, `MOVE n`.
pub fn command_tag_rows(tag: &str) -> Option<u64> {
    let (verb, rest) = tag.split_once(' ')?;
    match verb {
        "SELECT" | "UPDATE" | "DELETE" | "MERGE" | "COPY" | "FETCH" | "MOVE" => rest.parse().ok(),
        "INSERT" => rest.split_once(' ')?.1.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framer::FrameIter;

    fn encoded(m: &BackendMessage<'_>) -> Vec<u8> {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        buf
    }

    fn roundtrip(m: BackendMessage<'_>) {
        let buf = encoded(&m);
        let mut it = FrameIter::new(&buf, 1 << 30);
        let f = it.next().unwrap().unwrap();
        assert!(it.next().is_none());
        assert_eq!(f.tag, m.tag());
        assert_eq!(BackendMessage::decode(f.tag, f.body).unwrap(), m);
    }

    fn decode_bytes(bytes: &[u8]) -> BackendMessage<'_> {
        let f = FrameIter::new(bytes, 1 << 30).next().unwrap().unwrap();
        BackendMessage::decode(f.tag, f.body).unwrap()
    }

    #[test]
    fn authentication_roundtrips() {
        use Authentication as A;
        for a in [
            A::Ok,
            A::KerberosV5,
            A::CleartextPassword,
            A::Md5Password { salt: [1, 2, 3, 4] },
            A::Gss,
            A::GssContinue(b"tok"),
            A::Sspi,
            A::SaslContinue(b"r=abc,s=def,i=4096"),
            A::SaslFinal(b"v=xyz"),
        ] {
            roundtrip(BackendMessage::Authentication(a));
        }
        // AuthenticationSASL as PostgreSQL 16 sends it (captured).
        let bytes = b"R\x00\x00\x00\x2a\x00\x00\x00\x0aSCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00";
        let m = decode_bytes(bytes);
        let BackendMessage::Authentication(Authentication::Sasl(names)) = m else {
            panic!("{m:?}")
        };
        assert_eq!(
            names.iter().collect::<Vec<_>>(),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
        assert_eq!(encoded(&m), bytes.to_vec());
        assert_eq!(split_authentication(&bytes[5..]).unwrap().0, 10);
    }

    #[test]
    fn every_message_roundtrips() {
        use BackendMessage as M;
        roundtrip(M::ParameterStatus {
            name: b"server_version",
            value: b"17.2",
        });
        roundtrip(M::BackendKeyData {
            process_id: 99,
            secret_key: &[1, 2, 3, 4],
        });
        roundtrip(M::BackendKeyData {
            process_id: 99,
            secret_key: &[7; 32],
        });
        for s in [
            TransactionStatus::Idle,
            TransactionStatus::InTransaction,
            TransactionStatus::Failed,
        ] {
            roundtrip(M::ReadyForQuery(s));
        }
        let mut rd = Vec::new();
        let fd = FieldDescription {
            name: b"aid",
            table_oid: 16_390,
            column_attnum: 1,
            type_oid: 23,
            type_len: 4,
            type_modifier: -1,
            format: 0,
        };
        RowDescription::encode_fields(
            &mut rd,
            &[
                fd,
                FieldDescription {
                    name: b"abalance",
                    ..fd
                },
            ],
        );
        let m = decode_bytes(&rd);
        let M::RowDescription(desc) = m else { panic!() };
        assert_eq!(desc.fields().nth(1).unwrap().name, b"abalance");
        roundtrip(m);
        let mut row = Vec::new();
        let mut w = MessageWriter::typed(&mut row, b'D');
        crate::arrays::write_values(&mut w, &[Some(b"1"), None, Some(b"")]);
        w.finish();
        let m = decode_bytes(&row);
        let M::DataRow(v) = m else { panic!() };
        assert_eq!(
            v.iter().collect::<Vec<_>>(),
            vec![Some(&b"1"[..]), None, Some(&b""[..])]
        );
        roundtrip(m);
        roundtrip(M::CommandComplete { tag: "SELECT 1" });
        roundtrip(M::EmptyQueryResponse);
        let mut e = Vec::new();
        Fields::encode_pairs(
            &mut e,
            b'E',
            &[
                (b'S', b"ERROR"),
                (b'V', b"ERROR"),
                (b'C', b"42P01"),
                (b'M', b"relation \"x\" does not exist"),
            ],
        );
        let m = decode_bytes(&e);
        let M::ErrorResponse(f) = m else { panic!() };
        assert_eq!(f.get(field::SQLSTATE), Some(&b"42P01"[..]));
        assert_eq!(f.severity(), Some(&b"ERROR"[..]));
        roundtrip(m);
        let mut n = Vec::new();
        Fields::encode_pairs(&mut n, b'N', &[(b'S', b"NOTICE"), (b'M', b"hi")]);
        roundtrip(decode_bytes(&n));
        let mut cr = Vec::new();
        let mut w = MessageWriter::typed(&mut cr, b'G');
        w.u8(0);
        crate::arrays::write_i16s(&mut w, &[0, 0]);
        w.finish();
        for t in [b'G', b'H', b'W'] {
            cr[0] = t;
            roundtrip(decode_bytes(&cr));
        }
        roundtrip(M::CopyData(b"1\t2\n"));
        roundtrip(M::CopyDone);
        roundtrip(M::NotificationResponse {
            process_id: 5,
            channel: b"jobs",
            payload: b"{}",
        });
        let mut pd = Vec::new();
        let mut w = MessageWriter::typed(&mut pd, b't');
        crate::arrays::write_oids(&mut w, &[23, 25]);
        w.finish();
        roundtrip(decode_bytes(&pd));
        for m in [
            M::NoData,
            M::ParseComplete,
            M::BindComplete,
            M::CloseComplete,
            M::PortalSuspended,
        ] {
            roundtrip(m);
        }
        let mut nv = Vec::new();
        let mut w = MessageWriter::typed(&mut nv, b'v');
        w.u32(0).i32(1).cstr(b"_pq_.test");
        w.finish();
        let m = decode_bytes(&nv);
        let M::NegotiateProtocolVersion { unsupported, .. } = m else {
            panic!()
        };
        assert_eq!(unsupported.iter().collect::<Vec<_>>(), vec!["_pq_.test"]);
        roundtrip(m);
        // An empty option name is still one entry (found by fuzz_messages).
        let m = decode_bytes(b"v\0\0\0\x0d\0\0\0\0\0\0\0\x01\0");
        let M::NegotiateProtocolVersion { unsupported, .. } = m else {
            panic!()
        };
        assert_eq!(unsupported.iter().collect::<Vec<_>>(), vec![""]);
        roundtrip(m);
        roundtrip(M::FunctionCallResponse(Some(b"\0\0\0\x07")));
        roundtrip(M::FunctionCallResponse(None));
    }

    #[test]
    fn ready_for_query_capture() {
        assert_eq!(
            decode_bytes(b"Z\x00\x00\x00\x05I"),
            BackendMessage::ReadyForQuery(TransactionStatus::Idle)
        );
    }

    #[test]
    fn command_tags() {
        assert_eq!(command_tag_rows("SELECT 5"), Some(5));
        assert_eq!(command_tag_rows("INSERT 0 3"), Some(3));
        assert_eq!(command_tag_rows("COPY 100"), Some(100));
        assert_eq!(command_tag_rows("UPDATE 0"), Some(0));
        assert_eq!(command_tag_rows("CREATE TABLE"), None);
        assert_eq!(command_tag_rows("BEGIN"), None);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for (tag, body) in [
            (b'R', &b"\0\0\0"[..]),
            (b'R', b"\0\0\0\x05\x01"),
            (b'R', b"\0\0\0\x63"),
            (b'Z', b"X"),
            (b'Z', b"II"),
            (b'T', b"\0\x01a\0"),
            (b'D', b"\0\x01\0\0\0\x09ab"),
            (b'E', b"Sfoo"),
            (b'K', b"\0\0\0\x01\0"),
            (b'v', b"\0\0\0\0\xff\xff\xff\xff"),
            (b'1', b"x"),
        ] {
            assert!(BackendMessage::decode(tag, body).is_err(), "{tag} {body:?}");
        }
        assert!(matches!(
            BackendMessage::decode(b'?', b""),
            Err(WireError::UnknownTag {
                direction: Direction::Backend,
                ..
            })
        ));
    }
}

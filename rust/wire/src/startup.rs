//! Untyped startup-phase packets a client sends first: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage (protocol 3.x, `_pq_.` options included).

use crate::error::{Result, WireError};
use crate::reader::BodyReader;
use crate::writer::MessageWriter;

/// SSLRequest code (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest code (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// CancelRequest code (1234.5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, the version every client since PostgreSQL 7.4 speaks.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Protocol 3.2 (PostgreSQL 18): variable-length cancel keys.
pub const PROTOCOL_3_2: u32 = (3 << 16) | 2;
/// Longest cancel key allowed by protocol 3.2.
pub const MAX_CANCEL_KEY_LEN: usize = 256;
/// Prefix of protocol options in a StartupMessage (negotiated via NegotiateProtocolVersion).
pub const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// Length field + request code: the shortest valid startup packet.
const MIN_STARTUP_LEN: usize = 8;

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket<'a> {
    /// SSLRequest: the client asks for TLS; answered with a single `S` or `N` byte.
    SslRequest,
    /// GSSENCRequest: the client asks for GSSAPI encryption; a gateway answers `N`.
    GssEncRequest,
    /// CancelRequest: process id and secret key from BackendKeyData.  The key is 4
    /// bytes in protocol 3.0 and up to 256 bytes in 3.2.
    CancelRequest {
        process_id: u32,
        secret_key: &'a [u8],
    },
    /// StartupMessage: protocol version and parameters in wire order.
    Startup(StartupMessage<'a>),
}

/// StartupMessage: protocol `major.minor` and `name=value` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(&'a str, &'a str)>,
}

impl<'a> StartupMessage<'a> {
    /// The value of a parameter (the first one, if a client sends it twice).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }

    /// `_pq_.*` protocol options, which a server that does not know them must list in
    /// NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> impl Iterator<Item = &(&'a str, &'a str)> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with(PROTOCOL_OPTION_PREFIX))
    }
}

/// Decodes one startup packet from the front of `buf`.
///
/// Returns `Ok(None)` while more bytes are needed, `Ok(Some((packet, consumed)))` once a
/// whole packet is there.  The announced length is checked against `max_len` as soon as
/// its 4 bytes arrive, so an absurd length is refused before anything is buffered.
pub fn read_startup(buf: &[u8], max_len: usize) -> Result<Option<(StartupPacket<'_>, usize)>> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    if (len as usize) < MIN_STARTUP_LEN {
        return Err(WireError::TooShort {
            len: i64::from(len),
            min: MIN_STARTUP_LEN as u32,
        });
    }
    if len as usize > max_len {
        return Err(WireError::TooLong {
            len: u64::from(len),
            limit: max_len,
        });
    }
    let len = len as usize;
    let Some(packet) = buf.get(4..len) else {
        return Ok(None);
    };
    decode_startup_body(packet).map(|p| Some((p, len)))
}

/// Decodes a startup packet body (everything after the length field).
pub fn decode_startup_body(body: &[u8]) -> Result<StartupPacket<'_>> {
    let mut r = BodyReader::new(body, "startup packet");
    let code = r.u32()?;
    match code {
        SSL_REQUEST_CODE => {
            r.finish()?;
            Ok(StartupPacket::SslRequest)
        }
        GSSENC_REQUEST_CODE => {
            r.finish()?;
            Ok(StartupPacket::GssEncRequest)
        }
        CANCEL_REQUEST_CODE => {
            let mut r = BodyReader::new(&body[4..], "CancelRequest");
            let process_id = r.u32()?;
            let secret_key = r.rest();
            if secret_key.len() < 4 || secret_key.len() > MAX_CANCEL_KEY_LEN {
                return Err(WireError::malformed("CancelRequest secret key length"));
            }
            Ok(StartupPacket::CancelRequest {
                process_id,
                secret_key,
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xFFFF) as u16;
            if major == 1234 {
                return Err(WireError::UnknownRequestCode(code));
            }
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
            let params = decode_params(&body[4..])?;
            Ok(StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
            }))
        }
    }
}

/// StartupMessage parameters: `name\0value\0` pairs ended by an empty name.
fn decode_params(body: &[u8]) -> Result<Vec<(&str, &str)>> {
    let mut r = BodyReader::new(body, "StartupMessage parameters");
    let mut params = Vec::new();
    loop {
        let name = r.cstr_utf8()?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr_utf8()?;
        params.push((name, value));
    }
    r.finish()?;
    Ok(params)
}

impl StartupPacket<'_> {
    /// Appends the whole packet, length included.
    pub fn encode(&self, buf: &mut Vec<u8>) {
        let mut w = MessageWriter::untyped(buf);
        match self {
            StartupPacket::SslRequest => {
                w.u32(SSL_REQUEST_CODE);
            }
            StartupPacket::GssEncRequest => {
                w.u32(GSSENC_REQUEST_CODE);
            }
            StartupPacket::CancelRequest {
                process_id,
                secret_key,
            } => {
                w.u32(CANCEL_REQUEST_CODE)
                    .u32(*process_id)
                    .bytes(secret_key);
            }
            StartupPacket::Startup(m) => {
                w.u32((u32::from(m.major) << 16) | u32::from(m.minor));
                for (k, v) in &m.params {
                    w.cstr(k.as_bytes()).cstr(v.as_bytes());
                }
                w.u8(0);
            }
        }
        w.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(p: StartupPacket<'_>) {
        let mut buf = Vec::new();
        p.encode(&mut buf);
        let (q, n) = read_startup(&buf, 10_000).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(p, q);
    }

    #[test]
    fn roundtrips() {
        roundtrip(StartupPacket::SslRequest);
        roundtrip(StartupPacket::GssEncRequest);
        roundtrip(StartupPacket::CancelRequest {
            process_id: 4242,
            secret_key: &[1, 2, 3, 4],
        });
        roundtrip(StartupPacket::CancelRequest {
            process_id: 7,
            secret_key: &[9; 256],
        });
        roundtrip(StartupPacket::Startup(StartupMessage {
            major: 3,
            minor: 2,
            params: vec![("user", "alice"), ("_pq_.test", "x"), ("options", "")],
        }));
    }

    #[test]
    fn psql_ssl_request_capture() {
        let bytes = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(
            read_startup(&bytes, 10_000).unwrap(),
            Some((StartupPacket::SslRequest, 8))
        );
    }

    #[test]
    fn startup_capture_with_grease() {
        // libpq 18 greasing: version 3.9999 and a `_pq_.` option nobody implements.
        let mut buf = Vec::new();
        let mut w = MessageWriter::untyped(&mut buf);
        w.u32((3 << 16) | 9999)
            .cstr(b"user")
            .cstr(b"postgres")
            .cstr(b"database")
            .cstr(b"app")
            .cstr(b"_pq_.test_protocol_negotiation")
            .cstr(b"")
            .u8(0);
        w.finish();
        let (p, _) = read_startup(&buf, 10_000).unwrap().unwrap();
        let StartupPacket::Startup(m) = p else {
            panic!("not a startup message")
        };
        assert_eq!((m.major, m.minor), (3, 9999));
        assert_eq!(m.param("database"), Some("app"));
        assert_eq!(m.protocol_options().count(), 1);
    }

    #[test]
    fn incomplete_needs_more() {
        let mut buf = Vec::new();
        StartupPacket::SslRequest.encode(&mut buf);
        for i in 0..buf.len() {
            assert_eq!(read_startup(&buf[..i], 10_000).unwrap(), None);
        }
    }

    #[test]
    fn oversized_refused_on_first_four_bytes() {
        let err = read_startup(&[0x7f, 0xff, 0xff, 0xff], 10_000).unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }));
        let err = read_startup(&[0, 0, 0, 7], 10_000).unwrap_err();
        assert!(matches!(err, WireError::TooShort { len: 7, .. }));
    }

    #[test]
    fn bad_codes() {
        let pkt = |code: u32, tail: &[u8]| {
            let mut buf = Vec::new();
            let mut w = MessageWriter::untyped(&mut buf);
            w.u32(code).bytes(tail);
            w.finish();
            buf
        };
        assert_eq!(
            read_startup(&pkt(1234 << 16 | 9999, b""), 10_000).unwrap_err(),
            WireError::UnknownRequestCode(1234 << 16 | 9999)
        );
        assert_eq!(
            read_startup(&pkt(2 << 16, b"\0"), 10_000).unwrap_err(),
            WireError::UnsupportedProtocol { major: 2, minor: 0 }
        );
        // Parameters without the final empty name.
        assert!(read_startup(&pkt(PROTOCOL_3_0, b"user\0a\0"), 10_000).is_err());
        // Cancel key too short / too long.
        assert!(read_startup(&pkt(CANCEL_REQUEST_CODE, &[0; 7]), 10_000).is_err());
        assert!(read_startup(&pkt(CANCEL_REQUEST_CODE, &[0; 261]), 10_000).is_err());
        // SSLRequest with trailing bytes.
        assert!(read_startup(&pkt(SSL_REQUEST_CODE, b"x"), 10_000).is_err());
    }
}

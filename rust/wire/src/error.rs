//! The one error type of the codec: malformed, oversized or unexpected wire input.

use std::fmt;

/// Which peer sent the bytes that failed to decode.  The same tag byte means different
/// messages in each direction (`'D'` is Describe from a client, DataRow from a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (frontend messages).
    Frontend,
    /// Server to client (backend messages).
    Backend,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Frontend => "client",
            Direction::Backend => "server",
        })
    }
}

/// Every way wire input can be refused.  Decoding never panics; it returns one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid message length {len} (minimum is {min})")]
    TooShort { len: i64, min: u32 },
    #[error("message length {len} exceeds the limit of {limit} bytes")]
    TooLong { len: u64, limit: usize },
    #[error("unknown startup request code {0}")]
    UnknownRequestCode(u32),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("unknown {direction} message type 0x{tag:02x}")]
    UnknownTag { tag: u8, direction: Direction },
    #[error("more than {limit} requests pipelined without reading responses")]
    PipelineTooDeep { limit: usize },
    /// Not a wire fault: the statement's audit record could not be stored (strict
    /// audit), so the statement must not be forwarded.
    #[error(transparent)]
    Audit(#[from] crate::audit_spool::SpoolError),
}

impl WireError {
    pub(crate) fn malformed(what: &'static str) -> Self {
        WireError::Malformed { what }
    }
}

pub type Result<T, E = WireError> = std::result::Result<T, E>;

//! Events the relay reports per chunk: what the policy and the session need to see,
//! without a Python object per message.

use std::sync::Arc;

use crate::backend::TransactionStatus;

/// Client-to-server events.  `start..end` is the message's byte range in the bytes the
/// call returned for forwarding: the place a policy can cut a statement out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Query (simple protocol).  `n`: its number in the audit (the `stmt` record's `n`),
    /// 0 when audit is off or nothing was recorded.
    Query {
        sql: Arc<str>,
        n: u64,
        start: usize,
        end: usize,
    },
    /// Parse: a statement prepared under `name` ("" = unnamed).
    Parse {
        name: Box<str>,
        sql: Arc<str>,
        start: usize,
        end: usize,
    },
    /// Execute of `portal`; `sql` is the text of the statement the portal was bound
    /// from, empty when the portal is unknown; `n` as for `Query`.
    Execute {
        portal: Box<str>,
        sql: Arc<str>,
        n: u64,
        start: usize,
        end: usize,
    },
    /// FunctionCall (fast-path) of the function with this OID.
    FunctionCall {
        function_oid: u32,
        start: usize,
        end: usize,
    },
    /// Terminate: the client is closing the session.
    Terminate { start: usize, end: usize },
}

/// Server-to-client events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// ReadyForQuery with its transaction status.
    Ready(TransactionStatus),
    /// ErrorResponse: severity (non-localized when sent), SQLSTATE, message.
    Error {
        severity: String,
        sqlstate: String,
        message: String,
    },
}

/// Event kind numbers shared with the Python binding (first element of each tuple).
pub mod kind {
    pub const QUERY: u8 = 1;
    pub const PARSE: u8 = 2;
    pub const EXECUTE: u8 = 3;
    pub const FUNCTION_CALL: u8 = 4;
    pub const TERMINATE: u8 = 5;
    pub const READY: u8 = 10;
    pub const ERROR: u8 = 11;
}

//! [`SessionAudit`]: the audit records of one session's statements, written to the
//! process's [`AuditSpool`] by the codec itself.
//!
//! A statement gets a `stmt` record when its message is framed, before the bytes that
//! carry it are handed back for forwarding: a caller that forwards only what the codec
//! returns can never run a statement that has no record.  It gets an `end` record when
//! the server finishes it (tag, rows, SQLSTATE, duration and, when recording, the result
//! as the client saw it).  Both carry the session id and the statement's number in the
//! session (`n`), which is how a reader pairs them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use crate::audit_record::RecordBody;
use crate::audit_spool::{Admission, AuditSpool, SpoolError};
use crate::capture::{Capture, CaptureLimits};
use crate::record::json_str;

/// What a session's codec needs to write audit records.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub spool: Arc<AuditSpool>,
    /// The session id the gateway gave this connection.
    pub session_id: String,
    /// Put Bind parameter values / FunctionCall arguments in `stmt` records.
    pub record_params: bool,
    /// Caps of the result kept in `end` records (`max_bytes` 0: no recording).
    pub capture: CaptureLimits,
    /// Refuse a statement whose record cannot be stored (strict mode).
    pub strict: bool,
}

/// What is known when a statement is sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatementStart<'a> {
    /// When the statement was sent (the record's `ts`).
    pub(crate) at: SystemTime,
    pub(crate) protocol: &'static str,
    pub(crate) sql: Option<&'a str>,
    /// Pre-rendered JSON array of parameter values.
    pub(crate) params: Option<&'a str>,
    pub(crate) function_oid: Option<u32>,
}

/// What is known when it ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StatementEnd<'a> {
    pub(crate) n: u64,
    /// When the statement was sent (wall clock), and how long ago.
    pub(crate) started_at: SystemTime,
    pub(crate) elapsed: Duration,
    pub(crate) command_tag: Option<&'a str>,
    pub(crate) rows: Option<u64>,
    /// DataRows forwarded to the client.
    pub(crate) data_rows: u64,
    pub(crate) error: Option<(&'a str, &'a str)>,
    /// A RowDescription sent earlier for this statement's text (Describe), when the
    /// result itself has none.
    pub(crate) columns: Option<&'a [u8]>,
    /// Table columns masked in the results (`schema.table.column`, `*` for rows masked
    /// whole).
    pub(crate) masked_columns: &'a [std::sync::Arc<str>],
}

#[derive(Debug)]
pub(crate) struct SessionAudit {
    config: AuditConfig,
    session_json: String,
    last_n: u64,
    /// Records this session could not store (relaxed mode, or ends after a failure).
    dropped: u64,
}

impl SessionAudit {
    pub(crate) fn new(config: AuditConfig) -> Self {
        let mut s = Vec::new();
        json_str(&mut s, &config.session_id);
        SessionAudit {
            session_json: String::from_utf8(s).expect("JSON is UTF-8"),
            config,
            last_n: 0,
            dropped: 0,
        }
    }

    pub(crate) fn record_params(&self) -> bool {
        self.config.record_params
    }

    /// Results are recorded.
    pub(crate) fn captures(&self) -> bool {
        self.config.capture.enabled()
    }

    /// The caps of a statement's capture, when results are recorded.
    pub(crate) fn capture_limits(&self) -> Option<CaptureLimits> {
        self.config.capture.enabled().then_some(self.config.capture)
    }

    /// Writes the `stmt` record; returns the statement's number.  In strict mode a
    /// record that cannot be stored is an error: the statement must not be forwarded.
    pub(crate) fn started(&mut self, s: StatementStart<'_>) -> Result<u64, SpoolError> {
        let n = self.last_n + 1;
        let session = &self.session_json;
        let result = self
            .config
            .spool
            .append_at("stmt", Admission::New, s.at, |b| {
                b.raw("session", session.as_bytes());
                b.u64("n", n);
                let v = b.key("protocol");
                v.push(b'"');
                v.extend_from_slice(s.protocol.as_bytes());
                v.push(b'"');
                if let Some(sql) = s.sql {
                    b.str("sql", sql);
                }
                if let Some(oid) = s.function_oid {
                    b.u64("function_oid", u64::from(oid));
                }
                if let (true, Some(p)) = (self.config.record_params, s.params) {
                    b.raw("params", p.as_bytes());
                }
            });
        self.last_n = n;
        match result {
            Ok(_) => Ok(n),
            Err(e) if self.config.strict => Err(e),
            Err(_) => {
                self.dropped += 1;
                Ok(n)
            }
        }
    }

    /// Writes the `end` record.  It cannot refuse anything any more: a failure is
    /// counted (the reader closes the statement when the session or stream ends).
    pub(crate) fn ended(&mut self, e: StatementEnd<'_>, capture: Option<&Capture>) {
        let session = &self.session_json;
        let at = e.started_at + e.elapsed;
        let result = self
            .config
            .spool
            .append_at("end", Admission::Continuation, at, |b| {
                end_members(b, session, &e, capture);
            });
        if result.is_err() {
            self.dropped += 1;
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }
}

fn end_members(b: &mut RecordBody, session: &str, e: &StatementEnd<'_>, capture: Option<&Capture>) {
    b.raw("session", session.as_bytes());
    b.u64("n", e.n);
    b.u64("duration_us", e.elapsed.as_micros() as u64);
    b.opt_str("command_tag", e.command_tag);
    match e.rows {
        Some(r) => b.u64("rows", r),
        None => b.raw("rows", b"null"),
    }
    b.u64("data_rows", e.data_rows);
    match e.error {
        Some((state, message)) => {
            b.str("sqlstate", state);
            b.str("error", message);
        }
        None => b.raw("sqlstate", b"null"),
    }
    if !e.masked_columns.is_empty() {
        let v = b.key("masked_columns");
        v.push(b'[');
        for (i, name) in e.masked_columns.iter().enumerate() {
            if i > 0 {
                v.push(b',');
            }
            crate::record::json_str(v, name);
        }
        v.push(b']');
    }
    if let Some(c) = capture {
        let bytes = c.bytes();
        if let Some(columns) = e.columns {
            if bytes.first() != Some(&crate::backend::tag::ROW_DESCRIPTION) {
                push_base64(b.key("columns"), columns);
            }
        }
        push_base64(b.key("result"), bytes);
        let (rows, bytes) = c.omitted();
        if rows > 0 || bytes > 0 {
            let v = b.key("result_omitted");
            v.extend_from_slice(format!("{{\"rows\":{rows},\"bytes\":{bytes}}}").as_bytes());
        }
    }
}

/// Appends `bytes` as a base64 JSON string.
fn push_base64(v: &mut Vec<u8>, bytes: &[u8]) {
    v.push(b'"');
    let start = v.len();
    v.resize(
        start + base64::encoded_len(bytes.len(), true).unwrap_or(0),
        0,
    );
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut v[start..])
        .unwrap_or(0);
    v.truncate(start + written);
    v.push(b'"');
}

//! Audit records to spans.  One trace per session: the session span (kind SERVER) is the
//! parent of one span per statement (kind CLIENT), whatever the protocol; a refused
//! connection is a session span with an error status.  Ids come from [`crate::ids`] and
//! times from the records, so rebuilding a span from the same records gives the same span.
//! docs/audit.md lists every attribute.

use std::borrow::Cow;

use pgwarden_wire::otlp::{encode_attributes, encode_framed_span, AnyValue, SpanData};
use serde_json::Value;

use crate::assembler::QueryInfo;
use crate::ids;
use crate::records::{Line, SessionRec, StmtRec};

pub const DB_SYSTEM: &str = "postgresql";
pub const SESSION_SPAN_NAME: &str = "pgwarden session";
pub const INTERRUPTED: &str = "interrupted";
const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

/// An attribute value the spans carry (borrowed from the records where possible).
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Bool(bool),
    Double(f64),
    StrList(Vec<String>),
}

impl Val<'_> {
    pub fn any(&self) -> AnyValue<'_> {
        match self {
            Val::Str(s) => AnyValue::Str(s),
            Val::Int(i) => AnyValue::Int(*i),
            Val::Bool(b) => AnyValue::Bool(*b),
            Val::Double(d) => AnyValue::Double(*d),
            Val::StrList(v) => AnyValue::Array(v.iter().map(|s| AnyValue::Str(s)).collect()),
        }
    }
}

/// Attributes in insertion order.
#[derive(Debug, Clone, Default)]
pub struct Attrs<'a>(pub Vec<(Cow<'static, str>, Val<'a>)>);

impl<'a> Attrs<'a> {
    fn put(&mut self, key: &'static str, value: Val<'a>) {
        self.0.push((Cow::Borrowed(key), value));
    }

    fn str(&mut self, key: &'static str, value: impl Into<Cow<'a, str>>) {
        self.put(key, Val::Str(value.into()));
    }

    pub fn pairs(&self) -> Vec<(&str, AnyValue<'_>)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.any())).collect()
    }

    pub fn get(&self, key: &str) -> Option<&Val<'a>> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// A span ready to encode.
#[derive(Debug, Clone)]
pub struct Span<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: Cow<'a, str>,
    pub kind: i32,
    pub start_us: u64,
    pub end_us: u64,
    /// Attributes shared with other spans, already encoded (a session's).
    pub shared: &'a [u8],
    pub attrs: Attrs<'a>,
    pub status: Option<Cow<'a, str>>,
}

impl Span<'_> {
    /// Appends the span as one framed `ScopeSpans.spans` element.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (status_code, status_message) = match &self.status {
            Some(m) => (STATUS_ERROR, m.as_ref()),
            None => (0, ""),
        };
        encode_framed_span(
            out,
            &SpanData {
                trace_id: self.trace_id,
                span_id: self.span_id,
                parent: self.parent.map(|p| (p, false)),
                name: &self.name,
                kind: self.kind,
                start_unix_nano: self.start_us.saturating_mul(1000),
                end_unix_nano: self.end_us.saturating_mul(1000),
                raw_attributes: self.shared,
                attributes: self.attrs.pairs(),
                status_code,
                status_message,
                ..SpanData::default()
            },
        );
    }
}

/// Python's truthiness for a JSON value (the records are written by Python and Rust alike).
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Python's `str()` of a JSON value.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

fn some(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// db.system.name, db.namespace, server.address/port, client.address.
fn connection<'a>(
    out: &mut Attrs<'a>,
    database: Option<&'a str>,
    server_address: Option<&'a str>,
    server_port: Option<i64>,
    client_address: Option<&'a str>,
) {
    out.str("db.system.name", DB_SYSTEM);
    if let Some(d) = some(database) {
        out.str("db.namespace", d);
    }
    if let Some(a) = some(server_address) {
        out.str("server.address", a);
    }
    if let Some(p) = server_port.filter(|p| *p != 0) {
        out.put("server.port", Val::Int(p));
    }
    if let Some(c) = some(client_address) {
        out.str("client.address", c);
    }
}

/// user.id / user.name / user.roles / user.email and the identity's issuer, rule, grant.
fn identity<'a>(out: &mut Attrs<'a>, user: Option<&'a Value>, upstream_user: Option<&'a str>) {
    let field = |name: &str| -> Option<String> {
        match user? {
            Value::String(s) if name == "name" && !s.is_empty() => Some(s.clone()),
            Value::Object(o) => o.get(name).filter(|v| truthy(v)).map(text),
            _ => None,
        }
    };
    if let Some(id) = field("id").or_else(|| field("name")) {
        out.str("user.id", id);
    }
    if let Some(name) = field("name") {
        out.str("user.name", name);
    }
    if let Some(Value::Array(roles)) = user.and_then(|u| u.get("roles")) {
        if !roles.is_empty() {
            out.put("user.roles", Val::StrList(roles.iter().map(text).collect()));
        }
    }
    for (key, attr) in [
        ("email", "user.email"),
        ("issuer", "pgwarden.identity.issuer"),
        ("rule", "pgwarden.identity.rule"),
        ("grant", "pgwarden.identity.grant"),
    ] {
        if let Some(v) = field(key) {
            out.str(attr, v);
        }
    }
    if let Some(u) = some(upstream_user) {
        out.str("pgwarden.upstream.role", u);
    }
}

/// Who a session is: its connection and identity, from a `session` or `refused` record.
pub struct Who<'a> {
    pub database: Option<&'a str>,
    pub server_address: Option<&'a str>,
    pub server_port: Option<i64>,
    pub client_address: Option<&'a str>,
    pub user: Option<&'a Value>,
    pub upstream_user: Option<&'a str>,
}

/// A [`Who`] borrowed from a record with the connection and identity fields (a `session`
/// or `refused` line, or the session it opened, kept across batches).
macro_rules! who_of {
    ($record:expr) => {
        Who {
            database: $record.database.as_deref(),
            server_address: $record.server_address.as_deref(),
            server_port: $record.server_port,
            client_address: $record.client_address.as_deref(),
            user: $record.user.as_ref(),
            upstream_user: $record.upstream_user.as_deref(),
        }
    };
}

impl SessionRec {
    pub fn who(&self) -> Who<'_> {
        who_of!(self)
    }
}

impl<'a> Line<'a> {
    pub fn who(&'a self) -> Who<'a> {
        who_of!(self)
    }
}

/// The connection and identity attributes, and the session id.
fn session_attrs<'a>(out: &mut Attrs<'a>, who: &Who<'a>, sid: &'a str) {
    connection(
        out,
        who.database,
        who.server_address,
        who.server_port,
        who.client_address,
    );
    identity(out, who.user, who.upstream_user);
    out.str("pgwarden.session.id", sid);
}

fn spool<'a>(out: &mut Attrs<'a>, stream: &'a str, seq: u64, hash: &'a str, verified: bool) {
    out.str("pgwarden.spool.stream", stream);
    out.put("pgwarden.spool.seq", Val::Int(seq as i64));
    out.str("pgwarden.chain.hash", hash);
    out.put("pgwarden.chain.verified", Val::Bool(verified));
}

/// The command of a CommandComplete tag: 'INSERT 0 1' -> 'INSERT', 'CREATE TABLE'.
pub fn verb(tag: Option<&str>) -> Option<Cow<'_, str>> {
    let tag = tag?;
    let number = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit());
    // The usual shape: the words, then the counts ("INSERT 0 1"): a slice of the tag.
    let mut end = tag.len();
    while let Some(space) = tag[..end].rfind(' ') {
        if !number(&tag[space + 1..end]) {
            break;
        }
        end = space;
    }
    let head = &tag[..end];
    if number(head) {
        return None;
    }
    if !head.split(' ').any(number) {
        return (!head.is_empty()).then_some(Cow::Borrowed(head));
    }
    let joined = tag
        .split(' ')
        .filter(|w| !number(w))
        .collect::<Vec<_>>()
        .join(" ");
    (!joined.is_empty()).then_some(Cow::Owned(joined))
}
/// The per-session part of every statement span, encoded once per session.
#[derive(Debug, Clone)]
pub struct SessionBase {
    /// connection, identity and session id attributes, encoded.
    pub encoded: Vec<u8>,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    statement_ids: ids::StatementIds,
    database: Option<String>,
    server: Option<String>,
    /// The statement policy of the session (see [`SessionRec::policy_version`]).
    policy_version: Option<String>,
}

impl SessionBase {
    pub fn new(session: Option<&SessionRec>, sid: &str) -> Self {
        let empty = SessionRec::default();
        let s = session.unwrap_or(&empty);
        let mut attrs = Attrs::default();
        session_attrs(&mut attrs, &s.who(), sid);
        let mut encoded = Vec::new();
        encode_attributes(&mut encoded, &attrs.pairs());
        let server = some(s.server_address.as_deref())
            .map(|a| format!("{a}:{}", s.server_port.filter(|p| *p != 0).unwrap_or(5432)));
        SessionBase {
            encoded,
            trace_id: ids::trace_id(sid),
            span_id: ids::session_span_id(sid),
            statement_ids: ids::StatementIds::new(sid),
            database: s.database.clone().filter(|d| !d.is_empty()),
            server,
            policy_version: s.policy_version.clone().filter(|v| !v.is_empty()),
        }
    }
}

/// How `db.query.text` is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryText {
    Full,
    Sanitised,
    None,
}

/// The statement span name rule (OpenTelemetry's database span name): `{db.query.summary}`,
/// else `{db.operation.name} {target}`, else `{target}`, else `postgresql`; target is
/// db.collection.name, db.stored_procedure.name, db.namespace or server.address:port.
pub fn statement_name<'a>(
    info: &'a QueryInfo,
    operation: Option<&str>,
    base: &'a SessionBase,
) -> Cow<'a, str> {
    if let Some(s) = some(info.summary.as_deref()) {
        return Cow::Borrowed(s);
    }
    let target = some(info.collection.as_deref())
        .or(some(info.procedure.as_deref()))
        .or(base.database.as_deref())
        .or(base.server.as_deref());
    match (some(operation), target) {
        (Some(op), Some(t)) => Cow::Owned(format!("{op} {t}")),
        (None, Some(t)) => Cow::Borrowed(t),
        (Some(op), None) => Cow::Owned(op.to_owned()),
        (None, None) => Cow::Borrowed(DB_SYSTEM),
    }
}

/// What a statement span needs besides its records.
pub struct StatementInput<'a> {
    pub base: &'a SessionBase,
    pub stmt: &'a StmtRec<'a>,
    pub end: Option<&'a Line<'a>>,
    pub verified: bool,
    pub interrupted_at_us: u64,
    pub info: &'a QueryInfo,
    /// `db.query.text` as configured (None: not shown).
    pub shown_text: Option<Cow<'a, str>>,
    /// The length of the statement's text when `shown_text` was cut short.
    pub text_bytes: Option<usize>,
}

pub fn statement<'a>(input: StatementInput<'a>) -> Span<'a> {
    let StatementInput {
        base,
        stmt,
        end,
        verified,
        interrupted_at_us,
        info,
        shown_text,
        text_bytes,
    } = input;
    let mut attrs = Attrs(Vec::with_capacity(20));
    if let Some(t) = shown_text {
        attrs.str("db.query.text", t);
    }
    if let Some(n) = text_bytes {
        attrs.put(
            "pgwarden.query.text_bytes",
            Val::Int(i64::try_from(n).unwrap_or(i64::MAX)),
        );
    }
    let tag = end.and_then(|e| e.command_tag.as_deref());
    let tag_verb = verb(tag);
    let mut operation: Option<Cow<'a, str>> = info.operation.as_deref().map(Cow::Borrowed);
    if info.statements <= 1 {
        if let Some(v) = tag_verb.clone() {
            operation = Some(v);
        }
    }
    if let Some(op) = operation.clone().filter(|o| !o.is_empty()) {
        attrs.str("db.operation.name", op);
    }
    if let Some(s) = some(info.summary.as_deref()) {
        attrs.str("db.query.summary", s);
    }
    if let Some(c) = some(info.collection.as_deref()) {
        attrs.str("db.collection.name", c);
    }
    if let Some(p) = some(info.procedure.as_deref()) {
        attrs.str("db.stored_procedure.name", p);
    }
    if info.statements > 1 {
        attrs.put(
            "db.operation.batch.size",
            Val::Int(i64::from(info.statements)),
        );
    }
    if stmt.sql.is_some() && !info.parsed {
        attrs.put("pgwarden.query.parsed", Val::Bool(false));
    }
    if let Some(params) = &stmt.params {
        if info.statements <= 1 {
            for (i, value) in params.iter().enumerate() {
                if !value.is_null() {
                    attrs.0.push((
                        Cow::Owned(format!("db.query.parameter.{i}")),
                        Val::Str(Cow::Owned(text(value))),
                    ));
                }
            }
        }
    }
    if let Some(oid) = stmt.function_oid {
        attrs.put("pgwarden.function.oid", Val::Int(oid));
    }
    attrs.put("pgwarden.statement.number", Val::Int(stmt.n as i64));
    attrs.str("pgwarden.protocol", stmt.protocol.as_deref().unwrap_or(""));
    spool(&mut attrs, &stmt.stream, stmt.seq, &stmt.hash, verified);
    policy(stmt, base, &mut attrs);
    let mut start_us = stmt.ts;
    let end_us;
    let mut status = None;
    if let Some(end) = end {
        end_us = end.ts;
        start_us = start_us.min(end_us.saturating_sub(end.duration_us.unwrap_or(0)));
        if let Some(t) = some(tag) {
            attrs.str("pgwarden.command_tag", t);
        }
        if let Some(rows) = end.data_rows {
            attrs.put("db.response.returned_rows", Val::Int(rows));
        } else if let Some(rows) = end.rows {
            if matches!(tag_verb.as_deref(), Some("SELECT" | "FETCH")) {
                attrs.put("db.response.returned_rows", Val::Int(rows));
            }
        }
        if let Some(rows) = end.rows {
            attrs.put("pgwarden.statement.rows", Val::Int(rows));
        }
        if let Some(state) = some(end.sqlstate.as_deref()) {
            attrs.str("db.response.status_code", state);
            attrs.str("error.type", state);
            status = Some(Cow::Borrowed(some(end.error.as_deref()).unwrap_or(state)));
        }
        if end.result.is_some() {
            attrs.put("pgwarden.result.recorded", Val::Bool(true));
        }
        if let Some(rows) = end
            .result_omitted
            .as_ref()
            .and_then(|o| o.get("rows"))
            .filter(|v| truthy(v))
            .and_then(Value::as_i64)
        {
            attrs.put("pgwarden.result.omitted_rows", Val::Int(rows));
        }
        attrs.str("pgwarden.outcome", "completed");
        attrs.str("pgwarden.chain.end_hash", end.hash.as_deref().unwrap_or(""));
    } else {
        end_us = start_us.max(interrupted_at_us);
        attrs.str("pgwarden.outcome", INTERRUPTED);
        attrs.str("error.type", INTERRUPTED);
        status = Some(Cow::Borrowed(
            "outcome unknown: the session or the gateway ended before the statement did",
        ));
    }
    Span {
        trace_id: base.trace_id,
        span_id: base.statement_ids.span_id(stmt.n),
        parent: Some(base.span_id),
        name: statement_name(info, operation.as_deref(), base),
        kind: KIND_CLIENT,
        start_us,
        end_us,
        shared: &base.encoded,
        attrs,
        status,
    }
}

/// The statement policy's decision, rule and version, and the masked columns.  A
/// statement of a session under a policy that has no `decision` record was allowed by the
/// session's policy.
fn policy<'a>(stmt: &'a StmtRec<'a>, base: &'a SessionBase, attrs: &mut Attrs<'a>) {
    if stmt.decision.as_ref().is_none_or(Value::is_null) {
        if let Some(version) = base.policy_version.as_deref() {
            attrs.str("pgwarden.policy.decision", "allow");
            attrs.str("pgwarden.policy.version", version);
        }
    }
    for (value, name) in [
        (&stmt.decision, "pgwarden.policy.decision"),
        (&stmt.rule, "pgwarden.policy.rule"),
        (&stmt.policy_version, "pgwarden.policy.version"),
    ] {
        if let Some(v) = value.as_ref().filter(|v| !v.is_null()) {
            attrs.str(name, text(v));
        }
    }
    if let Some(Value::Array(cols)) = stmt.masked_columns.as_ref().filter(|v| truthy(v)) {
        attrs.put(
            "pgwarden.masked_columns",
            Val::StrList(cols.iter().map(text).collect()),
        );
    }
}

/// The span of a session: from its `session` record to its `session_end` (None: it ends,
/// interrupted, at `interrupted_at_us`).
pub fn session<'a>(
    session: &'a SessionRec,
    end: Option<&'a Line<'a>>,
    verified: bool,
    interrupted_at_us: u64,
) -> Span<'a> {
    let sid = session.session.as_str();
    let mut attrs = Attrs::default();
    session_attrs(&mut attrs, &session.who(), sid);
    if let Some(a) = some(session.application_name.as_deref()) {
        attrs.str("pgwarden.session.application_name", a);
    }
    if let Some(tls) = session.tls {
        attrs.put("pgwarden.session.tls", Val::Bool(tls));
    }
    if let Some(version) = some(session.policy_version.as_deref()) {
        attrs.str("pgwarden.policy.version", version);
    }
    spool(
        &mut attrs,
        &session.stream,
        session.seq,
        &session.hash,
        verified,
    );
    let start_us = session.ts;
    let end_us;
    if let Some(end) = end {
        end_us = end.ts;
        attrs.str(
            "pgwarden.session.end_reason",
            end.reason.as_deref().unwrap_or(""),
        );
        if let Some(n) = end.statements {
            attrs.put("pgwarden.session.statements", Val::Int(n));
        }
        if let Some(state) = some(end.sqlstate.as_deref()) {
            attrs.str("pgwarden.session.end_sqlstate", state);
        }
        attrs.str("pgwarden.outcome", "completed");
    } else {
        end_us = start_us.max(interrupted_at_us);
        attrs.str("pgwarden.session.end_reason", INTERRUPTED);
        attrs.str("pgwarden.outcome", INTERRUPTED);
    }
    Span {
        trace_id: ids::trace_id(sid),
        span_id: ids::session_span_id(sid),
        parent: None,
        name: Cow::Borrowed(SESSION_SPAN_NAME),
        kind: KIND_SERVER,
        start_us,
        end_us,
        shared: &[],
        attrs,
        status: None,
    }
}

/// The span of a connection refused before its session began.
pub fn refused<'a>(record: &'a Line<'a>, verified: bool) -> Span<'a> {
    let sid = record.session_id();
    let mut attrs = Attrs::default();
    session_attrs(&mut attrs, &record.who(), sid);
    attrs.put("pgwarden.session.refused", Val::Bool(true));
    if let Some(stage) = some(record.stage.as_deref()) {
        attrs.str("pgwarden.session.refused_at", stage);
    }
    let sqlstate = record.sqlstate.as_deref().unwrap_or("");
    if !sqlstate.is_empty() {
        attrs.str("db.response.status_code", sqlstate);
        attrs.str("error.type", sqlstate);
    }
    attrs.str("pgwarden.outcome", "refused");
    spool(
        &mut attrs,
        record.stream.as_deref().unwrap_or(""),
        record.seq,
        record.hash.as_deref().unwrap_or(""),
        verified,
    );
    let ts = record.ts;
    let start = record.started.filter(|s| *s != 0).unwrap_or(ts);
    Span {
        trace_id: ids::trace_id(sid),
        span_id: ids::session_span_id(sid),
        parent: None,
        name: Cow::Borrowed(SESSION_SPAN_NAME),
        kind: KIND_SERVER,
        start_us: start.min(ts),
        end_us: ts,
        shared: &[],
        attrs,
        status: Some(Cow::Borrowed(
            some(record.message.as_deref()).unwrap_or(sqlstate),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(verb(Some("INSERT 0 1")).as_deref(), Some("INSERT"));
        assert_eq!(verb(Some("CREATE TABLE")).as_deref(), Some("CREATE TABLE"));
        assert_eq!(verb(Some("SELECT 12")).as_deref(), Some("SELECT"));
        assert_eq!(verb(Some("")), None);
        assert_eq!(verb(Some("42")), None);
        assert_eq!(verb(Some("FETCH 2 x 3")).as_deref(), Some("FETCH x"));
        assert_eq!(verb(None), None);
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    fn base(database: Option<&str>, server: Option<(&str, i64)>) -> SessionBase {
        let rec = SessionRec {
            database: database.map(str::to_owned),
            server_address: server.map(|s| s.0.to_owned()),
            server_port: server.map(|s| s.1),
            ..SessionRec::default()
        };
        SessionBase::new(Some(&rec), "s")
    }

    #[test]
    fn span_name_falls_back_per_the_rule() {
        let summary = QueryInfo {
            summary: Some("SELECT t".into()),
            ..QueryInfo::default()
        };
        let none = QueryInfo::default();
        let b = base(Some("shop"), None);
        assert_eq!(statement_name(&summary, Some("SELECT"), &b), "SELECT t");
        assert_eq!(statement_name(&none, Some("BEGIN"), &b), "BEGIN shop");
        assert_eq!(statement_name(&none, None, &b), "shop");
        let b = base(None, Some(("db", 5433)));
        assert_eq!(statement_name(&none, Some("X"), &b), "X db:5433");
        let b = base(None, None);
        assert_eq!(statement_name(&none, None, &b), "postgresql");
    }
}

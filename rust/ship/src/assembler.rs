//! One audit stream, batch by batch: verify the hash chain, pair `stmt` with `end`, build
//! the spans and encode them as OTLP requests.  A batch is staged: [`StreamAssembler::commit`]
//! makes it the stream's state once the backend has acknowledged it, and
//! [`StreamAssembler::rollback`] forgets it (the same records are read again, giving the
//! same spans with the same ids).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::rc::Rc;

use ahash::AHashMap as HashMap;
use pgwarden_wire::audit_record::{unseal_parts, RecordChain, HASH_LEN};
use pgwarden_wire::otlp::{encode_framed_log, resource_framing, AnyValue, LogData, Scope};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::records::{statement_key, statement_key_into, Line, SessionRec, StmtRec};
use crate::shape::{number_blind_key, sanitise, shape_and_literals};
use crate::spans::{self, QueryText, SessionBase, Span, StatementInput, Val};
use crate::transcript::{self, EndView, StmtView};

/// What PostgreSQL's parser says a query text does (`pgwarden.audit.sql.analyze`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryInfo {
    pub parsed: bool,
    pub statements: u32,
    pub operation: Option<String>,
    pub collection: Option<String>,
    pub procedure: Option<String>,
    pub summary: Option<String>,
}

/// Analyses a query text; called once per distinct query shape.
pub trait QueryAnalyzer {
    fn analyze(&mut self, sql: &str) -> QueryInfo;
}

/// Analyses kept per shape; cleared whole when full (a workload has few shapes).
const QUERY_CACHE_LIMIT: usize = 16_384;

#[derive(Debug, Clone)]
pub struct AssemblerConfig {
    pub key: Vec<u8>,
    pub resource: Vec<(String, Val<'static>)>,
    pub resource_schema_url: String,
    pub scope_name: String,
    pub scope_version: String,
    pub scope_schema_url: String,
    pub query_text: QueryText,
    /// Spans per export request.
    pub request_spans: usize,
    /// Encoded spans per export request, in bytes: a request stays below a receiver's
    /// message limit (4 MiB by default for OTLP/gRPC) however long its statements are.
    /// A single span larger than this goes alone.
    pub request_bytes: usize,
    /// Longest `db.query.text` in a span, in bytes (the spool and the session recording
    /// keep the whole text); a longer text is cut at a character boundary.
    pub query_text_max_bytes: usize,
    /// Record types returned per session (the session recording indexes the records that
    /// start a session; empty: none).
    pub recorded: Vec<String>,
    /// Build a log record for each `end` record carrying a result.
    pub result_logs: bool,
}

/// What the stream has delivered, and what it still holds open: the checkpoint's content
/// (besides the read position, which the reader owns).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamState {
    #[serde(default)]
    pub seq: u64,
    #[serde(default = "zero_hash")]
    pub prev_hash: String,
    #[serde(default)]
    pub last_ts: u64,
    #[serde(default)]
    pub stream_info: Map<String, Value>,
    #[serde(default)]
    pub open_sessions: BTreeMap<String, SessionRec>,
    #[serde(default)]
    /// Boxed: the map moves its values when its nodes split or shrink.
    pub open_statements: BTreeMap<String, Box<StmtRec<'static>>>,
    #[serde(default)]
    pub closed: bool,
}

fn zero_hash() -> String {
    "00".repeat(HASH_LEN)
}

/// One batch, assembled.
#[derive(Debug, Default)]
pub struct Assembled {
    /// `ExportTraceServiceRequest` bodies, at most `request_spans` spans and about
    /// `request_bytes` bytes each.
    pub requests: Vec<Request>,
    pub spans: usize,
    /// Per session, the lines of the `recorded` types (newline-terminated), in order.
    pub recordings: Vec<(String, Vec<u8>)>,
    /// `ExportLogsServiceRequest` bodies: a log record per statement whose result was
    /// recorded (with `result_logs`), its body the statement's transcript.
    pub log_requests: Vec<Request>,
    /// (line index, message) for each record that failed the chain or could not be read.
    pub problems: Vec<(Option<usize>, String)>,
    pub chain_failures: usize,
    /// The stream is over (closed, or its writer gone and nothing left to read).
    pub finishing: bool,
}

pub struct StreamAssembler {
    config: AssemblerConfig,
    resource_attrs: Vec<(String, Val<'static>)>,
    state: StreamState,
    staged: Option<StreamState>,
    bases: HashMap<String, Rc<SessionBase>>,
    analyses: HashMap<String, Rc<QueryInfo>>,
    /// Texts without literals (prepared statements, mostly), straight to their analysis.
    literal_free: HashMap<String, Rc<QueryInfo>>,
    /// Texts by their number-blind key ([`number_blind_key`]): `... WHERE aid = 42` finds
    /// the analysis of `... WHERE aid = 7` without a scan.
    number_blind: HashMap<String, Rc<QueryInfo>>,
    /// The largest request of the last batch: the next batch's chunks start that large.
    chunk_capacity: usize,
}

fn from_hex(s: &str) -> Option<[u8; HASH_LEN]> {
    if s.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0u8; HASH_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl StreamAssembler {
    pub fn new(config: AssemblerConfig, state: StreamState) -> Self {
        StreamAssembler {
            resource_attrs: config.resource.clone(),
            config,
            state,
            staged: None,
            bases: HashMap::new(),
            analyses: HashMap::new(),
            literal_free: HashMap::new(),
            number_blind: HashMap::new(),
            chunk_capacity: 64 * 1024,
        }
    }

    pub fn state(&self) -> &StreamState {
        &self.state
    }

    /// Accept the staged batch's state.
    pub fn commit(&mut self) {
        if let Some(s) = self.staged.take() {
            self.state = s;
        }
    }

    /// Forget the staged batch.
    pub fn rollback(&mut self) {
        self.staged = None;
    }

    fn base(&mut self, state: &StreamState, sid: &str) -> Rc<SessionBase> {
        if let Some(b) = self.bases.get(sid) {
            return b.clone();
        }
        let base = Rc::new(SessionBase::new(state.open_sessions.get(sid), sid));
        if state.open_sessions.contains_key(sid) {
            if self.bases.len() >= QUERY_CACHE_LIMIT {
                self.bases.clear();
            }
            self.bases.insert(sid.to_owned(), base.clone());
        }
        base
    }

    fn analysis(&mut self, sql: &str, analyzer: &mut dyn QueryAnalyzer) -> Rc<QueryInfo> {
        if sql.is_empty() {
            return Rc::new(QueryInfo::default());
        }
        if let Some(info) = self.literal_free.get(sql) {
            return info.clone();
        }
        let blind = number_blind_key(sql);
        if let Some(info) = blind.as_ref().and_then(|k| self.number_blind.get(k)) {
            return info.clone();
        }
        let (key, literals) = shape_and_literals(sql).unwrap_or_else(|| (sql.to_owned(), true));
        let info = match self.analyses.get(&key) {
            Some(info) => info.clone(),
            None => {
                let info = Rc::new(analyzer.analyze(sql));
                if self.analyses.len() >= QUERY_CACHE_LIMIT {
                    self.analyses.clear();
                }
                self.analyses.insert(key, info.clone());
                info
            }
        };
        if !literals {
            if self.literal_free.len() >= QUERY_CACHE_LIMIT {
                self.literal_free.clear();
            }
            self.literal_free.insert(sql.to_owned(), info.clone());
        }
        if let Some(blind) = blind {
            if self.number_blind.len() >= QUERY_CACHE_LIMIT {
                self.number_blind.clear();
            }
            self.number_blind.insert(blind, info.clone());
        }
        info
    }

    /// Build statement `stmt`'s span and append it to `spans`.
    #[allow(clippy::too_many_arguments)]
    fn statement_span(
        &mut self,
        state: &StreamState,
        stmt: &StmtRec<'_>,
        end: Option<&Line<'_>>,
        verified: bool,
        interrupted_at_us: u64,
        analyzer: &mut dyn QueryAnalyzer,
        spans: &mut Framed,
    ) -> SpanIds {
        let base = self.base(state, &stmt.session);
        let info = match stmt.sql.as_deref() {
            Some(sql) => self.analysis(sql, analyzer),
            None => Rc::new(QueryInfo::default()),
        };
        let mut shown_text = match (self.config.query_text, stmt.sql.as_deref()) {
            (QueryText::Full, Some(t)) => Some(Cow::Borrowed(t)),
            (QueryText::Sanitised, Some(t)) => sanitise(t).map(Cow::Owned),
            _ => None,
        };
        let mut text_bytes = None;
        if let Some(text) = shown_text.as_mut() {
            let max = self.config.query_text_max_bytes;
            if text.len() > max {
                text_bytes = Some(text.len());
                let mut cut = max;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                match text {
                    Cow::Borrowed(t) => *t = &t[..cut],
                    Cow::Owned(t) => t.truncate(cut),
                }
            }
        }
        let span = spans::statement(StatementInput {
            base: &base,
            stmt,
            end,
            verified,
            interrupted_at_us,
            info: &info,
            shown_text,
            text_bytes,
        });
        spans.push(&span);
        SpanIds {
            trace_id: span.trace_id,
            span_id: span.span_id,
        }
    }

    /// Assemble the next `lines` of the stream (sealed records, no newline).  With no lines
    /// and `writer_alive` false, or after the stream's `close` record, the stream is over:
    /// whatever is still open ends as interrupted.
    pub fn process<'l>(
        &mut self,
        lines: &[&'l [u8]],
        writer_alive: bool,
        analyzer: &mut dyn QueryAnalyzer,
    ) -> Assembled {
        let mut work = self.state.clone();
        let mut out = Assembled::default();
        let mut built = Framed::new(
            self.config.request_spans,
            self.config.request_bytes,
            self.chunk_capacity,
        );
        let mut logs = Framed::new(self.config.request_spans, self.config.request_bytes, 0);
        let mut recordings: Vec<(String, Vec<u8>)> = Vec::new();
        let mut recording_index: HashMap<String, usize> = HashMap::new();
        let template = RecordChain::new(&self.config.key, [0; HASH_LEN]);
        let mut head = from_hex(&work.prev_hash).unwrap_or([0; HASH_LEN]);
        // A statement key to look up, without allocating.
        let mut key = String::new();
        // Statements opened in this batch, by (session, n), borrowing from the lines; what
        // is still open after the batch moves to `work.open_statements`, owned.
        let mut fresh: HashMap<(&'l str, u64), StmtRec<'l>> = HashMap::new();

        for (index, raw) in lines.iter().enumerate() {
            let mut line = Line::default();
            let parsed = line.parse_into(raw);
            if index == 0 && work.seq == 0 {
                // No checkpoint yet: the stream's first record names the hash before it.
                if let Some(prev) = serde_json::from_slice::<Value>(raw)
                    .ok()
                    .and_then(|v| v.get("prev").and_then(Value::as_str).and_then(from_hex))
                {
                    head = prev;
                }
            }
            let mut verified = match unseal_parts(raw) {
                Ok((body, stored)) => {
                    let mut chain = template.clone();
                    chain.commit(head);
                    let ok = chain.hash_of_parts(&[body, b"}"]) == stored;
                    head = stored;
                    ok
                }
                Err(_) => false,
            };
            if !verified {
                out.chain_failures += 1;
                out.problems.push((
                    Some(index),
                    "the record does not match the hash chain".into(),
                ));
            }
            match parsed {
                Ok(()) => {}
                Err(e) => {
                    out.chain_failures += 1;
                    out.problems
                        .push((Some(index), format!("unreadable record: {e}")));
                    continue;
                }
            };
            if work.seq != 0 && line.seq != work.seq + 1 {
                verified = false;
                out.problems.push((
                    Some(index),
                    format!(
                        "records {}..{} are missing",
                        work.seq + 1,
                        line.seq.saturating_sub(1)
                    ),
                ));
            }
            work.seq = line.seq;
            work.last_ts = work.last_ts.max(line.ts);
            let sid = line.session_id();
            if !sid.is_empty() && self.config.recorded.iter().any(|k| *k == line.kind) {
                let slot = match recording_index.get(sid) {
                    Some(slot) => *slot,
                    None => {
                        recordings.push((sid.to_owned(), Vec::new()));
                        recording_index.insert(sid.to_owned(), recordings.len() - 1);
                        recordings.len() - 1
                    }
                };
                let buf = &mut recordings[slot].1;
                buf.extend_from_slice(raw);
                buf.push(b'\n');
            }
            match line.kind.as_ref() {
                "stmt" => {
                    let n = line.n.unwrap_or(0);
                    match line.session {
                        Some(Cow::Borrowed(session)) => {
                            fresh.insert((session, n), line.into_stmt(!verified));
                        }
                        _ => {
                            let key = statement_key(line.session_id(), n);
                            let stmt = line.into_stmt(!verified).into_owned();
                            work.open_statements.insert(key, Box::new(stmt));
                        }
                    }
                }
                "end" => {
                    let n = line.n.unwrap_or(0);
                    let opened = match &line.session {
                        Some(Cow::Borrowed(session)) => fresh.remove(&(*session, n)),
                        _ => None,
                    };
                    let mut stmt = opened.unwrap_or_else(|| {
                        statement_key_into(&mut key, sid, n);
                        match work.open_statements.remove(key.as_str()) {
                            Some(stmt) => *stmt,
                            None => StmtRec {
                                // its stmt record was lost: keep what the end says
                                session: Cow::Owned(sid.to_owned()),
                                n,
                                ts: line.ts,
                                unverified: true,
                                ..StmtRec::default()
                            },
                        }
                    });
                    if line.masked_columns.is_some() {
                        // The columns its results had masked (docs/audit.md).
                        stmt.masked_columns.clone_from(&line.masked_columns);
                    }
                    let ok = verified && !stmt.unverified;
                    let ids =
                        self.statement_span(&work, &stmt, Some(&line), ok, 0, analyzer, &mut built);
                    if self.config.result_logs && line.result.is_some() {
                        logs.push_with(|chunk| result_log(chunk, &stmt, &line, raw, ids));
                    }
                }
                "decision" => {
                    let n = line.n.unwrap_or(0);
                    let decide = |stmt: &mut StmtRec<'_>| {
                        for (field, value) in [
                            (&mut stmt.decision, &line.decision),
                            (&mut stmt.rule, &line.rule),
                            (&mut stmt.policy_version, &line.policy_version),
                            (&mut stmt.masked_columns, &line.masked_columns),
                        ] {
                            if value.is_some() {
                                field.clone_from(value);
                            }
                        }
                    };
                    let in_batch = match &line.session {
                        Some(Cow::Borrowed(session)) => fresh.get_mut(&(*session, n)),
                        _ => None,
                    };
                    if let Some(stmt) = in_batch {
                        decide(stmt);
                    } else {
                        statement_key_into(&mut key, sid, n);
                        if let Some(stmt) = work.open_statements.get_mut(key.as_str()) {
                            decide(stmt);
                        }
                    }
                }
                "session" => {
                    self.bases.remove(sid);
                    work.open_sessions
                        .insert(sid.to_owned(), line.session_rec(!verified));
                }
                "session_end" => {
                    let prefix = format!("{sid}/");
                    let keys: Vec<String> = work
                        .open_statements
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .map(|(k, _)| k.clone())
                        .collect();
                    let mut ended: Vec<StmtRec<'_>> = keys
                        .iter()
                        .filter_map(|key| work.open_statements.remove(key).map(|s| *s))
                        .collect();
                    let mut in_batch: Vec<(&str, u64)> =
                        fresh.keys().filter(|(s, _)| *s == sid).copied().collect();
                    in_batch.sort_unstable_by_key(|(_, n)| *n);
                    ended.extend(in_batch.iter().filter_map(|k| fresh.remove(k)));
                    for stmt in &ended {
                        let ok = !stmt.unverified;
                        self.statement_span(&work, stmt, None, ok, line.ts, analyzer, &mut built);
                    }
                    if let Some(opened) = work.open_sessions.remove(sid) {
                        let ok = verified && !opened.unverified;
                        built.push(&spans::session(&opened, Some(&line), ok, 0));
                    }
                    self.bases.remove(sid);
                }
                "refused" => built.push(&spans::refused(&line, verified)),
                "open" => {
                    if let Ok(Value::Object(mut info)) = serde_json::from_slice::<Value>(raw) {
                        for k in ["prev", "hash", "type"] {
                            info.remove(k);
                        }
                        work.stream_info = info;
                    }
                }
                "close" => work.closed = true,
                _ => {}
            }
        }
        for ((session, n), stmt) in fresh {
            let stmt = Box::new(stmt.into_owned());
            work.open_statements.insert(statement_key(session, n), stmt);
        }
        work.prev_hash = pgwarden_wire::audit_record::hex(&head);
        out.finishing = work.closed || (lines.is_empty() && !writer_alive);
        if out.finishing {
            let at = work.last_ts;
            let stmts: Vec<Box<StmtRec<'static>>> = std::mem::take(&mut work.open_statements)
                .into_values()
                .collect();
            for stmt in &stmts {
                self.statement_span(
                    &work,
                    stmt,
                    None,
                    !stmt.unverified,
                    at,
                    analyzer,
                    &mut built,
                );
            }
            for session in std::mem::take(&mut work.open_sessions).into_values() {
                built.push(&spans::session(&session, None, !session.unverified, at));
            }
            self.bases.clear();
        }
        out.spans = built.count;
        self.chunk_capacity = built.largest.min(self.config.request_bytes);
        out.requests = self.wrap(built.finish());
        out.log_requests = self.wrap(logs.finish());
        out.recordings = recordings;
        self.staged = Some(work);
        out
    }

    /// Each chunk of framed spans as one `ExportTraceServiceRequest` (of framed log
    /// records, one `ExportLogsServiceRequest`: the same framing).
    fn wrap(&self, chunks: Vec<Vec<u8>>) -> Vec<Request> {
        let resource: Vec<(&str, AnyValue<'_>)> = self
            .resource_attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.any()))
            .collect();
        let scope = Scope {
            name: &self.config.scope_name,
            version: &self.config.scope_version,
            schema_url: &self.config.scope_schema_url,
        };
        chunks
            .into_iter()
            .map(|spans| {
                let (head, tail) = resource_framing(
                    &resource,
                    &self.config.resource_schema_url,
                    &scope,
                    spans.len(),
                );
                Request { head, spans, tail }
            })
            .collect()
    }
}

/// A statement span's ids, for the log record that goes with it.
#[derive(Debug, Clone, Copy)]
struct SpanIds {
    trace_id: [u8; 16],
    span_id: [u8; 8],
}

/// Statement `stmt`'s result as a framed log record (event `pgwarden.statement.result`):
/// its transcript as the body, correlated with its span by trace and span id.
fn result_log(out: &mut Vec<u8>, stmt: &StmtRec<'_>, end: &Line<'_>, raw: &[u8], ids: SpanIds) {
    let view = StmtView {
        n: Some(stmt.n),
        ts: Some(stmt.ts),
        sql: stmt.sql.as_deref().map(Cow::Borrowed),
        function_oid: stmt.function_oid,
        params: stmt.params.clone().map(Value::Array),
        decision: stmt.decision.clone(),
    };
    let result: EndView<'_> = serde_json::from_slice(raw).unwrap_or_default();
    let body = transcript::statement(Some(&view), Some(&result), None, None).join("\n");
    // The gateway observed the result when it wrote the `end` record: both times are that
    // one (as the data model has it for events their own source reports), so a batch
    // delivered again after a failed export carries the same records, byte for byte.
    let at = end.ts.saturating_mul(1000);
    encode_framed_log(
        out,
        &LogData {
            time_unix_nano: at,
            observed_time_unix_nano: at,
            severity_number: SEVERITY_INFO,
            severity_text: "INFO",
            body: Some(AnyValue::Str(&body)),
            attributes: vec![
                ("pgwarden.session.id", AnyValue::Str(&stmt.session)),
                ("pgwarden.statement.number", AnyValue::Int(stmt.n as i64)),
                ("pgwarden.spool.seq", AnyValue::Int(end.seq as i64)),
                ("db.system.name", AnyValue::Str(spans::DB_SYSTEM)),
            ],
            flags: TRACE_FLAG_SAMPLED,
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            event_name: RESULT_EVENT,
        },
    );
}

/// The event name of a statement's result log record.
pub const RESULT_EVENT: &str = "pgwarden.statement.result";
const SEVERITY_INFO: i32 = 9;
const TRACE_FLAG_SAMPLED: u32 = 1;

/// One encoded `ExportTraceServiceRequest` in three parts, `head ‖ spans ‖ tail`, so that
/// its spans are copied once only: into the buffer the request is sent from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Vec<u8>,
    pub spans: Vec<u8>,
    pub tail: Vec<u8>,
}

impl Request {
    pub fn len(&self) -> usize {
        self.head.len() + self.spans.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn parts(&self) -> [&[u8]; 3] {
        [&self.head, &self.spans, &self.tail]
    }

    /// The request's bytes in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

/// Spans encoded as they are built, in chunks of at most `per_request` spans and (but for
/// a single span that is larger) `max_bytes` bytes.
pub struct Framed {
    per_request: usize,
    max_bytes: usize,
    capacity: usize,
    in_chunk: usize,
    chunks: Vec<Vec<u8>>,
    pub count: usize,
    /// The largest chunk so far.
    pub largest: usize,
}

impl Framed {
    fn new(per_request: usize, max_bytes: usize, capacity: usize) -> Self {
        Framed {
            per_request: per_request.max(1),
            max_bytes: max_bytes.max(1),
            capacity,
            in_chunk: 0,
            chunks: Vec::new(),
            count: 0,
            largest: 0,
        }
    }

    fn push(&mut self, span: &Span<'_>) {
        self.push_with(|chunk| span.encode(chunk));
    }

    /// Appends one framed element (a span, a log record) that `encode` writes.
    fn push_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        if self.chunks.is_empty() || self.in_chunk == self.per_request {
            self.chunks.push(Vec::with_capacity(self.capacity));
            self.in_chunk = 0;
        }
        let Some(chunk) = self.chunks.last_mut() else {
            return;
        };
        let start = chunk.len();
        encode(chunk);
        if chunk.len() > self.max_bytes && self.in_chunk > 0 {
            // Too large with this span: it starts the next request.
            let mut next = Vec::with_capacity(self.capacity.max(chunk.len() - start));
            next.extend_from_slice(&chunk[start..]);
            chunk.truncate(start);
            self.chunks.push(next);
            self.in_chunk = 0;
        }
        self.in_chunk += 1;
        self.count += 1;
        if let Some(chunk) = self.chunks.last() {
            self.largest = self.largest.max(chunk.len());
        }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_wire::audit_record::RecordBody;

    struct Table;

    impl QueryAnalyzer for Table {
        fn analyze(&mut self, sql: &str) -> QueryInfo {
            QueryInfo {
                parsed: true,
                statements: 1,
                operation: Some("SELECT".into()),
                collection: sql.rsplit(' ').next().map(str::to_owned),
                procedure: None,
                summary: None,
            }
        }
    }

    struct Counting(usize);

    impl QueryAnalyzer for Counting {
        fn analyze(&mut self, _sql: &str) -> QueryInfo {
            self.0 += 1;
            QueryInfo {
                parsed: true,
                statements: 1,
                ..QueryInfo::default()
            }
        }
    }

    fn config() -> AssemblerConfig {
        AssemblerConfig {
            key: b"k".to_vec(),
            resource: vec![("service.name".into(), Val::Str("pgwarden".into()))],
            resource_schema_url: String::new(),
            scope_name: "pgwarden.audit".into(),
            scope_version: "0".into(),
            scope_schema_url: String::new(),
            query_text: QueryText::Full,
            request_spans: 2,
            request_bytes: 1 << 20,
            query_text_max_bytes: 1 << 20,
            recorded: vec!["stmt".into(), "end".into()],
            result_logs: false,
        }
    }

    /// Sealed record lines as the gateway writes them, chained from zero.
    fn stream(records: &[(&str, &str)]) -> Vec<Vec<u8>> {
        let mut chain = RecordChain::new(b"k", [0; HASH_LEN]);
        let mut out = Vec::new();
        for (seq, (kind, members)) in records.iter().enumerate() {
            let mut body = RecordBody::default();
            body.begin(seq as u64 + 1, "\"s1\"", 1_000 + seq as u64, kind);
            if !members.is_empty() {
                body.members(members);
            }
            let mut line = Vec::new();
            let hash = chain.seal(body.finish(), &mut line);
            chain.commit(hash);
            line.pop(); // the newline
            out.push(line);
        }
        out
    }

    fn refs(lines: &[Vec<u8>]) -> Vec<&[u8]> {
        lines.iter().map(Vec::as_slice).collect()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[test]
    fn statements_pair_up_and_requests_are_chunked() {
        let lines = stream(&[
            (
                "session",
                r#""session":"a1","database":"shop","user":{"name":"ann"}"#,
            ),
            (
                "stmt",
                r#""session":"a1","n":1,"protocol":"simple","sql":"select * from t1""#,
            ),
            (
                "end",
                r#""session":"a1","n":1,"command_tag":"SELECT 3","rows":3,"data_rows":3"#,
            ),
            (
                "stmt",
                r#""session":"a1","n":2,"protocol":"simple","sql":"select * from t2""#,
            ),
            (
                "end",
                r#""session":"a1","n":2,"command_tag":"SELECT 0","rows":0"#,
            ),
            (
                "session_end",
                r#""session":"a1","reason":"client_terminate""#,
            ),
        ]);
        let mut asm = StreamAssembler::new(config(), StreamState::default());
        let out = asm.process(&refs(&lines), true, &mut Table);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        assert_eq!(out.spans, 3);
        assert_eq!(out.requests.len(), 2, "two spans per request");
        assert!(contains(&out.requests[0].to_vec(), "SELECT t1"));
        assert!(contains(&out.requests[0].to_vec(), "ann"));
        assert!(contains(&out.requests[1].to_vec(), "pgwarden session"));
        assert_eq!(out.recordings.len(), 1);
        assert_eq!(
            out.recordings[0].1.iter().filter(|b| **b == b'\n').count(),
            4
        );
        asm.commit();
        assert!(asm.state().open_sessions.is_empty());
        assert_eq!(asm.state().seq, 6);
    }

    /// A statement of a session under a policy is allowed by that policy unless a
    /// decision record says otherwise.
    #[test]
    fn statements_carry_the_decision_of_the_sessions_policy() {
        let lines = stream(&[
            ("session", r#""session":"p1","policy_version":"pv-7""#),
            ("stmt", r#""session":"p1","n":1,"sql":"select 1""#),
            ("end", r#""session":"p1","n":1,"command_tag":"SELECT 1""#),
            ("stmt", r#""session":"p1","n":2,"sql":"drop table t""#),
            (
                "decision",
                r#""session":"p1","n":2,"decision":"deny","rule":"no ddl","policy_version":"pv-7""#,
            ),
            ("end", r#""session":"p1","n":2,"sqlstate":"42501""#),
            ("session", r#""session":"p2""#),
            ("stmt", r#""session":"p2","n":1,"sql":"select 2""#),
            ("end", r#""session":"p2","n":1,"command_tag":"SELECT 1""#),
        ]);
        let mut config = config();
        config.request_spans = 1;
        let mut asm = StreamAssembler::new(config, StreamState::default());
        let out = asm.process(&refs(&lines), true, &mut Table);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        let requests: Vec<Vec<u8>> = out.requests.iter().map(|r| r.to_vec()).collect();
        assert_eq!(requests.len(), 3);
        let allowed = &requests[0];
        assert!(contains(allowed, "pgwarden.policy.decision") && contains(allowed, "allow"));
        assert!(contains(allowed, "pv-7"));
        let denied = &requests[1];
        assert!(contains(denied, "deny") && contains(denied, "no ddl"));
        assert!(!contains(denied, "allow"));
        // A session without a policy: no decision at all.
        assert!(!contains(&requests[2], "pgwarden.policy"));
    }

    #[test]
    fn long_texts_split_requests_by_size_and_are_cut_in_spans() {
        let long = "x".repeat(3000);
        let mut records = vec![("session".to_owned(), r#""session":"c3""#.to_owned())];
        for n in 1..=4 {
            records.push((
                "stmt".into(),
                format!(r#""session":"c3","n":{n},"protocol":"simple","sql":"select '{long}é'""#),
            ));
            records.push((
                "end".into(),
                format!(r#""session":"c3","n":{n},"command_tag":"SELECT 1""#),
            ));
        }
        let records: Vec<(&str, &str)> = records
            .iter()
            .map(|(k, m)| (k.as_str(), m.as_str()))
            .collect();
        let lines = stream(&records);
        let mut config = config();
        config.request_spans = 100;
        config.request_bytes = 25_000; // each span here is about 10 KB
        let mut asm = StreamAssembler::new(config.clone(), StreamState::default());
        let out = asm.process(&refs(&lines), true, &mut Table);
        assert_eq!(out.spans, 4);
        assert_eq!(out.requests.len(), 2, "two spans per 25 KB request");
        let sizes: Vec<usize> = out.requests.iter().map(Request::len).collect();
        assert!(sizes.iter().all(|n| *n < 25_000 + 512), "{sizes:?}");
        assert!(!contains(
            &out.requests[0].to_vec(),
            "pgwarden.query.text_bytes"
        ));

        // Cut at 3009 bytes: inside the two-byte 'é', so at the boundary before it.
        config.query_text_max_bytes = 3009;
        let mut asm = StreamAssembler::new(config, StreamState::default());
        let out = asm.process(&refs(&lines), true, &mut Table);
        let text = format!("select '{long}");
        assert!(contains(&out.requests[0].to_vec(), &text));
        assert!(!contains(
            &out.requests[0].to_vec(),
            &format!("{text}\u{e9}")
        ));
        assert!(!contains(&out.requests[0].to_vec(), &format!("{text}é")));
        assert!(contains(
            &out.requests[0].to_vec(),
            "pgwarden.query.text_bytes"
        ));
    }

    #[test]
    fn a_rolled_back_batch_is_assembled_again_the_same() {
        let lines = stream(&[
            ("session", r#""session":"b2","database":"shop""#),
            (
                "stmt",
                r#""session":"b2","n":1,"protocol":"simple","sql":"select 1""#,
            ),
        ]);
        let mut asm = StreamAssembler::new(config(), StreamState::default());
        let first = asm.process(&refs(&lines), true, &mut Table);
        asm.rollback();
        let again = asm.process(&refs(&lines), true, &mut Table);
        assert_eq!(first.requests, again.requests);
        asm.commit();
        assert_eq!(asm.state().open_statements.len(), 1);
        // The open statement survives a checkpoint round trip and ends, interrupted, when
        // the writer is gone.
        let json = serde_json::to_vec(asm.state()).unwrap();
        let state: StreamState = serde_json::from_slice(&json).unwrap();
        let mut resumed = StreamAssembler::new(config(), state);
        let out = resumed.process(&[], false, &mut Table);
        assert!(out.finishing);
        assert_eq!(out.spans, 2, "the statement and the session");
        let request = &out.requests[0].to_vec();
        assert!(contains(request, "interrupted"));
        assert!(contains(request, "outcome unknown"));
    }

    #[test]
    fn statements_pair_up_across_batches_and_a_session_end_closes_the_rest_in_order() {
        let lines = stream(&[
            ("session", r#""session":"a1""#),
            (
                "stmt",
                r#""session":"a1","n":1,"protocol":"simple","sql":"select 1""#,
            ),
            (
                "stmt",
                r#""session":"a1","n":10,"protocol":"extended","sql":"select 10""#,
            ),
            (
                "stmt",
                r#""session":"a1","n":2,"protocol":"extended","sql":"select 2""#,
            ),
            (
                "end",
                r#""session":"a1","n":1,"command_tag":"SELECT 1","rows":1"#,
            ),
            // A session id with an escape is read into its own string: it pairs up too.
            (
                "stmt",
                r#""session":"e\u0031","n":1,"protocol":"simple","sql":"select 'e'""#,
            ),
            (
                "end",
                r#""session":"e1","n":1,"command_tag":"SELECT 1","rows":1"#,
            ),
            (
                "session_end",
                r#""session":"a1","reason":"client_terminate""#,
            ),
        ]);
        let mut config = config();
        config.request_spans = 100;
        let mut asm = StreamAssembler::new(config, StreamState::default());
        // The first batch leaves statement 1 open; it is carried over, owned.
        let first = asm.process(&refs(&lines[..2]), true, &mut Table);
        assert_eq!(first.spans, 0);
        asm.commit();
        assert_eq!(asm.state().open_statements.len(), 1);
        let out = asm.process(&refs(&lines[2..]), true, &mut Table);
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        asm.commit();
        assert_eq!(out.spans, 5, "four statements and the session");
        assert!(asm.state().open_statements.is_empty());
        let request = out.requests[0].to_vec();
        let at = |text: &str| {
            request
                .windows(text.len())
                .position(|w| w == text.as_bytes())
                .unwrap_or_else(|| panic!("{text} is missing"))
        };
        // Statement 1 ended normally; 2 and 10 ended with their session, in their order.
        assert!(at("select 1") < at("select 2"));
        assert!(at("select 2") < at("select 10"));
        assert!(at("select 10") < at("pgwarden session"));
        assert!(contains(&request, "select 'e'"));
    }

    #[test]
    fn a_tampered_record_is_reported_and_marked() {
        let mut lines = stream(&[
            (
                "stmt",
                r#""session":"c3","n":1,"protocol":"simple","sql":"select 1""#,
            ),
            (
                "end",
                r#""session":"c3","n":1,"command_tag":"SELECT 1","rows":1"#,
            ),
        ]);
        let text = String::from_utf8(lines[0].clone()).unwrap();
        lines[0] = text.replace("select 1", "select 2").into_bytes();
        let mut asm = StreamAssembler::new(config(), StreamState::default());
        let out = asm.process(&refs(&lines), true, &mut Table);
        assert_eq!(out.chain_failures, 1);
        assert_eq!(out.problems[0].0, Some(0));
        // verified=false is encoded as the boolean attribute pgwarden.chain.verified
        assert!(contains(
            &out.requests[0].to_vec(),
            "pgwarden.chain.verified"
        ));
    }

    #[test]
    fn one_analysis_per_query_shape() {
        let lines = stream(&[
            (
                "stmt",
                r#""session":"d4","n":1,"protocol":"simple","sql":"select a from t where id = 1""#,
            ),
            (
                "end",
                r#""session":"d4","n":1,"command_tag":"SELECT 1","rows":1"#,
            ),
            (
                "stmt",
                r#""session":"d4","n":2,"protocol":"simple","sql":"select a from t where id = 2""#,
            ),
            (
                "end",
                r#""session":"d4","n":2,"command_tag":"SELECT 1","rows":1"#,
            ),
            (
                "stmt",
                r#""session":"d4","n":3,"protocol":"simple","sql":"select a from t_2 where id = 2""#,
            ),
            (
                "end",
                r#""session":"d4","n":3,"command_tag":"SELECT 1","rows":1"#,
            ),
        ]);
        let mut asm = StreamAssembler::new(config(), StreamState::default());
        let mut analyzer = Counting(0);
        let out = asm.process(&refs(&lines), true, &mut analyzer);
        assert_eq!(out.spans, 3);
        assert_eq!(analyzer.0, 2);
    }

    proptest::proptest! {
        /// Whatever a spool holds (a damaged or hostile file), the assembler reports it
        /// and carries on: it never panics.
        #[test]
        fn arbitrary_lines_never_panic(
            lines in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..20),
            mutate in proptest::collection::vec((0usize..6, 0usize..400, proptest::num::u8::ANY), 0..8),
        ) {
            let mut asm = StreamAssembler::new(config(), StreamState::default());
            let raw: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
            asm.process(&raw, true, &mut Table);
            // Valid records with bytes changed here and there.
            let mut valid = stream(&[
                ("session", r#""session":"e5","user":"x","server_port":5432"#),
                ("stmt", r#""session":"e5","n":1,"sql":"select 'a' from t","params":[1,null,"x"]"#),
                ("decision", r#""session":"e5","n":1,"decision":"deny","masked_columns":["a"]"#),
                ("end", r#""session":"e5","n":1,"command_tag":"SELECT 1","rows":1,"result_omitted":{"rows":3}"#),
                ("refused", r#""session":"f6","sqlstate":"28000","started":5"#),
                ("session_end", r#""session":"e5","statements":1"#),
            ]);
            for (line, at, byte) in mutate {
                let l = &mut valid[line];
                let at = at % l.len();
                l[at] = byte;
            }
            asm.process(&refs(&valid), false, &mut Table);
        }
    }
}

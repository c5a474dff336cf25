//! Statement tracking: a FIFO of what was sent upstream, matched against the server's
//! responses in order, producing one record per finished statement.
//!
//! Response rules (PostgreSQL protocol, "Message Flow"):
//! - Query: any number of results, ends at ReadyForQuery; errors do not skip anything.
//! - Extended: ParseComplete / BindComplete / CloseComplete answer Parse / Bind / Close,
//!   RowDescription or NoData end a Describe, CommandComplete / EmptyQueryResponse /
//!   PortalSuspended end an Execute, ReadyForQuery answers Sync.  After an
//!   ErrorResponse the server discards every message up to the next Sync.
//! - FunctionCall: FunctionCallResponse, ends at ReadyForQuery.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ahash::AHashMap as HashMap;

use crate::backend::command_tag_rows;
use crate::capture::Capture;
use crate::error::{Result, WireError};
use crate::record::{json_str, write_timestamp, write_u64};
use crate::refusal::Refusal;
use crate::session_audit::{AuditConfig, SessionAudit, StatementEnd, StatementStart};

/// Per-statement data kept only when records are on.
#[derive(Debug)]
pub(crate) struct Draft {
    started: Instant,
    wall: SystemTime,
    protocol: &'static str,
    sql: Option<Arc<str>>,
    function_oid: Option<u32>,
    /// Pre-rendered JSON array of parameter values.
    params: Option<Arc<str>>,
    rows_total: Option<u64>,
    rows_in_command: u64,
    /// The last CommandComplete's tag (`tagged`); the buffer is reused by recycled drafts.
    command_tag: String,
    tagged: bool,
    error: Option<(Box<str>, Box<str>)>,
    /// The statement's number in the audit records (0: none written yet).
    audit_n: u64,
    /// DataRows forwarded to the client, all commands together.
    data_rows: u64,
    /// The result as forwarded to the client, when sessions are recorded.
    capture: Option<Capture>,
    /// A capture buffer kept from an earlier statement, for the next one.
    spare_capture: Option<Capture>,
    /// The table columns whose values were masked in this statement's results.
    masked_columns: Vec<Arc<str>>,
    /// The RowDescription a Describe of this statement's text returned (a prepared
    /// statement's rows come without one), for replay: recorded with the first execution
    /// that ends after the Describe only, the reader keeps it for the later ones.
    columns: Option<Arc<[u8]>>,
}

/// When the message being handled was fed: one monotonic clock read per feed call, on
/// demand.  Wall-clock time is derived from an anchor pair re-read at most once a
/// second, since reading both clocks for every statement costs more than the rest of
/// the record on some hosts.
#[derive(Debug)]
pub(crate) struct FeedClock {
    now: Option<Instant>,
    anchor: (Instant, SystemTime),
}

/// How long a wall-clock anchor is trusted before it is read again.
const ANCHOR_TTL: Duration = Duration::from_secs(1);

impl Default for FeedClock {
    fn default() -> Self {
        FeedClock {
            now: None,
            anchor: (Instant::now(), SystemTime::now()),
        }
    }
}

impl FeedClock {
    pub(crate) fn reset(&mut self) {
        self.now = None;
    }

    fn get(&mut self) -> Instant {
        if let Some(now) = self.now {
            return now;
        }
        let now = Instant::now();
        if now.saturating_duration_since(self.anchor.0) > ANCHOR_TTL {
            self.anchor = (now, SystemTime::now());
        }
        self.now = Some(now);
        now
    }

    fn wall(&self, at: Instant) -> SystemTime {
        self.anchor.1 + at.saturating_duration_since(self.anchor.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Query,
    Parse,
    Bind,
    Describe,
    Close,
    Sync,
    Execute,
    FunctionCall,
}

impl Kind {
    fn is_statement(self) -> bool {
        matches!(self, Kind::Query | Kind::Execute | Kind::FunctionCall)
    }
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    /// The client's message was refused and replaced: its answer is due in `refusals`.
    refused: bool,
    /// Boxed so a deep pipeline costs 16 bytes per queued message when not recording.
    draft: Option<Box<Draft>>,
    /// The statement text a Describe or Execute refers to, for a row masker.
    text: Option<Arc<str>>,
    /// A Describe the gateway sent (not the client): its answer is not forwarded.
    injected: bool,
}

/// The FIFO of client messages awaiting their response, and the finished records.
#[derive(Debug)]
pub(crate) struct StatementTracker {
    queue: VecDeque<Pending>,
    /// One per `refused` entry of `queue`, in the same order.
    refusals: VecDeque<Refusal>,
    in_flight: usize,
    /// The server is skipping messages until Sync (extended error with no Sync queued).
    discarding: bool,
    /// Drafts are kept (statement log or audit).
    recording: bool,
    /// JSON-lines statement log records are produced.
    json_log: bool,
    context_json: String,
    records: Vec<u8>,
    audit: Option<SessionAudit>,
    /// RowDescriptions returned to Describe, by statement text (recording only).
    /// The message is kept while the next Execute of the text has not taken it (`true`).
    described: HashMap<Arc<str>, (Arc<[u8]>, bool)>,
    /// Finished drafts kept for reuse (boxed: they move to and from `Pending` as they are).
    #[allow(clippy::vec_box)]
    spare: Vec<Box<Draft>>,
    /// A RowDescription being collected for `described`: (text, bytes missing); the
    /// message goes to `describe_buf`, reused from one Describe to the next.
    describing: Option<(Arc<str>, usize)>,
    describe_buf: Vec<u8>,
}

/// Finished drafts a session keeps for reuse, so that a statement allocates nothing: an
/// extended-protocol round trip uses up to three (Bind, Describe, Execute).
const SPARE_DRAFTS: usize = 4;

/// A kept capture buffer larger than this is freed rather than reused (an idle session
/// holds its spare drafts).
const SPARE_CAPTURE_BYTES: usize = 4096;

/// Upper bound on requests awaiting a response.  Socket buffers and backpressure keep
/// a well-behaved pipeline far below it (a JDBC batch of 100k rows queues 200k); a
/// client that goes beyond is refused rather than allowed to grow the queue.
pub const MAX_PENDING_REQUESTS: usize = 1 << 20;

impl StatementTracker {
    pub(crate) fn new(json_log: bool, context_json: &str, audit: Option<AuditConfig>) -> Self {
        StatementTracker {
            queue: VecDeque::new(),
            refusals: VecDeque::new(),
            in_flight: 0,
            discarding: false,
            recording: json_log || audit.is_some(),
            json_log,
            context_json: context_json.trim().to_owned(),
            records: Vec::new(),
            audit: audit.map(SessionAudit::new),
            described: HashMap::new(),
            describing: None,
            describe_buf: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Statement text is wanted (statement log or audit).
    pub(crate) fn recording(&self) -> bool {
        self.recording
    }

    /// Parameter values are wanted (statement log, or audit with parameters on).
    pub(crate) fn wants_params(&self) -> bool {
        self.json_log || self.audit.as_ref().is_some_and(SessionAudit::record_params)
    }

    /// Audit records this session could not store.
    pub(crate) fn audit_dropped(&self) -> u64 {
        self.audit.as_ref().map_or(0, SessionAudit::dropped)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing sent is waiting for a response.
    pub(crate) fn idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Requests (Sync, Parse, ... included) waiting for their response.
    pub(crate) fn pending(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn take_records(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.records)
    }

    // --- client side ------------------------------------------------------------------

    /// A client message is being forwarded.  `sql`/`params` describe the statement
    /// when records are on.  With audit on, a statement's `stmt` record is stored here,
    /// before its bytes leave the codec; an error means it must not be forwarded.
    /// Returns the statement's number in the audit (its `stmt` record's `n`), 0 when no
    /// record was written.
    pub(crate) fn sent(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        params: Option<Arc<str>>,
        function_oid: Option<u32>,
    ) -> Result<u64> {
        self.sent_with(kind, clock, sql, None, params, function_oid)
    }

    /// A Query or Parse refused in place: a replacement the server fails is forwarded
    /// instead, and that failure will be answered with `refusal`'s error.  Recorded like
    /// any statement (its `stmt` record first, with an error at its end).
    pub(crate) fn refused(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        refusal: Refusal,
    ) -> Result<()> {
        let queued = self.queue.len();
        self.sent_with(kind, clock, sql, None, None, None)?;
        if self.queue.len() > queued {
            // Not queued while the server discards until Sync: it skips the replacement.
            if let Some(p) = self.queue.back_mut() {
                p.refused = true;
                self.refusals.push_back(refusal);
            }
        }
        Ok(())
    }

    /// A refused statement's answer is still to come.
    pub(crate) fn refusals_pending(&self) -> bool {
        !self.refusals.is_empty()
    }

    /// The message at the front is a refused one whose error has not been replaced yet.
    pub(crate) fn refusal_answer_due(&self) -> bool {
        self.queue.front().is_some_and(|p| p.refused)
            && self.refusals.front().is_some_and(|r| !r.answered)
    }

    /// The refusal of the message at the front, if it is a refused one.
    pub(crate) fn front_refusal(&mut self) -> Option<&mut Refusal> {
        if self.queue.front().is_some_and(|p| p.refused) {
            self.refusals.front_mut()
        } else {
            None
        }
    }

    /// A simple Query whose text only the audit record needs: it is written from the
    /// message itself, without a copy kept for the statement's end.
    pub(crate) fn sent_query_text(&mut self, clock: &mut FeedClock, text: &str) -> Result<()> {
        self.sent_with(Kind::Query, clock, None, Some(text), None, None)
            .map(|_| ())
    }

    /// Only the audit wants statement text (no statement log).
    pub(crate) fn audit_only(&self) -> bool {
        self.audit.is_some() && !self.json_log
    }

    fn sent_with(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        text: Option<&str>,
        params: Option<Arc<str>>,
        function_oid: Option<u32>,
    ) -> Result<u64> {
        if kind == Kind::Sync {
            self.discarding = false;
        } else if self.discarding {
            // The server will skip it: it never runs and gets no response.
            return Ok(0);
        }
        let draft = if self.recording && kind != Kind::Sync && kind != Kind::Close {
            let started = clock.get();
            let wall = clock.wall(started);
            let mut d = self.spare.pop().unwrap_or_default();
            d.start(
                started,
                wall,
                match kind {
                    Kind::Query => "simple",
                    Kind::FunctionCall => "function_call",
                    _ => "extended",
                },
                sql,
                function_oid,
                params,
            );
            Some(d)
        } else {
            None
        };
        if self.queue.len() >= MAX_PENDING_REQUESTS {
            return Err(WireError::PipelineTooDeep {
                limit: MAX_PENDING_REQUESTS,
            });
        }
        let mut draft = draft;
        let mut audit_n = 0;
        if let (Some(audit), Some(d), true) = (&mut self.audit, &mut draft, kind.is_statement()) {
            d.audit_n = audit.started(StatementStart {
                at: d.wall,
                protocol: d.protocol,
                sql: d.sql.as_deref().or(text),
                params: d.params.as_deref(),
                function_oid: d.function_oid,
            })?;
            audit_n = d.audit_n;
            if let Some(limits) = audit.capture_limits() {
                d.capture = Some(match d.spare_capture.take() {
                    Some(c) => c,
                    None => Capture::new(limits),
                });
            }
        }
        if kind.is_statement() {
            self.in_flight += 1;
        }
        self.queue.push_back(Pending {
            kind,
            refused: false,
            draft,
            text: None,
            injected: false,
        });
        Ok(audit_n)
    }

    /// [`sent`](Self::sent) for a Describe or Execute, labelled with the statement text
    /// it refers to (for a row masker) when `label` is given and the message is queued (a
    /// message the server will skip is not).
    pub(crate) fn sent_labelled(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        params: Option<Arc<str>>,
        label: Option<Arc<str>>,
    ) -> Result<u64> {
        self.sent_marked(kind, clock, sql, params, |p| p.text = label)
    }

    /// A Describe of the portal an Execute is about to run, sent by the gateway for the
    /// row masker (see `SessionCodec`): its RowDescription or NoData is the masker's, not
    /// the client's.  Not queued while the server discards until Sync (it skips it).
    /// `sql`: the portal's statement text (records on), for the Describe's record if it
    /// fails and for the recording's columns.
    pub(crate) fn sent_injected_describe(
        &mut self,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
    ) -> Result<()> {
        self.sent_marked(Kind::Describe, clock, sql, None, |p| p.injected = true)
            .map(|_| ())
    }

    /// [`sent`](Self::sent), then `mark` on the queued entry (none when the server will
    /// skip the message).
    fn sent_marked(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        params: Option<Arc<str>>,
        mark: impl FnOnce(&mut Pending),
    ) -> Result<u64> {
        let before = self.queue.len();
        let n = self.sent(kind, clock, sql, params, None)?;
        if self.queue.len() > before {
            if let Some(p) = self.queue.back_mut() {
                mark(p);
            }
        }
        Ok(n)
    }

    /// The message at the front is a Describe the gateway sent.
    pub(crate) fn front_injected(&self) -> bool {
        self.queue.front().is_some_and(|p| p.injected)
    }

    /// The text of the Describe at the front (labelled by [`sent_labelled`](Self::sent_labelled)).
    pub(crate) fn front_describe_text(&self) -> Option<&Arc<str>> {
        match self.queue.front() {
            Some(p) if p.kind == Kind::Describe => p.text.as_ref(),
            _ => None,
        }
    }

    /// The text of the Execute whose rows are arriving (`None` for a simple Query).
    pub(crate) fn front_execute_text(&self) -> Option<&str> {
        match self.queue.front() {
            Some(p) if p.kind == Kind::Execute => Some(p.text.as_deref().unwrap_or("")),
            _ => None,
        }
    }

    // --- server side ------------------------------------------------------------------

    fn front_kind(&self) -> Option<Kind> {
        self.queue.front().map(|p| p.kind)
    }

    fn pop_front(&mut self) -> Option<Pending> {
        let p = self.queue.pop_front()?;
        if p.kind.is_statement() {
            self.in_flight -= 1;
        }
        if p.refused {
            self.refusals.pop_front();
        }
        Some(p)
    }

    /// Pops the front entry, which needs no record.
    fn discard_front(&mut self) {
        if let Some(Pending { draft: Some(d), .. }) = self.pop_front() {
            self.recycle(d);
        }
    }

    /// Keeps a finished draft for the next message (see [`SPARE_DRAFTS`]).
    fn recycle(&mut self, mut d: Box<Draft>) {
        if self.spare.len() < SPARE_DRAFTS {
            d.finish();
            self.spare.push(d);
        }
    }

    /// ParseComplete / BindComplete / CloseComplete / NoData / RowDescription answer
    /// the message at the front when it has the expected kind.
    pub(crate) fn answered(&mut self, kind: Kind) {
        if self.front_kind() == Some(kind) {
            self.discard_front();
        }
    }

    /// RowDescription: ends a Describe, or starts a result of the current statement.
    pub(crate) fn row_description(&mut self) {
        self.answered(Kind::Describe);
    }

    /// The current result of the statement at the front had these columns masked.
    pub(crate) fn masked_columns(&mut self, names: Vec<Arc<str>>) {
        if let Some(d) = self.front_draft() {
            for name in names {
                if !d.masked_columns.contains(&name) {
                    d.masked_columns.push(name);
                }
            }
        }
    }

    pub(crate) fn data_row(&mut self) {
        if let Some(d) = self.front_draft() {
            d.rows_in_command += 1;
            d.data_rows += 1;
        }
    }

    /// The capture of the statement whose response is arriving, if it records one.
    fn front_capture(&mut self) -> Option<&mut Capture> {
        self.front_draft()?.capture.as_mut()
    }

    /// A server message header: the current statement's capture decides to keep it.
    #[inline]
    pub(crate) fn capture_header(&mut self, tag: u8, body_len: usize) {
        self.describing = None;
        if let Some(c) = self.front_capture() {
            c.begin(tag, body_len);
        } else if tag == crate::backend::tag::ROW_DESCRIPTION {
            self.start_describing(body_len);
        }
    }

    /// A RowDescription answering a Describe: kept for the Executes of that text.
    fn start_describing(&mut self, body_len: usize) {
        let recording = self.audit.as_ref().is_some_and(SessionAudit::captures);
        let Some(p) = self.queue.front() else { return };
        if !recording || p.kind != Kind::Describe || body_len > 1 << 16 {
            return;
        }
        let Some(sql) = p.draft.as_deref().and_then(|d| d.sql.clone()) else {
            return;
        };
        let msg = &mut self.describe_buf;
        msg.clear();
        msg.push(crate::backend::tag::ROW_DESCRIPTION);
        msg.extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
        self.describing = Some((sql, body_len));
        if body_len == 0 {
            self.finish_describing();
        }
    }

    /// The RowDescription is complete: the next Execute of its text records it.
    fn finish_describing(&mut self) {
        if let Some((sql, 0)) = self.describing.take() {
            let msg = std::mem::take(&mut self.describe_buf);
            self.describe(sql, &msg);
            // A wide result's description is not kept allocated by an idle session.
            if msg.capacity() <= SPARE_CAPTURE_BYTES {
                self.describe_buf = msg;
            }
        }
    }

    /// Stores `msg` as the columns of `sql`'s next execution.  A text described again
    /// with the same columns (libpq describes the portal before every execution) keeps
    /// the stored message: no allocation.
    fn describe(&mut self, sql: Arc<str>, msg: &[u8]) {
        if let Some((columns, fresh)) = self.described.get_mut(&sql) {
            if **columns != *msg {
                *columns = msg.into();
            }
            *fresh = true;
            return;
        }
        if self.described.len() >= 1024 {
            self.described.clear(); // bounded: an old entry is only a replay nicety
        }
        self.described.insert(sql, (msg.into(), true));
    }

    /// Streamed body bytes of the current server message.
    #[inline]
    pub(crate) fn capture_body(&mut self, bytes: &[u8]) {
        if let Some((_, missing)) = &mut self.describing {
            let take = bytes.len().min(*missing);
            self.describe_buf.extend_from_slice(&bytes[..take]);
            *missing -= take;
            if *missing == 0 {
                self.finish_describing();
            }
            return;
        }
        if let Some(c) = self.front_capture() {
            c.extend(bytes);
        }
    }

    /// The body of a RowDescription the client does not get (the answer to a Describe
    /// the gateway sent): kept as the columns of its text's next execution, when
    /// recording, and never part of a statement's captured result.
    pub(crate) fn unforwarded_description(&mut self, body: &[u8]) {
        if self.describing.is_some() {
            self.capture_whole_body(body);
        }
    }

    /// The whole body of the current server message, as forwarded.
    pub(crate) fn capture_whole_body(&mut self, body: &[u8]) {
        if let Some((_, missing)) = &mut self.describing {
            self.describe_buf.truncate(5);
            self.describe_buf.extend_from_slice(body);
            *missing = 0;
            self.finish_describing();
            return;
        }
        if let Some(c) = self.front_capture() {
            c.set_body(body);
        }
    }

    fn front_draft(&mut self) -> Option<&mut Draft> {
        let p = self.queue.front_mut()?;
        if p.kind.is_statement() {
            p.draft.as_deref_mut()
        } else {
            None
        }
    }

    /// CommandComplete (`tag`) or EmptyQueryResponse (`None`).
    pub(crate) fn command_complete(&mut self, tag: Option<&str>, clock: &mut FeedClock) {
        if let Some(d) = self.front_draft() {
            if let Some(tag) = tag {
                d.count_command(command_tag_rows(tag));
                d.command_tag.clear();
                d.command_tag.push_str(tag);
                d.tagged = true;
            }
        }
        if self.front_kind() == Some(Kind::Execute) {
            self.finish_front(clock, true);
        }
    }

    /// PortalSuspended: the Execute returned its row limit.
    pub(crate) fn portal_suspended(&mut self, clock: &mut FeedClock) {
        if self.front_kind() == Some(Kind::Execute) {
            self.finish_front(clock, true);
        }
    }

    /// ErrorResponse.
    pub(crate) fn error(&mut self, sqlstate: &str, message: &str, clock: &mut FeedClock) {
        let Some(kind) = self.front_kind() else {
            return; // e.g. FATAL at shutdown: nothing was waiting.
        };
        if let Some(p) = self.queue.front_mut() {
            if let Some(d) = p.draft.as_deref_mut() {
                if d.error.is_none() {
                    d.error = Some((sqlstate.into(), message.into()));
                }
            }
        }
        match kind {
            // Simple protocol: the statement ends at ReadyForQuery, nothing is skipped.
            Kind::Query | Kind::FunctionCall => {}
            // A commit failing at Sync belongs to no statement.
            Kind::Sync => {}
            Kind::Execute => {
                self.finish_front(clock, true);
                self.skip_until_sync(clock, (sqlstate, message));
            }
            Kind::Parse | Kind::Bind | Kind::Describe => {
                // In the audit, parse, bind and execute are one statement: when an Execute
                // of it is already recorded, that statement carries the error.
                let taken = self.give_error_to_queued_execute(sqlstate, message);
                self.finish_front(clock, !taken);
                self.skip_until_sync(clock, (sqlstate, message));
            }
            Kind::Close => {
                self.discard_front();
                self.skip_until_sync(clock, (sqlstate, message));
            }
        }
    }

    /// Sets the error on the first audited Execute queued before the next Sync.
    fn give_error_to_queued_execute(&mut self, sqlstate: &str, message: &str) -> bool {
        if self.audit.is_none() {
            return false;
        }
        let execute = self
            .queue
            .iter_mut()
            .skip(1)
            .take_while(|p| p.kind != Kind::Sync)
            .find(|p| p.kind == Kind::Execute)
            .and_then(|p| p.draft.as_deref_mut())
            .filter(|d| d.audit_n != 0);
        match execute {
            Some(d) => {
                d.error
                    .get_or_insert_with(|| (sqlstate.into(), message.into()));
                true
            }
            None => false,
        }
    }

    /// The server discards everything up to Sync after an extended-protocol error.
    /// Those messages never ran; a statement among them that was already recorded gets
    /// its end, with the error that made the server skip it.
    fn skip_until_sync(&mut self, clock: &mut FeedClock, cause: (&str, &str)) {
        while let Some(kind) = self.front_kind() {
            if kind == Kind::Sync {
                return;
            }
            self.drop_front(clock, cause);
        }
        self.discarding = true;
    }

    /// Pops a message the server will never answer.
    fn drop_front(&mut self, clock: &mut FeedClock, cause: (&str, &str)) {
        let audited = self
            .queue
            .front()
            .and_then(|p| p.draft.as_deref())
            .is_some_and(|d| d.audit_n != 0);
        if !audited {
            self.discard_front();
            return;
        }
        if let Some(d) = self.queue.front_mut().and_then(|p| p.draft.as_deref_mut()) {
            if d.error.is_none() {
                let why = format!("not executed: an earlier message failed ({})", cause.1);
                d.error = Some((cause.0.into(), why.into()));
            }
        }
        self.finish_front_audit_only(clock);
    }

    /// ReadyForQuery: ends the Query / FunctionCall, or answers the Sync.
    pub(crate) fn ready(&mut self, clock: &mut FeedClock) {
        while let Some(kind) = self.front_kind() {
            match kind {
                Kind::Query | Kind::FunctionCall => {
                    self.finish_front(clock, true);
                    return;
                }
                Kind::Sync => {
                    self.discard_front();
                    return;
                }
                // Unanswered messages before the Sync were skipped by the server.
                _ => {
                    self.drop_front(clock, ("", "no response from the server"));
                }
            }
        }
    }

    /// Pops the front entry and writes its records (when it has a draft): the statement
    /// log's, and the audit's unless `audit` is false (another statement took its error).
    fn finish_front(&mut self, clock: &mut FeedClock, audit: bool) {
        let Some(p) = self.pop_front() else { return };
        let Some(mut d) = p.draft else { return };
        // A Parse / Bind / Describe gets a record only when it failed.
        if p.kind.is_statement() || d.error.is_some() {
            if d.rows_in_command > 0 {
                d.count_command(None);
            }
            let now = clock.get();
            if self.json_log {
                self.write_record(&d, now);
            }
            if audit {
                self.write_audit_end(&mut d, now);
            }
        }
        self.recycle(d);
    }

    /// Pops the front entry, writing only its audit end (the server never answered it).
    fn finish_front_audit_only(&mut self, clock: &mut FeedClock) {
        let Some(p) = self.pop_front() else { return };
        let Some(mut d) = p.draft else { return };
        let now = clock.get();
        self.write_audit_end(&mut d, now);
        self.recycle(d);
    }

    fn write_audit_end(&mut self, d: &mut Draft, now: Instant) {
        if d.protocol == "extended" && d.capture.is_some() && !self.described.is_empty() {
            // Taken at the end, not when the Execute was sent: libpq sends Bind, Describe
            // and Execute together, and the Describe's answer comes after that.
            d.columns = d.sql.as_ref().and_then(|sql| {
                let (columns, fresh) = self.described.get_mut(sql)?;
                std::mem::take(fresh).then(|| columns.clone())
            });
        }
        if let Some(audit) = &mut self.audit {
            if d.audit_n == 0 {
                // A Parse / Bind / Describe that failed: it never got a `stmt` record.
                d.audit_n = audit
                    .started(StatementStart {
                        at: d.wall,
                        protocol: d.protocol,
                        sql: d.sql.as_deref(),
                        params: d.params.as_deref(),
                        function_oid: d.function_oid,
                    })
                    .unwrap_or(0);
            }
            if d.audit_n != 0 {
                audit.ended(
                    StatementEnd {
                        n: d.audit_n,
                        started_at: d.wall,
                        elapsed: now.saturating_duration_since(d.started),
                        command_tag: d.tag(),
                        rows: d.rows_total,
                        data_rows: d.data_rows,
                        error: d.error.as_ref().map(|(s, m)| (&**s, &**m)),
                        columns: d.columns.as_deref(),
                        masked_columns: &d.masked_columns,
                    },
                    d.capture.as_ref(),
                );
            }
        }
    }

    fn write_record(&mut self, d: &Draft, now: Instant) {
        let b = &mut self.records;
        b.extend_from_slice(b"{\"ts\":");
        write_timestamp(b, d.wall);
        b.push(b',');
        if !self.context_json.is_empty() {
            b.extend_from_slice(self.context_json.as_bytes());
            b.push(b',');
        }
        b.extend_from_slice(b"\"protocol\":\"");
        b.extend_from_slice(d.protocol.as_bytes());
        b.extend_from_slice(b"\",\"statement\":");
        match &d.sql {
            Some(s) => json_str(b, s),
            None => b.extend_from_slice(b"null"),
        }
        if let Some(oid) = d.function_oid {
            b.extend_from_slice(b",\"function_oid\":");
            write_u64(b, u64::from(oid));
        }
        // Every record has the same fields: `params` is null when there are none (simple
        // protocol), so consumers never need to test for a missing key.
        b.extend_from_slice(b",\"params\":");
        match &d.params {
            Some(p) => b.extend_from_slice(p.as_bytes()),
            None => b.extend_from_slice(b"null"),
        }
        let us = now.saturating_duration_since(d.started).as_micros();
        b.extend_from_slice(b",\"duration_us\":");
        write_u64(b, u64::try_from(us).unwrap_or(u64::MAX));
        b.extend_from_slice(b",\"command_tag\":");
        match d.tag() {
            Some(t) => json_str(b, t),
            None => b.extend_from_slice(b"null"),
        }
        match d.rows_total {
            Some(n) => {
                b.extend_from_slice(b",\"rows\":");
                write_u64(b, n);
            }
            None => b.extend_from_slice(b",\"rows\":null"),
        }
        match &d.error {
            Some((state, msg)) => {
                b.extend_from_slice(b",\"sqlstate\":");
                json_str(b, state);
                b.extend_from_slice(b",\"error\":");
                json_str(b, msg);
            }
            None => b.extend_from_slice(b",\"sqlstate\":null,\"error\":null"),
        }
        b.extend_from_slice(b",\"masked_columns\":");
        if d.masked_columns.is_empty() {
            b.extend_from_slice(b"null");
        } else {
            b.push(b'[');
            for (i, name) in d.masked_columns.iter().enumerate() {
                if i > 0 {
                    b.push(b',');
                }
                json_str(b, name);
            }
            b.push(b']');
        }
        b.extend_from_slice(b"}\n");
    }
}

impl Default for Draft {
    fn default() -> Self {
        let now = Instant::now();
        Draft {
            started: now,
            wall: SystemTime::UNIX_EPOCH,
            protocol: "extended",
            sql: None,
            function_oid: None,
            params: None,
            rows_total: None,
            rows_in_command: 0,
            command_tag: String::new(),
            tagged: false,
            error: None,
            audit_n: 0,
            data_rows: 0,
            capture: None,
            spare_capture: None,
            masked_columns: Vec::new(),
            columns: None,
        }
    }
}

impl Draft {
    /// Makes a blank (or recycled) draft describe a message just sent.
    fn start(
        &mut self,
        started: Instant,
        wall: SystemTime,
        protocol: &'static str,
        sql: Option<Arc<str>>,
        function_oid: Option<u32>,
        params: Option<Arc<str>>,
    ) {
        self.started = started;
        self.wall = wall;
        self.protocol = protocol;
        self.sql = sql;
        self.function_oid = function_oid;
        self.params = params;
    }

    /// Clears a finished draft for reuse; its buffers keep their capacity.
    fn finish(&mut self) {
        self.sql = None;
        self.params = None;
        self.function_oid = None;
        self.rows_total = None;
        self.rows_in_command = 0;
        self.command_tag.clear();
        self.tagged = false;
        self.error = None;
        self.audit_n = 0;
        self.data_rows = 0;
        self.columns = None;
        self.masked_columns.clear();
        if let Some(mut c) = self.capture.take() {
            if c.capacity() <= SPARE_CAPTURE_BYTES {
                c.clear();
                self.spare_capture = Some(c);
            }
        }
    }

    /// The last command's tag, once one arrived.
    fn tag(&self) -> Option<&str> {
        self.tagged.then_some(self.command_tag.as_str())
    }

    /// Adds one command's rows: the count in its tag, else the DataRows it returned.
    fn count_command(&mut self, tag_rows: Option<u64>) {
        let n = tag_rows.or((self.rows_in_command > 0).then_some(self.rows_in_command));
        if let Some(n) = n {
            self.rows_total = Some(self.rows_total.unwrap_or(0) + n);
        }
        self.rows_in_command = 0;
    }
}

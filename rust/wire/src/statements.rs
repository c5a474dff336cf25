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

use crate::backend::command_tag_rows;
use crate::error::{Result, WireError};
use crate::record::{json_str, write_timestamp, write_u64};

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
    command_tag: Option<Box<str>>,
    error: Option<(Box<str>, Box<str>)>,
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
    /// Boxed so a deep pipeline costs 16 bytes per queued message when not recording.
    draft: Option<Box<Draft>>,
}

/// The FIFO of client messages awaiting their response, and the finished records.
#[derive(Debug)]
pub(crate) struct StatementTracker {
    queue: VecDeque<Pending>,
    in_flight: usize,
    /// The server is skipping messages until Sync (extended error with no Sync queued).
    discarding: bool,
    recording: bool,
    context_json: String,
    records: Vec<u8>,
}

/// Upper bound on requests awaiting a response.  Socket buffers and backpressure keep
/// a well-behaved pipeline far below it (a JDBC batch of 100k rows queues 200k); a
/// client that goes beyond is refused rather than allowed to grow the queue.
pub const MAX_PENDING_REQUESTS: usize = 1 << 20;

impl StatementTracker {
    pub(crate) fn new(recording: bool, context_json: &str) -> Self {
        StatementTracker {
            queue: VecDeque::new(),
            in_flight: 0,
            discarding: false,
            recording,
            context_json: context_json.trim().to_owned(),
            records: Vec::new(),
        }
    }

    pub(crate) fn recording(&self) -> bool {
        self.recording
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

    /// A client message was forwarded.  `sql`/`params` describe the statement when
    /// records are on.
    pub(crate) fn sent(
        &mut self,
        kind: Kind,
        clock: &mut FeedClock,
        sql: Option<Arc<str>>,
        params: Option<Arc<str>>,
        function_oid: Option<u32>,
    ) -> Result<()> {
        if kind == Kind::Sync {
            self.discarding = false;
        } else if self.discarding {
            // The server will skip it: it never runs and gets no response.
            return Ok(());
        }
        let draft = if self.recording && kind != Kind::Sync && kind != Kind::Close {
            let started = clock.get();
            let wall = clock.wall(started);
            Some(Box::new(Draft {
                started,
                wall,
                protocol: match kind {
                    Kind::Query => "simple",
                    Kind::FunctionCall => "function_call",
                    _ => "extended",
                },
                sql,
                function_oid,
                params,
                rows_total: None,
                rows_in_command: 0,
                command_tag: None,
                error: None,
            }))
        } else {
            None
        };
        if self.queue.len() >= MAX_PENDING_REQUESTS {
            return Err(WireError::PipelineTooDeep {
                limit: MAX_PENDING_REQUESTS,
            });
        }
        if kind.is_statement() {
            self.in_flight += 1;
        }
        self.queue.push_back(Pending { kind, draft });
        Ok(())
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
        Some(p)
    }

    /// ParseComplete / BindComplete / CloseComplete / NoData / RowDescription answer
    /// the message at the front when it has the expected kind.
    pub(crate) fn answered(&mut self, kind: Kind) {
        if self.front_kind() == Some(kind) {
            self.pop_front();
        }
    }

    /// RowDescription: ends a Describe, or starts a result of the current statement.
    pub(crate) fn row_description(&mut self) {
        self.answered(Kind::Describe);
    }

    pub(crate) fn data_row(&mut self) {
        if let Some(d) = self.front_draft() {
            d.rows_in_command += 1;
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
                d.command_tag = Some(tag.into());
            }
        }
        if self.front_kind() == Some(Kind::Execute) {
            self.finish_front(clock);
        }
    }

    /// PortalSuspended: the Execute returned its row limit.
    pub(crate) fn portal_suspended(&mut self, clock: &mut FeedClock) {
        if self.front_kind() == Some(Kind::Execute) {
            self.finish_front(clock);
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
            Kind::Execute | Kind::Parse | Kind::Bind | Kind::Describe => {
                self.finish_front(clock);
                self.skip_until_sync();
            }
            Kind::Close => {
                self.pop_front();
                self.skip_until_sync();
            }
        }
    }

    /// The server discards everything up to Sync after an extended-protocol error:
    /// those messages never ran and get no record.
    fn skip_until_sync(&mut self) {
        while let Some(kind) = self.front_kind() {
            if kind == Kind::Sync {
                return;
            }
            self.pop_front();
        }
        self.discarding = true;
    }

    /// ReadyForQuery: ends the Query / FunctionCall, or answers the Sync.
    pub(crate) fn ready(&mut self, clock: &mut FeedClock) {
        while let Some(kind) = self.front_kind() {
            match kind {
                Kind::Query | Kind::FunctionCall => {
                    self.finish_front(clock);
                    return;
                }
                Kind::Sync => {
                    self.pop_front();
                    return;
                }
                // Unanswered messages before the Sync were skipped by the server.
                _ => {
                    self.pop_front();
                }
            }
        }
    }

    /// Pops the front entry and writes its record (when it has a draft).
    fn finish_front(&mut self, clock: &mut FeedClock) {
        let Some(p) = self.pop_front() else { return };
        let Some(mut d) = p.draft else { return };
        // A Parse / Bind / Describe gets a record only when it failed.
        if !p.kind.is_statement() && d.error.is_none() {
            return;
        }
        if d.rows_in_command > 0 {
            d.count_command(None);
        }
        let now = clock.get();
        self.write_record(&d, now);
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
        if let Some(p) = &d.params {
            b.extend_from_slice(b",\"params\":");
            b.extend_from_slice(p.as_bytes());
        }
        let us = now.saturating_duration_since(d.started).as_micros();
        b.extend_from_slice(b",\"duration_us\":");
        write_u64(b, u64::try_from(us).unwrap_or(u64::MAX));
        b.extend_from_slice(b",\"command_tag\":");
        match &d.command_tag {
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
        b.extend_from_slice(b"}\n");
    }
}

impl Draft {
    /// Adds one command's rows: the count in its tag, else the DataRows it returned.
    fn count_command(&mut self, tag_rows: Option<u64>) {
        let n = tag_rows.or((self.rows_in_command > 0).then_some(self.rows_in_command));
        if let Some(n) = n {
            self.rows_total = Some(self.rows_total.unwrap_or(0) + n);
        }
        self.rows_in_command = 0;
    }
}

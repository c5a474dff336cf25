//! [`SessionCodec`]: both directions of one relayed session after authentication.
//! One call per received chunk and direction; it frames, tracks statements, reports
//! events and hands back the bytes to forward (the input itself when unchanged).

use std::sync::Arc;

use crate::backend::{
    self, decode_command_complete, field, Fields, RowDescription, TransactionStatus,
};
use crate::client_stream::ClientStream;
use crate::error::{Direction, Result, WireError};
use crate::events::{ClientEvent, ServerEvent};
use crate::forward::{Forward, OutBuf};
use crate::frontend::{
    self, Bind, Close, Describe, Execute, FrontendMessage, FunctionCall, Parse, Query, Target,
};
use crate::limits::DEFAULT_MAX_MESSAGE_LEN;
use crate::masker::DataRowMasker;
use crate::names::{Portal, PreparedNames};
use crate::record::json_param;
use crate::refusal::{self, NonUtf8Statement};
use crate::server_stream::{BodyUse, Rewrite, ServerSink, ServerStream};
use crate::session_audit::AuditConfig;
use crate::statements::{FeedClock, Kind, StatementTracker};

/// Options of a [`SessionCodec`].
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest message accepted in either direction (length field included).
    pub max_message_len: usize,
    /// JSON object members (without braces) spliced into every record.
    pub context_json: String,
    /// Produce one JSON line per finished statement (see [`SessionCodec::take_records`]).
    pub record_statements: bool,
    /// Report Query / Parse / Execute / FunctionCall events (Terminate is always reported).
    pub client_events: bool,
    /// Parameter values longer than this are cut in records.
    pub max_param_bytes: usize,
    /// Write audit records to a spool (see [`crate::session_audit`]).
    pub audit: Option<AuditConfig>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_message_len: DEFAULT_MAX_MESSAGE_LEN,
            context_json: String::new(),
            record_statements: false,
            client_events: false,
            max_param_bytes: 1024,
            audit: None,
        }
    }
}

/// The relay-phase state machine of one session.
pub struct SessionCodec {
    client: ClientStream,
    server: ServerStream,
    client_out: OutBuf,
    server_out: OutBuf,
    client_events: Vec<ClientEvent>,
    server_events: Vec<ServerEvent>,
    tracker: StatementTracker,
    names: PreparedNames,
    clock: FeedClock,
    status: TransactionStatus,
    masker: Option<Box<dyn DataRowMasker>>,
    client_failed: Option<WireError>,
    server_failed: Option<WireError>,
    emit_client_events: bool,
    max_param_bytes: usize,
    /// The portal the client's last message described (Describe of a portal), if it was
    /// one: an Execute of it right after needs no Describe from the gateway.
    described_portal: Option<Box<[u8]>>,
    counters: Counters,
}

/// What a session has relayed so far, for the gateway's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Statements the client sent: Query, Execute and FunctionCall messages (a Query with
    /// several statements counts once, as one round trip).
    pub statements: u64,
    /// Bytes received from the client and from the server.
    pub client_bytes: u64,
    pub server_bytes: u64,
}

impl SessionCodec {
    pub fn new(config: SessionConfig) -> Self {
        SessionCodec {
            client: ClientStream::new(config.max_message_len),
            server: ServerStream::new(config.max_message_len),
            client_out: OutBuf::default(),
            server_out: OutBuf::default(),
            client_events: Vec::new(),
            server_events: Vec::new(),
            tracker: StatementTracker::new(
                config.record_statements,
                &config.context_json,
                config.audit.clone(),
            ),
            names: PreparedNames::default(),
            clock: FeedClock::default(),
            status: TransactionStatus::Idle,
            masker: None,
            client_failed: None,
            server_failed: None,
            emit_client_events: config.client_events,
            max_param_bytes: config.max_param_bytes,
            described_portal: None,
            counters: Counters::default(),
        }
    }

    /// What the session has relayed so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Installs (or removes) the DataRow rewrite hook.
    pub fn set_masker(&mut self, masker: Option<Box<dyn DataRowMasker>>) {
        self.masker = masker;
    }

    /// Frames one chunk from the client.  Complete messages are forwarded; an incomplete
    /// one is held until it is whole, except CopyData which streams.  Events are in
    /// [`client_events`](Self::client_events) until the next call.
    ///
    /// After an error the session cannot be resynchronised: every later call fails too.
    pub fn feed_client(&mut self, input: &[u8]) -> Result<Forward> {
        if let Some(e) = &self.client_failed {
            return Err(e.clone());
        }
        self.client_out.reset();
        self.client_events.clear();
        self.clock.reset();
        self.counters.client_bytes += input.len() as u64;
        let mut handler = ClientHandler {
            tracker: &mut self.tracker,
            names: &mut self.names,
            events: &mut self.client_events,
            clock: &mut self.clock,
            emit_events: self.emit_client_events,
            max_param_bytes: self.max_param_bytes,
            masking: self.masker.is_some(),
            described_portal: &mut self.described_portal,
            statements: &mut self.counters.statements,
        };
        let r = self
            .client
            .feed(input, &mut self.client_out, |tag, body, start, end| {
                handler.message(tag, body, start, end)
            });
        match r {
            Ok(()) => Ok(self.client_out.result(input.len())),
            Err(e) => {
                self.client_failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Scans one chunk from the server.  Every byte is forwarded as received unless a
    /// masker rewrites rows.  Events are in [`server_events`](Self::server_events).
    pub fn feed_server(&mut self, input: &[u8]) -> Result<Forward> {
        if let Some(e) = &self.server_failed {
            return Err(e.clone());
        }
        self.server_out.reset();
        self.server_events.clear();
        self.clock.reset();
        self.counters.server_bytes += input.len() as u64;
        // Messages are held (explicit forwarding) for a masker, or while a refused
        // statement's answer is due: it is replaced.
        let holding = self.masker.is_some() || self.tracker.refusals_pending();
        let mut sink = ServerHandler {
            tracker: &mut self.tracker,
            names: &mut self.names,
            events: &mut self.server_events,
            clock: &mut self.clock,
            status: &mut self.status,
            masker: self.masker.as_deref_mut(),
        };
        match self
            .server
            .feed(input, &mut self.server_out, &mut sink, holding)
        {
            Ok(()) => Ok(self.server_out.result(input.len())),
            Err(e) => {
                self.server_failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The buffer a [`Forward::Buffered`] result of `feed_client` refers to.
    pub fn client_buffer(&self) -> &[u8] {
        self.client_out.buffered()
    }

    /// The buffer a [`Forward::Buffered`] result of `feed_server` refers to.
    pub fn server_buffer(&self) -> &[u8] {
        self.server_out.buffered()
    }

    pub fn client_events(&self) -> &[ClientEvent] {
        &self.client_events
    }

    pub fn server_events(&self) -> &[ServerEvent] {
        &self.server_events
    }

    /// JSON lines of the statements finished since the last call.
    pub fn take_records(&mut self) -> Vec<u8> {
        self.tracker.take_records()
    }

    /// Status of the last ReadyForQuery (Idle before the first one).
    pub fn transaction_status(&self) -> TransactionStatus {
        self.status
    }

    /// Statements (Query, Execute, FunctionCall) sent upstream and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// Requests awaiting a response: statements plus Parse, Bind, Describe, Close and
    /// Sync.  Zero means the server owes the client nothing.
    pub fn pending_requests(&self) -> usize {
        self.tracker.pending()
    }

    /// Audit records this session could not store (relaxed audit).
    pub fn audit_dropped(&self) -> u64 {
        self.tracker.audit_dropped()
    }

    /// Client bytes held back because their message is not complete yet.
    pub fn held_client_bytes(&self) -> usize {
        self.client.held_len()
    }

    /// Bytes of the current server message the client is still owed: 0 when the bytes
    /// forwarded to the client so far end at a message boundary, the only place the
    /// gateway may add a message of its own (a FATAL when it ends the session).  When
    /// not 0, feeding at most this many bytes cannot pass the end of the message.
    pub fn server_bytes_owed(&self) -> usize {
        self.server.owed_to_client()
    }
}

/// Handles each complete client message.
struct ClientHandler<'a> {
    tracker: &'a mut StatementTracker,
    names: &'a mut PreparedNames,
    events: &'a mut Vec<ClientEvent>,
    clock: &'a mut FeedClock,
    emit_events: bool,
    max_param_bytes: usize,
    /// A row masker needs the text each Describe and Execute refers to.
    masking: bool,
    described_portal: &'a mut Option<Box<[u8]>>,
    statements: &'a mut u64,
}

impl ClientHandler<'_> {
    fn wants_text(&self) -> bool {
        self.emit_events || self.masking || self.tracker.recording()
    }

    /// One complete client message; `Some` is a message to forward in its place.
    fn message(
        &mut self,
        tag: u8,
        body: &[u8],
        start: usize,
        end: usize,
    ) -> Result<Option<Vec<u8>>> {
        if matches!(
            tag,
            frontend::tag::QUERY | frontend::tag::EXECUTE | frontend::tag::FUNCTION_CALL
        ) {
            *self.statements += 1;
        }
        match self.forwarded(tag, body, start, end) {
            Ok(replacement) => Ok(replacement),
            Err(e @ WireError::Malformed { .. }) => match refusal::non_utf8_statement(tag, body) {
                Some(statement) => self.refuse(tag, statement).map(Some),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// A Query or Parse refused in place (see [`crate::refusal`]): recorded as the client
    /// sent it, no event (there is nothing left to decide), the replacement forwarded.
    fn refuse(&mut self, tag: u8, statement: NonUtf8Statement) -> Result<Vec<u8>> {
        let kind = if tag == frontend::tag::QUERY {
            Kind::Query
        } else {
            Kind::Parse
        };
        let sql = self
            .tracker
            .recording()
            .then(|| Arc::<str>::from(statement.sql));
        if let (Some(name), Some(sql)) = (&statement.name, &sql) {
            // The server has no statement of that name after the failed Parse (or an
            // older one, which keeps its text): a Bind of it in the same batch is
            // skipped, and recorded with this text and the error.
            if name.is_empty() || self.names.statement(name.as_bytes()).is_none() {
                self.names.define_statement(name.as_bytes(), sql.clone());
            }
        }
        self.tracker
            .refused(kind, self.clock, sql, statement.refusal)?;
        Ok(statement.replacement)
    }

    /// Tracks one client message; `Some` is what to forward in its place.
    fn forwarded(
        &mut self,
        tag: u8,
        body: &[u8],
        start: usize,
        end: usize,
    ) -> Result<Option<Vec<u8>>> {
        let recording = self.tracker.recording();
        let described_portal = self.described_portal.take();
        let mut replacement = None;
        match tag {
            frontend::tag::QUERY => {
                let q = Query::decode(body)?;
                if !self.emit_events && self.tracker.audit_only() {
                    // The audit record is written from the message: no copy of the text.
                    self.tracker.sent_query_text(self.clock, q.sql)?;
                    return Ok(None);
                }
                let sql = self.wants_text().then(|| Arc::<str>::from(q.sql));
                let text = if self.emit_events { sql.clone() } else { None };
                let n = self
                    .tracker
                    .sent(Kind::Query, self.clock, sql, None, None)?;
                if self.emit_events {
                    self.events.push(ClientEvent::Query {
                        sql: text.unwrap_or_default(),
                        n,
                        start,
                        end,
                    });
                }
            }
            frontend::tag::PARSE => {
                let p = Parse::decode(body)?;
                let sql = self.wants_text().then(|| Arc::<str>::from(p.sql));
                if let Some(sql) = &sql {
                    self.names.define_statement(p.name.as_bytes(), sql.clone());
                }
                if self.emit_events {
                    self.events.push(ClientEvent::Parse {
                        name: p.name.into(),
                        sql: sql.clone().unwrap_or_default(),
                        start,
                        end,
                    });
                }
                self.tracker
                    .sent(Kind::Parse, self.clock, sql, None, None)?;
            }
            frontend::tag::BIND => {
                let b = Bind::decode(body)?;
                let mut sql = None;
                let mut params = None;
                if self.wants_text() {
                    let text = self
                        .names
                        .statement(b.statement)
                        .cloned()
                        .unwrap_or_default();
                    params = self
                        .tracker
                        .wants_params()
                        .then(|| self.render_bind_params(&b));
                    self.names.bind_portal(
                        b.portal,
                        Portal {
                            sql: text.clone(),
                            params: params.clone(),
                        },
                    );
                    sql = Some(text);
                }
                self.tracker
                    .sent(Kind::Bind, self.clock, sql, params, None)?;
            }
            frontend::tag::EXECUTE => {
                let e = Execute::decode(body)?;
                let (sql, params) = if self.wants_text() {
                    match self.names.portal(e.portal) {
                        Some(p) => (Some(p.sql.clone()), p.params.clone()),
                        // Unknown portal: the server will refuse it.
                        None => (Some(Arc::<str>::from("")), None),
                    }
                } else {
                    (None, None)
                };
                let (mut start, mut end) = (start, end);
                if self.masking && described_portal.as_deref() != Some(e.portal) {
                    // The portal's columns, as the server has them now: a description of
                    // its statement made earlier may no longer hold (the statement was
                    // planned again after a table it names was dropped or search_path
                    // changed, or it is an EXECUTE or FETCH whose target changed).
                    self.tracker
                        .sent_injected_describe(self.clock, sql.clone().filter(|_| recording))?;
                    let describe = describe_portal(e.portal);
                    let mut both = Vec::with_capacity(describe.len() + 5 + body.len());
                    both.extend_from_slice(&describe);
                    both.push(tag);
                    both.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                    both.extend_from_slice(body);
                    start += describe.len();
                    end += describe.len();
                    replacement = Some(both);
                }
                let text = if self.emit_events { sql.clone() } else { None };
                let label = if self.masking { sql.clone() } else { None };
                let n = self.tracker.sent_labelled(
                    Kind::Execute,
                    self.clock,
                    sql.filter(|_| recording),
                    params,
                    label,
                )?;
                if self.emit_events {
                    self.events.push(ClientEvent::Execute {
                        portal: String::from_utf8_lossy(e.portal).into(),
                        sql: text.unwrap_or_default(),
                        n,
                        start,
                        end,
                    });
                }
            }
            frontend::tag::DESCRIBE => {
                let d = Describe::decode(body)?;
                if matches!(d.target, Target::Portal) {
                    *self.described_portal = Some(d.name.into());
                }
                let sql = if recording || self.masking {
                    match d.target {
                        Target::Statement => self.names.statement(d.name).cloned(),
                        Target::Portal => self.names.portal(d.name).map(|p| p.sql.clone()),
                    }
                } else {
                    None
                };
                // An unknown name gets "", never described: its rows are masked whole.
                let label = self
                    .masking
                    .then(|| sql.clone().unwrap_or_else(|| Arc::from("")));
                self.tracker.sent_labelled(
                    Kind::Describe,
                    self.clock,
                    sql.filter(|_| recording),
                    None,
                    label,
                )?;
            }
            frontend::tag::CLOSE => {
                let c = Close::decode(body)?;
                match c.target {
                    Target::Statement => self.names.close_statement(c.name),
                    Target::Portal => self.names.close_portal(c.name),
                }
                self.tracker
                    .sent(Kind::Close, self.clock, None, None, None)?;
            }
            frontend::tag::SYNC => {
                FrontendMessage::decode(tag, body)?;
                self.tracker
                    .sent(Kind::Sync, self.clock, None, None, None)?;
            }
            frontend::tag::FUNCTION_CALL => {
                let f = FunctionCall::decode(body)?;
                if self.emit_events {
                    self.events.push(ClientEvent::FunctionCall {
                        function_oid: f.function_oid,
                        start,
                        end,
                    });
                }
                let params = self
                    .tracker
                    .wants_params()
                    .then(|| self.render_function_args(&f));
                self.tracker.sent(
                    Kind::FunctionCall,
                    self.clock,
                    None,
                    params,
                    Some(f.function_oid),
                )?;
            }
            frontend::tag::TERMINATE => {
                FrontendMessage::decode(tag, body)?;
                self.events.push(ClientEvent::Terminate { start, end });
            }
            frontend::tag::FLUSH | frontend::tag::COPY_DONE | frontend::tag::COPY_FAIL => {
                FrontendMessage::decode(tag, body)?;
            }
            // Authentication responses have no place after startup; anything else is
            // not a frontend message at all.
            _ => {
                return Err(WireError::UnknownTag {
                    tag,
                    direction: Direction::Frontend,
                })
            }
        }
        Ok(replacement)
    }

    fn render_bind_params(&self, b: &Bind<'_>) -> Arc<str> {
        let mut buf = Vec::with_capacity(64);
        buf.push(b'[');
        for (i, v) in b.params.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            json_param(&mut buf, v, b.param_format(i) == 1, self.max_param_bytes);
        }
        buf.push(b']');
        Arc::from(String::from_utf8(buf).unwrap_or_default())
    }

    fn render_function_args(&self, f: &FunctionCall<'_>) -> Arc<str> {
        let mut buf = Vec::with_capacity(64);
        buf.push(b'[');
        for (i, v) in f.args.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            let format = match f.arg_formats.len() {
                0 => 0,
                1 => f.arg_formats.get(0).unwrap_or(0),
                _ => f.arg_formats.get(i).unwrap_or(0),
            };
            json_param(&mut buf, v, format == 1, self.max_param_bytes);
        }
        buf.push(b']');
        Arc::from(String::from_utf8(buf).unwrap_or_default())
    }
}

/// Handles server message headers and the control messages the session reads.
struct ServerHandler<'a> {
    tracker: &'a mut StatementTracker,
    names: &'a mut PreparedNames,
    events: &'a mut Vec<ServerEvent>,
    clock: &'a mut FeedClock,
    status: &'a mut TransactionStatus,
    masker: Option<&'a mut (dyn DataRowMasker + 'static)>,
}

/// A Describe message of portal `name`.
fn describe_portal(name: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(7 + name.len());
    m.push(frontend::tag::DESCRIBE);
    m.extend_from_slice(&((6 + name.len()) as u32).to_be_bytes());
    m.push(b'P');
    m.extend_from_slice(name);
    m.push(0);
    m
}

/// Fixed body sizes of backend messages, checked from the header alone.
fn check_fixed_len(tag: u8, body_len: usize) -> Result<()> {
    use backend::tag as t;
    let expected = match tag {
        t::EMPTY_QUERY_RESPONSE
        | t::NO_DATA
        | t::PARSE_COMPLETE
        | t::BIND_COMPLETE
        | t::CLOSE_COMPLETE
        | t::PORTAL_SUSPENDED
        | t::COPY_DONE => 0,
        t::READY_FOR_QUERY => 1,
        _ => return Ok(()),
    };
    if body_len == expected {
        Ok(())
    } else {
        Err(WireError::Malformed {
            what: "fixed-size server message",
        })
    }
}

impl ServerSink for ServerHandler<'_> {
    #[inline]
    fn on_header(&mut self, tag: u8, body_len: usize) -> Result<BodyUse> {
        use backend::tag as t;
        // Before anything below can finish the statement this message belongs to.
        self.tracker.capture_header(tag, body_len);
        if matches!(
            tag,
            t::COMMAND_COMPLETE | t::EMPTY_QUERY_RESPONSE | t::PORTAL_SUSPENDED | t::ERROR_RESPONSE
        ) {
            if let Some(m) = self.masker.as_deref_mut() {
                let masked = m.result_end();
                if !masked.is_empty() {
                    self.tracker.masked_columns(masked);
                }
            }
        }
        Ok(match tag {
            t::DATA_ROW => {
                self.tracker.data_row();
                let statement = self.tracker.front_execute_text();
                let wanted = match self.masker.as_deref_mut() {
                    Some(m) => m.wants_rows(statement),
                    None => false,
                };
                if wanted {
                    BodyUse::Hold
                } else {
                    BodyUse::Skip
                }
            }
            t::ERROR_RESPONSE
                if self.tracker.refusal_answer_due()
                    || self.masker.as_ref().is_some_and(|m| m.wants_errors()) =>
            {
                BodyUse::Hold
            }
            t::COMMAND_COMPLETE | t::ERROR_RESPONSE => BodyUse::Assemble,
            t::READY_FOR_QUERY => {
                check_fixed_len(tag, body_len)?;
                BodyUse::Assemble
            }
            t::ROW_DESCRIPTION => {
                // The answer to a Describe the gateway sent describes the result of the
                // Execute that follows it; it is the masker's alone.
                let injected = self.tracker.front_injected();
                if let Some(m) = self.masker.as_deref_mut() {
                    m.describes(if injected {
                        None
                    } else {
                        self.tracker.front_describe_text()
                    });
                }
                self.tracker.row_description();
                if injected {
                    BodyUse::Hold
                } else if self.masker.is_some() {
                    BodyUse::Assemble
                } else {
                    BodyUse::Skip
                }
            }
            t::NO_DATA if self.tracker.front_injected() => {
                check_fixed_len(tag, body_len)?;
                self.tracker.answered(Kind::Describe);
                BodyUse::Hold
            }
            t::EMPTY_QUERY_RESPONSE => {
                check_fixed_len(tag, body_len)?;
                self.tracker.command_complete(None, self.clock);
                BodyUse::Skip
            }
            t::PORTAL_SUSPENDED => {
                check_fixed_len(tag, body_len)?;
                self.tracker.portal_suspended(self.clock);
                BodyUse::Skip
            }
            t::PARSE_COMPLETE | t::BIND_COMPLETE | t::CLOSE_COMPLETE | t::NO_DATA => {
                check_fixed_len(tag, body_len)?;
                self.tracker.answered(match tag {
                    t::PARSE_COMPLETE => Kind::Parse,
                    t::BIND_COMPLETE => Kind::Bind,
                    t::CLOSE_COMPLETE => Kind::Close,
                    _ => Kind::Describe,
                });
                BodyUse::Skip
            }
            t::COPY_DONE => {
                check_fixed_len(tag, body_len)?;
                BodyUse::Skip
            }
            t::PARAMETER_DESCRIPTION
            | t::PARAMETER_STATUS
            | t::BACKEND_KEY_DATA
            | t::NOTICE_RESPONSE
            | t::NOTIFICATION_RESPONSE
            | t::COPY_IN_RESPONSE
            | t::COPY_OUT_RESPONSE
            | t::COPY_BOTH_RESPONSE
            | t::COPY_DATA
            | t::FUNCTION_CALL_RESPONSE
            | t::NEGOTIATE_PROTOCOL_VERSION
            | t::AUTHENTICATION => BodyUse::Skip,
            _ => {
                return Err(WireError::UnknownTag {
                    tag,
                    direction: Direction::Backend,
                })
            }
        })
    }

    fn on_message(&mut self, tag: u8, body: &[u8]) -> Result<()> {
        use backend::tag as t;
        self.tracker.capture_whole_body(body);
        match tag {
            t::COMMAND_COMPLETE => {
                let command = decode_command_complete(body)?;
                self.tracker.command_complete(Some(command), self.clock);
            }
            t::ERROR_RESPONSE => {
                let fields = Fields::decode(body, "ErrorResponse")?;
                let text = |code| {
                    String::from_utf8_lossy(fields.get(code).unwrap_or_default()).into_owned()
                };
                let severity =
                    String::from_utf8_lossy(fields.severity().unwrap_or_default()).into_owned();
                let sqlstate = text(field::SQLSTATE);
                let message = text(field::MESSAGE);
                self.tracker.error(&sqlstate, &message, self.clock);
                self.events.push(ServerEvent::Error {
                    severity,
                    sqlstate,
                    message,
                });
            }
            t::READY_FOR_QUERY => {
                let status = TransactionStatus::from_byte(body[0])?;
                *self.status = status;
                self.tracker.ready(self.clock);
                if status == TransactionStatus::Idle && self.tracker.idle() {
                    self.names.end_transaction();
                }
                if let Some(m) = self.masker.as_deref_mut() {
                    m.reset();
                }
                self.events.push(ServerEvent::Ready(status));
            }
            t::ROW_DESCRIPTION => {
                let rd = RowDescription::decode(body)?;
                if let Some(m) = self.masker.as_deref_mut() {
                    m.describe(&rd);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn rewrite(&mut self, tag: u8, body: &[u8], out: &mut Vec<u8>) -> Result<Rewrite> {
        match tag {
            // Held only as the answer to a Describe the gateway sent.
            backend::tag::ROW_DESCRIPTION => {
                let rd = RowDescription::decode(body)?;
                if let Some(m) = self.masker.as_deref_mut() {
                    m.describe(&rd);
                }
                self.tracker.unforwarded_description(body);
                return Ok(Rewrite::Drop);
            }
            backend::tag::NO_DATA => return Ok(Rewrite::Drop),
            _ => {}
        }
        if tag == backend::tag::ERROR_RESPONSE {
            // The server's answer to a refused statement's replacement.
            let mut replaced = match self.tracker.front_refusal() {
                Some(r) => {
                    let replaced = r.replace_error(body, out)?;
                    r.answered |= replaced;
                    replaced
                }
                None => false,
            };
            if !replaced {
                // An error about a masked table may show a masked value in its DETAIL.
                if let Some(m) = self.masker.as_deref_mut() {
                    replaced = m.mask_error(body, out);
                }
            }
            self.on_message(tag, if replaced { out } else { body })?;
            return Ok(if replaced {
                Rewrite::Replace
            } else {
                Rewrite::Keep
            });
        }
        let rewritten = match self.masker.as_deref_mut() {
            Some(m) => m.mask_row(body, out),
            None => false,
        };
        // Recorded as the client gets it.
        self.tracker
            .capture_whole_body(if rewritten { out } else { body });
        Ok(if rewritten {
            Rewrite::Replace
        } else {
            Rewrite::Keep
        })
    }

    #[inline]
    fn skipped(&mut self, bytes: &[u8]) {
        self.tracker.capture_body(bytes);
    }
}

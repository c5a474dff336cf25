//! `SessionCodec` for Python: one call per chunk, events as tuples, the input `bytes`
//! object handed back untouched when nothing was rewritten.

use pgwarden_wire::backend::TransactionStatus;
use pgwarden_wire::events::kind;
use pgwarden_wire::{
    AuditConfig, CaptureLimits, ClientEvent, ColumnMasker, Forward, MaskStyle, MaskedColumn,
    ServerEvent, SessionConfig, DEFAULT_MAX_MESSAGE_LEN,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};

use crate::audit::{feed_err, AuditSpool};
use crate::wire_err;

/// One masked column as Python gives it: table OID, attribute number, replacement (None:
/// NULL), name, characters kept at the end.
type MaskSpec = (u32, i16, Option<Vec<u8>>, String, usize);

/// Both directions of one relayed session after authentication.
#[pyclass(module = "pgwarden._wire")]
pub struct SessionCodec {
    inner: pgwarden_wire::SessionCodec,
    /// `(EV_READY, "I" | "T" | "E")`: immutable, so built once and shared.
    ready_events: [Py<PyTuple>; 3],
}

fn status_str(s: TransactionStatus) -> &'static str {
    match s {
        TransactionStatus::Idle => "I",
        TransactionStatus::InTransaction => "T",
        TransactionStatus::Failed => "E",
    }
}

fn status_index(s: TransactionStatus) -> usize {
    match s {
        TransactionStatus::Idle => 0,
        TransactionStatus::InTransaction => 1,
        TransactionStatus::Failed => 2,
    }
}

/// The bytes to forward: the input object itself on the fast path.
fn forwarded<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    fwd: Forward,
    buffer: &[u8],
) -> Bound<'py, PyBytes> {
    match fwd {
        Forward::Unchanged => data.clone(),
        other => PyBytes::new(py, other.select(data.as_bytes(), buffer)),
    }
}

fn client_event<'py>(py: Python<'py>, ev: &ClientEvent) -> PyResult<Bound<'py, PyTuple>> {
    match ev {
        ClientEvent::Query { sql, n, start, end } => {
            (kind::QUERY, &**sql, n, start, end).into_pyobject(py)
        }
        ClientEvent::Parse {
            name,
            sql,
            start,
            end,
        } => (kind::PARSE, &**name, &**sql, start, end).into_pyobject(py),
        ClientEvent::Execute {
            portal,
            sql,
            n,
            start,
            end,
        } => (kind::EXECUTE, &**portal, &**sql, n, start, end).into_pyobject(py),
        ClientEvent::FunctionCall {
            function_oid,
            start,
            end,
        } => (kind::FUNCTION_CALL, function_oid, start, end).into_pyobject(py),
        ClientEvent::Terminate { start, end } => (kind::TERMINATE, start, end).into_pyobject(py),
    }
}

#[pymethods]
impl SessionCodec {
    #[new]
    #[pyo3(signature = (
        *,
        max_message_len = DEFAULT_MAX_MESSAGE_LEN,
        context_json = String::new(),
        record_statements = false,
        client_events = false,
        max_param_bytes = 1024,
        audit = None,
        audit_session = String::new(),
        audit_params = false,
        audit_strict = true,
        capture_rows = 0,
        capture_bytes = 0,
    ), text_signature = "(*, max_message_len=..., context_json='', record_statements=False, client_events=False, max_param_bytes=1024, audit=None, audit_session='', audit_params=False, audit_strict=True, capture_rows=0, capture_bytes=0)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        max_message_len: usize,
        context_json: String,
        record_statements: bool,
        client_events: bool,
        max_param_bytes: usize,
        audit: Option<PyRef<'_, AuditSpool>>,
        audit_session: String,
        audit_params: bool,
        audit_strict: bool,
        capture_rows: u64,
        capture_bytes: usize,
    ) -> PyResult<Self> {
        let audit = audit.map(|spool| AuditConfig {
            spool: spool.inner.clone(),
            session_id: audit_session,
            record_params: audit_params,
            capture: CaptureLimits {
                max_rows: capture_rows,
                max_bytes: capture_bytes,
            },
            strict: audit_strict,
        });
        let ready =
            |s: &str| -> PyResult<Py<PyTuple>> { Ok((kind::READY, s).into_pyobject(py)?.unbind()) };
        Ok(SessionCodec {
            inner: pgwarden_wire::SessionCodec::new(SessionConfig {
                max_message_len,
                context_json,
                record_statements,
                client_events,
                max_param_bytes,
                audit,
            }),
            ready_events: [ready("I")?, ready("T")?, ready("E")?],
        })
    }

    /// Masks these table columns in every result from now on: `(table_oid, attnum,
    /// replacement, name, keep_last)`, the replacement text for text-typed columns
    /// (`None`: NULL) followed by the value's last `keep_last` characters when that is
    /// not 0, and the name the audit's `end` records give the column.  From then on an
    /// Execute not directly after the client's Describe of its portal is preceded by a
    /// Describe of the portal the codec adds (its answer is the masker's alone).
    fn mask_columns(&mut self, columns: Vec<MaskSpec>) {
        let columns = columns
            .into_iter()
            .map(|(table_oid, attnum, text, name, keep_last)| MaskedColumn {
                table_oid,
                attnum,
                style: match (text, keep_last) {
                    (Some(t), 0) => MaskStyle::Replace(t.into()),
                    (Some(t), keep_last) => MaskStyle::Partial {
                        prefix: t.into(),
                        keep_last,
                    },
                    (None, _) => MaskStyle::Null,
                },
                name: name.into(),
            });
        self.inner
            .set_masker(Some(Box::new(ColumnMasker::new(columns))));
    }

    fn feed_client<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyBytes>,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<Bound<'py, PyList>>)> {
        let fwd = self.inner.feed_client(data.as_bytes()).map_err(feed_err)?;
        let out = forwarded(py, data, fwd, self.inner.client_buffer());
        let events = self.inner.client_events();
        if events.is_empty() {
            return Ok((out, None));
        }
        let list = PyList::empty(py);
        for ev in events {
            list.append(client_event(py, ev)?)?;
        }
        Ok((out, Some(list)))
    }

    fn feed_server<'py>(
        &mut self,
        py: Python<'py>,
        data: &Bound<'py, PyBytes>,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<Bound<'py, PyList>>)> {
        let fwd = self.inner.feed_server(data.as_bytes()).map_err(wire_err)?;
        let out = forwarded(py, data, fwd, self.inner.server_buffer());
        let events = self.inner.server_events();
        if events.is_empty() {
            return Ok((out, None));
        }
        let list = PyList::empty(py);
        for ev in events {
            match ev {
                ServerEvent::Ready(s) => {
                    list.append(self.ready_events[status_index(*s)].bind(py))?
                }
                ServerEvent::Error {
                    severity,
                    sqlstate,
                    message,
                } => list.append((kind::ERROR, severity, sqlstate, message))?,
            }
        }
        Ok((out, Some(list)))
    }

    /// JSON lines, one per finished statement since the last call (may be empty).
    fn take_records<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_records())
    }

    #[getter]
    fn transaction_status<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        PyString::intern(py, status_str(self.inner.transaction_status()))
    }

    #[getter]
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    /// Audit records this session could not store (relaxed audit only).
    #[getter]
    fn audit_dropped(&self) -> u64 {
        self.inner.audit_dropped()
    }

    #[getter]
    fn pending_requests(&self) -> usize {
        self.inner.pending_requests()
    }

    #[getter]
    fn held_client_bytes(&self) -> usize {
        self.inner.held_client_bytes()
    }

    #[getter]
    fn server_bytes_owed(&self) -> usize {
        self.inner.server_bytes_owed()
    }

    /// `(statements, client bytes, server bytes)` relayed so far.
    #[getter]
    fn counters(&self) -> (u64, u64, u64) {
        let c = self.inner.counters();
        (c.statements, c.client_bytes, c.server_bytes)
    }
}

//! `SpanAssembler` for Python: the shipper's per-stream loop (records to OTLP requests) in
//! one call per batch.  Query texts are analysed by a Python callable, once per shape.

use pgwarden_ship::spans::{QueryText, Val};
use pgwarden_ship::transcript::{self, EndView, StmtView};
use pgwarden_ship::{AssemblerConfig, QueryAnalyzer, QueryInfo, Request, StreamAssembler};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyString};

struct PyAnalyzer<'a, 'py> {
    callable: &'a Bound<'py, PyAny>,
}

type Analysis = (
    bool,
    u32,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

impl QueryAnalyzer for PyAnalyzer<'_, '_> {
    fn analyze(&mut self, sql: &str) -> QueryInfo {
        // A failing analysis leaves the statement unparsed; the span still goes out.
        match self
            .callable
            .call1((sql,))
            .and_then(|r| r.extract::<Analysis>())
        {
            Ok((parsed, statements, operation, collection, procedure, summary)) => QueryInfo {
                parsed,
                statements,
                operation,
                collection,
                procedure,
                summary,
            },
            Err(_) => QueryInfo::default(),
        }
    }
}

fn resource_value(v: &Bound<'_, PyAny>) -> PyResult<Val<'static>> {
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(Val::Bool(b.is_true()));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(Val::Str(s.to_str()?.to_owned().into()));
    }
    if v.is_instance_of::<PyInt>() {
        return Ok(Val::Int(v.extract()?));
    }
    if let Ok(f) = v.cast::<PyFloat>() {
        return Ok(Val::Double(f.value()));
    }
    Ok(Val::Str(v.str()?.to_str()?.to_owned().into()))
}

/// Assembles one audit stream's records into OTLP `ExportTraceServiceRequest` bodies.
#[pyclass(module = "pgwarden._wire", unsendable)]
pub struct SpanAssembler {
    inner: StreamAssembler,
    analyze: Py<PyAny>,
}

type Batch<'py> = (
    Vec<Bound<'py, PyBytes>>,
    usize,
    Vec<(String, Bound<'py, PyBytes>)>,
    Vec<Bound<'py, PyBytes>>,
    Vec<(Option<usize>, String)>,
    usize,
    bool,
);

#[pymethods]
impl SpanAssembler {
    #[new]
    #[pyo3(signature = (*, key, resource, resource_schema_url, scope_name, scope_version, scope_schema_url, query_text, request_spans, request_bytes, query_text_max_bytes, recorded, result_logs, state, analyze))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        key: &[u8],
        resource: &Bound<'_, PyDict>,
        resource_schema_url: &str,
        scope_name: &str,
        scope_version: &str,
        scope_schema_url: &str,
        query_text: &str,
        request_spans: usize,
        request_bytes: usize,
        query_text_max_bytes: usize,
        recorded: Vec<String>,
        result_logs: bool,
        state: Option<&[u8]>,
        analyze: Py<PyAny>,
    ) -> PyResult<Self> {
        let query_text = match query_text {
            "full" => QueryText::Full,
            "sanitised" => QueryText::Sanitised,
            "none" => QueryText::None,
            other => return Err(PyValueError::new_err(format!("query_text {other:?}"))),
        };
        let mut attrs = Vec::new();
        for (k, v) in resource.iter() {
            attrs.push((
                k.cast_into::<PyString>()?.to_str()?.to_owned(),
                resource_value(&v)?,
            ));
        }
        let state = match state {
            Some(s) => serde_json::from_slice(s)
                .map_err(|e| PyValueError::new_err(format!("checkpoint state: {e}")))?,
            None => Default::default(),
        };
        Ok(SpanAssembler {
            inner: StreamAssembler::new(
                AssemblerConfig {
                    key: key.to_vec(),
                    resource: attrs,
                    resource_schema_url: resource_schema_url.to_owned(),
                    scope_name: scope_name.to_owned(),
                    scope_version: scope_version.to_owned(),
                    scope_schema_url: scope_schema_url.to_owned(),
                    query_text,
                    request_spans,
                    request_bytes,
                    query_text_max_bytes,
                    recorded,
                    result_logs,
                },
                state,
            ),
            analyze,
        })
    }

    /// Assemble the next lines of the stream; the result is staged until `commit()`.
    /// They come as chunks of segment data, `(data, end)`: `data[:end]` is whole lines
    /// separated by newlines (splitting them here costs a fraction of what a Python object
    /// per line did).
    ///
    /// Returns (requests, span count, [(session, recorded lines)], [(stmt JSON, end line
    /// index)], [(line index or None, problem)], chain failures, finishing).
    fn process<'py>(
        &mut self,
        py: Python<'py>,
        chunks: Vec<(Bound<'py, PyBytes>, usize)>,
        writer_alive: bool,
    ) -> PyResult<Batch<'py>> {
        let mut slices: Vec<&[u8]> = Vec::new();
        for (data, end) in &chunks {
            let data = data.as_bytes();
            let lines = data
                .get(..*end)
                .ok_or_else(|| PyValueError::new_err("chunk end beyond its data"))?;
            let mut start = 0;
            for newline in memchr::memchr_iter(b'\n', lines) {
                slices.push(&lines[start..newline]);
                start = newline + 1;
            }
            slices.push(&lines[start..]);
        }
        let callable = self.analyze.bind(py).clone();
        let mut analyzer = PyAnalyzer {
            callable: &callable,
        };
        let out = self.inner.process(&slices, writer_alive, &mut analyzer);
        Ok((
            out.requests
                .iter()
                .map(|r| request_bytes(py, r))
                .collect::<PyResult<_>>()?,
            out.spans,
            out.recordings
                .iter()
                .map(|(s, b)| (s.clone(), PyBytes::new(py, b)))
                .collect(),
            out.log_requests
                .iter()
                .map(|r| request_bytes(py, r))
                .collect::<PyResult<_>>()?,
            out.problems,
            out.chain_failures,
            out.finishing,
        ))
    }

    /// Make the staged batch the stream's state (the backend acknowledged it).
    fn commit(&mut self) {
        self.inner.commit();
    }

    /// Forget the staged batch (its export failed; the records will be read again).
    fn rollback(&mut self) {
        self.inner.rollback();
    }

    /// The committed state as checkpoint JSON.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let data = serde_json::to_vec(self.inner.state())
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok(PyBytes::new(py, &data))
    }

    /// (open sessions, open statements, last sequence number) of the committed state.
    fn open_counts(&self) -> (usize, usize, u64) {
        let s = self.inner.state();
        (s.open_sessions.len(), s.open_statements.len(), s.seq)
    }
}

/// A request as one `bytes` object, its parts copied straight into it.
fn request_bytes<'py>(py: Python<'py>, request: &Request) -> PyResult<Bound<'py, PyBytes>> {
    PyBytes::new_with(py, request.len(), |buf| {
        let mut at = 0;
        for part in request.parts() {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(())
    })
}

/// A key under which statement texts that differ only in their numeric constants share a
/// decision or an analysis (`aid = 1`, `aid = 2`), found without running the scanner; None
/// when the text has a double quote (see `pgwarden_ship::shape::number_blind_key`).
#[pyfunction]
pub fn number_blind_key(sql: &str) -> Option<String> {
    pgwarden_ship::shape::number_blind_key(sql)
}

/// A record time (microseconds since the epoch) as transcripts write it:
/// `2026-11-27 09:02:32.874 UTC`.
#[pyfunction]
pub fn format_time(ts_us: u64) -> String {
    transcript::when(ts_us)
}

/// One recorded statement as transcript lines (`pgwarden replay`): its `stmt` and `end`
/// records as JSON (either may be missing), the decision record's verdict, and the
/// RowDescription (base64) to use when the `end` carries none.
#[pyfunction]
#[pyo3(signature = (stmt, end, decision=None, columns=None))]
pub fn render_statement(
    stmt: Option<&[u8]>,
    end: Option<&[u8]>,
    decision: Option<&str>,
    columns: Option<&str>,
) -> PyResult<Vec<String>> {
    let bad = |e: serde_json::Error| PyValueError::new_err(e.to_string());
    let stmt: Option<StmtView<'_>> = stmt.map(serde_json::from_slice).transpose().map_err(bad)?;
    let end: Option<EndView<'_>> = end.map(serde_json::from_slice).transpose().map_err(bad)?;
    Ok(transcript::statement(
        stmt.as_ref(),
        end.as_ref(),
        decision,
        columns,
    ))
}

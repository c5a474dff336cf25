//! `AuditSpool` for Python: the process's audit spool, shared by every session codec.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_wire::audit_record::{unseal, RecordChain, HASH_LEN};
use pgwarden_wire::{Admission, FsyncPolicy, SpoolError, SpoolOptions, WireError};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::{AuditSpoolError, AuditSpoolFull};

pub(crate) fn spool_err(e: SpoolError) -> PyErr {
    match e {
        SpoolError::Full { .. } => AuditSpoolFull::new_err(e.to_string()),
        other => AuditSpoolError::new_err(other.to_string()),
    }
}

/// A codec error: an audit refusal keeps its own exception type.
pub(crate) fn feed_err(e: WireError) -> PyErr {
    match e {
        WireError::Audit(s) => spool_err(s),
        other => crate::wire_err(other),
    }
}

/// The append-only audit spool of this process (one stream of sealed records).
#[pyclass(module = "pgwarden._wire", frozen)]
pub struct AuditSpool {
    pub(crate) inner: Arc<pgwarden_wire::AuditSpool>,
}

#[pymethods]
impl AuditSpool {
    #[new]
    #[pyo3(signature = (
        directory,
        stream,
        key,
        *,
        segment_bytes = 16 * 1024 * 1024,
        max_bytes = 1024 * 1024 * 1024,
        fsync = "interval",
        fsync_interval_ms = 200,
        usage_interval_ms = 100,
        open_members = String::new(),
    ), text_signature = "(directory, stream, key, *, segment_bytes=16777216, max_bytes=1073741824, fsync='interval', fsync_interval_ms=200, usage_interval_ms=100, open_members='')")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        directory: PathBuf,
        stream: String,
        key: Vec<u8>,
        segment_bytes: usize,
        max_bytes: u64,
        fsync: &str,
        fsync_interval_ms: u64,
        usage_interval_ms: u64,
        open_members: String,
    ) -> PyResult<Self> {
        let fsync = match fsync {
            "always" => FsyncPolicy::Always,
            "interval" => FsyncPolicy::Interval(Duration::from_millis(fsync_interval_ms.max(1))),
            "never" => FsyncPolicy::Never,
            other => {
                return Err(PyValueError::new_err(format!(
                    "fsync must be 'always', 'interval' or 'never', not {other:?}"
                )))
            }
        };
        let options = SpoolOptions {
            directory,
            stream,
            key,
            segment_bytes,
            max_bytes,
            fsync,
            usage_interval: Duration::from_millis(usage_interval_ms.max(1)),
            open_members,
        };
        let inner = py
            .detach(|| pgwarden_wire::AuditSpool::open(options))
            .map_err(spool_err)?;
        Ok(AuditSpool { inner })
    }

    /// Stores one record of type `kind` with `members` (JSON members without braces);
    /// returns its seq.  `new=True` marks a new statement or session, refused with
    /// `AuditSpoolFull` when the spool is at its bound.
    #[pyo3(signature = (kind, members, *, new = false))]
    fn append(&self, kind: &str, members: &str, new: bool) -> PyResult<u64> {
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(PyValueError::new_err(
                "record kind must be lowercase letters and '_'",
            ));
        }
        let admission = if new {
            Admission::New
        } else {
            Admission::Continuation
        };
        self.inner
            .append(kind, admission, |b| b.members(members))
            .map_err(spool_err)
    }

    /// Writes the `close` record, syncs and stops the spool's threads.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.close()).map_err(spool_err)
    }

    /// fdatasync everything stored so far (releases the GIL); returns the durable seq.
    fn sync(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.inner.sync()).map_err(spool_err)
    }

    /// Re-measures the disk usage of the whole spool now.
    fn refresh_usage(&self, py: Python<'_>) {
        py.detach(|| self.inner.refresh_usage());
    }

    #[getter]
    fn stream(&self) -> String {
        self.inner.stream().to_owned()
    }

    #[getter]
    fn directory(&self) -> String {
        self.inner.stream_dir().to_string_lossy().into_owned()
    }

    #[getter]
    fn written_seq(&self) -> u64 {
        self.inner.written_seq()
    }

    #[getter]
    fn synced_seq(&self) -> u64 {
        self.inner.synced_seq()
    }

    #[getter]
    fn usage_bytes(&self) -> u64 {
        self.inner.usage_bytes()
    }

    #[getter]
    fn max_bytes(&self) -> u64 {
        self.inner.max_bytes()
    }

    #[getter]
    fn full(&self) -> bool {
        self.inner.is_full()
    }

    #[getter]
    fn records_dropped(&self) -> u64 {
        self.inner.records_dropped()
    }

    /// eventfd readable after each fdatasync (fsync='always'), else None.
    #[getter]
    fn notify_fd(&self) -> Option<i32> {
        self.inner.notify_fd()
    }
}

/// Checks `lines` (sealed records, no newlines) as a continuation of the chain at `prev`.
///
/// Returns the hash of the last line and the indices of the lines that do not verify (each
/// is then taken at its stored hash, so one bad record does not condemn the rest).
#[pyfunction]
pub fn verify_chain<'py>(
    py: Python<'py>,
    key: &[u8],
    prev: &[u8],
    lines: &Bound<'py, PyList>,
) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>)> {
    let mut head: [u8; HASH_LEN] = prev
        .try_into()
        .map_err(|_| PyValueError::new_err("prev must be 32 bytes"))?;
    let template = RecordChain::new(key, [0; HASH_LEN]);
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.cast::<PyBytes>()?;
        match unseal(line.as_bytes()) {
            Ok((body, stored)) => {
                let mut chain = template.clone();
                chain.commit(head);
                if chain.hash_of(&body) != stored {
                    bad.push(i);
                }
                head = stored;
            }
            Err(_) => bad.push(i),
        }
    }
    Ok((PyBytes::new(py, &head), bad))
}

//! Startup-phase packet decoding for Python.

use pgwarden_wire::startup::{self as wire, StartupPacket as WirePacket};
use pgwarden_wire::DEFAULT_MAX_STARTUP_LEN;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::wire_err;

/// One untyped startup-phase packet sent by a client.
#[pyclass(frozen, module = "pgwarden._wire")]
pub struct StartupPacket {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    major: u16,
    #[pyo3(get)]
    minor: u16,
    #[pyo3(get)]
    params: Vec<(String, String)>,
    #[pyo3(get)]
    process_id: u32,
    secret_key: Vec<u8>,
}

#[pymethods]
impl StartupPacket {
    #[getter]
    fn secret_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.secret_key)
    }

    fn __repr__(&self) -> String {
        match self.kind {
            "startup" => format!(
                "StartupPacket(kind='startup', major={}, minor={}, params={:?})",
                self.major, self.minor, self.params
            ),
            "cancel" => format!(
                "StartupPacket(kind='cancel', process_id={})",
                self.process_id
            ),
            k => format!("StartupPacket(kind='{k}')"),
        }
    }
}

impl From<WirePacket<'_>> for StartupPacket {
    fn from(p: WirePacket<'_>) -> Self {
        let empty = |kind| StartupPacket {
            kind,
            major: 0,
            minor: 0,
            params: Vec::new(),
            process_id: 0,
            secret_key: Vec::new(),
        };
        match p {
            WirePacket::SslRequest => empty("ssl"),
            WirePacket::GssEncRequest => empty("gssenc"),
            WirePacket::CancelRequest {
                process_id,
                secret_key,
            } => StartupPacket {
                process_id,
                secret_key: secret_key.to_vec(),
                ..empty("cancel")
            },
            WirePacket::Startup(m) => StartupPacket {
                major: m.major,
                minor: m.minor,
                params: m
                    .params
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..empty("startup")
            },
        }
    }
}

/// Decodes one startup packet from the front of `buf`: `(packet, consumed)` or `None`
/// when more bytes are needed.
#[pyfunction]
#[pyo3(signature = (buf, max_len = DEFAULT_MAX_STARTUP_LEN))]
pub fn read_startup(buf: &[u8], max_len: usize) -> PyResult<Option<(StartupPacket, usize)>> {
    Ok(wire::read_startup(buf, max_len)
        .map_err(wire_err)?
        .map(|(p, n)| (StartupPacket::from(p), n)))
}

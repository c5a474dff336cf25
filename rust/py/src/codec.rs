//! Startup/authentication-phase framing, decoders and encoders for Python.

use pgwarden_wire::backend::{self, field, BackendMessage, Fields, TransactionStatus};
use pgwarden_wire::frontend::{PasswordMessage, SaslInitialResponse, SaslResponse};
use pgwarden_wire::startup::{StartupMessage, StartupPacket, MAX_CANCEL_KEY_LEN};
use pgwarden_wire::{framer, DEFAULT_MAX_MESSAGE_LEN};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::wire_err;

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bytes_out(py: Python<'_>, f: impl FnOnce(&mut Vec<u8>)) -> Bound<'_, PyBytes> {
    let mut buf = Vec::new();
    f(&mut buf);
    PyBytes::new(py, &buf)
}

fn check_key(secret_key: &[u8]) -> PyResult<()> {
    if secret_key.len() < 4 || secret_key.len() > MAX_CANCEL_KEY_LEN {
        return Err(PyValueError::new_err(format!(
            "secret key must be 4 to {MAX_CANCEL_KEY_LEN} bytes, got {}",
            secret_key.len()
        )));
    }
    Ok(())
}

/// Incremental framer for typed messages (tag byte + int32 length + body).
#[pyclass(module = "pgwarden._wire")]
pub struct MessageFramer {
    inner: framer::MessageFramer,
}

#[pymethods]
impl MessageFramer {
    #[new]
    #[pyo3(signature = (max_message_len = DEFAULT_MAX_MESSAGE_LEN))]
    fn new(max_message_len: usize) -> Self {
        MessageFramer {
            inner: framer::MessageFramer::new(max_message_len),
        }
    }

    /// Appends `data`; returns every complete message as `(tag, body)`.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        self.inner.extend(data);
        let out = PyList::empty(py);
        while let Some(f) = self.inner.next_frame().map_err(wire_err)? {
            out.append((f.tag, PyBytes::new(py, f.body)))?;
        }
        Ok(out)
    }

    /// Returns and clears the bytes of a not-yet-complete message.
    fn take_pending<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_pending())
    }
}

/// ErrorResponse / NoticeResponse body -> {field code: value}.
#[pyfunction]
pub fn decode_fields<'py>(py: Python<'py>, body: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let fields = Fields::decode(body, "ErrorResponse/NoticeResponse").map_err(wire_err)?;
    let d = PyDict::new(py);
    for (code, value) in fields.iter() {
        d.set_item(char::from(code).to_string(), lossy(value))?;
    }
    Ok(d)
}

/// Authentication* body -> (auth code, remaining payload).
#[pyfunction]
pub fn decode_authentication<'py>(
    py: Python<'py>,
    body: &[u8],
) -> PyResult<(i32, Bound<'py, PyBytes>)> {
    let (code, payload) = backend::split_authentication(body).map_err(wire_err)?;
    Ok((code, PyBytes::new(py, payload)))
}

#[pyfunction]
pub fn decode_parameter_status(body: &[u8]) -> PyResult<(String, String)> {
    let (name, value) = backend::decode_parameter_status(body).map_err(wire_err)?;
    Ok((lossy(name), lossy(value)))
}

#[pyfunction]
pub fn decode_backend_key_data<'py>(
    py: Python<'py>,
    body: &[u8],
) -> PyResult<(u32, Bound<'py, PyBytes>)> {
    let (pid, key) = backend::decode_backend_key_data(body).map_err(wire_err)?;
    Ok((pid, PyBytes::new(py, key)))
}

#[pyfunction]
pub fn decode_negotiate_protocol_version(body: &[u8]) -> PyResult<(u32, Vec<String>)> {
    let (newest_minor, unsupported) =
        backend::decode_negotiate_protocol_version(body).map_err(wire_err)?;
    Ok((
        newest_minor,
        unsupported.iter().map(str::to_owned).collect(),
    ))
}

/// AuthenticationSASL payload (after the auth code) -> mechanism names.
#[pyfunction]
pub fn decode_sasl_mechanisms(body: &[u8]) -> PyResult<Vec<String>> {
    let names = backend::decode_sasl_mechanisms(body).map_err(wire_err)?;
    Ok(names.iter().map(str::to_owned).collect())
}

#[pyfunction]
pub fn encode_message<'py>(py: Python<'py>, tag: u8, body: &[u8]) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| framer::encode_message(b, tag, body))
}

/// ErrorResponse with S, V, C, M (and D, H when given).
#[pyfunction]
#[pyo3(signature = (severity, sqlstate, message, detail = None, hint = None))]
pub fn encode_error<'py>(
    py: Python<'py>,
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Bound<'py, PyBytes> {
    let mut pairs: Vec<(u8, &[u8])> = vec![
        (field::SEVERITY, severity.as_bytes()),
        (field::SEVERITY_NONLOCALIZED, severity.as_bytes()),
        (field::SQLSTATE, sqlstate.as_bytes()),
        (field::MESSAGE, message.as_bytes()),
    ];
    if let Some(d) = detail {
        pairs.push((field::DETAIL, d.as_bytes()));
    }
    if let Some(h) = hint {
        pairs.push((field::HINT, h.as_bytes()));
    }
    bytes_out(py, |b| {
        Fields::encode_pairs(b, backend::tag::ERROR_RESPONSE, &pairs)
    })
}

#[pyfunction]
pub fn encode_notice<'py>(
    py: Python<'py>,
    severity: &str,
    sqlstate: &str,
    message: &str,
) -> Bound<'py, PyBytes> {
    let pairs: [(u8, &[u8]); 4] = [
        (field::SEVERITY, severity.as_bytes()),
        (field::SEVERITY_NONLOCALIZED, severity.as_bytes()),
        (field::SQLSTATE, sqlstate.as_bytes()),
        (field::MESSAGE, message.as_bytes()),
    ];
    bytes_out(py, |b| {
        Fields::encode_pairs(b, backend::tag::NOTICE_RESPONSE, &pairs)
    })
}

#[pyfunction]
#[pyo3(signature = (params, major = 3, minor = 0))]
pub fn encode_startup<'py>(
    py: Python<'py>,
    params: Vec<(String, String)>,
    major: u16,
    minor: u16,
) -> Bound<'py, PyBytes> {
    let params = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    bytes_out(py, |b| {
        StartupPacket::Startup(StartupMessage {
            major,
            minor,
            params,
        })
        .encode(b)
    })
}

#[pyfunction]
pub fn encode_ssl_request(py: Python<'_>) -> Bound<'_, PyBytes> {
    bytes_out(py, |b| StartupPacket::SslRequest.encode(b))
}

#[pyfunction]
pub fn encode_cancel_request<'py>(
    py: Python<'py>,
    process_id: u32,
    secret_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    check_key(secret_key)?;
    Ok(bytes_out(py, |b| {
        StartupPacket::CancelRequest {
            process_id,
            secret_key,
        }
        .encode(b)
    }))
}

#[pyfunction]
#[pyo3(signature = (code, payload = b"".as_slice()), text_signature = "(code, payload=b'')")]
pub fn encode_authentication<'py>(
    py: Python<'py>,
    code: i32,
    payload: &[u8],
) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| backend::encode_authentication_raw(b, code, payload))
}

/// PasswordMessage ('p'); `password` is sent as a C string.
#[pyfunction]
pub fn encode_password<'py>(py: Python<'py>, password: &[u8]) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| PasswordMessage { password }.encode(b))
}

#[pyfunction]
pub fn encode_sasl_initial_response<'py>(
    py: Python<'py>,
    mechanism: &str,
    data: &[u8],
) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| {
        SaslInitialResponse {
            mechanism,
            data: Some(data),
        }
        .encode(b)
    })
}

#[pyfunction]
pub fn encode_sasl_response<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| SaslResponse { data }.encode(b))
}

#[pyfunction]
pub fn encode_parameter_status<'py>(
    py: Python<'py>,
    name: &str,
    value: &str,
) -> Bound<'py, PyBytes> {
    bytes_out(py, |b| {
        BackendMessage::ParameterStatus {
            name: name.as_bytes(),
            value: value.as_bytes(),
        }
        .encode(b)
    })
}

#[pyfunction]
pub fn encode_backend_key_data<'py>(
    py: Python<'py>,
    process_id: u32,
    secret_key: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    check_key(secret_key)?;
    Ok(bytes_out(py, |b| {
        BackendMessage::BackendKeyData {
            process_id,
            secret_key,
        }
        .encode(b)
    }))
}

#[pyfunction]
pub fn encode_ready_for_query<'py>(py: Python<'py>, status: &str) -> PyResult<Bound<'py, PyBytes>> {
    let status = match status.as_bytes() {
        [b] => TransactionStatus::from_byte(*b).ok(),
        _ => None,
    }
    .ok_or_else(|| PyValueError::new_err("status must be \"I\", \"T\" or \"E\""))?;
    Ok(bytes_out(py, |b| {
        BackendMessage::ReadyForQuery(status).encode(b)
    }))
}

#[pyfunction]
pub fn encode_negotiate_protocol_version<'py>(
    py: Python<'py>,
    newest_minor: u32,
    unsupported: Vec<String>,
) -> Bound<'py, PyBytes> {
    let names: Vec<&str> = unsupported.iter().map(String::as_str).collect();
    bytes_out(py, |b| {
        backend::encode_negotiate_protocol_version(b, newest_minor, &names)
    })
}

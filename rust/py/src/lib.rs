//! `pgwarden._wire`: the Python binding of `pgwarden-wire`.  It converts types and
//! nothing else; all protocol logic lives in the Rust crate.

mod audit;
mod codec;
mod session;
mod ship;
mod startup;

use pyo3::prelude::*;

pyo3::create_exception!(
    pgwarden._wire,
    WireError,
    pyo3::exceptions::PyException,
    "A malformed or oversized message.  ``str(err)`` is a human-readable reason."
);

pyo3::create_exception!(
    pgwarden._wire,
    AuditSpoolError,
    pyo3::exceptions::PyException,
    "An audit record could not be stored (I/O error, or the spool is closed)."
);

pyo3::create_exception!(
    pgwarden._wire,
    AuditSpoolFull,
    AuditSpoolError,
    "The audit spool is at its configured bound: new statements are refused."
);

pub(crate) fn wire_err(e: pgwarden_wire::WireError) -> PyErr {
    WireError::new_err(e.to_string())
}

#[pymodule]
mod _wire {
    use pgwarden_wire::events::kind;
    use pgwarden_wire::startup;

    #[pymodule_export]
    use super::{AuditSpoolError, AuditSpoolFull, WireError};

    #[pymodule_export]
    use crate::audit::{verify_chain, AuditSpool};

    #[pymodule_export]
    use crate::ship::{format_time, number_blind_key, render_statement, SpanAssembler};

    #[pymodule_export]
    use crate::startup::{read_startup, StartupPacket};

    #[pymodule_export]
    use crate::codec::{
        decode_authentication, decode_backend_key_data, decode_fields,
        decode_negotiate_protocol_version, decode_parameter_status, decode_sasl_mechanisms,
        encode_authentication, encode_backend_key_data, encode_cancel_request, encode_error,
        encode_message, encode_negotiate_protocol_version, encode_notice, encode_parameter_status,
        encode_password, encode_ready_for_query, encode_sasl_initial_response,
        encode_sasl_response, encode_ssl_request, encode_startup, MessageFramer,
    };

    #[pymodule_export]
    use crate::session::SessionCodec;

    #[pymodule_export]
    const SSL_REQUEST_CODE: u32 = startup::SSL_REQUEST_CODE;
    #[pymodule_export]
    const GSSENC_REQUEST_CODE: u32 = startup::GSSENC_REQUEST_CODE;
    #[pymodule_export]
    const CANCEL_REQUEST_CODE: u32 = startup::CANCEL_REQUEST_CODE;
    #[pymodule_export]
    const DEFAULT_MAX_STARTUP_LEN: usize = pgwarden_wire::DEFAULT_MAX_STARTUP_LEN;
    #[pymodule_export]
    const DEFAULT_MAX_MESSAGE_LEN: usize = pgwarden_wire::DEFAULT_MAX_MESSAGE_LEN;
    #[pymodule_export]
    const EV_QUERY: u8 = kind::QUERY;
    #[pymodule_export]
    const EV_PARSE: u8 = kind::PARSE;
    #[pymodule_export]
    const EV_EXECUTE: u8 = kind::EXECUTE;
    #[pymodule_export]
    const EV_FUNCTION_CALL: u8 = kind::FUNCTION_CALL;
    #[pymodule_export]
    const EV_TERMINATE: u8 = kind::TERMINATE;
    #[pymodule_export]
    const EV_READY: u8 = kind::READY;
    #[pymodule_export]
    const EV_ERROR: u8 = kind::ERROR;
}

//! PostgreSQL wire protocol (v3.0 to v3.2) codec for the pgwarden gateway.
//!
//! - [`startup`]: untyped startup-phase packets (SSLRequest, GSSENCRequest,
//!   CancelRequest, StartupMessage).
//! - [`framer`]: typed message framing with length limits.
//! - [`frontend`] / [`backend`]: every message of each direction, decode and encode.
//! - [`session`]: the relay hot path, [`SessionCodec`], one call per received chunk.
//!
//! Nothing here panics on wire input: malformed or oversized input is a [`WireError`].

pub mod arrays;
pub mod audit_record;
pub mod audit_spool;
pub mod backend;
pub mod capture;
mod client_stream;
pub mod error;
pub mod events;
pub mod forward;
pub mod framer;
pub mod frontend;
pub mod limits;
pub mod masker;
mod names;
pub mod otlp;
pub mod reader;
mod record;
mod refusal;
mod server_stream;
pub mod session;
pub mod session_audit;
pub mod startup;
pub mod statements;
pub mod writer;

pub use audit_spool::{Admission, AuditSpool, FsyncPolicy, SpoolError, SpoolOptions};
pub use capture::CaptureLimits;
pub use error::{Direction, Result, WireError};
pub use events::{ClientEvent, ServerEvent};
pub use forward::Forward;
pub use framer::{Frame, FrameIter, MessageFramer};
pub use limits::{Limits, DEFAULT_MAX_MESSAGE_LEN, DEFAULT_MAX_STARTUP_LEN};
pub use masker::{ColumnMasker, DataRowMasker, MaskStyle, MaskedColumn};
pub use session::{SessionCodec, SessionConfig};
pub use session_audit::AuditConfig;
pub use startup::{read_startup, StartupMessage, StartupPacket};

//! The audit shipper's hot loop, without Python: sealed audit records in, OTLP
//! `ExportTraceServiceRequest` bodies out.
//!
//! * [`shape`]: the literal-insensitive shape of a query text, from PostgreSQL's own
//!   scanner (libpg_query), so that what the SQL says is analysed once per shape;
//! * [`records`]: the record lines as the gateway writes them;
//! * `scan`: the fast path of [`records::Line::parse`] for lines in the writer's own
//!   compact shape;
//! * [`spans`]: records to spans (the attribute rules of docs/audit.md);
//! * [`transcript`]: a recorded statement as psql would have shown it (replay, result
//!   log records);
//! * [`assembler`]: one stream's state (open sessions and statements), batch by batch,
//!   staged until the backend acknowledges the batch.

pub mod assembler;
pub mod ids;
pub mod records;
mod scan;
pub mod shape;
pub mod spans;
pub mod transcript;

pub use assembler::{
    Assembled, AssemblerConfig, QueryAnalyzer, QueryInfo, Request, StreamAssembler,
};

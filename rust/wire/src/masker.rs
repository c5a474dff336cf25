//! The row-rewrite hook: a [`DataRowMasker`] sees the rows it asks for and may replace
//! them.  Without one, DataRows stream through unassembled.

use crate::backend::RowDescription;

/// Rewrites DataRow messages on their way to the client.
///
/// The server relay calls [`describe`](DataRowMasker::describe) for every
/// RowDescription, then asks [`wants_rows`](DataRowMasker::wants_rows) at each DataRow
/// header: only when it answers `true` is the row assembled whole and passed to
/// [`mask_row`](DataRowMasker::mask_row); otherwise it keeps streaming at no cost.
///
/// Implementations must also account for results that arrive without a RowDescription
/// right before them (an Execute of a statement described earlier), for COPY TO
/// STDOUT (CopyData, not DataRow) and for FunctionCallResponse.
pub trait DataRowMasker: Send + Sync {
    /// The columns of the rows that follow.
    fn describe(&mut self, description: &RowDescription<'_>);

    /// Whether the current result's rows must be assembled and offered to `mask_row`.
    fn wants_rows(&self) -> bool;

    /// Offered one whole DataRow body.  Returns `true` after writing the replacement
    /// body (column count and values, without tag or length) into `out`; `false` to
    /// forward the row unchanged.
    fn mask_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool;

    /// Called at every ReadyForQuery: the result context is over.
    fn reset(&mut self) {}
}

//! [`Capture`]: the server messages of one statement exactly as forwarded to the client,
//! bounded by a row cap and a byte cap, for session recording and replay.
//!
//! The session feeds it message by message: [`begin`](Capture::begin) at each header
//! decides whether the message is kept, then the body arrives either in pieces as it
//! streams ([`extend`](Capture::extend)) or whole when the relay assembled or rewrote it
//! ([`set_body`](Capture::set_body)).  Rows beyond the caps are counted, not kept.

use crate::backend::tag;

/// Control messages (RowDescription, CommandComplete, ErrorResponse...) may exceed the
/// byte cap by this much, so that a statement's outcome is kept even after big rows.
const CONTROL_SLACK: usize = 64 * 1024;

/// Caps of a [`Capture`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureLimits {
    /// DataRow / CopyData messages kept per statement.
    pub max_rows: u64,
    /// Bytes of messages kept per statement.
    pub max_bytes: usize,
}

impl CaptureLimits {
    pub fn enabled(&self) -> bool {
        self.max_bytes > 0
    }
}

#[derive(Debug)]
pub(crate) struct Capture {
    limits: CaptureLimits,
    buf: Vec<u8>,
    rows: u64,
    /// Where the header of the message being captured starts, if one is.
    current: Option<usize>,
    omitted_rows: u64,
    omitted_bytes: u64,
}

impl Capture {
    pub(crate) fn new(limits: CaptureLimits) -> Self {
        Capture {
            limits,
            buf: Vec::with_capacity(limits.max_bytes.min(512)),
            rows: 0,
            current: None,
            omitted_rows: 0,
            omitted_bytes: 0,
        }
    }

    /// Empties the capture for another statement; the buffer keeps its capacity.
    pub(crate) fn clear(&mut self) {
        self.buf.clear();
        self.rows = 0;
        self.current = None;
        self.omitted_rows = 0;
        self.omitted_bytes = 0;
    }

    /// Bytes the buffer holds without growing.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// A message header: keep the message if it fits the caps.
    pub(crate) fn begin(&mut self, msg_tag: u8, body_len: usize) {
        let size = 5 + body_len;
        let is_row = msg_tag == tag::DATA_ROW || msg_tag == tag::COPY_DATA;
        let fits = if is_row {
            self.rows < self.limits.max_rows && self.buf.len() + size <= self.limits.max_bytes
        } else {
            self.buf.len() + size <= self.limits.max_bytes + CONTROL_SLACK
        };
        if !fits {
            self.current = None;
            if is_row {
                self.omitted_rows += 1;
            }
            self.omitted_bytes += size as u64;
            return;
        }
        if is_row {
            self.rows += 1;
        }
        self.current = Some(self.buf.len());
        self.buf.reserve(size);
        self.buf.push(msg_tag);
        self.buf
            .extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
    }

    /// Body bytes of the current message as they stream.
    #[inline]
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        if self.current.is_some() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The whole body of the current message (assembled, or rewritten by a masker: the
    /// length in the kept header follows the body actually forwarded).
    pub(crate) fn set_body(&mut self, body: &[u8]) {
        let Some(at) = self.current else { return };
        self.buf.truncate(at + 5);
        self.buf[at + 1..at + 5].copy_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        self.buf.extend_from_slice(body);
    }

    /// The kept messages, concatenated as on the wire.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Rows and bytes left out because of the caps.
    pub(crate) fn omitted(&self) -> (u64, u64) {
        (self.omitted_rows, self.omitted_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rows: u64, bytes: usize) -> CaptureLimits {
        CaptureLimits {
            max_rows: rows,
            max_bytes: bytes,
        }
    }

    #[test]
    fn keeps_rows_up_to_the_caps() {
        let mut c = Capture::new(limits(2, 1000));
        c.begin(tag::ROW_DESCRIPTION, 3);
        c.extend(b"abc");
        for _ in 0..3 {
            c.begin(tag::DATA_ROW, 2);
            c.extend(b"x");
            c.extend(b"y");
        }
        c.begin(tag::COMMAND_COMPLETE, 9);
        c.set_body(b"SELECT 3\0");
        let b = c.bytes();
        assert_eq!(&b[..8], b"T\0\0\0\x07abc");
        assert_eq!(b.iter().filter(|&&x| x == b'D').count(), 2);
        assert!(b.ends_with(b"C\0\0\0\x0dSELECT 3\0"));
        assert_eq!(c.omitted(), (1, 7));
    }

    #[test]
    fn byte_cap_and_rewritten_length() {
        let mut c = Capture::new(limits(100, 10));
        c.begin(tag::DATA_ROW, 20);
        c.extend(&[0; 20]);
        assert!(c.bytes().is_empty());
        assert_eq!(c.omitted(), (1, 25));
        c.begin(tag::DATA_ROW, 3);
        c.set_body(b"ab");
        assert_eq!(c.bytes(), b"D\0\0\0\x06ab");
        // Control messages still fit past the byte cap.
        c.begin(tag::ERROR_RESPONSE, 30);
        c.extend(&[1; 30]);
        assert_eq!(c.bytes().len(), 7 + 35);
    }
}

//! Typed-message framing: one tag byte, an Int32 length that counts itself, the body.

use crate::error::{Result, WireError};

/// Tag byte + Int32 length.
pub const HEADER_LEN: usize = 5;

/// Validates a message header and returns `(tag, body_len)`.
///
/// A length below 4 cannot even cover itself and is an error (PostgreSQL: "invalid
/// message length"); a length above `max_len` is refused before anything is allocated.
#[inline]
pub fn parse_header(header: [u8; HEADER_LEN], max_len: usize) -> Result<(u8, usize)> {
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(WireError::TooShort {
            len: i64::from(len),
            min: 4,
        });
    }
    if len as usize > max_len {
        return Err(WireError::TooLong {
            len: u64::from(len),
            limit: max_len,
        });
    }
    Ok((header[0], len as usize - 4))
}

/// Appends a typed message with an opaque body: the generic encoder.
pub fn encode_message(buf: &mut Vec<u8>, tag: u8, body: &[u8]) {
    let mut w = crate::writer::MessageWriter::typed(buf, tag);
    w.bytes(body);
    w.finish();
}

/// One complete typed message borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the message occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Splits a contiguous buffer into complete messages without copying; what is left
/// after the last complete message is reported by [`FrameIter::remainder`].
pub struct FrameIter<'a> {
    buf: &'a [u8],
    pos: usize,
    max_len: usize,
}

impl<'a> FrameIter<'a> {
    pub fn new(buf: &'a [u8], max_len: usize) -> Self {
        FrameIter {
            buf,
            pos: 0,
            max_len,
        }
    }

    /// Offset of the first byte not yet returned as part of a frame.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remainder(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

impl<'a> Iterator for FrameIter<'a> {
    type Item = Result<Frame<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.buf[self.pos..];
        let header: [u8; HEADER_LEN] = rest.get(..HEADER_LEN)?.try_into().ok()?;
        let (tag, body_len) = match parse_header(header, self.max_len) {
            Ok(h) => h,
            Err(e) => {
                // Stop for good: the stream cannot be resynchronised after a bad header.
                self.pos = self.buf.len();
                return Some(Err(e));
            }
        };
        let body = rest.get(HEADER_LEN..HEADER_LEN + body_len)?;
        self.pos += HEADER_LEN + body_len;
        Some(Ok(Frame { tag, body }))
    }
}

/// Incremental framer for the startup/authentication phase: bytes go in as they arrive,
/// complete messages come out.  Keeps only the incomplete tail between calls.
#[derive(Debug)]
pub struct MessageFramer {
    buf: Vec<u8>,
    start: usize,
    max_len: usize,
}

impl MessageFramer {
    pub fn new(max_len: usize) -> Self {
        MessageFramer {
            buf: Vec::new(),
            start: 0,
            max_len,
        }
    }

    /// Appends received bytes.  Consumed messages are dropped from the buffer first, so
    /// it holds at most one incomplete message plus the new bytes.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.  The header is
    /// validated as soon as its 5 bytes are there.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>> {
        let rest = &self.buf[self.start..];
        let Some(header) = rest.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let header: [u8; HEADER_LEN] = header.try_into().expect("5-byte slice");
        let (tag, body_len) = parse_header(header, self.max_len)?;
        if rest.len() < HEADER_LEN + body_len {
            return Ok(None);
        }
        let body_start = self.start + HEADER_LEN;
        self.start = body_start + body_len;
        Ok(Some(Frame {
            tag,
            body: &self.buf[body_start..body_start + body_len],
        }))
    }

    /// Bytes received but not yet returned as a frame.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Returns and clears the pending bytes (hand-over to another decoder).
    pub fn take_pending(&mut self) -> Vec<u8> {
        let out = self.buf[self.start..].to_vec();
        self.buf.clear();
        self.start = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn frames_across_any_split() {
        let mut stream = msg(b'R', &[0, 0, 0, 0]);
        stream.extend(msg(b'S', b"a\0b\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..=stream.len() {
            let mut f = MessageFramer::new(1 << 20);
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                f.extend(part);
                while let Some(fr) = f.next_frame().unwrap() {
                    got.push((fr.tag, fr.body.to_vec()));
                }
            }
            assert_eq!(got.len(), 3, "split at {split}");
            assert!(f.pending().is_empty());
        }
    }

    #[test]
    fn length_below_four_is_an_error() {
        let mut f = MessageFramer::new(1 << 20);
        f.extend(&[b'Q', 0, 0, 0, 3]);
        assert_eq!(
            f.next_frame().unwrap_err(),
            WireError::TooShort { len: 3, min: 4 }
        );
    }

    #[test]
    fn oversized_refused_from_header_alone() {
        let mut f = MessageFramer::new(1000);
        f.extend(&[b'D', 0x7f, 0xff, 0xff, 0xff]);
        assert!(matches!(f.next_frame(), Err(WireError::TooLong { .. })));
        // Nothing beyond the 5 header bytes was reserved.
        assert!(f.buf.capacity() < 1000);
    }

    #[test]
    fn take_pending_hands_over_the_tail() {
        let mut f = MessageFramer::new(1 << 20);
        let mut s = msg(b'Z', b"I");
        s.extend_from_slice(&msg(b'D', b"xyz")[..4]);
        f.extend(&s);
        assert_eq!(f.next_frame().unwrap().unwrap().tag, b'Z');
        assert!(f.next_frame().unwrap().is_none());
        assert_eq!(f.take_pending(), msg(b'D', b"xyz")[..4].to_vec());
        assert!(f.pending().is_empty());
    }

    #[test]
    fn frame_iter_reports_remainder() {
        let mut s = msg(b'C', b"SELECT 1\0");
        s.extend_from_slice(&[b'Z', 0, 0]);
        let mut it = FrameIter::new(&s, 1 << 20);
        assert_eq!(it.next().unwrap().unwrap().tag, b'C');
        assert!(it.next().is_none());
        assert_eq!(it.remainder(), &[b'Z', 0, 0]);
    }
}

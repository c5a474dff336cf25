//! What a relay call hands back: the input itself, a prefix of it, or a rebuilt buffer.
//! Building lazily keeps the common case (every byte forwarded as received) copy-free.

/// Where the bytes to forward are, after one `feed_*` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Forward the input exactly as received (the zero-copy fast path).
    Unchanged,
    /// Forward `input[..n]`; the rest is held until its message is complete.
    Prefix(usize),
    /// Forward the relay's internal buffer (held bytes were completed or rewritten).
    Buffered,
}

impl Forward {
    /// The bytes to forward, given the input of the call and the relay's buffer.
    pub fn select<'a>(self, input: &'a [u8], buffered: &'a [u8]) -> &'a [u8] {
        match self {
            Forward::Unchanged => input,
            Forward::Prefix(n) => &input[..n],
            Forward::Buffered => buffered,
        }
    }
}

/// Above this, a buffer is released after use instead of kept for the next call, so an
/// idle session does not pin the memory of its largest message.
const KEEP_CAPACITY: usize = 256 * 1024;

/// Accumulates the output of one call.  While everything forwarded is a contiguous
/// prefix of the input, only that prefix length is tracked; the first out-of-order byte
/// (held bytes from an earlier call, a rewritten message, a gap) switches to copying.
#[derive(Debug, Default)]
pub(crate) struct OutBuf {
    buf: Vec<u8>,
    owned: bool,
    prefix: usize,
}

impl OutBuf {
    pub(crate) fn reset(&mut self) {
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.owned = false;
        self.prefix = 0;
    }

    /// Length of the output so far: event offsets are taken from it.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        if self.owned {
            self.buf.len()
        } else {
            self.prefix
        }
    }

    /// Forwards `input[a..b]`.
    #[inline]
    pub(crate) fn pass(&mut self, input: &[u8], a: usize, b: usize) {
        if a == b {
            return;
        }
        if !self.owned {
            if a == self.prefix {
                self.prefix = b;
                return;
            }
            self.own(input);
        }
        self.buf.extend_from_slice(&input[a..b]);
    }

    /// Forwards bytes that are not part of this call's input.
    pub(crate) fn emit(&mut self, input: &[u8], bytes: &[u8]) {
        if !self.owned {
            self.own(input);
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Takes back everything forwarded after the first `len` bytes (a message that is
    /// replaced after it was passed).
    pub(crate) fn truncate(&mut self, len: usize) {
        if self.owned {
            self.buf.truncate(len);
        } else {
            self.prefix = self.prefix.min(len);
        }
    }

    fn own(&mut self, input: &[u8]) {
        self.owned = true;
        self.buf.extend_from_slice(&input[..self.prefix]);
    }

    pub(crate) fn result(&self, input_len: usize) -> Forward {
        if self.owned {
            Forward::Buffered
        } else if self.prefix == input_len {
            Forward::Unchanged
        } else {
            Forward::Prefix(self.prefix)
        }
    }

    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_prefix_stays_borrowed() {
        let input = b"abcdef";
        let mut o = OutBuf::default();
        o.pass(input, 0, 2);
        o.pass(input, 2, 6);
        assert_eq!(o.result(6), Forward::Unchanged);
        o.reset();
        o.pass(input, 0, 4);
        assert_eq!(o.result(6), Forward::Prefix(4));
    }

    #[test]
    fn gap_or_emit_switches_to_buffer() {
        let input = b"abcdef";
        let mut o = OutBuf::default();
        o.pass(input, 0, 2);
        o.pass(input, 3, 6);
        assert_eq!(o.result(6), Forward::Buffered);
        assert_eq!(o.buffered(), b"abdef");
        o.reset();
        o.emit(input, b"xy");
        o.pass(input, 0, 1);
        assert_eq!(Forward::Buffered.select(input, o.buffered()), b"xya");
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn truncate_then_emit_replaces_a_message() {
        let input = b"abcdef";
        let mut o = OutBuf::default();
        o.pass(input, 0, 4);
        o.truncate(2);
        o.emit(input, b"XY");
        o.pass(input, 4, 6);
        assert_eq!(o.result(6), Forward::Buffered);
        assert_eq!(o.buffered(), b"abXYef");
        o.truncate(3);
        assert_eq!(o.buffered(), b"abX");
    }
}

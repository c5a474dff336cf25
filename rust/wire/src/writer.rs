//! Builds one message in a caller-owned buffer, back-patching the Int32 length at the end.

/// Appends one message (optional tag byte, Int32 length, fields) to a `Vec<u8>`.
/// The length is written by [`MessageWriter::finish`], so fields can be streamed in.
pub struct MessageWriter<'a> {
    buf: &'a mut Vec<u8>,
    len_at: usize,
}

impl<'a> MessageWriter<'a> {
    /// Starts a typed message (`tag` = message type byte).
    pub fn typed(buf: &'a mut Vec<u8>, tag: u8) -> Self {
        buf.push(tag);
        Self::untyped(buf)
    }

    /// Starts an untyped message (startup-phase packets have no tag byte).
    pub fn untyped(buf: &'a mut Vec<u8>) -> Self {
        let len_at = buf.len();
        buf.extend_from_slice(&[0; 4]);
        MessageWriter { buf, len_at }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// A NUL-terminated string.  An embedded NUL would end the string early on the
    /// receiving side, so the value is cut at the first NUL.
    pub fn cstr(&mut self, v: &[u8]) -> &mut Self {
        let v = match memchr::memchr(0, v) {
            Some(i) => &v[..i],
            None => v,
        };
        self.buf.extend_from_slice(v);
        self.buf.push(0);
        self
    }

    /// An Int32-length-prefixed value; `None` is SQL NULL (length -1).
    pub fn value(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.i32(-1),
            Some(v) => {
                self.i32(v.len() as i32);
                self.bytes(v)
            }
        }
    }

    /// Writes the length (which counts itself but not the tag) and ends the message.
    pub fn finish(self) {
        let len = (self.buf.len() - self.len_at) as u32;
        self.buf[self.len_at..self.len_at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

//! Bounds-checked cursor over one message body (all integers are big-endian, network order).

use crate::error::{Result, WireError};

/// Reads the fields of one message body.  Every read is bounds-checked; running past the
/// end yields `WireError::Malformed` naming the message, never a panic.
#[derive(Debug, Clone)]
pub struct BodyReader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        BodyReader { buf, pos: 0, what }
    }

    fn err(&self) -> WireError {
        WireError::malformed(self.what)
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.err());
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    pub fn i16(&mut self) -> Result<i16> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A count that must not be negative (Int16 counts in Bind, RowDescription, ...).
    pub fn count16(&mut self) -> Result<usize> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.err())
    }

    /// A NUL-terminated string, returned without its terminator.
    pub fn cstr(&mut self) -> Result<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        let nul = memchr::memchr(0, rest).ok_or_else(|| self.err())?;
        self.pos += nul + 1;
        Ok(&rest[..nul])
    }

    /// A NUL-terminated string that must be valid UTF-8.
    pub fn cstr_utf8(&mut self) -> Result<&'a str> {
        let b = self.cstr()?;
        std::str::from_utf8(b).map_err(|_| self.err())
    }

    /// An Int32-length-prefixed value; length -1 is SQL NULL.
    pub fn value(&mut self) -> Result<Option<&'a [u8]>> {
        let n = self.i32()?;
        if n == -1 {
            return Ok(None);
        }
        let n = usize::try_from(n).map_err(|_| self.err())?;
        self.bytes(n).map(Some)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails when bytes are left over: a body longer than its fields is malformed too.
    pub fn finish(&self) -> Result<()> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.err())
        }
    }
}

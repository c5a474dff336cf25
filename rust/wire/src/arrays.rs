//! Counted arrays inside message bodies (format codes, type OIDs, column values), viewed
//! in place: decoding validates them once and keeps a borrowed slice, no allocation.

use crate::error::Result;
use crate::reader::BodyReader;
use crate::writer::MessageWriter;

/// `Int16 n` then `n` x Int16: format codes (0 = text, 1 = binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Int16Array<'a> {
    raw: &'a [u8],
}

impl<'a> Int16Array<'a> {
    pub(crate) fn read(r: &mut BodyReader<'a>) -> Result<Self> {
        let n = r.count16()?;
        Ok(Int16Array {
            raw: r.bytes(n * 2)?,
        })
    }

    pub fn len(&self) -> usize {
        self.raw.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<i16> {
        let b = self.raw.get(i * 2..i * 2 + 2)?;
        Some(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn iter(&self) -> impl Iterator<Item = i16> + 'a {
        self.raw
            .chunks_exact(2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn write(&self, w: &mut MessageWriter<'_>) {
        w.i16(self.len() as i16).bytes(self.raw);
    }
}

/// Writes `Int16 n` then the codes: the encoder-side twin of [`Int16Array`].
pub fn write_i16s(w: &mut MessageWriter<'_>, codes: &[i16]) {
    w.i16(codes.len() as i16);
    for c in codes {
        w.i16(*c);
    }
}

/// `Int16 n` then `n` x Int32 object ids (Parse parameter types, ParameterDescription).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OidArray<'a> {
    raw: &'a [u8],
}

impl<'a> OidArray<'a> {
    pub(crate) fn read(r: &mut BodyReader<'a>) -> Result<Self> {
        let n = r.count16()?;
        Ok(OidArray {
            raw: r.bytes(n * 4)?,
        })
    }

    pub fn len(&self) -> usize {
        self.raw.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.raw
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn write(&self, w: &mut MessageWriter<'_>) {
        w.i16(self.len() as i16).bytes(self.raw);
    }
}

/// Writes `Int16 n` then the oids.
pub fn write_oids(w: &mut MessageWriter<'_>, oids: &[u32]) {
    w.i16(oids.len() as i16);
    for o in oids {
        w.u32(*o);
    }
}

/// `Int16 n` then `n` x (Int32 len, bytes) with len -1 for NULL: Bind parameters,
/// FunctionCall arguments, DataRow columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ValueList<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> ValueList<'a> {
    pub(crate) fn read(r: &mut BodyReader<'a>, what: &'static str) -> Result<Self> {
        let count = r.count16()?;
        let rest = r.clone().rest();
        let mut inner = BodyReader::new(rest, what);
        for _ in 0..count {
            inner.value()?;
        }
        let used = rest.len() - inner.remaining();
        r.bytes(used)?;
        Ok(ValueList {
            count,
            raw: &rest[..used],
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The values; `None` is SQL NULL.  The list was validated when decoded.
    pub fn iter(&self) -> ValueIter<'a> {
        ValueIter {
            r: BodyReader::new(self.raw, "value list"),
            left: self.count,
        }
    }

    pub(crate) fn write(&self, w: &mut MessageWriter<'_>) {
        w.i16(self.count as i16).bytes(self.raw);
    }
}

/// Writes `Int16 n` then each value.
pub fn write_values(w: &mut MessageWriter<'_>, values: &[Option<&[u8]>]) {
    w.i16(values.len() as i16);
    for v in values {
        w.value(*v);
    }
}

pub struct ValueIter<'a> {
    r: BodyReader<'a>,
    left: usize,
}

impl<'a> Iterator for ValueIter<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated at decode time; a failure here would mean a bug, so end quietly.
        self.r.value().ok()
    }
}

/// A list of C strings viewed in place: SASL mechanism names (AuthenticationSASL, ended
/// by an empty string) or unrecognised options (NegotiateProtocolVersion, counted).
/// Validated as UTF-8 when decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NameList<'a> {
    count: usize,
    /// `count` NUL-terminated strings (without the list terminator, if any).
    raw: &'a [u8],
}

impl<'a> NameList<'a> {
    /// A list of C strings terminated by an empty string.
    pub(crate) fn read_terminated(r: &mut BodyReader<'a>, what: &'static str) -> Result<Self> {
        let rest = r.clone().rest();
        let mut inner = BodyReader::new(rest, what);
        let mut count = 0;
        while !inner.cstr_utf8()?.is_empty() {
            count += 1;
        }
        let used = rest.len() - inner.remaining();
        r.bytes(used)?;
        Ok(NameList {
            count,
            raw: &rest[..used - 1],
        })
    }

    /// A list of exactly `n` C strings.
    pub(crate) fn read_counted(
        r: &mut BodyReader<'a>,
        n: usize,
        what: &'static str,
    ) -> Result<Self> {
        let rest = r.clone().rest();
        let mut inner = BodyReader::new(rest, what);
        for _ in 0..n {
            inner.cstr_utf8()?;
        }
        let used = rest.len() - inner.remaining();
        r.bytes(used)?;
        Ok(NameList {
            count: n,
            raw: &rest[..used],
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let mut r = BodyReader::new(self.raw, "names");
        (0..self.count).map_while(move |_| r.cstr_utf8().ok())
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn raw(&self) -> &'a [u8] {
        self.raw
    }
}

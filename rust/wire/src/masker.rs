//! The row-rewrite hook: a [`DataRowMasker`] sees the rows it asks for and may replace
//! them.  Without one, DataRows stream through unassembled.  [`ColumnMasker`] is the
//! masker pgwarden installs: it masks table columns, named by the origin every
//! RowDescription field carries (table OID and attribute number).

use std::sync::Arc;

use ahash::AHashMap as HashMap;

use crate::backend::{field, Fields, RowDescription};

/// Rewrites DataRow messages on their way to the client.
///
/// The server relay calls [`describes`](DataRowMasker::describes) at each
/// RowDescription header, with the statement text when it answers a Describe, then
/// [`describe`](DataRowMasker::describe) with the whole message.  At each DataRow header
/// it asks [`wants_rows`](DataRowMasker::wants_rows), with the text of the statement an
/// Execute runs (rows of an Execute come without a RowDescription of their own): only
/// when that answers `true` is the row assembled and passed to
/// [`mask_row`](DataRowMasker::mask_row); otherwise it keeps streaming at no cost.
///
/// COPY TO STDOUT (CopyData, not DataRow) and FunctionCallResponse are not offered: the
/// statements that would produce them must be decided before they run.
pub trait DataRowMasker: Send + Sync {
    /// A RowDescription is arriving: it answers a Describe of `statement` (the text of
    /// the prepared statement or portal described), or, with `None`, starts a result.
    fn describes(&mut self, _statement: Option<&Arc<str>>) {}

    /// The columns of the RowDescription announced by `describes`.
    fn describe(&mut self, description: &RowDescription<'_>);

    /// Whether the current result's rows must be assembled and offered to `mask_row`.
    /// `statement` is the text the current Execute runs (`None` for a simple Query).
    fn wants_rows(&mut self, statement: Option<&str>) -> bool;

    /// Offered one whole DataRow body.  Returns `true` after writing the replacement
    /// body (column count and values, without tag or length) into `out`; `false` to
    /// forward the row unchanged.
    fn mask_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool;

    /// The current result is over (CommandComplete, EmptyQueryResponse,
    /// PortalSuspended, ErrorResponse): the names of the columns it masked, for the
    /// statement's audit record (empty when it masked nothing).
    fn result_end(&mut self) -> Vec<Arc<str>> {
        Vec::new()
    }

    /// Called at every ReadyForQuery.
    fn reset(&mut self) {}

    /// Whether ErrorResponses must be offered to `mask_error`.
    fn wants_errors(&self) -> bool {
        false
    }

    /// Offered one whole ErrorResponse body.  Returns `true` after writing a replacement
    /// body into `out`; `false` to forward it unchanged.
    fn mask_error(&mut self, _body: &[u8], _out: &mut Vec<u8>) -> bool {
        false
    }
}

/// What replaces the DETAIL of an error about a masked table.
pub const WITHHELD_DETAIL: &[u8] =
    b"pgwarden masking withheld this detail: it may show values of masked columns";

/// What a masked column's values become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskStyle {
    /// NULL, whatever the type.
    Null,
    /// This text for columns of a text type (`text`, `varchar`, `char(n)`, `name`), whose
    /// text and binary formats are the same bytes; NULL for any other type.
    Replace(Box<[u8]>),
    /// For a text type, `prefix` followed by the value's last `keep_last` characters
    /// (`prefix` alone when the value has no more than that many characters, or is not
    /// UTF-8); NULL for any other type.
    Partial { prefix: Box<[u8]>, keep_last: usize },
}

/// One masked table column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedColumn {
    pub table_oid: u32,
    pub attnum: i16,
    pub style: MaskStyle,
    /// How the audit names it (`schema.table.column`).
    pub name: Arc<str>,
}

/// The name recorded when rows are masked whole (their columns were never described).
pub const EVERY_COLUMN: &str = "*";

/// Type OIDs whose binary format is the text itself.
const TEXT_TYPES: [u32; 4] = [
    25,   // text
    1043, // varchar
    1042, // bpchar
    19,   // name
];

/// What happens to one column of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Null,
    Replace(Box<[u8]>),
    Partial(Box<[u8]>, usize),
}

/// The masked columns of one row shape, by position, and their names.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    columns: Vec<(usize, Action)>,
    names: Vec<Arc<str>>,
}

/// A table's (schema, name), as ErrorResponse fields carry them.
type TableName = (Box<[u8]>, Box<[u8]>);

/// A result's masked columns, `None` when it has none.
type MaybeShape = Option<Arc<Shape>>;

/// The rows of the current result.
#[derive(Debug, Clone)]
enum Current {
    /// Not known yet: decided at the first DataRow.
    Unresolved,
    /// Nothing to mask.
    Clear,
    Masked(Arc<Shape>),
    /// Rows whose columns the gateway never saw described: every value is masked.
    Unknown,
}

/// Most statement texts a session keeps a description of.  Beyond it the table is
/// cleared: a statement executed again without a new Describe then has every value of
/// its rows masked, which errs on the side of the mask.
const MAX_DESCRIBED: usize = 4096;

/// Masks table columns in every result of one session.
#[derive(Debug)]
pub struct ColumnMasker {
    columns: HashMap<(u32, i16), (MaskStyle, Arc<str>)>,
    /// The masked tables, (schema, table), from the columns' names: errors about them
    /// (a constraint violation's "Failing row contains (...)") lose their DETAIL.
    tables: Vec<TableName>,
    /// The masked columns of each statement text described in this session (`None`:
    /// nothing to mask, or no rows).
    described: HashMap<Arc<str>, Option<Arc<Shape>>>,
    /// The text whose Describe the RowDescription being assembled answers.
    describing: Option<Option<Arc<str>>>,
    current: Current,
    /// The last RowDescription seen and its shape: a statement run again describes its
    /// result the same way, byte for byte.
    last_description: Option<(Box<[u8]>, MaybeShape)>,
    /// The current result has had a row masked.
    masked_any: bool,
}

impl ColumnMasker {
    pub fn new(columns: impl IntoIterator<Item = MaskedColumn>) -> Self {
        let columns: HashMap<(u32, i16), (MaskStyle, Arc<str>)> = columns
            .into_iter()
            .map(|c| ((c.table_oid, c.attnum), (c.style, c.name)))
            .collect();
        let mut tables: Vec<TableName> = Vec::new();
        for (_, name) in columns.values() {
            let mut parts = name.splitn(3, '.');
            if let (Some(schema), Some(table), Some(_)) = (parts.next(), parts.next(), parts.next())
            {
                let key = (schema.as_bytes().into(), table.as_bytes().into());
                if !tables.contains(&key) {
                    tables.push(key);
                }
            }
        }
        ColumnMasker {
            columns,
            tables,
            described: HashMap::new(),
            describing: None,
            current: Current::Unresolved,
            last_description: None,
            masked_any: false,
        }
    }

    fn shape_of(&self, description: &RowDescription<'_>) -> Option<Arc<Shape>> {
        let mut columns = Vec::new();
        let mut names: Vec<Arc<str>> = Vec::new();
        for (i, f) in description.fields().enumerate() {
            let Some((style, name)) = self.columns.get(&(f.table_oid, f.column_attnum)) else {
                continue;
            };
            columns.push((
                i,
                match style {
                    MaskStyle::Replace(text) if TEXT_TYPES.contains(&f.type_oid) => {
                        Action::Replace(text.clone())
                    }
                    MaskStyle::Partial { prefix, keep_last }
                        if TEXT_TYPES.contains(&f.type_oid) =>
                    {
                        Action::Partial(prefix.clone(), *keep_last)
                    }
                    _ => Action::Null,
                },
            ));
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        (!columns.is_empty()).then(|| Arc::new(Shape { columns, names }))
    }
}

impl DataRowMasker for ColumnMasker {
    fn describes(&mut self, statement: Option<&Arc<str>>) {
        self.describing = Some(statement.cloned());
    }

    fn describe(&mut self, description: &RowDescription<'_>) {
        let raw = description.raw_fields();
        let shape = match &self.last_description {
            Some((bytes, shape)) if **bytes == *raw => shape.clone(),
            _ => {
                let shape = self.shape_of(description);
                self.last_description = Some((raw.into(), shape.clone()));
                shape
            }
        };
        match self.describing.take() {
            Some(Some(text)) => {
                if self.described.len() >= MAX_DESCRIBED && !self.described.contains_key(&text) {
                    self.described.clear();
                }
                self.described.insert(text, shape);
            }
            _ => {
                self.current = match shape {
                    Some(s) => Current::Masked(s),
                    None => Current::Clear,
                }
            }
        }
    }

    fn wants_rows(&mut self, statement: Option<&str>) -> bool {
        if let Current::Unresolved = self.current {
            self.current = match statement.map(|s| self.described.get(s)) {
                Some(Some(Some(shape))) => Current::Masked(shape.clone()),
                Some(Some(None)) => Current::Clear,
                // Rows the gateway cannot place: a statement never described.
                _ => Current::Unknown,
            };
        }
        !matches!(self.current, Current::Clear)
    }

    fn mask_row(&mut self, row: &[u8], out: &mut Vec<u8>) -> bool {
        let shape = match &self.current {
            Current::Masked(s) => Some(s.clone()),
            Current::Unknown => None,
            Current::Unresolved | Current::Clear => return false,
        };
        let Some(values) = Values::read(row) else {
            // A row that does not parse is the server's problem: it goes as it came,
            // without a masked column's value, since every value is dropped.
            out.extend_from_slice(&0i16.to_be_bytes());
            self.masked_any = true;
            return true;
        };
        out.extend_from_slice(&(values.len() as i16).to_be_bytes());
        let mut next = shape.as_ref().map(|s| s.columns.iter().peekable());
        for (i, value) in values.iter().enumerate() {
            let action = match &mut next {
                Some(it) => match it.peek() {
                    Some((at, _)) if *at == i => it.next().map(|(_, a)| a),
                    _ => None,
                },
                None => Some(&Action::Null),
            };
            match (action, value) {
                (None, v) | (Some(_), v @ None) => write_value(out, v),
                (Some(Action::Null), Some(_)) => write_value(out, None),
                (Some(Action::Replace(text)), Some(_)) => write_value(out, Some(text)),
                (Some(Action::Partial(prefix, keep)), Some(v)) => {
                    write_partial(out, prefix, *keep, v)
                }
            }
        }
        self.masked_any = true;
        true
    }

    fn result_end(&mut self) -> Vec<Arc<str>> {
        let current = std::mem::replace(&mut self.current, Current::Unresolved);
        if !std::mem::take(&mut self.masked_any) {
            return Vec::new();
        }
        match current {
            Current::Masked(shape) => shape.names.clone(),
            _ => vec![Arc::from(EVERY_COLUMN)],
        }
    }

    fn reset(&mut self) {
        self.current = Current::Unresolved;
        self.masked_any = false;
        self.describing = None;
    }

    fn wants_errors(&self) -> bool {
        !self.tables.is_empty()
    }

    fn mask_error(&mut self, body: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(fields) = Fields::decode(body, "ErrorResponse") else {
            return false;
        };
        let (Some(schema), Some(table)) = (fields.get(b's'), fields.get(b't')) else {
            return false;
        };
        if fields.get(field::DETAIL).is_none()
            || !self
                .tables
                .iter()
                .any(|(s, t)| **s == *schema && **t == *table)
        {
            return false;
        }
        for (code, value) in fields.iter() {
            out.push(code);
            out.extend_from_slice(if code == field::DETAIL {
                WITHHELD_DETAIL
            } else {
                value
            });
            out.push(0);
        }
        out.push(0);
        true
    }
}

/// `prefix` and the last `keep` characters of `value` (`prefix` alone when `value` is not
/// longer than that, or not UTF-8).
fn write_partial(out: &mut Vec<u8>, prefix: &[u8], keep: usize, value: &[u8]) {
    let tail = match std::str::from_utf8(value) {
        Ok(text) if keep > 0 => match text.char_indices().rev().nth(keep - 1) {
            Some((0, _)) | None => &[][..], // no more than `keep` characters
            Some((at, _)) => &value[at..],
        },
        _ => &[][..],
    };
    out.extend_from_slice(&((prefix.len() + tail.len()) as i32).to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(tail);
}

fn write_value(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            out.extend_from_slice(&(v.len() as i32).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// A DataRow body's values, in place.
struct Values<'a> {
    count: usize,
    body: &'a [u8],
}

impl<'a> Values<'a> {
    /// `None` when the body is not a well-formed DataRow.
    fn read(body: &'a [u8]) -> Option<Self> {
        let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
        let count = usize::try_from(count).ok()?;
        let v = Values {
            count,
            body: &body[2..],
        };
        let mut seen = 0;
        let mut rest = v.body;
        while seen < count {
            let (_, after) = split_value(rest)?;
            rest = after;
            seen += 1;
        }
        rest.is_empty().then_some(v)
    }

    fn len(&self) -> usize {
        self.count
    }

    fn iter(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let mut rest = self.body;
        let mut left = self.count;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            let (value, after) = split_value(rest)?;
            rest = after;
            Some(value)
        })
    }
}

/// One value (`None` for NULL) and what follows it.
fn split_value(bytes: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let len = i32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let rest = &bytes[4..];
    if len == -1 {
        return Some((None, rest));
    }
    let len = usize::try_from(len).ok()?;
    (rest.len() >= len).then(|| (Some(&rest[..len]), &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::FieldDescription;

    fn description(fields: &[(u32, i16, u32)]) -> Vec<u8> {
        let fields: Vec<FieldDescription<'_>> = fields
            .iter()
            .map(|&(table_oid, column_attnum, type_oid)| FieldDescription {
                name: b"c",
                table_oid,
                column_attnum,
                type_oid,
                type_len: -1,
                type_modifier: -1,
                format: 0,
            })
            .collect();
        let mut buf = Vec::new();
        RowDescription::encode_fields(&mut buf, &fields);
        buf[5..].to_vec()
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            write_value(&mut out, *v);
        }
        out
    }

    fn masker() -> ColumnMasker {
        ColumnMasker::new([
            MaskedColumn {
                table_oid: 100,
                attnum: 2,
                style: MaskStyle::Replace(b"****".to_vec().into()),
                name: Arc::from("s.t.email"),
            },
            MaskedColumn {
                table_oid: 100,
                attnum: 3,
                style: MaskStyle::Replace(b"****".to_vec().into()),
                name: Arc::from("s.t.n"),
            },
        ])
    }

    #[test]
    fn masks_described_columns_by_origin() {
        let mut m = masker();
        let rd = description(&[(100, 1, 23), (100, 2, 25), (100, 3, 23), (200, 2, 25)]);
        m.describes(None);
        m.describe(&RowDescription::decode(&rd).unwrap());
        assert!(m.wants_rows(None));
        let mut out = Vec::new();
        let input = row(&[Some(b"1"), Some(b"a@b"), Some(b"42"), Some(b"x")]);
        assert!(m.mask_row(&input, &mut out));
        // text column replaced, int column NULL, another table's column 2 untouched
        assert_eq!(out, row(&[Some(b"1"), Some(b"****"), None, Some(b"x")]));
        let mut out = Vec::new();
        m.mask_row(&row(&[Some(b"1"), None, None, None]), &mut out);
        assert_eq!(out, row(&[Some(b"1"), None, None, None]));
        let names = m.result_end();
        assert_eq!(
            names.iter().map(|n| &**n).collect::<Vec<_>>(),
            ["s.t.email", "s.t.n"]
        );
    }

    #[test]
    fn results_without_masked_columns_stream() {
        let mut m = masker();
        let rd = description(&[(100, 1, 23), (0, 0, 25)]);
        m.describes(None);
        m.describe(&RowDescription::decode(&rd).unwrap());
        assert!(!m.wants_rows(None));
    }

    #[test]
    fn executes_use_the_description_of_their_statement() {
        let mut m = masker();
        let rd = description(&[(100, 2, 1043)]);
        m.describes(Some(&Arc::from("SELECT email FROM t")));
        m.describe(&RowDescription::decode(&rd).unwrap());
        m.describes(Some(&Arc::from("SELECT 1")));
        m.describe(&RowDescription::decode(&description(&[(0, 0, 23)])).unwrap());
        assert!(m.wants_rows(Some("SELECT email FROM t")));
        let mut out = Vec::new();
        assert!(m.mask_row(&row(&[Some(b"a@b")]), &mut out));
        assert_eq!(out, row(&[Some(b"****")]));
        assert_eq!(m.result_end().len(), 1);
        assert!(!m.wants_rows(Some("SELECT 1")));
        assert!(m.result_end().is_empty());
        // Never described: every value is masked.
        assert!(m.wants_rows(Some("SELECT secret FROM t")));
        let mut out = Vec::new();
        assert!(m.mask_row(&row(&[Some(b"s"), Some(b"2")]), &mut out));
        assert_eq!(out, row(&[None, None]));
        assert_eq!(&*m.result_end()[0], EVERY_COLUMN);
    }

    #[test]
    fn null_style_and_malformed_rows() {
        let mut m = ColumnMasker::new([MaskedColumn {
            table_oid: 7,
            attnum: 1,
            style: MaskStyle::Null,
            name: Arc::from("s.u.a"),
        }]);
        m.describes(None);
        m.describe(&RowDescription::decode(&description(&[(7, 1, 25)])).unwrap());
        assert!(m.wants_rows(None));
        let mut out = Vec::new();
        assert!(m.mask_row(&row(&[Some(b"secret")]), &mut out));
        assert_eq!(out, row(&[None]));
        let mut out = Vec::new();
        assert!(m.mask_row(&[0, 1, 0, 0, 0, 9, b'x'], &mut out));
        assert_eq!(out, 0i16.to_be_bytes());
    }

    #[test]
    fn partial_keeps_the_last_characters_of_longer_texts() {
        let mut out = Vec::new();
        write_partial(&mut out, b"****", 4, "4111 1111 1111 1234".as_bytes());
        assert_eq!(&out[4..], b"****1234");
        for (value, expected) in [("1234", "**"), ("12345", "**2345"), ("é1234", "**1234")] {
            let mut out = Vec::new();
            write_partial(&mut out, b"**", 4, value.as_bytes());
            assert_eq!(&out[4..], expected.as_bytes(), "{value}");
        }
        let mut out = Vec::new();
        write_partial(&mut out, b"**", 2, "añé".as_bytes());
        assert_eq!(&out[4..], "**ñé".as_bytes());
        let mut out = Vec::new();
        write_partial(&mut out, b"**", 2, &[0xff, 0xfe, 0xfd]);
        assert_eq!(&out[4..], b"**");
    }

    #[test]
    fn details_of_errors_about_masked_tables_are_withheld() {
        let mut m = masker();
        let error = |table: &str| {
            let mut b = Vec::new();
            for (code, value) in [
                (b'S', "ERROR"),
                (b'C', "23502"),
                (b'M', "null value in column \"name\""),
                (b'D', "Failing row contains (1, null, ada@example.com)."),
                (b's', "s"),
                (b't', table),
            ] {
                b.push(code);
                b.extend_from_slice(value.as_bytes());
                b.push(0);
            }
            b.push(0);
            b
        };
        let mut out = Vec::new();
        assert!(m.mask_error(&error("t"), &mut out));
        let fields = Fields::decode(&out, "ErrorResponse").unwrap();
        assert_eq!(fields.get(field::DETAIL), Some(WITHHELD_DETAIL));
        assert_eq!(fields.get(b'C'), Some(&b"23502"[..]));
        assert_eq!(fields.get(b't'), Some(&b"t"[..]));
        assert!(!m.mask_error(&error("other"), &mut Vec::new()));
    }

    proptest::proptest! {
        /// Any row, any description: the masked row has the same column count, the
        /// masked columns are NULL or the replacement, every other value is untouched.
        #[test]
        fn masked_rows_keep_their_shape(
            values in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)),
                0..12,
            ),
            origins in proptest::collection::vec((0u32..3, 0i16..4, proptest::bool::ANY), 12),
        ) {
            let mut m = masker();
            let fields: Vec<(u32, i16, u32)> = origins[..values.len()]
                .iter()
                .map(|&(oid, attnum, text)| (oid + 99, attnum, if text { 25 } else { 23 }))
                .collect();
            m.describes(None);
            m.describe(&RowDescription::decode(&description(&fields)).unwrap());
            let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
            let input = row(&refs);
            let mut out = Vec::new();
            let wanted = m.wants_rows(None);
            let rewritten = wanted && m.mask_row(&input, &mut out);
            let got: Vec<Option<Vec<u8>>> = if rewritten {
                Values::read(&out).unwrap().iter().map(|v| v.map(<[u8]>::to_vec)).collect()
            } else {
                values.clone()
            };
            proptest::prop_assert_eq!(got.len(), values.len());
            for (i, &(oid, attnum, text)) in fields.iter().enumerate() {
                let masked = oid == 100 && (attnum == 2 || attnum == 3);
                let expected = match (&values[i], masked) {
                    (v, false) => v.clone(),
                    (None, true) => None,
                    (Some(_), true) if text == 25 => Some(b"****".to_vec()),
                    (Some(_), true) => None,
                };
                proptest::prop_assert_eq!(&got[i], &expected);
            }
        }
    }
}

//! A recorded statement as a psql-like transcript: who ran it and when, the decision,
//! the SQL, then what the client got, decoded from the server messages the recording
//! kept (RowDescription, DataRow, CommandComplete, ErrorResponse, NoticeResponse,
//! CopyData) and laid out as psql's default "aligned" format does (centred headers,
//! numbers right-aligned, `(n rows)`).
//!
//! `pgwarden replay` prints these for a whole session; the shipper sends the same text as
//! the body of a statement's result log record.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use unicode_width::UnicodeWidthChar;

use crate::spans::truthy;

/// Type OIDs psql right-aligns (print.c, column_type_alignment).
const NUMERIC_OIDS: [i32; 11] = [20, 21, 23, 26, 28, 29, 700, 701, 790, 1700, 5069];

/// The fields of a `stmt` record the transcript shows.
#[derive(Debug, Default, Deserialize)]
pub struct StmtView<'a> {
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(borrow, default)]
    pub sql: Option<Cow<'a, str>>,
    #[serde(default)]
    pub function_oid: Option<i64>,
    #[serde(default)]
    pub params: Option<Value>,
    #[serde(default)]
    pub decision: Option<Value>,
}

/// The fields of an `end` record the transcript shows.
#[derive(Debug, Default, Deserialize)]
pub struct EndView<'a> {
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(default)]
    pub duration_us: Option<u64>,
    #[serde(borrow, default)]
    pub sqlstate: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub command_tag: Option<Cow<'a, str>>,
    /// The server messages the client got, base64.
    #[serde(borrow, default)]
    pub result: Option<Cow<'a, str>>,
    /// The RowDescription of an extended execution (its Describe's answer), base64.
    #[serde(borrow, default)]
    pub columns: Option<Cow<'a, str>>,
    #[serde(default)]
    pub result_omitted: Option<Value>,
    /// The columns masked in the result (`schema.table.column`).
    #[serde(default)]
    pub masked_columns: Option<Vec<String>>,
}

/// One statement's lines (the last one empty).  `decision`: the decision record's
/// verdict, when there is one; `columns`: the RowDescription to use when the `end`
/// carries none (a prepared statement described at an earlier execution).
pub fn statement(
    stmt: Option<&StmtView<'_>>,
    end: Option<&EndView<'_>>,
    decision: Option<&str>,
    columns: Option<&str>,
) -> Vec<String> {
    let n = stmt.and_then(|s| s.n).or_else(|| end.and_then(|e| e.n));
    let ts = match stmt {
        Some(s) => s.ts.unwrap_or(0),
        None => end.and_then(|e| e.ts).unwrap_or(0),
    };
    let stmt_decision = stmt.and_then(|s| value_text(s.decision.as_ref()));
    let verdict = decision
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .or(stmt_decision)
        .unwrap_or_else(|| "allow".to_owned());
    let mut head = String::with_capacity(80);
    head.push_str("-- [");
    match n {
        Some(n) => head.push_str(itoa::Buffer::new().format(n)),
        None => head.push('?'),
    }
    head.push_str("] ");
    when_into(&mut head, ts);
    head.push_str(" · ");
    head.push_str(&verdict);
    if let Some(end) = end {
        head.push_str(" · ");
        milliseconds_into(&mut head, end.duration_us.unwrap_or(0));
        head.push_str(" ms");
        if let Some(state) = end.sqlstate.as_deref().filter(|s| !s.is_empty()) {
            head.push_str(" · SQLSTATE ");
            head.push_str(state);
        }
        if let Some(masked) = end.masked_columns.as_ref().filter(|m| !m.is_empty()) {
            head.push_str(" · masked ");
            head.push_str(&masked.join(", "));
        }
    } else {
        head += " · no end recorded";
    }
    let mut out = vec![head];
    if let Some(stmt) = stmt {
        let sql: Cow<'_, str> = match (&stmt.sql, stmt.function_oid) {
            (Some(sql), _) => Cow::Borrowed(sql),
            (None, Some(oid)) => Cow::Owned(format!("-- fast-path function call, oid {oid}")),
            (None, None) => Cow::Borrowed(""),
        };
        let text = sql.trim_end();
        if text.ends_with(';') || text.starts_with("--") {
            out.push(text.to_owned());
        } else {
            out.push(format!("{text};"));
        }
        if let Some(params) = stmt.params.as_ref().filter(|p| truthy(p)) {
            out.push(format!("-- parameters: {params}"));
        }
    }
    if let Some(end) = end {
        if let Some(result) = &end.result {
            let mut data = end
                .columns
                .as_deref()
                .or(columns)
                .map(|c| STANDARD.decode(c).unwrap_or_default())
                .unwrap_or_default();
            data.extend(STANDARD.decode(result.as_bytes()).unwrap_or_default());
            render_result(&data, &mut out);
        } else if end.sqlstate.as_deref().is_some_and(|s| !s.is_empty()) {
            out.push(format!("ERROR:  {}", end.error.as_deref().unwrap_or("")));
        } else if let Some(tag) = end.command_tag.as_deref().filter(|t| !t.is_empty()) {
            out.push(tag.to_owned());
        }
        if let Some(Value::Object(omitted)) = &end.result_omitted {
            let rows = omitted.get("rows").and_then(Value::as_i64).unwrap_or(0);
            let bytes = omitted.get("bytes").and_then(Value::as_i64).unwrap_or(0);
            if rows != 0 || bytes != 0 {
                out.push(format!(
                    "-- recording cut: {rows} more row(s), {bytes} bytes not kept"
                ));
            }
        }
    }
    if out.last().is_some_and(|l| !l.is_empty()) {
        out.push(String::new());
    }
    out
}

fn value_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// `2026-11-26 08:37:53.351 UTC` for a record's `ts` (microseconds since the epoch).
pub fn when(ts_us: u64) -> String {
    let mut out = String::with_capacity(28);
    when_into(&mut out, ts_us);
    out
}

/// [`when`], appended to `out`.
fn when_into(out: &mut String, ts_us: u64) {
    let secs = ts_us / 1_000_000;
    let millis = (ts_us % 1_000_000) / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{millis:03} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
}

/// `duration_us` in milliseconds with three decimals, as `{:.3}` writes the quotient as a
/// float (exactly that below 2^50 µs, where the float quotient rounds to the same
/// thousandths); integers, not float formatting, which is most of a head line's cost.
fn milliseconds_into(out: &mut String, duration_us: u64) {
    if duration_us >= 1 << 50 {
        let _ = write!(out, "{:.3}", duration_us as f64 / 1000.0);
        return;
    }
    out.push_str(itoa::Buffer::new().format(duration_us / 1000));
    let frac = duration_us % 1000;
    out.push('.');
    if frac < 100 {
        out.push('0');
    }
    if frac < 10 {
        out.push('0');
    }
    out.push_str(itoa::Buffer::new().format(frac));
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A row's values as text (None: NULL).
type Row = Vec<Option<String>>;

struct Column {
    name: String,
    type_oid: i32,
    binary: bool,
}

/// The server messages in `data`: (type, body), a body cut short by the end of `data`
/// as far as it goes.
fn messages(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let header = data.get(pos..pos + 5)?;
        let length = usize::try_from(i32::from_be_bytes([
            header[1], header[2], header[3], header[4],
        ]))
        .ok()
        .filter(|l| *l >= 4)?;
        let end = pos + 1 + length;
        let body = &data[pos + 5..end.min(data.len())];
        let tag = header[0];
        pos = end;
        Some((tag, body))
    })
}

fn cstring(body: &[u8], pos: usize) -> Option<(String, usize)> {
    let rest = body.get(pos..)?;
    let len = rest.iter().position(|b| *b == 0)?;
    Some((
        String::from_utf8_lossy(&rest[..len]).into_owned(),
        pos + len + 1,
    ))
}

fn be_i16(body: &[u8], pos: usize) -> Option<i16> {
    Some(i16::from_be_bytes(body.get(pos..pos + 2)?.try_into().ok()?))
}

fn be_i32(body: &[u8], pos: usize) -> Option<i32> {
    Some(i32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?))
}

fn row_description(body: &[u8]) -> Vec<Column> {
    let mut cols = Vec::new();
    let Some(count) = be_i16(body, 0) else {
        return cols;
    };
    let mut pos = 2;
    for _ in 0..count {
        let Some((name, at)) = cstring(body, pos) else {
            break;
        };
        let (Some(type_oid), Some(format)) = (be_i32(body, at + 6), be_i16(body, at + 16)) else {
            break;
        };
        pos = at + 18;
        cols.push(Column {
            name,
            type_oid,
            binary: format == 1,
        });
    }
    cols
}

/// A float as Python's `repr` writes it (and PostgreSQL's float output, for finite
/// values): the shortest digits that read back the same, in exponent form below 1e-4 and
/// from 1e16 on.
fn float_text(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{v:e}"); // shortest round-trip digits: "-1.2345e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if (point as usize) >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        return format!("{sign}{text}");
    }
    let (first, rest) = digits.split_at(1);
    let mantissa = if rest.is_empty() {
        first.to_owned()
    } else {
        format!("{first}.{rest}")
    };
    let exp_sign = if exp < 0 { '-' } else { '+' };
    format!("{sign}{mantissa}e{exp_sign}{:02}", exp.unsigned_abs())
}

fn hex(raw: &[u8]) -> String {
    let mut out = String::with_capacity(2 + 2 * raw.len());
    out.push_str("\\x");
    for b in raw {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A binary-format value as text, for the types whose binary form is simple; others as
/// `\x` hex.
fn binary_value(raw: &[u8], type_oid: i32) -> String {
    let utf8 = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    let text = match (type_oid, raw.len()) {
        (16, _) => Some(if raw.first() == Some(&1) { "t" } else { "f" }.to_owned()),
        (21, 2) => Some(i16::from_be_bytes([raw[0], raw[1]]).to_string()),
        (23, 4) => raw
            .try_into()
            .ok()
            .map(|b| i32::from_be_bytes(b).to_string()),
        (20, 8) => raw
            .try_into()
            .ok()
            .map(|b| i64::from_be_bytes(b).to_string()),
        (26, 4) => raw
            .try_into()
            .ok()
            .map(|b| u32::from_be_bytes(b).to_string()),
        (700, 4) => raw
            .try_into()
            .ok()
            .map(|b| float_text(f64::from(f32::from_be_bytes(b)))),
        (701, 8) => raw
            .try_into()
            .ok()
            .map(|b| float_text(f64::from_be_bytes(b))),
        (25 | 1043 | 1042 | 19 | 114 | 142, _) => utf8(raw),
        (3802, _) if raw.first() == Some(&1) => utf8(&raw[1..]),
        (2950, 16) => {
            let h = hex(raw);
            let h = &h[2..];
            Some(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        _ => None,
    };
    text.unwrap_or_else(|| hex(raw))
}

fn data_row(body: &[u8], columns: &[Column]) -> Row {
    let mut values = Vec::new();
    let Some(count) = be_i16(body, 0) else {
        return values;
    };
    let mut pos = 2;
    for i in 0..count as usize {
        let Some(length) = be_i32(body, pos) else {
            break;
        };
        pos += 4;
        if length < 0 {
            values.push(None);
            continue;
        }
        let Some(raw) = body.get(pos..(pos + length as usize).min(body.len())) else {
            break;
        };
        pos += length as usize;
        values.push(Some(match columns.get(i) {
            Some(col) if col.binary => binary_value(raw, col.type_oid),
            _ => String::from_utf8_lossy(raw).into_owned(),
        }));
    }
    values
}

/// An ErrorResponse's or NoticeResponse's fields, the first of each code.
fn fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out: Vec<(u8, String)> = Vec::new();
    let mut pos = 0;
    while let Some(&code) = body.get(pos) {
        if code == 0 {
            break;
        }
        let Some((value, next)) = cstring(body, pos + 1) else {
            break;
        };
        if !out.iter().any(|(c, _)| *c == code) {
            out.push((code, value));
        }
        pos = next;
    }
    out
}

/// Display width as psql counts it: wide and full-width characters take two columns,
/// combining marks none.
fn width(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(1)).sum()
}

/// Appends `text` padded with spaces to `width_to` columns, on the left when `right`.
fn pad_into(line: &mut String, text: &str, width_to: usize, right: bool) {
    let gap = width_to.saturating_sub(width(text));
    if !right {
        line.push_str(text);
    }
    spaces(line, gap);
    if right {
        line.push_str(text);
    }
}

fn spaces(line: &mut String, n: usize) {
    line.extend(std::iter::repeat_n(' ', n));
}

/// psql's aligned table (border 1), footer included.  `total_rows`: the row count the
/// server reported, when the recording kept fewer rows than the client got.
fn format_aligned(cols: &[Column], rows: &[Row], total_rows: Option<u64>, out: &mut Vec<String>) {
    let right: Vec<bool> = cols
        .iter()
        .map(|c| NUMERIC_OIDS.contains(&c.type_oid))
        .collect();
    let cells: Vec<Vec<Vec<&str>>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|v| v.as_deref().unwrap_or("").split('\n').collect())
                .collect()
        })
        .collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| width(&c.name)).collect();
    for row in &cells {
        for (j, lines) in row.iter().take(cols.len()).enumerate() {
            for line in lines {
                widths[j] = widths[j].max(width(line));
            }
        }
    }
    let mut header = String::from(" ");
    let mut rule = String::from("-");
    for (j, c) in cols.iter().enumerate() {
        if j > 0 {
            header.push_str(" | ");
            rule.push_str("-+-");
        }
        let gap = widths[j] - width(&c.name);
        spaces(&mut header, gap / 2);
        header.push_str(&c.name);
        spaces(&mut header, gap.div_ceil(2));
        rule.extend(std::iter::repeat_n('-', widths[j]));
    }
    header.push(' ');
    rule.push('-');
    out.push(header);
    out.push(rule);
    let last = cols.len().wrapping_sub(1);
    let missing: Vec<&str> = vec![""];
    for row in &cells {
        let height = row.iter().map(Vec::len).max().unwrap_or(1);
        for k in 0..height {
            let mut line = String::from(" ");
            for j in 0..cols.len() {
                let lines = row.get(j).unwrap_or(&missing);
                let more = k + 1 < lines.len();
                if k >= lines.len() {
                    // This cell has no more lines: pad, except in the last column.
                    if j != last {
                        spaces(&mut line, widths[j]);
                    }
                } else if right[j] {
                    pad_into(&mut line, lines[k], widths[j], true);
                } else if j == last && !more {
                    line.push_str(lines[k]); // psql does not pad the last column on the right
                } else {
                    pad_into(&mut line, lines[k], widths[j], false);
                }
                if j < last {
                    line.push_str(if more { "+| " } else { " | " });
                } else if more {
                    line.push('+');
                }
            }
            out.push(line);
        }
    }
    let n = total_rows.unwrap_or(rows.len() as u64);
    out.push(format!("({n} row{})", if n == 1 { "" } else { "s" }));
    out.push(String::new());
}

/// What psql would print for these server messages (results, tags, errors, notices).
pub fn render_result(data: &[u8], out: &mut Vec<String>) {
    let mut current: Option<(Vec<Column>, Vec<Row>)> = None;
    let mut copying = false;
    for (tag, body) in messages(data) {
        match tag {
            b'T' => current = Some((row_description(body), Vec::new())),
            b'D' => {
                let (cols, rows) = current.get_or_insert_with(|| {
                    let count = be_i16(body, 0).unwrap_or(0).max(0);
                    let cols = (0..count)
                        .map(|i| Column {
                            name: format!("?column{}?", i + 1),
                            type_oid: 25,
                            binary: false,
                        })
                        .collect();
                    (cols, Vec::new())
                });
                rows.push(data_row(body, cols));
            }
            b'C' | b's' => {
                let command = if tag == b'C' {
                    cstring(body, 0).map(|(c, _)| c).unwrap_or_default()
                } else {
                    String::new()
                };
                if let Some((cols, rows)) = current.take() {
                    let total = command.rsplit_once(' ').and_then(|(verb, count)| {
                        let counted = matches!(verb, "SELECT" | "FETCH")
                            && !count.is_empty()
                            && count.bytes().all(|b| b.is_ascii_digit());
                        counted.then(|| count.parse().ok()).flatten()
                    });
                    format_aligned(&cols, &rows, total, out);
                } else if copying {
                    copying = false;
                } else if !command.is_empty() {
                    out.push(command);
                }
            }
            b'H' => copying = true,
            b'd' if copying => {
                out.push(
                    String::from_utf8_lossy(body)
                        .trim_end_matches('\n')
                        .to_owned(),
                );
            }
            b'E' | b'N' => {
                if let Some((cols, rows)) = current.take() {
                    format_aligned(&cols, &rows, None, out);
                }
                let fields = fields(body);
                let get = |code: u8| {
                    fields
                        .iter()
                        .find(|(c, v)| *c == code && !v.is_empty())
                        .map(|(_, v)| v.as_str())
                };
                let severity = get(b'V').or_else(|| get(b'S')).unwrap_or(if tag == b'E' {
                    "ERROR"
                } else {
                    "NOTICE"
                });
                out.push(format!("{severity}:  {}", get(b'M').unwrap_or("")));
                if let Some(detail) = get(b'D') {
                    out.push(format!("DETAIL:  {detail}"));
                }
                if let Some(hint) = get(b'H') {
                    out.push(format!("HINT:  {hint}"));
                }
            }
            _ => {}
        }
    }
    if let Some((cols, rows)) = current {
        format_aligned(&cols, &rows, None, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend(((body.len() + 4) as i32).to_be_bytes());
        out.extend(body);
        out
    }

    fn row_desc(cols: &[(&str, i32, i16)]) -> Vec<u8> {
        let mut b = (cols.len() as i16).to_be_bytes().to_vec();
        for (name, oid, format) in cols {
            b.extend(name.as_bytes());
            b.push(0);
            b.extend(0i32.to_be_bytes());
            b.extend(0i16.to_be_bytes());
            b.extend(oid.to_be_bytes());
            b.extend((-1i16).to_be_bytes());
            b.extend((-1i32).to_be_bytes());
            b.extend(format.to_be_bytes());
        }
        msg(b'T', &b)
    }

    fn data_row_msg(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => b.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(*v);
                }
            }
        }
        msg(b'D', &b)
    }

    fn render(data: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        render_result(data, &mut out);
        out
    }

    #[test]
    fn a_table_as_psql_prints_it() {
        let mut data = row_desc(&[("id", 23, 0), ("label", 25, 0)]);
        data.extend(data_row_msg(&[Some(b"1"), Some(b"row 1")]));
        data.extend(data_row_msg(&[Some(b"10"), None]));
        data.extend(msg(b'C', b"SELECT 2\0"));
        assert_eq!(
            render(&data),
            [
                " id | label ",
                "----+-------",
                "  1 | row 1",
                " 10 | ",
                "(2 rows)",
                ""
            ]
        );
    }

    #[test]
    fn wide_characters_and_lines_within_a_cell() {
        let mut data = row_desc(&[("名前", 25, 0), ("n", 23, 0)]);
        data.extend(data_row_msg(&[Some("日本\nab".as_bytes()), Some(b"7")]));
        data.extend(msg(b'C', b"SELECT 1\0"));
        assert_eq!(
            render(&data),
            [
                " 名前 | n ",
                "------+---",
                " 日本+| 7",
                " ab   | ",
                "(1 row)",
                ""
            ]
        );
    }

    #[test]
    fn the_servers_row_count_when_the_recording_kept_fewer() {
        let mut data = row_desc(&[("n", 23, 0)]);
        data.extend(data_row_msg(&[Some(b"1")]));
        data.extend(msg(b'C', b"SELECT 500\0"));
        assert_eq!(render(&data)[3], "(500 rows)");
    }

    #[test]
    fn binary_values_of_simple_types() {
        let mut data = row_desc(&[
            ("i", 23, 1),
            ("b", 16, 1),
            ("f", 701, 1),
            ("u", 2950, 1),
            ("x", 17, 1),
        ]);
        let uuid: Vec<u8> = (0u8..16).collect();
        data.extend(data_row_msg(&[
            Some(&(-42i32).to_be_bytes()),
            Some(&[1]),
            Some(&1e16f64.to_be_bytes()),
            Some(&uuid),
            Some(&[0xde, 0xad]),
        ]));
        let out = render(&data);
        assert_eq!(
            out[2],
            " -42 | t | 1e+16 | 00010203-0405-0607-0809-0a0b0c0d0e0f | \\xdead"
        );
    }

    #[test]
    fn floats_as_python_and_postgresql_write_them() {
        for (v, text) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (-2.5e-7, "-2.5e-07"),
            (3e22, "3e+22"),
            (f64::from(0.1f32), "0.10000000149011612"),
            (f64::INFINITY, "inf"),
            (0.0, "0.0"),
        ] {
            assert_eq!(float_text(v), text, "{v:e}");
        }
    }

    #[test]
    fn errors_notices_tags_and_copy_data() {
        let mut data = msg(b'N', b"SNOTICE\0Mhello\0Hsome hint\0\0");
        data.extend(msg(b'C', b"CREATE TABLE\0"));
        data.extend(msg(b'H', &[0, 0, 0]));
        data.extend(msg(b'd', b"1\tone\n"));
        data.extend(msg(b'C', b"COPY 1\0"));
        data.extend(msg(
            b'E',
            b"SERROR\0VERROR\0C42P01\0Mrelation \"nope\" does not exist\0Dwhy\0\0",
        ));
        assert_eq!(
            render(&data),
            [
                "NOTICE:  hello",
                "HINT:  some hint",
                "CREATE TABLE",
                "1\tone",
                "ERROR:  relation \"nope\" does not exist",
                "DETAIL:  why",
            ]
        );
    }

    #[test]
    fn a_statement_with_its_head_sql_and_outcome() {
        let stmt: StmtView<'_> =
            serde_json::from_str(r#"{"n":4,"ts":1795770152874276,"sql":"select 1 "}"#).unwrap();
        let end: EndView<'_> =
            serde_json::from_str(r#"{"n":4,"duration_us":2255,"sqlstate":"57014","error":"canceling statement due to user request","result_omitted":{"rows":2,"bytes":0}}"#)
                .unwrap();
        assert_eq!(
            statement(Some(&stmt), Some(&end), Some("deny"), None),
            [
                "-- [4] 2026-11-27 09:02:32.874 UTC · deny · 2.255 ms · SQLSTATE 57014",
                "select 1;",
                "ERROR:  canceling statement due to user request",
                "-- recording cut: 2 more row(s), 0 bytes not kept",
                "",
            ]
        );
        assert_eq!(
            statement(Some(&stmt), None, None, None),
            [
                "-- [4] 2026-11-27 09:02:32.874 UTC · allow · no end recorded",
                "select 1;",
                ""
            ]
        );
    }

    #[test]
    fn days_to_dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(when(951_782_400_000_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(when(4_102_444_799_999_999), "2099-12-31 23:59:59.999 UTC");
    }

    proptest! {
        /// Whatever a recording holds (cut short, corrupt), rendering it does not panic.
        #[test]
        fn arbitrary_results_render_without_panicking(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = render(&data);
        }

        #[test]
        fn arbitrary_messages_render_without_panicking(
            parts in proptest::collection::vec(
                (prop::sample::select(b"TDCEsHdNZ".to_vec()), proptest::collection::vec(any::<u8>(), 0..40)),
                0..8,
            )
        ) {
            let data: Vec<u8> = parts.iter().flat_map(|(t, b)| msg(*t, b)).collect();
            let _ = render(&data);
        }
    }
}

//! OTLP/protobuf encoding of spans: an `ExportTraceServiceRequest`
//! (opentelemetry-proto `collector/trace/v1`, messages of `trace/v1`, `common/v1`,
//! `resource/v1`), written straight into a byte buffer.
//!
//! The audit shipper builds its spans with the OpenTelemetry SDK and sends them with the
//! official OTLP exporters; only the step between, encoding span objects as protobuf, is
//! done here: the Python encoder creates two protobuf objects per attribute, which made it
//! the shipper's bottleneck by an order of magnitude.  Fields follow proto3 rules (defaults
//! are left out), so a decoder sees the same message the official encoder produces.

/// An attribute value (`AnyValue`).
#[derive(Debug, Clone, PartialEq)]
pub enum AnyValue<'a> {
    Str(&'a str),
    Bool(bool),
    Int(i64),
    Double(f64),
    Bytes(&'a [u8]),
    Array(Vec<AnyValue<'a>>),
    KvList(Vec<(&'a str, AnyValue<'a>)>),
}

/// The instrumentation scope of a group of spans.
#[derive(Debug, Clone, Default)]
pub struct Scope<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub schema_url: &'a str,
}

/// One span, as the SDK's `ReadableSpan` holds it.
#[derive(Debug, Clone, Default)]
pub struct SpanData<'a> {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub trace_state: &'a str,
    /// The parent's span id and whether the parent context is remote.
    pub parent: Option<([u8; 8], bool)>,
    pub name: &'a str,
    /// OTLP `SpanKind` (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Vec<(&'a str, AnyValue<'a>)>,
    /// More attributes, already encoded by [`encode_attributes`] (shared by many spans).
    pub raw_attributes: &'a [u8],
    pub dropped_attributes: u32,
    /// OTLP `Status.StatusCode` (0 unset, 1 ok, 2 error).
    pub status_code: i32,
    pub status_message: &'a str,
}

const LEN: u8 = 2;
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const FIXED32: u8 = 5;

// SpanFlags (trace/v1): the parent's is_remote is known (bit 8), and its value (bit 9).
const FLAGS_HAS_IS_REMOTE: u32 = 0x100;
const FLAGS_IS_REMOTE: u32 = 0x200;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, value: &[u8]) {
    if value.is_empty() {
        return;
    }
    key(out, field, LEN);
    varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        key(out, field, VARINT);
        varint(out, value);
    }
}

/// A length-delimited field written in place: one byte is reserved for the length (most
/// messages here are shorter than 128 bytes) and the content is moved along in the rare
/// case the length needs more, so nesting allocates nothing.
fn message(out: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    message_reserving(out, field, 1, f);
}

/// [`message`] reserving `reserve` bytes for the length: the expected size of its varint.
/// The encoding stays canonical whatever the actual length (the content moves when the
/// guess was wrong).
fn message_reserving(out: &mut Vec<u8>, field: u32, reserve: usize, f: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.resize(at + reserve, 0);
    f(out);
    let len = out.len() - at - reserve;
    let mut prefix = [0u8; 10];
    let mut n = 0;
    let mut v = len as u64;
    while v >= 0x80 {
        prefix[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    prefix[n] = v as u8;
    n += 1;
    if n != reserve {
        // One move of the content (a memmove), whichever way the guess was wrong.
        let content = at + reserve..out.len();
        if n > reserve {
            out.resize(out.len() + n - reserve, 0);
        }
        out.copy_within(content, at + n);
        out.truncate(at + n + len);
    }
    out[at..at + n].copy_from_slice(&prefix[..n]);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}
fn any_value(out: &mut Vec<u8>, v: &AnyValue<'_>) {
    match v {
        // Inside the oneof a default value is still written: it says which member is set.
        AnyValue::Str(s) => {
            key(out, 1, LEN);
            varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        AnyValue::Bool(b) => {
            key(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        AnyValue::Int(i) => {
            key(out, 3, VARINT);
            varint(out, *i as u64);
        }
        AnyValue::Double(d) => {
            key(out, 4, FIXED64);
            out.extend_from_slice(&d.to_le_bytes());
        }
        AnyValue::Array(values) => message(out, 5, |a| {
            for value in values {
                message(a, 1, |m| any_value(m, value));
            }
        }),
        AnyValue::KvList(values) => message(out, 6, |l| {
            for (k, value) in values {
                message(l, 1, |kv| key_value(kv, k, value));
            }
        }),
        AnyValue::Bytes(b) => {
            key(out, 7, LEN);
            varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
    }
}

fn key_value(out: &mut Vec<u8>, k: &str, v: &AnyValue<'_>) {
    bytes_field(out, 1, k.as_bytes());
    message(out, 2, |m| any_value(m, v));
}

/// The encoded length of a scalar `AnyValue` (the nested ones are written with [`message`]).
fn scalar_len(v: &AnyValue<'_>) -> Option<usize> {
    let bytes = |n: usize| 1 + varint_len(n as u64) + n;
    match v {
        AnyValue::Str(s) => Some(bytes(s.len())),
        AnyValue::Bytes(b) => Some(bytes(b.len())),
        AnyValue::Bool(b) => Some(1 + varint_len(u64::from(*b))),
        AnyValue::Int(i) => Some(1 + varint_len(*i as u64)),
        AnyValue::Double(_) => Some(9),
        AnyValue::Array(_) | AnyValue::KvList(_) => None,
    }
}

fn attributes(out: &mut Vec<u8>, field: u32, attrs: &[(&str, AnyValue<'_>)]) {
    for (k, v) in attrs {
        let Some(value_len) = scalar_len(v) else {
            message(out, field, |kv| key_value(kv, k, v));
            continue;
        };
        // Lengths known up front: each KeyValue written straight, with no length to patch.
        let key_len = if k.is_empty() {
            0
        } else {
            1 + varint_len(k.len() as u64) + k.len()
        };
        let kv_len = key_len + 1 + varint_len(value_len as u64) + value_len;
        out.reserve(1 + varint_len(kv_len as u64) + kv_len);
        key(out, field, LEN);
        varint(out, kv_len as u64);
        bytes_field(out, 1, k.as_bytes());
        key(out, 2, LEN);
        varint(out, value_len as u64);
        any_value(out, v);
    }
}

fn span(out: &mut Vec<u8>, s: &SpanData<'_>) {
    bytes_field(out, 1, &s.trace_id);
    bytes_field(out, 2, &s.span_id);
    bytes_field(out, 3, s.trace_state.as_bytes());
    if let Some((parent, _)) = &s.parent {
        bytes_field(out, 4, parent);
    }
    bytes_field(out, 5, s.name.as_bytes());
    varint_field(out, 6, s.kind as u64);
    if s.start_unix_nano != 0 {
        key(out, 7, FIXED64);
        out.extend_from_slice(&s.start_unix_nano.to_le_bytes());
    }
    if s.end_unix_nano != 0 {
        key(out, 8, FIXED64);
        out.extend_from_slice(&s.end_unix_nano.to_le_bytes());
    }
    attributes(out, 9, &s.attributes);
    out.extend_from_slice(s.raw_attributes);
    varint_field(out, 10, u64::from(s.dropped_attributes));
    message(out, 15, |st| {
        bytes_field(st, 2, s.status_message.as_bytes());
        varint_field(st, 3, s.status_code as u64);
    });
    let mut flags = FLAGS_HAS_IS_REMOTE;
    if matches!(s.parent, Some((_, true))) {
        flags |= FLAGS_IS_REMOTE;
    }
    key(out, 16, FIXED32);
    out.extend_from_slice(&flags.to_le_bytes());
}

/// `attrs` encoded as span attributes, for [`SpanData::raw_attributes`].
pub fn encode_attributes(out: &mut Vec<u8>, attrs: &[(&str, AnyValue<'_>)]) {
    attributes(out, 9, attrs);
}

/// Appends one `ResourceSpans` (field 1 of `ExportTraceServiceRequest`) holding `spans`
/// under one resource and one scope.  Requests for several groups are the concatenation
/// of their encodings (a repeated field).
pub fn encode_resource_spans(
    out: &mut Vec<u8>,
    resource_attributes: &[(&str, AnyValue<'_>)],
    resource_schema_url: &str,
    scope: &Scope<'_>,
    spans: &[SpanData<'_>],
) {
    let mut framed = Vec::new();
    for s in spans {
        encode_framed_span(&mut framed, s);
    }
    encode_resource_framed_spans(
        out,
        resource_attributes,
        resource_schema_url,
        scope,
        &framed,
    );
}

/// Appends `s` as one element of `ScopeSpans.spans` (field 2, length-delimited): spans
/// encoded one by one as they are built, then wrapped by
/// [`encode_resource_framed_spans`].
pub fn encode_framed_span(out: &mut Vec<u8>, s: &SpanData<'_>) {
    // A span with its attributes is most often 128 bytes to 16 KiB: a two-byte length.
    message_reserving(out, 2, 2, |m| span(m, s));
}

/// One log record (logs/v1 `LogRecord`).
#[derive(Debug, Clone, Default)]
pub struct LogData<'a> {
    pub time_unix_nano: u64,
    pub observed_time_unix_nano: u64,
    /// OTLP `SeverityNumber` (9: INFO).
    pub severity_number: i32,
    pub severity_text: &'a str,
    pub body: Option<AnyValue<'a>>,
    pub attributes: Vec<(&'a str, AnyValue<'a>)>,
    /// W3C trace flags (1: sampled).
    pub flags: u32,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub event_name: &'a str,
}

fn log_record(out: &mut Vec<u8>, l: &LogData<'_>) {
    if l.time_unix_nano != 0 {
        key(out, 1, FIXED64);
        out.extend_from_slice(&l.time_unix_nano.to_le_bytes());
    }
    varint_field(out, 2, l.severity_number as u64);
    bytes_field(out, 3, l.severity_text.as_bytes());
    if let Some(body) = &l.body {
        let len = scalar_len(body);
        message_reserving(out, 5, len.map_or(2, |n| varint_len(n as u64)), |m| {
            any_value(m, body)
        });
    }
    attributes(out, 6, &l.attributes);
    if l.flags != 0 {
        key(out, 8, FIXED32);
        out.extend_from_slice(&l.flags.to_le_bytes());
    }
    if l.trace_id != [0; 16] {
        bytes_field(out, 9, &l.trace_id);
    }
    if l.span_id != [0; 8] {
        bytes_field(out, 10, &l.span_id);
    }
    if l.observed_time_unix_nano != 0 {
        key(out, 11, FIXED64);
        out.extend_from_slice(&l.observed_time_unix_nano.to_le_bytes());
    }
    bytes_field(out, 12, l.event_name.as_bytes());
}

/// Appends `l` as one element of `ScopeLogs.log_records` (field 2, length-delimited).
/// `ExportLogsServiceRequest`, `ResourceLogs` and `ScopeLogs` number their fields as the
/// trace messages do, so [`encode_resource_framed_spans`] and [`resource_framing`] wrap
/// framed log records into a logs request the same way.
pub fn encode_framed_log(out: &mut Vec<u8>, l: &LogData<'_>) {
    message_reserving(out, 2, 2, |m| log_record(m, l));
}

/// [`encode_resource_spans`] for spans already framed by [`encode_framed_span`].
pub fn encode_resource_framed_spans(
    out: &mut Vec<u8>,
    resource_attributes: &[(&str, AnyValue<'_>)],
    resource_schema_url: &str,
    scope: &Scope<'_>,
    framed_spans: &[u8],
) {
    let (head, tail) = resource_framing(
        resource_attributes,
        resource_schema_url,
        scope,
        framed_spans.len(),
    );
    out.reserve(head.len() + framed_spans.len() + tail.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(framed_spans);
    out.extend_from_slice(&tail);
}

/// What goes before and after `framed_len` bytes of framed spans to make them an
/// `ExportTraceServiceRequest` with one ResourceSpans and one ScopeSpans: the request is
/// `head ‖ spans ‖ tail`, so the spans (megabytes) can be copied once, straight to where
/// the request is sent from.  The lengths around the spans are exact.
pub fn resource_framing(
    resource_attributes: &[(&str, AnyValue<'_>)],
    resource_schema_url: &str,
    scope: &Scope<'_>,
    framed_len: usize,
) -> (Vec<u8>, Vec<u8>) {
    let mut resource = Vec::new();
    message(&mut resource, 1, |r| attributes(r, 1, resource_attributes));
    let mut scope_head = Vec::new();
    message(&mut scope_head, 1, |sc| {
        bytes_field(sc, 1, scope.name.as_bytes());
        bytes_field(sc, 2, scope.version.as_bytes());
    });
    // tail = the ScopeSpans' schema_url, then the ResourceSpans' schema_url.
    let mut tail = Vec::new();
    bytes_field(&mut tail, 3, scope.schema_url.as_bytes());
    let scope_tail = tail.len();
    bytes_field(&mut tail, 3, resource_schema_url.as_bytes());
    let resource_tail = tail.len() - scope_tail;
    let scope_spans = (scope_head.len() + framed_len + scope_tail) as u64;
    let resource_spans = resource.len() as u64
        + 1
        + varint_len(scope_spans) as u64
        + scope_spans
        + resource_tail as u64;
    let mut head = Vec::with_capacity(resource.len() + scope_head.len() + 24);
    key(&mut head, 1, LEN);
    varint(&mut head, resource_spans);
    head.extend_from_slice(&resource);
    key(&mut head, 2, LEN);
    varint(&mut head, scope_spans);
    head.extend_from_slice(&scope_head);
    (head, tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        let mut b = Vec::new();
        varint(&mut b, 1);
        varint(&mut b, 300);
        varint(&mut b, u64::MAX);
        assert_eq!(&b[..3], &[1, 0xac, 0x02]);
        assert_eq!(b.len(), 3 + 10);
    }

    fn read_varint(b: &[u8]) -> (u64, usize) {
        let (mut v, mut shift, mut i) = (0u64, 0, 0);
        loop {
            v |= u64::from(b[i] & 0x7f) << shift;
            i += 1;
            if b[i - 1] < 0x80 {
                return (v, i);
            }
            shift += 7;
        }
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0,
            1,
            127,
            128,
            16383,
            16384,
            (1 << 21) - 1,
            1 << 21,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(varint_len(v), b.len(), "{v}");
        }
    }

    #[test]
    fn a_wrong_length_guess_still_encodes_canonically() {
        for (reserve, size) in [
            (1, 300),
            (1, 20_000),
            (2, 5),
            (4, 5),
            (4, 3_000_000),
            (2, 200),
        ] {
            let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut out = vec![0xee];
            message_reserving(&mut out, 2, reserve, |m| m.extend_from_slice(&content));
            let mut expected = vec![0xee];
            key(&mut expected, 2, LEN);
            varint(&mut expected, size as u64);
            expected.extend_from_slice(&content);
            assert!(out == expected, "reserve {reserve}, size {size}");
        }
    }

    #[test]
    fn request_lengths_are_exact() {
        for (spans, scope_url) in [
            (10usize, ""),
            (200_000, ""),
            (3_000_000, ""),
            (10, "https://example.com/scope"),
            (200_000, "https://example.com/scope"),
        ] {
            let framed: Vec<u8> = vec![0x12; spans];
            let attrs = [("service.name", AnyValue::Str("pgwarden"))];
            let resource_url = "https://opentelemetry.io/schemas/1.26.0";
            let scope = Scope {
                name: "pgwarden.audit",
                version: "1",
                schema_url: scope_url,
            };
            let mut out = Vec::new();
            encode_resource_framed_spans(&mut out, &attrs, resource_url, &scope, &framed);
            assert_eq!(out[0], 0x0a); // ResourceSpans, length-delimited
            let (len, n) = read_varint(&out[1..]);
            assert_eq!(len as usize, out.len() - 1 - n);
            // Resource (field 1), then ScopeSpans (field 2) holding scope and spans.
            let body = &out[1 + n..];
            assert_eq!(body[0], 0x0a);
            let (resource, m) = read_varint(&body[1..]);
            let rest = &body[1 + m + resource as usize..];
            assert_eq!(rest[0], 0x12);
            let (scope_spans, k) = read_varint(&rest[1..]);
            let scope_spans = &rest[1 + k..1 + k + scope_spans as usize];
            // The spans, then the scope's schema URL (field 3) when there is one.
            let mut scope_tail = Vec::new();
            bytes_field(&mut scope_tail, 3, scope_url.as_bytes());
            let (before_tail, tail_of_scope) =
                scope_spans.split_at(scope_spans.len() - scope_tail.len());
            assert_eq!(tail_of_scope, &scope_tail[..]);
            assert!(before_tail.ends_with(&framed));
            // What follows ScopeSpans is the resource's schema URL (field 3), to the end.
            let tail = &rest[1 + k + scope_spans.len()..];
            assert_eq!(tail[0], 0x1a);
            assert!(tail.ends_with(b"schemas/1.26.0"));
            // The same request from its parts, the spans copied last.
            let (head, tail) = resource_framing(&attrs, resource_url, &scope, framed.len());
            assert_eq!([&head[..], &framed, &tail].concat(), out);
        }
    }

    #[test]
    fn negative_int_is_ten_byte_varint() {
        let mut b = Vec::new();
        any_value(&mut b, &AnyValue::Int(-1));
        assert_eq!(b.len(), 1 + 10);
    }

    #[test]
    fn a_span_is_framed() {
        let s = SpanData {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some(([3; 8], false)),
            name: "SELECT t",
            kind: 3,
            start_unix_nano: 10,
            end_unix_nano: 20,
            attributes: vec![("db.system.name", AnyValue::Str("postgresql"))],
            status_code: 2,
            status_message: "boom",
            ..SpanData::default()
        };
        let mut out = Vec::new();
        encode_resource_spans(
            &mut out,
            &[("service.name", AnyValue::Str("pgwarden"))],
            "",
            &Scope {
                name: "pgwarden.audit",
                ..Scope::default()
            },
            &[s],
        );
        // field 1, length-delimited, then the whole rest of the buffer
        assert_eq!(out[0], 0x0a);
        let needle = b"postgresql";
        assert!(out.windows(needle.len()).any(|w| w == needle));
    }
}

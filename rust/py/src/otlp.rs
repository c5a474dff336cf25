//! `encode_trace_request` for Python: SDK `ReadableSpan` objects to OTLP protobuf bytes.

use pgwarden_wire::otlp::{encode_resource_spans, AnyValue, Scope, SpanData};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

/// Values are borrowed from Python objects kept alive in `keep` for the call.
fn any_value<'a>(value: &'a Bound<'_, PyAny>) -> PyResult<AnyValue<'a>> {
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(AnyValue::Bool(b.is_true()));
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(AnyValue::Str(s.to_str()?));
    }
    if value.is_instance_of::<PyInt>() {
        return Ok(AnyValue::Int(value.extract::<i64>()?));
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        return Ok(AnyValue::Double(f.value()));
    }
    if let Ok(b) = value.cast::<PyBytes>() {
        return Ok(AnyValue::Bytes(b.as_bytes()));
    }
    Err(PyValueError::new_err(
        "attribute value of an unsupported type",
    ))
}

/// An attribute as Python holds it: key, value, and the elements of a sequence value.
type HeldAttribute<'py> = (
    Bound<'py, PyString>,
    Bound<'py, PyAny>,
    Vec<Bound<'py, PyAny>>,
);

/// Owned Python objects a span's borrowed data points into.
struct Held<'py> {
    name: Bound<'py, PyString>,
    trace_state: Option<Bound<'py, PyString>>,
    attrs: Vec<HeldAttribute<'py>>,
    status_message: Option<Bound<'py, PyString>>,
    fixed: SpanData<'static>,
}

fn id_bytes<const N: usize>(value: &Bound<'_, PyAny>) -> PyResult<[u8; N]> {
    let n: u128 = value.extract()?;
    let full = n.to_be_bytes();
    let mut out = [0u8; N];
    out.copy_from_slice(&full[16 - N..]);
    Ok(out)
}

fn hold<'py>(span: &Bound<'py, PyAny>) -> PyResult<Held<'py>> {
    if span.getattr("events")?.len()? > 0 || span.getattr("links")?.len()? > 0 {
        return Err(PyValueError::new_err(
            "spans with events or links are not encoded here",
        ));
    }
    let context = span.getattr("context")?;
    let mut fixed = SpanData {
        trace_id: id_bytes::<16>(&context.getattr("trace_id")?)?,
        span_id: id_bytes::<8>(&context.getattr("span_id")?)?,
        ..SpanData::default()
    };
    let trace_state = context.getattr("trace_state")?;
    let trace_state = if trace_state.len()? > 0 {
        Some(
            trace_state
                .call_method0("to_header")?
                .cast_into::<PyString>()?,
        )
    } else {
        None
    };
    let parent = span.getattr("parent")?;
    if !parent.is_none() {
        fixed.parent = Some((
            id_bytes::<8>(&parent.getattr("span_id")?)?,
            parent.getattr("is_remote")?.is_truthy()?,
        ));
    }
    // SDK SpanKind values start at 0 (INTERNAL); OTLP's at 1.
    fixed.kind = span.getattr("kind")?.getattr("value")?.extract::<i32>()? + 1;
    let start = span.getattr("start_time")?;
    fixed.start_unix_nano = if start.is_none() { 0 } else { start.extract()? };
    let end = span.getattr("end_time")?;
    fixed.end_unix_nano = if end.is_none() { 0 } else { end.extract()? };
    fixed.dropped_attributes = span.getattr("dropped_attributes")?.extract()?;
    let status = span.getattr("status")?;
    fixed.status_code = status.getattr("status_code")?.getattr("value")?.extract()?;
    let description = status.getattr("description")?;
    let status_message = if description.is_none() {
        None
    } else {
        Some(description.cast_into::<PyString>()?)
    };
    let mut attrs = Vec::new();
    let attributes = span.getattr("attributes")?;
    if !attributes.is_none() {
        let items = attributes.call_method0("items")?;
        for item in items.try_iter()? {
            let item = item?;
            let pair = item.cast::<PyTuple>()?;
            let k = pair.get_item(0)?.cast_into::<PyString>()?;
            let v = pair.get_item(1)?;
            let elems = if v.is_instance_of::<PyTuple>() || v.is_instance_of::<PyList>() {
                v.try_iter()?.collect::<PyResult<Vec<_>>>()?
            } else {
                Vec::new()
            };
            attrs.push((k, v, elems));
        }
    }
    Ok(Held {
        name: span.getattr("name")?.cast_into::<PyString>()?,
        trace_state,
        attrs,
        status_message,
        fixed,
    })
}

fn attribute_pairs<'a>(items: &'a [HeldAttribute<'_>]) -> PyResult<Vec<(&'a str, AnyValue<'a>)>> {
    let mut out = Vec::with_capacity(items.len());
    for (k, v, elems) in items {
        let value = if v.is_instance_of::<PyTuple>() || v.is_instance_of::<PyList>() {
            AnyValue::Array(elems.iter().map(any_value).collect::<PyResult<_>>()?)
        } else {
            any_value(v)?
        };
        out.push((k.to_str()?, value));
    }
    Ok(out)
}

/// `ExportTraceServiceRequest` bytes for `spans` under one resource and one scope.
///
/// Raises ValueError for what this encoder does not cover (span events or links, exotic
/// attribute values): the caller then uses the SDK's own encoder.
#[pyfunction]
#[pyo3(signature = (resource_attributes, resource_schema_url, scope_name, scope_version, scope_schema_url, spans))]
pub fn encode_trace_request<'py>(
    py: Python<'py>,
    resource_attributes: &Bound<'py, PyDict>,
    resource_schema_url: Option<&str>,
    scope_name: &str,
    scope_version: Option<&str>,
    scope_schema_url: Option<&str>,
    spans: &Bound<'py, PyList>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut resource_items = Vec::new();
    for (k, v) in resource_attributes.iter() {
        let elems = if v.is_instance_of::<PyTuple>() || v.is_instance_of::<PyList>() {
            v.try_iter()?.collect::<PyResult<Vec<_>>>()?
        } else {
            Vec::new()
        };
        resource_items.push((k.cast_into::<PyString>()?, v, elems));
    }
    let resource = attribute_pairs(&resource_items)?;
    let held = spans
        .iter()
        .map(|s| hold(&s))
        .collect::<PyResult<Vec<_>>>()?;
    let mut data = Vec::with_capacity(held.len());
    for h in &held {
        data.push(SpanData {
            name: h.name.to_str()?,
            trace_state: match &h.trace_state {
                Some(t) => t.to_str()?,
                None => "",
            },
            status_message: match &h.status_message {
                Some(m) => m.to_str()?,
                None => "",
            },
            attributes: attribute_pairs(&h.attrs)?,
            ..h.fixed.clone()
        });
    }
    let mut out = Vec::with_capacity(256 * data.len() + 256);
    encode_resource_spans(
        &mut out,
        &resource,
        resource_schema_url.unwrap_or(""),
        &Scope {
            name: scope_name,
            version: scope_version.unwrap_or(""),
            schema_url: scope_schema_url.unwrap_or(""),
        },
        &data,
    );
    Ok(PyBytes::new(py, &out))
}

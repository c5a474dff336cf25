"""Encoded OTLP trace requests as readable JSON, one span per line (the console exporter).

The keys follow the OpenTelemetry SDK's ``ReadableSpan.to_json``: name, context
(trace_id, span_id), kind, parent_id, start_time, end_time, status, attributes, resource.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in items:
        out[kv.key] = _value(kv.value)
    return out


def _time(unix_nano: int) -> str:
    return datetime.fromtimestamp(unix_nano / 1e9, tz=UTC).isoformat().replace("+00:00", "Z")


def format_request(request: bytes) -> str:
    """One JSON line per span of an encoded ``ExportTraceServiceRequest``."""
    decoded = ExportTraceServiceRequest.FromString(request)
    lines = []
    for rs in decoded.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                status: dict[str, Any] = {"status_code": _STATUS.get(span.status.code, "UNSET")}
                if span.status.message:
                    status["description"] = span.status.message
                lines.append(
                    json.dumps(
                        {
                            "name": span.name,
                            "context": {
                                "trace_id": "0x" + span.trace_id.hex(),
                                "span_id": "0x" + span.span_id.hex(),
                            },
                            "kind": "SpanKind." + _KINDS.get(span.kind, "UNSPECIFIED"),
                            "parent_id": ("0x" + span.parent_span_id.hex())
                            if span.parent_span_id
                            else None,
                            "start_time": _time(span.start_time_unix_nano),
                            "end_time": _time(span.end_time_unix_nano),
                            "status": status,
                            "attributes": _attributes(span.attributes),
                            "scope": {"name": ss.scope.name, "version": ss.scope.version},
                            "resource": {"attributes": resource},
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    return "".join(lines)

"""``pgwarden audit resend``: send again the requests a backend partly refused.

When a backend accepts an export request but refuses some of its spans or log records (an
OTLP partial success), the shipper keeps the request as it was sent under
``<directory>/rejected/`` (``*.traces.binpb``, ``*.logs.binpb``).  Once the cause is
fixed (a retention window, a size limit, a quota), this sends each file through the
configured exporter (its endpoint, TLS, headers and compression) and removes it when the
backend accepts all of it.  The spans keep their ids, so a backend drops those it already
has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pgwarden.audit.exporters import EncodedExporter, TelemetrySink, build_sink
from pgwarden.audit.spool import REJECTED_LOGS_SUFFIX as LOGS_SUFFIX
from pgwarden.audit.spool import REJECTED_TRACES_SUFFIX as TRACES_SUFFIX
from pgwarden.config import AuditSettings


@dataclass(frozen=True)
class Resent:
    path: Path
    #: "delivered", "refused" (partly, again) or "failed" (not accepted).
    outcome: str
    detail: str = ""


class CannotResend(ValueError):
    """The settings have no OTLP exporter, or a file is not a kept request."""


def otlp_exporters(audit: AuditSettings) -> tuple[EncodedExporter, EncodedExporter]:
    """The configured OTLP span and log exporters (the log one whatever recording_logs)."""
    if audit.exporter not in ("otlp_http", "otlp_grpc"):
        raise CannotResend(
            f"audit.exporter is {audit.exporter!r}: resend needs otlp_http or otlp_grpc"
        )
    sink = build_sink(audit.model_copy(update={"recording_logs": True}))
    assert isinstance(sink, TelemetrySink) and sink.logs is not None
    return sink.spans, sink.logs


def resend(files: list[Path], spans: EncodedExporter, logs: EncodedExporter) -> list[Resent]:
    """Send each kept request; remove the file once the backend accepted all of it."""
    results = []
    for path in files:
        if path.name.endswith(TRACES_SUFFIX):
            exporter = spans
        elif path.name.endswith(LOGS_SUFFIX):
            exporter = logs
        else:
            raise CannotResend(f"{path}: not a kept request (*{TRACES_SUFFIX} or *{LOGS_SUFFIX})")
        answer = exporter.export_encoded(path.read_bytes())
        if answer is None:
            results.append(Resent(path, "failed", "the backend did not accept the request"))
        elif answer.rejected:
            results.append(
                Resent(path, "refused", f"{answer.rejected} refused again: {answer.message}")
            )
        else:
            path.unlink()
            results.append(Resent(path, "delivered", answer.message))
    return results

"""One JSON line per accepted, refused and ended connection: who, from where, why, which issuer.

Written to the statement log when one is configured (same sink, distinguished by
``"event"``), otherwise to the gateway log (logger ``pgwarden.connections``, level INFO).
A line never contains a token, a password or key material: only the caller's claims that
identify it (issuer, subject, name, email, groups) and the gateway's decision.

Fields (absent when unknown): ``ts``, ``event`` (``connection.accepted``,
``connection.refused``, ``connection.ended``), ``session``, ``client_addr``, ``tls``,
``user`` and ``database`` (from the startup packet), ``issuer``, ``subject``, ``name``,
``email``, ``groups``, ``role``, ``rule``, ``grant``, ``expires_at``, ``withheld_params``,
``reason`` (a stable code), ``sqlstate``, ``message`` (what the client was told).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from pgwarden.statement_log import StatementLog

log = logging.getLogger("pgwarden.connections")

ACCEPTED = "connection.accepted"
REFUSED = "connection.refused"
ENDED = "connection.ended"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ConnectionEvents:
    """Writes connection events to the statement log or the gateway log."""

    def __init__(self, statement_log: StatementLog | None) -> None:
        self._statement_log = statement_log

    def emit(self, event: str, **fields: Any) -> None:
        record: dict[str, Any] = {"ts": _now(), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None and v != ())
        line = json.dumps(record, separators=(",", ":"), default=str)
        if self._statement_log is not None:
            self._statement_log.append((line + "\n").encode())
        else:
            log.info("%s", line)

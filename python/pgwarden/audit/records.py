"""The audit record types and the fields each carries.

Every record has ``seq`` (its position in its stream), ``stream`` (the writer process's
stream id), ``ts`` (microseconds since the Unix epoch, UTC), ``type`` and ``hash`` (see
:mod:`pgwarden.audit.chain`).  The codec writes ``stmt`` and ``end`` itself; the gateway's
Python side writes the session records through :func:`members`.

==============  =====================================================================
type            fields
==============  =====================================================================
open            prev, segment_bytes, pid, host, version, worker, listen
segment         prev (hash of the record before, in the previous segment)
segment_end     next (file name of the next segment)
close           (none: the stream ended cleanly)
session         session, client_address, user (name, id, roles, issuer, email),
                database, upstream_user, server_address, server_port, tls,
                application_name
session_end     session, reason, sqlstate, message
refused         session, client_address, user, database, sqlstate, message, stage
stmt            session, n, protocol (simple | extended | function_call), sql,
                params (opt-in), function_oid
decision        session, n, decision, rule, policy_version, masked_columns
end             session, n, duration_us, command_tag, rows, sqlstate, error,
                result (base64 of the server messages as forwarded), result_omitted
==============  =====================================================================

``stmt`` is stored before the statement is forwarded; ``end`` pairs with it by
``(session, n)``.  ``decision`` is reserved for the statement policy (allow/deny, the rule
and the policy version, the columns masked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

OPEN: Final = "open"
SEGMENT: Final = "segment"
SEGMENT_END: Final = "segment_end"
CLOSE: Final = "close"
SESSION: Final = "session"
SESSION_END: Final = "session_end"
REFUSED: Final = "refused"
STMT: Final = "stmt"
DECISION: Final = "decision"
END: Final = "end"

#: Types that carry no audit content of their own (stream structure).
STRUCTURE: Final = frozenset({OPEN, SEGMENT, SEGMENT_END, CLOSE})

Record = dict[str, Any]


def members(fields: Mapping[str, Any]) -> str:
    """JSON object members without braces, for ``AuditSpool.append``; None values dropped."""
    return ",".join(
        f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'), ensure_ascii=False)}"
        for k, v in fields.items()
        if v is not None
    )


def statement_key(session: str, n: int) -> str:
    """How a statement is named across records (and in a shipper checkpoint)."""
    return f"{session}/{n}"

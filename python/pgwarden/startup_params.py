"""Which client StartupMessage parameters reach the upstream server.

Startup parameters are attack surface (``options=-c ...``, ``role``, ``replication``): every
decision about them is made here, in :func:`upstream_startup_params`, so a policy can later
replace the table below without touching the session code.  ``user`` and ``database`` are
never passed through: the gateway logs in with its own credential.  ``_pq_.*`` protocol options
are answered by the gateway itself (NegotiateProtocolVersion) and never forwarded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from pgwarden import errors
from pgwarden.errors import GatewayError

log = logging.getLogger(__name__)

# Lower-case names: PostgreSQL matches GUC names case-insensitively ("DateStyle").
PASSED_THROUGH: Final[frozenset[str]] = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "timezone",
        "intervalstyle",
        "extra_float_digits",
        "search_path",
        "options",
        "lc_messages",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "bytea_output",
        "standard_conforming_strings",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "geqo",
        "jit",
    }
)
# Parameters that change who the session is or what protocol it speaks.
REFUSED: Final[dict[str, str]] = {
    "replication": "replication connections are not supported through pgwarden",
}
# The gateway reads statement text as UTF-8 (to log, and later to parse and decide), so a
# client must speak UTF8; SQL_ASCII (what libpq picks in the C locale) passes bytes unchanged
# and works as long as they are UTF-8.  (A later switch is caught per statement: the codec
# refuses text that is not UTF-8 with ERROR 22021.)  Names as PostgreSQL normalises them.
_READABLE_ENCODINGS: Final[frozenset[str]] = frozenset({"utf8", "unicode", "sqlascii"})
# Parameters consumed by the gateway itself.
GATEWAY_OWN: Final[frozenset[str]] = frozenset({"user", "database"})


@dataclass(frozen=True, slots=True)
class ParameterDecision:
    """Result of sorting the client's startup parameters."""

    forwarded: list[tuple[str, str]]
    dropped: list[str]


def upstream_startup_params(params: Iterable[tuple[str, str]]) -> ParameterDecision:
    """Sort client startup parameters; raise :class:`GatewayError` for a refused one."""
    forwarded: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, value in params:
        key = name.lower()
        if key in GATEWAY_OWN or key.startswith("_pq_."):
            continue
        if key in REFUSED:
            if key == "replication" and value.lower() in ("false", "off", "no", "0"):
                continue
            raise GatewayError(errors.FEATURE_NOT_SUPPORTED, REFUSED[key])
        if key == "client_encoding" and _normalised_encoding(value) not in _READABLE_ENCODINGS:
            raise GatewayError(
                errors.FEATURE_NOT_SUPPORTED,
                f'client_encoding "{value}" is not supported through pgwarden',
                hint="Connect with client_encoding UTF8 (for libpq: PGCLIENTENCODING=UTF8).",
            )
        if key in PASSED_THROUGH:
            forwarded.append((name, value))
        else:
            dropped.append(name)
    if dropped:
        log.debug("startup parameters not forwarded: %s", ", ".join(dropped))
    return ParameterDecision(forwarded=forwarded, dropped=dropped)


def _normalised_encoding(name: str) -> str:
    """PostgreSQL's encoding-name folding: lower case, punctuation dropped ("UTF-8" -> "utf8")."""
    return "".join(c for c in name.lower() if c.isalnum())

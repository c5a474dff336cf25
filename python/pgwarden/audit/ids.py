"""Deterministic trace and span ids, derived from the records themselves.

A retry after a lost acknowledgement, or a replay of the spool after a crash, builds the
same spans with the same ids, so a backend can drop the duplicates.  A session is one
trace; its span and its statements' spans are derived from the session id (random, 64
bits, chosen by the gateway at accept) and the statement's number in the session.
"""

from __future__ import annotations

import functools
import hashlib


def _derive(*parts: str, size: int) -> int:
    digest = hashlib.sha256("\0".join(("pgwarden", *parts)).encode()).digest()
    value = int.from_bytes(digest[:size], "big")
    return value or 1  # all-zero ids are invalid in OpenTelemetry


@functools.lru_cache(maxsize=65536)
def trace_id(session: str) -> int:
    """The 128-bit trace id of a session."""
    return _derive("trace", session, size=16)


@functools.lru_cache(maxsize=65536)
def session_span_id(session: str) -> int:
    """The 64-bit span id of a session's span (the statements' parent)."""
    return _derive("span", session, "session", size=8)


def statement_span_id(session: str, n: int) -> int:
    """The 64-bit span id of statement ``n`` of a session."""
    return _derive("span", session, "statement", str(n), size=8)

"""Refusing a statement in the stream: the message is replaced, in place, by one that the
server itself fails with the gateway's error.

The codec has already counted the client's message as sent (its statement tracker matches
every server response in order, for the audit records, the statement log and the drain), so
the gateway does not cut the message out and answer on its own: that would break the order
of responses behind pipelined statements.  The replacement is a ``DO`` block raising the
error; the server answers exactly as for any failed statement (ErrorResponse, the
transaction marked failed, everything up to the next Sync skipped, ReadyForQuery), and the
statement's record keeps the text the client sent, with the error.

For the extended protocol the replaced Parse succeeds and the error comes at Execute.  The
replacement declares as many parameters as the client's statement uses, so that the
client's Bind still fits: the types the client declared are kept, the others are ``void``,
whose input takes any text (a binary value for an undeclared parameter is refused by the
server with 22P03 instead, and the statement does not run either way).
"""

from __future__ import annotations

import functools
import struct
from typing import Final

from pgwarden import _wire
from pgwarden.policy.analysis import analyse

VOID_OID: Final = 2278
_DO_TAG: Final = "$pgwarden_refusal$"


def _literal(text: str) -> str:
    """``text`` as an escape string constant (the same whatever
    ``standard_conforming_strings`` says)."""
    if "$" in text:
        raise ValueError("refusal texts must not contain '$'")
    return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@functools.lru_cache(maxsize=256)
def raise_sql(sqlstate: str, message: str, hint: str | None = None) -> bytes:
    """A DO block that raises ``message`` as ``sqlstate`` (with ``hint``)."""
    if len(sqlstate) != 5 or not sqlstate.isalnum():
        raise ValueError(f"not a SQLSTATE: {sqlstate!r}")
    using = f"ERRCODE = '{sqlstate}', MESSAGE = {_literal(message)}"
    if hint:
        using += f", HINT = {_literal(hint)}"
    return f"DO {_DO_TAG}BEGIN RAISE EXCEPTION USING {using}; END{_DO_TAG}".encode()


def replace_query(refusal: bytes) -> bytes:
    """A Query message running ``refusal`` (from :func:`raise_sql`)."""
    return _wire.encode_message(ord("Q"), refusal + b"\0")


def replace_parse(message: bytes, sql: str, refusal: bytes) -> bytes:
    """The client's Parse ``message`` (whole, header included) for ``sql``, with
    ``refusal`` as its SQL: same statement name, as many parameters as ``sql`` uses."""
    body = message[5:]
    name_end = body.index(0)
    sql_end = body.index(0, name_end + 1)
    (declared,) = struct.unpack_from("!h", body, sql_end + 1)
    types = list(struct.unpack_from(f"!{declared}I", body, sql_end + 3)) if declared > 0 else []
    wanted = max(len(types), analyse(sql).parameters)
    types = [t or VOID_OID for t in types] + [VOID_OID] * (wanted - len(types))
    new_body = (
        body[: name_end + 1] + refusal + b"\0" + struct.pack(f"!h{len(types)}I", len(types), *types)
    )
    return _wire.encode_message(ord("P"), new_body)

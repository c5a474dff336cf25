"""The client event hook that refuses statements: each Query and Parse goes through a list
of checks (the identity's role-change guard, the statement policy), and the first refusal
replaces the message in the stream (:mod:`pgwarden.refusal`).  A fast-path FunctionCall has
no SQL to replace: a refused one ends the session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from pgwarden import _wire, refusal

if TYPE_CHECKING:
    from pgwarden._wire import ClientEvent
    from pgwarden.session import Session

log = logging.getLogger(__name__)

EV_QUERY: Final = _wire.EV_QUERY
EV_PARSE: Final = _wire.EV_PARSE
EV_EXECUTE: Final = _wire.EV_EXECUTE
EV_FUNCTION_CALL: Final = _wire.EV_FUNCTION_CALL
_STATEMENT_KINDS: Final = frozenset({EV_QUERY, EV_PARSE})
#: Refused statement texts remembered (by hash) for their Executes: a prepared statement
#: refused at Parse is executed later, and each execution gets its decision record.  A
#: hash that collides only costs a check.
_REFUSED_TEXTS: Final = 4096


class Refusal(NamedTuple):
    """Why a statement is refused: the error the client gets, what the log says, and what
    the audit's ``decision`` record names."""

    sqlstate: str
    message: str
    hint: str | None
    label: str  # for the log: "SET ROLE", 'policy rule "x" (write)', ...
    rule: str | None = None  # the rule that refused it
    policy_version: str | None = None


StatementCheck = Callable[["Session", str], "Refusal | None"]
FunctionCheck = Callable[["Session", int], "Refusal | None"]


class StatementGate:
    """Replaces refused Query / Parse messages; ends a session on a refused FunctionCall."""

    def __init__(
        self,
        statement_checks: Sequence[StatementCheck],
        function_checks: Sequence[FunctionCheck] = (),
    ) -> None:
        self.statement_checks = tuple(statement_checks)
        self.function_checks = tuple(function_checks)
        self.refused = 0
        self._refused_texts: dict[int, None] = {}

    def _check(self, session: Session, sql: str) -> Refusal | None:
        for check in self.statement_checks:
            found = check(session, sql)
            if found is not None:
                return found
        return None

    def _record(self, session: Session, n: object, found: Refusal) -> None:
        """The audit's ``decision`` record for statement ``n`` (0: not recorded)."""
        audit = session.gateway.audit
        if audit is not None and isinstance(n, int) and n > 0:
            audit.statement_refused(
                session.id, n, rule=found.rule, policy_version=found.policy_version
            )

    def on_client_events(self, session: Session, data: bytes, events: list[ClientEvent]) -> bytes:
        pieces: list[bytes] | None = None
        position = 0
        for event in events:
            kind = event[0]
            if kind in _STATEMENT_KINDS:
                sql = event[1] if kind == EV_QUERY else event[2]
                assert isinstance(sql, str)
                found = self._check(session, sql)
                if found is None:
                    continue
                start, end = event[-2], event[-1]
                assert isinstance(start, int) and isinstance(end, int)
                if pieces is None:
                    pieces = []
                pieces.append(data[position:start])
                raising = refusal.raise_sql(found.sqlstate, found.message, found.hint)
                if kind == EV_QUERY:
                    pieces.append(refusal.replace_query(raising))
                    self._record(session, event[2], found)
                else:
                    pieces.append(refusal.replace_parse(data[start:end], sql, raising))
                    if len(self._refused_texts) >= _REFUSED_TEXTS:
                        self._refused_texts.clear()
                    self._refused_texts[hash(sql)] = None
                position = end
                self.refused += 1
                log.info("session %s: refused %s", session.id, found.label)
            elif (
                kind == EV_EXECUTE and self._refused_texts and hash(event[2]) in self._refused_texts
            ):
                # An execution of a statement refused at its Parse: the server fails it.
                sql = event[2]
                assert isinstance(sql, str)
                found = self._check(session, sql)
                if found is not None:
                    self._record(session, event[3], found)
            elif kind == EV_FUNCTION_CALL:
                oid = event[1]
                assert isinstance(oid, int)
                for check in self.function_checks:
                    found = check(session, oid)
                    if found is not None:
                        log.warning(
                            "session %s: refused a fast-path call (%s): session ended",
                            session.id,
                            found.label,
                        )
                        self.refused += 1
                        session.terminate(found.sqlstate, found.message)
                        return b""
        if pieces is None:
            return data
        pieces.append(data[position:])
        return b"".join(pieces)

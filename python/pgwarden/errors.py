"""SQLSTATE codes the gateway itself raises, and the typed error that carries one to a client.

Inside the gateway an error that must reach the client is a :class:`GatewayError`; the session
turns it into an ErrorResponse (``pgwarden._wire.encode_error``) at one place.  Codes are the
ones PostgreSQL uses for the same situation (Appendix A, "PostgreSQL Error Codes"), so clients
and their retry logic behave as they would against a server.
"""

from __future__ import annotations

from typing import Final

from pgwarden import _wire

# Class 08 - Connection Exception
CONNECTION_FAILURE: Final = "08006"
PROTOCOL_VIOLATION: Final = "08P01"
# Class 0A - Feature Not Supported
FEATURE_NOT_SUPPORTED: Final = "0A000"
# Class 28 - Invalid Authorization Specification
INVALID_AUTHORIZATION_SPECIFICATION: Final = "28000"
INVALID_PASSWORD: Final = "28P01"
# Class 42 - Syntax Error or Access Rule Violation
SYNTAX_ERROR: Final = "42601"
INSUFFICIENT_PRIVILEGE: Final = "42501"
# Class 53: insufficient resources
TOO_MANY_CONNECTIONS: Final = "53300"
# Class 57 - Operator Intervention
ADMIN_SHUTDOWN: Final = "57P01"
# Class XX - Internal Error
INTERNAL_ERROR: Final = "XX000"

ADMIN_SHUTDOWN_MESSAGE: Final = "terminating connection due to administrator command"
SERVER_CLOSED_MESSAGE: Final = (
    "server closed the connection unexpectedly\n"
    "\tThis probably means the server terminated abnormally\n"
    "\tbefore or while processing the request."
)


class GatewayError(Exception):
    """An error the client must see as an ErrorResponse (FATAL unless said otherwise).

    ``wire`` may hold a ready-made ErrorResponse (for instance the upstream server's own,
    forwarded byte for byte so that every field survives); otherwise one is encoded from
    ``sqlstate`` and ``message``.
    """

    def __init__(
        self,
        sqlstate: str,
        message: str,
        *,
        severity: str = "FATAL",
        detail: str | None = None,
        hint: str | None = None,
        wire: bytes | None = None,
    ) -> None:
        super().__init__(f"{sqlstate}: {message}")
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint
        self.wire = wire

    def to_wire(self) -> bytes:
        """The ErrorResponse message to send."""
        if self.wire is not None:
            return self.wire
        return _wire.encode_error(
            self.severity, self.sqlstate, self.message, self.detail, self.hint
        )


class ConnectionClosed(Exception):
    """The peer (client or upstream server) closed the connection during the startup phase."""


def fatal(sqlstate: str, message: str, *, hint: str | None = None) -> bytes:
    """A FATAL ErrorResponse message."""
    return _wire.encode_error("FATAL", sqlstate, message, None, hint)

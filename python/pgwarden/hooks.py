"""Extension points on the relay path (statement policy, auditing, identity): their shapes only.

A :class:`ClientEventHook` registered on the gateway turns on per-statement client events in
the codec (``SessionCodec(client_events=True)``): then every chunk that completes a Query,
Parse, Execute, FunctionCall or Terminate message reaches the hook *before* it is forwarded.
Each event carries ``start``/``end`` offsets of its message in ``data``; the hook returns the
bytes to forward, so it may cut a refused statement out and answer the client itself through
``session.send_to_client()`` (an ErrorResponse, and ReadyForQuery at the matching Sync).
Without a hook the codec produces no client events and the hot path skips this entirely.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pgwarden._wire import ClientEvent  # a type alias: exists in the stub only
    from pgwarden.errors import GatewayError
    from pgwarden.session import Session


class ClientEventHook(Protocol):
    """Reviews client statements before they are forwarded upstream."""

    def on_client_events(self, session: Session, data: bytes, events: list[ClientEvent]) -> bytes:
        """Return the bytes to forward (``data`` itself to pass everything unchanged).

        Runs on the event loop inside ``data_received``: it must not block.  Raising an
        exception ends the session with FATAL XX000.
        """
        ...


class SessionObserver(Protocol):
    """Told how sessions go (identity: connection events, expiry timers).

    Called on the event loop; must not block.  ``session_started`` comes once the upstream
    login succeeded and the relay runs; ``session_ended`` follows it when the session is
    over.  ``session_refused`` comes instead when the connection was refused with an
    ErrorResponse before that point (startup, authentication -- the error's ``__cause__`` is
    then the :class:`~pgwarden.client_auth.AuthError` -- or the upstream login).
    """

    def session_started(self, session: Session) -> None: ...

    def session_refused(self, session: Session, error: GatewayError) -> None: ...

    def session_ended(self, session: Session) -> None: ...

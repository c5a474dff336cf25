"""Startup parameters that could change who the session is, or the policy applied to it.

``options`` can carry ``-c role=...`` or ``-c session_authorization=...``; ``role`` and
``session_authorization`` name another role outright; ``search_path`` decides which
objects unqualified names resolve to, so a policy written against qualified names may want
it fixed (``identity.protect_search_path``).  Depending on ``identity.startup_parameters``
the connection is refused (FATAL 42501, as PostgreSQL answers a parameter the role may not
set) or the parameters are stripped; either way the connection event records them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from pgwarden import errors
from pgwarden.config import IdentitySettings

ALWAYS_PROTECTED: Final = frozenset({"options", "role", "session_authorization"})


class StartupParameterRefused(Exception):
    """A protected startup parameter was sent while the policy is ``refuse``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reason = "startup_parameter"
        self.sqlstate = errors.INSUFFICIENT_PRIVILEGE
        self.message = (
            f'startup parameter "{name}" is not allowed through pgwarden: '
            "the role and session settings come from the gateway's policy"
        )
        super().__init__(self.message)


def protected_names(settings: IdentitySettings) -> frozenset[str]:
    if settings.protect_search_path:
        return ALWAYS_PROTECTED | {"search_path"}
    return ALWAYS_PROTECTED


def withheld_parameters(names: Iterable[str], settings: IdentitySettings) -> frozenset[str]:
    """Lower-case names of the protected parameters present; raise when they are refused."""
    protected = protected_names(settings)
    present = sorted({name.lower() for name in names} & protected)
    if present and settings.startup_parameters == "refuse":
        raise StartupParameterRefused(present[0])
    return frozenset(present)

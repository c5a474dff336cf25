"""The signals a gateway process handles: SIGTERM and SIGINT drain and stop, SIGHUP
reopens the statement log, SIGCHLD reports a worker or the shipper gone.

The worker supervisor waits for them with ``sigtimedwait`` and keeps them blocked in
every thread, and helper threads block them too: a process-directed signal the kernel
hands to a thread that does not block it takes its default action there, which for
SIGTERM and SIGHUP ends the gateway without a drain.
"""

from __future__ import annotations

import signal
from typing import Final

GATEWAY_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})

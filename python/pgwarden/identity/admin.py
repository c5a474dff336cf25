"""The local admin interface: a unix socket per gateway worker that ``pgwarden grants`` uses.

``<admin_dir>/admin-<worker>.sock`` (directory mode 0700, socket 0600: only the gateway's own
user can connect).  One request per connection, one JSON object per line each way:

* ``{"op": "reload"}``: re-read the grants file now and end the sessions whose grant is gone;
  answers ``{"ok": true, "grants": N, "sessions_ended": K}``;
* ``{"op": "sessions"}``: the live token-authenticated sessions of this worker.

The grants file stays the single source of truth (every worker and a restarted gateway read
it); the socket only makes a change take effect at once and reports what it ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES: Final = 4096
CLIENT_TIMEOUT_SECONDS: Final = 5.0

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def socket_path(admin_dir: Path, worker_index: int) -> Path:
    return admin_dir / f"admin-{worker_index}.sock"


def _remove_stale(path: Path) -> None:
    """Remove a socket file nobody listens on (left by a gateway that died)."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
    else:
        raise OSError(f"{path} is in use by another gateway")
    finally:
        probe.close()


class AdminServer:
    """Serves admin requests on one unix socket."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(_remove_stale, self.path)
        old_umask = os.umask(0o177)
        try:
            listener = await anyio.create_unix_listener(self.path)
        finally:
            os.umask(old_umask)
        log.info("admin socket %s", self.path)
        task_status.started()
        try:
            async with listener:
                await listener.serve(self._serve_one)
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _serve_one(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                with anyio.fail_after(CLIENT_TIMEOUT_SECONDS):
                    raw = b""
                    while b"\n" not in raw and len(raw) < MAX_REQUEST_BYTES:
                        raw += await stream.receive(MAX_REQUEST_BYTES)
                    request = json.loads(raw.split(b"\n", 1)[0])
                    if not isinstance(request, dict):
                        raise ValueError("request is not a JSON object")
                    answer = await self._handler(request)
                    await stream.send(json.dumps(answer).encode() + b"\n")
            except (TimeoutError, ValueError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                log.info("admin socket: bad request: %s", exc)


def ask(path: Path, request: dict[str, Any], *, timeout: float = CLIENT_TIMEOUT_SECONDS) -> Any:
    """Send one request to a gateway's admin socket and return its answer (blocking)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(str(path))
        conn.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def ask_all(admin_dir: Path, request: dict[str, Any]) -> list[tuple[Path, Any]]:
    """Ask every gateway worker listening in ``admin_dir``; an error is reported per socket."""
    answers: list[tuple[Path, Any]] = []
    for path in sorted(admin_dir.glob("admin-*.sock")):
        try:
            answers.append((path, ask(path, request)))
        except (OSError, ValueError) as exc:
            answers.append((path, {"ok": False, "error": str(exc)}))
    return answers

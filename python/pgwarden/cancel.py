"""CancelRequest routing: gateway cancel keys → the upstream backend that runs the query.

Every session gives its client the gateway's own BackendKeyData.  The process id encodes the
worker that owns the session in its high bits (``pid >> WORKER_SHIFT``), because with
``workers > 1`` the kernel hands the CancelRequest's new connection to any worker.  A worker
that receives a request for another worker's session forwards the packet over that worker's
unix socket (``<runtime_dir>/cancel-<index>.sock``); the owner checks the secret key in
constant time and sends a CancelRequest on a fresh upstream connection.  Nothing is ever
answered to the canceller, as in PostgreSQL.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio
import anyio.abc

from pgwarden import _wire, upstream
from pgwarden.config import UpstreamSettings

log = logging.getLogger(__name__)

WORKER_SHIFT: Final = 22
_COUNTER_MASK: Final = (1 << WORKER_SHIFT) - 1
CANCEL_TIMEOUT_SECONDS: Final = 10.0
# CancelRequest: length, code, pid, and a key of at most 256 bytes (protocol 3.2).
_MAX_CANCEL_PACKET: Final = 12 + 256


@dataclass(frozen=True, slots=True)
class UpstreamBackend:
    """Where a session's upstream backend runs and its cancel key."""

    settings: UpstreamSettings
    process_id: int
    secret_key: bytes


@dataclass(frozen=True, slots=True)
class _Entry:
    secret_key: bytes
    backend: UpstreamBackend


def owner_of(process_id: int) -> int:
    """Index of the worker that handed out ``process_id``."""
    return process_id >> WORKER_SHIFT


class CancelRegistry:
    """This worker's live cancel keys."""

    def __init__(self, worker_index: int, forwarder: CancelForwarder | None = None) -> None:
        if not 0 <= worker_index < (1 << (31 - WORKER_SHIFT)):
            raise ValueError(f"worker index {worker_index} does not fit a process id")
        self.worker_index = worker_index
        self._forwarder = forwarder
        self._entries: dict[int, _Entry] = {}
        self._counter = secrets.randbelow(_COUNTER_MASK)

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, backend: UpstreamBackend, key_length: int) -> tuple[int, bytes]:
        """Allocate a gateway (process id, secret key) for a session's upstream backend."""
        if len(self._entries) >= _COUNTER_MASK:
            raise RuntimeError("cancel key space exhausted")
        while True:
            self._counter = (self._counter + 1) & _COUNTER_MASK
            process_id = (self.worker_index << WORKER_SHIFT) | self._counter
            if self._counter != 0 and process_id not in self._entries:
                break
        secret_key = secrets.token_bytes(key_length)
        self._entries[process_id] = _Entry(secret_key, backend)
        return process_id, secret_key

    def unregister(self, process_id: int) -> None:
        self._entries.pop(process_id, None)

    async def cancel(self, process_id: int, secret_key: bytes) -> None:
        """Handle a client's CancelRequest, wherever its session lives."""
        owner = owner_of(process_id)
        if owner != self.worker_index:
            if self._forwarder is None:
                log.debug("CancelRequest for unknown process id %d ignored", process_id)
                return
            await self._forwarder.forward(owner, process_id, secret_key)
            return
        await self.cancel_local(process_id, secret_key)

    async def cancel_local(self, process_id: int, secret_key: bytes) -> None:
        entry = self._entries.get(process_id)
        # Compare against something even for unknown ids: no timing oracle on the key.
        expected = entry.secret_key if entry is not None else b"\0" * len(secret_key)
        if not hmac.compare_digest(expected, secret_key) or entry is None:
            log.debug("CancelRequest with a wrong key for process id %d ignored", process_id)
            return
        backend = entry.backend
        try:
            await upstream.send_cancel(
                backend.settings,
                backend.process_id,
                backend.secret_key,
                time_limit=CANCEL_TIMEOUT_SECONDS,
            )
            log.debug("CancelRequest for process id %d sent upstream", process_id)
        except Exception as exc:  # a failed cancel must not disturb anything else
            log.warning("forwarding CancelRequest upstream failed: %s", exc)


def default_runtime_dir(port: int) -> Path:
    return Path("/tmp") / f"pgwarden-{os.getuid()}-{port}"


class CancelForwarder:
    """Per-worker unix sockets that carry CancelRequests to the worker owning the session."""

    def __init__(self, runtime_dir: Path, worker_index: int) -> None:
        self.runtime_dir = runtime_dir
        self.worker_index = worker_index

    def socket_path(self, worker_index: int) -> Path:
        return self.runtime_dir / f"cancel-{worker_index}.sock"

    async def forward(self, owner: int, process_id: int, secret_key: bytes) -> None:
        path = self.socket_path(owner)
        try:
            with anyio.fail_after(CANCEL_TIMEOUT_SECONDS):
                async with await anyio.connect_unix(path) as conn:
                    await conn.send(_wire.encode_cancel_request(process_id, secret_key))
            log.debug("CancelRequest for process id %d forwarded to worker %d", process_id, owner)
        except (OSError, TimeoutError) as exc:
            log.debug("no worker %d to forward a CancelRequest to: %s", owner, exc)

    async def serve(
        self,
        registry: CancelRegistry,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept forwarded CancelRequests for this worker until cancelled."""
        path = self.socket_path(self.worker_index)
        path.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(path, mode=0o600)

        async def handle(conn: anyio.abc.SocketStream) -> None:
            async with conn:
                try:
                    with anyio.fail_after(CANCEL_TIMEOUT_SECONDS):
                        data = b""
                        while True:
                            chunk = await conn.receive(_MAX_CANCEL_PACKET)
                            data += chunk
                            decoded = _wire.read_startup(data, _MAX_CANCEL_PACKET)
                            if decoded is not None:
                                break
                except (anyio.EndOfStream, TimeoutError, _wire.WireError, OSError):
                    return
                packet, _ = decoded
                if packet.kind == "cancel":
                    await registry.cancel_local(packet.process_id, packet.secret_key)

        try:
            async with listener:
                task_status.started()
                await listener.serve(handle)
        finally:
            path.unlink(missing_ok=True)


def ensure_runtime_dir(path: Path) -> None:
    """Create the runtime directory, private to this user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"runtime directory {path} is owned by another user")
    path.chmod(0o700)


__all__ = [
    "CancelForwarder",
    "CancelRegistry",
    "UpstreamBackend",
    "default_runtime_dir",
    "ensure_runtime_dir",
    "owner_of",
]

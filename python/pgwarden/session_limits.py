"""How many sessions the gateway holds open, in all and per identity, across its workers.

``max_client_connections`` bounds the sessions of the whole gateway, and
``max_connections_per_identity`` (or the ``max_connections`` of the identity mapping rule
a caller matched, the lower of the two) those of one caller, known by its token's issuer
and subject: an agent that opens connections in a loop gets ``FATAL 53300`` from the
gateway instead of taking every backend PostgreSQL has (``max_connections``) from
everyone else.  A session counts from the moment its caller is
authenticated until it ends; connections still in TLS or authentication do not (they are
bounded by ``startup_timeout_seconds``).

The counts live in a shared anonymous mapping made before the workers are forked: one
region per worker, which only that worker writes (a total, and a small open-addressing
table of identity hashes and their session counts).  An admission reads every region and
writes its own under an ``flock`` on ``<runtime_dir>/sessions.lock``, which the kernel
releases if a worker dies holding it; the supervisor zeroes a dead worker's region before
it starts the next (its sessions died with it).  With one process, nothing is shared and
no lock is taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pgwarden import errors
from pgwarden.client_auth import Identity
from pgwarden.config import Settings
from pgwarden.errors import GatewayError

#: Identities with open sessions one worker can count at once.  Past it a session of a
#: new identity is refused (fail closed) while limits are configured.
SLOTS: Final = 4096
_SLOT: Final = struct.Struct("<QQ")  # identity hash (0: never used), open sessions
_TOTAL: Final = struct.Struct("<Q")
_REGION: Final = _TOTAL.size + SLOTS * _SLOT.size


def identity_key(identity: Identity) -> str:
    """What one caller is, for counting: its token's issuer and subject, or its name."""
    attributes = identity.attributes
    return f"{attributes.get('issuer', '')}\0{attributes.get('subject') or identity.name}"


def _hash(key: str) -> int:
    value = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return value or 1  # 0 marks a slot never used


@dataclass(frozen=True)
class Admission:
    """A counted session: what :meth:`SessionLedger.release` takes back."""

    key_hash: int


class SessionLedger:
    """Open sessions per worker and identity (see the module)."""

    @classmethod
    def for_settings(
        cls, settings: Settings, lock_path: Path | None = None
    ) -> SessionLedger | None:
        """The ledger ``settings`` ask for (for all their workers), or None without limits."""
        limits = (settings.max_client_connections, settings.max_connections_per_identity)
        rules = settings.identity.rules if settings.identity is not None else []
        if limits == (None, None) and all(rule.max_connections is None for rule in rules):
            return None
        return cls(
            settings.workers,
            max_total=settings.max_client_connections,
            max_per_identity=settings.max_connections_per_identity,
            lock_path=lock_path,
        )

    def __init__(
        self,
        workers: int,
        *,
        max_total: int | None,
        max_per_identity: int | None,
        lock_path: Path | None = None,
    ) -> None:
        self.workers = workers
        self.max_total = max_total
        self.max_per_identity = max_per_identity
        self._map = mmap.mmap(-1, workers * _REGION)  # MAP_SHARED: the forked workers see it
        self._lock_path = lock_path
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self.worker_index = 0

    # --- the supervisor -------------------------------------------------------------------

    def forget_worker(self, index: int) -> None:
        """A worker died: its sessions are gone with it."""
        start = index * _REGION
        self._map[start : start + _REGION] = bytes(_REGION)

    # --- a worker -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_path is None or self.workers == 1:
            yield
            return
        if self._lock_fd is None or self._lock_pid != os.getpid():
            # Opened by each worker itself: a descriptor inherited through fork would
            # share its lock with the parent's.
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._lock_pid = os.getpid()
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def admit(self, identity: Identity) -> Admission:
        """Counts a session of ``identity``, or raises GatewayError 53300 past a limit."""
        key = identity_key(identity)
        key_hash = _hash(key)
        with self._locked():
            total, mine = 0, 0
            for index in range(self.workers):
                region = index * _REGION
                total += _TOTAL.unpack_from(self._map, region)[0]
                found = self._find(region, key_hash)
                if found is not None:
                    mine += _SLOT.unpack_from(self._map, found)[1]
            if self.max_total is not None and total >= self.max_total:
                raise GatewayError(errors.TOO_MANY_CONNECTIONS, "sorry, too many clients already")
            limits = [self.max_per_identity, identity.max_connections]
            limit = min((n for n in limits if n is not None), default=None)
            if limit is not None and mine >= limit:
                raise GatewayError(
                    errors.TOO_MANY_CONNECTIONS,
                    f'too many connections for identity "{identity.name}" '
                    f"(at most {limit} at once)",
                )
            region = self.worker_index * _REGION
            slot = self._find(region, key_hash, insert=True)
            if slot is None:
                raise GatewayError(
                    errors.TOO_MANY_CONNECTIONS,
                    "sorry, too many distinct identities have sessions open on this worker",
                )
            self._add(region, slot, key_hash, +1)
        return Admission(key_hash)

    def release(self, admission: Admission) -> None:
        region = self.worker_index * _REGION
        with self._locked():
            slot = self._find(region, admission.key_hash)
            if slot is not None:
                self._add(region, slot, admission.key_hash, -1)

    def open_sessions(self, identity: Identity | None = None) -> int:
        """Sessions counted now: all, or ``identity``'s."""
        key_hash = _hash(identity_key(identity)) if identity is not None else None
        count = 0
        for index in range(self.workers):
            region = index * _REGION
            if key_hash is None:
                count += _TOTAL.unpack_from(self._map, region)[0]
            else:
                found = self._find(region, key_hash)
                count += _SLOT.unpack_from(self._map, found)[1] if found is not None else 0
        return count

    def _find(self, region: int, key_hash: int, *, insert: bool = False) -> int | None:
        """The offset of ``key_hash``'s slot in a region; with ``insert``, of the slot it
        would take (an unused one, or one whose count went back to 0)."""
        table = region + _TOTAL.size
        reusable: int | None = None
        for step in range(SLOTS):
            offset = table + ((key_hash + step) % SLOTS) * _SLOT.size
            stored, count = _SLOT.unpack_from(self._map, offset)
            if stored == key_hash:
                return offset
            if stored == 0:  # the end of the probe chain: the key is not in the table
                return (reusable if reusable is not None else offset) if insert else None
            if count == 0 and reusable is None:
                reusable = offset
        return reusable if insert else None

    def _add(self, region: int, slot: int, key_hash: int, delta: int) -> None:
        count = _SLOT.unpack_from(self._map, slot)[1] + delta
        _SLOT.pack_into(self._map, slot, key_hash, max(count, 0))
        total = _TOTAL.unpack_from(self._map, region)[0] + delta
        _TOTAL.pack_into(self._map, region, max(total, 0))

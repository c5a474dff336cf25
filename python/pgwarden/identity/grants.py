"""Time-bound grants: "identity X may use role Y until T", added and revoked at runtime.

The grants live in one JSON file (``identity.grants_file``) so that every worker process, a
restarted gateway and the ``pgwarden grants`` command all see the same set.  Writers take an
exclusive ``flock`` on a companion lock file, then replace the file atomically (write to a
temporary file, fsync, rename), so a reader never sees half a file.  Expired grants are
dropped at the next write.  The gateway re-reads the file when it changes (see
:mod:`pgwarden.identity.runtime`), and ``pgwarden grants`` also tells running gateways at
once through their admin sockets.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

FORMAT_VERSION: Final = 1


class GrantFileError(Exception):
    """The grants file cannot be read or written, or is not a grants file."""


def iso(timestamp: float) -> str:
    moment = dt.datetime.fromtimestamp(timestamp, tz=dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """An ISO 8601 instant (``2026-01-31T18:00:00Z``; no zone means UTC) as Unix time."""
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class Grant:
    """Identity (``issuer``, ``subject``) may log in as ``role`` until ``expires_at``."""

    id: str
    subject: str
    role: str
    expires_at: float
    issuer: str | None = None
    databases: tuple[str, ...] = ("*",)
    created_at: float = field(default_factory=time.time)
    reason: str | None = None

    def active(self, now: float) -> bool:
        return now < self.expires_at

    def applies_to(self, issuer: str, subject: str) -> bool:
        return self.subject == subject and (self.issuer is None or self.issuer == issuer)

    def allows_database(self, database: str) -> bool:
        return any(fnmatchcase(database, pattern) for pattern in self.databases)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "issuer": self.issuer,
            "subject": self.subject,
            "role": self.role,
            "databases": list(self.databases),
            "expires_at": iso(self.expires_at),
            "created_at": iso(self.created_at),
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: Any) -> Grant:
        if not isinstance(data, dict):
            raise GrantFileError("a grant is not a JSON object")
        try:
            databases = data.get("databases") or ["*"]
            return cls(
                id=str(data["id"]),
                issuer=data.get("issuer"),
                subject=str(data["subject"]),
                role=str(data["role"]),
                databases=tuple(str(d) for d in databases),
                expires_at=parse_time(str(data["expires_at"])),
                created_at=parse_time(str(data.get("created_at") or data["expires_at"])),
                reason=data.get("reason"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise GrantFileError(f"invalid grant {data.get('id')!r}: {exc}") from exc

    @staticmethod
    def new_id() -> str:
        return "g-" + secrets.token_hex(6)


def parse_grants(text: str) -> list[Grant]:
    if not text.strip():
        return []
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise GrantFileError(f"grants file is not JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("grants"), list):
        raise GrantFileError('grants file must be a JSON object with a "grants" list')
    return [Grant.from_json(item) for item in document["grants"]]


def render_grants(grants: Sequence[Grant]) -> str:
    document = {"version": FORMAT_VERSION, "grants": [g.to_json() for g in grants]}
    return json.dumps(document, indent=2) + "\n"


class GrantStore:
    """The grants file (blocking I/O: the gateway calls it from a worker thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced or written (inode, size, mtime)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> list[Grant]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise GrantFileError(f"cannot read {self.path}: {exc}") from exc
        return parse_grants(text)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, grants: Sequence[Grant]) -> None:
        fd, temporary = tempfile.mkstemp(prefix=".grants-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(render_grants(grants))
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def update(self, change: Callable[[list[Grant]], list[Grant]]) -> list[Grant]:
        """Apply ``change`` to the current grants under the lock; returns the new list."""
        with self._locked():
            now = time.time()
            current = [g for g in self.load() if g.active(now)]
            updated = change(current)
            self._write(updated)
            return updated

    def add(self, grant: Grant) -> Grant:
        self.update(lambda grants: [*grants, grant])
        return grant

    def revoke(self, grant_id: str) -> Grant | None:
        removed: list[Grant] = []

        def without(grants: list[Grant]) -> list[Grant]:
            removed.extend(g for g in grants if g.id == grant_id)
            return [g for g in grants if g.id != grant_id]

        self.update(without)
        return removed[0] if removed else None


class GrantTable:
    """The grants one gateway process knows, by id."""

    def __init__(self, grants: Sequence[Grant] = ()) -> None:
        self._grants = {g.id: g for g in grants}

    def replace(self, grants: Sequence[Grant]) -> None:
        self._grants = {g.id: g for g in grants}

    def get(self, grant_id: str) -> Grant | None:
        return self._grants.get(grant_id)

    def for_identity(self, issuer: str, subject: str, now: float) -> list[Grant]:
        """Active grants of an identity, newest first."""
        found = [
            g for g in self._grants.values() if g.active(now) and g.applies_to(issuer, subject)
        ]
        return sorted(found, key=lambda g: g.created_at, reverse=True)

    def __len__(self) -> int:
        return len(self._grants)

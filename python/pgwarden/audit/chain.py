"""The records' hash chain: ``hash = HMAC-SHA256(key, prev_hash || body)``.

A sealed record line is its JSON body with the hash spliced in as the last member::

    {"seq":7,...,"sql":"SELECT 1","hash":"<64 lowercase hex>"}

The body the hash covers is the line with ``,"hash":"..."`` cut out.  The first record of a
stream chains from 32 zero bytes; every segment starts with a record that names the hash
before it (``prev``), so any suffix of a stream can be checked.  The codec seals records in
Rust (``rust/wire/src/audit_record.rs``); this module checks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final

HASH_LEN: Final = 32
GENESIS: Final = bytes(HASH_LEN)
_HASH_MEMBER: Final = b',"hash":"'
_TAIL_LEN: Final = len(_HASH_MEMBER) + 2 * HASH_LEN + 2  # ,"hash":"<hex>"}
KEY_FILE_NAME: Final = "chain.key"


class NotSealed(ValueError):
    """The line is not a sealed record (no hash member where it belongs)."""


def unseal(line: bytes) -> tuple[bytes, bytes]:
    """Split a sealed line (without newline) into (body the hash covers, stored hash)."""
    if len(line) < _TAIL_LEN + 2 or not line.endswith(b'"}'):
        raise NotSealed("no hash at the end of the record")
    cut = len(line) - _TAIL_LEN
    if line[cut : cut + len(_HASH_MEMBER)] != _HASH_MEMBER:
        raise NotSealed("no hash at the end of the record")
    digits = line[cut + len(_HASH_MEMBER) : -2]
    try:
        stored = bytes.fromhex(digits.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise NotSealed("the hash is not hexadecimal") from None
    if len(stored) != HASH_LEN or digits != digits.lower():
        raise NotSealed("the hash is not 64 lowercase hex digits")
    return line[:cut] + b"}", stored


def chain_hash(key: bytes, prev: bytes, body: bytes) -> bytes:
    return hmac.new(key, prev + body, hashlib.sha256).digest()


def seal(key: bytes, prev: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Seal a JSON body: returns (line without newline, its hash).  Used by tests and tools."""
    if not body.endswith(b"}"):
        raise ValueError("a record body is a JSON object")
    digest = chain_hash(key, prev, body)
    return body[:-1] + _HASH_MEMBER + digest.hex().encode() + b'"}', digest


def check(key: bytes, prev: bytes, line: bytes) -> tuple[bool, bytes]:
    """Whether ``line`` continues the chain at ``prev``; returns (ok, stored hash)."""
    body, stored = unseal(line)
    return hmac.compare_digest(chain_hash(key, prev, body), stored), stored


def key_for(keys: Sequence[bytes], prev: bytes, line: bytes) -> bytes | None:
    """The first of ``keys`` with which ``line`` continues the chain at ``prev`` (a stream
    is sealed with one key: after a key rotation, older streams with an earlier one)."""
    for key in keys:
        with contextlib.suppress(NotSealed):
            if check(key, prev, line)[0]:
                return key
    return None


def load_or_create_key(configured: bytes | None, directory: Path) -> bytes:
    """The configured key, else the one in ``<directory>/chain.key`` (created if missing)."""
    if configured:
        return configured
    path = directory / KEY_FILE_NAME
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    tmp = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # first writer wins when several processes start at once
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


def read_key(configured: bytes | None, directory: Path | None) -> bytes:
    """The key to verify with: configured, else ``<directory>/chain.key``."""
    if configured:
        return configured
    if directory is None:
        raise FileNotFoundError("no chain key configured and no audit directory to find one")
    return (directory / KEY_FILE_NAME).read_bytes().strip()

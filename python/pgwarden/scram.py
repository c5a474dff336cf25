"""SCRAM-SHA-256 client exchange (RFC 5802, RFC 7677) as PostgreSQL speaks it.

The gateway terminates TLS on the client side, so channel binding can never be end-to-end:
the exchange always uses the ``n,,`` GS2 header and the plain ``SCRAM-SHA-256`` mechanism.
PostgreSQL ignores the SCRAM user name (the startup packet names the role), so ``n=`` is empty,
as libpq sends it.  The server signature is verified: a server that cannot prove it knows the
password is treated as an authentication failure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
_GS2_HEADER = b"n,,"
_NONCE_BYTES = 18
# PostgreSQL's default is 4096; anything far beyond is a stalling server, not a real setting.
MAX_ITERATIONS = 10_000_000


class ScramError(Exception):
    """The server's SCRAM messages are malformed, or it failed to prove the password."""


def saslprep(password: str) -> str:
    """RFC 4013 SASLprep of ``password``; the raw string when it is not a valid one.

    Falling back to the unprepared password is what PostgreSQL does on both ends
    (``pg_saslprep`` returning ``SASLPREP_INVALID_UTF8``/``PROHIBITED``), so hashes match.
    """
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return password
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    for ch in normalized:
        if any(check(ch) for check in prohibited):
            return password
    # RFC 3454 section 6: bidirectional text rules.
    if any(stringprep.in_table_d1(ch) for ch in normalized):
        if any(stringprep.in_table_d2(ch) for ch in normalized):
            return password
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            return password
    return normalized


@dataclass(frozen=True, slots=True)
class _Keys:
    client_key: bytes
    stored_key: bytes
    server_key: bytes


class _KeyCache:
    """Small LRU of derived keys: PBKDF2 costs milliseconds and a role's salt rarely changes."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: OrderedDict[tuple[bytes, bytes, int], _Keys] = OrderedDict()
        # PBKDF2 may run in a worker thread (see upstream.py) while the loop reads the cache.
        self._lock = threading.Lock()

    def get(self, password: bytes, salt: bytes, iterations: int) -> _Keys | None:
        key = (hashlib.sha256(password).digest(), salt, iterations)
        with self._lock:
            keys = self._entries.get(key)
            if keys is not None:
                self._entries.move_to_end(key)
            return keys

    def put(self, password: bytes, salt: bytes, iterations: int, keys: _Keys) -> None:
        key = (hashlib.sha256(password).digest(), salt, iterations)
        with self._lock:
            self._entries[key] = keys
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


_CACHE = _KeyCache()


def derive_keys(password: bytes, salt: bytes, iterations: int) -> _Keys:
    """SaltedPassword → ClientKey / StoredKey / ServerKey (RFC 5802 section 3), cached."""
    cached = _CACHE.get(password, salt, iterations)
    if cached is not None:
        return cached
    salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    keys = _Keys(
        client_key=client_key,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", "sha256"),
    )
    _CACHE.put(password, salt, iterations, keys)
    return keys


def keys_cached(password: str, salt: bytes, iterations: int) -> bool:
    """Whether :func:`derive_keys` would answer without running PBKDF2."""
    return _CACHE.get(saslprep(password).encode(), salt, iterations) is not None


def _parse_attributes(message: bytes) -> dict[str, bytes]:
    attrs: dict[str, bytes] = {}
    for part in message.split(b","):
        if len(part) < 2 or part[1:2] != b"=":
            raise ScramError("malformed SCRAM message from server")
        attrs.setdefault(part[:1].decode("ascii", "replace"), part[2:])
    return attrs


class ScramClient:
    """One SCRAM-SHA-256 exchange: ``client_first`` → ``client_final`` → ``verify_server_final``."""

    def __init__(self, password: str, *, nonce: bytes | None = None) -> None:
        self._password = saslprep(password).encode("utf-8")
        raw = nonce if nonce is not None else secrets.token_bytes(_NONCE_BYTES)
        self._client_nonce = base64.b64encode(raw)
        self._client_first_bare = b"n=,r=" + self._client_nonce
        self._auth_message: bytes | None = None
        self._server_key: bytes | None = None
        self.salt = b""
        self.iterations = 0

    def client_first(self) -> bytes:
        """Payload of SASLInitialResponse."""
        return _GS2_HEADER + self._client_first_bare

    def parse_server_first(self, server_first: bytes) -> None:
        """Read salt and iteration count from AuthenticationSASLContinue's payload."""
        attrs = _parse_attributes(server_first)
        if "e" in attrs:
            raise ScramError(f"server refused SCRAM: {attrs['e'].decode('utf-8', 'replace')}")
        try:
            server_nonce = attrs["r"]
            salt = base64.b64decode(attrs["s"], validate=True)
            iterations = int(attrs["i"])
        except (KeyError, ValueError) as exc:
            raise ScramError("malformed SCRAM server-first-message") from exc
        if not server_nonce.startswith(self._client_nonce) or len(server_nonce) <= len(
            self._client_nonce
        ):
            raise ScramError("SCRAM server nonce does not extend the client nonce")
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"SCRAM iteration count {iterations} out of range")
        self._server_first = server_first
        self._server_nonce = server_nonce
        self.salt = salt
        self.iterations = iterations

    def client_final(self) -> bytes:
        """Payload of the SASLResponse answering AuthenticationSASLContinue (runs PBKDF2)."""
        keys = derive_keys(self._password, self.salt, self.iterations)
        without_proof = b"c=" + base64.b64encode(_GS2_HEADER) + b",r=" + self._server_nonce
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        signature = hmac.digest(keys.stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(keys.client_key, signature, strict=True))
        self._auth_message = auth_message
        self._server_key = keys.server_key
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal's ``v=`` against the expected ServerSignature."""
        if self._auth_message is None or self._server_key is None:
            raise ScramError("SCRAM server-final-message before client-final-message")
        attrs = _parse_attributes(server_final)
        if "e" in attrs:
            raise ScramError(f"server refused SCRAM: {attrs['e'].decode('utf-8', 'replace')}")
        try:
            received = base64.b64decode(attrs["v"], validate=True)
        except (KeyError, ValueError) as exc:
            raise ScramError("malformed SCRAM server-final-message") from exc
        expected = hmac.digest(self._server_key, self._auth_message, "sha256")
        if not hmac.compare_digest(received, expected):
            raise ScramError("SCRAM server signature does not match: server not authenticated")


def md5_password(password: str, user: str, salt: bytes) -> bytes:
    """PasswordMessage payload for AuthenticationMD5Password: ``md5`` + md5(md5(pw+user)+salt)."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode()

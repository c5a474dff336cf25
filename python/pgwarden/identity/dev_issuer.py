"""A development OIDC issuer: discovery and JWKS over HTTP on loopback, and token minting.

For the demo, the tests and trying pgwarden out -- never for production: it signs whatever it
is asked to.  :class:`DevIssuer` runs in a thread of the calling process (``start()`` /
``stop()``), serves

* ``/.well-known/openid-configuration`` (``issuer``, ``jwks_uri``, the algorithms), and
* ``/jwks.json``, the public keys,

and mints tokens for a subject and groups with :meth:`DevIssuer.mint`.  Keys can be rotated
(:meth:`rotate`) and retired while it runs, and it counts the requests each path received, so
a test can check how often the gateway fetched the keys.

``pgwarden dev-issuer serve --state-dir DIR`` runs one as a command and keeps its key and URL
in ``DIR``; ``pgwarden dev-issuer mint --state-dir DIR --subject alice`` prints a token
signed with that key from another shell.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from pgwarden.identity.discovery import WELL_KNOWN_PATH

JWKS_PATH: Final = "/jwks.json"
DEFAULT_AUDIENCE: Final = "pgwarden"
STATE_FILE: Final = "issuer.json"
KEY_FILE: Final = "signing-key.pem"

KeyKind = Literal["RSA", "EC"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A private key with its key id and algorithm."""

    kid: str
    algorithm: str
    private_key: PrivateKey

    @classmethod
    def generate(cls, kind: KeyKind = "RSA") -> SigningKey:
        kid = "dev-" + secrets.token_hex(4)
        if kind == "EC":
            return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, use="sig", alg=self.algorithm)
        return jwk

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, kid: str, algorithm: str, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError("the dev issuer signs with RSA or EC keys only")
        return cls(kid, algorithm, key)


def mint_token(
    key: SigningKey,
    *,
    issuer: str,
    subject: str,
    audience: str | Sequence[str] = DEFAULT_AUDIENCE,
    groups: Sequence[str] = (),
    email: str | None = None,
    name: str | None = None,
    ttl_seconds: float = 3600,
    claims: Mapping[str, Any] | None = None,
) -> str:
    """A signed token; ``claims`` are added last (and may override the standard ones)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience if isinstance(audience, str) else list(audience),
        "iat": now,
        "nbf": now,
        "exp": now + int(ttl_seconds),
        "jti": secrets.token_hex(8),
    }
    if groups:
        payload["groups"] = list(groups)
    if email is not None:
        payload["email"] = email
    if name is not None:
        payload["name"] = name
    payload.update(claims or {})
    return jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


class DevIssuer:
    """A running development issuer (an HTTP server thread on loopback)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        audience: str = DEFAULT_AUDIENCE,
        key: SigningKey | None = None,
    ) -> None:
        self.audience = audience
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = [key or SigningKey.generate()]
        self.requests: Counter[str] = Counter()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{text}]" if ":" in text else text
        return f"http://{shown}:{port}"

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def jwks_uri(self) -> str:
        return self.url + JWKS_PATH

    def start(self) -> DevIssuer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pgwarden-dev-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> DevIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- keys -----------------------------------------------------------------------

    @property
    def current_key(self) -> SigningKey:
        with self._lock:
            return self._keys[-1]

    @property
    def keys(self) -> list[SigningKey]:
        with self._lock:
            return list(self._keys)

    def rotate(self, kind: KeyKind = "RSA", *, retire_old: bool = False) -> SigningKey:
        """Publish a new key and sign with it from now on; optionally unpublish the others."""
        key = SigningKey.generate(kind)
        with self._lock:
            self._keys = [key] if retire_old else [*self._keys, key]
        return key

    def retire(self, kid: str) -> None:
        with self._lock:
            self._keys = [k for k in self._keys if k.kid != kid]

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [k.public_jwk() for k in self._keys]}

    def discovery_document(self) -> dict[str, Any]:
        with self._lock:
            algorithms = sorted({k.algorithm for k in self._keys})
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": algorithms,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }

    # --- tokens ---------------------------------------------------------------------

    def mint(
        self,
        subject: str,
        *,
        groups: Sequence[str] = (),
        email: str | None = None,
        name: str | None = None,
        ttl_seconds: float = 3600,
        audience: str | Sequence[str] | None = None,
        claims: Mapping[str, Any] | None = None,
        key: SigningKey | None = None,
    ) -> str:
        return mint_token(
            key or self.current_key,
            issuer=self.issuer,
            subject=subject,
            audience=audience if audience is not None else self.audience,
            groups=groups,
            email=email,
            name=name,
            ttl_seconds=ttl_seconds,
            claims=claims,
        )

    # --- state directory (for the command) ----------------------------------------------

    def save_state(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = self.current_key
        key_file = directory / KEY_FILE
        key_file.touch(mode=0o600)
        key_file.write_bytes(key.private_pem())
        state = {
            "issuer": self.issuer,
            "audience": self.audience,
            "kid": key.kid,
            "algorithm": key.algorithm,
        }
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class SavedIssuer:
    """What ``pgwarden dev-issuer serve`` left in its state directory."""

    issuer: str
    audience: str
    key: SigningKey

    @classmethod
    def load(cls, directory: Path) -> SavedIssuer:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        key = SigningKey.from_pem(
            state["kid"], state["algorithm"], (directory / KEY_FILE).read_bytes()
        )
        return cls(issuer=state["issuer"], audience=state["audience"], key=key)

    @classmethod
    def load_key(cls, directory: Path) -> SigningKey | None:
        try:
            return cls.load(directory).key
        except FileNotFoundError:
            return None


def _handler_for(issuer: DevIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "pgwarden-dev-issuer"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            issuer.requests[path] += 1
            if path == WELL_KNOWN_PATH:
                self._json(issuer.discovery_document())
            elif path == JWKS_PATH:
                self._json(issuer.jwks())
            else:
                self.send_error(404)

        def _json(self, document: Mapping[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the demo and the tests print what matters

    return Handler

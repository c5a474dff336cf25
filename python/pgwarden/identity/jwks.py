"""An issuer's signing keys: fetched with pyjwt's JWKS client, cached, rotated, rate-limited.

Keys are looked up by ``kid``.  They are fetched again when the cache is older than
``jwks_cache_seconds`` (new keys published ahead of a rotation are picked up), and when a
token names an unknown ``kid`` (a rotation that was not announced ahead) -- but then at most
once per ``jwks_min_refresh_seconds``, with one fetch shared by every waiting connection.
A flood of tokens with junk ``kid`` values therefore costs one fetch per interval, not one
per token.  Failed attempts count too, so an unreachable issuer is not hammered either.

Fetching runs in a worker thread (``anyio.to_thread``): the event loop never waits on the
network.  When a periodic refresh fails the keys already known stay in use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import anyio
import anyio.to_thread
from jwt import PyJWK, PyJWKClient, PyJWKSet
from jwt.exceptions import PyJWKClientError, PyJWKSetError, PyJWTError

from pgwarden.config import IssuerSettings
from pgwarden.identity import discovery
from pgwarden.identity.discovery import DiscoveryError, ProviderMetadata

log = logging.getLogger(__name__)

# Key types a JWKS may hold that pgwarden verifies with (never "oct": a symmetric key
# published in a JWKS would let anyone who reads it sign tokens).
_ASYMMETRIC_KEY_TYPES: Final = frozenset({"RSA", "EC", "OKP"})


class KeysUnavailable(Exception):
    """No key set could be obtained from the issuer (and none is cached)."""


class UnknownKey(Exception):
    """The token's ``kid`` is not in the issuer's key set, even after a refresh."""


class JwksCache:
    """The verification keys of one issuer."""

    def __init__(
        self,
        issuer: IssuerSettings,
        *,
        cache_seconds: float,
        min_refresh_seconds: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self._cache_seconds = cache_seconds
        self._min_refresh_seconds = min_refresh_seconds
        self._timeout = timeout
        self._clock = clock
        self._metadata: ProviderMetadata | None = None
        self._client: PyJWKClient | None = None
        self._by_kid: dict[str, PyJWK] = {}
        self._all: list[PyJWK] = []
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._lock = anyio.Lock()
        self.fetches = 0

    @property
    def loaded(self) -> bool:
        return self._fetched_at is not None

    async def key_for(self, kid: str | None) -> PyJWK:
        """The key to verify a token whose header names ``kid`` (may be None)."""
        now = self._clock()
        if self._fetched_at is None or now - self._fetched_at >= self._cache_seconds:
            await self._refresh(not_attempted_since=now - self._min_refresh_seconds)
            if self._fetched_at is None:
                raise KeysUnavailable(f"no signing keys from issuer {self.issuer.issuer}")
        found = self._lookup(kid)
        if found is not None:
            return found
        if kid is not None:
            # Unknown kid: perhaps an unannounced rotation.  One shared, rate-limited fetch.
            await self._refresh(not_attempted_since=self._clock() - self._min_refresh_seconds)
            found = self._lookup(kid)
            if found is not None:
                return found
        raise UnknownKey(kid)

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if kid is not None:
            return self._by_kid.get(kid)
        # No kid in the token: unambiguous only when the issuer publishes a single key.
        return self._all[0] if len(self._all) == 1 else None

    async def prefetch(self) -> None:
        """Load the keys ahead of the first connection (failures are logged, not raised)."""
        await self._refresh(not_attempted_since=self._clock() - self._min_refresh_seconds)

    async def _refresh(self, *, not_attempted_since: float) -> None:
        async with self._lock:
            # Whoever held the lock may have just fetched: then there is nothing to do.
            if self._attempted_at is not None and self._attempted_at > not_attempted_since:
                return
            self._attempted_at = self._clock()
            try:
                key_set = await self._fetch()
            except (DiscoveryError, PyJWTError) as exc:
                self._metadata = None  # discover again next time: the jwks_uri may have moved
                self._client = None
                log.warning("issuer %s: cannot load signing keys: %s", self.issuer.issuer, exc)
                return
            self._install(key_set)
            self._fetched_at = self._clock()

    async def _fetch(self) -> PyJWKSet:
        if self._metadata is None:
            self._metadata = await discovery.discover(self.issuer, http_timeout=self._timeout)
        if self._client is None:
            self._client = PyJWKClient(
                self._metadata.jwks_uri,
                cache_jwk_set=False,
                timeout=self._timeout,
                ssl_context=discovery.ssl_context(self.issuer),
            )
        client = self._client
        self.fetches += 1
        try:
            return await anyio.to_thread.run_sync(lambda: client.get_jwk_set(refresh=True))
        except (PyJWKClientError, PyJWKSetError):
            raise
        except (OSError, ValueError) as exc:
            raise DiscoveryError(f"cannot fetch {self._metadata.jwks_uri}: {exc}") from exc

    def _install(self, key_set: PyJWKSet) -> None:
        usable = [
            key
            for key in key_set.keys
            if key.key_type in _ASYMMETRIC_KEY_TYPES and key.public_key_use in ("sig", None)
        ]
        self._all = usable
        self._by_kid = {key.key_id: key for key in usable if key.key_id}
        log.info(
            "issuer %s: %d signing key(s) loaded (%s)",
            self.issuer.issuer,
            len(usable),
            ", ".join(sorted(self._by_kid)) or "no kid",
        )

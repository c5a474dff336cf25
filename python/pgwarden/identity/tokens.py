"""Token validation: :class:`TokenValidator` turns the password a client sent into claims.

Checks, in order (each failure is a :class:`TokenRejected` with a reason code for the event
log and a message a person can act on; neither ever contains the token or key material):

1. size, before anything is decoded (``max_token_bytes``);
2. structure and header: ``alg: none`` is refused outright;
3. the (unverified) ``iss`` selects a configured issuer, else "issuer not trusted";
4. the header's ``alg`` must be in that issuer's allow-list; HS* is possible only when the
   issuer has a configured secret, and then the secret is the only HS key: a token signed
   with the issuer's public RSA key as an HMAC secret cannot verify;
5. asymmetric keys come from the issuer's JWKS by ``kid``; the key type (and curve) must fit
   the algorithm, and a key's own ``alg``, when published, must equal the header's;
6. signature, then the claims: exp, iat, iss, aud and sub are required; exp, nbf and iat
   are checked with the issuer's leeway.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from jwt import PyJWK
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from pgwarden import errors
from pgwarden.config import HMAC_ALGORITHMS, IdentitySettings, IssuerSettings
from pgwarden.identity.jwks import JwksCache, KeysUnavailable, UnknownKey

REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud", "sub")
# Curves the ES algorithms are defined on (RFC 7518, section 3.4).
_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_SHOWN_TEXT_LIMIT: Final = 120


class TokenRejected(Exception):
    """A token that does not authenticate its bearer.

    ``reason`` is a stable code for events (``expired``, ``issuer_not_trusted``, ...);
    ``message`` is what the client reads; ``issuer`` is the issuer the token claimed, if any.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        issuer: str | None = None,
        subject: str | None = None,
        sqlstate: str = errors.INVALID_PASSWORD,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.issuer = issuer
        self.subject = subject
        self.sqlstate = sqlstate


@dataclass(frozen=True, slots=True)
class ValidatedToken:
    """The claims of a token whose signature and claims checked out."""

    issuer: IssuerSettings
    claims: Mapping[str, Any]
    expires_at: float


def _iso(timestamp: object) -> str:
    try:
        moment = dt.datetime.fromtimestamp(float(timestamp), tz=dt.UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return str(timestamp)[:40]
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _shown(value: object) -> str:
    """Claim text quoted in an error, cut short (it comes from an untrusted token)."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= _SHOWN_TEXT_LIMIT else text[:_SHOWN_TEXT_LIMIT] + "..."


def key_fits_algorithm(key: PyJWK, algorithm: str) -> bool:
    """Whether ``key`` may verify ``algorithm`` (no key-type confusion)."""
    published = key._jwk_data.get("alg")
    if published is not None and published != algorithm:
        return False
    kty = key.key_type
    if algorithm.startswith(("RS", "PS")):
        return kty == "RSA"
    if algorithm in _EC_CURVES:
        curve = getattr(getattr(key.key, "curve", None), "name", None)
        return kty == "EC" and curve == _EC_CURVES[algorithm]
    if algorithm == "EdDSA":
        return kty == "OKP"
    return False


class TokenValidator:
    """Validates tokens of every configured issuer."""

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        key_caches: Mapping[str, JwksCache] | None = None,
    ) -> None:
        self._settings = settings
        self._issuers = {issuer.issuer: issuer for issuer in settings.issuers}
        self._secrets = {i.issuer: i.resolved_hs_secret() for i in settings.issuers}
        self.key_caches: Mapping[str, JwksCache] = key_caches or {
            issuer.issuer: JwksCache(
                issuer,
                cache_seconds=settings.jwks_cache_seconds,
                min_refresh_seconds=settings.jwks_min_refresh_seconds,
                timeout=settings.http_timeout_seconds,
            )
            for issuer in settings.issuers
        }

    async def validate(self, token: str) -> ValidatedToken:
        """Check ``token``; raise :class:`TokenRejected` with the first problem found."""
        size = len(token.encode("utf-8", "replace"))
        if size > self._settings.max_token_bytes:
            raise TokenRejected(
                "oversize",
                f"token too large ({size} bytes; the limit is {self._settings.max_token_bytes})",
            )
        if token.count(".") != 2:
            raise TokenRejected(
                "malformed",
                "the password is not a token (JWT): connect with an OIDC token as the password",
            )
        try:
            # Header and claims in one decode: they choose the issuer and key, nothing more.
            parts = jwt.decode_complete(token, options={"verify_signature": False})
        except (DecodeError, InvalidTokenError):
            raise TokenRejected("malformed", "malformed token (JWT)") from None
        header: dict[str, Any] = parts["header"]
        unverified: dict[str, Any] = parts["payload"]
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise TokenRejected("malformed", "malformed token: no algorithm in its header")
        if algorithm.lower() == "none":
            raise TokenRejected("alg_none", "unsigned token (alg none) refused")
        claimed_issuer = unverified.get("iss")
        if not isinstance(claimed_issuer, str):
            raise TokenRejected("missing_claim", "token lacks the required claim 'iss'")
        issuer = self._issuers.get(claimed_issuer)
        if issuer is None:
            raise TokenRejected(
                "issuer_not_trusted",
                f"issuer not trusted: {_shown(claimed_issuer)}",
                issuer=_shown(claimed_issuer),
            )
        if algorithm not in issuer.algorithms:
            raise TokenRejected(
                "alg_not_allowed",
                f"token algorithm {_shown(algorithm)} is not allowed for this issuer "
                f"(allowed: {', '.join(issuer.algorithms)})",
                issuer=issuer.issuer,
            )
        key = await self._key(issuer, algorithm, header.get("kid"))
        return self._verify(issuer, token, key, algorithm, unverified)

    async def _key(self, issuer: IssuerSettings, algorithm: str, kid: object) -> Any:
        if algorithm in HMAC_ALGORITHMS:
            secret = self._secrets[issuer.issuer]
            assert secret is not None  # the settings refuse HS* without a secret
            return secret
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("malformed", "malformed token: kid is not a string")
        try:
            jwk = await self.key_caches[issuer.issuer].key_for(kid)
        except UnknownKey:
            raise TokenRejected(
                "unknown_kid",
                "token signed with a key the issuer does not publish (unknown kid)",
                issuer=issuer.issuer,
            ) from None
        except KeysUnavailable:
            raise TokenRejected(
                "keys_unavailable",
                "cannot verify the token now: the issuer's signing keys are unavailable",
                issuer=issuer.issuer,
                sqlstate=errors.INVALID_AUTHORIZATION_SPECIFICATION,
            ) from None
        if not key_fits_algorithm(jwk, algorithm):
            raise TokenRejected(
                "key_mismatch",
                f"token algorithm {algorithm} does not match the type of key {kid!s:.64}",
                issuer=issuer.issuer,
            )
        return jwk.key

    def _verify(
        self,
        issuer: IssuerSettings,
        token: str,
        key: Any,
        algorithm: str,
        unverified: Mapping[str, Any],
    ) -> ValidatedToken:
        where = {"issuer": issuer.issuer}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=issuer.leeway_seconds,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except InvalidSignatureError:
            raise TokenRejected(
                "bad_signature", "token signature verification failed", **where
            ) from None
        except ExpiredSignatureError:
            raise TokenRejected(
                "expired",
                f"token expired at {_iso(unverified.get('exp'))}: get a new token",
                **where,
            ) from None
        except ImmatureSignatureError:
            nbf = unverified.get("nbf")
            if isinstance(nbf, int | float) and nbf > time.time() + issuer.leeway_seconds:
                message = f"token not valid before {_iso(nbf)}"
            else:
                message = (
                    f"token issued in the future ({_iso(unverified.get('iat'))}): check the clocks"
                )
            raise TokenRejected("not_yet_valid", message, **where) from None
        except InvalidAudienceError:
            raise TokenRejected(
                "audience_mismatch",
                f"audience mismatch: the token is for {_shown(unverified.get('aud'))}, "
                f"expected {' or '.join(issuer.audience)}",
                **where,
            ) from None
        except MissingRequiredClaimError as exc:
            raise TokenRejected(
                "missing_claim", f"token lacks the required claim {exc.claim!r}", **where
            ) from None
        except InvalidTokenError as exc:
            raise TokenRejected("invalid_claim", f"invalid token: {exc}"[:200], **where) from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected("invalid_claim", "token subject (sub) is empty", **where)
        expires_at = float(claims["exp"]) + issuer.leeway_seconds
        return ValidatedToken(issuer=issuer, claims=claims, expires_at=expires_at)

"""TokenValidator and the JWKS cache against a real discovery + JWKS endpoint on loopback.

No gateway here: these tests drive the validator directly and count the HTTP requests the
issuer receives.  The same refusals through real clients are in test_identity_gateway.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from identity_support import AUDIENCE
from pgwarden import errors
from pgwarden.config import IdentitySettings
from pgwarden.identity.claims import TokenIdentity, claim_at
from pgwarden.identity.dev_issuer import JWKS_PATH, DevIssuer, SigningKey
from pgwarden.identity.discovery import DiscoveryError, check_endpoint_url
from pgwarden.identity.tokens import TokenRejected, TokenValidator

pytestmark = pytest.mark.anyio


@pytest.fixture
def fresh_issuer() -> Iterator[DevIssuer]:
    with DevIssuer(audience=AUDIENCE) as issuer:
        yield issuer


def settings_for(*issuers: DevIssuer, **overrides: Any) -> IdentitySettings:
    issuer_overrides = overrides.pop("issuer", {})
    data: dict[str, Any] = {
        "issuers": [
            {
                "issuer": issuer.issuer,
                "audience": AUDIENCE,
                "algorithms": ["RS256", "ES256"],
                "leeway_seconds": 5,
                **issuer_overrides,
            }
            for issuer in issuers
        ],
        "jwks_min_refresh_seconds": 60,
    }
    data.update(overrides)
    return IdentitySettings.model_validate(data)


async def rejected(validator: TokenValidator, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as caught:
        await validator.validate(token)
    # Neither the token nor a part of it is ever echoed.
    for part in token.split("."):
        if len(part) > 8:
            assert part not in caught.value.message
    return caught.value


def jwks_fetches(issuer: DevIssuer) -> int:
    return issuer.requests[JWKS_PATH]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_valid_token_and_identity_claims(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(
        settings_for(fresh_issuer, issuer={"groups_claim": "realm_access.roles"})
    )
    token = fresh_issuer.mint(
        "u-123",
        email="Alice@Example.com",
        name="Alice",
        claims={"realm_access": {"roles": ["analysts", "dba"]}},
    )
    validated = await validator.validate(token)
    who = TokenIdentity.from_claims(validated.issuer, validated.claims, validated.expires_at)
    assert (who.issuer, who.subject, who.name, who.email) == (
        fresh_issuer.issuer,
        "u-123",
        "Alice",
        "Alice@Example.com",
    )
    assert who.groups == ("analysts", "dba")
    assert abs(who.expires_at - (time.time() + 3600 + 5)) < 5  # exp plus the leeway
    assert claim_at({"https://x.example/groups": ["a"]}, "https://x.example/groups") == ["a"]


async def test_es256_issuer_next_to_an_rsa_one(fresh_issuer: DevIssuer) -> None:
    with DevIssuer(audience=AUDIENCE, key=SigningKey.generate("EC")) as ci_issuer:
        validator = TokenValidator(settings_for(fresh_issuer, ci_issuer))
        assert (await validator.validate(ci_issuer.mint("repo:org/app"))).claims["sub"] == (
            "repo:org/app"
        )
        assert (await validator.validate(fresh_issuer.mint("alice"))).claims["sub"] == "alice"


@pytest.mark.parametrize(
    ("case", "reason", "text"),
    [
        ("expired", "expired", "token expired at 20"),
        ("not_before", "not_yet_valid", "token not valid before 20"),
        ("issued_in_future", "not_yet_valid", "issued in the future"),
        ("wrong_issuer", "issuer_not_trusted", "issuer not trusted: https://elsewhere.example"),
        ("wrong_audience", "audience_mismatch", "audience mismatch: the token is for other-app"),
        ("missing_iat", "missing_claim", "'iat'"),
        ("missing_sub", "missing_claim", "'sub'"),
        ("not_a_jwt", "malformed", "not a token"),
    ],
)
async def test_claims_refused(fresh_issuer: DevIssuer, case: str, reason: str, text: str) -> None:
    validator = TokenValidator(settings_for(fresh_issuer))
    now = int(time.time())
    tokens = {
        "expired": lambda: fresh_issuer.mint("alice", claims={"exp": now - 60, "iat": now - 90}),
        "not_before": lambda: fresh_issuer.mint("alice", claims={"nbf": now + 600}),
        "issued_in_future": lambda: fresh_issuer.mint(
            "alice", claims={"iat": now + 600, "nbf": now}
        ),
        "wrong_issuer": lambda: fresh_issuer.mint(
            "alice", claims={"iss": "https://elsewhere.example"}
        ),
        "wrong_audience": lambda: fresh_issuer.mint("alice", audience="other-app"),
        "missing_iat": lambda: _without(fresh_issuer, "iat"),
        "missing_sub": lambda: _without(fresh_issuer, "sub"),
        "not_a_jwt": lambda: "hunter2",
    }
    refusal = await rejected(validator, tokens[case]())
    assert refusal.reason == reason
    assert text in refusal.message
    assert refusal.sqlstate == errors.INVALID_PASSWORD


def _without(issuer: DevIssuer, claim: str) -> str:
    token = issuer.mint("alice")
    payload = jwt.decode(token, options={"verify_signature": False})
    del payload[claim]
    key = issuer.current_key
    return jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


async def test_alg_none_refused(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(settings_for(fresh_issuer))
    claims = jwt.decode(fresh_issuer.mint("alice"), options={"verify_signature": False})
    unsigned = jwt.encode(claims, None, algorithm="none")
    refusal = await rejected(validator, unsigned)
    assert refusal.reason == "alg_none"
    # Hand-made variants: "None", and a signature part left in place.
    header = b64(json.dumps({"alg": "None", "kid": fresh_issuer.current_key.kid}).encode())
    body = unsigned.split(".")[1]
    assert (await rejected(validator, f"{header}.{body}.")).reason == "alg_none"
    assert (await rejected(validator, f"{header}.{body}.c2ln")).reason == "alg_none"


async def test_hs256_signed_with_the_rsa_public_key_refused(fresh_issuer: DevIssuer) -> None:
    claims = jwt.decode(fresh_issuer.mint("alice"), options={"verify_signature": False})
    public_pem = fresh_issuer.current_key.public_pem()
    # The classic confusion attack: the public key (which anyone can fetch) as HMAC secret.
    forged = _hmac_token(claims, public_pem, kid=fresh_issuer.current_key.kid)

    validator = TokenValidator(settings_for(fresh_issuer))
    refusal = await rejected(validator, forged)
    assert refusal.reason == "alg_not_allowed"
    assert "HS256 is not allowed" in refusal.message

    # Even with HS256 allowed (and a secret configured), the JWKS key is never an HMAC key.
    with_secret = TokenValidator(
        settings_for(
            fresh_issuer,
            issuer={
                "algorithms": ["RS256", "HS256"],
                "hs_secret": "a-configured-shared-secret-of-32-bytes+",
            },
        )
    )
    assert (await rejected(with_secret, forged)).reason == "bad_signature"
    genuine = _hmac_token(claims, b"a-configured-shared-secret-of-32-bytes+", kid=None)
    assert (await with_secret.validate(genuine)).claims["sub"] == "alice"


def _hmac_token(claims: dict[str, Any], secret: bytes, kid: str | None) -> str:
    # pyjwt refuses to use a PEM as an HMAC secret, so the attack is built by hand.
    import hashlib
    import hmac

    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_key_type_confusion_refused(fresh_issuer: DevIssuer) -> None:
    """An RS256 token naming the kid of an EC key is refused before any verification."""
    ec_key = fresh_issuer.rotate("EC")
    rsa_key = SigningKey(ec_key.kid, "RS256", rsa.generate_private_key(65537, 2048))
    token = fresh_issuer.mint("alice", key=rsa_key)
    validator = TokenValidator(settings_for(fresh_issuer))
    refusal = await rejected(validator, token)
    assert refusal.reason == "key_mismatch"


async def test_tampered_payload_refused(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(settings_for(fresh_issuer))
    header, payload, signature = fresh_issuer.mint("alice", groups=["readers"]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["admins"]
    tampered = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    refusal = await rejected(validator, tampered)
    assert refusal.reason == "bad_signature"
    assert refusal.message == "token signature verification failed"


async def test_unknown_kid_and_oversize_refused(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(settings_for(fresh_issuer, max_token_bytes=2048))
    stranger = SigningKey.generate()
    refusal = await rejected(validator, fresh_issuer.mint("alice", key=stranger))
    assert refusal.reason == "unknown_kid"
    big = fresh_issuer.mint("alice", claims={"padding": "x" * 4000})
    refusal = await rejected(validator, big)
    assert refusal.reason == "oversize"
    assert "limit is 2048" in refusal.message
    assert jwks_fetches(fresh_issuer) == 1  # oversize tokens are refused unread


async def test_flood_of_unknown_kids_costs_one_fetch(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(settings_for(fresh_issuer, jwks_min_refresh_seconds=0.5))
    await validator.validate(fresh_issuer.mint("alice"))
    assert jwks_fetches(fresh_issuer) == 1
    await anyio.sleep(0.6)  # the rate limit allows one refresh again

    junk = [fresh_issuer.mint("alice", key=SigningKey.generate("EC")) for _ in range(20)]
    reasons: list[str] = []

    async def attempt(token: str) -> None:
        reasons.append((await rejected(validator, token)).reason)

    async with anyio.create_task_group() as group:
        for token in junk * 5:  # 100 concurrent attempts, 20 distinct unknown kids
            group.start_soon(attempt, token)
    for token in junk:  # and 20 more one after the other
        await attempt(token)
    assert reasons == ["unknown_kid"] * 120
    assert jwks_fetches(fresh_issuer) == 2  # one shared refresh, then the rate limit holds


async def test_key_rotation(fresh_issuer: DevIssuer) -> None:
    validator = TokenValidator(
        settings_for(fresh_issuer, jwks_min_refresh_seconds=0.3, jwks_cache_seconds=1.0)
    )
    old_token = fresh_issuer.mint("alice")
    await validator.validate(old_token)
    old_kid = fresh_issuer.current_key.kid

    # Unannounced rotation: the new kid triggers one refresh and is then known.
    await anyio.sleep(0.4)
    new_key = fresh_issuer.rotate()
    assert (await validator.validate(fresh_issuer.mint("bob"))).claims["sub"] == "bob"
    assert jwks_fetches(fresh_issuer) == 2
    await validator.validate(old_token)  # the old key is still published

    # The old key is retired: once the cache expires, tokens signed with it are refused.
    fresh_issuer.retire(old_kid)
    await anyio.sleep(1.1)
    assert (await rejected(validator, old_token)).reason == "unknown_kid"
    assert fresh_issuer.current_key.kid == new_key.kid
    await validator.validate(fresh_issuer.mint("carol"))


async def test_unreachable_issuer_fails_closed_and_is_not_hammered(
    fresh_issuer: DevIssuer,
) -> None:
    token = fresh_issuer.mint("alice")
    validator = TokenValidator(settings_for(fresh_issuer))
    fresh_issuer.stop()
    for _ in range(5):
        refusal = await rejected(validator, token)
        assert refusal.reason == "keys_unavailable"
        assert refusal.sqlstate == errors.INVALID_AUTHORIZATION_SPECIFICATION
    assert validator.key_caches[fresh_issuer.issuer].fetches <= 1


async def test_discovery_document_for_another_issuer_is_refused(fresh_issuer: DevIssuer) -> None:
    # The configured issuer differs from the one the discovery document vouches for.
    validator = TokenValidator(
        IdentitySettings.model_validate(
            {
                "issuers": [
                    {
                        "issuer": fresh_issuer.issuer + "/tenant-b",
                        "discovery_url": fresh_issuer.issuer + "/.well-known/openid-configuration",
                        "audience": AUDIENCE,
                    }
                ]
            }
        )
    )
    token = fresh_issuer.mint("alice", claims={"iss": fresh_issuer.issuer + "/tenant-b"})
    assert (await rejected(validator, token)).reason == "keys_unavailable"
    assert jwks_fetches(fresh_issuer) == 0


def test_endpoints_must_be_https_except_on_loopback() -> None:
    check_endpoint_url("https://idp.example.com/.well-known/openid-configuration")
    check_endpoint_url("http://127.0.0.1:8080/jwks.json")
    check_endpoint_url("http://[::1]:8080/jwks.json")
    with pytest.raises(DiscoveryError, match="https"):
        check_endpoint_url("http://idp.example.com/jwks.json")
    with pytest.raises(DiscoveryError, match="https"):
        check_endpoint_url("file:///etc/passwd")


@pytest.mark.parametrize(
    ("issuer", "message"),
    [
        ({"algorithms": ["none"]}, "never allowed"),
        ({"algorithms": ["HS256"]}, "without hs_secret"),
        ({"hs_secret": "s"}, "no HS\\* algorithm"),
        ({"algorithms": ["XX1"]}, "unknown algorithm"),
    ],
)
def test_issuer_settings_refuse_unsafe_algorithms(issuer: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        IdentitySettings.model_validate(
            {"issuers": [{"issuer": "https://idp.example", "audience": "a", **issuer}]}
        )

"""``pgwarden dev-issuer`` and identity configuration errors of ``pgwarden serve``; the
role-mapping rules on their own."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import jwt
import pytest

from harness import gateway_command, gateway_environment, run_tool, settings_env
from pgwarden.config import IdentitySettings, RoleRule
from pgwarden.identity.claims import TokenIdentity
from pgwarden.identity.grants import Grant
from pgwarden.identity.mapping import MappingRefused, RoleMapper


def test_dev_issuer_serves_keys_that_verify_the_tokens_it_mints(tmp_path: Path) -> None:
    state = tmp_path / "issuer"
    server = subprocess.Popen(
        gateway_command("dev-issuer", "serve", "--state-dir", str(state), "--key-type", "EC"),
        env=gateway_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any("Ctrl-C" in line for line in lines):
            lines.append(server.stdout.readline())
        text = "".join(lines)
        issuer = re.search(r"issuer (http://\S+)", text).group(1)  # type: ignore[union-attr]
        assert f'issuer = "{issuer}"' in text  # the configuration snippet

        minted = run_tool(
            gateway_command(
                "dev-issuer",
                "mint",
                "--state-dir",
                str(state),
                "--subject",
                "alice",
                "--group",
                "analysts",
                "--email",
                "alice@example.com",
                "--ttl",
                "10m",
                "--claim",
                "tier=3",
            ),
            gateway_environment(),
        )
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        keys = jwt.PyJWKClient(f"{issuer}/jwks.json")
        claims = jwt.decode(
            token,
            keys.get_signing_key_from_jwt(token).key,
            algorithms=["ES256"],
            audience="pgwarden",
            issuer=issuer,
        )
        assert claims["sub"] == "alice"
        assert claims["groups"] == ["analysts"]
        assert claims["tier"] == 3
        assert 590 <= claims["exp"] - claims["iat"] <= 600
        with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration") as response:
            assert json.load(response)["jwks_uri"] == f"{issuer}/jwks.json"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    assert server.returncode == 0


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (
            {"roles": [{"name": "analyst", "password_env": "PGW_TEST_UNSET_VARIABLE"}]},
            "PGW_TEST_UNSET_VARIABLE is not set",
        ),
        ({"issuers": [{"issuer": "http://idp.example.com", "audience": "a"}]}, "https"),
        (
            {"rules": [{"groups": ["x"], "roles": ["nobody"]}]},
            "no entry in identity.roles",
        ),
    ],
)
def test_serve_refuses_bad_identity_settings(identity: dict[str, object], message: str) -> None:
    settings = {
        "identity": {
            "issuers": [{"issuer": "https://idp.example.com", "audience": "a"}],
            "roles": [{"name": "analyst", "password": "x"}],
            **identity,
        }
    }
    result = run_tool(
        gateway_command("serve"), gateway_environment(settings_env(settings)), timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --- role mapping --------------------------------------------------------------------------


def who(subject: str = "u1", **claims: object) -> TokenIdentity:
    groups = claims.pop("groups", ())
    email = claims.pop("email", None)
    assert isinstance(email, str | None)
    return TokenIdentity(
        issuer="https://idp.example",
        subject=subject,
        name=None,
        email=email,
        groups=tuple(groups),  # type: ignore[arg-type]
        expires_at=time.time() + 60,
        claims={"sub": subject, **claims},
    )


RULES = [
    RoleRule(name="offboarded", action="deny", emails=["*@contractor.example"]),
    RoleRule(name="dba", groups=["dba"], roles=["readonly", "admin"]),
    RoleRule(
        name="deploys",
        claims={"repository": "acme/app", "ref": ["refs/heads/main", "refs/tags/v*"]},
        roles=["migrator"],
        databases=["app"],
    ),
    RoleRule(name="engineering", groups=["eng"], roles=["readonly"], databases=["app", "rep*"]),
]


def decide(identity: TokenIdentity, database: str = "app", role: str | None = None) -> str:
    return (
        RoleMapper(RULES).decide(identity, database=database, requested_role=role, grants=[]).role
    )


def test_first_match_wins_and_deny_is_explicit() -> None:
    assert decide(who(groups=["dba", "eng"])) == "readonly"
    assert decide(who(groups=["dba", "eng"]), role="admin") == "admin"
    with pytest.raises(MappingRefused, match="access denied by rule 'offboarded'"):
        decide(who(groups=["dba"], email="Bob@Contractor.Example"))
    with pytest.raises(MappingRefused, match="default deny"):
        decide(who(groups=["sales"]))


def test_claims_and_databases() -> None:
    tag = who(repository="acme/app", ref="refs/tags/v1.2")
    assert decide(tag) == "migrator"
    with pytest.raises(MappingRefused, match="database 'other' is not allowed"):
        decide(tag, database="other")
    with pytest.raises(MappingRefused, match="default deny"):
        decide(who(repository="acme/app", ref="refs/heads/feature"))
    assert decide(who(groups=["eng"]), database="reporting") == "readonly"


def test_grants_come_first_and_need_no_rule() -> None:
    grant = Grant(id="g-1", subject="u9", role="admin", expires_at=time.time() + 60)
    mapper = RoleMapper(RULES)
    decision = mapper.decide(who("u9"), database="app", requested_role=None, grants=[grant])
    assert (decision.role, decision.grant) == ("admin", grant)
    decision = mapper.decide(
        who("u9", groups=["eng"]), database="app", requested_role="readonly", grants=[grant]
    )
    assert (decision.role, decision.rule) == ("readonly", "engineering")


def test_identity_settings_example_from_the_docs_loads() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "identity.md").read_text()
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    assert blocks
    for block in blocks:
        document = tomllib.loads(block)
        if "identity" in document and "issuers" in document["identity"]:
            IdentitySettings.model_validate(document["identity"])

"""The ``pgwarden dev-issuer`` and ``pgwarden grants`` commands."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

EXIT_USAGE = 2
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` as seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:]) if text else None
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 2h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


# --- pgwarden dev-issuer ------------------------------------------------------------------


def _claim(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def cmd_dev_issuer_serve(args: argparse.Namespace) -> int:
    from pgwarden.identity.dev_issuer import DevIssuer, SavedIssuer, SigningKey

    state_dir: Path = args.state_dir or Path(tempfile.mkdtemp(prefix="pgwarden-dev-issuer-"))
    key = SavedIssuer.load_key(state_dir) or SigningKey.generate(args.key_type)
    issuer = DevIssuer(host=args.host, port=args.port, audience=args.audience, key=key)
    issuer.save_state(state_dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with issuer:
        print(
            f"""pgwarden dev-issuer: issuer {issuer.issuer}
  discovery {issuer.issuer}/.well-known/openid-configuration
  JWKS      {issuer.jwks_uri} (key {key.kid}, {key.algorithm})
  state     {state_dir}

For the gateway's configuration:

  [[identity.issuers]]
  issuer = "{issuer.issuer}"
  audience = "{args.audience}"
  algorithms = ["{key.algorithm}"]

Mint a token:

  pgwarden dev-issuer mint --state-dir {state_dir} --subject alice --group analysts

Development only: this issuer signs whatever it is asked to.  Ctrl-C to stop.""",
            flush=True,
        )
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def cmd_dev_issuer_mint(args: argparse.Namespace) -> int:
    from pgwarden.identity.dev_issuer import SavedIssuer, mint_token

    try:
        saved = SavedIssuer.load(args.state_dir)
    except (OSError, ValueError, KeyError) as exc:
        print(f"pgwarden dev-issuer: cannot read {args.state_dir}: {exc}", file=sys.stderr)
        return 1
    token = mint_token(
        saved.key,
        issuer=saved.issuer,
        subject=args.subject,
        audience=args.audience or saved.audience,
        groups=args.group,
        email=args.email,
        name=args.name,
        ttl_seconds=args.ttl,
        claims=dict(args.claim),
    )
    print(token)
    return 0


# --- pgwarden grants --------------------------------------------------------------------------


def _load_settings(config: Path | None) -> Any:
    from pgwarden.cli import describe_validation_error
    from pgwarden.config import load_settings

    try:
        settings = load_settings(config)
    except ValidationError as exc:
        raise SystemExit(f"pgwarden: {describe_validation_error(exc)}") from None
    except (SettingsError, OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"pgwarden: cannot read settings: {exc}") from None
    if settings.identity is None or settings.identity.grants_file is None:
        raise SystemExit("pgwarden grants: identity.grants_file is not configured")
    return settings


def _notify(settings: Any) -> str:
    from pgwarden.identity import admin
    from pgwarden.identity.runtime import admin_dir

    directory = admin_dir(settings)
    poll = settings.identity.grants_poll_seconds
    answers = admin.ask_all(directory, {"op": "reload"}) if directory is not None else []
    if not answers:
        return f"no running gateway answered; gateways apply the change within {poll:g} s"
    ended = sum(int(a.get("sessions_ended", 0)) for _, a in answers if a.get("ok"))
    failed = [f"{path.name}: {a.get('error')}" for path, a in answers if not a.get("ok")]
    text = f"{len(answers) - len(failed)} gateway worker(s) updated; {ended} session(s) ended"
    if failed:
        text += f"; not reached: {', '.join(failed)} (they apply it within {poll:g} s)"
    return text


def cmd_grants(args: argparse.Namespace) -> int:
    from pgwarden.identity.grants import Grant, GrantFileError, GrantStore, iso, parse_time

    settings = _load_settings(args.config)
    identity = settings.identity
    store = GrantStore(identity.grants_file)
    try:
        if args.grants_command == "list":
            now = time.time()
            grants = [g for g in store.load() if g.active(now)]
            if args.json:
                print(json.dumps([g.to_json() for g in grants], indent=2))
            for grant in [] if args.json else grants:
                who = f"{grant.issuer} " if grant.issuer else ""
                print(
                    f"{grant.id}  {who}{grant.subject} -> role {grant.role} "
                    f"(databases {', '.join(grant.databases)}) until {iso(grant.expires_at)}"
                    + (f"  # {grant.reason}" if grant.reason else "")
                )
            if not grants and not args.json:
                print("no active grants")
            return 0
        if args.grants_command == "add":
            if identity.role(args.role) is None:
                print(
                    f"pgwarden grants: role {args.role!r} is not in identity.roles "
                    "(the gateway has no credential for it)",
                    file=sys.stderr,
                )
                return EXIT_USAGE
            issuers = [i.issuer for i in identity.issuers]
            if args.issuer is not None and args.issuer not in issuers:
                print(f"pgwarden grants: issuer {args.issuer!r} is not configured", file=sys.stderr)
                return EXIT_USAGE
            if args.until is not None:
                try:
                    expires_at = parse_time(args.until)
                except ValueError:
                    print(f"pgwarden grants: not a time: {args.until!r}", file=sys.stderr)
                    return EXIT_USAGE
            else:
                expires_at = time.time() + args.duration
            if expires_at <= time.time():
                print("pgwarden grants: the grant would already be over", file=sys.stderr)
                return EXIT_USAGE
            grant = store.add(
                Grant(
                    id=Grant.new_id(),
                    issuer=args.issuer,
                    subject=args.subject,
                    role=args.role,
                    databases=tuple(args.database or ["*"]),
                    expires_at=expires_at,
                    reason=args.reason,
                )
            )
            print(
                f"{grant.id}: {grant.subject} may use role {grant.role} until "
                f"{iso(grant.expires_at)}"
            )
            print(_notify(settings))
            return 0
        if args.grants_command == "revoke":
            removed = store.revoke(args.grant_id)
            if removed is None:
                print(f"pgwarden grants: no active grant {args.grant_id}", file=sys.stderr)
                return 1
            print(f"{removed.id} revoked ({removed.subject}, role {removed.role})")
            print(_notify(settings))
            return 0
        if args.grants_command == "sessions":
            from pgwarden.identity import admin
            from pgwarden.identity.runtime import admin_dir

            directory = admin_dir(settings)
            answers = admin.ask_all(directory, {"op": "sessions"}) if directory else []
            print(json.dumps([a for _, a in answers], indent=2))
            return 0
    except GrantFileError as exc:
        print(f"pgwarden grants: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.grants_command)


def add_commands(commands: Any) -> None:
    """Register ``dev-issuer`` and ``grants`` on the ``pgwarden`` sub-command parser."""
    issuer = commands.add_parser(
        "dev-issuer", help="a development OIDC issuer: discovery, JWKS, token minting"
    )
    issuer_commands = issuer.add_subparsers(dest="issuer_command", required=True)
    serve = issuer_commands.add_parser("serve", help="serve discovery and JWKS over HTTP")
    serve.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="port (default: any free one)")
    serve.add_argument("--audience", default="pgwarden", help="audience of minted tokens")
    serve.add_argument("--key-type", choices=["RSA", "EC"], default="RSA")
    serve.add_argument(
        "--state-dir", type=Path, help="keep the key and URL here (for `mint`; default: a temp dir)"
    )
    serve.set_defaults(func=cmd_dev_issuer_serve)
    mint = issuer_commands.add_parser("mint", help="print a token signed by a `serve` issuer")
    mint.add_argument("--state-dir", type=Path, required=True, help="the issuer's state dir")
    mint.add_argument("--subject", required=True, help="the token's sub")
    mint.add_argument("--group", action="append", default=[], help="a group (repeatable)")
    mint.add_argument("--email")
    mint.add_argument("--name")
    mint.add_argument("--audience", help="default: the issuer's")
    mint.add_argument("--ttl", type=parse_duration, default=3600.0, help="lifetime (default 1h)")
    mint.add_argument(
        "--claim", type=_claim, action="append", default=[], help="NAME=VALUE (JSON or text)"
    )
    mint.set_defaults(func=cmd_dev_issuer_mint)

    grants = commands.add_parser("grants", help="time-bound role grants (list, add, revoke)")
    grants.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    grant_commands = grants.add_subparsers(dest="grants_command", required=True)
    listing = grant_commands.add_parser("list", help="active grants")
    listing.add_argument("--json", action="store_true")
    add = grant_commands.add_parser("add", help="let an identity use a role until a time")
    add.add_argument("--subject", required=True, help="the token's sub")
    add.add_argument("--issuer", help="only tokens of this issuer (default: any)")
    add.add_argument("--role", required=True, help="a role listed in identity.roles")
    until = add.add_mutually_exclusive_group(required=True)
    until.add_argument("--for", dest="duration", type=parse_duration, help="e.g. 30m, 2h")
    until.add_argument("--until", help="ISO time, e.g. 2026-01-31T18:00:00Z")
    add.add_argument("--database", action="append", help="allowed database (repeatable)")
    add.add_argument("--reason", help="recorded with the grant")
    revoke = grant_commands.add_parser("revoke", help="revoke a grant; its sessions end")
    revoke.add_argument("grant_id")
    grant_commands.add_parser("sessions", help="live token sessions of the running gateway")
    grants.set_defaults(func=cmd_grants)

"""The ``pgwarden`` command: ``serve`` runs the gateway, ``demo`` runs the local demonstration.

``dev-issuer`` (a development OIDC issuer) and ``grants`` (time-bound role grants) are in
:mod:`pgwarden.identity.commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from pgwarden import __version__

EXIT_CONFIG = 2
log = logging.getLogger("pgwarden")


def _env_name(loc: Sequence[int | str]) -> str:
    parts = [str(p).upper() for p in loc if isinstance(p, str)]
    return "PGWARDEN_" + "__".join(parts)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad field (and how many more there are)."""
    errors = exc.errors()
    if not errors:
        return "invalid settings"
    first = errors[0]
    loc = [p for p in first["loc"] if p != "__root__"]
    message = first["msg"]
    if loc:
        field = ".".join(str(p) for p in loc)
        text = f"invalid setting {field} ({_env_name(loc)}): {message}"
    else:
        text = f"invalid settings: {message}"
    if "input" in first and first["type"] == "extra_forbidden":
        text = f"unknown setting {'.'.join(str(p) for p in loc)}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text


def _type_text(annotation: object) -> str:
    text = str(annotation)
    for module in ("typing.", "pydantic.types.", "pathlib."):
        text = text.replace(module, "")
    return text


def _settings_help(
    model: type[BaseModel], prefix: str = "", env_prefix: str = "PGWARDEN_"
) -> list[str]:
    lines: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        env = f"{env_prefix}{name.upper()}"
        nested = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if nested:
            lines.append(f"{prefix}{name}: {field.description or ''}")
            assert isinstance(annotation, type)
            lines.extend(_settings_help(annotation, f"{prefix}{name}.", f"{env}__"))
            continue
        default: Any = field.get_default(call_default_factory=True)
        shown = "(none)" if default is None else repr(default)
        if field.is_required():
            shown = "(required)"
        type_name = getattr(annotation, "__name__", None) or _type_text(annotation)
        lines.append(f"{prefix}{name}  [{env}]  type {type_name}, default {shown}")
        lines.append(f"    {field.description or ''}")
    return lines


def settings_help() -> str:
    from pgwarden.config import (
        IdentitySettings,
        IssuerSettings,
        RoleRule,
        Settings,
        StaticUser,
        UpstreamRole,
    )

    head = [
        "pgwarden settings: TOML file (--config or PGWARDEN_CONFIG) and PGWARDEN_* variables;",
        "nested fields use '__' (PGWARDEN_UPSTREAM__HOST), lists are JSON",
        '(PGWARDEN_USERS=\'[{"name":"alice","password":"..."}]\').',
        "",
    ]
    users = ["", "each entry of users:", *_settings_help(StaticUser, "users[].", "")]
    identity = [
        "",
        "identity (unset: static users; see docs/identity.md):",
        *_settings_help(IdentitySettings, "identity.", "PGWARDEN_IDENTITY__"),
    ]
    for name, model in (("issuers", IssuerSettings), ("rules", RoleRule), ("roles", UpstreamRole)):
        identity += ["", f"each entry of identity.{name}:"]
        identity += _settings_help(model, f"identity.{name}[].", "")
    return "\n".join([*head, *_settings_help(Settings), *users, *identity])


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def _check_files(settings: Any) -> str | None:
    """Problems with referenced files, found now rather than at the first connection."""
    from pgwarden import tls

    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        try:
            tls.server_context(settings.tls_cert_file, settings.tls_key_file)
        except (OSError, ValueError) as exc:
            return f"invalid setting tls_cert_file/tls_key_file: {exc}"
    try:
        settings.upstream.resolved_password()
    except (OSError, IndexError, UnicodeDecodeError) as exc:
        return f"invalid setting upstream.password_file: {exc}"
    if settings.upstream.tls_ca_file is not None and not settings.upstream.tls_ca_file.is_file():
        return f"invalid setting upstream.tls_ca_file: no such file {settings.upstream.tls_ca_file}"
    if settings.policy_file is not None:
        from pgwarden.policy.rules import PolicyError, load_policy

        try:
            load_policy(settings.policy_file)
        except PolicyError as exc:
            return f"invalid setting policy_file: {exc}"
    if settings.identity is not None:
        from pgwarden.identity.runtime import check_identity_settings

        return check_identity_settings(settings.identity)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.help_settings:
        print(settings_help())
        return 0
    from pgwarden.config import load_settings

    try:
        settings = load_settings(args.config)
    except ValidationError as exc:
        print(f"pgwarden: {describe_validation_error(exc)}", file=sys.stderr)
        return EXIT_CONFIG
    except SettingsError as exc:
        print(f"pgwarden: invalid settings: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except tomllib.TOMLDecodeError as exc:
        source = args.config or os.environ.get("PGWARDEN_CONFIG", "config file")
        print(f"pgwarden: invalid TOML in {source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"pgwarden: cannot read config file: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    problem = _check_files(settings)
    if problem is not None:
        print(f"pgwarden: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(settings.log_level)
    from pgwarden import server

    shipper = _start_audit_shipper(settings)
    try:
        return server.run(settings)
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        return 1
    finally:
        if shipper is not None:
            shipper.stop()


def _start_audit_shipper(settings: Any) -> Any:
    """The audit shipper child of ``serve`` (None when audit is off or shipped apart)."""
    audit = settings.audit
    if audit.directory is None:
        log.warning("audit is off (audit.directory is not set): statements are not recorded")
        return None
    if not audit.start_shipper:
        log.info("audit: the shipper runs apart (audit.start_shipper = false)")
        return None
    from pgwarden.audit.supervisor import ShipperSupervisor

    shipper = ShipperSupervisor()
    shipper.start()
    return shipper


def cmd_demo(args: argparse.Namespace) -> int:
    from pgwarden.demo import run_demo  # type: ignore[import-not-found, unused-ignore]

    _configure_logging("info")
    result = run_demo(args)
    return int(result) if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgwarden",
        description="Identity-aware, auditing Layer-7 gateway for PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"pgwarden {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    serve.add_argument(
        "--help-settings", action="store_true", help="describe every setting and exit"
    )
    serve.set_defaults(func=cmd_serve)
    demo = commands.add_parser(
        "demo", help="start a throwaway PostgreSQL and a gateway in front of it"
    )
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="gateway port (default 6432, or a free port when 6432 is taken; 0: any free port)",
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's data directory on exit")
    demo.set_defaults(func=cmd_demo)
    from pgwarden.identity.commands import add_commands as add_identity_commands

    add_identity_commands(commands)
    from pgwarden.audit.commands import add_commands as add_audit_commands

    add_audit_commands(commands)
    from pgwarden.policy.commands import add_commands as add_policy_commands

    add_policy_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

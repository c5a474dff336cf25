"""``pgwarden policy check``: a policy file checked, and statements decided by it, without a
gateway (to write and review a policy before a SIGHUP puts it in force)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pgwarden.policy.mask_check import MaskScope
    from pgwarden.policy.rules import Mask

EXIT_CONFIG: Final = 2


def cmd_check(args: argparse.Namespace) -> int:
    from pgwarden.policy.analysis import analyse
    from pgwarden.policy.engine import PolicyEngine
    from pgwarden.policy.mask_check import refusal_reason
    from pgwarden.policy.rules import PolicyError, load_policy, masks_applying

    try:
        loaded = load_policy(args.policy)
    except PolicyError as exc:
        print(f"pgwarden: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    policy = loaded.policy
    print(
        f"{args.policy}: policy {loaded.version}, {len(policy.rule)} rules, "
        f"{len(policy.mask)} masks, default {policy.default}"
    )
    statements = list(args.command or [])
    if not statements and not sys.stdin.isatty():
        statements = [line.strip() for line in sys.stdin if line.strip()]
    engine = PolicyEngine(loaded)
    rules = engine.rules_for(args.user or "", tuple(args.group or ()), args.role or "")
    who = f"user {args.user or '-'}, groups {', '.join(args.group or ()) or '-'}, "
    who += f"role {args.role or '-'}"
    masks = list(
        masks_applying(policy.mask, args.user or "", tuple(args.group or ()), args.role or "")
    )
    if statements:
        names = ", ".join(r.name for r in rules.rules) or "none"
        print(f"rules for {who}: {names}")
        # The built-in masks (statistics and activity views) by name only.
        masked = (
            "; ".join(
                m.name if m.name.startswith("(") else f"{m.name} ({', '.join(m.columns)})"
                for m in masks
            )
            or "none"
        )
        print(f"masks for {who}: {masked}")
    # Without a database, the masked tables are known by the names the policy gives
    # (views reading them are found by a gateway; `table.*` counts every column name).
    scope = _scope(masks)
    refused = 0
    for sql in statements:
        decision = engine.decide(rules, sql)
        kinds = ", ".join(s.kind for s in analyse(sql).statements) or "unparsable"
        if decision.allowed:
            reason = refusal_reason(sql, scope) if scope else None
            if reason is None:
                print(f"allow  [{kinds}] {sql}")
                continue
            refused += 1
            print(f"deny   [{kinds}] {sql}\n       42501 (masking): {reason}")
            continue
        refused += 1
        by = f'rule "{decision.rule}"' if decision.rule else "default"
        if not decision.kind:
            by = "unparsable"
        print(f"deny   [{kinds}] {sql}\n       {decision.sqlstate} ({by}): {decision.message}")
    return 1 if refused else 0


def _scope(masks: list[Mask]) -> MaskScope:
    from pgwarden.policy.mask_catalog import named_columns
    from pgwarden.policy.mask_check import MaskScope

    named = named_columns(masks)
    return MaskScope({k: frozenset(v) for k, v in named.items()}, frozenset())


def add_commands(commands: Any) -> None:
    """Register ``policy check`` on the CLI's subparsers."""
    policy = commands.add_parser("policy", help="statement policy: check a policy file")
    sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="check a policy file and decide statements with it (status 1 if one is "
        "refused, 2 if the file cannot be used)",
    )
    check.add_argument("policy", type=Path, help="the policy file (TOML)")
    check.add_argument(
        "-c",
        "--command",
        action="append",
        metavar="SQL",
        help="a statement text to decide (repeatable; else one per line of standard input)",
    )
    check.add_argument("--user", help="identity name of the session")
    check.add_argument(
        "--group", action="append", help="identity group of the session (repeatable)"
    )
    check.add_argument("--role", help="PostgreSQL role the session logs in as")
    check.set_defaults(func=cmd_check)

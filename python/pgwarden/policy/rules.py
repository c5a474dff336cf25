"""The statement policy file: its model, its loading and its version.

A TOML file (``policy_file``), read whole at start and at SIGHUP::

    default = "deny"              # the verdict when no rule matches: "allow" or "deny"
    version = "2026-11-27.1"      # optional; else the file's SHA-256 (12 hex digits)

    [[rule]]
    name = "no server files"
    functions = ["pg_read_file", "pg_ls_dir", "lo_export"]
    action = "deny"

    [[rule]]
    name = "agents read the shop"
    groups = ["agents"]           # who: users / groups / roles (each given list must match)
    statements = ["read", "transaction", "session"]
    tables = ["shop.*"]
    action = "allow"

Rules are tried in file order; the first one that matches a statement decides it
(docs/policy.md has the matching rules).  Anything wrong in the file is a
:class:`PolicyError` that names the file and the field.
"""

from __future__ import annotations

import hashlib
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pgwarden.policy.analysis import CLASSES, Statement
from pgwarden.policy.names import format_column, parse_column

ANY: Final = "any"
_MAX_TEXT: Final = 200


class PolicyError(Exception):
    """A policy file that cannot be used (unreadable, not TOML, or not a valid policy)."""


def _plain_text(value: str, what: str) -> str:
    """Names and messages end up in the error the client sees (inside the SQL the gateway
    has the server raise): printable ASCII, and short."""
    if not value or len(value) > _MAX_TEXT:
        raise ValueError(f"{what} must be 1 to {_MAX_TEXT} characters")
    if not all(" " <= ch <= "~" for ch in value) or "$" in value:
        raise ValueError(f"{what} must be printable ASCII without '$'")
    return value


class Subjects(BaseModel):
    """Who a rule or a mask applies to: each list given must match."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    users: tuple[str, ...] | None = Field(
        default=None, description="Identity names (glob patterns); unset: anyone."
    )
    groups: tuple[str, ...] | None = Field(
        default=None,
        description="Identity groups (the token's roles/groups, glob patterns); unset: any.",
    )
    roles: tuple[str, ...] | None = Field(
        default=None,
        description="PostgreSQL roles the session logs in as (glob patterns); unset: any.",
    )

    def applies_to(self, user: str, groups: tuple[str, ...], role: str) -> bool:
        """Whether this is about the subject (identity name, groups, upstream role)."""
        if self.users is not None and not any(fnmatchcase(user, p) for p in self.users):
            return False
        if self.groups is not None and not any(
            fnmatchcase(g, p) for g in groups for p in self.groups
        ):
            return False
        return self.roles is None or any(fnmatchcase(role, p) for p in self.roles)


class Named(Subjects):
    """A rule or a mask: its name, and who it applies to."""

    name: str = Field(
        description="Shown in the error of a statement a rule refuses, logged, and recorded."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _plain_text(value, "name")


class Rule(Named):
    """One rule: who it applies to, which statements it matches, and the verdict."""

    action: Literal["allow", "deny"] = Field(description="The verdict when the rule matches.")
    statements: tuple[str, ...] = Field(
        default=(ANY,),
        description=f"Statement classes: {', '.join(CLASSES)}, or 'any' (the default).",
    )
    tables: tuple[str, ...] | None = Field(
        default=None,
        description="Relations, 'schema.name' glob patterns ('shop.*') over the catalog's "
        "names, unquoted; unset: whatever the statement names. A deny rule matches when any "
        "relation matches (in any letter case), an allow rule when every one does (exactly).",
    )
    functions: tuple[str, ...] | None = Field(
        default=None,
        description="Functions called, by name without schema (glob patterns); unset: "
        "whatever is called. A deny rule matches when any call matches (in any letter case), "
        "an allow rule when every one does (exactly).",
    )
    message: str | None = Field(
        default=None, description="A hint added to the error of a statement this rule refuses."
    )

    @field_validator("tables")
    @classmethod
    def _tables(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if '"' in pattern or not pattern:
                raise ValueError(
                    f"{pattern!r}: table patterns are globs over names as the catalog "
                    'stores them, without quotes (public.Customer for public."Customer")'
                )
        return value

    @field_validator("functions")
    @classmethod
    def _functions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if '"' in pattern or "." in pattern or not pattern:
                # A call is known by its last name only (an unqualified one resolves through
                # the caller's search_path): a schema in the pattern would never match.
                raise ValueError(
                    f"{pattern!r}: function patterns are globs over a function's name, "
                    "without schema or quotes (pg_read_file, not pg_catalog.pg_read_file)"
                )
        return value

    @field_validator("message")
    @classmethod
    def _message(cls, value: str | None) -> str | None:
        return None if value is None else _plain_text(value, "message")

    @field_validator("statements")
    @classmethod
    def _statements(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [v for v in value if v not in (*CLASSES, ANY)]
        if unknown or not value:
            raise ValueError(
                f"unknown statement class {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"known: {', '.join((*CLASSES, ANY))}"
            )
        return value

    def matches(self, statement: Statement) -> bool:
        """Whether the rule decides ``statement`` (its subject already checked)."""
        if ANY not in self.statements and statement.kind not in self.statements:
            return False
        every = self.action == "allow"  # an allow rule must cover all the statement does
        if self.tables is not None and not _covered(
            [
                any(table_matches(t, p, deny=not every) for p in self.tables)
                for t in statement.tables
            ],
            every,
        ):
            return False
        return self.functions is None or _covered(
            [
                any(function_matches(f, p, deny=not every) for p in self.functions)
                for f in statement.functions
            ],
            every,
        )


def _covered(hits: list[bool], every: bool) -> bool:
    """An allow rule needs every relation (or call) matched, a deny rule any one."""
    return all(hits) if every else any(hits)


def function_matches(function: str, pattern: str, *, deny: bool) -> bool:
    """Whether a function the statement calls (its name as the catalog has it: unquoted
    names folded to lower case) matches a pattern: exactly for an allow rule, whatever the
    letter case for a deny rule (``PG_READ_FILE`` in a deny rule refuses pg_read_file)."""
    if deny:
        return fnmatchcase(function.lower(), pattern.lower())
    return fnmatchcase(function, pattern)


def table_matches(table: str, pattern: str, *, deny: bool) -> bool:
    """Whether a relation the statement names matches a ``schema.name`` pattern (a pattern
    without a schema is ``*.name``).  Names are the catalog's (unquoted names folded to
    lower case, quoted ones as written): an allow pattern matches them exactly, a deny
    pattern whatever their case.

    A name without a schema resolves through the session's ``search_path``, which the
    caller controls (and ``pg_catalog`` comes first): for a deny rule it matches on its name
    alone, whatever the pattern's schema; for an allow rule only patterns of any schema
    (``*.name``, ``name``) match it.  A dropped schema (``schema.*``) matches a deny pattern
    of that schema, and only an allow pattern covering the whole schema.
    """
    if deny:
        # Whether ``HR.Payroll`` means hr.payroll (an unquoted name, folded) or
        # "HR"."Payroll" is not for a deny rule to guess: it refuses both.
        table, pattern = table.lower(), pattern.lower()
    schema, _, name = table.rpartition(".")
    p_schema, dot, p_name = pattern.rpartition(".")
    if not dot:
        p_schema = "*"
    if name == "*":  # a whole schema
        return fnmatchcase(schema, p_schema) and (deny or p_name == "*")
    if not schema:
        return fnmatchcase(name, p_name) and (deny or p_schema == "*")
    return fnmatchcase(schema, p_schema) and fnmatchcase(name, p_name)


def _column_name(value: str) -> str:
    """``schema.table.column`` (``column`` may be ``*``) in SQL syntax, written back in its
    canonical form (unquoted names folded to lower case, others quoted)."""
    return format_column(parse_column(value))


class Mask(Named):
    """Columns whose values the subjects it applies to see masked."""

    columns: tuple[str, ...] = Field(
        description="'schema.table.column' ('schema.table.*' for every column), in SQL "
        "syntax: unquoted names fold to lower case, double-quoted ones keep their case.",
        min_length=1,
    )
    style: Literal["redact", "partial", "null"] = Field(
        default="redact",
        description="'redact': text columns show `replacement`, others NULL; 'partial': text "
        "columns show `replacement` and the value's last `keep_last` characters, others "
        "NULL; 'null': NULL.",
    )
    replacement: str = Field(default="****", description="The text a redacted text value shows.")
    keep_last: int = Field(
        default=4, ge=1, le=16, description="Characters a 'partial' mask leaves at the end."
    )
    trusted_functions: tuple[str, ...] = Field(
        default=(),
        description="Functions and procedures defined in the database ('schema.name' glob "
        "patterns, as the catalog names them) that sessions with this mask may call. Any "
        "other such function is refused to them: its body may read masked columns and "
        "return them without an origin.",
    )

    @field_validator("trusted_functions")
    @classmethod
    def _trusted(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if '"' in pattern or "." not in pattern:
                raise ValueError(
                    f"{pattern!r}: trusted functions are 'schema.name' glob patterns over "
                    "the catalog's names, without quotes"
                )
        return value

    @field_validator("columns")
    @classmethod
    def _columns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_column_name(v) for v in value)

    @field_validator("replacement")
    @classmethod
    def _replacement(cls, value: str) -> str:
        if len(value.encode()) > _MAX_TEXT:
            raise ValueError(f"replacement must be at most {_MAX_TEXT} bytes")
        return value


#: PostgreSQL's statistics views show sample values of the columns the session may read
#: (most common values, histogram bounds): enough to read a masked column's values.  A
#: session with any mask sees these columns masked too (NULL), and cannot compute with them.
STATISTICS_MASK: Final = Mask(
    name="(statistics)",
    style="null",
    columns=(
        "pg_catalog.pg_stats.most_common_vals",
        "pg_catalog.pg_stats.histogram_bounds",
        "pg_catalog.pg_stats.most_common_elems",
        "pg_catalog.pg_stats_ext.most_common_vals",
        "pg_catalog.pg_stats_ext_exprs.most_common_vals",
        "pg_catalog.pg_stats_ext_exprs.histogram_bounds",
        "pg_catalog.pg_stats_ext_exprs.most_common_elems",
    ),
)
#: pg_stat_activity shows the statements other sessions of the same role run, with their
#: literals (``... WHERE email = 'ada@example.com'``); so does the pg_stat_statements
#: extension's view for utility statements (``CREATE TABLE ... AS``, ``DO``), which it
#: keeps unnormalised (in the schema it is usually installed in).
ACTIVITY_MASK: Final = Mask(
    name="(activity)",
    style="null",
    columns=("pg_catalog.pg_stat_activity.query", "public.pg_stat_statements.query"),
)


def masks_applying(
    masks: tuple[Mask, ...], user: str, groups: tuple[str, ...], role: str
) -> tuple[Mask, ...]:
    """The masks of a policy that apply to a subject, with :data:`STATISTICS_MASK` and
    :data:`ACTIVITY_MASK` when there is one (a session without masks sees the statistics
    and the activity as they are)."""
    picked = tuple(m for m in masks if m.applies_to(user, groups, role))
    return (*picked, STATISTICS_MASK, ACTIVITY_MASK) if picked else ()


class Policy(BaseModel):
    """A whole policy file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Literal["allow", "deny"] = Field(
        default="deny", description="The verdict for a statement no rule matches."
    )
    version: str | None = Field(
        default=None,
        description="Recorded with each refusal; unset: the file's SHA-256 (12 hex digits).",
    )
    rule: tuple[Rule, ...] = Field(default=(), description="The rules, tried in order.")
    mask: tuple[Mask, ...] = Field(default=(), description="Masked columns, and for whom.")

    @field_validator("version")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        return None if value is None else _plain_text(value, "version")


class LoadedPolicy:
    """A policy as read from its file, with its version."""

    def __init__(self, policy: Policy, version: str, path: Path | None = None) -> None:
        self.policy = policy
        self.version = version
        self.path = path


def parse_policy(data: bytes, source: str = "policy") -> LoadedPolicy:
    """A policy from the bytes of a policy file."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source}: not UTF-8 ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source}: invalid TOML: {exc}") from None
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PolicyError(f"{source}: invalid policy: {problems}") from None
    names = [r.name for r in policy.rule] + [m.name for m in policy.mask]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PolicyError(f"{source}: rule and mask names must be unique: {', '.join(duplicates)}")
    version = policy.version or hashlib.sha256(data).hexdigest()[:12]
    return LoadedPolicy(policy, version)


def load_policy(path: Path) -> LoadedPolicy:
    """The policy in ``path``; :class:`PolicyError` when it cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
    loaded = parse_policy(data, str(path))
    loaded.path = path
    return loaded

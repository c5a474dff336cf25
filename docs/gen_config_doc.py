"""Generate docs/configuration.md and deploy/pgwarden.example.toml from the settings model.

    python docs/gen_config_doc.py            # rewrite both files
    python docs/gen_config_doc.py --check    # exit 1 if out of date or an example is invalid

The field descriptions in ``pgwarden.config`` are the single source of the settings'
documentation; this script only lays them out: one table per TOML table for the
reference, every setting commented out at its default for the example file.  Nested
models become TOML tables (``[upstream]``), lists of models arrays of tables
(``[[identity.issuers]]``).  ``--check`` also validates the configuration examples shipped
elsewhere (the Kubernetes ConfigMap, the example in configuration.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "python"))

from pgwarden.config import Settings  # noqa: E402

CONFIG_DOC = REPO_ROOT / "docs" / "configuration.md"
EXAMPLE_TOML = REPO_ROOT / "deploy" / "pgwarden.example.toml"
K8S_CONFIGMAP = REPO_ROOT / "deploy" / "kubernetes" / "configmap.yaml"
GENERATE_COMMAND = "python docs/gen_config_doc.py"
ENV_PREFIX = "PGWARDEN_"
NESTED = "__"

#: Values shown in the example file for settings that have no default, or whose default is
#: "unset" (TOML has no null).  Keyed by dotted path; list items use the list's path.
EXAMPLES: dict[str, str] = {
    "tls_cert_file": '"/etc/pgwarden/tls/tls.crt"',
    "tls_key_file": '"/etc/pgwarden/tls/tls.key"',
    "statement_log": '"/var/log/pgwarden/statements.jsonl"',
    "runtime_dir": '"/run/pgwarden"',
    "upstream.database": '"app"',
    "upstream.password": '"change-me"',
    "upstream.password_file": '"/run/secrets/pgwarden-upstream-password"',
    "upstream.tls_ca_file": '"/etc/pgwarden/upstream-ca.crt"',
    "users.name": '"alice"',
    "users.password": '"change-me"',
    "identity.issuers.issuer": '"https://login.example.com"',
    "identity.issuers.audience": '["pgwarden"]',
    "identity.issuers.discovery_url": (
        '"https://login.example.com/.well-known/openid-configuration"'
    ),
    "identity.issuers.jwks_uri": '"https://login.example.com/jwks"',
    "identity.issuers.hs_secret": '"change-me"',
    "identity.issuers.hs_secret_file": '"/run/secrets/pgwarden-hs-secret"',
    "identity.issuers.ca_file": '"/etc/pgwarden/idp-ca.crt"',
    "identity.rules.name": '"data-team-read-only"',
    "identity.rules.issuer": '"https://login.example.com"',
    "identity.roles.name": '"app_readonly"',
    "identity.roles.password": '"change-me"',
    "identity.roles.password_file": '"/run/secrets/app-readonly-password"',
    "identity.roles.password_env": '"APP_READONLY_PASSWORD"',
    "identity.grants_file": '"/var/lib/pgwarden/grants.json"',
    "identity.admin_dir": '"/run/pgwarden/admin"',
    "audit.directory": '"/var/lib/pgwarden/audit"',
    "audit.chain_key": '"change-me"',
    "audit.chain_key_file": '"/run/secrets/pgwarden-chain-key"',
    "audit.endpoint": '"http://otel-collector:4318"',
    "audit.certificate_file": '"/etc/pgwarden/otlp-ca.crt"',
    "audit.client_certificate_file": '"/etc/pgwarden/otlp-client.crt"',
    "audit.client_key_file": '"/etc/pgwarden/otlp-client.key"',
    "audit.export_path": '"/var/lib/pgwarden/audit-export.jsonl"',
    "audit.service_instance_id": '"gateway-1"',
}


# --- walking the model ---------------------------------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model class of ``Model`` or ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        if len(models) == 1 and type(None) in typing.get_args(annotation):
            return models[0]
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The item model class of ``list[Model]``."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item
    return None


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]
    info: FieldInfo
    env: str | None  # None inside array items: the whole array is one variable

    @property
    def key(self) -> str:
        return ".".join(self.path)


@dataclass
class Section:
    """One TOML table: its path, the model it holds, and its plain settings."""

    path: tuple[str, ...]
    model: type[BaseModel]
    array: bool = False
    optional: bool = False
    description: str = ""
    settings: list[Setting] = field(default_factory=list)

    @property
    def header(self) -> str:
        name = ".".join(self.path)
        return f"[[{name}]]" if self.array else f"[{name}]"


def sections_of(
    model: type[BaseModel],
    path: tuple[str, ...] = (),
    *,
    env_prefix: str | None = ENV_PREFIX,
    array: bool = False,
    optional: bool = False,
    description: str = "",
) -> Iterator[Section]:
    """The table for ``model`` first, then its sub-tables, depth first."""
    section = Section(path, model, array, optional, description)
    children: list[Section] = []
    for name, info in model.model_fields.items():
        child_path = (*path, name)
        child_env = env_prefix + name.upper() if env_prefix is not None else None
        nested = _model_of(info.annotation)
        item = _list_item_model(info.annotation)
        if nested is not None:
            children.extend(
                sections_of(
                    nested,
                    child_path,
                    env_prefix=child_env + NESTED if child_env is not None else None,
                    optional=info.annotation is not nested,
                    description=info.description or "",
                )
            )
        elif item is not None:
            section.settings.append(Setting(child_path, info, child_env))
            children.extend(
                sections_of(
                    item,
                    child_path,
                    env_prefix=None,
                    array=True,
                    description=info.description or "",
                )
            )
        else:
            section.settings.append(Setting(child_path, info, child_env))
    yield section
    yield from children


def all_sections() -> list[Section]:
    return list(sections_of(Settings))


# --- rendering values ----------------------------------------------------------------------


def type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"table of {type_name(args[1])}"
    if annotation is type(None):
        return "unset"
    if annotation is SecretStr:
        return "secret string"
    if annotation is Path:
        return "path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "tables"
    return getattr(annotation, "__name__", str(annotation))


def default_of(info: FieldInfo) -> Any:
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default


def constraints(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for attribute, symbol in (
            ("ge", "≥"),
            ("gt", ">"),
            ("le", "≤"),
            ("lt", "<"),
            ("min_length", "at least"),
        ):
            value = getattr(item, attribute, None)
            if value is not None:
                shown = f"{value:,}" if isinstance(value, int) else str(value)
                words.append(f"{symbol} {shown}")
    return ", ".join(words)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Path | str):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + (f" {inner} " if inner else "") + "}"
    if isinstance(value, BaseModel):
        return toml_value(value.model_dump(mode="json"))
    raise TypeError(f"no TOML form for {value!r}")


def markdown_default(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 100_000:
        return f"`{value}` ({value:,})"
    return f"`{toml_value(value)}`"


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


# --- configuration.md ------------------------------------------------------------------------


MARKDOWN_HEAD = """\
# Configuration reference

<!-- Generated by docs/gen_config_doc.py from python/pgwarden/config.py; edit the field
descriptions there, then run the script. -->

pgwarden reads one settings model from, highest precedence first:

1. environment variables `PGWARDEN_<NAME>`; nested settings use `__`, as in
   `PGWARDEN_UPSTREAM__HOST`; lists and tables are JSON, as in
   `PGWARDEN_USERS='[{"name": "alice", "password": "..."}]'`;
2. the TOML file given by `pgwarden serve --config FILE` (or `PGWARDEN_CONFIG`);
3. the defaults below.

An unknown key in the TOML file is an error, and so is a `PGWARDEN_*` environment variable
that names no setting (the error names the closest one: `PGWARDEN_AUDIT_DIRECTORY`, with
one underscore, would otherwise leave audit off without a word), so a misspelt setting
stops the gateway at start-up. `PGWARDEN_CONFIG` (the file) and `PGWARDEN_PG_BINDIR` (the
PostgreSQL the tests and the demo start) are the only other `PGWARDEN_*` names read.
`pgwarden serve --help-settings` lists every variable.
`deploy/pgwarden.example.toml` lists every setting at its default. Secrets (passwords,
keys) are better kept out of the TOML file: use the `*_file` settings or the environment.
"""

MARKDOWN_EXAMPLE = """\
## Example

```toml
listen_host = "0.0.0.0"
listen_port = 6432
workers = 2
tls_cert_file = "/etc/pgwarden/tls/tls.crt"
tls_key_file = "/etc/pgwarden/tls/tls.key"
require_client_tls = true
statement_log = "-"

[upstream]
host = "db.internal"
user = "pgwarden"
password_file = "/run/secrets/pgwarden-upstream-password"
tls = "verify-full"

[[users]]
name = "ci"
password = "change-me"
```

The same with environment variables only:

```sh
PGWARDEN_LISTEN_HOST=0.0.0.0 PGWARDEN_WORKERS=2 \\
PGWARDEN_TLS_CERT_FILE=/etc/pgwarden/tls/tls.crt PGWARDEN_TLS_KEY_FILE=/etc/pgwarden/tls/tls.key \\
PGWARDEN_UPSTREAM__HOST=db.internal PGWARDEN_UPSTREAM__USER=pgwarden \\
PGWARDEN_UPSTREAM__PASSWORD_FILE=/run/secrets/pgwarden-upstream-password \\
PGWARDEN_USERS='[{"name": "ci", "password": "change-me"}]' \\
pgwarden serve
```
"""


def render_markdown() -> str:
    lines = [MARKDOWN_HEAD]
    for section in all_sections():
        if not section.path:
            lines += ["## Gateway (top level)", "", "Top-level keys of the TOML file.", ""]
        else:
            title = f"## `{section.header}`"
            lines += [title, ""]
            intro = section.description or _doc(section.model)
            if section.array:
                intro += (
                    f" Each `{section.header}` table has the keys below; in the environment "
                    "the whole list is one JSON value."
                )
            elif section.optional:
                intro += " Optional: leave the table out to turn this off."
            lines += [intro.strip(), ""]
        lines += [
            "| Setting | Environment variable | Type | Default | Description |",
            "|---|---|---|---|---|",
        ]
        for setting in section.settings:
            kind = type_name(setting.info.annotation)
            limit = constraints(setting.info)
            if limit:
                kind += f" ({limit})"
            key = setting.path[-1] if section.array else setting.key
            env = f"`{setting.env}`" if setting.env else "—"
            lines.append(
                f"| `{key}` | {env} | {escape_cell(kind)} | "
                f"{escape_cell(markdown_default(default_of(setting.info)))} | "
                f"{escape_cell(setting.info.description or '')} |"
            )
        lines.append("")
    lines.append(MARKDOWN_EXAMPLE)
    return "\n".join(lines).rstrip() + "\n"


# --- pgwarden.example.toml -------------------------------------------------------------------


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=90, initial_indent="# ", subsequent_indent="# ") or ["#"]


def _example_line(setting: Setting, section: Section) -> list[str]:
    out = _comment(setting.info.description or "")
    if setting.env is not None:
        out.append(f"#   env: {setting.env}")
    key = setting.path[-1]
    value = default_of(setting.info)
    if _list_item_model(setting.info.annotation) is not None:
        out.append(f"#   (see the [[{setting.key}]] tables below; default: none)")
    elif value is PydanticUndefined:
        out.append(f"# {key} = {EXAMPLES.get(_example_key(setting), '...')}  # required")
    elif value is None:
        example = EXAMPLES.get(_example_key(setting), '"..."')
        out.append(f"# {key} = {example}  # unset by default")
    else:
        out.append(f"# {key} = {toml_value(value)}")
    out.append("")
    return out


def _example_key(setting: Setting) -> str:
    return ".".join(setting.path)


def render_example_toml() -> str:
    lines = [
        "# pgwarden configuration: every setting, at its default, with its description.",
        f"# Generated by {GENERATE_COMMAND} from python/pgwarden/config.py.",
        "#",
        "#   pgwarden serve --config pgwarden.toml",
        "#",
        "# Environment variables override this file: PGWARDEN_<NAME>, nested with __",
        "# (PGWARDEN_UPSTREAM__HOST). Uncomment what you change; see docs/configuration.md.",
        "# Tables marked optional are commented out whole: uncomment the header too.",
        "",
    ]
    optional_prefixes: list[tuple[str, ...]] = []
    for section in all_sections():
        inside_optional = any(section.path[: len(p)] == p for p in optional_prefixes)
        if section.path:
            intro = _comment(section.description or _doc(section.model))
            header = section.header
            if section.optional:
                optional_prefixes.append(section.path)
            commented = section.array or section.optional or inside_optional
            if section.optional:
                intro.append("# (optional table)")
            lines += ["# " + "-" * 88, *intro, ("# " if commented else "") + header, ""]
        lines += [line for s in section.settings for line in _example_line(s, section)]
    return "\n".join(lines).rstrip() + "\n"


# --- checks ---------------------------------------------------------------------------------


def configmap_toml(text: str) -> str:
    """The `pgwarden.toml: |` block of the Kubernetes ConfigMap, dedented."""
    match = re.search(r"pgwarden\.toml: \|\n((?:    .*\n|\n)+)", text)
    if match is None:
        raise ValueError(f"no pgwarden.toml block in {K8S_CONFIGMAP}")
    return textwrap.dedent(match.group(1))


def markdown_toml_blocks(text: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)


def check_shipped_examples(markdown: str) -> list[str]:
    """Configuration examples that do not validate against the model."""
    problems = []
    examples = {f"{CONFIG_DOC.name} example": block for block in markdown_toml_blocks(markdown)}
    if K8S_CONFIGMAP.exists():
        examples[str(K8S_CONFIGMAP.relative_to(REPO_ROOT))] = configmap_toml(
            K8S_CONFIGMAP.read_text(encoding="utf-8")
        )
    for name, text in examples.items():
        try:
            Settings.model_validate(tomllib.loads(text))
        except Exception as exc:
            problems.append(f"{name} is not a valid configuration: {exc}")
    # The example file itself must at least be valid TOML (every line is a comment or a
    # table header of a required table).
    tomllib.loads(render_example_toml())
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if a file is out of date")
    args = parser.parse_args()
    outputs = {CONFIG_DOC: render_markdown(), EXAMPLE_TOML: render_example_toml()}
    if args.check:
        failed = False
        for path, text in outputs.items():
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"{path.relative_to(REPO_ROOT)} is out of date: run {GENERATE_COMMAND}")
                failed = True
        for problem in check_shipped_examples(outputs[CONFIG_DOC]):
            print(problem)
            failed = True
        return 1 if failed else 0
    for path, text in outputs.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

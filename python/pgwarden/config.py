"""The gateway's settings: one pydantic-settings model, from a TOML file and ``PGWARDEN_*``.

Precedence (highest first): keyword arguments, environment variables
(``PGWARDEN_LISTEN_PORT=6432``, nested with ``__`` as in ``PGWARDEN_UPSTREAM__HOST``),
the TOML file named by ``--config`` or ``PGWARDEN_CONFIG``, then the defaults below.
Every field's description is the documentation: ``pgwarden serve --help-settings``
prints them and docs/configuration.md is generated from the same text.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024 * 1024 - 1


class StaticUser(BaseModel):
    """A client login accepted by the static authenticator."""

    name: str = Field(description="User name the client sends in its startup packet.")
    password: SecretStr = Field(description="Password the client must present.")


class UpstreamSettings(BaseModel):
    """Where and as whom the gateway connects to PostgreSQL."""

    host: str = Field(
        default="127.0.0.1", description="PostgreSQL host name, address or unix socket dir."
    )
    port: int = Field(default=5432, ge=1, le=65535, description="PostgreSQL port.")
    database: str | None = Field(
        default=None,
        description="Database to open upstream; default: the one the client asked for.",
    )
    user: str = Field(
        default="postgres",
        description="Role the gateway logs in as. The client never sees this credential.",
    )
    password: SecretStr | None = Field(
        default=None, description="Password for `user` (SCRAM-SHA-256, md5 or cleartext, as asked)."
    )
    password_file: Path | None = Field(
        default=None,
        description="File holding the password for `user` (first line); wins over `password`.",
    )
    tls: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer",
        description="TLS to PostgreSQL, with libpq's sslmode meanings.",
    )
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle for verify-ca / verify-full (default: system store)."
    )
    connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time allowed to connect and authenticate upstream."
    )

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0]
        return self.password.get_secret_value() if self.password is not None else None


class Settings(BaseSettings):
    """Everything ``pgwarden serve`` reads."""

    model_config = SettingsConfigDict(
        env_prefix="PGWARDEN_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    listen_host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    listen_port: int = Field(
        default=6432, ge=0, le=65535, description="Port the gateway listens on."
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Worker processes sharing the port (SO_REUSEPORT); one core each.",
    )
    upstream: UpstreamSettings = Field(
        default_factory=UpstreamSettings,
        description="The PostgreSQL server behind the gateway.",
    )
    users: list[StaticUser] = Field(
        default_factory=list,
        description="Static client logins (replaced by OIDC identity later). Empty: refuse all.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain offered to clients (SSLRequest and direct TLS).",
    )
    tls_key_file: Path | None = Field(
        default=None, description="PEM private key for `tls_cert_file`."
    )
    require_client_tls: bool = Field(
        default=False, description="Refuse clients that do not use TLS (FATAL 28000)."
    )
    max_startup_bytes: int = Field(
        default=10000, ge=64, description="Largest startup packet accepted from a client."
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="Largest protocol message accepted in either direction (bytes).",
    )
    statement_log: str | None = Field(
        default=None,
        description="JSON-lines sink for per-statement events: a file path, '-' for stdout, "
        "or unset for none.",
    )
    statement_log_max_param_bytes: int = Field(
        default=1024,
        ge=0,
        description="Bind parameter values longer than this are truncated in the log.",
    )
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: stop accepting, let sessions finish for this long, then close.",
    )
    startup_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Time a client has to complete startup and authentication."
    )
    runtime_dir: Path | None = Field(
        default=None,
        description="Private directory for the workers' cancel-forwarding unix sockets "
        "(workers > 1); default: /tmp/pgwarden-<uid>-<port>.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Gateway log verbosity (logs go to stderr)."
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.require_client_tls and self.tls_cert_file is None:
            raise ValueError("require_client_tls needs tls_cert_file and tls_key_file")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PGWARDEN_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def load_settings(config_file: Path | None = None) -> Settings:
    """Load settings; ``config_file`` overrides ``PGWARDEN_CONFIG``.

    Raises ``pydantic.ValidationError`` (or ``OSError``/``tomllib.TOMLDecodeError``) with a
    message that names the bad field; the CLI turns it into a clear error.
    """
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        os.environ["PGWARDEN_CONFIG"] = str(config_file)
    return Settings()

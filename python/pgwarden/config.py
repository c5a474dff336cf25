"""The gateway's settings: one pydantic-settings model, from a TOML file and ``PGWARDEN_*``.

Precedence (highest first): keyword arguments, environment variables
(``PGWARDEN_LISTEN_PORT=6432``, nested with ``__`` as in ``PGWARDEN_UPSTREAM__HOST``),
the TOML file named by ``--config`` or ``PGWARDEN_CONFIG``, then the defaults below.
Every field's description is the documentation: ``pgwarden serve --help-settings``
prints them and docs/configuration.md is generated from the same text.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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


# --- identity (OIDC tokens as the password) -----------------------------------------------

#: JWS algorithms a token may be signed with (RFC 7518).  ``none`` is never among them.
ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")


class IssuerSettings(BaseModel):
    """One trusted token issuer: an OIDC provider or a CI workload identity."""

    model_config = ConfigDict(extra="forbid")

    issuer: str = Field(
        description="Issuer URL, exactly as in the tokens' `iss` claim "
        "(https; http only for a loopback host)."
    )
    audience: list[str] = Field(
        min_length=1,
        description="Accepted `aud` values: a token must name at least one of them.",
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "ES256"],
        min_length=1,
        description="Allowed signing algorithms; `none` is refused, HS* need `hs_secret`.",
    )
    discovery_url: str | None = Field(
        default=None,
        description="OIDC discovery document; default: "
        "`<issuer>/.well-known/openid-configuration`.",
    )
    jwks_uri: str | None = Field(
        default=None,
        description="JWKS URL; set it to skip discovery (default: `jwks_uri` of the discovery "
        "document).",
    )
    hs_secret: SecretStr | None = Field(
        default=None,
        description="Shared secret for HS256/384/512 tokens (then list them in `algorithms`).",
    )
    hs_secret_file: Path | None = Field(
        default=None, description="File holding `hs_secret` (first line); wins over it."
    )
    name_claim: str = Field(
        default="name", description="Claim path of the display name (dots walk into objects)."
    )
    email_claim: str = Field(default="email", description="Claim path of the email address.")
    groups_claim: str | None = Field(
        default="groups",
        description="Claim path of the groups (a list of strings, or one string); empty: none.",
    )
    leeway_seconds: float = Field(
        default=30.0, ge=0, le=300, description="Clock skew allowed for exp, nbf and iat."
    )
    ca_file: Path | None = Field(
        default=None,
        description="CA bundle for the discovery and JWKS endpoints (default: system store).",
    )

    @field_validator("audience", mode="before")
    @classmethod
    def _one_audience(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("algorithms")
    @classmethod
    def _known_algorithms(cls, value: list[str]) -> list[str]:
        for name in value:
            if name.lower() == "none":
                raise ValueError("alg 'none' (unsigned tokens) is never allowed")
            if name not in ASYMMETRIC_ALGORITHMS and name not in HMAC_ALGORITHMS:
                known = ", ".join(ASYMMETRIC_ALGORITHMS + HMAC_ALGORITHMS)
                raise ValueError(f"unknown algorithm {name!r} (known: {known})")
        return value

    @model_validator(mode="after")
    def _hmac_needs_secret(self) -> IssuerSettings:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        has_secret = self.hs_secret is not None or self.hs_secret_file is not None
        if hmac and not has_secret:
            raise ValueError(f"{', '.join(hmac)} allowed without hs_secret: configure the secret")
        if has_secret and not hmac:
            raise ValueError("hs_secret is set but no HS* algorithm is allowed")
        return self

    def resolved_hs_secret(self) -> bytes | None:
        if self.hs_secret_file is not None:
            return self.hs_secret_file.read_text(encoding="utf-8").splitlines()[0].encode()
        return self.hs_secret.get_secret_value().encode() if self.hs_secret is not None else None


def split_host_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as ``(host, port)``; ValueError when it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port (127.0.0.1:9187, [::1]:9187)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class RoleRule(BaseModel):
    """A role-mapping rule: conditions on the identity, and the roles and databases it gets."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="Rule name shown in events and errors.")
    action: Literal["allow", "deny"] = Field(
        default="allow", description="`allow` grants `roles`; `deny` refuses the identity."
    )
    issuer: str | None = Field(default=None, description="Only tokens from this issuer.")
    subjects: list[str] = Field(
        default_factory=list, description="`sub` patterns (`*` and `?` wildcards); any matches."
    )
    emails: list[str] = Field(
        default_factory=list, description="Email patterns (case-insensitive); any matches."
    )
    groups: list[str] = Field(
        default_factory=list, description="Group names; the identity must be in at least one."
    )
    claims: dict[str, str | list[str]] = Field(
        default_factory=dict,
        description="Claim path -> pattern (or list of patterns); every entry must match.",
    )
    roles: list[str] = Field(
        default_factory=list,
        description="PostgreSQL roles allowed, the first being the default.",
    )
    databases: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Databases these roles may open (`*`: any).",
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        description="Sessions each identity this rule matches may hold open at once, all "
        "workers together (FATAL 53300 past it); with max_connections_per_identity, the "
        "lower applies.",
    )

    @model_validator(mode="after")
    def _allow_has_roles(self) -> RoleRule:
        if self.action == "allow" and not self.roles:
            raise ValueError("an allow rule needs at least one role")
        if self.action == "deny" and self.roles:
            raise ValueError("a deny rule takes no roles")
        return self


class UpstreamRole(BaseModel):
    """A PostgreSQL role identities are mapped to, and the credential only the gateway holds."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Role name the gateway logs in as upstream.")
    password: SecretStr | None = Field(default=None, description="The role's password.")
    password_file: Path | None = Field(
        default=None, description="File holding the password (first line); wins over `password`."
    )
    password_env: str | None = Field(
        default=None,
        description="Environment variable holding the password; wins over the other two.",
    )

    def resolved_password(self) -> str | None:
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise OSError(f"environment variable {self.password_env} is not set")
            return value
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").splitlines()[0]
        return self.password.get_secret_value() if self.password is not None else None


class IdentitySettings(BaseModel):
    """OIDC identity: the client's password is a token; rules map it to a PostgreSQL role."""

    model_config = ConfigDict(extra="forbid")

    issuers: list[IssuerSettings] = Field(
        min_length=1, description="Trusted issuers (several may be active at once)."
    )
    rules: list[RoleRule] = Field(
        default_factory=list,
        description="Role-mapping rules, first match wins; no match: refused (default deny).",
    )
    roles: list[UpstreamRole] = Field(
        default_factory=list,
        description="Upstream roles and their credentials; every role a rule or grant names.",
    )
    user_field: Literal["ignore", "identity", "role"] = Field(
        default="ignore",
        description="Startup `user`: ignored, must equal the token's sub or email, or names "
        "the role to use among those allowed.",
    )
    allow_plaintext_password: bool = Field(
        default=False,
        description="Accept a token outside TLS (development only): it is a bearer credential.",
    )
    max_token_bytes: int = Field(
        default=16384, ge=256, le=65000, description="Longer tokens are refused unread."
    )
    jwks_cache_seconds: float = Field(
        default=300.0, gt=0, description="Keys are fetched again after this long."
    )
    jwks_min_refresh_seconds: float = Field(
        default=30.0,
        ge=0,
        description="Least time between two JWKS fetches caused by unknown key ids.",
    )
    http_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Timeout of a discovery or JWKS request."
    )
    expiry_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="At token or grant expiry a running statement gets this long to finish.",
    )
    startup_parameters: Literal["refuse", "strip"] = Field(
        default="refuse",
        description="Startup parameters that could change identity or policy (options, role, "
        "session_authorization): refuse the connection, or strip them.",
    )
    protect_search_path: bool = Field(
        default=False,
        description="Treat the `search_path` startup parameter like `options` (refuse/strip).",
    )
    grants_file: Path | None = Field(
        default=None,
        description="JSON file of time-bound grants (`pgwarden grants`); unset: no grants.",
    )
    grants_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the gateway re-reads a changed grants file."
    )
    admin_dir: Path | None = Field(
        default=None,
        description="Directory of the admin unix sockets `pgwarden grants` notifies; default: "
        "`runtime_dir` or /tmp/pgwarden-<uid>-<port>.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> IdentitySettings:
        issuers = [i.issuer for i in self.issuers]
        if len(set(issuers)) != len(issuers):
            raise ValueError("the same issuer is configured twice")
        known_roles = {r.name for r in self.roles}
        if len(known_roles) != len(self.roles):
            raise ValueError("the same role is listed twice in identity.roles")
        for index, rule in enumerate(self.rules):
            if rule.issuer is not None and rule.issuer not in issuers:
                raise ValueError(f"rules[{index}] names issuer {rule.issuer!r}, not configured")
            for role in rule.roles:
                if role not in known_roles:
                    raise ValueError(
                        f"rules[{index}] maps to role {role!r}, which has no entry in "
                        "identity.roles (the gateway needs its credential)"
                    )
        return self

    def role(self, name: str) -> UpstreamRole | None:
        for role in self.roles:
            if role.name == name:
                return role
        return None


# --- audit (spool, shipper, session recording) ------------------------------------------


class AuditSettings(BaseModel):
    """The audit trail: every statement spooled before it runs, shipped as OpenTelemetry spans."""

    model_config = ConfigDict(extra="forbid")

    directory: Path | None = Field(
        default=None,
        description="State directory of the audit trail (spool, session recordings, generated "
        "chain key). Unset: audit off, and the gateway says so in its log at start.",
    )
    mode: Literal["strict", "relaxed"] = Field(
        default="strict",
        description="strict: a statement is forwarded only once its record is in the spool, "
        "and is refused (SQLSTATE 53400 / 58030) when it cannot be; relaxed: never refuse, "
        "count the records that could not be stored.",
    )
    fsync: Literal["always", "interval", "never"] = Field(
        default="interval",
        description="When the spool is forced to disk: always (a statement waits for it, "
        "group commit), interval (every fsync_interval_ms in the background), never. Records "
        "survive a gateway crash in every mode; an OS crash loses at most the unsynced ones.",
    )
    fsync_interval_ms: int = Field(
        default=200, ge=1, le=60_000, description="Period of fsync = interval."
    )
    max_spool_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=64 * 1024,
        description="Disk space the spool may use (all workers). When full, new statements "
        "and sessions are refused with SQLSTATE 53400 until the shipper drains it.",
    )
    segment_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=16 * 1024,
        description="Size of one spool segment file (allocated whole, then filled).",
    )
    chain_key: SecretStr | None = Field(
        default=None, description="HMAC key of the records' hash chain."
    )
    chain_key_file: Path | None = Field(
        default=None,
        description="File holding the chain key (raw bytes); wins over chain_key. Neither "
        "set: a random key is generated in <directory>/chain.key (mode 0600).",
    )
    previous_chain_key_files: list[Path] = Field(
        default_factory=list,
        description="Files holding earlier chain keys, after a key rotation: records sealed "
        "with them (streams written before the rotation, recordings) still verify, in the "
        "shipper and in `pgwarden audit verify`. New records are sealed with the current key "
        "only.",
    )
    query_text: Literal["full", "sanitised", "none"] = Field(
        default="full",
        description="db.query.text in spans: the full SQL, sanitised (literals replaced by "
        "the PostgreSQL parser's normalisation) or none. The spool always keeps the full text.",
    )
    query_text_max_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Longest db.query.text in a span; a longer text is cut at a character "
        "boundary and the span gets pgwarden.query.text_bytes (its full length). The spool "
        "and the session recording keep the whole text.",
    )
    record_parameters: bool = Field(
        default=False,
        description="Record Bind parameter values (db.query.parameter.<n>) and FunctionCall "
        "arguments.",
    )
    max_parameter_bytes: int = Field(
        default=1024, ge=0, description="Parameter values longer than this are cut."
    )
    recording: bool = Field(
        default=True,
        description="Record each statement's result as the client saw it, for `pgwarden "
        "replay`: delivered spool segments are kept under <directory>/recorded instead of "
        "deleted.",
    )
    recording_retention_hours: float = Field(
        default=0,
        ge=0,
        description="The shipper deletes recorded segments whose newest record is older than "
        "this, oldest first (an hourly sweep); 0: recordings stay until removed by hand.",
    )
    recording_max_rows: int = Field(
        default=100, ge=0, description="Rows (DataRow / CopyData) recorded per statement."
    )
    recording_max_bytes: int = Field(
        default=64 * 1024, ge=0, description="Bytes of result recorded per statement."
    )
    recording_logs: bool = Field(
        default=False,
        description="Also export each recorded statement as an OpenTelemetry log record.",
    )
    exporter: Literal["otlp_http", "otlp_grpc", "console", "file"] = Field(
        default="otlp_http",
        description="Where the shipper sends the trail: OTLP over HTTP/protobuf or gRPC, "
        "console (spans printed as JSON) or file (the sealed records, verifiable with "
        "`pgwarden audit verify`).",
    )
    endpoint: str | None = Field(
        default=None,
        description="OTLP endpoint; default http://localhost:4318 (HTTP: /v1/traces and "
        "/v1/logs are appended unless the URL has a path) or http://localhost:4317 (gRPC).",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra OTLP request headers (e.g. authorization)."
    )
    certificate_file: Path | None = Field(
        default=None, description="CA bundle to verify an https OTLP endpoint."
    )
    client_certificate_file: Path | None = Field(
        default=None,
        description="Client certificate (PEM) the shipper presents to an https OTLP endpoint "
        "that requires mutual TLS; with client_key_file.",
    )
    client_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of client_certificate_file."
    )
    compression: Literal["none", "gzip"] = Field(
        default="none",
        description="Compression of the OTLP export requests (HTTP and gRPC): gzip sends "
        "audit spans in a fraction of the bytes, for some of the shipper's CPU.",
    )
    timeout_seconds: float = Field(
        default=10.0, gt=0, description="Time limit of one OTLP export request."
    )
    export_path: Path | None = Field(
        default=None,
        description="File the console / file exporter appends to (console default: stdout).",
    )
    service_name: str = Field(default="pgwarden", description="Resource attribute service.name.")
    service_instance_id: str | None = Field(
        default=None,
        description="Resource attribute service.instance.id; default <hostname>:<listen_port>.",
    )
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="More resource attributes (deployment.environment...)."
    )
    start_shipper: bool = Field(
        default=True,
        description="`pgwarden serve` starts and supervises the shipper process; false: run "
        "`pgwarden audit ship` yourself.",
    )
    shipper_nice: int = Field(
        default=19,
        ge=0,
        le=19,
        description="CPU niceness of the shipper: statements win the CPU when it is short, "
        "the spool absorbs the burst and the shipper catches up when it is not.",
    )
    shipper_idle_priority: bool = Field(
        default=True,
        description="Run the shipper under the SCHED_IDLE policy (Linux): it gets the CPU "
        "only when no statement work wants it. Under sustained saturation the spool grows "
        "towards its bound; set false to let the shipper compete at shipper_nice.",
    )
    batch_size: int = Field(
        default=2048,
        ge=1,
        le=100_000,
        description="Spans per export request (and result log records per logs request).",
    )
    max_request_bytes: int = Field(
        default=3 << 20,
        ge=64 * 1024,
        description="Largest export request body (encoded spans), whatever batch_size says: "
        "stays below the receiver's limit (OTLP/gRPC receivers accept 4 MiB by default). A "
        "single span larger than this is sent alone.",
    )
    poll_interval_ms: int = Field(
        default=100,
        ge=1,
        description="How often the shipper looks for new records. While statements keep "
        "coming it waits longer, until about one request (batch_size spans) has gathered, "
        "at most 1 s (or this interval, if longer).",
    )
    retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest wait between export retries."
    )

    @model_validator(mode="after")
    def _spool_fits_segments(self) -> AuditSettings:
        # An active, a prepared and a reusable segment, plus room to grow.
        if self.max_spool_bytes < 4 * self.segment_bytes:
            raise ValueError("max_spool_bytes must be at least 4 x segment_bytes")
        if self.exporter == "file" and self.export_path is None:
            raise ValueError("exporter 'file' needs export_path")
        if (self.client_certificate_file is None) != (self.client_key_file is None):
            raise ValueError("client_certificate_file and client_key_file must be set together")
        if self.client_certificate_file is not None and not (self.endpoint or "").startswith(
            "https://"
        ):
            raise ValueError("client_certificate_file needs an https:// endpoint")
        return self

    def chain_key_bytes(self) -> bytes | None:
        """The configured key (file first), or None when one must be generated."""
        if self.chain_key_file is not None:
            return self.chain_key_file.read_bytes().strip()
        if self.chain_key is not None:
            return self.chain_key.get_secret_value().encode()
        return None

    def previous_chain_keys(self) -> list[bytes]:
        """The keys of ``previous_chain_key_files``, in order."""
        return [path.read_bytes().strip() for path in self.previous_chain_key_files]


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
        description="Static client logins, used when `identity` is not configured (development "
        "and tests). Empty: refuse all.",
    )
    identity: IdentitySettings | None = Field(
        default=None,
        description="OIDC token authentication and role mapping; replaces `users` when set.",
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
    policy_file: Path | None = Field(
        default=None,
        description="Statement policy (TOML, see docs/policy.md): every Query and Parse is "
        "allowed or refused by its rules, fail closed; re-read on SIGHUP (a broken file "
        "keeps the policy in force). Unset: statements are not filtered.",
    )
    mask_recheck_seconds: float = Field(
        default=5.0,
        ge=0.2,
        le=3600,
        description="How often the masked columns of open masked sessions are looked up "
        "again (one catalog query per database and set of masks, on a connection of the "
        "gateway's own); a session whose masked relations changed (a new partition or "
        "child, a view, a table created again) is ended so that it reconnects.",
    )
    statement_log: str | None = Field(
        default=None,
        description="JSON-lines sink for per-statement events: a file path (reopened on "
        "SIGHUP, for log rotation), '-' for stdout, or unset for none.",
    )
    statement_log_max_param_bytes: int = Field(
        default=1024,
        ge=0,
        description="Bind parameter values longer than this are truncated in the log.",
    )
    audit: AuditSettings = Field(
        default_factory=AuditSettings,
        description="The audit trail (spool, shipper, OpenTelemetry export, session recording).",
    )
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM: stop accepting, let sessions finish for this long, then close.",
    )
    startup_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Time a client has to complete startup and authentication."
    )
    max_client_connections: int | None = Field(
        default=None,
        ge=1,
        description="Sessions the gateway holds open at once, all workers together; more are "
        "refused with FATAL 53300 (docs/operations.md). Unset: bounded by file descriptors "
        "and PostgreSQL's max_connections only.",
    )
    max_connections_per_identity: int | None = Field(
        default=None,
        ge=1,
        description="Sessions one caller (issuer and identity name) holds open at once, all "
        "workers together; more are refused with FATAL 53300. Unset: no such limit.",
    )
    metrics_listen: str | None = Field(
        default=None,
        description="host:port where worker 0 serves Prometheus metrics at /metrics (every "
        "worker's figures and the audit trail's; docs/operations.md); unset: no endpoint.",
    )
    memory_trim_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Every this often, when sessions have ended since, a worker gives the "
        "heap memory they freed back to the system (glibc malloc_trim; docs/operations.md); "
        "0: never.",
    )
    runtime_dir: Path | None = Field(
        default=None,
        description="Private directory for the workers' cancel-forwarding unix sockets "
        "(workers > 1); default: /tmp/pgwarden-<uid>-<port>.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Gateway log verbosity (logs go to stderr)."
    )

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

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


#: PGWARDEN_* variables that are not settings (the config file path; the test cluster's
#: PostgreSQL; the test script's switches).
NON_SETTING_ENVIRONMENT: Final = frozenset(
    {"PGWARDEN_CONFIG", "PGWARDEN_PG_BINDIR", "PGWARDEN_SKIP_BENCH_SMOKE", "PGWARDEN_FUZZ_SECONDS"}
)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model of a field (``Model`` or ``Model | None``), if it is one."""
    candidates = typing.get_args(annotation) or (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _environment_names(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """(variable names of every setting, prefixes under which deeper keys are fine)."""
    names: set[str] = set()
    open_prefixes: set[str] = set()
    for name, field in model.model_fields.items():
        env = f"{prefix}{name.upper()}"
        names.add(env)
        nested = _nested_model(field.annotation)
        if nested is not None:
            deeper, more = _environment_names(nested, f"{env}__")
            names |= deeper
            open_prefixes |= more
        elif typing.get_origin(field.annotation) in (dict, Mapping):
            open_prefixes.add(f"{env}__")
    return names, open_prefixes


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """PGWARDEN_* variables that name no setting: without this check a misspelt one (say
    ``PGWARDEN_AUDIT_DIRECTORY``, one underscore) would be ignored without a word."""
    names, open_prefixes = _environment_names(Settings, "PGWARDEN_")
    unknown = []
    for key in environ:
        upper = key.upper()
        if not upper.startswith("PGWARDEN_") or upper in NON_SETTING_ENVIRONMENT:
            continue
        if upper in names or any(upper.startswith(p) for p in open_prefixes):
            continue
        unknown.append(key)
    return sorted(unknown)


def _check_environment() -> None:
    unknown = unknown_environment(os.environ)
    if not unknown:
        return
    names, _ = _environment_names(Settings, "PGWARDEN_")
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key.upper(), sorted(names), n=1)
        problems.append(f"{key} (did you mean {close[0]}?)" if close else key)
    raise SettingsError(
        "unknown setting in the environment: "
        + ", ".join(problems)
        + " (pgwarden serve --help-settings lists every variable)"
    )


def load_settings(config_file: Path | None = None) -> Settings:
    """Load settings; ``config_file`` overrides ``PGWARDEN_CONFIG``.

    Raises ``pydantic.ValidationError`` (or ``OSError``/``tomllib.TOMLDecodeError``) with a
    message that names the bad field, and ``SettingsError`` for a PGWARDEN_* environment
    variable that names no setting; the CLI turns them into a clear error.
    """
    _check_environment()
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file not found: {config_file}")
        os.environ["PGWARDEN_CONFIG"] = str(config_file)
    return Settings()

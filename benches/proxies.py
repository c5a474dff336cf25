"""pgbouncer and pgwarden as local child processes in front of one PostgreSQL server.

Both proxies get the same treatment: loopback listener on a free port, client TLS
offered but optional (the client's sslmode decides), plain TCP upstream unless asked
otherwise, the benchmark login checked by the proxy itself, and the upstream login made
with the same credential the direct target uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from psycopg import pq

from endpoints import Endpoint

UpstreamTls = Literal["disable", "prefer", "require"]


class ProxyError(RuntimeError):
    """A proxy could not be configured or started; the message includes its log tail."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PgWardenVariant:
    """One pgwarden configuration to measure, as environment overrides."""

    label: str
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = (sys.executable, "-m", "pgwarden", "serve")


def write_dev_certificate(directory: Path, owner: pwd.struct_passwd | None) -> TlsFiles:
    """A throwaway self-signed certificate for 127.0.0.1/localhost, readable by ``owner``."""
    from pgwarden.tls import generate_dev_certificate

    cert, key = generate_dev_certificate(directory / "tls")
    if owner is not None:
        for path in (cert.parent, cert, key):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    return TlsFiles(cert=cert, key=key)


def unprivileged_user(name: str = "postgres") -> pwd.struct_passwd | None:
    """The OS user to run pgbouncer as when we are root (pgbouncer refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError as exc:
        raise ProxyError(f"running as root but there is no OS user {name!r} for pgbouncer") from exc


def free_port() -> int:
    from pgwarden.pgcluster import find_free_port

    return find_free_port("127.0.0.1")


class ManagedProcess:
    """A child process with its log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(
        self,
        command: list[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        run_as: pwd.struct_passwd | None = None,
    ) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None,
            extra_groups=[] if run_as else None,
        )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-max_bytes:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            for signum in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signum)
                try:
                    self.process.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def wait_until_accepting(endpoint: Endpoint, process: ManagedProcess, timeout: float) -> None:
    """Poll with a real login until the endpoint answers a query, or fail with its log."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if not process.alive:
            raise ProxyError(f"{process.name} exited during startup:\n{process.log_tail()}")
        conn = pq.PGconn.connect(endpoint.conninfo(tls=False).encode())
        try:
            if conn.status == pq.ConnStatus.OK:
                result = conn.exec_(b"SELECT 1")
                if result.status == pq.ExecStatus.TUPLES_OK:
                    return
                last_error = result.get_error_message()
            else:
                last_error = conn.get_error_message()
        finally:
            conn.finish()
        time.sleep(0.1)
    raise ProxyError(
        f"{process.name} did not accept a login within {timeout:.0f} s "
        f"(last error: {last_error.strip()}):\n{process.log_tail()}"
    )


def start_pgbouncer(
    upstream: Endpoint,
    workdir: Path,
    tls: TlsFiles | None,
    *,
    upstream_tls: UpstreamTls,
    run_as: pwd.struct_passwd | None,
    pool_size: int = 100,
) -> tuple[Endpoint, ManagedProcess]:
    """pgbouncer in session mode; clients log in with the upstream credential (SCRAM).
    ``pool_size``: server connections per database and user (one per client session)."""
    binary = os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).is_file():
        raise ProxyError("pgbouncer not found: apt-get install pgbouncer, or set PGBOUNCER")
    directory = workdir / "pgbouncer"
    directory.mkdir()
    port = free_port()
    userlist = directory / "userlist.txt"
    userlist.write_text(
        f'"{_pgb_quote(upstream.user)}" "{_pgb_quote(upstream.password)}"\n', encoding="utf-8"
    )
    userlist.chmod(0o600)
    settings: dict[str, str | int] = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": "",
        "auth_type": "scram-sha-256",
        "auth_file": str(userlist),
        "pool_mode": "session",
        "max_client_conn": max(2000, pool_size + 100),
        "default_pool_size": pool_size,
        "max_db_connections": 0,
        "server_tls_sslmode": upstream_tls,
        "ignore_startup_parameters": "extra_float_digits",
        "logfile": str(directory / "pgbouncer.log"),
        "log_connections": 0,
        "log_disconnections": 0,
        "stats_period": 3600,
    }
    if tls is not None:
        settings |= {
            "client_tls_sslmode": "allow",
            "client_tls_cert_file": str(tls.cert),
            "client_tls_key_file": str(tls.key),
        }
    server_target = f"host={upstream.host} port={upstream.port}"
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = {server_target}\n\n[pgbouncer]\n"
        + "".join(f"{key} = {value}\n" for key, value in settings.items()),
        encoding="utf-8",
    )
    if run_as is not None:
        for path in (directory, userlist, ini):
            os.chown(path, run_as.pw_uid, run_as.pw_gid)
    process = ManagedProcess("pgbouncer", directory / "stderr.log")
    process.spawn([binary, str(ini)], env=os.environ, cwd=directory, run_as=run_as)
    endpoint = Endpoint(
        name="pgbouncer",
        host="127.0.0.1",
        port=port,
        user=upstream.user,
        password=upstream.password,
        dbname=upstream.dbname,
        tls=tls is not None,
    )
    try:
        wait_until_accepting(endpoint, process, timeout=30)
    except ProxyError as exc:
        process.stop()
        log = (directory / "pgbouncer.log").read_text(encoding="utf-8", errors="replace")
        raise ProxyError(f"{exc}\npgbouncer.log:\n{log[-3000:]}") from exc
    return endpoint, process


def pgwarden_environment(
    upstream: Endpoint,
    port: int,
    tls: TlsFiles | None,
    variant: PgWardenVariant,
    *,
    upstream_tls: UpstreamTls,
) -> dict[str, str]:
    """The process environment: inherited variables minus any ``PGWARDEN_*``, then ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PGWARDEN_")}
    env |= {
        "PGWARDEN_LISTEN_HOST": "127.0.0.1",
        "PGWARDEN_LISTEN_PORT": str(port),
        "PGWARDEN_UPSTREAM__HOST": upstream.host,
        "PGWARDEN_UPSTREAM__PORT": str(upstream.port),
        "PGWARDEN_UPSTREAM__USER": upstream.user,
        "PGWARDEN_UPSTREAM__PASSWORD": upstream.password,
        "PGWARDEN_UPSTREAM__TLS": upstream_tls,
        "PGWARDEN_USERS": json.dumps([{"name": upstream.user, "password": upstream.password}]),
        "PGWARDEN_DRAIN_TIMEOUT_SECONDS": "2",
    }
    if tls is not None:
        env |= {"PGWARDEN_TLS_CERT_FILE": str(tls.cert), "PGWARDEN_TLS_KEY_FILE": str(tls.key)}
    env |= variant.env
    return env


def start_pgwarden(
    upstream: Endpoint,
    workdir: Path,
    tls: TlsFiles | None,
    variant: PgWardenVariant,
    *,
    upstream_tls: UpstreamTls,
) -> tuple[Endpoint, ManagedProcess]:
    """``pgwarden serve`` configured by environment; ready once a login succeeds."""
    directory = workdir / _safe_name(variant.label)
    directory.mkdir()
    port = free_port()
    env = pgwarden_environment(upstream, port, tls, variant, upstream_tls=upstream_tls)
    process = ManagedProcess(variant.label, directory / "pgwarden.log")
    process.spawn(list(variant.command), env=env, cwd=directory)
    endpoint = Endpoint(
        name=variant.label,
        host="127.0.0.1",
        port=port,
        user=upstream.user,
        password=upstream.password,
        dbname=upstream.dbname,
        tls=tls is not None,
    )
    # Readiness is a successful login rather than the "pgwarden listening on" log line,
    # which a variant with log_level=warning does not print.
    try:
        wait_until_accepting(endpoint, process, timeout=60)
    except ProxyError:
        process.stop()
        raise
    return endpoint, process


def _pgb_quote(value: str) -> str:
    # userlist.txt: a double quote inside a quoted field is written twice.
    return value.replace('"', '""')


def _safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)

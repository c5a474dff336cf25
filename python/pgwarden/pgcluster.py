"""A throwaway PostgreSQL cluster in a temporary directory.

Used by ``pgwarden demo``, the integration tests and the benchmarks: ``initdb`` with
SCRAM authentication and a random superuser password, a free loopback port, the unix
socket inside the temporary directory, optional server TLS with a generated CA, and
``pg_hba.conf`` lines chosen by the caller.  The postmaster runs as a direct child
process, so it can be stopped, restarted or killed with ``SIGKILL`` for crash tests,
and everything is removed on :meth:`TemporaryCluster.cleanup` (also at interpreter
exit if the caller forgot).

PostgreSQL refuses to run as root: when the effective uid is 0 the cluster's files are
owned by, and the server runs as, an unprivileged OS user (``postgres`` by default).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal
from urllib.parse import quote

SettingValue = str | int | float | bool

#: Settings every cluster gets; the caller's ``settings`` override them.
BASE_SETTINGS: Mapping[str, SettingValue] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": 100,
    "shared_buffers": "128MB",
    "log_destination": "stderr",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "log_statement": "none",
    "password_encryption": "scram-sha-256",
    "dynamic_shared_memory_type": "posix",
    "timezone": "UTC",
    "lc_messages": "C",
}

#: Settings that trade durability for speed; for tests and benchmarks of the gateway.
FAST_UNSAFE_SETTINGS: Mapping[str, SettingValue] = {
    "fsync": False,
    "synchronous_commit": False,
    "full_page_writes": False,
}

#: pg_hba.conf lines appended after the caller's own (first match wins in PostgreSQL).
DEFAULT_HBA_LINES: tuple[str, ...] = (
    "local all all scram-sha-256",
    "host all all 127.0.0.1/32 scram-sha-256",
    "host all all ::1/128 scram-sha-256",
)

ShutdownMode = Literal["smart", "fast", "immediate"]
_SHUTDOWN_SIGNALS: Mapping[ShutdownMode, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class ClusterError(RuntimeError):
    """The cluster could not be created, started or queried; the message says why."""


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``.

    Looked up in ``PGWARDEN_PG_BINDIR``, ``pg_config --bindir``, ``PATH``, then the
    newest ``/usr/lib/postgresql/*/bin`` (Debian does not put the server on ``PATH``).
    """
    candidates: list[Path] = []
    env_dir = os.environ.get("PGWARDEN_PG_BINDIR")
    if env_dir:
        candidates.append(Path(env_dir))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)

    def version_key(path: Path) -> tuple[int, ...]:
        try:
            return tuple(int(part) for part in path.parent.name.split("."))
        except ValueError:
            return (0,)

    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    )
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ClusterError(
        "PostgreSQL server binaries (initdb, postgres) not found; "
        "set PGWARDEN_PG_BINDIR to the directory holding them"
    )


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def format_setting(value: SettingValue) -> str:
    """A value as written in postgresql.conf."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class _ServerProcess:
    """The running postmaster and its log; kept apart so a finalizer can stop it."""

    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    base_dir: Path | None = None
    remove_dir: bool = True

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def shutdown(self, mode: ShutdownMode, timeout: float) -> None:
        """Stop the postmaster, escalating to SIGQUIT then SIGKILL if it lingers."""
        if self.process is None:
            return
        steps: list[tuple[signal.Signals, float]] = [(_SHUTDOWN_SIGNALS[mode], timeout)]
        if mode != "immediate":
            steps.append((signal.SIGQUIT, 10.0))
        steps.append((signal.SIGKILL, 10.0))
        for signum, wait_seconds in steps:
            self.signal(signum)
            if self.wait(wait_seconds):
                break
        self.process = None
        self.close_log()

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def destroy(self) -> None:
        self.shutdown("immediate", 10.0)
        if self.remove_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None


class TemporaryCluster:
    """A PostgreSQL cluster living in a temporary directory, listening on loopback.

    >>> with TemporaryCluster(settings={"fsync": False}) as cluster:
    ...     cluster.psql("select 1")
    '1\\n'

    ``settings`` are written to postgresql.conf over :data:`BASE_SETTINGS`.
    ``hba_lines`` come first in pg_hba.conf, before :data:`DEFAULT_HBA_LINES`, so a test
    can require ``md5`` or ``hostssl`` for one role.  ``ssl=True`` generates a CA and a
    server certificate for ``localhost``/``127.0.0.1`` (the CA is :attr:`ca_cert_file`).
    """

    def __init__(
        self,
        *,
        settings: Mapping[str, SettingValue] | None = None,
        hba_lines: Sequence[str] = (),
        ssl: bool = False,
        superuser: str = "postgres",
        password: str | None = None,
        port: int | None = None,
        bindir: Path | None = None,
        base_dir: Path | None = None,
        os_user: str = "postgres",
        start_timeout: float = 60.0,
    ) -> None:
        self.superuser = superuser
        self.password = password if password is not None else secrets.token_urlsafe(18)
        self.host = "127.0.0.1"
        self.port = port if port is not None else find_free_port(self.host)
        self.bindir = bindir if bindir is not None else find_bindir()
        self.ssl = ssl
        self.start_timeout = start_timeout
        self._settings: dict[str, SettingValue] = {**BASE_SETTINGS, **(settings or {})}
        self._hba_lines = list(hba_lines)
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(os_user)
            except KeyError as exc:
                raise ClusterError(
                    f"running as root, but there is no OS user {os_user!r} to run PostgreSQL as"
                ) from exc
        self._server = _ServerProcess()
        # Stops the server and removes the directory even if cleanup() is never called.
        self._finalizer = weakref.finalize(self, self._server.destroy)
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="pgwarden-pg-"))
        else:
            base_dir.mkdir(parents=True, exist_ok=True)
            self.base_dir = base_dir
            self._server.remove_dir = False
        self._server.base_dir = self.base_dir
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_file = self.base_dir / "postgresql.log"
        self.ca_cert_file = self.base_dir / "ca.crt"
        self._initialised = False

    # --- lifecycle -------------------------------------------------------------

    def __enter__(self) -> TemporaryCluster:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def init(self) -> None:
        """Run initdb and write the configuration (done by :meth:`start` when needed)."""
        if self._initialised:
            return
        self.socket_dir.mkdir(exist_ok=True)
        pwfile = self.base_dir / "superuser.pw"
        pwfile.write_text(self.password + "\n", encoding="utf-8")
        pwfile.chmod(0o600)
        self._chown(self.base_dir, self.socket_dir, pwfile)
        result = self._run_as_server_user(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                self.superuser,
                "--pwfile",
                str(pwfile),
                "--auth",
                "scram-sha-256",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ]
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise ClusterError(f"initdb failed ({result.returncode}):\n{result.stdout}")
        if self.ssl:
            self._write_server_certificate()
        self._write_config()
        self._initialised = True

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        self.init()
        if self.running:
            return
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self._start_once(deadline)
                return
            except ClusterError:
                # After a SIGKILL of the postmaster, its orphaned backends may still hold
                # the shared memory for a moment; PostgreSQL then refuses to start.
                if time.monotonic() >= deadline or "shared memory block" not in self.log_tail():
                    raise
                time.sleep(0.2)

    def stop(self, mode: ShutdownMode = "fast", timeout: float = 30.0) -> None:
        """Shut the server down (``fast``: roll back open transactions, disconnect)."""
        self._server.shutdown(mode, timeout)

    def restart(self, mode: ShutdownMode = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, as in a crash; its backends exit on their own shortly."""
        self._server.signal(signal.SIGKILL)
        self._server.wait(10.0)
        self._server.process = None
        self._server.close_log()

    def reload(self) -> None:
        """Re-read postgresql.conf and pg_hba.conf (SIGHUP)."""
        self._server.signal(signal.SIGHUP)
        # The postmaster applies SIGHUP asynchronously; new backends see it after this.
        time.sleep(0.2)

    def cleanup(self) -> None:
        """Stop the server (immediately) and remove the directory. Safe to call twice."""
        self._finalizer()

    @property
    def running(self) -> bool:
        process = self._server.process
        return process is not None and process.poll() is None

    @property
    def postmaster_pid(self) -> int | None:
        process = self._server.process
        return process.pid if process is not None and process.poll() is None else None

    # --- configuration ---------------------------------------------------------

    def set_hba_lines(self, lines: Sequence[str]) -> None:
        """Replace the caller's pg_hba.conf lines and reload if running."""
        self._hba_lines = list(lines)
        if self._initialised:
            self._write_hba()
            if self.running:
                self.reload()

    def _write_config(self) -> None:
        settings: dict[str, SettingValue] = {
            **self._settings,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
        }
        if self.ssl:
            settings.update(
                ssl=True,
                ssl_cert_file=str(self.data_dir / "server.crt"),
                ssl_key_file=str(self.data_dir / "server.key"),
            )
        lines = [f"{name} = {format_setting(value)}" for name, value in settings.items()]
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as handle:
            handle.write("\n# pgwarden TemporaryCluster\n" + "\n".join(lines) + "\n")
        self._write_hba()

    def _write_hba(self) -> None:
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("\n".join([*self._hba_lines, *DEFAULT_HBA_LINES]) + "\n", encoding="utf-8")
        self._chown(hba)

    def _write_server_certificate(self) -> None:
        cert_pem, key_pem, ca_pem = _generate_server_certificate(
            ["localhost"], [ipaddress.ip_address(self.host)]
        )
        cert = self.data_dir / "server.crt"
        key = self.data_dir / "server.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        key.chmod(0o600)
        self.ca_cert_file.write_bytes(ca_pem)
        self._chown(cert, key)

    # --- connecting ------------------------------------------------------------

    def dsn(
        self,
        dbname: str = "postgres",
        user: str | None = None,
        password: str | None = None,
        *,
        unix_socket: bool = False,
        **options: str | int,
    ) -> str:
        """A libpq keyword/value connection string; superuser unless ``user`` is given."""
        params: dict[str, str | int] = {
            "host": str(self.socket_dir) if unix_socket else self.host,
            "port": self.port,
            "dbname": dbname,
            "user": user if user is not None else self.superuser,
        }
        if user is None:
            params["password"] = self.password
        elif password is not None:
            params["password"] = password
        params.update(options)
        return " ".join(f"{key}={_quote_dsn_value(str(value))}" for key, value in params.items())

    def url(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """A ``postgresql://`` URL (TCP); superuser unless ``user`` is given."""
        user_name = user if user is not None else self.superuser
        secret = self.password if user is None else password
        auth = quote(user_name, safe="")
        if secret is not None:
            auth += ":" + quote(secret, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def env(self, dbname: str = "postgres") -> dict[str, str]:
        """Environment for libpq tools (psql, pg_dump...) to reach the cluster as superuser."""
        return {
            **os.environ,
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.superuser,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
        }

    def psql(self, sql: str, dbname: str = "postgres", *, timeout: float = 120.0) -> str:
        """Run SQL (several statements allowed) as superuser; unaligned, tuples-only output.

        Raises :class:`ClusterError` with psql's messages when a statement fails.
        """
        psql = self.bindir / "psql"
        command = [
            str(psql if psql.is_file() else shutil.which("psql") or "psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set",
            "ON_ERROR_STOP=1",
            "--file",
            "-",
        ]
        result = subprocess.run(
            command,
            input=sql,
            capture_output=True,
            text=True,
            env=self.env(dbname),
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def log_tail(self, max_bytes: int = 8192) -> str:
        """The end of the server log, for error messages."""
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - max_bytes))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # --- internals -------------------------------------------------------------

    def _start_once(self, deadline: float) -> None:
        log = self.log_file.open("ab")
        self._server.log = log
        self._server.process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, not the postmaster
            env=self._server_env(),
            user=self._run_as.pw_uid if self._run_as else None,
            group=self._run_as.pw_gid if self._run_as else None,
            extra_groups=[] if self._run_as else None,
        )
        pid_file = self.data_dir / "postmaster.pid"
        while time.monotonic() < deadline:
            if not self.running:
                self._server.process = None
                self._server.close_log()
                raise ClusterError(f"postgres exited during startup:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text(encoding="utf-8").splitlines()
                # Line 8 of postmaster.pid is the postmaster status, "ready" once it accepts.
                if (
                    len(lines) >= 8
                    and lines[0].strip() == str(self.postmaster_pid)
                    and lines[7].strip() == "ready"
                ):
                    return
            time.sleep(0.05)
        self._server.shutdown("immediate", 5.0)
        raise ClusterError(f"postgres did not become ready in time:\n{self.log_tail()}")

    def _server_env(self) -> dict[str, str] | None:
        if self._run_as is None:
            return None
        return {**os.environ, "HOME": self._run_as.pw_dir, "USER": self._run_as.pw_name}

    def _run_as_server_user(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.base_dir,
            check=False,
            timeout=120,
            env=self._server_env(),
            user=self._run_as.pw_uid if self._run_as else None,
            group=self._run_as.pw_gid if self._run_as else None,
            extra_groups=[] if self._run_as else None,
        )

    def _chown(self, *paths: Path) -> None:
        if self._run_as is None:
            return
        for path in paths:
            os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)


def _quote_dsn_value(value: str) -> str:
    if value and not any(ch in value for ch in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _generate_server_certificate(
    dns_names: Sequence[str],
    addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> tuple[bytes, bytes, bytes]:
    """A throwaway CA and a server certificate it signed: (cert PEM, key PEM, CA PEM).

    Valid for 30 days for the given names and addresses; the key is unencrypted.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=30))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pgwarden test cluster CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(address) for address in addresses]
    common_name = dns_names[0] if dns_names else str(addresses[0])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key_pem,
        ca_cert.public_bytes(serialization.Encoding.PEM),
    )

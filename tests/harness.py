"""The test harness: gateway subprocesses, upstream roles and small shared helpers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg

from pgwarden.pgcluster import TemporaryCluster, find_free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

# Upstream roles, each with a password that only the gateway's configuration holds.
SCRAM_ROLE = "app_scram"
SCRAM_PASSWORD = "upstream-scram-Secret-7f3a9c"
MD5_ROLE = "app_md5"
MD5_PASSWORD = "upstream-md5-Secret-2b8e41"
TLS_ROLE = "app_tls"
TLS_PASSWORD = "upstream-tls-Secret-95d0c7"
TEST_DATABASE = "gwtest"

# Static client logins accepted by the gateway.
CLIENT_USER = "alice"
CLIENT_PASSWORD = "alice-client-pw"
OTHER_CLIENT_USER = "bob"
OTHER_CLIENT_PASSWORD = "bob-client-pw"

READY_LINE = re.compile(r"pgwarden listening on (\S+):(\d+)")
GATEWAY_START_TIMEOUT = 30.0


def create_database(cluster: TemporaryCluster, name: str, owner: str = SCRAM_ROLE) -> None:
    cluster.psql(f"drop database if exists {name} with (force)")
    cluster.psql(f"create database {name} owner {owner}")


@dataclass(frozen=True)
class GatewayCertificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


class GatewayProcess:
    """One ``python -m pgwarden serve`` subprocess; stderr is collected in a thread."""

    def __init__(self, process: subprocess.Popen[bytes], settings: Mapping[str, Any]) -> None:
        self.process = process
        self.settings = settings
        self.host = "127.0.0.1"
        self.port = 0
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._lines.append(line)
            match = READY_LINE.search(line)
            if match and not self._ready.is_set():
                self.host, self.port = match.group(1), int(match.group(2))
                self._ready.set()
        self._ready.set()  # EOF: wake a waiter so it sees the exit

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self._lines)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = GATEWAY_START_TIMEOUT) -> None:
        if not self._ready.wait(timeout) or self.port == 0:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(
                f"gateway did not report 'pgwarden listening on' "
                f"(exit code {self.process.returncode}); stderr:\n{self.stderr}"
            )

    def dsn(
        self,
        user: str = CLIENT_USER,
        password: str | None = CLIENT_PASSWORD,
        dbname: str = TEST_DATABASE,
        **options: str | int,
    ) -> str:
        """libpq connection string for the gateway (plaintext unless ``sslmode`` is given)."""
        params: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "user": user,
            "dbname": dbname,
            "sslmode": "disable",
            "connect_timeout": 10,
        }
        if password is not None:
            params["password"] = password
        params.update(options)
        return " ".join(f"{k}='{v}'" for k, v in params.items())

    def connect(self, **options: Any) -> psycopg.Connection[Any]:
        dsn_options = {k: options.pop(k) for k in list(options) if k not in _PSYCOPG_KWARGS}
        return psycopg.connect(self.dsn(**dsn_options), **options)

    def asyncpg_options(self, **options: Any) -> dict[str, Any]:
        """``asyncpg.connect`` / ``create_pool`` arguments for the gateway (plaintext, the
        test client's credentials unless ``options`` say otherwise)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": CLIENT_USER,
            "password": CLIENT_PASSWORD,
            "database": TEST_DATABASE,
            "ssl": False,
            "timeout": 10,
            **options,
        }

    async def connect_asyncpg(self, **options: Any) -> asyncpg.Connection:
        return await asyncpg.connect(**self.asyncpg_options(**options))

    def env(self, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> dict[str, str]:
        """Environment for libpq command-line tools (psql, pgbench, pg_dump) via the gateway."""
        return {
            **os.environ,
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": user,
            "PGPASSWORD": password,
            "PGDATABASE": TEST_DATABASE,
            "PGSSLMODE": "disable",
            "PGCONNECT_TIMEOUT": "10",
        }

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit status (kills it if it does not exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"gateway did not exit within {timeout} s of SIGTERM; stderr:\n{self.stderr}"
                ) from None
        self._reader.join(5)
        return self.process.returncode


_PSYCOPG_KWARGS = {"autocommit", "prepare_threshold", "row_factory", "cursor_factory"}


def rss_kib(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """``PGWARDEN_*`` variables for a settings mapping (nested tables joined with ``__``)."""

    def encode(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list | dict):
            return json.dumps(value)
        return str(value)

    env: dict[str, str] = {}
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                if sub_value is not None:
                    env[f"PGWARDEN_{key.upper()}__{sub_key.upper()}"] = encode(sub_value)
        else:
            env[f"PGWARDEN_{key.upper()}"] = encode(value)
    return env


def gateway_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgwarden", *args]


def gateway_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without stray ``PGWARDEN_*`` settings, package importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGWARDEN_")}
    python_path = [str(REPO_ROOT / "python"), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class GatewayLauncher:
    """Starts gateways with the suite's defaults merged with per-test settings."""

    def __init__(self, cluster: TemporaryCluster, certs: GatewayCertificates) -> None:
        self.cluster = cluster
        self.certs = certs

    def default_settings(self) -> dict[str, Any]:
        return {
            "listen_host": "127.0.0.1",
            "listen_port": find_free_port(),
            "upstream": {
                "host": self.cluster.host,
                "port": self.cluster.port,
                "user": SCRAM_ROLE,
                "password": SCRAM_PASSWORD,
                "tls": "disable",
                "connect_timeout_seconds": 10,
            },
            "users": [
                {"name": CLIENT_USER, "password": CLIENT_PASSWORD},
                {"name": OTHER_CLIENT_USER, "password": OTHER_CLIENT_PASSWORD},
            ],
            "tls_cert_file": str(self.certs.cert_file),
            "tls_key_file": str(self.certs.key_file),
            "drain_timeout_seconds": 5,
            "log_level": "info",
        }

    def start(self, settings: Mapping[str, Any] | None = None) -> GatewayProcess:
        merged = _deep_merge(self.default_settings(), settings or {})
        process = subprocess.Popen(
            gateway_command("serve"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=gateway_environment(settings_env(merged)),
        )
        gateway = GatewayProcess(process, merged)
        gateway.wait_ready()
        return gateway


StartGateway = Callable[..., GatewayProcess]


def stop_and_check(gateway: GatewayProcess) -> None:
    code = gateway.terminate()
    assert code == 0, f"gateway exited with {code} after SIGTERM; stderr:\n{gateway.stderr}"


def run_tool(
    command: list[str], env: Mapping[str, str], timeout: float = 120, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a libpq command-line tool; never raises on a non-zero exit."""
    return subprocess.run(
        command,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def run_pgwarden(
    *args: str, env: Mapping[str, str] | None = None, stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a ``pgwarden`` command to its end (the suite's environment unless ``env``), its
    output captured as text; never raises on a non-zero exit."""
    return subprocess.run(
        gateway_command(*args),
        env=dict(env) if env is not None else gateway_environment(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def backends_running(superuser_conn: psycopg.Connection[Any], marker: str) -> list[int]:
    """PIDs of upstream backends whose current query contains ``marker``."""
    rows = superuser_conn.execute(
        "select pid from pg_stat_activity where query like %s and pid <> pg_backend_pid()",
        (f"%{marker}%",),
    ).fetchall()
    return [row[0] for row in rows]


@contextlib.contextmanager
def background(target: Callable[[], Any]) -> Iterator[dict[str, Any]]:
    """Run ``target`` in a thread; the dict gets ``result`` or ``error`` when it ends."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = target()
        except BaseException as exc:  # reported to the test through the dict
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    try:
        yield outcome
    finally:
        thread.join(60)

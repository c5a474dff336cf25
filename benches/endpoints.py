"""Where a benchmark client connects: PostgreSQL itself, pgbouncer or pgwarden."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """A host/port speaking the PostgreSQL protocol, and the login the clients use."""

    name: str
    host: str
    port: int
    user: str
    password: str
    dbname: str
    tls: bool
    """Whether the endpoint accepts ``sslmode=require``."""

    def conninfo(self, *, tls: bool) -> str:
        """libpq keyword/value connection string."""
        params = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "password": self.password,
            "dbname": self.dbname,
            "sslmode": "require" if tls else "disable",
            "connect_timeout": "10",
            "application_name": "pgwarden-bench",
        }
        return " ".join(f"{key}={_quote(value)}" for key, value in params.items())

    def asyncpg_login(self) -> dict[str, str | int]:
        """``asyncpg.connect`` keyword arguments naming the server and the login."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.dbname,
        }

    def libpq_env(self, *, tls: bool) -> dict[str, str]:
        """Environment for libpq programs (pgbench), so no secret shows on a command line."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=self.dbname,
            PGSSLMODE="require" if tls else "disable",
            PGCONNECT_TIMEOUT="10",
            PGAPPNAME="pgwarden-bench",
        )
        return env


def _quote(value: str) -> str:
    if value and not any(ch in value for ch in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"

"""Prometheus metrics: worker 0 serves every worker's figures and the audit trail's at
``metrics_listen``; a scraper sees sessions, statements, refusals and bytes move."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pydantic
import pytest

from harness import (
    GatewayLauncher,
    GatewayProcess,
    StartGateway,
    find_free_port,
    gateway_command,
    gateway_environment,
    settings_env,
    wait_until,
)
from pgwarden.config import Settings

POLICY = """
default = "allow"
version = "metrics-1"

[[rule]]
name = "no drops"
statements = ["ddl"]
action = "deny"
"""


def scrape(url: str) -> dict[str, float]:
    """``{'name{labels}': value}`` of one scrape (labels as the gateway writes them)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], metric: str, **labels: str) -> float:
    """The sum over workers of ``metric`` with ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for name, value in samples.items()
        if re.fullmatch(rf"{metric}(\{{.*\}})?", name) and all(w in name for w in wanted)
    )


def test_a_scrape_sees_sessions_statements_and_refusals(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    port = find_free_port()
    gateway: GatewayProcess = start_gateway(
        {
            "workers": 2,
            "metrics_listen": f"127.0.0.1:{port}",
            "policy_file": str(policy),
            "audit": {"directory": str(tmp_path / "audit"), "start_shipper": False},
        }
    )
    url = f"http://127.0.0.1:{port}/metrics"
    before = scrape(url)
    assert total(before, "pgwarden_sessions_total") == 0
    sessions: list[psycopg.Connection[Any]] = [gateway.connect(autocommit=True) for _ in range(3)]
    try:
        for conn in sessions:
            for i in range(5):
                assert conn.execute("select %s::int", (i,)).fetchone() == (i,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            sessions[0].execute("drop table if exists nothing_here")
        _refused_login(gateway)

        def settled() -> bool:
            now = scrape(url)
            return (
                total(now, "pgwarden_sessions_open") == 3
                and total(now, "pgwarden_statements_total") == 16
            )

        assert wait_until(settled, 10), scrape(url)
        now = scrape(url)
        assert total(now, "pgwarden_sessions_total") == 3
        assert total(now, "pgwarden_statements_refused_total") == 1
        assert total(now, "pgwarden_connections_refused_total", sqlstate="28P01") == 1
        assert total(now, "pgwarden_client_bytes_total") > 0
        assert total(now, "pgwarden_server_bytes_total") > total(now, "pgwarden_client_bytes_total")
        assert total(now, "pgwarden_resident_memory_bytes") > 10 * 1024 * 1024
        assert {name for name in now if name.startswith("pgwarden_sessions_open")} == {
            'pgwarden_sessions_open{worker="0"}',
            'pgwarden_sessions_open{worker="1"}',
        }
        # No shipper runs: the records wait in the spool, and the scrape says so.
        assert now["pgwarden_audit_shipper_up"] == 0
        assert now["pgwarden_audit_undelivered_records"] > 0
        assert now["pgwarden_audit_spool_bytes"] > 0
    finally:
        for conn in sessions:
            conn.close()
    # Ended sessions keep their statements in the totals.
    assert wait_until(lambda: total(scrape(url), "pgwarden_sessions_open") == 0, 10)
    assert total(scrape(url), "pgwarden_statements_total") == 16
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert missing.value.code == 404


def _refused_login(gateway: GatewayProcess) -> None:
    async def login() -> None:
        await asyncpg.connect(**gateway.asyncpg_options(password="not the password"))

    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(login())


@pytest.mark.parametrize("listen", ["9187", "localhost:", "localhost:99999", ":9187"])
def test_a_metrics_address_that_is_not_host_port_is_refused(listen: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not host:port"):
        Settings(metrics_listen=listen)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_metrics_address_in_use_stops_the_gateway_with_the_reason(
    gateway_launcher: GatewayLauncher, workers: int
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = {**gateway_launcher.default_settings(), "workers": workers}
        settings["metrics_listen"] = listen
        result = subprocess.run(
            gateway_command("serve"),
            env=gateway_environment(settings_env(settings)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert f"cannot serve metrics on {listen}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr

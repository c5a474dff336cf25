"""``pgwarden demo``: up within a minute, shows an audit record and a statement the policy
refuses, Ctrl-C cleans up."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness import gateway_command, gateway_environment, run_tool, wait_until


@pytest.mark.slow
def test_demo_walkthrough() -> None:
    process = subprocess.Popen(
        gateway_command("demo", "--port", "0"),
        env=gateway_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Ctrl-C to stop" in line:
                break
        text = "".join(output)
        assert "Ctrl-C to stop" in text, text

        command = re.search(r"PGPASSWORD=(\S+) psql '([^']+)'", text)
        assert command, text
        env = {**gateway_environment(), "PGPASSWORD": command.group(1).strip("'")}
        result = run_tool(
            ["psql", "-Atc", "select count(*) from shop.customers", command.group(2)], env
        )
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) >= 1000

        log_path = Path(re.search(r"tail -f (\S+)", text).group(1))  # type: ignore[union-attr]
        assert log_path.is_file()
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        record = next(r for r in records if "statement" in r)  # connection events share the log
        assert record["user"] == "demo"
        assert "shop.customers" in record["statement"]
        assert "Audit record" in text
        # The statement policy refused the DROP; the table is still there.
        assert 'permission denied by pgwarden policy: rule "no schema changes"' in text
        drop = next(r for r in records if r.get("statement") == "drop table shop.orders")
        assert drop["sqlstate"] == "42501"
        result = run_tool(
            ["psql", "-Atc", "select count(*) from shop.orders", command.group(2)], env
        )
        assert result.returncode == 0 and int(result.stdout) == 5000, result.stderr
        # The customers' email and phone come back masked; reading around it is refused.
        assert "1 | Customer 1 | ****  | ****" in text, text
        assert "customer1@example.com" not in text
        assert "permission denied by pgwarden masking: email is used in WHERE" in text
        result = run_tool(
            ["psql", "-Atc", "select email from shop.customers where id = 2", command.group(2)],
            env,
        )
        assert result.stdout.strip() == "****", result.stdout
        # The metrics endpoint counts what the walkthrough did (published once a second):
        # the DROP, the read around the mask and the role change were refused.
        url = re.search(r"curl -s (http://\S+/metrics)", text)
        assert url, text
        assert wait_until(lambda: _refused_statements(url.group(1)) >= 3, 10)
        directory = log_path.parent
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    assert "cleaned up" in rest
    assert not directory.exists()


def _refused_statements(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        scrape = response.read().decode()
    found = re.search(r'^pgwarden_statements_refused_total\{worker="0"\} (\d+)$', scrape, re.M)
    assert found, scrape
    return int(found.group(1))

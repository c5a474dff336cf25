"""``pgwarden serve`` configuration errors: a clear message and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg

from harness import (
    CLIENT_PASSWORD,
    CLIENT_USER,
    SCRAM_PASSWORD,
    SCRAM_ROLE,
    TEST_DATABASE,
    GatewayProcess,
    gateway_command,
    gateway_environment,
    stop_and_check,
)
from pgwarden.demo import toml_document
from pgwarden.pgcluster import TemporaryCluster, find_free_port


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_command("serve", *args),
        env=gateway_environment(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_clear_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode > 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, f"{text!r} not in stderr:\n{result.stderr}"


def valid_config(cluster: TemporaryCluster) -> dict[str, Any]:
    return {
        "listen_host": "127.0.0.1",
        "listen_port": find_free_port(),
        "upstream": {
            "host": cluster.host,
            "port": cluster.port,
            "user": SCRAM_ROLE,
            "password": SCRAM_PASSWORD,
            "tls": "disable",
        },
        "users": [{"name": CLIENT_USER, "password": CLIENT_PASSWORD}],
        "drain_timeout_seconds": 2,
    }


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    assert_clear_failure(serve("--config", str(missing)), "nowhere.toml")


def test_config_file_with_toml_syntax_error(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('listen_port = 6432\n[upstream\nhost = "x"\n')
    assert_clear_failure(serve("--config", str(config)), "broken.toml")


def test_config_value_out_of_range(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("listen_port = 70000\n")
    assert_clear_failure(serve("--config", str(config)), "listen_port")


def test_config_wrong_type_in_nested_table(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[upstream]\nport = "not a number"\n')
    assert_clear_failure(serve("--config", str(config)), "port")


def test_config_unknown_setting(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text("listen_prot = 6432\n")
    assert_clear_failure(serve("--config", str(config)), "listen_prot")


def test_tls_certificate_without_key(tmp_path: Path) -> None:
    config = tmp_path / "tls.toml"
    config.write_text(f'tls_cert_file = "{tmp_path / "cert.pem"}"\n')
    assert_clear_failure(serve("--config", str(config)), "tls_key_file")


def test_require_client_tls_without_certificate() -> None:
    result = serve(env={"PGWARDEN_REQUIRE_CLIENT_TLS": "true"})
    assert_clear_failure(result, "require_client_tls")


def test_bad_environment_variable() -> None:
    assert_clear_failure(serve(env={"PGWARDEN_LISTEN_PORT": "abc"}), "listen_port")


def test_listen_port_in_use(cluster: TemporaryCluster) -> None:
    result = serve(env={"PGWARDEN_LISTEN_PORT": str(cluster.port)})
    assert_clear_failure(result)
    assert str(cluster.port) in result.stderr


def test_help() -> None:
    result = subprocess.run(
        gateway_command("serve", "--help"),
        env=gateway_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_serve_from_toml_file(cluster: TemporaryCluster, tmp_path: Path) -> None:
    settings = valid_config(cluster)
    config = tmp_path / "pgwarden.toml"
    config.write_text(toml_document(settings))
    process = subprocess.Popen(
        gateway_command("serve", "--config", str(config)),
        env=gateway_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    gateway = GatewayProcess(process, settings)
    try:
        gateway.wait_ready()
        assert gateway.port == settings["listen_port"]
        with psycopg.connect(gateway.dsn(dbname=TEST_DATABASE)) as conn:
            assert conn.execute("select current_user").fetchone() == (SCRAM_ROLE,)
    finally:
        stop_and_check(gateway)


def test_environment_overrides_file(cluster: TemporaryCluster, tmp_path: Path) -> None:
    settings = valid_config(cluster)
    file_port = settings["listen_port"]
    env_port = find_free_port()
    config = tmp_path / "pgwarden.toml"
    config.write_text(toml_document(settings))
    process = subprocess.Popen(
        gateway_command("serve", "--config", str(config)),
        env=gateway_environment({"PGWARDEN_LISTEN_PORT": str(env_port)}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    gateway = GatewayProcess(process, settings)
    try:
        gateway.wait_ready()
        assert gateway.port == env_port != file_port
    finally:
        stop_and_check(gateway)


def test_misspelt_environment_variable_is_an_error() -> None:
    # One underscore instead of two: without the check, audit would silently stay off.
    result = serve(env={"PGWARDEN_AUDIT_DIRECTORY": "/var/lib/pgwarden/audit"})
    assert_clear_failure(result, "PGWARDEN_AUDIT_DIRECTORY")
    assert "did you mean PGWARDEN_AUDIT__DIRECTORY?" in result.stderr

"""Tamper evidence: ``pgwarden audit verify`` finds a changed or missing record.

Records written by a real gateway, checked in the spool (the backend is down, so they
stay there) and in the file written by the ``file`` exporter; then one record is altered
or removed, and verify must name the first broken link.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from harness import StartGateway, gateway_command, gateway_environment, run_tool, wait_until
from pgwarden.audit.spool import AuditPaths, list_streams, segment_names
from pgwarden.pgcluster import find_free_port


def verify(path: Path, *, key_file: Path | None = None, directory: Path | None = None) -> Any:
    command = gateway_command("audit", "verify", str(path))
    if key_file is not None:
        command += ["--key-file", str(key_file)]
    env = gateway_environment(
        {"PGWARDEN_AUDIT__DIRECTORY": str(directory)} if directory is not None else {}
    )
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def run_statements(gateway: Any, tag: str, count: int) -> None:
    for i in range(count):
        result = run_tool(
            ["psql", "--no-psqlrc", "-X", "-c", f"select '{tag}-{i}' as marker"], gateway.env()
        )
        assert result.returncode == 0, result.stderr


def find_record(lines: list[bytes], needle: bytes) -> tuple[int, dict[str, Any]]:
    for i, line in enumerate(lines):
        if needle in line:
            return i, json.loads(line)
    raise AssertionError(f"{needle!r} not found")


def test_tampering_with_the_spool_is_detected(start_gateway: StartGateway, tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    gateway = start_gateway(
        {
            "audit": {
                "directory": str(directory),
                "exporter": "otlp_http",
                "endpoint": f"http://127.0.0.1:{find_free_port()}",  # nobody there
                "timeout_seconds": 1,
            }
        }
    )
    run_statements(gateway, "chain", 5)
    assert gateway.terminate() == 0
    good = verify(directory, directory=directory)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^OK: \d+ records in 1 stream", good.stdout, re.M)

    # Change one character of one statement's SQL, in place.
    pristine = tmp_path / "pristine"
    shutil.copytree(directory, pristine)
    (stream,) = list_streams(AuditPaths(directory).spool)
    segment = stream / segment_names(stream)[0]
    data = segment.read_bytes()
    lines = data.rstrip(b"\0").split(b"\n")
    index, record = find_record(lines, b"select 'chain-2' as marker")
    segment.write_bytes(data.replace(b"select 'chain-2' as marker", b"select 'chain-X' as marker"))
    bad = verify(directory, directory=directory)
    assert bad.returncode == 1
    assert "BROKEN" in bad.stdout
    assert f"seq {record['seq']} at {stream.name}/{segment.name}:{index + 1}" in bad.stdout
    assert "hash mismatch" in bad.stdout

    # Remove one record instead: the link after the gap is reported missing.
    (stream,) = list_streams(AuditPaths(pristine).spool)
    segment = stream / segment_names(stream)[0]
    lines = segment.read_bytes().rstrip(b"\0").split(b"\n")
    index, record = find_record(lines, b"select 'chain-3' as marker")
    del lines[index]
    segment.write_bytes(b"\n".join(lines))
    gap = verify(pristine, key_file=pristine / "chain.key")
    assert gap.returncode == 1
    assert f"records {record['seq']}..{record['seq']} are missing" in gap.stdout


def test_tampering_with_an_exported_file_is_detected(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    exported = tmp_path / "trail.jsonl"
    gateway = start_gateway(
        {
            "audit": {
                "directory": str(directory),
                "exporter": "file",
                "export_path": str(exported),
                "poll_interval_ms": 50,
            }
        }
    )
    run_statements(gateway, "exported", 4)
    assert wait_until(
        lambda: exported.exists() and exported.read_bytes().count(b"session_end") == 4,
        timeout=30,
    )
    assert gateway.terminate() == 0
    key = directory / "chain.key"
    good = verify(exported, key_file=key)
    assert good.returncode == 0, good.stdout
    assert "OK:" in good.stdout

    lines = exported.read_bytes().splitlines()
    index, record = find_record(lines, b"select 'exported-1' as marker")
    lines[index] = lines[index].replace(b"exported-1", b"exported-9")
    exported.write_bytes(b"\n".join(lines) + b"\n")
    bad = verify(exported, key_file=key)
    assert bad.returncode == 1
    assert f"seq {record['seq']} at trail.jsonl:{index + 1}: hash mismatch" in bad.stdout

    # A wrong key fails every link from the first record on.
    other_key = tmp_path / "other.key"
    other_key.write_text("not-the-key\n")
    wrong = verify(exported, key_file=other_key)
    assert wrong.returncode == 1
    assert "seq 1 at trail.jsonl:1: hash mismatch" in wrong.stdout

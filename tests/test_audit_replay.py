"""Session recording: ``pgwarden replay`` shows what the client saw.

A psql session through the gateway (results with numbers, text, NULLs, several rows and
none, a multi-line value, commands, an error, a notice); its replayed transcript must
contain psql's own screen output, line for line and in order, plus who ran it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import (
    CLIENT_USER,
    StartGateway,
    gateway_command,
    gateway_environment,
    run_tool,
    wait_until,
)

SCRIPT = """\
select 1 as id, 'alice' as name, null::text as nothing, 2.5::numeric as amount;
create temp table replay_t (id int, label text);
insert into replay_t select g, 'row ' || g from generate_series(1, 12) g;
select id, label from replay_t where id <= 3 order by id;
select id from replay_t where false;
select 'two' || chr(10) || 'lines' as multi, 42 as answer;
select * from replay_missing_table;
begin;
update replay_t set label = 'changed' where id = 1;
commit;
do $$ begin raise notice 'hello from the server'; end $$;
select count(*) as total from replay_t;
"""


def test_replay_matches_psql_output(start_gateway: StartGateway, tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    gateway = start_gateway(
        {
            "audit": {
                "directory": str(directory),
                "exporter": "file",
                "export_path": str(tmp_path / "trail.jsonl"),
                "poll_interval_ms": 50,
                "recording_max_rows": 5,
            }
        }
    )
    shown = run_tool(["psql", "--no-psqlrc", "-X", "-f", "-"], gateway.env(), input=SCRIPT)
    assert "(3 rows)" in shown.stdout, shown.stderr
    sessions = directory / "sessions"
    assert wait_until(
        lambda: any(b"session_end" in p.read_bytes() for p in sessions.glob("*.jsonl")),
        timeout=30,
    )
    (recording,) = sessions.glob("*.jsonl")
    session_id = recording.stem
    replay = subprocess.run(
        [*gateway_command("replay", session_id, "--dir", str(sessions))],
        env=gateway_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    transcript = replay.stdout

    # Everything psql printed appears in the transcript, in the same order.
    position = 0
    for line in shown.stdout.splitlines():
        if not line.strip():
            continue
        found = transcript.find(line + "\n", position)
        assert found >= 0, (
            f"psql showed {line!r}, the replay does not (after {position}):\n{transcript}"
        )
        position = found + len(line)
    # Errors and notices went to psql's stderr; the transcript has them in place.
    assert 'ERROR:  relation "replay_missing_table" does not exist' in transcript
    assert "NOTICE:  hello from the server" in transcript
    # Who ran it, where, and each statement's SQL and decision.
    assert f"-- session {session_id}: {CLIENT_USER}" in transcript
    assert "select id, label from replay_t where id <= 3 order by id;" in transcript
    assert " · allow" in transcript
    assert "SQLSTATE 42P01" in transcript


def test_recording_caps_rows_but_reports_the_count(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    directory = tmp_path / "audit"
    gateway = start_gateway(
        {
            "audit": {
                "directory": str(directory),
                "exporter": "file",
                "export_path": str(tmp_path / "trail.jsonl"),
                "poll_interval_ms": 50,
                "recording_max_rows": 3,
            }
        }
    )
    result = run_tool(
        ["psql", "--no-psqlrc", "-X", "-c", "select g from generate_series(1, 50) g"],
        gateway.env(),
    )
    assert "(50 rows)" in result.stdout
    sessions = directory / "sessions"
    assert wait_until(
        lambda: any(b"session_end" in p.read_bytes() for p in sessions.glob("*.jsonl")),
        timeout=30,
    )
    (recording,) = sessions.glob("*.jsonl")
    replay = subprocess.run(
        [*gateway_command("replay", recording.stem, "--dir", str(sessions))],
        env=gateway_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = replay.stdout
    assert "(50 rows)" in out  # the count the client got
    assert "\n 3\n" in out and "\n 4\n" not in out  # only the first rows are kept
    assert "-- recording cut: 47 more row(s)" in out

"""Session recording: ``pgwarden replay`` shows what the client saw.

A psql session through the gateway (results with numbers, text, NULLs, several rows and
none, a multi-line value, commands, an error, a notice); its replayed transcript must
contain psql's own screen output, line for line and in order, plus who ran it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness import (
    CLIENT_USER,
    GatewayProcess,
    StartGateway,
    gateway_command,
    gateway_environment,
    run_pgwarden,
    run_tool,
    wait_until,
)
from otlp_receiver import OtlpReceiver
from pgwarden.audit.recording import INDEX, SessionRecorder, read_session
from pgwarden.audit.spool import AuditPaths, list_streams, segment_names

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


def pgwarden(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a pgwarden command to its end, its output captured as text."""
    return run_pgwarden(*args, env=env)


def recorded_sessions(directory: Path, count: int = 1) -> list[str]:
    """The ids of the recorded sessions, once ``count`` of them are recorded to their end."""

    def ended() -> list[str]:
        found = []
        for index in directory.glob(f"recorded/*/{INDEX}"):
            for line in index.read_text().splitlines():
                session_id = line.split()[0]
                try:
                    records = read_session(directory, session_id)
                except FileNotFoundError:
                    continue
                if records[-1]["type"] == "session_end":
                    found.append(session_id)
        return found

    assert wait_until(lambda: len(ended()) >= count, timeout=30), ended()
    return ended()


def recording_gateway(
    start_gateway: StartGateway, tmp_path: Path, **audit: object
) -> tuple[GatewayProcess, Path]:
    """A gateway recording sessions under ``tmp_path/audit``, exporting spans to a file
    there; ``audit`` adds or overrides settings.  Returns it and the audit directory."""
    directory = tmp_path / "audit"
    settings = {
        "directory": str(directory),
        "exporter": "file",
        "export_path": str(tmp_path / "trail.jsonl"),
        "poll_interval_ms": 50,
        **audit,
    }
    return start_gateway({"audit": settings}), directory


def test_replay_matches_psql_output(start_gateway: StartGateway, tmp_path: Path) -> None:
    gateway, directory = recording_gateway(start_gateway, tmp_path, recording_max_rows=5)
    shown = run_tool(["psql", "--no-psqlrc", "-X", "-f", "-"], gateway.env(), input=SCRIPT)
    assert "(3 rows)" in shown.stdout, shown.stderr
    (session_id,) = recorded_sessions(directory)
    replay = pgwarden("replay", session_id, "--dir", str(directory))
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
    gateway, directory = recording_gateway(start_gateway, tmp_path, recording_max_rows=3)
    result = run_tool(
        ["psql", "--no-psqlrc", "-X", "-c", "select g from generate_series(1, 50) g"],
        gateway.env(),
    )
    assert "(50 rows)" in result.stdout
    (session_id,) = recorded_sessions(directory)
    replay = pgwarden("replay", session_id, "--dir", str(directory))
    out = replay.stdout
    assert "(50 rows)" in out  # the count the client got
    assert "\n 3\n" in out and "\n 4\n" not in out  # only the first rows are kept
    assert "-- recording cut: 47 more row(s)" in out


def test_replay_names_the_columns_of_every_extended_execution(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """libpq sends Bind, Describe, Execute and Sync together for each execution of a
    prepared statement (and Parse first for a parameterised one): the columns come
    back after the Execute was sent, and every execution's transcript names them."""
    gateway, directory = recording_gateway(start_gateway, tmp_path)
    seen = []
    with gateway.connect(autocommit=True) as conn:
        for i in range(3):
            row = conn.execute(
                "select %s::int as answer, 'x' || %s::text as label", (40 + i, i), prepare=True
            ).fetchone()
            seen.append(row)
        seen.append(conn.execute("select %s::int as total", (7,), prepare=False).fetchone())
    assert seen == [(40, "x0"), (41, "x1"), (42, "x2"), (7,)]
    (session_id,) = recorded_sessions(directory)
    replay = pgwarden("replay", session_id, "--dir", str(directory))
    assert replay.returncode == 0, replay.stderr
    transcript = replay.stdout
    assert "?column?" not in transcript, transcript
    headers = [line for line in transcript.splitlines() if line.strip().startswith("answer |")]
    assert [[c.strip() for c in h.split("|")] for h in headers] == [["answer", "label"]] * 3
    for value in ("40 | x0", "41 | x1", "42 | x2"):
        assert value in transcript, transcript
    assert re.search(r"^ *total *$", transcript, re.MULTILINE), transcript
    assert re.search(r"^ *7 *$", transcript, re.MULTILINE), transcript


def cached_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by ``mincore`` on a mapping."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if pages == 0:
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            vector = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vector), pages
        finally:
            del anchor


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` is on tmpfs, whose pages are the files themselves."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        target = fields[1]
        if str(path).startswith(target.rstrip("/") + "/") and len(target) > len(best):
            best, kind = target, fields[2]
    return kind in {"tmpfs", "ramfs"}


def test_recordings_are_the_delivered_segments(start_gateway: StartGateway, tmp_path: Path) -> None:
    """Spans go to a real OTLP receiver; two sessions interleave over many small segments.
    Each delivered segment moves into the recording (no second copy of its records), the
    chain of the recorded stream verifies, and each session replays whole and alone."""
    directory = tmp_path / "audit"
    with OtlpReceiver("http") as receiver:
        gateway = start_gateway(
            {
                "audit": {
                    "directory": str(directory),
                    "exporter": "otlp_http",
                    "endpoint": receiver.endpoint,
                    "poll_interval_ms": 50,
                    "segment_bytes": 16 * 1024,
                }
            }
        )
        statements = 150
        with gateway.connect() as a, gateway.connect() as b:
            for i in range(statements):
                a.execute(f"select {i} as seg_a_{i}")
                b.execute(f"select {i} as seg_b_{i}")
        sessions = recorded_sessions(directory, count=2)
        assert receiver.wait_for(lambda spans: len(spans) >= 2 * statements + 2, timeout=30)
        assert gateway.terminate() == 0
        # What the gateway's shipper left (the stream's close) is shipped by hand.
        env = gateway_environment(
            {
                "PGWARDEN_AUDIT__DIRECTORY": str(directory),
                "PGWARDEN_AUDIT__EXPORTER": "otlp_http",
                "PGWARDEN_AUDIT__ENDPOINT": receiver.endpoint,
            }
        )
        shipped = pgwarden("audit", "ship", "--until-empty", env=env)
        assert shipped.returncode == 0, shipped.stderr

    paths = AuditPaths(directory)
    (stream,) = list_streams(paths.recorded)
    kept = segment_names(stream)
    assert len(kept) > 10, kept  # the records spanned many segments, all kept
    assert not (directory / "sessions").exists()  # no second copy
    assert not any(segment_names(s) for s in list_streams(paths.spool))  # all delivered
    if not on_tmpfs(directory):
        # Kept segments leave the page cache: they are read again only by a replay or a
        # check.  (One the gateway still mapped when it was moved may stay.)
        cached = [cached_pages(stream / name) for name in kept]
        assert sum(c for c, _ in cached) <= sum(n for _, n in cached) // 4, cached

    checked = pgwarden(
        "audit",
        "verify",
        str(directory),
        env=gateway_environment({"PGWARDEN_AUDIT__DIRECTORY": str(directory)}),
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"^OK: \d+ records in 1 stream", checked.stdout, re.M), checked.stdout

    for session_id in sessions:
        replay = pgwarden("replay", session_id, "--dir", str(directory))
        assert replay.returncode == 0, replay.stderr
        mine = "a" if "seg_a_0" in replay.stdout else "b"
        other = "b" if mine == "a" else "a"
        positions = [replay.stdout.find(f"as seg_{mine}_{i};") for i in range(statements)]
        assert all(p >= 0 for p in positions), replay.stdout[-2000:]
        assert positions == sorted(positions)
        assert f"seg_{other}_" not in replay.stdout

    # The raw records of one session: its lines exactly as sealed in the segments.
    raw = subprocess.run(
        [*gateway_command("replay", sessions[0], "--dir", str(directory), "--records")],
        env=gateway_environment(),
        capture_output=True,
        timeout=60,
    )
    assert raw.returncode == 0, raw.stderr
    lines = raw.stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["session"] for r in records} == {sessions[0]}
    assert [r["type"] for r in records[:1] + records[-1:]] == ["session", "session_end"]
    assert sum(r["type"] == "stmt" and " as seg_" in r["sql"] for r in records) == statements
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(seqs)
    segments = b"".join((stream / name).read_bytes() for name in kept)
    assert all(b"\n" + line + b"\n" in segments for line in lines)


def test_a_session_is_read_across_recorded_and_spooled_segments(tmp_path: Path) -> None:
    """The session's first segments are recorded, its last still in the spool; records of
    another session between them, and after its end, are not its own."""

    def record(seq: int, kind: str, session: str | None = None, **extra: object) -> bytes:
        fields = {"seq": seq, "stream": "s1", "ts": seq, "type": kind}
        if session is not None:
            fields["session"] = session
        return json.dumps({**fields, **extra}, separators=(",", ":")).encode() + b"\n"

    recorded = tmp_path / "recorded" / "s1"
    spooled = tmp_path / "spool" / "s1"
    recorded.mkdir(parents=True)
    spooled.mkdir(parents=True)
    (recorded / "00000000000000000001.seg").write_bytes(
        record(1, "open")
        + record(2, "session", "other")
        + record(3, "session", "mine")
        + record(4, "segment_end", next="00000000000000000005.seg")
    )
    (recorded / "00000000000000000005.seg").write_bytes(
        record(5, "segment")
        + record(6, "stmt", "mine", n=1, sql="select 1")
        + record(7, "stmt", "other", n=1, sql="select 'no'")
        + record(8, "segment_end", next="00000000000000000009.seg")
    )
    (spooled / "00000000000000000009.seg").write_bytes(
        record(9, "segment")
        + record(10, "end", "mine", n=1)
        + record(11, "session_end", "mine")
        + record(12, "session", "mine")
        + b"\0" * 64  # a later stream reusing the id: not read
    )
    recorder = SessionRecorder(tmp_path / "recorded", "s1")
    recorder.add_lines("mine", record(3, "session", "mine"))
    recorder.add("session", "other", record(2, "session", "other").rstrip(b"\n"))
    recorder.add("stmt", "other", record(7, "stmt", "other").rstrip(b"\n"))  # not indexed
    recorder.flush()
    assert (recorded / INDEX).read_text() == "mine 3\nother 2\n"

    mine = read_session(tmp_path, "mine")
    assert [r["seq"] for r in mine] == [3, 6, 10, 11]
    assert [r["seq"] for r in read_session(tmp_path, "other")] == [2, 7]
    with pytest.raises(FileNotFoundError):
        read_session(tmp_path, "nobody")
    with pytest.raises(ValueError):
        read_session(tmp_path, "../etc/passwd")

    # Recordings of earlier versions: one file of records per session.
    legacy = tmp_path / "sessions"
    legacy.mkdir()
    (legacy / "old.jsonl").write_bytes(record(2, "stmt", "old") + record(1, "session", "old"))
    assert [r["seq"] for r in read_session(tmp_path, "old")] == [1, 2]


def test_recording_retention_deletes_old_segments_oldest_first(tmp_path: Path) -> None:
    """`audit ship` with audit.recording_retention_hours sweeps the recordings: segments
    whose newest record is past the retention go, oldest first; a stream with nothing
    left goes whole; a stream still in the spool keeps its index."""
    day = 24 * 3600
    now = time.time()

    def segment(stream: Path, first: int, age: float) -> Path:
        stream.mkdir(parents=True, exist_ok=True)
        path = stream / f"{first:020d}.seg"
        path.write_bytes(b'{"seq":%d}\n' % first)
        os.utime(path, (now - age, now - age))
        return path

    def index(stream: Path, age: float) -> Path:
        stream.mkdir(parents=True, exist_ok=True)
        path = stream / INDEX
        path.write_text("s 1\n")
        os.utime(path, (now - age, now - age))
        return path

    recorded = tmp_path / "recorded"
    gone = [segment(recorded / "old", 1, 3 * day), segment(recorded / "old", 9, 2 * day)]
    index(recorded / "old", 2 * day)
    old_first = segment(recorded / "mixed", 1, 3 * day)
    young = segment(recorded / "mixed", 5, 60)
    mixed_index = index(recorded / "mixed", 3 * day)
    # Recorded long ago, but its segments are still being delivered: the index stays.
    live_index = index(recorded / "live", 3 * day)
    segment(tmp_path / "spool" / "live", 30, 0)
    (tmp_path / "spool" / "live" / "00000000000000000030.seg").write_bytes(b"\0" * 64)

    env = gateway_environment(
        {
            "PGWARDEN_AUDIT__DIRECTORY": str(tmp_path),
            "PGWARDEN_AUDIT__EXPORTER": "file",
            "PGWARDEN_AUDIT__EXPORT_PATH": str(tmp_path / "trail.jsonl"),
            "PGWARDEN_AUDIT__RECORDING_RETENTION_HOURS": "36",
        }
    )
    shipped = pgwarden("audit", "ship", "--until-empty", env=env)
    assert shipped.returncode == 0, shipped.stderr
    assert not any(p.exists() for p in gone)
    assert not (recorded / "old").exists()
    assert not old_first.exists()
    assert young.exists() and mixed_index.exists()
    assert live_index.exists()
    assert "deleted 3 segment(s) older than 36 h" in shipped.stderr

    # Without a retention, nothing recorded is ever deleted.
    env.pop("PGWARDEN_AUDIT__RECORDING_RETENTION_HOURS")
    segment(recorded / "kept", 1, 1000 * day)
    assert pgwarden("audit", "ship", "--until-empty", env=env).returncode == 0
    assert segment_names(recorded / "kept")

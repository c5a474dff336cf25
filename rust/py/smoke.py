"""Smoke test of the binding against a real PostgreSQL and real clients.

Starts a throw-away cluster, relays pgbench (simple, extended, prepared) and psql through
a minimal proxy built on ``pgwarden._wire`` and checks that the relay is transparent
(bytes identical, the input object returned as-is on the fast path) and that every
statement gets exactly one record.

    python rust/py/smoke.py            # needs initdb/pg_ctl/pgbench/psql on PATH (or PG_BIN)
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from pgwarden import _wire as w

PG_BIN = Path(
    os.environ.get("PG_BIN", Path(shutil.which("pg_ctl") or "/usr/bin/pg_ctl").resolve().parent)
)
PG_PORT = 55_431
PROXY_PORT = 55_432
stats: Counter[str] = Counter()
records: list[dict[str, object]] = []


def as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    buf = b""
    while True:  # startup phase: answer SSL/GSSENC with 'N', forward the StartupMessage
        got = w.read_startup(buf)
        if got is None:
            data = await client_r.read(65536)
            if not data:
                return
            buf += data
            continue
        packet, n = got
        raw, buf = buf[:n], buf[n:]
        if packet.kind in ("ssl", "gssenc"):
            client_w.write(b"N")
            continue
        break
    server_r, server_w = await asyncio.open_connection("127.0.0.1", PG_PORT)
    server_w.write(raw)
    framer = w.MessageFramer()
    while True:  # authentication (trust) up to the first ReadyForQuery
        data = await server_r.read(65536)
        if not data:
            return
        done = False
        for tag, body in framer.feed(data):
            client_w.write(w.encode_message(tag, body))
            if tag == ord("Z"):
                done = True
                break
        if done:
            break
    codec = w.SessionCodec(
        record_statements=True, client_events=True, context_json='"session":"smoke"'
    )
    leftover = framer.take_pending()
    assert leftover == b"", leftover

    def drain_records() -> None:
        for line in codec.take_records().splitlines():
            records.append(json.loads(line))

    async def client_to_server() -> None:
        pending = buf
        while True:
            data = pending or await client_r.read(65536)
            pending = b""
            if not data:
                break
            out, events = codec.feed_client(data)
            stats["client_chunks"] += 1
            stats["client_same_object"] += out is data
            server_w.write(out)
            if events and any(e[0] == w.EV_TERMINATE for e in events):
                break
        server_w.close()

    async def server_to_client() -> None:
        while True:
            data = await server_r.read(65536)
            if not data:
                break
            out, events = codec.feed_server(data)
            stats["server_chunks"] += 1
            stats["server_same_object"] += out is data
            assert out == data
            client_w.write(out)
            drain_records()
            for ev in events or ():
                if ev[0] == w.EV_ERROR:
                    stats["errors"] += 1
        client_w.close()

    await asyncio.gather(client_to_server(), server_to_client())
    drain_records()
    assert codec.in_flight == 0, codec.in_flight


async def run(cmd: list[str], check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PGUSER": "postgres"},
    )
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0 or not check, text
    return text


def check_codecs() -> None:
    """Startup-phase encoders and decoders agree with each other."""
    pkt, n = w.read_startup(w.encode_startup([("user", "alice"), ("_pq_.x", "1")], 3, 2)) or (
        None,
        0,
    )
    assert pkt is not None and pkt.kind == "startup" and (pkt.major, pkt.minor) == (3, 2)
    assert pkt.params == [("user", "alice"), ("_pq_.x", "1")] and n > 8
    assert w.read_startup(w.encode_ssl_request()[:5]) is None
    cancel, _ = w.read_startup(w.encode_cancel_request(7, b"k" * 32)) or (None, 0)
    assert cancel is not None and cancel.kind == "cancel" and cancel.secret_key == b"k" * 32
    try:
        w.read_startup(b"\x7f\xff\xff\xff")
    except w.WireError as e:
        assert "exceeds" in str(e)
    else:
        raise AssertionError("oversized startup accepted")
    framer = w.MessageFramer()
    stream = (
        w.encode_authentication(10, b"SCRAM-SHA-256\0\0")
        + w.encode_parameter_status("a", "b")
        + w.encode_backend_key_data(1, b"1234")
        + w.encode_error("FATAL", "28P01", "no", hint="h")
        + w.encode_negotiate_protocol_version(0, ["_pq_.x"])
        + w.encode_ready_for_query("I")
    )
    msgs = framer.feed(stream[:-3]) + framer.feed(stream[-3:])
    assert [chr(t) for t, _ in msgs] == ["R", "S", "K", "E", "v", "Z"]
    code, payload = w.decode_authentication(msgs[0][1])
    assert code == 10 and w.decode_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]
    assert w.decode_parameter_status(msgs[1][1]) == ("a", "b")
    assert w.decode_backend_key_data(msgs[2][1]) == (1, b"1234")
    assert w.decode_fields(msgs[3][1]) == {
        "S": "FATAL",
        "V": "FATAL",
        "C": "28P01",
        "M": "no",
        "H": "h",
    }
    assert w.decode_negotiate_protocol_version(msgs[4][1]) == (0, ["_pq_.x"])
    assert w.encode_password(b"tok") == b"p\0\0\0\x08tok\0"
    assert w.encode_message(ord("Z"), b"I") == w.encode_ready_for_query("I")
    assert (
        w.encode_sasl_response(b"x")[0:1] == w.encode_sasl_initial_response("M", b"x")[0:1] == b"p"
    )
    assert w.encode_notice("NOTICE", "00000", "hi")[0:1] == b"N"
    assert framer.take_pending() == b""


def start_cluster(tmp: Path) -> Path:
    os.chmod(tmp, 0o777)
    data = tmp / "data"
    initdb = [str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data)]
    subprocess.run(as_postgres(initdb), check=True, capture_output=True)
    opts = f"-p {PG_PORT} -k {tmp} -c listen_addresses=127.0.0.1"
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(tmp / "log"), "-o", opts]
    subprocess.run(as_postgres([*pg_ctl, "start"]), check=True, capture_output=True)
    return data


def stop_cluster(data: Path) -> None:
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
    subprocess.run(as_postgres(pg_ctl), capture_output=True)


async def exercise() -> None:
    direct = ["-h", "127.0.0.1", "-p", str(PG_PORT)]
    via = ["-h", "127.0.0.1", "-p", str(PROXY_PORT)]
    pgbench = str(PG_BIN / "pgbench")
    await run([pgbench, "-i", "-s", "1", "-q", *direct, "postgres"])
    server = await asyncio.start_server(relay, "127.0.0.1", PROXY_PORT)
    async with server:
        for mode in ("simple", "extended", "prepared"):
            out = await run([pgbench, "-S", "-T", "3", "-c", "2", "-M", mode, *via, "postgres"])
            line = next(x for x in out.splitlines() if "transactions actually processed" in x)
            tx = int(line.split()[-1].split("/")[0])
            await asyncio.sleep(0.2)
            print(f"pgbench -M {mode}: {tx} transactions")
            stats[f"tx_{mode}"] = tx
        psql = [str(PG_BIN / "psql"), "-X", "-v", "ON_ERROR_STOP=0", *via, "postgres"]
        await run([*psql, "-c", "SELECT 1/0"], check=False)
        create = "CREATE TEMP TABLE t(a int, b text); COPY t FROM STDIN;"
        await run([*psql, "-c", create, "-c", "SELECT count(*) FROM t"])
        await run([*psql, "-c", r"\copy pgbench_branches TO STDOUT"])


def main() -> None:
    check_codecs()
    tmp = Path(tempfile.mkdtemp(prefix="pgw-smoke-"))
    data = start_cluster(tmp)
    try:
        asyncio.run(exercise())
    finally:
        stop_cluster(data)
        shutil.rmtree(tmp, ignore_errors=True)

    by_stmt = Counter(r["statement"] for r in records)
    select = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    simple_selects = sum(
        n for s, n in by_stmt.items() if str(s).startswith("SELECT abalance") and "$1" not in str(s)
    )
    print(dict(stats))
    print(f"records: {len(records)}; extended selects: {by_stmt[select]}; simple: {simple_selects}")
    assert simple_selects == stats["tx_simple"], (simple_selects, stats["tx_simple"])
    assert by_stmt[select] == stats["tx_extended"] + stats["tx_prepared"]
    assert all(r["session"] == "smoke" for r in records)
    div0 = [r for r in records if r["sqlstate"] == "22012"]
    assert len(div0) == 1 and div0[0]["statement"] == "SELECT 1/0", div0
    copy_out = [r for r in records if str(r["statement"]).startswith("COPY")]
    assert any(r["command_tag"] == "COPY 1" and r["rows"] == 1 for r in copy_out), copy_out
    sample = next(r for r in records if r["statement"] == select)
    assert sample["protocol"] == "extended" and sample["rows"] == 1, sample
    assert isinstance(sample["params"], list) and len(sample["params"]) == 1, sample
    print("smoke OK")


if __name__ == "__main__":
    main()

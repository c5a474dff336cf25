#!/usr/bin/env python3
"""Memory per idle session: PostgreSQL direct, pgbouncer and pgwarden, side by side.

Each target gets ``--sessions`` client connections (asyncpg) that log in, run one
statement and then sit idle.  The target's processes (the whole process tree: pgwarden's
process and its shipper; pgbouncer; for the direct target PostgreSQL's postmaster and its
backends) are measured from ``/proc/<pid>/smaps_rollup`` before the sessions open, while
they are all open, after they are closed, and after the same number of sessions has been
opened and closed once more.  The growth while they are open divided by their number is
what one idle session costs; "closed" against "closed 2x" shows whether what sessions
leave behind grows from round to round (a leak) or stays level (what the allocators keep).

    python3 benches/idle_memory.py                           # 1,000 sessions, TCP and TLS
    python3 benches/idle_memory.py --sessions 200 --no-tls   # a quick look

Targets:

* ``direct``: PostgreSQL itself (each session is a backend process): what a session costs
  the server, which it pays behind both proxies too (session pooling, one server
  connection per client);
* ``pgbouncer``: session pooling, a pool as large as the sessions;
* ``pgwarden``: one worker, no audit, no policy;
* ``pgwarden all on``: strict audit (spool, shipper exporting OTLP/HTTP to a local sink,
  session recording) and a statement policy that masks a column of ``pgbench_accounts``,
  which the sessions' statement reads.

Memory is PSS (proportional set size: resident pages, those shared between processes
divided among them) and anonymous memory (heap and stacks, without mapped files such as
pgwarden's audit spool); RSS and private dirty bytes are in the JSON output (``--out``).
These are not timings: they come out the same from run to run within a few percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_probe import start_sink
from bench_report import MIB
from endpoints import Endpoint
from gateway_bench import DIRECT, start_throwaway_server, work_directory
from proxies import (
    ManagedProcess,
    PgWardenVariant,
    ProxyError,
    TlsFiles,
    start_pgbouncer,
    start_pgwarden,
    unprivileged_user,
    write_dev_certificate,
)

PGBOUNCER = "pgbouncer"
PLAIN = "pgwarden"
ALL_ON = "pgwarden all on"
POLICY = """
default = "allow"
version = "bench"

[[mask]]
name = "bench"
columns = ["public.pgbench_accounts.filler"]
"""
#: The one statement each session runs before it goes idle: a masked column in the
#: all-on target.
STATEMENT = "SELECT aid, filler FROM pgbench_accounts WHERE aid = 1"
#: Connections opened at once while the sessions are being set up.
OPEN_CONCURRENCY = 32
KIB = 1024
#: Wait after the sessions close before measuring: longer than pgwarden's default
#: ``memory_trim_seconds`` (10), after which a worker has given back the heap that
#: ended sessions freed.
AFTER_CLOSE_SECONDS = 12.0


class SessionError(RuntimeError):
    """Sessions could not be opened."""


@dataclass(frozen=True)
class Usage:
    """Memory of a process tree, in bytes (sums over its processes)."""

    processes: int
    rss: int
    pss: int
    private_dirty: int
    anonymous: int

    def minus(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(_values(self), _values(other), strict=True)))

    def per(self, count: int) -> Usage:
        return Usage(self.processes, *(value // count for value in _values(self)[1:]))


def _values(usage: Usage) -> tuple[int, ...]:
    return dataclasses.astuple(usage)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    children = _children()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _role(pid: int, root: int) -> str:
    """What a process of the tree is: the proxy itself, pgwarden's shipper or a worker,
    PostgreSQL's backends and auxiliary processes."""
    if pid == root:
        return "main"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if b"ship" in argv:
        return "shipper"
    if any(arg.startswith(b"postgres:") for arg in argv):
        return "backends" if b"idle" in b" ".join(argv) else "server processes"
    return "workers"


Snapshot = dict[str, Usage]


def measure(root: int) -> Snapshot:
    """Memory of ``root``'s process tree by role (see :func:`_role`)."""
    keys = ("Rss", "Pss", "Private_Dirty", "Anonymous")
    by_role: dict[str, list[int]] = {}
    for pid in tree(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        totals = by_role.setdefault(_role(pid, root), [0] * (len(keys) + 1))
        totals[0] += 1
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                totals[1 + keys.index(key)] += int(rest.split()[0]) * KIB
    return {role: Usage(*values) for role, values in sorted(by_role.items())}


def total(snapshot: Snapshot) -> Usage:
    sums = [sum(values) for values in zip(*(_values(u) for u in snapshot.values()), strict=True)]
    return Usage(*sums) if sums else Usage(0, 0, 0, 0, 0)


def settled(root: int, seconds: float = 1.5) -> Snapshot:
    """The tree's memory once it has been idle for a moment (background threads, the
    shipper's pass over the sessions' records)."""
    time.sleep(seconds)
    return measure(root)


@dataclass
class Result:
    target: str
    tls: bool
    sessions: int
    before: Snapshot
    open: Snapshot
    after: Snapshot
    #: After a second round of the same sessions opened and closed: memory that grows
    #: from one round to the next would be a leak, what stays level is the allocators'.
    after_second: Snapshot
    seconds_to_open: float

    @property
    def per_session(self) -> Usage:
        return total(self.open).minus(total(self.before)).per(self.sessions)

    def per_session_by_role(self) -> dict[str, Usage]:
        zero = Usage(0, 0, 0, 0, 0)
        return {
            role: usage.minus(self.before.get(role, zero)).per(self.sessions)
            for role, usage in self.open.items()
        }


async def _open(endpoint: Endpoint, count: int, tls: bool) -> list[asyncpg.Connection]:
    context: ssl.SSLContext | bool = False
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    limit = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def one() -> asyncpg.Connection:
        async with limit:
            conn = await asyncpg.connect(
                **endpoint.asyncpg_login(), ssl=context, statement_cache_size=0
            )
            await conn.execute(STATEMENT)
            return conn

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    connections = [c for c in outcomes if isinstance(c, asyncpg.Connection)]
    failed = [e for e in outcomes if isinstance(e, BaseException)]
    if failed:
        await _close(connections)
        raise SessionError(
            f"{len(failed)} of {count} sessions to {endpoint.name} failed to open: {failed[0]!r}"
        )
    return connections


async def _close(connections: list[asyncpg.Connection]) -> None:
    await asyncio.gather(*(conn.close() for conn in connections))


def run_target(
    name: str,
    endpoint: Endpoint,
    root: int,
    sessions: int,
    tls: bool,
    loop: asyncio.AbstractEventLoop,
) -> Result:
    # A few sessions first, so what the first session loads once (modules, caches, the
    # policy's lookups) is in the baseline rather than spread over the sessions.
    loop.run_until_complete(_close(loop.run_until_complete(_open(endpoint, 8, tls))))
    before = settled(root)
    started = time.monotonic()
    connections = loop.run_until_complete(_open(endpoint, sessions, tls))
    seconds = time.monotonic() - started
    opened = settled(root)
    loop.run_until_complete(_close(connections))
    after = settled(root, AFTER_CLOSE_SECONDS)
    loop.run_until_complete(_close(loop.run_until_complete(_open(endpoint, sessions, tls))))
    after_second = settled(root, AFTER_CLOSE_SECONDS)
    return Result(name, tls, sessions, before, opened, after, after_second, seconds)


def _mib(value: int) -> str:
    return f"{value / MIB:,.1f}"


def _kib(value: int) -> str:
    return f"{value / KIB:,.1f}"


def report(results: list[Result]) -> str:
    lines = []
    for tls in sorted({r.tls for r in results}):
        rows = [r for r in results if r.tls == tls]
        lines.append(
            f"\n{rows[0].sessions:,} idle sessions, {'TLS' if tls else 'plain TCP'}: memory of "
            "each target's processes (PSS), and per session (growth while open / sessions)"
        )
        header = (
            f"{'target':<17} {'before':>9} {'open':>9} {'closed':>9} {'closed 2x':>9}  "
            f"{'per session':>11} {'anonymous':>9}  {'vs pgbouncer':>12}"
        )
        lines.append(header)
        lines.append("-" * len(header))
        bouncer = next((r for r in rows if r.target == PGBOUNCER), None)
        for r in rows:
            per = r.per_session
            ratio = ""
            if bouncer is not None and r.target not in (DIRECT, PGBOUNCER):
                # Below half a KiB per session pgbouncer's growth is within its preallocated
                # slabs (a few hundred sessions): no ratio to speak of.
                base = bouncer.per_session.pss
                ratio = f"{per.pss / base:,.1f}x" if base >= KIB // 2 else "n/a"
            lines.append(
                f"{r.target + (' (server)' if r.target == DIRECT else ''):<17} "
                + " ".join(
                    f"{_mib(total(s).pss):>5} MiB"
                    for s in (r.before, r.open, r.after, r.after_second)
                )
                + f"  {_kib(per.pss):>7} KiB {_kib(per.anonymous):>5} KiB  {ratio:>12}"
            )
            roles = r.per_session_by_role()
            if len(roles) > 1:
                lines.append(
                    " " * 19
                    + ", ".join(
                        f"{role} {_kib(usage.pss)} KiB"
                        for role, usage in roles.items()
                        if abs(usage.pss) >= KIB // 10
                    )
                )
    lines.append(
        "\nPSS: resident memory, pages shared between processes divided among them; "
        "anonymous: heap and stacks only\n(pgwarden's audit spool is a mapped file: "
        "its pages count in PSS, not in anonymous)."
    )
    return "\n".join(lines)


@contextlib.contextmanager
def _stopping(processes: list[ManagedProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in reversed(processes):
            process.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions per target")
    parser.add_argument("--no-tls", action="store_true", help="plain TCP only")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    # A socket per session here, two in each proxy (they raise their own limits).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < args.sessions + 100:
        parser.error(f"open-file limit {hard} is too low for {args.sessions} sessions")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    with work_directory(keep=False) as workdir:
        run_as = unprivileged_user()
        if run_as is not None:  # root: PostgreSQL runs as that user and needs the directory
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        # pgbouncer keeps its server connections after its clients leave.
        server = start_throwaway_server(1, workdir, max_connections=2 * args.sessions + 50)
        processes: list[ManagedProcess] = []
        try:
            with _stopping(processes):
                tls_files: TlsFiles | None = (
                    None if args.no_tls else write_dev_certificate(workdir, run_as)
                )
                assert server.postmaster_pid is not None
                targets: dict[str, tuple[Endpoint, int]] = {
                    DIRECT: (server.endpoint, server.postmaster_pid)
                }
                endpoint, process = start_pgbouncer(
                    server.endpoint,
                    workdir,
                    tls_files,
                    upstream_tls="disable",
                    run_as=run_as,
                    pool_size=args.sessions + 10,
                )
                processes.append(process)
                targets[PGBOUNCER] = (endpoint, _pid(process))
                sink = start_sink(workdir / "otlp-sink", "otlp-sink")
                processes.append(sink.process)
                policy = workdir / "policy.toml"
                policy.write_text(POLICY)
                quiet = {"PGWARDEN_LOG_LEVEL": "warning"}
                variants = [
                    PgWardenVariant(PLAIN, quiet),
                    PgWardenVariant(
                        ALL_ON,
                        {
                            **quiet,
                            "PGWARDEN_POLICY_FILE": str(policy),
                            "PGWARDEN_AUDIT__DIRECTORY": str(workdir / "audit"),
                            "PGWARDEN_AUDIT__ENDPOINT": sink.endpoint(),
                        },
                    ),
                ]
                for variant in variants:
                    endpoint, process = start_pgwarden(
                        server.endpoint, workdir, tls_files, variant, upstream_tls="disable"
                    )
                    processes.append(process)
                    targets[variant.label] = (endpoint, _pid(process))
                results = run(targets, args.sessions, [False] if args.no_tls else [False, True])
        except (ProxyError, SessionError) as exc:
            print(f"failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for cleanup in server.cleanup:
                cleanup()
    print(report(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    return 0


def _pid(process: ManagedProcess) -> int:
    assert process.process is not None
    return process.process.pid


def run(targets: dict[str, tuple[Endpoint, int]], sessions: int, modes: list[bool]) -> list[Result]:
    loop = asyncio.new_event_loop()
    results: list[Result] = []
    try:
        for tls in modes:
            for name, (endpoint, root) in targets.items():
                print(
                    f"{name}: {sessions:,} sessions{' over TLS' if tls else ''}",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(run_target(name, endpoint, root, sessions, tls, loop))
    finally:
        loop.close()
    return results


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""What column masking costs: PostgreSQL direct, pgwarden with a policy and no mask, and
pgwarden masking two columns of ``pgbench_accounts``, side by side in one run.

* ``SELECT * FROM pgbench_accounts`` (binary results, libpq chunked rows): with the mask,
  every row is assembled and rewritten in Rust (``filler``, a ``char(84)``, becomes
  ``****``; ``abalance``, an ``int4``, becomes NULL); median of ``--bulk-repeats`` reads.
* ``pgbench -S`` (simple and prepared, ``--clients``): each transaction's one row has its
  ``abalance`` masked.  libpq describes each portal before executing it.
* asyncpg (``--clients`` connections, one prepared statement each, executed without a
  Describe): in the masked session the gateway sends a Describe of each portal itself.

Targets alternate within each round, so the ratios come from the same minutes::

    python3 benches/masking_cost.py                  # scale 10, 3 rounds, about 4 minutes
    python3 benches/masking_cost.py --rounds 1 --scale 2 --duration 4   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulk_read import BulkResult, bulk_select, select_payload_bytes
from endpoints import Endpoint
from gateway_bench import DIRECT, start_throwaway_server, work_directory
from pgbench_run import PgbenchScenario, run_pgbench
from proxies import (
    ManagedProcess,
    PgWardenVariant,
    start_pgwarden,
    unprivileged_user,
)

PLAIN = "pgwarden policy"
MASKED = "pgwarden masked"
POLICY = 'default = "allow"\nversion = "bench"\n'
MASK = """
[[mask]]
name = "bench"
columns = ["public.pgbench_accounts.filler", "public.pgbench_accounts.abalance"]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--duration", type=int, default=8, help="seconds per pgbench run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bulk-repeats", type=int, default=3)
    args = parser.parse_args()

    with work_directory(keep=False) as workdir:
        run_as = unprivileged_user()
        if run_as is not None:  # root: PostgreSQL runs as that user and needs the directory
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        server = start_throwaway_server(args.scale, workdir)
        processes: list[ManagedProcess] = []
        try:
            targets: dict[str, Endpoint] = {DIRECT: server.endpoint}
            for label, policy in ((PLAIN, POLICY), (MASKED, POLICY + MASK)):
                path = workdir / f"{label.replace(' ', '-')}.toml"
                path.write_text(policy)
                variant = PgWardenVariant(
                    label, {"PGWARDEN_POLICY_FILE": str(path), "PGWARDEN_LOG_LEVEL": "warning"}
                )
                endpoint, process = start_pgwarden(
                    server.endpoint, workdir, None, variant, upstream_tls="disable"
                )
                targets[label] = endpoint
                processes.append(process)
            run(targets, args)
        finally:
            for process in processes:
                process.stop()
            for cleanup in server.cleanup:
                cleanup()
    return 0


ASYNCPG_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"


async def _asyncpg_rate(endpoint: Endpoint, clients: int, seconds: float, rows: int) -> float:
    """Statements a second from ``clients`` asyncpg connections, each executing its
    prepared statement in a loop for ``seconds``."""
    connections = [
        await asyncpg.connect(**endpoint.asyncpg_login(), ssl=False) for _ in range(clients)
    ]
    done = 0
    deadline = time.monotonic() + seconds

    async def loop(conn: asyncpg.Connection) -> None:
        nonlocal done
        statement = await conn.prepare(ASYNCPG_SQL)
        while time.monotonic() < deadline:
            await statement.fetchrow(random.randint(1, rows))
            done += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(loop(c) for c in connections))
    finally:
        for conn in connections:
            await conn.close()
    return done / (time.monotonic() - started)


def run(targets: dict[str, Endpoint], args: argparse.Namespace) -> None:
    rows, payload = select_payload_bytes(targets[DIRECT])
    scenarios = [
        PgbenchScenario(clients=args.clients, threads=2, mode=mode, tls=False)
        for mode in ("simple", "prepared")
    ]
    bulk: dict[str, list[BulkResult]] = {name: [] for name in targets}
    tps: dict[tuple[str, str], list[float]] = {}
    rates: dict[str, list[float]] = {name: [] for name in targets}
    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no}/{args.rounds}", file=sys.stderr, flush=True)
        for name, endpoint in targets.items():
            for _ in range(args.bulk_repeats):
                bulk[name].append(
                    bulk_select(endpoint, tls=False, expected_rows=rows, payload=payload)
                )
        for scenario in scenarios:
            for name, endpoint in targets.items():
                result = run_pgbench(
                    endpoint, scenario, duration_s=args.duration, log_latencies=False
                )
                tps.setdefault((scenario.key, name), []).append(result.tps)
        for name, endpoint in targets.items():
            rate = asyncio.run(_asyncpg_rate(endpoint, args.clients, args.duration, rows))
            rates[name].append(rate)

    names = list(targets)
    print(f"\nSELECT * FROM pgbench_accounts ({rows:,} rows, binary), median seconds")
    seconds = {n: statistics.median(r.seconds for r in bulk[n]) for n in names}
    print(" | ".join(f"{n}: {seconds[n]:.3f} s" for n in names))
    print(
        f"masked / policy: {seconds[MASKED] / seconds[PLAIN]:.2f}x the time; "
        f"masked rows at {rows / seconds[MASKED] / 1e6:.2f} M rows/s"
    )
    for scenario in scenarios:
        medians = {n: statistics.median(tps[(scenario.key, n)]) for n in names}
        print(f"\npgbench -{scenario.key}, median TPS over {args.rounds} round(s)")
        print(" | ".join(f"{n}: {medians[n]:,.0f}" for n in names))
        print(f"masked / policy: {medians[MASKED] / medians[PLAIN]:.2f}")
    medians = {n: statistics.median(rates[n]) for n in names}
    print(f"\nasyncpg, prepared, {args.clients} connections, median statements/s")
    print(" | ".join(f"{n}: {medians[n]:,.0f}" for n in names))
    print(f"masked / policy: {medians[MASKED] / medians[PLAIN]:.2f}")


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end benchmark: PostgreSQL direct vs pgbouncer vs pgwarden, in the same run.

    python benches/gateway_bench.py                 # throwaway server, full run (~5 min)
    python benches/gateway_bench.py --quick         # smoke run (~1 min)
    python benches/gateway_bench.py --dsn 'postgresql://bench:secret@db.internal/bench'
    python benches/gateway_bench.py --targets pgwarden --no-tls --no-bulk --audit

Targets alternate scenario by scenario (direct, pgbouncer, pgwarden, then the next
scenario), so every ratio compares figures taken seconds apart on the same machine.
See benches/README.md for what each figure means and the caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import pgwarden.pgcluster  # noqa: F401  (the harness reuses its cluster and certificates)
except ImportError:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "python"))

from psycopg import pq  # noqa: E402

import bench_report  # noqa: E402
from audit_probe import (  # noqa: E402
    Drain,
    OtlpSink,
    SpoolProbe,
    SpoolState,
    start_sink,
    wait_drained,
)
from bulk_read import (  # noqa: E402
    BulkReadError,
    BulkScenario,
    bulk_copy,
    bulk_select,
    select_payload_bytes,
)
from endpoints import Endpoint  # noqa: E402
from pgbench_run import (  # noqa: E402
    PgbenchError,
    PgbenchScenario,
    QueryMode,
    pgbench_binary,
    run_pgbench,
    warm_up,
)
from proxies import (  # noqa: E402
    ManagedProcess,
    PgWardenVariant,
    ProxyError,
    TlsFiles,
    UpstreamTls,
    start_pgbouncer,
    start_pgwarden,
    unprivileged_user,
    write_dev_certificate,
)

DIRECT = bench_report.DIRECT
PGBOUNCER = bench_report.PGBOUNCER
PGWARDEN = bench_report.PGWARDEN
BENCH_ROLE = "bench"
#: The target --audit adds, and the --variant value that means "a fresh audit directory
#: in the work directory, shipped to a sink the harness runs".
AUDIT_VARIANT = "audit"
AUDIT_DIRECTORY_VALUE = "audit"
AUDIT_DIRECTORY = "PGWARDEN_AUDIT__DIRECTORY"
#: No key file generated; the records are not kept after the run anyway.
BENCH_CHAIN_KEY = "pgwarden-bench-chain-key"
#: A drain that shows no progress at all for this long has stalled (shipper dead or
#: export failing); shorter waits would give up on a SCHED_IDLE shipper that a busy
#: shared machine starves for a moment.
DRAIN_QUIET_SECONDS = 10.0


class BenchSetupError(RuntimeError):
    """The server, the data set or a proxy could not be prepared."""


# --- command line ------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only when there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway_bench.py",
        description="Benchmark PostgreSQL direct vs pgbouncer vs pgwarden with pgbench -S "
        "and bulk reads, alternating targets within one run.",
        formatter_class=_HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--rounds", type=int, default=1, help="times to repeat every scenario")
    run.add_argument("--duration", type=int, default=8, help="seconds per measured pgbench run")
    run.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of unmeasured pgbench before each measured run "
        "(0: 20 transactions per client, just to open connections)",
    )
    run.add_argument("--clients", default="1,16", help="comma-separated pgbench client counts")
    run.add_argument(
        "--jobs", type=int, default=2, help="pgbench threads (-j), capped at the client count"
    )
    run.add_argument("--modes", default="simple,prepared", help="pgbench -M modes to run")
    run.add_argument("--no-tls", action="store_true", help="skip the client-TLS scenarios")
    run.add_argument("--no-bulk", action="store_true", help="skip the bulk-read scenarios")
    run.add_argument(
        "--bulk-repeats", type=int, default=3, help="reads per bulk scenario and target (median)"
    )
    run.add_argument(
        "--sampling-rate",
        type=float,
        default=1.0,
        help="fraction of transactions pgbench logs for p99 (--sampling-rate); "
        "lower it if logging overhead matters on a slow disk",
    )
    run.add_argument(
        "--rate",
        type=int,
        default=None,
        metavar="TPS",
        help="pgbench --rate for the measured runs: every target gets the same load, so "
        "cpu us/tx compares their cost without the swings of a saturated machine (the TPS "
        "ratios then only say whether a target kept up; latencies include pgbench's "
        "schedule lag)",
    )
    run.add_argument(
        "--targets",
        default=f"{DIRECT},{PGBOUNCER},{PGWARDEN}",
        help="comma-separated subset of direct, pgbouncer, pgwarden",
    )
    run.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: scale 1, 2 s per scenario, no warm-up, 1 bulk read (about 1 min)",
    )

    server = parser.add_argument_group(
        "server (default: a throwaway PostgreSQL cluster in a temporary directory)"
    )
    server.add_argument("--dsn", help="libpq connection string or URL of your own PostgreSQL")
    server.add_argument("--host", help="your PostgreSQL host (instead of --dsn)")
    server.add_argument("--port", type=int, help="your PostgreSQL port")
    server.add_argument("--user", help="role to log in as (default: PGUSER, then $USER)")
    server.add_argument("--password", help="that role's password (default: PGPASSWORD)")
    server.add_argument("--dbname", help="database holding the pgbench tables")
    server.add_argument(
        "--init",
        action="store_true",
        help="run `pgbench -i -s SCALE` on your server first (drops and recreates the "
        "pgbench_* tables); without it, the tables must exist",
    )
    server.add_argument(
        "--scale", type=int, default=None, help="pgbench scale for -i (default 10, quick 1)"
    )
    server.add_argument(
        "--upstream-tls",
        choices=["disable", "prefer", "require"],
        default="disable",
        help="TLS from both proxies to PostgreSQL",
    )

    gateway = parser.add_argument_group("pgwarden")
    gateway.add_argument(
        "--pgwarden-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setting for the pgwarden target (PGWARDEN_ prefix optional, e.g. "
        "upstream__connect_timeout_seconds=5); repeatable",
    )
    gateway.add_argument("--workers", type=int, help="pgwarden worker processes")
    gateway.add_argument(
        "--statement-log",
        action="store_true",
        help="pgwarden writes its JSON-lines statement log to a file in the work directory",
    )
    gateway.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE",
        help="an extra pgwarden target 'pgwarden-LABEL' = the pgwarden settings plus KEY=VALUE; "
        "repeat with the same LABEL to add settings (value 'statement-log' for "
        "statement_log means a file in the work directory; value 'audit' for "
        "audit__directory means a fresh spool in the work directory, shipped to a local "
        "sink the harness starts, over OTLP/HTTP or with audit__exporter=otlp_grpc over "
        "OTLP/gRPC, unless audit__endpoint or another exporter is given)",
    )
    gateway.add_argument(
        "--audit",
        action="store_true",
        help="add the target 'pgwarden-audit': strict audit, spool in the work directory, "
        "the shipper started by the gateway exporting OTLP/HTTP to a local sink; reports "
        "its TPS against pgwarden's and the spool backlog and drain time after each run "
        "(same as --variant audit:audit__directory=audit; add settings with "
        "--variant audit:KEY=VALUE)",
    )
    gateway.add_argument(
        "--audit-drain-timeout",
        type=float,
        default=None,
        help="seconds to wait after each measured run of an audit target for the shipper "
        "to deliver the spool (default 120, quick 30)",
    )
    gateway.add_argument(
        "--pgwarden-command",
        default=f"{shlex.quote(sys.executable)} -m pgwarden serve",
        help="command that starts the gateway (configured through PGWARDEN_* variables)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--out",
        type=Path,
        help="JSON results file; the chart goes next to it with .png "
        "(default: bench-results/gateway-<UTC timestamp>.json)",
    )
    output.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    output.add_argument(
        "--keep-workdir", action="store_true", help="keep proxy configs and logs after the run"
    )

    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 2
        args.warmup = 0
        args.bulk_repeats = 1
        args.scale = args.scale or 1
    args.scale = args.scale or 10
    if args.audit_drain_timeout is None:
        args.audit_drain_timeout = 30.0 if args.quick else 120.0
    if args.audit_drain_timeout < 0:
        parser.error("--audit-drain-timeout must be at least 0")
    if args.duration < 1 or args.rounds < 1 or args.bulk_repeats < 1:
        parser.error("--duration, --rounds and --bulk-repeats must be at least 1")
    if not 0 < args.sampling_rate <= 1:
        parser.error("--sampling-rate must be in (0, 1]")
    if args.rate is not None and args.rate < 1:
        parser.error("--rate must be at least 1")
    args.target_list = _split_list(args.targets)
    unknown = set(args.target_list) - {DIRECT, PGBOUNCER, PGWARDEN}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.audit and PGWARDEN not in args.target_list:
        parser.error("--audit needs the pgwarden target (--targets)")
    external = args.dsn or args.host or args.port or args.dbname
    if args.dsn and (args.host or args.port):
        parser.error("give --dsn or --host/--port, not both")
    args.external = bool(external)
    if args.init and not args.external:
        parser.error("--init is for your own server; the throwaway server is always initialised")
    return args


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def setting_variable(key: str) -> str:
    """``upstream__tls`` -> ``PGWARDEN_UPSTREAM__TLS``; ``PGWARDEN_*`` names are kept."""
    key = key.strip()
    upper = key.upper()
    return upper if upper.startswith("PGWARDEN_") else "PGWARDEN_" + upper


def _parse_assignment(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"{option} expects KEY=VALUE, got {text!r}")
    return setting_variable(key), value


def pgwarden_variants(args: argparse.Namespace, workdir: Path) -> list[PgWardenVariant]:
    """The pgwarden targets: the base configuration, then each --variant on top of it."""
    command = tuple(shlex.split(args.pgwarden_command))
    base: dict[str, str] = {}
    if args.workers is not None:
        base["PGWARDEN_WORKERS"] = str(args.workers)
    if args.statement_log:
        base["PGWARDEN_STATEMENT_LOG"] = str(workdir / "pgwarden-statements.jsonl")
    for item in args.pgwarden_env:
        key, value = _parse_assignment(item, "--pgwarden-env")
        base[key] = value
    variants = [PgWardenVariant(label=PGWARDEN, env=base, command=command)]
    extra: dict[str, dict[str, str]] = {}
    audit = [
        f"{AUDIT_VARIANT}:audit__directory={AUDIT_DIRECTORY_VALUE}",
        f"{AUDIT_VARIANT}:audit__mode=strict",
    ]
    for item in [*(audit if args.audit else []), *args.variant]:
        label, sep, assignment = item.partition(":")
        if not sep or not label:
            raise SystemExit(f"--variant expects LABEL:KEY=VALUE, got {item!r}")
        key, value = _parse_assignment(assignment, "--variant")
        name = f"{PGWARDEN}-{label}"
        if key == "PGWARDEN_STATEMENT_LOG" and value == "statement-log":
            value = str(workdir / f"{name}-statements.jsonl")
        extra.setdefault(name, dict(base))[key] = value
    variants += [
        PgWardenVariant(label=name, env=env, command=command) for name, env in extra.items()
    ]
    return [_resolve_audit_directory(v, workdir) for v in variants]


def _resolve_audit_directory(variant: PgWardenVariant, workdir: Path) -> PgWardenVariant:
    """An absolute audit directory: ``audit`` is a fresh one per target in the work
    directory (with a fixed chain key); another relative path is the one pgwarden would
    use, under the target's own directory."""
    value = variant.env.get(AUDIT_DIRECTORY)
    if not value:
        return variant
    env = dict(variant.env)
    if value == AUDIT_DIRECTORY_VALUE:
        directory = workdir / f"audit-{_file_name(variant.label)}"
        directory.mkdir()
        env.setdefault("PGWARDEN_AUDIT__CHAIN_KEY", BENCH_CHAIN_KEY)
    else:
        directory = workdir / _file_name(variant.label) / value
    env[AUDIT_DIRECTORY] = str(directory.resolve())
    return dataclasses.replace(variant, env=env)


def _file_name(label: str) -> str:
    """The directory name start_pgwarden gives a target (same rule)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in label)


def _needs_sink(variant: PgWardenVariant) -> bool:
    """Audit on and shipped over OTLP (HTTP or gRPC), and no endpoint given: the harness's
    sink."""
    env = variant.env
    return (
        AUDIT_DIRECTORY in env
        and _starts_shipper(variant)
        and _exporter(variant) in ("otlp_http", "otlp_grpc")
        and "PGWARDEN_AUDIT__ENDPOINT" not in env
    )


def _exporter(variant: PgWardenVariant) -> str:
    return variant.env.get("PGWARDEN_AUDIT__EXPORTER", "otlp_http")


def _starts_shipper(variant: PgWardenVariant) -> bool:
    value = variant.env.get("PGWARDEN_AUDIT__START_SHIPPER", "true")
    return value.strip().lower() not in ("false", "0", "no", "off")


def audit_targets(variants: Sequence[PgWardenVariant]) -> list[str]:
    """Variants with audit on, compared against a base pgwarden that has it off."""
    base_audited = any(v.label == PGWARDEN and AUDIT_DIRECTORY in v.env for v in variants)
    if base_audited:
        return []
    return [v.label for v in variants if v.label != PGWARDEN and AUDIT_DIRECTORY in v.env]


# --- the server under test -----------------------------------------------------------


@dataclass
class ServerUnderTest:
    endpoint: Endpoint
    version: str
    scale: int
    throwaway: bool
    cleanup: list[Any] = field(default_factory=list)
    #: The throwaway cluster's postmaster (its backends are its children).
    postmaster_pid: int | None = None


def start_throwaway_server(
    scale: int, workdir: Path, *, max_connections: int = 200
) -> ServerUnderTest:
    from pgwarden.pgcluster import FAST_UNSAFE_SETTINGS, TemporaryCluster

    settings: dict[str, str | int | float | bool] = {
        **FAST_UNSAFE_SETTINGS,
        "shared_buffers": "256MB",
        "max_connections": max_connections,
        "fsync": False,
    }
    _progress("starting a throwaway PostgreSQL cluster (ssl on, fsync off)")
    cluster = TemporaryCluster(settings=settings, ssl=True, base_dir=workdir / "postgres")
    try:
        cluster.start()
        password = secrets.token_urlsafe(18)
        cluster.psql(
            f"CREATE ROLE {BENCH_ROLE} LOGIN PASSWORD '{password}';"
            f"CREATE DATABASE {BENCH_ROLE} OWNER {BENCH_ROLE};"
        )
        version = cluster.psql("SHOW server_version").strip()
        endpoint = Endpoint(
            name=DIRECT,
            host=cluster.host,
            port=cluster.port,
            user=BENCH_ROLE,
            password=password,
            dbname=BENCH_ROLE,
            tls=True,
        )
        initialise_pgbench(endpoint, scale)
    except BaseException:
        cluster.cleanup()
        raise
    return ServerUnderTest(
        endpoint,
        version,
        scale,
        throwaway=True,
        cleanup=[cluster.cleanup],
        postmaster_pid=cluster.postmaster_pid,
    )


def connect_external_server(args: argparse.Namespace) -> ServerUnderTest:
    from psycopg.conninfo import conninfo_to_dict

    params: dict[str, Any] = conninfo_to_dict(args.dsn) if args.dsn else {}
    host = args.host or params.get("host") or os.environ.get("PGHOST") or "127.0.0.1"
    port = int(args.port or params.get("port") or os.environ.get("PGPORT") or 5432)
    user = (
        args.user
        or params.get("user")
        or os.environ.get("PGUSER")
        or pwd.getpwuid(os.getuid()).pw_name
    )
    password = args.password or params.get("password") or os.environ.get("PGPASSWORD")
    dbname = args.dbname or params.get("dbname") or os.environ.get("PGDATABASE") or user
    if not password:
        raise BenchSetupError(
            "a password is needed (--password, the DSN or PGPASSWORD): pgbouncer and pgwarden "
            "log in to your server with it"
        )
    probe = Endpoint(DIRECT, str(host), port, str(user), str(password), str(dbname), tls=False)
    conn = pq.PGconn.connect(probe.conninfo(tls=False).encode())
    try:
        if conn.status != pq.ConnStatus.OK:
            raise BenchSetupError(f"cannot connect to your server: {conn.get_error_message()}")
        version = _scalar(conn, "SHOW server_version")
        ssl_on = _scalar(conn, "SHOW ssl") == "on"
        has_tables = _scalar(conn, "SELECT to_regclass('pgbench_accounts') IS NOT NULL") == "t"
    finally:
        conn.finish()
    endpoint = Endpoint(DIRECT, str(host), port, str(user), str(password), str(dbname), ssl_on)
    if args.init:
        initialise_pgbench(endpoint, args.scale)
    elif not has_tables:
        raise BenchSetupError(
            "pgbench_accounts not found in that database: run with --init "
            "(creates the pgbench tables) or run `pgbench -i` yourself"
        )
    conn = pq.PGconn.connect(endpoint.conninfo(tls=False).encode())
    try:
        scale = int(_scalar(conn, "SELECT count(*) FROM pgbench_branches"))
    finally:
        conn.finish()
    return ServerUnderTest(endpoint, version, scale, throwaway=False)


def initialise_pgbench(endpoint: Endpoint, scale: int) -> None:
    _progress(f"pgbench -i -s {scale} (about {scale * 100_000:,} rows in pgbench_accounts)")
    result = subprocess.run(
        [pgbench_binary(), "--initialize", f"--scale={scale}", "--quiet", endpoint.dbname],
        env=endpoint.libpq_env(tls=False),
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if result.returncode != 0:
        raise BenchSetupError(f"pgbench -i failed:\n{result.stderr.strip()[-2000:]}")


def _scalar(conn: pq.abc.PGconn, sql: str) -> str:
    result = conn.exec_(sql.encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise BenchSetupError(f"{sql}: {result.get_error_message().strip()}")
    value = result.get_value(0, 0)
    return bytes(value).decode() if value is not None else ""


# --- the run -----------------------------------------------------------------------------


@dataclass
class AuditedTarget:
    """A pgwarden target with audit on: its spool, and the sink its shipper exports to."""

    label: str
    directory: Path
    sink: OtlpSink | None
    shipper: bool
    probe: SpoolProbe


@dataclass
class RunState:
    args: argparse.Namespace
    targets: list[Endpoint]
    audited: dict[str, AuditedTarget] = field(default_factory=dict)
    pgbench: list[bench_report.PgbenchRecord] = field(default_factory=list)
    bulk: list[bench_report.BulkRecord] = field(default_factory=list)
    audit: list[bench_report.AuditRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def pgbench_scenarios(args: argparse.Namespace) -> list[PgbenchScenario]:
    clients = [int(c) for c in _split_list(args.clients)]
    modes = [_query_mode(mode) for mode in _split_list(args.modes)]
    tls_options = [False] if args.no_tls else [False, True]
    return [
        PgbenchScenario(clients=c, threads=min(c, args.jobs), mode=mode, tls=tls)
        for tls in tls_options
        for c in clients
        for mode in modes
    ]


def _query_mode(text: str) -> QueryMode:
    if text == "simple":
        return "simple"
    if text == "prepared":
        return "prepared"
    raise SystemExit(f"--modes: {text!r} is neither simple nor prepared")


def bulk_scenarios(args: argparse.Namespace) -> list[BulkScenario]:
    if args.no_bulk:
        return []
    tls_options = [False] if args.no_tls else [False, True]
    return [BulkScenario(kind=kind, tls=tls) for tls in tls_options for kind in ("select", "copy")]


def rotated(targets: Sequence[Endpoint], offset: int) -> list[Endpoint]:
    """Round ``r`` starts with target ``r``: no target always runs first after a change."""
    offset %= len(targets)
    return [*targets[offset:], *targets[:offset]]


def run_pgbench_phase(state: RunState, round_no: int) -> None:
    args = state.args
    for scenario in pgbench_scenarios(args):
        for endpoint in rotated(state.targets, round_no):
            if scenario.tls and not endpoint.tls:
                continue
            label = f"round {round_no + 1}/{args.rounds} {scenario.key:<22} {endpoint.name}"
            audited = state.audited.get(endpoint.name)
            try:
                warm_up(endpoint, scenario, args.warmup)
                before = audited.probe.look() if audited is not None else None
                result = run_pgbench(
                    endpoint,
                    scenario,
                    duration_s=args.duration,
                    sampling_rate=args.sampling_rate,
                    rate=args.rate,
                )
            except PgbenchError as exc:
                state.errors.append(f"{label}: {exc}")
                _progress(f"{label}: FAILED\n{exc}")
                if audited is not None and audited.shipper:
                    # Whatever was spooled is shipped before the next target runs.
                    timeout = args.audit_drain_timeout
                    since = time.monotonic()
                    wait_drained(audited.probe, since=since, timeout=timeout, quiet=_quiet(timeout))
                continue
            p99 = f"{result.latency_p99_ms:.3f}" if result.latency_p99_ms is not None else "-"
            avg = result.latency_avg_ms
            cpu = result.cpu
            by_group = result.cpu_us_per_tx_by_group
            cpu_text = ""
            if cpu is not None and result.cpu_us_per_tx is not None:
                cpu_text = f"  cpu {result.cpu_us_per_tx:.0f} us/tx"
                if by_group:
                    cpu_text += f" ({bench_report.format_cpu_groups(by_group)})"
                if cpu.steal_share is not None:
                    cpu_text += f"  steal {cpu.steal_share:.1%}"
            _progress(f"{label}: {result.tps:>9,.0f} TPS  avg {avg:.3f} ms  p99 {p99} ms{cpu_text}")
            state.pgbench.append(
                bench_report.PgbenchRecord(
                    round=round_no + 1,
                    scenario=scenario.key,
                    clients=scenario.clients,
                    target=endpoint.name,
                    tps=result.tps,
                    latency_avg_ms=result.latency_avg_ms,
                    latency_p50_ms=result.latency_p50_ms,
                    latency_p99_ms=result.latency_p99_ms,
                    transactions=result.transactions,
                    failed=result.failed,
                    cpu_us_per_tx=_rounded(result.cpu_us_per_tx, 2),
                    steal_share=_rounded(cpu.steal_share if cpu else None, 4),
                    cpu_window_seconds=_rounded(cpu.window_seconds if cpu else None, 3),
                    cpu_us_per_tx_by_group=(
                        {group: round(us, 2) for group, us in by_group.items()}
                        if by_group
                        else None
                    ),
                )
            )
            if audited is not None and before is not None:
                record = measure_audit(
                    audited,
                    before,
                    round_no=round_no + 1,
                    scenario=scenario.key,
                    transactions=result.transactions,
                    drain_timeout=args.audit_drain_timeout,
                )
                state.audit.append(record)
                _progress(f"{label}: {describe_audit(record)}")


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _quiet(timeout: float) -> float:
    return min(DRAIN_QUIET_SECONDS, timeout)


def measure_audit(
    audited: AuditedTarget,
    before: SpoolState,
    *,
    round_no: int,
    scenario: str,
    transactions: int,
    drain_timeout: float,
) -> bench_report.AuditRecord:
    """The spool right at the end of the run, then the wait until the shipper drained it
    (so the next target runs on a quiet machine)."""
    end = audited.probe.look()
    if audited.shipper:
        drain = wait_drained(
            audited.probe, since=end.at, timeout=drain_timeout, quiet=_quiet(drain_timeout)
        )
    else:
        drain = Drain("no shipper", 0.0, end)
    after = drain.state

    def sink_delta(first: SpoolState, second: SpoolState, metric: str) -> int | None:
        if first.sink is None or second.sink is None:
            return None
        return int(getattr(second.sink, metric)) - int(getattr(first.sink, metric))

    return bench_report.AuditRecord(
        round=round_no,
        scenario=scenario,
        target=audited.label,
        run_seconds=round(end.at - before.at, 3),
        transactions=transactions,
        written_records=max(0, end.written_records - before.written_records),
        delivered_records=max(0, end.delivered_records - before.delivered_records),
        backlog_start_records=before.backlog_records,
        backlog_end_records=end.backlog_records,
        backlog_end_bytes=end.backlog_bytes,
        backlog_end_segments=end.segments,
        backlog_end_segment_bytes=end.segment_bytes,
        spool_end_bytes=end.file_bytes,
        drain=drain.outcome,
        drain_seconds=round(drain.seconds, 3),
        drained_records=max(0, after.delivered_records - end.delivered_records),
        residual_records=after.backlog_records,
        sink_requests_run=sink_delta(before, end, "requests"),
        sink_bytes_run=sink_delta(before, end, "bytes"),
        sink_requests_drain=sink_delta(end, after, "requests"),
        sink_bytes_drain=sink_delta(end, after, "bytes"),
    )


def describe_audit(record: bench_report.AuditRecord) -> str:
    """One progress line: what was written and shipped, the backlog, the drain."""
    mib = bench_report.MIB
    shipped = record.shipped_ratio
    text = (
        f"audit: wrote {record.written_records:,} records ({record.write_rate:,.0f}/s); "
        f"shipped {'-' if shipped is None else f'{shipped:.2f}'} of the run's "
        f"{record.to_deliver:,} by its end ({record.basis}), "
        f"{record.backlog_seconds:.1f} s of writing behind; "
        f"spool at end of run: {record.backlog_end_segments} "
        f"segment{'' if record.backlog_end_segments == 1 else 's'} / "
        f"{record.backlog_end_bytes / mib:.1f} MiB not delivered "
        f"({record.backlog_end_records:,} records by the checkpoint)"
    )
    if record.drain == "drained":
        text += f", drained in {record.drain_seconds:.1f} s"
        if record.drain_rate is not None:
            text += f" ({record.drain_rate:,.0f} records/s)"
    elif record.drain == "no shipper":
        text += ", no shipper to drain it (audit.start_shipper = false)"
    else:
        text += (
            f", NOT drained ({record.drain} after {record.drain_seconds:.1f} s, "
            f"{record.residual_records:,} records left)"
        )
    if record.sink_bytes_run is not None and record.sink_bytes_drain is not None:
        text += (
            f"; sink got {record.sink_bytes_run / mib:.1f} MiB during the run, "
            f"{record.sink_bytes_drain / mib:.1f} MiB after"
        )
    return text + f" -> {'kept up' if record.kept_up else 'fell behind'}"


def run_bulk_phase(state: RunState, round_no: int, direct: Endpoint) -> None:
    scenarios = bulk_scenarios(state.args)
    if not scenarios:
        return
    rows, payload = select_payload_bytes(direct)
    if round_no == 0:
        # One untimed read so the table is in the OS cache before any target is timed.
        bulk_select(direct, tls=False, expected_rows=rows, payload=payload)
    for scenario in scenarios:
        for endpoint in rotated(state.targets, round_no):
            if scenario.tls and not endpoint.tls:
                continue
            label = f"round {round_no + 1}/{state.args.rounds} {scenario.key:<22} {endpoint.name}"
            for _ in range(state.args.bulk_repeats):
                try:
                    if scenario.kind == "select":
                        result = bulk_select(
                            endpoint, tls=scenario.tls, expected_rows=rows, payload=payload
                        )
                    else:
                        result = bulk_copy(endpoint, tls=scenario.tls, expected_rows=rows)
                except BulkReadError as exc:
                    state.errors.append(f"{label}: {exc}")
                    _progress(f"{label}: FAILED\n{exc}")
                    break
                _progress(f"{label}: {result.seconds:6.3f} s  {result.mb_per_s:7.1f} MB/s")
                state.bulk.append(
                    bench_report.BulkRecord(
                        round=round_no + 1,
                        scenario=scenario.key,
                        target=endpoint.name,
                        seconds=result.seconds,
                        rows=result.rows,
                        payload_bytes=result.payload_bytes,
                        mb_per_s=result.mb_per_s,
                    )
                )


# --- metadata ------------------------------------------------------------------------------


def _command_version(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (
        (result.stdout or result.stderr).strip().splitlines()[0]
        if result.returncode == 0
        else "unknown"
    )


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def collect_meta(
    args: argparse.Namespace,
    server: ServerUnderTest,
    variants: Sequence[PgWardenVariant],
    started: datetime.datetime,
) -> dict[str, Any]:
    try:
        pgwarden_version = importlib.metadata.version("pgwarden")
    except importlib.metadata.PackageNotFoundError:
        pgwarden_version = "not installed"
    secret_free_args = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in vars(args).items()
        if key not in ("password", "dsn")
    }
    return {
        "tool": "benches/gateway_bench.py",
        "started_utc": started.isoformat(timespec="seconds"),
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "server": {
            "throwaway": server.throwaway,
            "version": server.version,
            "scale": server.scale,
            "tls": server.endpoint.tls,
        },
        "pgbench": _command_version([pgbench_binary(), "--version"]),
        "pgbouncer": _command_version(
            [
                os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer",
                "-V",
            ]
        ),
        "pgwarden": {
            "version": pgwarden_version,
            "git_revision": _git_revision(),
            "variants": {
                v.label: {
                    k: v for k, v in v.env.items() if "PASSWORD" not in k and "CHAIN_KEY" not in k
                }
                for v in variants
            },
        },
        "libpq_bulk_client": pq.version(),
        "args": secret_free_args,
    }


def check_shippers(state: RunState, processes: Sequence[ManagedProcess]) -> None:
    """A shipper that exported nothing while records were written is a broken setup, not
    a slow shipper: say so, with the gateway's log (which has the shipper's errors)."""
    for label, audited in state.audited.items():
        if audited.sink is None or not audited.shipper:
            continue
        written = sum(r.written_records for r in state.audit if r.target == label)
        if written == 0:
            continue
        try:
            requests = audited.sink.stats().requests
        except (OSError, ValueError):
            continue  # reported by audit_meta
        if requests == 0:
            log = next((p.log_tail() for p in processes if p.name == label), "")
            state.errors.append(
                f"{label}: the audit shipper exported nothing although {written:,} records "
                f"were written; gateway log tail:\n{log}"
            )


def audit_meta(state: RunState, variants: Sequence[PgWardenVariant]) -> dict[str, Any]:
    """Per audit target: its settings of note and its sink's totals (before the stop)."""
    info: dict[str, Any] = {}
    for label, audited in state.audited.items():
        env = next((v.env for v in variants if v.label == label), {})
        entry: dict[str, Any] = {
            "directory": str(audited.directory),
            "exporter": env.get("PGWARDEN_AUDIT__EXPORTER", "otlp_http"),
            "endpoint": env.get("PGWARDEN_AUDIT__ENDPOINT"),
            "mode": env.get("PGWARDEN_AUDIT__MODE", "strict"),
            "shipper": audited.shipper,
            "drain_timeout_seconds": state.args.audit_drain_timeout,
            "keep_up_seconds": bench_report.KEEP_UP_SECONDS,
            "keep_up_seconds_by_checkpoint": bench_report.KEEP_UP_SECONDS_CHECKPOINT,
        }
        if audited.sink is not None:
            try:
                entry["sink_stats"] = dataclasses.asdict(audited.sink.stats())
            except (OSError, ValueError) as exc:
                entry["sink_stats"] = None
                state.errors.append(f"OTLP sink of {label}: no statistics ({exc})")
        info[label] = entry
    return info


# --- main ------------------------------------------------------------------------------------


@contextlib.contextmanager
def work_directory(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgwarden-bench-"))
    try:
        yield path
    finally:
        if keep:
            _progress(f"work directory kept: {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _stop_all(processes: list[ManagedProcess]) -> None:
    for process in reversed(processes):
        process.stop()


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    out_json: Path = args.out or Path("bench-results") / (
        f"gateway-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    processes: list[ManagedProcess] = []
    with work_directory(args.keep_workdir) as workdir, contextlib.ExitStack() as stack:
        run_as = unprivileged_user()
        if run_as is not None:
            # pgbouncer runs as this user and must read its files here.
            os.chown(workdir, run_as.pw_uid, run_as.pw_gid)
        try:
            server = (
                connect_external_server(args)
                if args.external
                else start_throwaway_server(args.scale, workdir)
            )
            for cleanup in server.cleanup:
                stack.callback(cleanup)
            # Registered after the server: the proxies stop first.
            stack.callback(_stop_all, processes)
            upstream_tls: UpstreamTls = args.upstream_tls
            tls_files: TlsFiles | None = None
            if not args.no_tls:
                tls_files = write_dev_certificate(workdir, run_as)
            targets: list[Endpoint] = []
            if DIRECT in args.target_list:
                targets.append(server.endpoint)
            if PGBOUNCER in args.target_list:
                _progress("starting pgbouncer")
                endpoint, process = start_pgbouncer(
                    server.endpoint, workdir, tls_files, upstream_tls=upstream_tls, run_as=run_as
                )
                processes.append(process)
                targets.append(endpoint)
            variants = pgwarden_variants(args, workdir) if PGWARDEN in args.target_list else []
            audited: dict[str, AuditedTarget] = {}
            for index, variant in enumerate(variants):
                sink = None
                if _needs_sink(variant):
                    # Started before the gateway, so it is stopped after it (and its
                    # shipper's last export on the way out still gets an answer).
                    sink = start_sink(workdir / "otlp-sinks", f"otlp-sink-{variant.label}")
                    processes.append(sink.process)
                    to_sink = {"PGWARDEN_AUDIT__ENDPOINT": sink.endpoint(_exporter(variant))}
                    variant = dataclasses.replace(variant, env={**variant.env, **to_sink})
                    variants[index] = variant
                _progress(f"starting {variant.label}")
                endpoint, process = start_pgwarden(
                    server.endpoint, workdir, tls_files, variant, upstream_tls=upstream_tls
                )
                processes.append(process)
                targets.append(endpoint)
                if AUDIT_DIRECTORY in variant.env:
                    directory = Path(variant.env[AUDIT_DIRECTORY])
                    audited[variant.label] = AuditedTarget(
                        label=variant.label,
                        directory=directory,
                        sink=sink,
                        shipper=_starts_shipper(variant),
                        probe=SpoolProbe(directory, sink),
                    )
        except (BenchSetupError, ProxyError) as exc:
            _progress(f"setup failed: {exc}")
            return 2
        if not targets:
            _progress("no targets selected")
            return 2

        meta = collect_meta(args, server, variants, started)
        state = RunState(args=args, targets=targets, audited=audited)
        for round_no in range(args.rounds):
            run_pgbench_phase(state, round_no)
            run_bulk_phase(state, round_no, server.endpoint)
        for process in processes:
            if not process.alive:
                state.errors.append(f"{process.name} exited during the run:\n{process.log_tail()}")
        check_shippers(state, processes)
        meta["host"]["load_average_at_end"] = list(os.getloadavg())
        meta["duration_seconds"] = round(
            (datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1
        )
        meta["errors"] = state.errors
        meta["audit"] = audit_meta(state, variants)

    target_names = [t.name for t in targets]
    pgbench_summary = bench_report.summarize_pgbench(state.pgbench)
    bulk_summary = bench_report.summarize_bulk(state.bulk)
    vs_base = bench_report.variant_ratios(state.pgbench, PGWARDEN)
    audit_summary = bench_report.summarize_audit(state.audit)
    goals = bench_report.goal_checks(pgbench_summary, target_names)
    goals += bench_report.audit_goal_checks(
        vs_base, pgbench_summary, audit_summary, audit_targets(variants)
    )
    bench_report.write_json(
        out_json,
        meta=meta,
        pgbench=state.pgbench,
        bulk=state.bulk,
        pgbench_summary=pgbench_summary,
        bulk_summary=bulk_summary,
        goals=goals,
        vs_base=vs_base,
        audit=state.audit,
        audit_summary=audit_summary,
    )
    title = (
        f"pgwarden gateway bench {started:%Y-%m-%d %H:%M} UTC - PostgreSQL {server.version}, "
        f"pgbench scale {server.scale}, {args.duration} s per run"
        f"{f' at {args.rate} TPS' if args.rate else ''}, {args.rounds} round(s), "
        f"{os.cpu_count()} CPUs, rev {meta['pgwarden']['git_revision']}"
    )
    chart_path = out_json.with_suffix(".png")
    if not args.no_chart:
        bench_report.draw_chart(
            chart_path,
            title=title,
            targets=target_names,
            pgbench_summary=pgbench_summary,
            bulk_summary=bulk_summary,
        )
    print()
    print(title)
    print()
    if pgbench_summary:
        print(bench_report.format_pgbench_table(pgbench_summary, target_names, vs_base))
        print()
        by_process = bench_report.format_cpu_by_group_table(pgbench_summary, target_names)
        if by_process:
            print(by_process)
            print()
    if audit_summary:
        print(bench_report.format_audit_table(audit_summary))
        for label, info in meta["audit"].items():
            sink_stats = info.get("sink_stats")
            if sink_stats:
                print(
                    f"OTLP sink of {label}: {sink_stats['requests']:,} requests, "
                    f"{sink_stats['bytes'] / bench_report.MIB:.1f} MiB received, "
                    f"{sink_stats['cpu_seconds']:.1f} s CPU for the whole run"
                )
        print()
    if bulk_summary:
        print(bench_report.format_bulk_table(bulk_summary, target_names))
        print()
    print(bench_report.format_goals(goals))
    print()
    print(f"results: {out_json}" + ("" if args.no_chart else f"\nchart:   {chart_path}"))
    if state.errors:
        print(f"\n{len(state.errors)} measurement(s) failed:", file=sys.stderr)
        for error in state.errors:
            print(f"  {error.splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

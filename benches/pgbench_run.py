"""Run ``pgbench -S`` against one endpoint and turn its output into figures.

TPS and the average latency come from pgbench's own summary.  Percentiles come from
pgbench's per-transaction log (``-l``): one line per transaction whose third field is
the transaction's latency in microseconds, so p50/p99 are exact order statistics over
every transaction of the run, not an average of per-interval figures.

The machine's CPU time is read from ``/proc/stat`` just before pgbench starts and just
after it exits (before its logs are read), so the CPU time per transaction covers the
whole machine over the run: pgbench, the proxy, its helpers and PostgreSQL.  Every
process's own CPU time (``/proc/<pid>/stat``) is read around the same window, to split
that figure by process group (:data:`CPU_GROUPS`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from endpoints import Endpoint

QueryMode = Literal["simple", "prepared"]

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY_AVG = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)

#: Where the machine's busy CPU time goes, in the order tables show it.  ``other`` is what
#: is left: kernel threads, interrupt time charged to no process, the harness, the rest.
CPU_GROUPS: Final[tuple[str, ...]] = (
    "pgwarden",
    "shipper",
    "sink",
    "pgbouncer",
    "postgres",
    "pgbench",
    "other",
)


class PgbenchError(RuntimeError):
    """pgbench failed or printed something this module cannot read."""


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of ``/proc/stat``, in clock ticks (USER_HZ).

    ``guest`` and ``guest_nice`` are left out: the kernel already counts them in ``user``
    and ``nice``.
    """

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def busy(self) -> int:
        """Ticks some CPU spent running something: everything but idle, iowait, steal."""
        return self.user + self.nice + self.system + self.irq + self.softirq

    @property
    def total(self) -> int:
        return self.busy + self.idle + self.iowait + self.steal


def read_cpu_times(path: Path = Path("/proc/stat")) -> CpuTimes | None:
    """The machine's CPU times so far; None where there is no ``/proc/stat`` (not Linux)."""
    try:
        with path.open(encoding="ascii") as handle:
            line = handle.readline()
    except OSError:
        return None
    fields = line.split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return CpuTimes(user, nice, system, idle, iowait, irq, softirq, steal)


@dataclass(frozen=True)
class ProcessCpu:
    """One process's ``/proc/<pid>/stat``, in clock ticks (fields 4 and 14-17)."""

    ppid: int
    group: str | None
    """Its entry of :data:`CPU_GROUPS`; None for a process in none of them, or one the
    harness did not start (another gateway or PostgreSQL on the machine is ``other``)."""
    own_ticks: int
    """utime + stime: every thread of the process, dead ones included."""
    reaped_ticks: int
    """cutime + cstime: the children it has waited for (and those they waited for)."""


@dataclass(frozen=True)
class ProcessCpuSnapshot:
    """Every process's CPU time at one moment (from :func:`read_process_cpu`)."""

    processes: dict[tuple[int, int], ProcessCpu]
    """By pid and start time (field 22), which tells a process from a later one that
    reuses its pid."""
    children_seconds: float
    """User + system time of this process's waited-for children (``os.times``).  In the
    window that is pgbench alone: it exits, and is waited for, before the window closes,
    while the server, proxies and sink are waited for only when they are stopped."""


def process_group(comm: str, argv: Sequence[str]) -> str | None:
    """The group of :data:`CPU_GROUPS` a process belongs to, from its name and arguments.

    Gateway workers are forked from ``pgwarden serve`` and keep its arguments; PostgreSQL
    backends rewrite their arguments (the ``ps`` title) but keep the name ``postgres``.
    """
    if comm == "postgres":
        return "postgres"
    if comm == "pgbouncer":
        return "pgbouncer"
    for first, second in itertools.pairwise(argv):
        if first == "audit" and second == "ship":
            return "shipper"
        # `python -m pgwarden serve` or an installed `pgwarden serve` script.
        if Path(first).name == "pgwarden" and second == "serve":
            return "pgwarden"
    if any("otlp_sink" in arg for arg in argv):
        return "sink"
    return None


def read_process_cpu(
    root_pid: int | None = None, proc: Path = Path("/proc")
) -> ProcessCpuSnapshot | None:
    """Every process's CPU time so far, grouping only the descendants of ``root_pid``
    (default: this process); None where there is no ``/proc`` (not Linux).

    The harness starts PostgreSQL, the proxies and the sink as its children, without
    daemonizing, so its tree is exactly what it measures.  The harness itself is in no
    group: its reaped time is pgbench's, counted apart.
    """
    children = os.times()
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    found: dict[tuple[int, int], tuple[ProcessCpu, str | None]] = {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            stat = (proc / name / "stat").read_bytes()
            cmdline = (proc / name / "cmdline").read_bytes()
        except OSError:
            continue  # it exited since the listing
        # The name in parentheses may itself hold spaces and parentheses (proc(5)).
        head, _, tail = stat.rpartition(b")")
        fields = tail.split()
        if len(fields) < 20:
            continue
        comm = head.partition(b"(")[2].decode("utf-8", "replace")
        argv = [arg.decode("utf-8", "replace") for arg in cmdline.split(b"\0") if arg]
        # fields[0] is field 3 of proc(5): field n is fields[n - 3].
        process = ProcessCpu(
            ppid=int(fields[1]),
            group=None,
            own_ticks=int(fields[11]) + int(fields[12]),
            reaped_ticks=int(fields[13]) + int(fields[14]),
        )
        found[(int(name), int(fields[19]))] = (process, process_group(comm, argv))
    tree = _descendants(
        os.getpid() if root_pid is None else root_pid,
        [(pid, process.ppid) for (pid, _), (process, _) in found.items()],
    )
    processes = {
        key: dataclasses.replace(process, group=group) if key[0] in tree else process
        for key, (process, group) in found.items()
    }
    return ProcessCpuSnapshot(processes, children.children_user + children.children_system)


def _descendants(root: int, parents: Sequence[tuple[int, int]]) -> set[int]:
    """Every pid below ``root``, from (pid, ppid) pairs."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents:
        children.setdefault(ppid, []).append(pid)
    tree: set[int] = set()
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in tree and child != root:
                tree.add(child)
                pending.append(child)
    return tree


def cpu_by_group(before: ProcessCpuSnapshot, after: ProcessCpuSnapshot) -> dict[str, int]:
    """CPU time in µs of each group but ``other`` between two snapshots.

    A group is there when one of its processes was seen (``pgbench`` always is).  A process
    that appears in the window counts from 0.  One that exits in it is found again in its
    parent's reaped time, when the parent was there throughout: so are PostgreSQL backends
    that exit as pgbench disconnects.  Its ticks go to the parent's group, less what it had
    used before the window.  A process whose parent is in no group (or exits too), or that
    nobody waits for, loses what it used in the window to ``other``.
    """
    us_per_tick = 1_000_000 / os.sysconf("SC_CLK_TCK")
    ticks: dict[str, int] = {}
    gone_by_parent: dict[int, int] = {}
    for key, then in before.processes.items():
        if key not in after.processes:
            gone_by_parent[then.ppid] = (
                gone_by_parent.get(then.ppid, 0) + then.own_ticks + then.reaped_ticks
            )
        if then.group is not None:
            ticks.setdefault(then.group, 0)
    for key, now in after.processes.items():
        if now.group is None:
            continue
        earlier = before.processes.get(key)
        used = now.own_ticks
        if earlier is not None:
            used -= earlier.own_ticks
            # Clamped: a child reaped without a wait (SIGCHLD ignored) adds nothing here.
            reaped = now.reaped_ticks - earlier.reaped_ticks - gone_by_parent.get(key[0], 0)
            used += max(0, reaped)
        ticks[now.group] = ticks.get(now.group, 0) + used
    result = {group: round(value * us_per_tick) for group, value in ticks.items()}
    result["pgbench"] = round((after.children_seconds - before.children_seconds) * 1_000_000)
    return result


@dataclass(frozen=True)
class CpuUsage:
    """The machine's CPU time over one window (from :func:`read_cpu_times` twice)."""

    busy_us: int
    """user + nice + system + irq + softirq, summed over every CPU, in µs."""
    steal_share: float | None
    """Steal as a share of all CPU time in the window (None if no tick elapsed)."""
    window_seconds: float
    by_group_us: dict[str, int] | None = None
    """``busy_us`` split by :data:`CPU_GROUPS` (in that order), ``other`` being the rest;
    None where ``/proc`` was not read."""

    @staticmethod
    def between(
        before: CpuTimes | None,
        after: CpuTimes | None,
        window_seconds: float,
        processes: tuple[ProcessCpuSnapshot | None, ProcessCpuSnapshot | None] = (None, None),
    ) -> CpuUsage | None:
        if before is None or after is None:
            return None
        us_per_tick = 1_000_000 / os.sysconf("SC_CLK_TCK")
        total = after.total - before.total
        busy_us = round((after.busy - before.busy) * us_per_tick)
        by_group_us = None
        first, second = processes
        if first is not None and second is not None:
            groups = cpu_by_group(first, second)
            groups["other"] = busy_us - sum(groups.values())
            by_group_us = {group: groups[group] for group in CPU_GROUPS if group in groups}
        return CpuUsage(
            busy_us=busy_us,
            steal_share=(after.steal - before.steal) / total if total > 0 else None,
            window_seconds=window_seconds,
            by_group_us=by_group_us,
        )


@dataclass(frozen=True)
class PgbenchScenario:
    """One ``pgbench -S`` configuration."""

    clients: int
    threads: int
    mode: QueryMode
    tls: bool

    @property
    def key(self) -> str:
        """Stable name used in tables, JSON and the chart, e.g. ``S c=16 prepared TLS``."""
        return f"S c={self.clients} {self.mode}" + (" TLS" if self.tls else "")


@dataclass(frozen=True)
class PgbenchResult:
    """Figures of one measured pgbench run."""

    tps: float
    latency_avg_ms: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    transactions: int
    failed: int
    logged_transactions: int
    cpu: CpuUsage | None = None
    """The whole machine's CPU time from pgbench's start to its exit."""

    @property
    def cpu_us_per_tx(self) -> float | None:
        if self.cpu is None or self.transactions <= 0:
            return None
        return self.cpu.busy_us / self.transactions

    @property
    def cpu_us_per_tx_by_group(self) -> dict[str, float] | None:
        """:attr:`cpu_us_per_tx` split by :data:`CPU_GROUPS`."""
        if self.cpu is None or self.cpu.by_group_us is None or self.transactions <= 0:
            return None
        return {group: us / self.transactions for group, us in self.cpu.by_group_us.items()}


def pgbench_binary() -> str:
    """The pgbench executable: ``PGBENCH`` if set, else the one on ``PATH``."""
    found = os.environ.get("PGBENCH") or shutil.which("pgbench")
    if not found:
        raise PgbenchError("pgbench not found; install postgresql-client or set PGBENCH")
    return found


def _pgbench(
    endpoint: Endpoint, scenario: PgbenchScenario, options: list[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``pgbench -n -S`` with the scenario's clients and mode; fail on a non-zero exit."""
    command = [
        pgbench_binary(),
        "--no-vacuum",
        "--select-only",
        f"--protocol={scenario.mode}",
        f"--client={scenario.clients}",
        f"--jobs={scenario.threads}",
        *options,
        endpoint.dbname,
    ]
    try:
        result = subprocess.run(
            command,
            env=endpoint.libpq_env(tls=scenario.tls),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise PgbenchError(f"pgbench against {endpoint.name} timed out") from exc
    if result.returncode != 0:
        raise PgbenchError(
            f"pgbench against {endpoint.name} ({scenario.key}) exited with "
            f"{result.returncode}:\n{_tail(result.stderr or result.stdout)}"
        )
    return result


def warm_up(endpoint: Endpoint, scenario: PgbenchScenario, seconds: int) -> None:
    """Unmeasured pgbench: ``seconds`` of load, or 20 transactions per client for 0.

    Only the exit status matters: on a loaded machine a short warm-up may finish before
    every client has completed its TLS handshake, and then pgbench prints no figures.
    """
    options = [f"--time={seconds}"] if seconds > 0 else ["--transactions=20"]
    _pgbench(endpoint, scenario, options, timeout=seconds + 120)


def run_pgbench(
    endpoint: Endpoint,
    scenario: PgbenchScenario,
    *,
    duration_s: int,
    log_latencies: bool = True,
    sampling_rate: float = 1.0,
    rate: int | None = None,
) -> PgbenchResult:
    """Measure ``duration_s`` seconds of ``pgbench -n -S``, with per-transaction latencies
    (at most ``rate`` transactions per second, if given)."""
    with tempfile.TemporaryDirectory(prefix="pgwarden-bench-log-") as log_dir:
        options = [f"--time={duration_s}"]
        if rate is not None:
            options.append(f"--rate={rate}")
        if log_latencies:
            options += ["--log", f"--log-prefix={Path(log_dir) / 'txn'}"]
            if sampling_rate < 1.0:
                options.append(f"--sampling-rate={sampling_rate}")
        # The process scans sit outside the machine's window, so their own CPU time does
        # not inflate it.  pgbench is a child of this process, run and waited for in
        # between: its CPU time is in the children times of the second scan only (the
        # warm-up's pgbench was waited for before the first).
        processes_before = read_process_cpu()
        started, cpu_before = time.monotonic(), read_cpu_times()
        result = _pgbench(endpoint, scenario, options, timeout=duration_s + 120)
        cpu_after, ended = read_cpu_times(), time.monotonic()
        processes_after = read_process_cpu()
        latencies = _read_latency_logs(Path(log_dir)) if log_latencies else []
    parsed = _parse_summary(result.stdout, latencies, endpoint.name, scenario)
    cpu = CpuUsage.between(
        cpu_before, cpu_after, ended - started, (processes_before, processes_after)
    )
    return dataclasses.replace(parsed, cpu=cpu)


def _parse_summary(
    output: str, latencies_us: list[int], target: str, scenario: PgbenchScenario
) -> PgbenchResult:
    tps = _TPS.search(output)
    latency = _LATENCY_AVG.search(output)
    processed = _PROCESSED.search(output)
    if processed is not None and int(processed.group(1)) == 0:
        raise PgbenchError(f"pgbench completed no transaction against {target} ({scenario.key})")
    if tps is None or latency is None or processed is None:
        raise PgbenchError(
            f"cannot read pgbench output for {target} ({scenario.key}):\n{_tail(output)}"
        )
    failed = _FAILED.search(output)
    latencies_us.sort()
    return PgbenchResult(
        tps=float(tps.group(1)),
        latency_avg_ms=float(latency.group(1)),
        latency_p50_ms=_percentile_ms(latencies_us, 0.50),
        latency_p99_ms=_percentile_ms(latencies_us, 0.99),
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        logged_transactions=len(latencies_us),
    )


def _read_latency_logs(log_dir: Path) -> list[int]:
    """Latencies (µs) from every per-thread log file pgbench wrote in ``log_dir``.

    Line format (pgbench docs, "Per-Transaction Logging"):
    ``client_id transaction_no time script_no time_epoch time_us [schedule_lag] [retries]``
    where ``time`` is the latency in µs.  A skipped transaction logs ``skipped`` there
    (only with ``--rate``, which this harness never uses) and is ignored.
    """
    latencies: list[int] = []
    for path in sorted(log_dir.iterdir()):
        with path.open("rb") as handle:
            for line in handle:
                fields = line.split(maxsplit=3)
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]))
    return latencies


def _percentile_ms(sorted_us: list[int], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted microsecond values, in milliseconds."""
    if not sorted_us:
        return None
    rank = max(1, math.ceil(len(sorted_us) * fraction))
    return sorted_us[rank - 1] / 1000.0


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

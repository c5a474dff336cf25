"""Run ``pgbench -S`` against one endpoint and turn its output into figures.

TPS and the average latency come from pgbench's own summary.  Percentiles come from
pgbench's per-transaction log (``-l``): one line per transaction whose third field is
the transaction's latency in microseconds, so p50/p99 are exact order statistics over
every transaction of the run, not an average of per-interval figures.

The machine's CPU time is read from ``/proc/stat`` just before pgbench starts and just
after it exits (before its logs are read), so the CPU time per transaction covers the
whole machine over the run: pgbench, the proxy, its helpers and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from endpoints import Endpoint

QueryMode = Literal["simple", "prepared"]

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.MULTILINE)
_LATENCY_AVG = re.compile(r"^latency average = ([0-9.]+) ms", re.MULTILINE)
_PROCESSED = re.compile(r"^number of transactions actually processed: (\d+)", re.MULTILINE)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.MULTILINE)


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
class CpuUsage:
    """The machine's CPU time over one window (from :func:`read_cpu_times` twice)."""

    busy_us: int
    """user + nice + system + irq + softirq, summed over every CPU, in µs."""
    steal_share: float | None
    """Steal as a share of all CPU time in the window (None if no tick elapsed)."""
    window_seconds: float

    @staticmethod
    def between(
        before: CpuTimes | None, after: CpuTimes | None, window_seconds: float
    ) -> CpuUsage | None:
        if before is None or after is None:
            return None
        us_per_tick = 1_000_000 / os.sysconf("SC_CLK_TCK")
        total = after.total - before.total
        return CpuUsage(
            busy_us=round((after.busy - before.busy) * us_per_tick),
            steal_share=(after.steal - before.steal) / total if total > 0 else None,
            window_seconds=window_seconds,
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
) -> PgbenchResult:
    """Measure ``duration_s`` seconds of ``pgbench -n -S``, with per-transaction latencies."""
    with tempfile.TemporaryDirectory(prefix="pgwarden-bench-log-") as log_dir:
        options = [f"--time={duration_s}"]
        if log_latencies:
            options += ["--log", f"--log-prefix={Path(log_dir) / 'txn'}"]
            if sampling_rate < 1.0:
                options.append(f"--sampling-rate={sampling_rate}")
        started, cpu_before = time.monotonic(), read_cpu_times()
        result = _pgbench(endpoint, scenario, options, timeout=duration_s + 120)
        cpu_after, ended = read_cpu_times(), time.monotonic()
        latencies = _read_latency_logs(Path(log_dir)) if log_latencies else []
    parsed = _parse_summary(result.stdout, latencies, endpoint.name, scenario)
    cpu = CpuUsage.between(cpu_before, cpu_after, ended - started)
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

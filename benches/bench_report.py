"""Summaries of a benchmark run: the printed table, the JSON document and the chart.

Every run of a (scenario, target) pair is kept in the JSON; tables and the chart show
the median over rounds.  Ratios are only meaningful within one run: the machine, its
load and the server cache are the same for every target because targets alternate.
"""

from __future__ import annotations

import json
import random
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Final

from pgbench_run import CPU_GROUPS
from pgwarden.audit.spool import CHECKPOINT_INTERVAL_SECONDS

DIRECT = "direct"
PGBOUNCER = "pgbouncer"
PGWARDEN = "pgwarden"

#: Targets from the issue: at c=1, pgwarden's latency added over a direct connection is at
#: most 1.5x pgbouncer's; at c=16, pgwarden's TPS is at least 0.9x pgbouncer's.
ADDED_LATENCY_GOAL = 1.5
TPS_GOAL = 0.9
#: With strict audit on, pgwarden keeps at least this share of its TPS without audit (c>1).
AUDIT_TPS_GOAL = 0.9
#: The audit shipper kept up when, at the end of a measured run, what it had not delivered
#: yet is at most this many seconds of what the gateway wrote: a shipper that keeps pace
#: is behind by the batch in hand and its 100 ms poll, whatever the run's length.
KEEP_UP_SECONDS = 1.0
#: The same, measured by the shipper's checkpoint, which trails it by up to
#: CHECKPOINT_INTERVAL_SECONDS more.
KEEP_UP_SECONDS_CHECKPOINT = KEEP_UP_SECONDS + CHECKPOINT_INTERVAL_SECONDS
#: A drain shorter than this is reported without a rate (the polling step is 0.1 s).
MIN_DRAIN_SECONDS = 0.5
MIB = 1024 * 1024
#: The interval given around a median of per-round ratios: its coverage, how many
#: bootstrap resamples estimate it, and the fewest rounds it is given for.
INTERVAL_CONFIDENCE: Final = 0.95
INTERVAL_RESAMPLES: Final = 4000
INTERVAL_MIN_ROUNDS: Final = 4


def median_interval(
    values: Sequence[float],
    *,
    confidence: float = INTERVAL_CONFIDENCE,
    resamples: int = INTERVAL_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A bootstrap percentile interval for the median of ``values``: resample the values
    with replacement, take each resample's median, and keep the central ``confidence``
    share of those medians.  Seeded, so the same rounds always print the same interval.
    None for fewer than :data:`INTERVAL_MIN_ROUNDS` values, where it says nothing."""
    if len(values) < INTERVAL_MIN_ROUNDS:
        return None
    rng = random.Random(seed)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low = medians[int(tail * resamples)]
    high = medians[min(resamples - 1, int((1 - tail) * resamples))]
    return low, high


def interval_verdict(interval: tuple[float, float] | None, goal: float) -> str:
    """Whether the rounds decide a ``>= goal`` question: the whole interval on one side
    of the goal, or not."""
    if interval is None:
        return f"too few rounds for an interval (at least {INTERVAL_MIN_ROUNDS})"
    low, high = interval
    shown = f"{INTERVAL_CONFIDENCE:.0%} interval of the median {low:.2f}-{high:.2f}"
    if low >= goal:
        return f"{shown}: at or above the goal"
    if high < goal:
        return f"{shown}: below the goal"
    return f"{shown}: spans the goal, so these rounds do not decide it"


@dataclass(frozen=True)
class PgbenchRecord:
    round: int
    scenario: str
    clients: int
    target: str
    tps: float
    latency_avg_ms: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    transactions: int
    failed: int
    cpu_us_per_tx: float | None = None
    """Busy CPU time of the whole machine (every core: user, nice, system, irq, softirq)
    from pgbench's start to its exit, per transaction; None where /proc/stat is missing."""
    steal_share: float | None = None
    """CPU time the host stole in that window, as a share of all CPU time in it."""
    cpu_window_seconds: float | None = None
    """Length of that window (the run plus pgbench connecting and disconnecting)."""
    cpu_us_per_tx_by_group: dict[str, float] | None = None
    """``cpu_us_per_tx`` split by process group (``pgbench_run.CPU_GROUPS``: pgwarden,
    shipper, sink, pgbouncer, postgres, pgbench, other), for the groups that had a process
    the harness started, pgbench and other always; None where ``/proc`` is missing."""


@dataclass(frozen=True)
class BulkRecord:
    round: int
    scenario: str
    target: str
    seconds: float
    rows: int
    payload_bytes: int
    mb_per_s: float


@dataclass(frozen=True)
class AuditRecord:
    """The audit spool of one target around one measured pgbench run, and its drain.

    Records are counted by seq (about two per pgbench -S transaction: stmt and end).  The
    shipper's checkpoint says what it delivered, but trails it by up to 3 seconds while it
    works; the sink's byte counts do not trail.  So when the harness's sink received the
    export and the spool drained, what was delivered by the end of the run is measured at
    the sink: the run's share of the bytes the run and the drain exported together (the
    two delivered exactly the records the run had to deliver).  Otherwise the checkpoint
    is used, with a larger allowance.
    """

    round: int
    scenario: str
    target: str
    run_seconds: float
    transactions: int
    written_records: int
    """Records the gateway appended during the measured run."""
    delivered_records: int
    """Records delivered during the run, by the shipper's checkpoint."""
    backlog_start_records: int
    """Not delivered when the run started (by the checkpoint): the warm-up's tail."""
    backlog_end_records: int
    """Not delivered at the end of the run, by the checkpoint."""
    backlog_end_bytes: int
    """Their bytes in the spool."""
    backlog_end_segments: int
    """Segment files holding them, and their size on disk."""
    backlog_end_segment_bytes: int
    spool_end_bytes: int
    """Every segment file with records at the end of the run (delivered ones not yet
    deleted included)."""
    drain: str
    """drained, stalled (nothing moved for a while), timeout or no shipper."""
    drain_seconds: float
    """From the end of the run until the outcome was seen."""
    drained_records: int
    """Delivered after the run, by the checkpoint."""
    residual_records: int
    """Still not delivered when the wait ended (0 when drained)."""
    sink_requests_run: int | None
    sink_bytes_run: int | None
    sink_requests_drain: int | None
    sink_bytes_drain: int | None

    @property
    def write_rate(self) -> float:
        """Records per second the gateway wrote during the run."""
        return self.written_records / self.run_seconds if self.run_seconds > 0 else 0.0

    @property
    def to_deliver(self) -> int:
        """What the run gave the shipper: the backlog at its start and what it wrote."""
        return self.backlog_start_records + self.written_records

    @property
    def basis(self) -> str:
        """Where "shipped" comes from: ``sink`` (exact) or ``checkpoint``."""
        if (
            self.drain == "drained"
            and self.sink_bytes_run is not None
            and self.sink_bytes_drain is not None
            and self.sink_bytes_run + self.sink_bytes_drain > 0
        ):
            return "sink"
        return "checkpoint"

    @property
    def shipped_ratio(self) -> float | None:
        """Share of :attr:`to_deliver` delivered by the end of the run: about 1 when the
        shipper keeps pace, near 0 when the statements leave it no CPU."""
        if self.to_deliver <= 0:
            return None
        if self.basis == "sink":
            run, drain = self.sink_bytes_run or 0, self.sink_bytes_drain or 0
            return run / (run + drain)
        return min(1.0, self.delivered_records / self.to_deliver)

    @property
    def behind_records(self) -> float:
        """Records not delivered at the end of the run."""
        shipped = self.shipped_ratio
        return 0.0 if shipped is None else (1.0 - shipped) * self.to_deliver

    @property
    def backlog_seconds(self) -> float:
        """:attr:`behind_records` in seconds of what the gateway wrote."""
        rate = self.write_rate
        return self.behind_records / rate if rate > 0 else 0.0

    @property
    def drain_rate(self) -> float | None:
        """Records per second delivered after the run (None for a drain too short to time)."""
        if self.drain != "drained" or self.drain_seconds < MIN_DRAIN_SECONDS:
            return None
        return self.behind_records / self.drain_seconds

    @property
    def keep_up_limit(self) -> float:
        return KEEP_UP_SECONDS if self.basis == "sink" else KEEP_UP_SECONDS_CHECKPOINT

    @property
    def kept_up(self) -> bool:
        return self.backlog_seconds <= self.keep_up_limit


@dataclass(frozen=True)
class PgbenchSummary:
    scenario: str
    clients: int
    target: str
    tps: float
    latency_avg_ms: float
    latency_p99_ms: float | None
    runs: int
    tps_min: float
    tps_max: float
    cpu_us_per_tx: float | None = None
    """Median over the rounds that have the figure."""
    steal_share: float | None = None
    """Median over the rounds that have the figure."""
    cpu_us_per_tx_by_group: dict[str, float] | None = None
    """Per group, the median over the rounds that have the breakdown (0 in a round that
    did not see the group)."""

    @property
    def tps_spread(self) -> float:
        """Half the range of TPS over rounds, relative to the median (0 for one round)."""
        return (self.tps_max - self.tps_min) / 2 / self.tps if self.tps else 0.0


@dataclass(frozen=True)
class BulkSummary:
    scenario: str
    target: str
    seconds: float
    mb_per_s: float
    rows: int
    runs: int


def summarize_pgbench(records: Iterable[PgbenchRecord]) -> list[PgbenchSummary]:
    groups: dict[tuple[str, str], list[PgbenchRecord]] = {}
    for record in records:
        groups.setdefault((record.scenario, record.target), []).append(record)
    summaries = []
    for (scenario, target), runs in groups.items():
        p99s = [r.latency_p99_ms for r in runs if r.latency_p99_ms is not None]
        cpus = [r.cpu_us_per_tx for r in runs if r.cpu_us_per_tx is not None]
        steals = [r.steal_share for r in runs if r.steal_share is not None]
        breakdowns = [r.cpu_us_per_tx_by_group for r in runs if r.cpu_us_per_tx_by_group]
        summaries.append(
            PgbenchSummary(
                scenario=scenario,
                clients=runs[0].clients,
                target=target,
                tps=statistics.median(r.tps for r in runs),
                latency_avg_ms=statistics.median(r.latency_avg_ms for r in runs),
                latency_p99_ms=statistics.median(p99s) if p99s else None,
                runs=len(runs),
                tps_min=min(r.tps for r in runs),
                tps_max=max(r.tps for r in runs),
                cpu_us_per_tx=statistics.median(cpus) if cpus else None,
                steal_share=statistics.median(steals) if steals else None,
                cpu_us_per_tx_by_group=_median_by_group(breakdowns),
            )
        )
    return summaries


def _median_by_group(breakdowns: Sequence[dict[str, float]]) -> dict[str, float] | None:
    if not breakdowns:
        return None
    groups = _ordered_groups(group for breakdown in breakdowns for group in breakdown)
    return {
        group: statistics.median(breakdown.get(group, 0.0) for breakdown in breakdowns)
        for group in groups
    }


def _ordered_groups(groups: Iterable[str]) -> list[str]:
    """Process groups in ``CPU_GROUPS`` order, any other after them."""
    order = {group: index for index, group in enumerate(CPU_GROUPS)}
    return sorted(set(groups), key=lambda group: (order.get(group, len(order)), group))


def _shown(us_per_tx: float | None) -> bool:
    """Worth a figure: at least 1 µs/tx once rounded (negative for a short ``other``)."""
    return us_per_tx is not None and abs(us_per_tx) >= 0.5


def format_cpu_groups(by_group: dict[str, float]) -> str:
    """``pgwarden 45, postgres 110, pgbench 25, other 12``: the groups worth a figure."""
    groups = [group for group in _ordered_groups(by_group) if _shown(by_group[group])]
    return ", ".join(f"{group} {by_group[group]:.0f}" for group in groups)


def summarize_bulk(records: Iterable[BulkRecord]) -> list[BulkSummary]:
    groups: dict[tuple[str, str], list[BulkRecord]] = {}
    for record in records:
        groups.setdefault((record.scenario, record.target), []).append(record)
    return [
        BulkSummary(
            scenario=scenario,
            target=target,
            seconds=statistics.median(r.seconds for r in runs),
            mb_per_s=statistics.median(r.mb_per_s for r in runs),
            rows=runs[0].rows,
            runs=len(runs),
        )
        for (scenario, target), runs in groups.items()
    ]


@dataclass(frozen=True)
class AuditSummary:
    """Median over rounds of the audit figures of one (scenario, target)."""

    scenario: str
    target: str
    runs: int
    write_rate: float
    shipped_ratio: float | None
    basis: str
    """sink, checkpoint, or mixed (rounds differ)."""
    backlog_seconds: float
    backlog_end_records: float
    backlog_end_bytes: float
    backlog_end_segments: float
    drain_seconds: float | None
    """Median over the runs that drained; None if none did."""
    drain_rate: float | None
    not_drained: int
    """Runs whose spool did not drain (stalled, timed out, or no shipper)."""
    kept_up_runs: int

    @property
    def kept_up(self) -> bool:
        return self.kept_up_runs * 2 > self.runs

    def verdict(self) -> str:
        text = "kept up" if self.kept_up else "fell behind"
        if self.runs > 1 and 0 < self.kept_up_runs < self.runs:
            text += f" ({self.kept_up_runs}/{self.runs} runs kept up)"
        if self.not_drained:
            text += f", {self.not_drained}/{self.runs} not drained"
        return text


def summarize_audit(records: Iterable[AuditRecord]) -> list[AuditSummary]:
    groups: dict[tuple[str, str], list[AuditRecord]] = {}
    for record in records:
        groups.setdefault((record.scenario, record.target), []).append(record)
    summaries = []
    for (scenario, target), runs in groups.items():
        drained = [r.drain_seconds for r in runs if r.drain == "drained"]
        ratios = [ratio for r in runs if (ratio := r.shipped_ratio) is not None]
        rates = [rate for r in runs if (rate := r.drain_rate) is not None]
        bases = {r.basis for r in runs}
        summaries.append(
            AuditSummary(
                scenario=scenario,
                target=target,
                runs=len(runs),
                write_rate=statistics.median(r.write_rate for r in runs),
                shipped_ratio=statistics.median(ratios) if ratios else None,
                basis=bases.pop() if len(bases) == 1 else "mixed",
                backlog_seconds=statistics.median(r.backlog_seconds for r in runs),
                backlog_end_records=statistics.median(r.backlog_end_records for r in runs),
                backlog_end_bytes=statistics.median(r.backlog_end_bytes for r in runs),
                backlog_end_segments=statistics.median(r.backlog_end_segments for r in runs),
                drain_seconds=statistics.median(drained) if drained else None,
                drain_rate=statistics.median(rates) if rates else None,
                not_drained=len(runs) - len(drained),
                kept_up_runs=sum(1 for r in runs if r.kept_up),
            )
        )
    return summaries


@dataclass(frozen=True)
class VariantRatio:
    """A pgwarden variant's TPS over the base pgwarden target's, round by round, and the
    same comparison by CPU time per transaction."""

    scenario: str
    target: str
    clients: int
    ratio: float
    """Median of the per-round ratios."""
    per_round: tuple[float, ...]
    cpu_ratio: float | None = None
    """Median over rounds of the base's CPU time per transaction over the variant's: on a
    machine whose CPU is saturated, the TPS ratio without the host's noise."""
    cpu_per_round: tuple[float, ...] = ()
    steal_matched: tuple[float, ...] = ()
    """The per-round ratios of the rounds whose two runs saw about the same host steal
    (within :data:`STEAL_MATCH` of each other): on a shared host, a round where the host
    took CPU from one run and not the other says more about the host than the variant."""

    @property
    def steal_matched_ratio(self) -> float | None:
        return statistics.median(self.steal_matched) if self.steal_matched else None

    @cached_property
    def interval(self) -> tuple[float, float] | None:
        """Where the median ratio lies, given how much the rounds scatter
        (:func:`median_interval`; computed once, as the goal check and the JSON both use
        it)."""
        return median_interval(self.per_round)


#: Largest difference in host steal (share of CPU time) between the two runs of a round for
#: the round to count as steal-matched.
STEAL_MATCH: Final = 0.02


def _steal_matched(reference: PgbenchRecord, record: PgbenchRecord) -> bool:
    if reference.steal_share is None or record.steal_share is None:
        return False
    return abs(reference.steal_share - record.steal_share) <= STEAL_MATCH


def variant_ratios(records: Iterable[PgbenchRecord], base: str = PGWARDEN) -> list[VariantRatio]:
    """Each variant against ``base`` within the same round and scenario: the two ran
    seconds apart, so the per-round ratio cancels most of the machine's drift."""
    by_key: dict[tuple[int, str, str], PgbenchRecord] = {
        (r.round, r.scenario, r.target): r for r in records
    }
    groups: dict[tuple[str, str], list[float]] = {}
    cpu_groups: dict[tuple[str, str], list[float]] = {}
    matched: dict[tuple[str, str], list[float]] = {}
    clients: dict[str, int] = {}
    for (round_no, scenario, target), record in by_key.items():
        if target in (DIRECT, PGBOUNCER, base):
            continue
        reference = by_key.get((round_no, scenario, base))
        if reference is None or reference.tps <= 0:
            continue
        ratio = record.tps / reference.tps
        groups.setdefault((scenario, target), []).append(ratio)
        if _steal_matched(reference, record):
            matched.setdefault((scenario, target), []).append(ratio)
        cpu_ratio = _cpu_ratio(reference.cpu_us_per_tx, record.cpu_us_per_tx)
        if cpu_ratio is not None:
            cpu_groups.setdefault((scenario, target), []).append(cpu_ratio)
        clients[scenario] = record.clients
    result = []
    for (scenario, target), ratios in groups.items():
        cpu_ratios = cpu_groups.get((scenario, target), [])
        result.append(
            VariantRatio(
                scenario=scenario,
                target=target,
                clients=clients[scenario],
                ratio=statistics.median(ratios),
                per_round=tuple(round(r, 4) for r in ratios),
                cpu_ratio=statistics.median(cpu_ratios) if cpu_ratios else None,
                cpu_per_round=tuple(round(r, 4) for r in cpu_ratios),
                steal_matched=tuple(round(r, 4) for r in matched.get((scenario, target), [])),
            )
        )
    return result


def _cpu_ratio(reference_us: float | None, target_us: float | None) -> float | None:
    """The reference's CPU time per transaction over the target's (higher: cheaper)."""
    if reference_us is None or target_us is None or reference_us <= 0 or target_us <= 0:
        return None
    return reference_us / target_us


def gateway_targets(targets: Sequence[str]) -> list[str]:
    """Targets that are pgwarden configurations (everything but the two references)."""
    return [t for t in targets if t not in (DIRECT, PGBOUNCER)]


@dataclass(frozen=True)
class GoalCheck:
    scenario: str
    target: str
    metric: str
    value: float | None
    """None when the reference figure is too noisy to divide by."""
    goal: str
    met: bool | None
    detail: str
    cpu_value: float | None = None
    """The same ratio by CPU time per transaction (reference's over the target's), where
    the goal is a throughput ratio on a CPU-bound machine; None otherwise or unmeasured."""


def goal_checks(summaries: Sequence[PgbenchSummary], targets: Sequence[str]) -> list[GoalCheck]:
    """The issue's two targets, for every pgwarden target and every scenario they apply to."""
    index = {(s.scenario, s.target): s for s in summaries}
    checks: list[GoalCheck] = []
    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    for scenario in scenarios:
        direct = index.get((scenario, DIRECT))
        bouncer = index.get((scenario, PGBOUNCER))
        if bouncer is None:
            continue
        for target in gateway_targets(targets):
            gateway = index.get((scenario, target))
            if gateway is None:
                continue
            if gateway.clients == 1 and direct is not None:
                added_gateway_us = (gateway.latency_avg_ms - direct.latency_avg_ms) * 1000
                added_bouncer_us = (bouncer.latency_avg_ms - direct.latency_avg_ms) * 1000
                # pgbouncer measured no slower than direct: noise swamped the figure.
                ratio = added_gateway_us / added_bouncer_us if added_bouncer_us > 0 else None
                checks.append(
                    GoalCheck(
                        scenario=scenario,
                        target=target,
                        metric="added latency vs pgbouncer's",
                        value=ratio,
                        goal=f"<= {ADDED_LATENCY_GOAL}x",
                        met=ratio <= ADDED_LATENCY_GOAL if ratio is not None else None,
                        detail=f"{target} {added_gateway_us:+.0f} us, "
                        f"pgbouncer {added_bouncer_us:+.0f} us over direct",
                    )
                )
            elif gateway.clients > 1:
                ratio = gateway.tps / bouncer.tps
                checks.append(
                    GoalCheck(
                        scenario=scenario,
                        target=target,
                        metric="TPS vs pgbouncer's",
                        value=ratio,
                        goal=f">= {TPS_GOAL}x",
                        met=ratio >= TPS_GOAL,
                        detail=f"{target} {gateway.tps:,.0f}, pgbouncer {bouncer.tps:,.0f} TPS",
                        cpu_value=_cpu_ratio(bouncer.cpu_us_per_tx, gateway.cpu_us_per_tx),
                    )
                )
    return checks


def audit_goal_checks(
    ratios: Sequence[VariantRatio],
    summaries: Sequence[PgbenchSummary],
    audit: Sequence[AuditSummary],
    audit_targets: Sequence[str],
) -> list[GoalCheck]:
    """With strict audit on, TPS stays at >= 0.9x pgwarden's without audit (c>1); the
    detail says whether the shipper kept up during those runs."""
    tps = {(s.scenario, s.target): s.tps for s in summaries}
    shipping = {(a.scenario, a.target): a for a in audit}
    checks = []
    for ratio in ratios:
        if ratio.target not in audit_targets or ratio.clients <= 1:
            continue
        detail = (
            f"{ratio.target} {tps.get((ratio.scenario, ratio.target), 0):,.0f}, "
            f"{PGWARDEN} {tps.get((ratio.scenario, PGWARDEN), 0):,.0f} TPS"
        )
        if len(ratio.per_round) > 1:
            # cpu_per_round has a ratio for each of these rounds that measured CPU.
            detail += " (rounds: " + ", ".join(f"{r:.2f}" for r in ratio.per_round) + ")"
            if len(ratio.cpu_per_round) > 1:
                cpu_rounds = ", ".join(f"{r:.2f}" for r in ratio.cpu_per_round)
                detail += f"; cpu-based by round: {cpu_rounds}"
            matched = ratio.steal_matched_ratio
            detail += (
                f"; rounds whose runs saw host steal within {STEAL_MATCH:.0%} of each other: "
                + (
                    f"median {matched:.2f} ({len(ratio.steal_matched)} of {len(ratio.per_round)})"
                    if matched is not None
                    else "none"
                )
            )
            detail += "; " + interval_verdict(ratio.interval, AUDIT_TPS_GOAL)
        shipper = shipping.get((ratio.scenario, ratio.target))
        if shipper is not None:
            detail += f"; shipper {shipper.verdict()}"
            if shipper.not_drained:
                detail += " (the spool did not drain: shipping cost not measured)"
            elif not shipper.kept_up and shipper.shipped_ratio is not None:
                detail += (
                    f" ({shipper.shipped_ratio:.0%} shipped by the end of the run: the rest "
                    "of the shipping, and its CPU, came after the measured time)"
                )
        checks.append(
            GoalCheck(
                scenario=ratio.scenario,
                target=ratio.target,
                metric=f"TPS vs {PGWARDEN}'s without audit",
                value=ratio.ratio,
                goal=f">= {AUDIT_TPS_GOAL}x",
                met=ratio.ratio >= AUDIT_TPS_GOAL,
                detail=detail,
                cpu_value=ratio.cpu_ratio,
            )
        )
    return checks


def format_pgbench_table(
    summaries: Sequence[PgbenchSummary],
    targets: Sequence[str],
    vs_base: Sequence[VariantRatio] = (),
) -> str:
    """One row per (scenario, target); with ``vs_base``, ``TPS/pgw`` and ``cpu/pgw``
    columns: the medians of the per-round ratios to the base pgwarden target."""
    index = {(s.scenario, s.target): s for s in summaries}
    base_ratio = {(r.scenario, r.target): r.ratio for r in vs_base}
    cpu_base_ratio = {(r.scenario, r.target): r.cpu_ratio for r in vs_base}
    has_cpu = any(s.cpu_us_per_tx is not None for s in summaries)
    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    width = max([len("target"), *(len(t) for t in targets)])
    header = (
        f"{'scenario':<24} {'target':<{width}} {'TPS':>9} {'spread':>7} {'avg ms':>8} "
        f"{'p99 ms':>8} {'TPS/direct':>10} {'TPS/pgb':>8} {'added us':>9}"
    )
    if has_cpu:
        header += f" {'cpu us/tx':>9}"
    if base_ratio:
        header += f" {'TPS/pgw':>8}"
        if has_cpu:
            header += f" {'cpu/pgw':>8}"
    lines = [header, "-" * len(header)]
    for scenario in scenarios:
        direct = index.get((scenario, DIRECT))
        bouncer = index.get((scenario, PGBOUNCER))
        first = True
        for target in targets:
            row = index.get((scenario, target))
            if row is None:
                continue
            vs_direct = _ratio(row.tps, direct.tps if direct else None, target == DIRECT)
            vs_bouncer = _ratio(
                row.tps, bouncer.tps if bouncer else None, target in (DIRECT, PGBOUNCER)
            )
            added = ""
            if direct is not None and target != DIRECT:
                added = f"{(row.latency_avg_ms - direct.latency_avg_ms) * 1000:+.0f}"
            p99 = f"{row.latency_p99_ms:.3f}" if row.latency_p99_ms is not None else "-"
            spread = f"±{row.tps_spread:.0%}" if row.runs > 1 else ""
            line = (
                f"{scenario if first else '':<24} {target:<{width}} {row.tps:>9,.0f} {spread:>7} "
                f"{row.latency_avg_ms:>8.3f} {p99:>8} {vs_direct:>10} {vs_bouncer:>8} {added:>9}"
            )
            if has_cpu:
                cpu = row.cpu_us_per_tx
                line += f" {'' if cpu is None else f'{cpu:.0f}':>9}"
            if base_ratio:
                ratio = base_ratio.get((scenario, target))
                line += f" {'' if ratio is None else f'{ratio:.2f}':>8}"
                if has_cpu:
                    cpu_ratio = cpu_base_ratio.get((scenario, target))
                    line += f" {'' if cpu_ratio is None else f'{cpu_ratio:.2f}':>8}"
            lines.append(line)
            first = False
    lines += _footnotes(summaries, has_cpu=has_cpu, variants=bool(base_ratio))
    return "\n".join(line.rstrip() for line in lines)


def _footnotes(summaries: Sequence[PgbenchSummary], *, has_cpu: bool, variants: bool) -> list[str]:
    lines: list[str] = []
    if has_cpu:
        lines.append(
            "cpu us/tx: busy CPU time of the whole machine (every core; pgbench, proxy, "
            "PostgreSQL) per\ntransaction, from /proc/stat around the pgbench run."
        )
    if variants:
        lines.append(
            f"TPS/pgw: median over rounds of the TPS ratio to {PGWARDEN} in the same round."
        )
        if has_cpu:
            lines.append(
                f"cpu/pgw: median over rounds of {PGWARDEN}'s cpu us/tx over the target's: "
                "the TPS ratio\nwithout the host's noise where the CPU is saturated (c>1)."
            )
    steal = _steal_by_scenario(summaries)
    if steal:
        text = "host steal during the runs (share of CPU time, median): " + ", ".join(
            f"{scenario} {share:.1%}" for scenario, share in steal.items()
        )
        lines += textwrap.wrap(text, width=96, break_on_hyphens=False)
    return [part for line in lines for part in line.splitlines()]


def _steal_by_scenario(summaries: Sequence[PgbenchSummary]) -> dict[str, float]:
    """Per scenario, the median over its targets of their median steal share."""
    shares: dict[str, list[float]] = {}
    for s in summaries:
        if s.steal_share is not None:
            shares.setdefault(s.scenario, []).append(s.steal_share)
    return {scenario: statistics.median(values) for scenario, values in shares.items()}


def format_cpu_by_group_table(summaries: Sequence[PgbenchSummary], targets: Sequence[str]) -> str:
    """Each (scenario, target)'s cpu us/tx split by process group, medians over rounds;
    empty when no run has the breakdown."""
    index = {(s.scenario, s.target): s for s in summaries if s.cpu_us_per_tx_by_group}
    if not index:
        return ""
    groups = _ordered_groups(
        group
        for s in index.values()
        for group, us in (s.cpu_us_per_tx_by_group or {}).items()
        if _shown(us)
    )
    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    width = max([len("target"), *(len(t) for t in targets)])
    header = f"{'cpu us/tx by process':<24} {'target':<{width}} {'total':>6}" + "".join(
        f" {group:>{max(6, len(group))}}" for group in groups
    )
    lines = [header, "-" * len(header)]
    for scenario in scenarios:
        first = True
        for target in targets:
            row = index.get((scenario, target))
            if row is None:
                continue
            by_group = row.cpu_us_per_tx_by_group or {}
            total = row.cpu_us_per_tx
            line = f"{scenario if first else '':<24} {target:<{width}} "
            line += f"{'' if total is None else f'{total:.0f}':>6}"
            for group in groups:
                us = by_group.get(group)
                text = f"{us:.0f}" if us is not None and _shown(us) else ""
                line += f" {text:>{max(6, len(group))}}"
            lines.append(line)
            first = False
    footnote = (
        "By process: the machine's cpu us/tx (total, as above) split by where it went, from "
        "each process's user + system time in /proc/<pid>/stat read just before pgbench "
        "starts and just after it exits, for the processes the harness started. pgwarden: "
        "every `pgwarden serve` gateway and its workers, idle ones included; shipper: "
        "`pgwarden audit ship`; sink: the harness's OTLP sink; pgbouncer; postgres: the "
        "server and its backends (backends that exit as pgbench disconnects are counted "
        "through the server's reaped-children time); pgbench: the harness's reaped-children "
        "time; other: "
        "the total minus all of these (kernel threads, the harness, anything else running). "
        "Time the host steals is left out, as in the total. The total samples busy CPUs at "
        "each timer tick while process times are the scheduler's exact run time: at c=1, "
        "where the CPUs run in short bursts between idle spells, the ticks see less of it "
        "and other can go below zero. "
        "Medians over rounds, column by column, so with several rounds the parts need not "
        "add up to the total exactly; blank: under 1 us/tx."
    )
    lines += textwrap.wrap(footnote, width=96, break_on_hyphens=False)
    return "\n".join(line.rstrip() for line in lines)


def format_audit_table(summaries: Sequence[AuditSummary]) -> str:
    """The audit spool around each measured run: what was written, what the shipper
    delivered meanwhile, what was left at the end and how long it took to drain."""
    if not summaries:
        return ""
    width = max([len("target"), *(len(s.target) for s in summaries)])
    header = (
        f"{'audit shipper':<24} {'target':<{width}} {'written/s':>10} {'shipped':>8} "
        f"{'behind':>7} {'spool at end':>19} {'drained in':>11} {'drain/s':>8}  verdict"
    )
    lines = [header, "-" * len(header)]
    previous = ""
    for row in summaries:
        shipped = "" if row.shipped_ratio is None else f"{row.shipped_ratio:.2f}"
        if row.basis != "sink":
            shipped += "*"
        spool = f"{row.backlog_end_segments:.0f} seg / {row.backlog_end_bytes / MIB:.1f} MiB"
        drained = "-" if row.drain_seconds is None else f"{row.drain_seconds:.1f} s"
        rate = "" if row.drain_rate is None else f"{row.drain_rate:,.0f}"
        lines.append(
            f"{row.scenario if row.scenario != previous else '':<24} {row.target:<{width}} "
            f"{row.write_rate:>10,.0f} {shipped:>8} {row.backlog_seconds:>5.1f} s {spool:>19} "
            f"{drained:>11} {rate:>8}  {row.verdict()}"
        )
        previous = row.scenario
    footnote = f"""\
written/s: spool records/s the gateway wrote during the measured run. shipped: share of what
the run gave the shipper (backlog at its start + records written) that reached the OTLP sink
by the end of the run (* from the shipper's checkpoint instead, which trails it by up to
{CHECKPOINT_INTERVAL_SECONDS:g} s). behind: what was left, in seconds of writing; kept up: \
behind <= {KEEP_UP_SECONDS:g} s (* {KEEP_UP_SECONDS_CHECKPOINT:g} s).
spool at end: segment files and MiB not delivered by the checkpoint at the end of the run.
drained in: from the end of the run until everything written was delivered; drain/s: records
per second delivered meanwhile (drains under {MIN_DRAIN_SECONDS:g} s are not timed)."""
    lines += footnote.splitlines()
    return "\n".join(line.rstrip() for line in lines)


def format_bulk_table(summaries: Sequence[BulkSummary], targets: Sequence[str]) -> str:
    index = {(s.scenario, s.target): s for s in summaries}
    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    width = max([len("target"), *(len(t) for t in targets)])
    header = (
        f"{'bulk read':<24} {'target':<{width}} {'seconds':>9} {'MB/s':>8} {'rows':>9} "
        f"{'MB/s ratio to direct':>21} {'to pgb':>7}"
    )
    lines = [header, "-" * len(header)]
    for scenario in scenarios:
        direct = index.get((scenario, DIRECT))
        bouncer = index.get((scenario, PGBOUNCER))
        first = True
        for target in targets:
            row = index.get((scenario, target))
            if row is None:
                continue
            vs_direct = _ratio(row.mb_per_s, direct.mb_per_s if direct else None, target == DIRECT)
            vs_bouncer = _ratio(
                row.mb_per_s, bouncer.mb_per_s if bouncer else None, target in (DIRECT, PGBOUNCER)
            )
            lines.append(
                f"{scenario if first else '':<24} {target:<{width}} {row.seconds:>9.3f} "
                f"{row.mb_per_s:>8.1f} {row.rows:>9,} {vs_direct:>21} {vs_bouncer:>7}"
            )
            first = False
    return "\n".join(line.rstrip() for line in lines)


def format_goals(checks: Sequence[GoalCheck]) -> str:
    if not checks:
        return (
            "Goals: not evaluated (needs direct, pgbouncer and a pgwarden target; the audit "
            "goal needs pgwarden and an audit variant at c>1)."
        )
    lines = ["Goals (informational; a benchmark never fails a build):"]
    for check in checks:
        if check.value is None:
            value, verdict = "n/a", "inconclusive (noise)"
        else:
            value, verdict = f"{check.value:.3f}x", "met" if check.met else "MISSED"
        if check.cpu_value is not None:
            verdict += f", cpu-based {check.cpu_value:.2f}x"
        lines.append(
            f"  {check.scenario:<22} {check.target}: {check.metric} {value} "
            f"(goal {check.goal}) {verdict} - {check.detail}"
        )
    return "\n".join(line.rstrip() for line in lines)


def _short_number(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"


def _ratio(value: float, reference: float | None, skip: bool) -> str:
    if skip or reference is None or reference == 0:
        return ""
    return f"{value / reference:.2f}"


def write_json(
    path: Path,
    *,
    meta: dict[str, Any],
    pgbench: Sequence[PgbenchRecord],
    bulk: Sequence[BulkRecord],
    pgbench_summary: Sequence[PgbenchSummary],
    bulk_summary: Sequence[BulkSummary],
    goals: Sequence[GoalCheck],
    vs_base: Sequence[VariantRatio] = (),
    audit: Sequence[AuditRecord] = (),
    audit_summary: Sequence[AuditSummary] = (),
) -> None:
    document = {
        "meta": meta,
        "summary": {
            "pgbench": [asdict(s) for s in pgbench_summary],
            "bulk": [asdict(s) for s in bulk_summary],
            f"variants_vs_{PGWARDEN}": [
                asdict(r) | {"steal_matched_ratio": r.steal_matched_ratio, "interval": r.interval}
                for r in vs_base
            ],
            "audit": [
                asdict(a) | {"kept_up": a.kept_up, "verdict": a.verdict()} for a in audit_summary
            ],
            "goals": [asdict(g) for g in goals],
        },
        "runs": {
            "pgbench": [asdict(r) for r in pgbench],
            "bulk": [asdict(r) for r in bulk],
            "audit": [
                asdict(r)
                | {
                    "write_rate": round(r.write_rate, 1),
                    "to_deliver": r.to_deliver,
                    "basis": r.basis,
                    "shipped_ratio": r.shipped_ratio,
                    "behind_records": round(r.behind_records),
                    "backlog_seconds": round(r.backlog_seconds, 3),
                    "drain_rate": r.drain_rate,
                    "kept_up": r.kept_up,
                }
                for r in audit
            ],
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def draw_chart(
    path: Path,
    *,
    title: str,
    targets: Sequence[str],
    pgbench_summary: Sequence[PgbenchSummary],
    bulk_summary: Sequence[BulkSummary],
) -> None:
    """Grouped bars: TPS and latency per pgbench scenario, MB/s per bulk read; one colour
    per target.  Headless (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pgbench_index = {(s.scenario, s.target): s for s in pgbench_summary}
    bulk_index = {(s.scenario, s.target): s for s in bulk_summary}
    scenarios = list(dict.fromkeys(s.scenario for s in pgbench_summary))
    bulk_scenarios = list(dict.fromkeys(s.scenario for s in bulk_summary))
    panels = (1 if scenarios else 0) * 2 + (1 if bulk_scenarios else 0)
    if panels == 0:
        return
    fig, axes = plt.subplots(panels, 1, figsize=(max(10.0, 1.5 * len(scenarios) + 3), 4.2 * panels))
    axes_list = list(axes) if panels > 1 else [axes]
    colours = plt.get_cmap("tab10")
    bar_width = 0.8 / max(1, len(targets))

    def offsets(count: int, slot: int) -> list[float]:
        return [i + (slot - (len(targets) - 1) / 2) * bar_width for i in range(count)]

    panel = 0
    if scenarios:
        tps_axis = axes_list[panel]
        latency_axis = axes_list[panel + 1]
        panel += 2
        for slot, target in enumerate(targets):
            rows = [pgbench_index.get((scenario, target)) for scenario in scenarios]
            xs = offsets(len(scenarios), slot)
            # Whiskers: lowest and highest TPS over the rounds (none for a single round).
            spread = [
                [r.tps - r.tps_min if r else 0.0 for r in rows],
                [r.tps_max - r.tps if r else 0.0 for r in rows],
            ]
            tps_axis.bar(
                xs,
                [r.tps if r else 0.0 for r in rows],
                bar_width,
                label=target,
                color=colours(slot),
                yerr=spread if any(r and r.runs > 1 for r in rows) else None,
                error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "0.3"},
            )
            # Values above the whisker, so the two never overlap.
            for x, r in zip(xs, rows, strict=True):
                if r is not None:
                    tps_axis.annotate(
                        _short_number(r.tps),
                        (x, max(r.tps, r.tps_max)),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        rotation=90,
                        fontsize="x-small",
                    )
            latency_axis.bar(
                xs,
                [r.latency_avg_ms if r else 0.0 for r in rows],
                bar_width,
                label=None,
                color=colours(slot),
            )
            p99_points = [
                (x, r.latency_p99_ms)
                for x, r in zip(xs, rows, strict=True)
                if r and r.latency_p99_ms is not None
            ]
            if p99_points:
                latency_axis.scatter(
                    [x for x, _ in p99_points],
                    [y for _, y in p99_points],
                    marker="_",
                    s=160,
                    linewidths=2.5,
                    color="black",
                    zorder=3,
                    label="p99" if slot == 0 else None,
                )
        tps_axis.set_title(
            "pgbench -S: transactions per second, median of rounds; whiskers: min-max "
            "(higher is better)"
        )
        tps_axis.set_ylabel("TPS")
        latency_axis.set_title(
            "pgbench -S latency, log scale: average as bars, p99 as black ticks (lower is better)"
        )
        latency_axis.set_ylabel("ms")
        for axis in (tps_axis, latency_axis):
            axis.set_xticks(range(len(scenarios)))
            axis.set_xticklabels(scenarios, rotation=20, ha="right")
            axis.grid(axis="y", alpha=0.3)
            axis.set_axisbelow(True)
        tps_axis.margins(y=0.15)
        # Latencies span 0.05 ms (c=1 averages) to tens of ms (c=16 p99): log scale.
        latency_axis.set_yscale("log")
        latency_axis.yaxis.set_major_locator(
            matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0))
        )
        latency_axis.yaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda value, _pos: f"{value:g}")
        )
        latency_axis.legend(loc="upper left", fontsize="small")
    if bulk_scenarios:
        bulk_axis = axes_list[panel]
        for slot, target in enumerate(targets):
            bulk_rows = [bulk_index.get((scenario, target)) for scenario in bulk_scenarios]
            bulk_bars = bulk_axis.bar(
                offsets(len(bulk_scenarios), slot),
                [r.mb_per_s if r else 0.0 for r in bulk_rows],
                bar_width,
                label=target,
                color=colours(slot),
            )
            bulk_axis.bar_label(
                bulk_bars,
                labels=[f"{r.mb_per_s:.0f}" if r else "" for r in bulk_rows],
                padding=2,
                fontsize="x-small",
            )
        rows_read = bulk_summary[0].rows
        bulk_axis.set_title(f"Bulk read of {rows_read:,} rows: MB/s of payload (higher is better)")
        bulk_axis.set_ylabel("MB/s")
        bulk_axis.set_xticks(range(len(bulk_scenarios)))
        bulk_axis.set_xticklabels(bulk_scenarios)
        bulk_axis.grid(axis="y", alpha=0.3)
        bulk_axis.set_axisbelow(True)
        bulk_axis.margins(y=0.12)
    # One legend for all panels (same colour per target), under the title.
    handles = [
        matplotlib.patches.Patch(color=colours(slot), label=target)
        for slot, target in enumerate(targets)
    ]
    fig.suptitle(title, fontsize="medium", y=0.995)
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.975),
        ncols=len(targets),
        fontsize="small",
        frameon=False,
    )
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.955))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Summaries of a benchmark run: the printed table, the JSON document and the chart.

Every run of a (scenario, target) pair is kept in the JSON; tables and the chart show
the median over rounds.  Ratios are only meaningful within one run: the machine, its
load and the server cache are the same for every target because targets alternate.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DIRECT = "direct"
PGBOUNCER = "pgbouncer"

#: Targets from the issue: at c=1, pgwarden's latency added over a direct connection is at
#: most 1.5x pgbouncer's; at c=16, pgwarden's TPS is at least 0.9x pgbouncer's.
ADDED_LATENCY_GOAL = 1.5
TPS_GOAL = 0.9


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
            )
        )
    return summaries


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
                    )
                )
    return checks


def format_pgbench_table(summaries: Sequence[PgbenchSummary], targets: Sequence[str]) -> str:
    index = {(s.scenario, s.target): s for s in summaries}
    scenarios = list(dict.fromkeys(s.scenario for s in summaries))
    width = max([len("target"), *(len(t) for t in targets)])
    header = (
        f"{'scenario':<24} {'target':<{width}} {'TPS':>9} {'spread':>7} {'avg ms':>8} "
        f"{'p99 ms':>8} {'TPS/direct':>10} {'TPS/pgb':>8} {'added us':>9}"
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
            vs_direct = _ratio(row.tps, direct.tps if direct else None, target == DIRECT)
            vs_bouncer = _ratio(
                row.tps, bouncer.tps if bouncer else None, target in (DIRECT, PGBOUNCER)
            )
            added = ""
            if direct is not None and target != DIRECT:
                added = f"{(row.latency_avg_ms - direct.latency_avg_ms) * 1000:+.0f}"
            p99 = f"{row.latency_p99_ms:.3f}" if row.latency_p99_ms is not None else "-"
            spread = f"±{row.tps_spread:.0%}" if row.runs > 1 else ""
            lines.append(
                f"{scenario if first else '':<24} {target:<{width}} {row.tps:>9,.0f} {spread:>7} "
                f"{row.latency_avg_ms:>8.3f} {p99:>8} {vs_direct:>10} {vs_bouncer:>8} {added:>9}"
            )
            first = False
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
        return "Goals: not evaluated (needs direct, pgbouncer and a pgwarden target)."
    lines = ["Goals (informational; a benchmark never fails a build):"]
    for check in checks:
        if check.value is None:
            value, verdict = "n/a", "inconclusive (noise)"
        else:
            value, verdict = f"{check.value:.3f}x", "met" if check.met else "MISSED"
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
) -> None:
    document = {
        "meta": meta,
        "summary": {
            "pgbench": [asdict(s) for s in pgbench_summary],
            "bulk": [asdict(s) for s in bulk_summary],
            "goals": [asdict(g) for g in goals],
        },
        "runs": {
            "pgbench": [asdict(r) for r in pgbench],
            "bulk": [asdict(r) for r in bulk],
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

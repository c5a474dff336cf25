"""The benchmark report's audit ratio: per round, against the plain gateway of that round,
and over the rounds whose two runs saw about the same host steal."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

import bench_report

SCENARIO = "S c=16 prepared"


def record(
    round_no: int, target: str, tps: float, steal: float | None
) -> bench_report.PgbenchRecord:
    return bench_report.PgbenchRecord(
        round=round_no,
        scenario=SCENARIO,
        clients=16,
        target=target,
        tps=tps,
        latency_avg_ms=1.0,
        latency_p50_ms=None,
        latency_p99_ms=None,
        transactions=int(tps * 20),
        failed=0,
        cpu_us_per_tx=100.0,
        steal_share=steal,
    )


def test_steal_matched_rounds_are_those_the_host_treated_alike() -> None:
    plain, audit = bench_report.PGWARDEN, f"{bench_report.PGWARDEN}-audit"
    records = [
        # Round 1: both quiet. Round 2: the host took 9 % from the audit run only.
        # Round 3: both stolen from alike. Round 4: steal unknown (no /proc/stat).
        record(1, plain, 10_000, 0.003),
        record(1, audit, 9_200, 0.005),
        record(2, plain, 10_000, 0.003),
        record(2, audit, 6_000, 0.093),
        record(3, plain, 8_000, 0.080),
        record(3, audit, 7_600, 0.082),
        record(4, plain, 10_000, None),
        record(4, audit, 9_000, None),
    ]
    (ratio,) = bench_report.variant_ratios(records, plain)
    assert ratio.target == audit
    assert ratio.per_round == (0.92, 0.6, 0.95, 0.9)
    assert ratio.ratio == 0.91  # every round counts in the headline median
    assert ratio.steal_matched == (0.92, 0.95)
    assert ratio.steal_matched_ratio == 0.935


def test_no_steal_matched_round() -> None:
    plain, audit = bench_report.PGWARDEN, f"{bench_report.PGWARDEN}-audit"
    records = [record(1, plain, 10_000, 0.0), record(1, audit, 8_000, 0.05)]
    (ratio,) = bench_report.variant_ratios(records, plain)
    assert ratio.steal_matched == ()
    assert ratio.steal_matched_ratio is None


def test_median_interval_brackets_the_median_and_narrows_with_agreeing_rounds() -> None:
    scattered = [0.6, 0.8, 0.85, 0.9, 0.95, 1.0, 1.2]
    low, high = bench_report.median_interval(scattered) or (0.0, 0.0)
    assert low <= 0.9 <= high
    assert low < 0.9 < high  # rounds this scattered leave the median uncertain
    assert bench_report.median_interval(scattered) == (low, high)  # seeded: repeatable
    close = [0.93, 0.94, 0.94, 0.95, 0.95, 0.96, 0.97]
    c_low, c_high = bench_report.median_interval(close) or (0.0, 0.0)
    assert 0.93 <= c_low <= 0.95 <= c_high <= 0.97
    assert c_high - c_low < high - low
    assert bench_report.median_interval([0.9, 0.95, 1.0]) is None  # too few rounds


def test_interval_verdict_says_whether_the_rounds_decide_the_goal() -> None:
    assert bench_report.interval_verdict((0.91, 0.97), 0.9).endswith("at or above the goal")
    assert bench_report.interval_verdict((0.80, 0.89), 0.9).endswith("below the goal")
    spans = bench_report.interval_verdict((0.86, 0.96), 0.9)
    assert "0.86-0.96" in spans and "do not decide" in spans
    assert "too few rounds" in bench_report.interval_verdict(None, 0.9)


def test_audit_goal_detail_carries_the_interval() -> None:
    plain, audit = bench_report.PGWARDEN, f"{bench_report.PGWARDEN}-audit"
    records = []
    for round_no, ratio in enumerate([0.95, 0.93, 0.96, 0.94, 0.95], start=1):
        records += [
            record(round_no, plain, 10_000, 0.01),
            record(round_no, audit, 10_000 * ratio, 0.01),
        ]
    ratios = bench_report.variant_ratios(records, plain)
    summaries = bench_report.summarize_pgbench(records)
    (check,) = bench_report.audit_goal_checks(ratios, summaries, [], [audit])
    assert check.met
    assert "interval of the median 0.93-0.96: at or above the goal" in check.detail


def test_pooled_runs_keep_each_round_paired(tmp_path: Path) -> None:
    import pool_runs

    plain, audit = bench_report.PGWARDEN, f"{bench_report.PGWARDEN}-audit"
    paths = []
    for run, ratios in enumerate([[0.92, 0.88], [0.95, 0.91, 0.90]]):
        rows = []
        for round_no, ratio in enumerate(ratios, start=1):
            for target, tps in ((plain, 10_000.0), (audit, 10_000 * ratio)):
                rows.append(asdict(record(round_no, target, tps, 0.01)))
        path = tmp_path / f"run{run}.json"
        path.write_text(json.dumps({"runs": {"pgbench": rows}}))
        paths.append(path)
    records = pool_runs.load_runs(paths)
    (ratio,) = bench_report.variant_ratios(records, plain)
    assert sorted(ratio.per_round) == [0.88, 0.9, 0.91, 0.92, 0.95]
    assert ratio.ratio == 0.91
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="not a gateway_bench result document"):
        pool_runs.load_records(bad, 0)

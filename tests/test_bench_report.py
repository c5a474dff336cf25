"""The benchmark report's audit ratio: per round, against the plain gateway of that round,
and over the rounds whose two runs saw about the same host steal."""

from __future__ import annotations

import sys
from pathlib import Path

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

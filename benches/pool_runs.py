"""Pools the rounds of several harness runs: each pgwarden variant's TPS ratio to plain
pgwarden, round by round, with the median's interval over every round of every run.

    python benches/pool_runs.py RESULT.json [RESULT.json ...]

One run of a few rounds on a shared host rarely decides a 0.9x question (single rounds
swing by +-15 %); the rounds of several runs of the same code, taken together, can. Each
round keeps its own pairing: a ratio is always between two runs of the same round of the
same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import bench_report


def load_records(path: Path, offset: int) -> list[bench_report.PgbenchRecord]:
    """The pgbench runs of one result document, rounds numbered from ``offset + 1``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = document["runs"]["pgbench"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: not a gateway_bench result document ({exc})") from exc
    fields = bench_report.PgbenchRecord.__dataclass_fields__
    records = []
    for row in rows:
        values = {k: v for k, v in row.items() if k in fields}
        values["round"] = offset + int(row["round"])
        records.append(bench_report.PgbenchRecord(**values))
    return records


def load_runs(paths: Sequence[Path]) -> list[bench_report.PgbenchRecord]:
    """The pgbench runs of every document, each file's rounds numbered after the last
    file's, so that rounds of different runs are never paired."""
    records: list[bench_report.PgbenchRecord] = []
    offset = 0
    for path in paths:
        run = load_records(path, offset)
        records += run
        offset = max((r.round for r in run), default=offset)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="gateway_bench.py result JSON")
    args = parser.parse_args(argv)
    records = load_runs(args.results)
    ratios = bench_report.variant_ratios(records)
    if not ratios:
        print("no pgwarden variant measured next to plain pgwarden in these runs")
        return 1
    rounds = len({r.round for r in records})
    print(f"{len(args.results)} runs, {rounds} rounds")
    for ratio in sorted(ratios, key=lambda r: (r.target, r.scenario)):
        matched = ratio.steal_matched_ratio
        print(
            f"{ratio.scenario:<22} {ratio.target}: median {ratio.ratio:.3f} over "
            f"{len(ratio.per_round)} rounds; "
            + bench_report.interval_verdict(ratio.interval, bench_report.AUDIT_TPS_GOAL)
            + (
                f"; steal-matched median {matched:.3f} ({len(ratio.steal_matched)} rounds)"
                if matched is not None
                else ""
            )
            + (f"; cpu-based median {ratio.cpu_ratio:.3f}" if ratio.cpu_ratio else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/bench_workflow.py: its per-rule table and goal checks, on hand-made Snakemake benchmark
files (the format Snakemake writes: tab-separated, ``s`` seconds, ``max_rss`` MB)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_workflow", REPO / "benchmarks" / "bench_workflow.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _write(work: Path, rel: str, s: float, rss: float | str) -> None:
    f = work / "logs" / "benchmarks" / rel
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(HEADER + f"{s}\t0:00:01\t{rss}\t1686.61\t112.08\t119.17\t0.00\t0.04\t18.37\t1.65\n")


def test_rule_table_ratios_order_and_goals(tmp_path):
    _write(tmp_path, "national/fit_ri.tsv", 4.0, 900.0)
    _write(tmp_path, "national/ingest.tsv", 2.0, 1200.5)
    _write(tmp_path, "national/patient_outcomes.tsv", 1.5, 800.0)
    _write(tmp_path, "national/fit_arm.tsv", 12.5, 2600.0)
    _write(tmp_path, "meta/meta_report.tsv", 1.0, "-")  # Snakemake writes '-' where it measured nothing
    table = bench.rule_table(tmp_path, read_csv_s=0.25)
    assert list(table["rule"]) == ["ingest", "patient_outcomes", "fit_arm", "fit_ri", "meta_report"]
    assert table.set_index("rule")["x_read_csv"].to_dict() == pytest.approx(
        {"ingest": 8.0, "patient_outcomes": 6.0, "fit_arm": 50.0, "fit_ri": 16.0, "meta_report": 4.0})
    assert table.set_index("rule").loc["ingest", "max_rss_mb"] == 1200.5
    assert table.set_index("rule").loc["ingest", "cpu_s"] == 1.65
    # ingest + outcomes 14x read_csv: within 20x; fit_arm misses both the 10 s and the 2.5 GB goal
    assert bench.goals(table) == ["fit_arm: 12.5 s (goal 10 s)", "fit_arm: peak RSS 2600 MB (goal 2500 MB)"]
    slow_io = bench.rule_table(tmp_path, read_csv_s=0.1)
    assert bench.goals(slow_io)[0] == "ingest + patient_outcomes = 35.0x read_csv (goal 20x)"

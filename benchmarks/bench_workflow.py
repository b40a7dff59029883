"""Benchmark: the whole workflow on a national-scale session export, rule by rule.

Generates a session export with the package's simulator (``simulate_practice``; default 50 services x
200 therapists, mean caseload 20: ~200,000 patients, ~1.3M session rows; ``--quick``: 4 services x 10
therapists, a few thousand rows, same code paths), times ``pandas.read_csv`` of that file in this
process (best of 3: the baseline), runs the workflow on it (models ``ri``, ``arm``, ``nested``,
``slope`` (random_slope on feedback), the binomial ``recovery`` and the Bayesian ``ri_bayes`` (default
sampler: the grid); profile intervals; reports) with
``snakemake --cores N``, and prints for every rule its wall time from its Snakemake ``benchmark:``
file, that time as a ratio to ``read_csv``, and its peak resident memory (``max_rss``) and CPU seconds
(``cpu_time``: on a busy machine wall time overstates what a rule needs, CPU time does not). Snakemake
samples a job's RSS and CPU time every 0.5 s for its first ~15 s and every 30 s after that, so for
longer rules both are lower bounds. Goals (issue 13), checked on the full size only:

- ingest + patient_outcomes within 20x read_csv;
- every model fit, intervals included, within 10 s;
- every rule under 2.5 GB peak RSS.

    python benchmarks/bench_workflow.py              # national scale (~1.3M rows; a few minutes)
    python benchmarks/bench_workflow.py --quick      # seconds of data, same rules
    python benchmarks/bench_workflow.py --keep DIR   # keep the work directory (data, results, logs);
                                                     # a later run with the same DIR reuses the export

Exit status 0 unless the workflow fails (goals missed are reported, not fatal: ``--strict`` makes
them so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]

FULL = dict(n_services=50, therapists_per_service=200, mean_caseload=20.0)
QUICK = dict(n_services=4, therapists_per_service=10, mean_caseload=20.0)
MODELS = [
    {"id": "ri", "type": "random_intercept"},
    {"id": "arm", "type": "arm_variance"},
    {"id": "nested", "type": "nested"},
    {"id": "slope", "type": "random_slope"},
    {"id": "recovery", "type": "random_intercept", "family": "binomial", "outcome": "recovered"},
    {"id": "ri_bayes", "type": "random_intercept", "engine": "bayes"},
]
FIT_GOAL_S = 10.0
RSS_GOAL_MB = 2500.0
INGEST_GOAL_RATIO = 20.0


def generate(path: Path, size: dict, seed: int) -> tuple[int, float]:
    """Write the simulated export; returns (rows, seconds taken). An export that ``--keep`` left in the
    work directory from the same size and seed (its ``.json`` stamp says so) is reused: 0 seconds."""
    from therapist_effects.simulate import simulate_practice

    stamp = path.with_suffix(".json")
    key = json.dumps({"size": size, "seed": seed}, sort_keys=True)
    if path.exists() and stamp.exists() and stamp.read_text() == key:
        with path.open() as fh:
            return sum(1 for _ in fh) - 1, 0.0
    t0 = time.perf_counter()
    sessions, _ = simulate_practice(seed=seed, **size)
    sessions.to_csv(path, index=False)
    stamp.write_text(key)
    return len(sessions), time.perf_counter() - t0


def time_read_csv(path: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pd.read_csv(path)
        best = min(best, time.perf_counter() - t0)
    return best


def write_config(work: Path, data: Path, seed: int) -> Path:
    cfg = {
        "seed": seed,
        "datasets": {"national": {
            "path": str(data), "layout": "session",
            "columns": {"patient": "patient_id", "therapist": "therapist_id", "score": "phq9",
                        "occasion": "session_date", "arm": "feedback", "cluster": "service", "ending": "ending",
                        "covariates": ["age", "sex"]},
            "instrument": "PHQ-9", "multi_therapist": "majority", "min_sessions": 2, "export_date": "2025-12-31",
        }},
        "models": MODELS,
        "intervals": {"method": "profile", "level": 0.95},
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_workflow(work: Path, cfg: Path, cores: int) -> float:
    env = {**os.environ, "TE_PSEUDONYM_KEY": os.environ.get("TE_PSEUDONYM_KEY", "bench-key-not-secret-0001")}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", str(cores),
           "--directory", str(work), "--configfile", str(cfg), "--quiet", "rules"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"workflow failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return wall


def rule_table(work: Path, read_csv_s: float) -> pd.DataFrame:
    """One row per benchmark file under logs/benchmarks/: rule (file stem), seconds, ratio, max_rss (MB)."""
    rows = []
    for f in sorted((work / "logs" / "benchmarks").rglob("*.tsv")):
        b = pd.read_csv(f, sep="\t")
        num = pd.to_numeric(b.iloc[0], errors="coerce")  # Snakemake writes '-' where it measured nothing
        rows.append({"dataset": f.parent.name, "rule": f.stem, "s": float(b["s"].iloc[0]),
                     "cpu_s": float(num.get("cpu_time", float("nan"))), "max_rss_mb": float(num["max_rss"])})
    order = ["ingest", "patient_outcomes", "fit_", "per_cluster", "estimates", "research_report", "service_report"]
    table = pd.DataFrame(rows)
    table["_order"] = [next((i for i, o in enumerate(order) if r.startswith(o)), len(order)) for r in table["rule"]]
    table = table.sort_values(["_order", "rule"], kind="stable").drop(columns="_order").reset_index(drop=True)
    table["x_read_csv"] = table["s"] / read_csv_s
    return table


def goals(table: pd.DataFrame) -> list[str]:
    missed = []
    io = table[table["rule"].isin(["ingest", "patient_outcomes"])]["x_read_csv"].sum()
    if io > INGEST_GOAL_RATIO:
        missed.append(f"ingest + patient_outcomes = {io:.1f}x read_csv (goal {INGEST_GOAL_RATIO:.0f}x)")
    for r in table.itertuples():
        if r.rule.startswith("fit_") and r.s > FIT_GOAL_S:
            missed.append(f"{r.rule}: {r.s:.1f} s (goal {FIT_GOAL_S:.0f} s)")
        if r.max_rss_mb > RSS_GOAL_MB:
            missed.append(f"{r.rule}: peak RSS {r.max_rss_mb:.0f} MB (goal {RSS_GOAL_MB:.0f} MB)")
    return missed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small export (seconds), same rules")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--seed", type=int, default=20261129)
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed (full size)")
    args = ap.parse_args(argv)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="te-bench-wf-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = QUICK if args.quick else FULL
        data = work / "sessions.csv"
        n_rows, gen_s = generate(data, size, args.seed)
        read_s = time_read_csv(data)
        if (work / "bench.yaml").exists():  # a kept work directory of an earlier run: rerun every rule
            for sub in ("results", "logs"):
                shutil.rmtree(work / sub, ignore_errors=True)
        cfg = write_config(work, data, args.seed)
        wall = run_workflow(work, cfg, args.cores)
        table = rule_table(work, read_s)
        n_therapists = size["n_services"] * size["therapists_per_service"]
        print(f"export: {n_rows:,} session rows, {n_therapists:,} therapists, {size['n_services']} services "
              f"({data.stat().st_size / 1e6:.0f} MB; "
              + (f"simulated in {gen_s:.0f} s)" if gen_s else "reused from the kept work directory)"))
        print(f"pandas.read_csv of the same file: {read_s:.3f} s (best of 3)")
        print(f"workflow wall time (snakemake --cores {args.cores}): {wall:.1f} s")
        print()
        print(f"{'rule':<24}{'seconds':>9}{'x read_csv':>12}{'peak RSS MB':>13}{'CPU s':>9}")
        for r in table.itertuples():
            print(f"{r.rule:<24}{r.s:>9.2f}{r.x_read_csv:>12.1f}{r.max_rss_mb:>13.0f}{r.cpu_s:>9.1f}")
        io = table[table["rule"].isin(["ingest", "patient_outcomes"])]
        print(f"{'ingest + outcomes':<24}{io['s'].sum():>9.2f}{io['x_read_csv'].sum():>12.1f}")
        print("(peak RSS and CPU s are Snakemake's samples: every 0.5 s for ~15 s, then every 30 s)")
        if args.quick:
            print("\n(--quick: goals apply to the full size only)")
            return 0
        missed = goals(table)
        print()
        print("goals: all met" if not missed else "goals missed:\n  " + "\n  ".join(missed))
        return 1 if (missed and args.strict) else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

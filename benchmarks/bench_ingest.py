"""Benchmark: ingestion and patient outcomes against ``pandas.read_csv`` of the same file (issue 13).

A session-layout export is simulated with :func:`therapist_effects.simulate.simulate_practice` and
written as CSV (outside the timings). It times ``pandas.read_csv(path)`` with its defaults (the baseline;
best of three) and the workflow's two steps, :func:`therapist_effects.pipeline.ingest_step` (read the
configured columns, vectorised pandera validation, cross-row checks, write validated rows and rejects) and
:func:`~therapist_effects.pipeline.outcomes_step` (one row per patient; Parquet and CSV), each

- *in process*: after a warm-up on a tiny file (imports, pandera's backends), best of ``--repeat``;
- *fresh process*: a new ``python`` that imports what Snakemake's script preamble imports, then the package,
  and runs the step, as the rules ``ingest`` and ``patient_outcomes`` do (start-up and imports included).

Each is printed in wall seconds and CPU seconds (user + system: on a shared machine wall time overstates
what a step needs), with its ratio to read_csv's wall and CPU seconds measured in the same run, and the
process's peak RSS. Goal (issue 13): the two fresh-process steps together within 20x read_csv.

``--rows N`` is the streamed case (several years of national data): the national export is tiled
(patient IDs made unique per copy) to N session rows and read by
:func:`therapist_effects.io.stream.ingest_patients_streamed` (CSV in record batches, partitions of
patients); it prints the time, its ratio to a read_csv of the first copy times the number of copies,
and the peak RSS. Goal: under 8 GB.

    python benchmarks/bench_ingest.py --quick          # ~30,000 rows, a few seconds
    python benchmarks/bench_ingest.py                  # national scale: 1.33M rows, 200k patients,
                                                       #   10,000 therapists, 50 services
    nice -n 10 python benchmarks/bench_ingest.py --rows 20000000   # streamed, bounded memory
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SPEC = {
    "layout": "session", "instrument": "PHQ-9", "export_date": "2030-01-01",
    "columns": {"patient": "patient_id", "therapist": "therapist_id", "score": "phq9", "occasion": "session_date",
                "arm": "feedback", "cluster": "service", "ending": "ending", "covariates": ["age", "sex"]},
}
QUICK = dict(n_services=5, therapists_per_service=40, mean_caseload=20.0)   # ~4,000 patients
NATIONAL = dict(n_services=50, therapists_per_service=200, mean_caseload=20.0)  # ~200k patients, 1.33M rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_export(path: Path, settings: dict, seed: int) -> None:
    """Simulate and write the export in a child process (its memory does not count here)."""
    code = (
        "import sys; from therapist_effects.simulate import PracticeSimulation, simulate_practice\n"
        f"s, _ = simulate_practice(PracticeSimulation(seed={seed}, **{settings!r}))\n"
        f"s.to_csv({str(path)!r}, index=False)\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def best(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall and best CPU seconds of ``repeat`` calls of ``fn`` in this process, and its last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def step_config(path: Path) -> dict:
    from therapist_effects.config import load_config

    return load_config({"datasets": {"bench": {**SPEC, "path": str(path)}},
                        "models": [{"id": "ri", "type": "random_intercept"}]})


def step_kwargs(step: str, cfg: dict, out: Path) -> dict:
    """The arguments the rule ``ingest`` or ``patient_outcomes`` gives its step, with outputs under ``out``."""
    ds = cfg["datasets"]["bench"]
    ingested = dict(rows=str(out / "validated.parquet"), rejects=str(out / "ingest_rejects.csv"),
                    summary=str(out / "ingest.json"))
    if step == "ingest_step":
        return dict(data_path=ds["path"], dataset=ds, cfg=cfg, out_rows=ingested["rows"],
                    out_rejects=ingested["rejects"], out_summary=ingested["summary"])
    return dict(rows_path=ingested["rows"], ingest_rejects=ingested["rejects"], ingest_summary=ingested["summary"],
                dataset=ds, cfg=cfg, out_parquet=str(out / "patients.parquet"), out_csv=str(out / "patients.csv"),
                out_rejects=str(out / "rejects.csv"), out_accounting=str(out / "accounting.json"))


def run_step(step: str, cfg: dict, out: Path) -> None:
    import contextlib
    import io

    from therapist_effects import pipeline

    with contextlib.redirect_stderr(io.StringIO()):  # the step logs to stderr and to its log file
        pipeline.run(getattr(pipeline, step), str(out / f"{step}.log"), **step_kwargs(step, cfg, out))


#: What a fresh step process runs: Snakemake's script preamble imports (where Snakemake is installed),
#: then the workflow script's own import and call (workflow/scripts/ingest.py, patient_outcomes.py).
FRESH = """\
import json, sys
try:
    from snakemake.logging import logger
    from snakemake.iocontainers import Snakemake
except ImportError:
    pass
from therapist_effects import pipeline
step, kwargs_file, log = sys.argv[1:4]
with open(kwargs_file) as fh:
    kwargs = json.load(fh)
pipeline.run(getattr(pipeline, step), log, **kwargs)
"""


def fresh(step: str, cfg: dict, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (user + system) of the step run as a new ``python`` process."""
    import json
    import subprocess

    kwargs_file = out / f"{step}.json"
    kwargs_file.write_text(json.dumps(step_kwargs(step, cfg, out), default=str))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", FRESH, step, str(kwargs_file), str(out / f"{step}.log")], check=True,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - w0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def warm_up(tmp: Path) -> None:
    p = tmp / "warm.csv"
    make_export(p, dict(n_services=1, therapists_per_service=3, mean_caseload=4.0), 1)
    cfg = step_config(p)
    for step in ("ingest_step", "outcomes_step"):
        run_step(step, cfg, tmp)
    pd.read_csv(p)


def in_memory(path: Path, repeat: int, tmp: Path) -> None:
    t_csv, c_csv, df = best(lambda: pd.read_csv(path), 3)
    n_rows = len(df)
    del df
    cfg = step_config(path)
    out = tmp / "steps"
    out.mkdir(exist_ok=True)
    rows = []
    for step, label in (("ingest_step", "ingest"), ("outcomes_step", "patient outcomes")):
        wall, cpu, _ = best(lambda: run_step(step, cfg, out), repeat)
        rows.append((f"{label}, in process", wall, cpu))
        f_wall, f_cpu = min(fresh(step, cfg, out) for _ in range(repeat))
        rows.append((f"{label}, fresh python", f_wall, f_cpu))
    patients = pd.read_parquet(out / "patients.parquet")
    acc = pd.read_json(out / "accounting.json", typ="series")
    size = path.stat().st_size / 2**20
    print(f"file: {n_rows:,} session rows, {len(patients):,} patients, "
          f"{patients['therapist'].nunique():,} therapists, {patients['cluster'].nunique()} services, {size:.0f} MiB")
    print(f"rows read {acc['rows_read']:,}: used {acc['rows_used']:,}, rejected {acc['rows_rejected']:,}")
    print(f"{'step':<32}{'wall s':>8}{'x read_csv':>12}{'CPU s':>8}{'x read_csv CPU':>16}")
    print(f"{'pandas.read_csv':<32}{t_csv:>8.3f}{1.0:>12.1f}{c_csv:>8.3f}{1.0:>16.1f}")
    for label, wall, cpu in rows:
        print(f"{label:<32}{wall:>8.3f}{wall / t_csv:>12.1f}{cpu:>8.3f}{cpu / c_csv:>16.1f}")
    for kind in ("in process", "fresh python"):
        wall = sum(r[1] for r in rows if r[0].endswith(kind))
        cpu = sum(r[2] for r in rows if r[0].endswith(kind))
        print(f"{'ingest + outcomes, ' + kind:<32}{wall:>8.3f}{wall / t_csv:>12.1f}{cpu:>8.3f}{cpu / c_csv:>16.1f}")
    f_wall = sum(r[1] for r in rows if r[0].endswith("fresh python"))
    f_cpu = sum(r[2] for r in rows if r[0].endswith("fresh python"))
    print(f"goal (fresh python, as Snakemake runs the rules) <= 20x read_csv: wall "
          f"{'met' if f_wall <= 20 * t_csv else 'NOT met'}, CPU {'met' if f_cpu <= 20 * c_csv else 'NOT met'}")
    print(f"peak RSS of this process {peak_rss_mb():,.0f} MB; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs (wall times on a busy machine: compare CPU seconds)")


def tile(base: Path, out: Path, rows: int) -> int:
    """Copies of ``base`` with patient IDs made unique per copy, up to ``rows`` data rows; returns copies."""
    header, *lines = base.read_text().splitlines()
    per = len(lines)
    copies = int(np.ceil(rows / per))
    with open(out, "w") as fh:
        fh.write(header + "\n")
        written = 0
        for c in range(copies):
            take = lines[: min(per, rows - written)]
            fh.write("\n".join(f"{ln.split(',', 1)[0]}-{c}," + ln.split(",", 1)[1] for ln in take) + "\n")
            written += len(take)
    return copies


def streamed(path: Path, base: Path, copies: int) -> None:
    from therapist_effects.io.stream import ingest_patients_streamed

    t_csv, _, df = best(lambda: pd.read_csv(base), 3)
    del df
    t0 = time.perf_counter()
    s = ingest_patients_streamed(path, SPEC)
    t = time.perf_counter() - t0
    acc = s.accounting
    size = path.stat().st_size / 2**20
    print(f"file: {acc['rows_read']:,} session rows ({copies} copies of the national export), {size:,.0f} MiB; "
          f"{len(s.patients):,} patients, {s.partitions} partitions")
    print(f"rows read {acc['rows_read']:,} = used {acc['rows_used']:,} + rejected {acc['rows_rejected']:,}")
    print(f"pandas.read_csv of one copy: {t_csv:.2f} s (x{copies} = {t_csv * copies:.1f} s)")
    print(f"streamed ingest + patient outcomes: {t:.1f} s = {t / (t_csv * copies):.1f} x read_csv of the same rows")
    rss = peak_rss_mb()
    print(f"peak RSS {rss:,.0f} MB   goal < 8 GB: {'met' if rss < 8192 else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 30,000 rows (a few seconds)")
    ap.add_argument("--rows", type=int, default=None, help="streamed case with this many session rows")
    ap.add_argument("--repeat", type=int, default=None, help="timings of ingest / outcomes (best of)")
    ap.add_argument("--data-dir", default=None, help="keep the simulated exports here (reused when present)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-ingest-") if args.data_dir is None else None
    tmp = Path(tmp_ctx.name if tmp_ctx else args.data_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        warm_up(tmp)
        settings = QUICK if args.quick else NATIONAL
        base = tmp / ("quick.csv" if args.quick else "national.csv")
        if not base.exists():
            t0 = time.perf_counter()
            make_export(base, settings, seed=20261129)
            print(f"simulated {base.name} in {time.perf_counter() - t0:.0f} s (not timed below)")
        if args.rows:
            big = tmp / f"sessions_{args.rows}.csv"
            copies = tile(base, big, args.rows) if not big.exists() else int(np.ceil(args.rows / (
                sum(1 for _ in open(base)) - 1)))
            streamed(big, base, copies)
        else:
            in_memory(base, args.repeat or (3 if args.quick else 1), tmp)
        print(f"python {sys.version.split()[0]}, pandas {pd.__version__}, {os.cpu_count()} CPUs")
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

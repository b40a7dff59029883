"""Benchmark: ingestion and patient outcomes against ``pandas.read_csv`` of the same file (issue 13).

A session-layout export is simulated with :func:`therapist_effects.simulate.simulate_practice` and
written as CSV (outside the timings). In the same process, after a warm-up on a tiny file (imports and
pandera's backends), it times

- ``pandas.read_csv(path)`` with its defaults (the baseline; best of three),
- ``ingest_dataset(path, spec)``: reading the configured columns, vectorised pandera validation,
  cross-row checks (best of ``--repeat``),
- ``derive_patient_outcomes(rows, spec)``: one row per patient (best of ``--repeat``),

and prints each as a ratio to read_csv, with the process's peak RSS. Goal: ingest + outcomes within
20x read_csv.

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


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def warm_up(tmp: Path) -> None:
    from therapist_effects.io.ingest import ingest_dataset
    from therapist_effects.io.outcomes import derive_patient_outcomes

    p = tmp / "warm.csv"
    make_export(p, dict(n_services=1, therapists_per_service=3, mean_caseload=4.0), 1)
    r = ingest_dataset(p, SPEC)
    derive_patient_outcomes(r.rows, SPEC, r.instrument)
    pd.read_csv(p)


def in_memory(path: Path, repeat: int) -> None:
    from therapist_effects.io.ingest import ingest_dataset
    from therapist_effects.io.outcomes import derive_patient_outcomes

    t_csv, df = best(lambda: pd.read_csv(path), 3)
    n_rows = len(df)
    del df
    t_ing, r = best(lambda: ingest_dataset(path, SPEC), repeat)
    t_out, (patients, _) = best(lambda: derive_patient_outcomes(r.rows, SPEC, r.instrument), repeat)
    size = path.stat().st_size / 2**20
    print(f"file: {n_rows:,} session rows, {patients['patient'].nunique():,} patients, "
          f"{patients['therapist'].nunique():,} therapists, {patients['cluster'].nunique()} services, {size:.0f} MiB")
    print(f"rows read {r.rows_read:,}: kept {len(r.rows):,}, rejected {len(r.rejects):,}")
    print(f"{'step':<22}{'seconds':>10}{'x read_csv':>12}")
    print(f"{'pandas.read_csv':<22}{t_csv:>10.3f}{1.0:>12.1f}")
    print(f"{'ingest':<22}{t_ing:>10.3f}{t_ing / t_csv:>12.1f}")
    print(f"{'patient outcomes':<22}{t_out:>10.3f}{t_out / t_csv:>12.1f}")
    total = (t_ing + t_out) / t_csv
    print(f"{'ingest + outcomes':<22}{t_ing + t_out:>10.3f}{total:>12.1f}   goal <= 20: "
          f"{'met' if total <= 20 else 'NOT met'}")
    print(f"peak RSS {peak_rss_mb():,.0f} MB")


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

    t_csv, df = best(lambda: pd.read_csv(base), 3)
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
            in_memory(base, args.repeat or (3 if args.quick else 1))
        print(f"python {sys.version.split()[0]}, pandas {pd.__version__}, {os.cpu_count()} CPUs")
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

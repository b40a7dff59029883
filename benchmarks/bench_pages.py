"""Benchmark: the therapist pages (rule ``therapist_pages``) at G therapists, per page, against the old way
measured in the same run (issue 13: quadratic in G, ~5 pages/s at 10,000 therapists).

A service of G therapists is simulated outside the timings (seeded; caseloads 5 to 59, a random-intercept
truth; the therapist table as the workflow writes it, patients with recovery and reliable improvement for
the rate funnel). For each G it times, in CPU seconds of this process (``time.process_time``; wall seconds
beside them, which a busy machine inflates):

- ``therapist_pages`` whole: the service context, the three page figures drawn once (backdrops), and one
  page per listed therapist with its own mark as SVG over them;
- of which the context and the backdrops (the part that does not grow with the number of pages);
- the baseline, the old way: every page redrew and PNG-encoded its three figures with all G therapists
  (``figures.control_funnel(highlight=i)`` twice and ``figures.caterpillar_highlight``), timed for
  ``--old-pages`` pages (figures only: the baseline leaves out the old page's rendering, so it is low).

It prints milliseconds per page of both and the ratio old / new. Linear cost shows as a constant
ms/page across G (the old way's grows with G). Goal: 10,000 therapists' pages well under a minute.

    python benchmarks/bench_pages.py --quick             # G = 50, 100 (seconds)
    python benchmarks/bench_pages.py                     # G = 500, 1,000, 2,000
    python benchmarks/bench_pages.py --sizes 10000       # national scale
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from therapist_effects.report import figures  # noqa: E402
from therapist_effects.report.service import page_backdrops, service_context, therapist_pages  # noqa: E402

TAU2, SIGMA2 = 2.0, 30.0  # therapist and residual variance (PHQ-9 points squared)


def simulate_service(g: int, seed: int = 20261129) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(estimates, patients, therapists) of a service with ``g`` therapists, as the workflow writes them."""
    rng = np.random.default_rng(seed)
    n = rng.integers(5, 60, g)
    ids = np.array([f"T{j:05d}" for j in range(g)])
    therapist = np.repeat(ids, n)
    baseline = rng.normal(16.0, 4.0, n.sum())
    fixed = 8.0 + 0.5 * (baseline - 16.0)
    end = fixed + np.repeat(rng.normal(0.0, np.sqrt(TAU2), g), n) + rng.normal(0.0, np.sqrt(SIGMA2), n.sum())
    patients = pd.DataFrame({"therapist": therapist, "recovered": np.where(baseline >= 10, end < 10, np.nan),
                             "reliable_improvement": (baseline - end >= 6).astype(float)})
    mean_resid = pd.Series(end - fixed).groupby(therapist).mean().reindex(ids).to_numpy()
    therapists = pd.DataFrame({"model": "ri", "therapist": ids, "caseload": n, "adjusted_mean": 8.0 + mean_resid,
                               "effect": TAU2 / (TAU2 + SIGMA2 / n) * mean_resid,
                               "effect_se": np.sqrt(1.0 / (1.0 / TAU2 + n / SIGMA2))})
    estimates = {"dataset": "bench", "instrument": "PHQ-9", "models": {"ri": {
        "type": "random_intercept", "family": "gaussian", "outcome": "phq9_post",
        "variance_components": {"therapist": {"estimate": TAU2}, "residual": {"estimate": SIGMA2}}}}}
    return estimates, patients, therapists


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def old_page_figures(ctx: dict, row: dict) -> None:
    """The three figures one page drew before: each whole figure redrawn with this therapist starred."""
    of, fu = ctx["outcome_funnel"], ctx["funnel"]
    eff = [r for r in ctx["rows"] if r["effect"][0] is not None]
    if row["id"] in of["ids"]:
        figures.control_funnel(of["n"], of["value"], of["target"], of["grid"], of["lo"], of["hi"], of["keys"],
                               level=ctx["level"], ylabel="adjusted end score", title="outcome",
                               highlight=of["ids"].index(row["id"]))
    if row["id"] in fu["ids"]:
        figures.control_funnel(fu["n"], fu["value"], fu["p0"], fu["grid"], fu["lo"], fu["hi"], fu["keys"],
                               level=ctx["level"], ylabel=fu["label"], title="rate", percent=True,
                               highlight=fu["ids"].index(row["id"]))
    figures.caterpillar_highlight([e["effect"][0] for e in eff], [e["effect"][1] for e in eff],
                                  [e["effect"][2] for e in eff], eff.index(row), ylabel="effect", title="effect")


def fixed_part(est: dict, patients: pd.DataFrame, therapists: pd.DataFrame) -> dict:
    """What ``therapist_pages`` does once, whatever the number of pages: the context and the backdrops."""
    ctx = service_context(est, patients, therapists)
    page_backdrops(ctx)
    return ctx


def bench(g: int, old_pages: int, work: Path) -> dict:
    est, patients, therapists = simulate_service(g)
    out = work / f"pages{g}"
    paths, cpu, wall = timed(lambda: therapist_pages(est, patients, therapists, out))
    shutil.rmtree(out)
    ctx, fixed_cpu, _ = timed(lambda: fixed_part(est, patients, therapists))
    _, old_cpu, old_wall = timed(lambda: [old_page_figures(ctx, r) for r in ctx["rows"][:old_pages]])
    return {"g": g, "pages": len(paths), "cpu": cpu, "wall": wall, "fixed": fixed_cpu,
            "new_ms": 1e3 * cpu / len(paths), "marginal_ms": 1e3 * (cpu - fixed_cpu) / len(paths),
            "old_ms": 1e3 * old_cpu / old_pages, "old_wall_ms": 1e3 * old_wall / old_pages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="G = 50, 100 (seconds)")
    ap.add_argument("--sizes", type=int, nargs="+", help="numbers of therapists (default 500 1000 2000)")
    ap.add_argument("--old-pages", type=int, default=3, help="pages drawn the old way per G (the baseline)")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([50, 100] if args.quick else [500, 1000, 2000])
    os.environ.setdefault("TE_PSEUDONYM_KEY", "benchmark-key-not-a-secret")
    print(f"therapist pages; CPU seconds of this process (wall beside them); old way timed on {args.old_pages} "
          "pages per G (figures only)")
    head = (f"{'therapists':>10} {'pages':>6} {'total cpu s':>11} {'wall s':>7} {'fixed s':>8} {'ms/page':>8} "
            f"{'marginal':>9} {'old ms/page':>11} {'old wall':>9} {'old/new':>8}")
    print(head + "\n" + "-" * len(head))
    with tempfile.TemporaryDirectory(prefix="bench-pages-") as tmp:
        bench(20, 1, Path(tmp))  # warm-up: imports, fonts, the template's compilation
        for g in sizes:
            r = bench(g, args.old_pages, Path(tmp))
            print(f"{r['g']:>10,} {r['pages']:>6,} {r['cpu']:>11.2f} {r['wall']:>7.2f} {r['fixed']:>8.2f} "
                  f"{r['new_ms']:>8.2f} {r['marginal_ms']:>9.2f} {r['old_ms']:>11.0f} {r['old_wall_ms']:>9.0f} "
                  f"{r['old_ms'] / r['new_ms']:>7.0f}x", flush=True)
    print("fixed: service context + the three backdrops; marginal: (total - fixed) / pages; "
          "old/new: old ms/page over ms/page (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

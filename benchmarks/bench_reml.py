"""Benchmark: the exact sufficient-statistics REML engine against statsmodels MixedLM.

Simulated patients of therapists (random intercept, ICC .05, one intake covariate) from 1,000
patients / 10 therapists up to 100,000 / 2,500 (``--full`` adds 1,000,000 / 10,000). For each
size it prints the fit time of this engine (model set-up with therapist codes and sufficient
statistics, plus the REML fit), its peak traced memory (tracemalloc, a separate run), the fit
time of ``statsmodels.MixedLM(...).fit(reml=True, method=["bfgs"], gtol=1e-10)`` on the same data
(``--sm-default``: its default settings, which stop ~1e-5 relative short of the optimum), the speed ratio, and the
largest absolute / relative difference of the estimates (fixed effects, therapist and residual
variances), and the REML criterion at statsmodels' estimate minus ours (which optimum is better).

    /work/venv/bin/python benchmarks/bench_reml.py            # up to 100,000 patients
    /work/venv/bin/python benchmarks/bench_reml.py --full     # adds 1,000,000 / 10,000
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np

from therapist_effects.reml import RandomInterceptModel

SIZES = [(1_000, 10), (10_000, 100), (100_000, 2_500)]
FULL = [(1_000_000, 10_000)]


def simulate(n: int, n_therapists: int, seed: int, icc: float = 0.05):
    """Patients allocated to therapists at random (unequal caseloads), y = 10 + 0.5 x + u + e."""
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_therapists, size=n)
    t[:n_therapists] = np.arange(n_therapists)  # every therapist has at least one patient
    x = rng.normal(size=n)
    y = 10.0 + 0.5 * x + rng.normal(scale=np.sqrt(icc), size=n_therapists)[t] \
        + rng.normal(scale=np.sqrt(1 - icc), size=n)
    return y, np.column_stack([np.ones(n), x]), t


def fit_engine(y, X, t, return_result=False):
    res = RandomInterceptModel(y, X, t, exog_names=["(Intercept)", "x"]).fit()
    est = np.r_[res.fe_params.to_numpy(), res.vcomp["therapist"], res.vcomp["residual"]]
    return (est, res) if return_result else est


def fit_statsmodels(y, X, t, tight: bool = True):
    """statsmodels MixedLM by REML; ``tight``: BFGS with gtol 1e-10 (its default chain, bfgs then
    lbfgs, stops ~1e-5 relative short of the optimum, too early for a 1e-6 comparison)."""
    import statsmodels.api as sm

    kw = {"method": ["bfgs"], "gtol": 1e-10} if tight else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = sm.MixedLM(y, X, groups=t).fit(reml=True, **kw)
    return np.r_[r.fe_params, float(np.asarray(r.cov_re)[0, 0]), r.scale]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="add 1,000,000 patients / 10,000 therapists")
    ap.add_argument("--sm-max", type=int, default=None,
                    help="largest n at which statsmodels is run (default: 100,000; 1,000,000 with --full)")
    ap.add_argument("--sm-default", action="store_true",
                    help="statsmodels with its default optimiser settings instead of BFGS gtol=1e-10")
    ap.add_argument("--repeats", type=int, default=3, help="engine timings: best of this many")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = SIZES + (FULL if args.full else [])
    sm_max = args.sm_max if args.sm_max is not None else (1_000_000 if args.full else 100_000)
    head = (f"{'patients':>10} {'therap.':>8} {'engine s':>9} {'peak MB':>8} {'statsm. s':>10} "
            f"{'ratio':>8} {'max |diff|':>11} {'max rel':>9} {'dcrit_sm':>10}")
    print(head)
    print("-" * len(head))
    for n, k in sizes:
        y, X, t = simulate(n, k, args.seed + n)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            est, res = fit_engine(y, X, t, return_result=True)
            times.append(time.perf_counter() - t0)
        t_eng = min(times)
        tracemalloc.start()
        fit_engine(y, X, t)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        if n <= sm_max:
            t0 = time.perf_counter()
            sm_est = fit_statsmodels(y, X, t, tight=not args.sm_default)
            t_sm = time.perf_counter() - t0
            diff = np.abs(est - sm_est)
            rel = diff / np.abs(sm_est)
            # who is nearer the optimum: -2 REML logLik at statsmodels' variance ratio minus ours
            dcrit = res._eng.crit(sm_est[-2] / sm_est[-1], 0.0, True) - (-2.0 * res.loglik)
            print(f"{n:>10,} {k:>8,} {t_eng:>9.4f} {peak:>8.1f} {t_sm:>10.2f} {t_sm / t_eng:>8.0f} "
                  f"{diff.max():>11.2e} {rel.max():>9.2e} {dcrit:>10.1e}", flush=True)
        else:
            print(f"{n:>10,} {k:>8,} {t_eng:>9.4f} {peak:>8.1f} {'(skipped)':>10}", flush=True)
    print("engine s: best of --repeats runs of set-up (group codes, sufficient statistics) + REML fit;"
          "\npeak MB: tracemalloc peak of one such run; statsm. s: statsmodels MixedLM.fit(reml=True)"
          + (" (its default optimiser settings);" if args.sm_default else
             " (method=['bfgs'], gtol=1e-10);") + "\ndiff: fixed effects, therapist and residual variance;"
          " dcrit_sm: -2 REML logLik at statsmodels' variance ratio minus at ours\n(>= 0: this"
          " engine's optimum is at least as good; the differences are statsmodels' convergence).")


if __name__ == "__main__":
    main()

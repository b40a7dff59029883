"""Benchmark: the exact sufficient-statistics REML engine against statsmodels MixedLM.

Simulated patients of therapists (random intercept, ICC .05, one intake covariate) from 1,000
patients / 10 therapists up to 100,000 / 2,500 (``--full`` adds 1,000,000 / 10,000). For each
size it prints the fit time of this engine (model set-up with therapist codes and sufficient
statistics, plus the REML fit), its peak traced memory (tracemalloc, a separate run), the fit
time of ``statsmodels.MixedLM(...).fit(reml=True, method=["bfgs"], gtol=1e-10)`` on the same data
(``--sm-default``: its default settings, which stop ~1e-5 relative short of the optimum), the speed ratio, and the
largest absolute / relative difference of the estimates (fixed effects, therapist and residual
variances), and the REML criterion at statsmodels' estimate minus ours (which optimum is better).

R baseline (when ``Rscript`` with lme4 is installed; without it the script says so and leaves these
columns out): the same data written to a temporary CSV, ``lmer(y ~ x + (1 | t), REML = TRUE)``
timed in R (``proc.time``, reading the CSV not timed) and ``confint(fit, method = "profile")``;
beside them this engine's fit and its profile intervals (``conf_int(method="profile")``, the same
intervals as lme4's), the ratios, and the largest relative difference of the estimates from lme4's.

    python benchmarks/bench_reml.py            # up to 100,000 patients
    python benchmarks/bench_reml.py --full     # adds 1,000,000 / 10,000
    python benchmarks/bench_reml.py --quick    # 1,000 and 5,000 patients, one repeat (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
import warnings

import numpy as np

from therapist_effects.models.reml import RandomInterceptModel

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import _r_baseline  # noqa: E402

SIZES = [(1_000, 10), (10_000, 100), (100_000, 2_500)]
FULL = [(1_000_000, 10_000)]
QUICK = [(1_000, 10), (5_000, 100)]


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
    ap.add_argument("--quick", action="store_true", help="1,000 and 5,000 patients, one repeat (CI smoke run)")
    ap.add_argument("--no-r", action="store_true", help="leave out the R (lme4) baseline")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else SIZES + (FULL if args.full else [])
    if args.quick:
        args.repeats = 1
    no_r = "--no-r given" if args.no_r else _r_baseline.r_unavailable()
    print(f"R baseline: {no_r}" if no_r else f"R baseline: {_r_baseline.lme4_version()}")
    sm_max = args.sm_max if args.sm_max is not None else (1_000_000 if args.full else 100_000)
    head = (f"{'patients':>10} {'therap.':>8} {'engine s':>9} {'peak MB':>8} {'statsm. s':>10} "
            f"{'ratio':>8} {'max |diff|':>11} {'max rel':>9} {'dcrit_sm':>10}"
            + ("" if no_r else f" {'lmer s':>8} {'x lmer':>7} {'ci s':>7} {'R ci s':>8} {'x R ci':>7} {'rel vs R':>9}"))
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
            dcrit = res._eng.crit([math.sqrt(sm_est[-2] / sm_est[-1])], True) - (-2.0 * res.loglik)
            line = (f"{n:>10,} {k:>8,} {t_eng:>9.4f} {peak:>8.1f} {t_sm:>10.2f} {t_sm / t_eng:>8.0f} "
                    f"{diff.max():>11.2e} {rel.max():>9.2e} {dcrit:>10.1e}")
        else:
            line = f"{n:>10,} {k:>8,} {t_eng:>9.4f} {peak:>8.1f} {'(skipped)':>10} {'':>8} {'':>11} {'':>9} {'':>10}"
        if not no_r:
            line += r_columns(y, X, t, t_eng, est)
        print(line, flush=True)
    print("engine s: best of --repeats runs of set-up (group codes, sufficient statistics) + REML fit;"
          "\npeak MB: tracemalloc peak of one such run; statsm. s: statsmodels MixedLM.fit(reml=True)"
          + (" (its default optimiser settings);" if args.sm_default else
             " (method=['bfgs'], gtol=1e-10);") + "\ndiff: fixed effects, therapist and residual variance;"
          " dcrit_sm: -2 REML logLik at statsmodels' variance ratio minus at ours\n(>= 0: this"
          " engine's optimum is at least as good; the differences are statsmodels' convergence)."
          + ("" if no_r else "\nlmer s: lme4 lmer(REML) fit in R; x lmer: lmer s / engine s; ci s: this engine's"
             " conf_int(method='profile') after the fit;\nR ci s: confint(fit, method = 'profile') in R; x R ci:"
             " R ci s / ci s; rel vs R: largest relative difference of the estimates from lme4's."))


def r_columns(y, X, t, t_eng: float, est: np.ndarray) -> str:
    """lme4 on the same data: fit and profile-interval times, ratios, agreement of the estimates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomInterceptModel(y, X, t, exog_names=["(Intercept)", "x"]).fit()
        t0 = time.perf_counter()
        res.conf_int(method="profile")
        t_ci = time.perf_counter() - t0
    r = _r_baseline.lmer(y, X[:, 1], t, profile=True)
    r_est = np.array([r["b0"], r["b1"], r["var_t"], r["var_e"]])
    rel = float(np.max(np.abs(est - r_est) / np.abs(r_est)))
    return (f" {r['fit_s']:>8.2f} {r['fit_s'] / t_eng:>7.0f} {t_ci:>7.3f} {r['confint_s']:>8.2f} "
            f"{r['confint_s'] / t_ci:>7.0f} {rel:>9.1e}")


if __name__ == "__main__":
    main()

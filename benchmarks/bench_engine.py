"""Benchmark (issue 9): random slopes and nested models by the exact engine, with profile intervals.

Prints, from one run on the same simulated data:

- ``random_slope``: (1 + feedback | therapist) fitted by the exact engine *with profile intervals*
  (``to_contract()``: intervals of both variances, the residual and the correlation) against
  statsmodels ``MixedLM(...).fit(reml=True, method=["lbfgs"])`` (the former engine, no intervals);
  the ratio MixedLM / engine, and the two REML log-likelihoods;
- ``nested``: (1 | cluster/therapist) with profile intervals (``to_contract()``) against the random
  intercept with profile intervals on the same data; the ratio nested / random intercept.

    python benchmarks/bench_engine.py            # 200,000 patients, 10,000 therapists, 100 clusters
    python benchmarks/bench_engine.py --quick    # 20,000 patients, 1,000 therapists, 20 clusters
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def simulate(n: int, n_therapists: int, n_clusters: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, n_therapists, size=n)
    t[:n_therapists] = np.arange(n_therapists)
    cl_of_t = np.arange(n_therapists) % n_clusters
    fb = rng.integers(0, 2, size=n).astype(float)
    x = rng.normal(size=n)
    ab = rng.multivariate_normal([0.0, 0.0], [[0.05, -0.02], [-0.02, 0.03]], size=n_therapists)
    uc = rng.normal(scale=0.15, size=n_clusters)
    y = 1.0 + 0.5 * x - 0.3 * fb + ab[t, 0] + ab[t, 1] * fb + uc[cl_of_t[t]] + rng.normal(size=n)
    return y, np.column_stack([np.ones(n), x, fb]), t, cl_of_t[t], fb


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 patients / 1,000 therapists")
    args = ap.parse_args(argv)
    n, k, c = (20_000, 1_000, 20) if args.quick else (200_000, 10_000, 100)
    y, X, t, cl, fb = simulate(n, k, c)
    names = ["(Intercept)", "x", "feedback"]
    warnings.simplefilter("ignore")
    from therapist_effects.models.reml import NestedModel, RandomInterceptModel
    from therapist_effects.models.slopes import RandomSlopeModel

    print(f"{n:,} patients, {k:,} therapists, {c} clusters "
          "(wall-clock seconds; CPU seconds of this process in brackets: on a shared machine the CPU "
          "ratios are the steadier ones)")
    t0, c0 = time.perf_counter(), time.process_time()
    res = RandomSlopeModel(y, X, t, fb, exog_names=names).fit()
    t_fit = time.perf_counter() - t0
    res.to_contract()
    t_engine, c_engine = time.perf_counter() - t0, time.process_time() - c0

    import pandas as pd
    import statsmodels.api as sm

    t0, c0 = time.perf_counter(), time.process_time()
    exog = pd.DataFrame(X, columns=names)
    sm_res = sm.MixedLM(y, exog, groups=t, exog_re=exog[["(Intercept)", "feedback"]]).fit(reml=True, method=["lbfgs"])
    t_sm, c_sm = time.perf_counter() - t0, time.process_time() - c0
    print(f"random_slope: engine fit {t_fit:.2f} s, with profile intervals {t_engine:.2f} s [{c_engine:.2f}]; "
          f"MixedLM {t_sm:.2f} s [{c_sm:.2f}]; ratio MixedLM / engine-with-profiles {t_sm / t_engine:.2f}x "
          f"[{c_sm / c_engine:.2f}x]; REML logLik engine {res.loglik:.4f}, MixedLM {sm_res.llf:.4f}")

    t0, c0 = time.perf_counter(), time.process_time()
    RandomInterceptModel(y, X, t, exog_names=names).fit().to_contract()
    t_ri, c_ri = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    NestedModel(y, X, t, cl, exog_names=names).fit().to_contract()
    t_ne, c_ne = time.perf_counter() - t0, time.process_time() - c0
    print(f"nested with profile intervals {t_ne:.2f} s [{c_ne:.2f}]; random intercept with profile intervals "
          f"{t_ri:.2f} s [{c_ri:.2f}]; ratio nested / random intercept {t_ne / t_ri:.2f}x [{c_ne / c_ri:.2f}x]")


if __name__ == "__main__":
    main()

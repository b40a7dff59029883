"""Timing of the random-intercept logistic GLMM on 100,000 patients of 2,500 therapists.

Run:  python benchmarks/bench_glmm.py [--patients 100000] [--therapists 2500]
      [--sm-patients 10000 --sm-therapists 250] [--no-statsmodels] [--no-r]
      python benchmarks/bench_glmm.py --quick     # 2,000 / 50 and 1,000 / 25: same code paths (CI)

Prints, in the same run on simulated data (seeded):
* one full fit (estimates + standard errors) by Laplace and by AGQ10 (this package, vectorised
  over therapists) on 100,000 patients / 2,500 therapists;
* one evaluation of the Laplace log-likelihood, vectorised vs. a per-therapist Python loop
  (the baseline the vectorisation replaces; same value);
* statsmodels' ``BinomialBayesMixedGLM.fit_vb`` (variational Bayes, a different estimator, the
  nearest off-the-shelf Python alternative) next to this package's Laplace fit on a smaller data
  set (default 10,000 / 250): on the full size fit_vb did not finish within 13 minutes;
* R baseline (when ``Rscript`` with lme4 is installed; otherwise the script says so and skips it):
  ``glmer(y ~ 0 + X + (1 | t), family = binomial, nAGQ = 1)`` and ``nAGQ = 10`` on the same data
  (written to a temporary CSV; R's fit time only), their time as a ratio to this package's Laplace /
  AGQ10 fit, and the difference of the therapist variance and log-likelihood from lme4's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
from scipy.special import expit

from therapist_effects.models.glmm import LogisticRandomInterceptModel

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import _r_baseline  # noqa: E402


def simulate(n_patients: int, n_therapists: int, seed: int = 2024):
    """Patients allocated evenly to therapists; latent ICC 0.05; baseline severity and arm."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_therapists), int(np.ceil(n_patients / n_therapists)))[:n_patients]
    s2 = 0.05 / 0.95 * np.pi**2 / 3
    u = rng.normal(0, np.sqrt(s2), n_therapists)
    pre = rng.normal(16, 4, n_patients)
    arm = rng.integers(0, 2, n_patients).astype(float)
    X = np.column_stack([np.ones(n_patients), pre - 16, arm])
    b = np.array([0.2, -0.05, 0.2])
    y = (rng.random(n_patients) < expit(X @ b + u[g])).astype(float)
    return y, X, g, b, s2


def loop_laplace_loglik(y, X, g, b, s):
    """Laplace log-likelihood with a Python loop over therapists (baseline)."""
    eta0 = X @ b
    total = 0.0
    for j in np.unique(g):
        idx = g == j
        yj, ej = y[idx], eta0[idx]
        v = 0.0
        for _ in range(100):
            mu = expit(ej + s * v)
            step = (s * np.sum(yj - mu) - v) / (1 + s * s * np.sum(mu * (1 - mu)))
            v += step
            if abs(step) < 1e-10:
                break
        eta = ej + s * v
        mu = expit(eta)
        H = 1 + s * s * np.sum(mu * (1 - mu))
        total += np.sum(yj * eta - np.logaddexp(0, eta)) - 0.5 * v * v - 0.5 * np.log(H)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--therapists", type=int, default=2_500)
    ap.add_argument("--sm-patients", type=int, default=10_000)
    ap.add_argument("--sm-therapists", type=int, default=250)
    ap.add_argument("--no-statsmodels", action="store_true")
    ap.add_argument("--no-r", action="store_true", help="leave out the R (lme4 glmer) baseline")
    ap.add_argument("--quick", action="store_true", help="2,000 / 50 and 1,000 / 25 patients / therapists (CI)")
    args = ap.parse_args(argv)
    if args.quick:
        args.patients, args.therapists, args.sm_patients, args.sm_therapists = 2_000, 50, 1_000, 25
    no_r = "--no-r given" if args.no_r else _r_baseline.r_unavailable()
    print(f"R baseline: {no_r}" if no_r else f"R baseline: {_r_baseline.lme4_version()}")
    y, X, g, b, s2 = simulate(args.patients, args.therapists)
    names = ["(Intercept)", "phq9_pre_c", "feedback"]
    print(f"data: {args.patients} patients, {args.therapists} therapists, true s2_u = {s2:.4f}")

    ours = {}
    for method in ("laplace", "agq"):
        m = LogisticRandomInterceptModel(y, X, g, exog_names=names, method=method, n_quad=10)
        t0 = time.perf_counter()
        r = m.fit()
        dt = time.perf_counter() - t0
        ours[method] = (dt, r)
        print(
            f"{r.method:>8} fit: {dt:7.2f} s   s2_u = {r.vcomp['therapist']:.4f}"
            f"   b = {np.round(r.fe_params.to_numpy(), 4)}   loglik = {r.loglik:.3f}"
            f"   converged = {r.converged}"
        )
    if not no_r:
        rr = _r_baseline.glmer(y, X, g, n_agq=10)
        for q, method in ((1, "laplace"), (10, "agq")):
            dt, r = ours[method]
            print(
                f"  lme4 glmer nAGQ={q:<2d}: {rr[f'fit_s_agq{q}']:7.2f} s  (x{rr[f'fit_s_agq{q}'] / dt:.1f} this package's"
                f" {method} fit)   s2_u = {rr[f'var_t_agq{q}']:.4f}   loglik = {rr[f'loglik_agq{q}']:.3f}"
                f"   |d s2_u| = {abs(r.vcomp['therapist'] - rr[f'var_t_agq{q}']):.1e}"
                f"   d loglik = {r.loglik - rr[f'loglik_agq{q}']:.1e}"
            )

    m = LogisticRandomInterceptModel(y, X, g, exog_names=names)
    s = float(np.sqrt(s2))
    t0 = time.perf_counter()
    for _ in range(5):
        ll_vec = m.loglik(b, s)
    t_vec = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    ll_loop = loop_laplace_loglik(y, X, g, b, s)
    t_loop = time.perf_counter() - t0
    print(
        f"one Laplace log-likelihood evaluation: vectorised {t_vec * 1e3:.1f} ms,"
        f" per-therapist loop {t_loop * 1e3:.0f} ms (x{t_loop / t_vec:.0f});"
        f" values {ll_vec:.6f} / {ll_loop:.6f}"
    )

    if not args.no_statsmodels:
        import pandas as pd
        from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM

        y, X, g, b, s2 = simulate(args.sm_patients, args.sm_therapists)
        print(f"data: {args.sm_patients} patients, {args.sm_therapists} therapists, true s2_u = {s2:.4f}")
        t0 = time.perf_counter()
        r = LogisticRandomInterceptModel(y, X, g, exog_names=names).fit()
        dt = time.perf_counter() - t0
        print(
            f"{r.method:>8} fit: {dt:7.2f} s   s2_u = {r.vcomp['therapist']:.4f}"
            f"   b = {np.round(r.fe_params.to_numpy(), 4)}"
        )
        df = pd.DataFrame({"y": y, "pre": X[:, 1], "arm": X[:, 2], "therapist": g.astype(str)})
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = BinomialBayesMixedGLM.from_formula("y ~ pre + arm", {"therapist": "0 + C(therapist)"}, df)
            res = mod.fit_vb()
        dt = time.perf_counter() - t0
        sd = float(np.exp(res.vcp_mean[0]))
        print(
            f"statsmodels BinomialBayesMixedGLM.fit_vb: {dt:7.2f} s   s2_u (exp(vcp_mean)^2) = {sd**2:.4f}"
            f"   b = {np.round(res.fe_mean, 4)}"
        )


if __name__ == "__main__":
    main()

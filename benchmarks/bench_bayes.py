"""Benchmark: Bayesian random-intercept model on sufficient statistics vs. written per patient.

    python benchmarks/bench_bayes.py            # full size (about 10 minutes on 2 cores)
    python benchmarks/bench_bayes.py --quick    # small sizes, same code paths (CI)

Rows, each with the parameterisation it uses (``BayesConfig.parameterization``; all rows set it
explicitly, none relies on ``"auto"``):

1. ``noncentred``, sufficient statistics, nutpie: 100,000 patients of 2,500 therapists (caseload
   40), ``y ~ baseline + (1 | therapist)``, sampled on per-therapist sufficient statistics
   (``therapist_effects.models.bayes``) with the therapist effects ``u = sigma_therapist * z`` sampled
   (``z`` standard normal), 4 chains x 1,000 draws (1,000 tuning).
2. ``noncentred``, per patient, PyMC NUTS: the same model written per patient
   (``pm.Normal(..., observed=y)``, no sufficient statistics) on 10,000 patients (the first 250
   therapists), sampled with PyMC's own NUTS, same chains / draws. (The marginal parameterisation
   exists only on sufficient statistics.)
3. ``noncentred``, per patient, nutpie: (2) sampled with nutpie: this separates the gain of the
   sufficient statistics from the gain of the compiled sampler.
4. ``marginal``, sufficient statistics, nutpie: (1) with the therapist effects integrated out
   analytically, NUTS on 4 parameters, effects drawn exactly afterwards.
5. ``marginal``, grid: (4) with the fixed effects integrated out too and the exact posterior of the two
   SDs evaluated on a grid and sampled independently (``sampler="grid"``, the default of ``"auto"``
   for Gaussian random_intercept models; ``therapist_effects.models.bayes_grid``), same number of draws.

For each: compile and sampling wall time, and ESS per second = min bulk ESS of the variance
parameters (sigma_therapist, sigma_residual) / sampling seconds (compilation excluded). The ratio
(1) / (2) is the headline (target >= 10x); (1) / (3) the like-for-like sampler comparison;
(4) / (2) and (4) / (3) the same for the marginal parameterisation; (5) / (4) the grid against NUTS on
the same marginal model, in ESS per second and in total seconds (compile + sample), measured in the same run.
Options: --quick, --patients, --therapists, --small-patients, --chains, --draws, --tune, --skip-pymc, --seed.
``--quick``: 2,000 patients of 50 therapists, 500 per patient, 2 chains x 200 draws (200 tune):
the same code paths in seconds of sampling (compilation dominates); its ratios mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import arviz as az
import numpy as np
import pandas as pd

from therapist_effects.models.bayes import BayesConfig, BayesModel
from therapist_effects.exceptions import SamplerWarning


def simulate(n_patients: int, n_therapists: int, seed: int) -> pd.DataFrame:
    """Practice data: equal caseloads, ICC 0.05, baseline slope 0.5 (PHQ-9-like scale)."""
    rng = np.random.default_rng(seed)
    therapist = np.repeat(np.arange(n_therapists), n_patients // n_therapists)
    n = therapist.size
    baseline = rng.normal(15.0, 5.0, n)
    sigma_t, sigma = 5.0 * np.sqrt(0.05), 5.0 * np.sqrt(0.95)
    u = rng.normal(0.0, sigma_t, n_therapists)
    y = 2.0 + 0.5 * baseline + u[therapist] + rng.normal(0.0, sigma, n)
    return pd.DataFrame({"therapist": [f"T{t:05d}" for t in therapist], "baseline": baseline, "y": y})


def run(label: str, df: pd.DataFrame, cfg: BayesConfig, per_patient: bool) -> dict:
    label = f"{label} [{cfg.parameterization}]"
    t0 = time.perf_counter()
    model = BayesModel("random_intercept", df, "y", ["baseline"], config=cfg, per_patient=per_patient)
    compile_s = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SamplerWarning)
        res = model.fit()
    sample_s = res.diagnostics["sampling_seconds"]
    ess = az.ess(res.idata.posterior[["sd_therapist_std", "sigma_std"]], method="bulk")
    min_ess = float(min(ess["sd_therapist_std"].values, ess["sigma_std"].values))
    out = {
        "label": label, "patients": len(df), "therapists": df["therapist"].nunique(), "sampler": res.sampler,
        "compile_s": compile_s, "sample_s": sample_s, "min_ess_var": min_ess, "ess_per_s": min_ess / sample_s,
        "icc": float(res.icc().loc["icc", "median"]), "failed": res.failed, "max_rhat": res.diagnostics["max_rhat"],
        "divergences": res.diagnostics["divergences"], "warnings": len(caught),
    }
    print(
        f"{label:<58s} n={out['patients']:>7d} T={out['therapists']:>5d} {out['sampler']:<6s} "
        f"compile {compile_s:7.1f}s  sample {sample_s:8.1f}s  min ESS(var) {min_ess:7.0f}  "
        f"ESS/s {out['ess_per_s']:8.2f}  ICC {out['icc']:.4f}  max R-hat {out['max_rhat']:.3f}  "
        f"div {out['divergences']}  failed {out['failed']}",
        flush=True,
    )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=100_000)
    ap.add_argument("--therapists", type=int, default=2_500)
    ap.add_argument("--small-patients", type=int, default=10_000)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=1_000)
    ap.add_argument("--tune", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=20240917)
    ap.add_argument("--skip-pymc", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes, same code paths (CI smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.patients, args.therapists, args.small_patients = 2_000, 50, 500
        args.chains, args.draws, args.tune = 2, 200, 200
    print(f"bench_bayes: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.chains} chains x {args.draws} draws ({args.tune} tune)", flush=True)
    big = simulate(args.patients, args.therapists, args.seed)
    caseload = args.patients // args.therapists
    small = big[big["therapist"].isin(sorted(big["therapist"].unique())[: args.small_patients // caseload])]
    small = small.reset_index(drop=True)
    base = dict(chains=args.chains, draws=args.draws, tune=args.tune, seed=args.seed, parameterization="noncentred")
    a = run("sufficient statistics, nutpie", big, BayesConfig(**base, sampler="nutpie"), per_patient=False)
    results = [a]
    if not args.skip_pymc:
        b = run("per patient, PyMC NUTS", small, BayesConfig(**base, sampler="pymc"), per_patient=True)
        results.append(b)
        print(f"ratio ESS/s sufficient statistics ({a['patients']} patients) / per-patient PyMC "
              f"({b['patients']} patients): {a['ess_per_s'] / b['ess_per_s']:.1f}x (target >= 10x)", flush=True)
    c = run("per patient, nutpie", small, BayesConfig(**base, sampler="nutpie"), per_patient=True)
    results.append(c)
    print(f"ratio ESS/s sufficient statistics ({a['patients']} patients) / per-patient nutpie "
          f"({c['patients']} patients): {a['ess_per_s'] / c['ess_per_s']:.1f}x", flush=True)
    d = run("sufficient statistics, nutpie", big,
            BayesConfig(**{**base, "parameterization": "marginal"}, sampler="nutpie"), per_patient=False)
    if not args.skip_pymc:
        print(f"ratio ESS/s marginal sufficient statistics ({d['patients']} patients) / per-patient PyMC "
              f"({b['patients']} patients): {d['ess_per_s'] / b['ess_per_s']:.1f}x (target >= 10x)", flush=True)
    print(f"ratio ESS/s marginal sufficient statistics ({d['patients']} patients) / per-patient nutpie "
          f"({c['patients']} patients): {d['ess_per_s'] / c['ess_per_s']:.1f}x", flush=True)
    e = run("sufficient statistics, grid", big, BayesConfig(**{**base, "parameterization": "marginal"}, sampler="grid"),
            per_patient=False)
    print(f"ratio grid / nutpie, marginal model ({e['patients']} patients): "
          f"ESS/s {e['ess_per_s'] / d['ess_per_s']:.1f}x, compile + sample seconds "
          f"{(d['compile_s'] + d['sample_s']) / (e['compile_s'] + e['sample_s']):.1f}x faster", flush=True)


if __name__ == "__main__":
    main()

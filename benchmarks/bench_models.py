"""Every model type as the workflow fits it (``models.fit_model``: fit, intervals and therapist table) at
national scale, against statsmodels MixedLM on the same random-intercept model in the same run.

    python benchmarks/bench_models.py            # 200,000 patients, 10,000 therapists, 50 services
    python benchmarks/bench_models.py --quick    # 10,000 patients, 500 therapists (seconds; CI)

The patient table is simulated directly with numpy (seeded): intake score, a feedback arm randomised
per patient, service and therapist effects, a binary recovery outcome. Models: ``ri``
(random intercept), ``arm`` (arm-specific therapist variances), ``nested`` (services / therapists),
``slope`` (random feedback slope) and ``recovery`` (binomial random intercept, AGQ), each with the
default profile-likelihood intervals, and ``slope0``: the random slope again on the same table
simulated without slope variance (a singular fit, the correlation at +-1: the boundary case of the
profiles, ``(singular)`` in the output). Prints wall and CPU seconds per model, the ratio of the
baseline's time to the model's (statsmodels MixedLM fit of ``ri`` without intervals: >1 means
faster than the baseline), issue 13's goal (every fit within 10 s at full size) and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import pandas as pd

from therapist_effects.config import load_config
from therapist_effects.models.fitting import fit_model

GOAL_SECONDS = 10.0


def simulate(n_patients: int, n_therapists: int, n_services: int, seed: int = 1, slope_sd: float = 0.5
             ) -> pd.DataFrame:
    """The patient table; ``slope_sd`` is the SD of the therapists' feedback slopes (0: no slope
    variance in truth, the boundary case of a singular random-slope fit)."""
    rng = np.random.default_rng(seed)
    th = rng.integers(0, n_therapists, n_patients)
    svc = th % n_services
    base = rng.normal(16, 5, n_patients)
    arm = rng.integers(0, 2, n_patients)
    end = (5 + 0.5 * base - 1.0 * arm + rng.normal(0, 0.5, n_services)[svc] + rng.normal(0, 1, n_therapists)[th]
           + rng.normal(0, slope_sd, n_therapists)[th] * arm + rng.normal(0, 5, n_patients))
    recovered = (rng.random(n_patients) < 1 / (1 + np.exp(-(0.3 * (12 - end) + rng.normal(0, 0.4, n_therapists)[th]))))
    return pd.DataFrame({"patient": np.arange(n_patients).astype(str), "therapist": th.astype(str),
                         "cluster": svc.astype(str), "arm": arm.astype(str), "feedback": arm.astype(float),
                         "baseline": base, "end": end, "recovered": recovered.astype(float)})


def config() -> dict:
    return load_config({
        "datasets": {"bench": {"path": "bench.csv", "layout": "patient",
                               "columns": {"patient": "id", "therapist": "tid", "outcome": "post", "baseline": "pre",
                                           "arm": "fb", "cluster": "svc"}}},
        "models": [{"id": "ri", "type": "random_intercept"}, {"id": "arm", "type": "arm_variance"},
                   {"id": "nested", "type": "nested"}, {"id": "slope", "type": "random_slope"},
                   {"id": "recovery", "type": "random_intercept", "family": "binomial", "outcome": "recovered"}],
    }, source="bench_models")


def baseline_seconds(patients: pd.DataFrame) -> float:
    import statsmodels.formula.api as smf

    t0 = time.perf_counter()
    smf.mixedlm("end ~ baseline + feedback", patients, groups=patients["therapist"]).fit(reml=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 patients / 500 therapists (CI)")
    args = ap.parse_args(argv)
    n, k, c = (10_000, 500, 10) if args.quick else (200_000, 10_000, 50)
    patients = simulate(n, k, c)
    cfg = config()
    dataset = cfg["datasets"]["bench"]
    print(f"{n:,} patients, {k:,} therapists, {c} services (simulated, seed 1)")
    warnings.simplefilter("ignore")
    base = baseline_seconds(patients)
    print(f"baseline: statsmodels MixedLM, random intercept, REML, no intervals: {base:.2f} s")
    print(f"{'model':<10}{'wall s':>9}{'CPU s':>9}{'baseline / model':>18}  within {GOAL_SECONDS:g} s")
    runs = [(model["id"], model, patients) for model in cfg["models"]]
    slope = next(model for model in cfg["models"] if model["id"] == "slope")
    runs.append(("slope0", slope, simulate(n, k, c, slope_sd=0.0)))
    for label, model, table in runs:
        t0, c0 = time.perf_counter(), time.process_time()
        entry, _, _ = fit_model(table, model, dataset, cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        ok = "yes" if wall <= GOAL_SECONDS else "NO"
        print(f"{label:<10}{wall:>9.2f}{cpu:>9.2f}{base / wall:>18.1f}  {ok}"
              f"{'' if entry.get('converged', True) else '  (not converged)'}"
              f"{'  (singular)' if entry.get('singular') else ''}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
          + ("  (--quick: the goal applies to the full size only)" if args.quick else ""))


if __name__ == "__main__":
    main()

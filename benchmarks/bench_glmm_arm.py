"""The binomial arm-variance model against glmer on the committed reference data, with timings.

Run:  python benchmarks/bench_glmm_arm.py [--quick]   (--quick: therapy_feedback by Laplace only, the same code path)

For therapy_feedback.csv and therapy_trials.csv (tests/reference/), by Laplace and AGQ10: the two
arm variances next to glmer's (Laplace; tests/reference/glmer_arm.json from glmer_arm.R) with the
relative difference, the log-likelihood minus glmer's, the ICC ratio with its profile interval, and the
seconds for the fit and for the intervals (to_contract: profile intervals of both variances and of the
ratio, and the equal-variance LRT). AGQ has no glmer counterpart for this model (glmer refuses
nAGQ > 1 with vector random effects); its rows show how far Laplace is from the quadrature.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import pandas as pd

from therapist_effects.models.glmm_arm import LogisticArmVarianceModel

REF = Path(__file__).resolve().parents[1] / "tests" / "reference"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="therapy_feedback by Laplace only (CI)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    ref = json.loads((REF / "glmer_arm.json").read_text())
    for ds in ("therapy_feedback",) if args.quick else ("therapy_feedback", "therapy_trials"):
        d = pd.read_csv(REF / f"{ds}.csv")
        r_ = ref[ds]["laplace"]
        for meth in ("laplace",) if args.quick else ("laplace", "agq"):
            t0 = time.perf_counter()
            res = LogisticArmVarianceModel.from_frame(d, "recovered", ["phq9_pre"], therapist="therapist_id",
                                                      arm="feedback", method=meth, n_quad=10).fit()
            t1 = time.perf_counter()
            c = res.to_contract()
            t2 = time.perf_counter()
            v = [res.vcomp["therapist[0]"], res.vcomp["therapist[1]"]]
            g = [r_["variance"]["c0"], r_["variance"]["c1"]]
            rel = [abs(a - b) / b if b else abs(a - b) for a, b in zip(v, g, strict=True)]
            ratio = c["icc_ratio"]
            print(f"{ds:17s} {meth:7s} var {v[0]:.6f} {v[1]:.6f} | glmer Laplace {g[0]:.6f} {g[1]:.6f} "
                  f"(rel diff {rel[0]:.1e}, {rel[1]:.1e}) | logLik {res.loglik:.6f} (minus glmer: "
                  f"{res.loglik - r_['logLik']:+.2e}) | ICC ratio {ratio['estimate']:.3f} "
                  f"[{ratio['ci_low']}, {ratio['ci_high']}] | fit {t1 - t0:.2f} s, intervals {t2 - t1:.2f} s")


if __name__ == "__main__":
    main()

"""Speed of the growth model (sessions in patients in therapists) against a baseline in the same run.

    python benchmarks/bench_growth.py --quick   # ~65k sessions / 10k patients / 500 therapists (seconds)
    python benchmarks/bench_growth.py           # 1.3M sessions / 200k patients / 10k therapists (target < 30 s)

The data come from ``simulate_growth`` (time = log session number, 3-10 sessions per patient). The
timed step is what the workflow does: build the model from the session table (per-patient block
statistics) and fit it by REML (criterion, optimiser, convergence and singularity checks; profile
intervals are not included). The baseline is lme4's ``lmer`` (via Rscript, when R and lme4 are
installed) or else statsmodels ``MixedLM`` (therapist intercept + slope, independent patient intercept
and slope variance components), both on a subsample of therapists, with our engine timed on the same
subsample: the printed ratio is baseline time / our time on identical data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from therapist_effects.models.growth import GrowthModel, simulate_growth  # noqa: E402

R_SCRIPT = """
suppressMessages(library(lme4))
d <- read.csv(commandArgs(TRUE)[1], colClasses = c(patient = "character", therapist = "character"))
t0 <- proc.time()[["elapsed"]]
f <- lmer(score ~ lt + (1 + lt | therapist) + (1 + lt | therapist:patient), data = d, REML = TRUE)
el <- proc.time()[["elapsed"]] - t0
vc <- as.data.frame(VarCorr(f))
cat(sprintf('{"seconds": %.6f, "loglik": %.10f, "therapist_slope": %.10g}\\n', el, as.numeric(logLik(f)),
            vc$vcov[vc$grp == "therapist" & vc$var1 == "lt" & is.na(vc$var2)]))
"""


def fit_ours(d):
    """Wall-clock seconds, the results, and (setup wall s, fit wall s, total CPU s of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GrowthModel.from_frame(d, "score", "lt")
        t1 = time.perf_counter()
        res = model.fit()
    t2 = time.perf_counter()
    fit_ours.detail = (t1 - t0, t2 - t1, time.process_time() - c0)
    return t2 - t0, res


def baseline(sub) -> tuple[str, float, dict]:
    if shutil.which("Rscript"):
        probe = subprocess.run(["Rscript", "-e", "library(lme4)"], capture_output=True)
        if probe.returncode == 0:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "sub.csv"
                sub[["patient", "therapist", "lt", "score"]].to_csv(path, index=False)
                script = Path(tmp) / "fit.R"
                script.write_text(R_SCRIPT)
                out = subprocess.run(["Rscript", str(script), str(path)], capture_output=True, text=True, check=True)
                info = json.loads(out.stdout.strip().splitlines()[-1])
                return "lme4::lmer", float(info["seconds"]), info
    import statsmodels.formula.api as smf

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = smf.mixedlm("score ~ lt", sub, groups="therapist", re_formula="1 + lt",
                        vc_formula={"patient": "0 + C(patient)", "patient_slope": "0 + C(patient):lt"})
        r = m.fit(reml=True)
    return "statsmodels MixedLM", time.perf_counter() - t0, {"loglik": float(r.llf)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data set (a few seconds)")
    ap.add_argument("--seed", type=int, default=20261129)
    args = ap.parse_args()
    n_t = 500 if args.quick else 10000
    d = simulate_growth(n_t, 20, sessions=(3, 10), seed=args.seed)
    print(f"data: {len(d):,} sessions, {d['patient'].nunique():,} patients, {d['therapist'].nunique():,} therapists")
    secs, res = fit_ours(d)
    vc = res.variance_components()
    setup, fit, cpu = fit_ours.detail
    print(f"ours (exact REML from per-patient block statistics): {secs:.2f} s wall (block statistics {setup:.2f} s, "
          f"fit {fit:.2f} s; {cpu:.2f} s CPU), {res.model._eng.nevals} criterion evaluations, converged {res.converged}, "
          f"singular {res.singular}")
    print("  variances: " + ", ".join(f"{k} {v:.4f}" for k, v in vc.items()) + "  (truth: therapist 1, therapist_slope 0.4, "
          "patient 16, patient_slope 4, residual 4)")
    if not args.quick:
        print(f"  target: < 30 s for 1.3M sessions: {'met' if secs < 30 else 'NOT met'}")
    # baseline on a subsample of therapists (the same rows for both engines)
    keep = sorted(d["therapist"].unique())[: (60 if args.quick else 200)]
    sub = d[d["therapist"].isin(keep)].reset_index(drop=True)
    ours_sub, res_sub = fit_ours(sub)
    name, base_secs, info = baseline(sub)
    print(f"subsample: {len(sub):,} sessions, {sub['patient'].nunique():,} patients, {len(keep)} therapists")
    print(f"  {name}: {base_secs:.2f} s; ours: {ours_sub:.2f} s; ratio {base_secs / ours_sub:.1f}x")
    print(f"  logLik ours {res_sub.loglik:.6f} vs {name} {info.get('loglik', float('nan')):.6f}")
    print(f"  our fit per session row, full vs subsample: {1e6 * secs / len(d):.2f} vs {1e6 * ours_sub / len(sub):.2f} microseconds")


if __name__ == "__main__":
    main()

"""Realistic inputs for the report tests (imported by the other ``test_report_*`` modules).

Two sources, both with an independent truth:

- :func:`simulated_inputs`: a practice dataset simulated with numpy from a Gaussian random-intercept
  model with KNOWN parameters (seeded); the "estimates" are the true values, and the therapist rows
  are the exact best linear unbiased predictions (BLUPs) given those values, written out in closed form:
  u_j = tau2 / (tau2 + sigma2 / n_j) * mean_j(y - X beta), var(u_j | y) = (1 / tau2 + n_j / sigma2)^-1.
- :func:`feedback_inputs`: the R reference data ``therapy_feedback.csv`` with the estimates that lme4
  gave on it (``lme4_reference.json``, model ``ri_REML`` and ``arm_REML``).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from refdata import REFERENCE_DIR

REFERENCE = REFERENCE_DIR
XSS = "<script>alert(1)</script>"
TRUTH = {"b0": 0.5, "b_baseline": 0.55, "b_feedback": -0.9, "tau2": 1.6, "sigma2": 24.0}


def blup_rows(model: str, therapist: np.ndarray, resid_fixed: np.ndarray, tau2: float, sigma2: float,
              z: float = 1.959963984540054) -> pd.DataFrame:
    """therapists.csv rows from the closed-form BLUPs of a random-intercept model (lower = better)."""
    df = pd.DataFrame({"therapist": therapist, "r": resid_fixed})
    g = df.groupby("therapist", sort=True)["r"].agg(["size", "mean"])
    n = g["size"].to_numpy(float)
    shrink = tau2 / (tau2 + sigma2 / n)
    effect = shrink * g["mean"].to_numpy()
    se = np.sqrt(1.0 / (1.0 / tau2 + n / sigma2))
    lo, hi = effect - z * se, effect + z * se
    cls = np.where(hi < 0, "better than average", np.where(lo > 0, "worse than average",
                                                            "not distinguishable from average"))
    return pd.DataFrame({"model": model, "therapist": g.index.astype(str), "caseload": n.astype(int),
                         "raw_mean": g["mean"].to_numpy(), "adjusted_mean": g["mean"].to_numpy(),
                         "effect": effect, "effect_se": se, "ci_low": lo, "ci_high": hi,
                         "classification": cls})


def _outcomes(p: pd.DataFrame) -> pd.DataFrame:
    """PHQ-9 derived outcomes: reliable change 6 points, caseness 10 (as in the IAPT manual)."""
    p["change"] = p["baseline"] - p["end"]
    case = p["baseline"] >= 10
    p["recovered"] = np.where(case, (p["end"] < 10).astype(float), np.nan)
    p["reliable_improvement"] = (p["change"] >= 6).astype(float)
    p["reliable_deterioration"] = (p["change"] <= -6).astype(float)
    p["reliable_recovery"] = np.where(case, ((p["end"] < 10) & (p["change"] >= 6)).astype(float), np.nan)
    return p


def simulate_patients(seed: int = 20240611, n_therapists: int = 60, mean_caseload: float = 28.0,
                      xss: bool = True) -> tuple[pd.DataFrame, dict]:
    """Patients of ``n_therapists`` therapists, unbalanced caseloads (some below 10), two arms."""
    rng = np.random.default_rng(seed)
    ids = [f"T{j:03d}" for j in range(n_therapists)]
    if xss:
        ids[10] = XSS  # a hostile ID: a large caseload and a clear outlier, so that it is listed
    caseload = np.maximum(2, rng.poisson(rng.gamma(3.0, mean_caseload / 3.0, n_therapists)))
    caseload[10] = 40
    caseload[:3] = [3, 5, 9]  # below the minimum caseload of the service report
    u = rng.normal(0, np.sqrt(TRUTH["tau2"]), n_therapists)
    u[10], u[11] = 4.5, -4.5  # two clear outliers for the funnel and caterpillar plots
    t = np.repeat(np.arange(n_therapists), caseload)
    n = len(t)
    arm = rng.integers(0, 2, n)
    baseline = np.clip(np.round(rng.normal(16, 5, n)), 0, 27)
    e = rng.normal(0, np.sqrt(TRUTH["sigma2"]), n)
    end = TRUTH["b0"] + TRUTH["b_baseline"] * baseline + TRUTH["b_feedback"] * arm + u[t] + e
    p = pd.DataFrame({
        "patient": [f"P{i:06d}" for i in range(n)], "therapist": np.array(ids, dtype=object)[t],
        "arm": np.where(arm == 1, "feedback", "control"), "feedback": arm.astype(float),
        "baseline": baseline, "end": end, "n_sessions": rng.integers(2, 20, n).astype(float),
    })
    p = _outcomes(p)
    p["dropout"] = (rng.random(n) < 0.2).astype(float)
    truth = {**TRUTH, "u": dict(zip(ids, u, strict=True)), "e": e}
    return p, truth


def _entry(fixed: dict, fixed_ci: dict | None, fixed_se: dict | None, variances: dict, formula: str,
           outcome: str, n: int, k: int, **extra) -> dict:
    fe = {name: {"estimate": v, "se": (fixed_se or {}).get(name),
                 "ci_low": (fixed_ci or {}).get(name, [None, None])[0],
                 "ci_high": (fixed_ci or {}).get(name, [None, None])[1]} for name, v in fixed.items()}
    return {"type": "random_intercept", "family": "gaussian", "method": "REML", "outcome": outcome,
            "formula": formula, "fixed_effects": fe, "variance_components": variances,
            "n_patients": n, "n_therapists": k, "converged": True, "singular": False, "warnings": [], **extra}


def _provenance(columns: dict, name: str) -> dict:
    return {"data_file": f"data/{name}.csv", "data_sha256": "0" * 63 + "1",
            "config": {"datasets": {name: {"path": f"data/{name}.csv", "layout": "patient", "columns": columns,
                                           "instrument": "PHQ-9"}}, "seed": 20240611},
            "packages": {"therapist-effects": "0.1.0", "numpy": np.__version__, "pandas": pd.__version__},
            "seed": 20240611, "command": "snakemake --cores 2 --configfile config/demo.yaml",
            "created_by": "therapist-effects workflow"}


def simulated_inputs(seed: int = 20240611, xss: bool = True) -> dict:
    """Patients, estimates (the TRUE parameters), therapist rows (exact BLUPs) and rejects."""
    p, truth = simulate_patients(seed, xss=xss)
    fixed = {"(Intercept)": TRUTH["b0"], "phq9_pre": TRUTH["b_baseline"], "feedback": TRUTH["b_feedback"]}
    xb = fixed["(Intercept)"] + fixed["phq9_pre"] * p["baseline"] + fixed["feedback"] * p["feedback"]
    therapists = blup_rows("ri", p["therapist"].to_numpy(), (p["end"] - xb).to_numpy(), TRUTH["tau2"],
                           TRUTH["sigma2"])
    icc = TRUTH["tau2"] / (TRUTH["tau2"] + TRUTH["sigma2"])
    rejects = pd.DataFrame({"row": [5, 17, 230], "patient": ["P9", "P10", "=HYPERLINK(1)"],
                            "column": ["phq9_pre", "phq9_post", "therapist_id"], "value": ["99", "", ""],
                            "reason": ["out of range", "missing outcome", "missing therapist"]})
    cols = {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post",
            "baseline": "phq9_pre", "arm": "feedback"}
    p = p.assign(arm=p["feedback"].astype(int))  # the file's arm column is 0/1
    est = {
        "dataset": "demo", "n_patients": len(p), "n_therapists": p["therapist"].nunique(), "n_clusters": None,
        "rows_read": len(p) + 3, "rows_rejected": 3, "rows_used": len(p),
        "rejected_by_reason": {"out of range": 1, "missing outcome": 1, "missing therapist": 1},
        "layout": "patient", "instrument": "PHQ-9",
        "models": {"ri": _entry(fixed, None, None,
                                {"therapist": {"estimate": TRUTH["tau2"], "ci_low": None, "ci_high": None},
                                 "residual": {"estimate": TRUTH["sigma2"], "ci_low": None, "ci_high": None}},
                                "phq9_post ~ phq9_pre + feedback + (1 | therapist_id)", "phq9_post", len(p),
                                p["therapist"].nunique(),
                                icc={"estimate": icc, "ci_low": None, "ci_high": None, "ci_method": "profile"})},
        "provenance": _provenance(cols, "demo"),
    }
    return {"estimates": est, "patients": p, "therapists": therapists, "rejects": rejects, "truth": truth}


def feedback_inputs() -> dict:
    """therapy_feedback.csv with lme4's estimates (committed in tests/reference)."""
    ref = json.loads((REFERENCE / "lme4_reference.json").read_text())["therapy_feedback"]
    raw = pd.read_csv(REFERENCE / "therapy_feedback.csv", dtype={"patient_id": str, "therapist_id": str})
    p = pd.DataFrame({"patient": raw["patient_id"], "therapist": raw["therapist_id"], "cluster": raw["trial_id"],
                      "arm": raw["feedback"], "feedback": raw["feedback"].astype(float),
                      "baseline": raw["phq9_pre"].astype(float), "end": raw["phq9_post"].astype(float)})
    p = _outcomes(p)
    p["recovered"] = np.where(p["baseline"] >= 10, raw["recovered"].astype(float), np.nan)
    ri, arm = ref["ri_REML"], ref["arm_REML"]
    # lme4: lmer(phq9_post ~ phq9_pre + feedback + (1 | therapist_id), REML = TRUE)
    tau2, sigma2 = ri["variance"]["therapist_id:(Intercept)"], ri["variance"]["Residual"]
    ci_t = ri["variance_ci"]["sd_(Intercept)|therapist_id"]  # profile CI of the SD ...
    ci_s = ri["variance_ci"]["sigma"]  # ... and of the residual, already squared in the JSON
    ri_entry = _entry(ri["fixed"], ri["fixed_ci"], ri["fixed_se"],
                      {"therapist": {"estimate": tau2, "ci_low": ci_t[0] ** 2, "ci_high": ci_t[1] ** 2},
                       "residual": {"estimate": sigma2, "ci_low": ci_s[0], "ci_high": ci_s[1]}},
                      ri["formula"], "phq9_post", ri["n"], raw["therapist_id"].nunique(),
                      icc={"estimate": tau2 / (tau2 + sigma2), "ci_low": None, "ci_high": None,
                           "ci_method": "profile"}, loglik=ri["logLik"])
    # lme4: lmer(phq9_post ~ phq9_pre + feedback + (0 + control | therapist_id) + (0 + feedback | therapist_id))
    v0, v1, s2 = (arm["variance"]["therapist_id:control"], arm["variance"]["therapist_id.1:feedback"],
                  arm["variance"]["Residual"])
    arm_entry = _entry(arm["fixed"], arm["fixed_ci"], arm["fixed_se"],
                       {"therapist[0]": {"estimate": v0}, "therapist[1]": {"estimate": v1},
                        "residual": {"estimate": s2}}, " ".join(arm["formula"]).replace("  ", " "),
                       "phq9_post", arm["n"], raw["therapist_id"].nunique(), loglik=arm["logLik"],
                       icc_by_arm={"0": {"estimate": v0 / (v0 + s2)}, "1": {"estimate": v1 / (v1 + s2)}},
                       icc_ratio={"estimate": (v1 / (v1 + s2)) / (v0 / (v0 + s2))},
                       icc_reduction={"estimate": 1 - (v1 / (v1 + s2)) / (v0 / (v0 + s2))},
                       lrt_equal_variances={"statistic": 2 * (arm["logLik"] - ri["logLik"]), "df": 1,
                                            "p_value": None})
    arm_entry["type"] = "arm_variance"
    fe = ri["fixed"]
    xb = fe["(Intercept)"] + fe["phq9_pre"] * p["baseline"] + fe["feedback"] * p["feedback"]
    therapists = blup_rows("ri", p["therapist"].to_numpy(), (p["end"] - xb).to_numpy(), tau2, sigma2)
    cols = {"patient": "patient_id", "therapist": "therapist_id", "outcome": "phq9_post", "baseline": "phq9_pre",
            "arm": "feedback", "cluster": "trial_id"}
    est = {"dataset": "therapy_feedback", "n_patients": len(p), "n_therapists": raw["therapist_id"].nunique(),
           "n_clusters": raw["trial_id"].nunique(), "rows_read": len(p), "rows_rejected": 0, "rows_used": len(p),
           "rejected_by_reason": {}, "layout": "patient", "instrument": "PHQ-9",
           "models": {"ri": ri_entry, "arm": arm_entry}, "provenance": _provenance(cols, "therapy_feedback")}
    return {"estimates": est, "patients": p, "therapists": therapists, "rejects": None, "ref": ref}


def test_simulated_blups_recover_the_true_therapist_effects():
    """The builder's closed-form BLUPs track the simulated truth (correlation > 0.6 with 60 therapists)."""
    inp = simulated_inputs(seed=11)
    t = inp["therapists"].set_index("therapist")
    u = pd.Series(inp["truth"]["u"])
    assert np.corrcoef(t["effect"], u[t.index])[0, 1] > 0.6
    # shrinkage: every BLUP is smaller in magnitude than its therapist's raw mean residual
    assert (t["effect"].abs() <= t["raw_mean"].abs() + 1e-12).all()

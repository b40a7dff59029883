"""The workflow step of ``growth`` models: fit, contract entry, not-on-track table, recovery curves.

Called by ``workflow/scripts/fit_growth.py`` (rule ``fit_growth``). Inputs are the validated session
rows of ``ingest`` (``validated.parquet``) and the patient table (``patients.parquet``), whose patients
are the ones kept, so the growth model sees the same patients as every other model.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

from ..exceptions import ModelError, TherapistEffectsWarning
from .growth import GrowthModel, GrowthResults
from .recovery import TIME_NAMES, early_flag_validation, growth_frame, not_on_track, poor_outcome, recovery_curves

log = logging.getLogger("therapist_effects")

#: variance components whose profile intervals are computed (the others are estimated from
#: thousands of patients / sessions: their profile intervals are computed too unless the data are large)
PROFILE_ALWAYS = ("therapist", "therapist_slope")
#: above this many patients only PROFILE_ALWAYS and the slope share get profile intervals
LARGE_PATIENTS = 20000


def growth_setup(rows: pd.DataFrame, patients: pd.DataFrame, model: dict, dataset: dict
                 ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The session frame of one growth model and the names it is fitted with."""
    cols = dataset["columns"]
    time = model.get("time") or "log"
    covariates = list(model["covariates"]) if "covariates" in model else list(cols.get("covariates", []))
    has_arm = "arm" in cols and "arm" in patients.columns
    frame = growth_frame(rows, patients, time=time, covariates=covariates, arm=has_arm)
    incomplete = frame[covariates].isna().any(axis=1) if covariates else pd.Series(False, index=frame.index)
    n_excluded = int(frame.loc[incomplete, "patient"].nunique())
    frame = frame.loc[~incomplete].reset_index(drop=True)
    names = {"score": str(cols.get("score", "score")), "time": TIME_NAMES[time], "arm": cols.get("arm") if has_arm else None,
             "covariates": covariates, "therapist": cols["therapist"], "patient": cols["patient"],
             "time_kind": time, "n_excluded": n_excluded}
    return frame, names


def fit_growth_frame(frame: pd.DataFrame, names: dict, *, method: str = "REML", arm_slopes: bool = False,
                     feedback_level=None) -> GrowthResults:
    """Fit the growth model to a session frame from :func:`growth_setup`, fixed effects named after
    the data's columns (score, time variable, covariates, arm)."""
    f = frame.rename(columns={"score": names["score"]})
    if names["arm"]:
        f = f.rename(columns={"arm": names["arm"]})
    return GrowthModel.from_frame(
        f, names["score"], names["time"], names["covariates"], patient="patient", therapist="therapist",
        method=method, arm=names["arm"], feedback_level=feedback_level, arm_slopes=arm_slopes,
    ).fit()


def _est(v, lo=None, hi=None) -> dict:
    return {"estimate": v, "ci_low": lo, "ci_high": hi}


def growth_contract(res: GrowthResults, names: dict, *, level: float, interval: str,
                    arm_res: GrowthResults | None = None) -> dict[str, Any]:
    """The model's entry of ``estimates.json`` (without type/outcome/formula)."""
    z = float(stats.norm.ppf(0.5 + level / 2))
    fixed = {n: {"estimate": float(res.fe_params[n]), "se": float(res.bse[n]),
                 "ci_low": float(res.fe_params[n] - z * res.bse[n]), "ci_high": float(res.fe_params[n] + z * res.bse[n])}
             for n in res.fe_params.index}
    vcs = {}
    large = res.model.n_patients > LARGE_PATIENTS
    for name, v in res.variance_components().items():
        lo = hi = None
        if interval != "none" and (name in PROFILE_ALWAYS or not large):
            lo, hi = res.profile_interval(name, level)
        vcs[name] = _est(v, lo, hi)
    share_lo, share_hi = res.profile_interval("slope_share", level) if interval != "none" else (None, None)
    corr = res.correlations()
    k = len(res.theta) + len(res.beta) + 1
    n = res.model.n_obs
    # information criteria on the ML scale of the fitted criterion, as lme4's AIC()/BIC() of the fit
    aic = -2 * res.loglik + 2 * k
    bic = -2 * res.loglik + math.log(n) * k
    out: dict[str, Any] = {
        "method": res.model.method, "time": names["time_kind"], "time_variable": names["time"],
        "fixed_effects": fixed, "variance_components": vcs,
        "correlations": {"therapist": _est(corr.get("therapist~therapist_slope")),
                         "patient": _est(corr.get("patient~patient_slope"))},
        "slope_share": {**_est(res.slope_share(), share_lo, share_hi), "ci_method": "profile"},
        "loglik": res.loglik, "aic": aic, "bic": bic,
        "converged": res.converged, "singular": res.singular,
        "n_sessions": int(res.model.n_obs), "n_patients": int(res.model.n_patients),
        "n_therapists": int(res.model.n_therapists), "warnings": list(res.warnings),
    }
    if arm_res is not None:
        vc_arm = arm_res.variance_components()
        keys = [k for k in vc_arm if k.startswith("therapist_slope[")]
        arm_vcs = {}
        for key in keys:
            lo, hi = arm_res.profile_interval(key, level) if interval != "none" else (None, None)
            arm_vcs[key] = _est(vc_arm[key], lo, hi)
        control, feedback = vc_arm[keys[0]], vc_arm[keys[1]]
        stat = max(0.0, 2.0 * (arm_res.loglik - res.loglik))
        df = len(arm_res.theta) - len(res.theta)
        out["arm_slopes"] = {
            "variance_components": arm_vcs,
            "ratio": _est(feedback / control if control > 0 else None),
            "lrt": {"statistic": stat, "df": df, "p_value": float(stats.chi2.sf(stat, df)),
                    "against": "one therapist slope variance for both arms"},
            "loglik": arm_res.loglik, "converged": arm_res.converged, "singular": arm_res.singular,
            "warnings": list(arm_res.warnings),
        }
    return out


def growth_formula(names: dict, arm_slopes: bool) -> str:
    t, s = names["time"], names["score"]
    rhs = " + ".join([t, *names["covariates"]] + ([names["arm"], f"{t}:{names['arm']}"] if names["arm"] else []))
    re_t = f"(1 + {t} | {names['therapist']})"
    if arm_slopes:
        re_t += f"; arm-specific: (1 + {t}:factor({names['arm']}) | {names['therapist']})"
    return f"{s} ~ {rhs} + {re_t} + (1 + {t} | {names['therapist']}:{names['patient']})"


def fit_growth_step(
    rows_path: str, patients_path: str, model_id: str, dataset: dict, cfg: dict, out_json: str,
    out_therapists: str, out_track: str, out_curves: str, higher_is_better: bool | None = None,
) -> None:
    """Fit one growth model; write its contract entry, therapist slope table, not-on-track table and
    recovery curves (with the cross-validated early-flag validity in the entry)."""
    from ..io.csvsafe import safe_csv
    from .fitting import _clean, write_json

    rows = pd.read_parquet(rows_path)
    patients = pd.read_parquet(patients_path)
    model = next(m for m in cfg["models"] if m["id"] == model_id)
    if dataset["layout"] != "session":
        raise ModelError(f"model {model_id!r}: a growth model needs the session layout (one row per session)")
    method = model.get("method") or "REML"
    level = cfg["intervals"]["level"]
    band = float(model.get("band_level", 0.8))
    hib = bool(higher_is_better) if higher_is_better is not None else False
    frame, names = growth_setup(rows, patients, model, dataset)
    caught: list[warnings.WarningMessage]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TherapistEffectsWarning)
        res = fit_growth_frame(frame, names, method=method, feedback_level=dataset.get("feedback_level"))
        arm_res = None
        if model.get("arm_slopes"):
            if not names["arm"]:
                raise ModelError(f"model {model_id!r}: arm_slopes needs an arm column")
            arm_res = fit_growth_frame(frame, names, method=method, arm_slopes=True,
                                       feedback_level=dataset.get("feedback_level"))
        # variance components: profile-likelihood intervals whatever intervals.method says (the
        # growth model has no bootstrap yet)
        entry = growth_contract(res, names, level=level, interval="profile", arm_res=arm_res)
        # the not-on-track table and curves: expectations given each patient's intake
        track = not_on_track(res, frame, band_level=band, higher_is_better=hib)
        curves = recovery_curves(track)
        outcome = poor_outcome(patients, higher_is_better=hib)
        validation = early_flag_validation(
            frame, outcome,
            lambda f: fit_growth_frame(f, names, method=method, feedback_level=dataset.get("feedback_level")),
            folds=int(model.get("folds", 5)), seed=int(cfg["seed"]), early_session=int(model.get("early_session", 4)),
            band_level=band, higher_is_better=hib, level=level,
        )
        validation["outcome"] = ("reliable deterioration or no reliable improvement at the last session"
                                 if "reliable_improvement" in patients.columns
                                 else "last score no better than the intake")
    messages = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, TherapistEffectsWarning)]
    own = list(entry.pop("warnings", []))
    for msg in messages:
        if not any(o in msg for o in own):
            own.append(msg)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = {"type": "growth", "family": "gaussian", "engine": "reml", "outcome": names["score"],
           "formula": growth_formula(names, bool(model.get("arm_slopes"))), **entry,
           "band_level": band, "not_on_track": {"sessions_flagged": int(track["flag"].sum()),
                                                 "patients_flagged": int(track.groupby("patient")["flag"].max().sum())},
           "early_flag_validation": validation, "n_excluded": names["n_excluded"], "warnings": own}
    write_json(_clean(out), out_json)
    table = res.therapist_effects(level=level, higher_is_better=higher_is_better)
    table.insert(0, "model", model_id)
    safe_csv(table, out_therapists)
    track_out = track[["patient", "therapist", "session", "score", "expected", "upper", "lower", "flag"]]
    safe_csv(track_out, out_track, float_format="%.6f")
    safe_csv(curves.assign(model=model_id), out_curves, float_format="%.6f")
    v = validation
    log.info("model %s: %s", model_id, res.summary().replace("\n", "; "))
    log.info("model %s: early flag (by session %d, %d-fold cross-validation over held-out patients, %d patients): "
             "sensitivity %s, specificity %s for %s", model_id, v["early_session"], v["folds"], v["n_patients"],
             _pct(v["sensitivity"]), _pct(v["specificity"]), v["outcome"])
    print(f"model {model_id}: early not-on-track flag (by session {v['early_session']}), {v['folds']}-fold "
          f"cross-validation: sensitivity {_pct(v['sensitivity'])}, specificity {_pct(v['specificity'])} "
          f"({v['n_poor']} poor / {v['n_good']} good outcomes)")


def _pct(e: dict) -> str:
    if e.get("estimate") is None:
        return "n/a"
    return f"{100 * e['estimate']:.1f}% ({100 * e['ci_low']:.1f}-{100 * e['ci_high']:.1f}%)"


def not_on_track_copy_step(track_path: str, out_csv: str) -> None:
    """``results/<dataset>/not_on_track.csv``: the contract's columns of the first growth model's table."""
    from ..io.csvsafe import safe_csv

    t = pd.read_csv(track_path, dtype={"patient": str, "therapist": str})
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    safe_csv(t[["patient", "therapist", "session", "score", "expected", "upper", "flag"]], out_csv, float_format="%.6f")

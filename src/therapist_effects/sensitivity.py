"""Sensitivity analyses of the therapist ICC (``sensitivity: true`` in the config).

Every Gaussian random-intercept model (likelihood engine) is refitted under:

``all``
    the main analysis, as reported in ``estimates.json``;
``completers``
    patients who dropped out excluded (``dropout == 1``; only when the dataset has an ending column);
``unadjusted``
    no case-mix adjustment: the baseline score and covariates removed (the arm, a design factor, stays
    when the dataset has one);
``min_caseload_10``
    only therapists with at least 10 patients in the model's data.

Each refit uses the model's method (REML/ML) and interval method (profile or the seeded parametric
bootstrap, as configured). The table has one row per analysis and model: ``analysis``, ``model``,
``icc``, ``icc_ci_low``, ``icc_ci_high``, ``n_patients``, ``n_therapists``.
"""

from __future__ import annotations

import logging
import warnings

import pandas as pd

from .exceptions import ModelError, TherapistEffectsWarning

__all__ = ["ANALYSES", "MIN_CASELOAD", "sensitivity_models", "sensitivity_table"]

log = logging.getLogger("therapist_effects")

ANALYSES = ("all", "completers", "unadjusted", "min_caseload_10")
MIN_CASELOAD = 10
COLUMNS = ["analysis", "model", "icc", "icc_ci_low", "icc_ci_high", "n_patients", "n_therapists"]


def sensitivity_models(models: list[dict]) -> list[dict]:
    """The models the sensitivity analyses refit: Gaussian random intercepts of the likelihood engine."""
    return [m for m in models if m["type"] == "random_intercept" and m.get("family", "gaussian") == "gaussian"
            and m.get("engine", "reml") == "reml"]


def _fit(df: pd.DataFrame, outcome: str, covariates: list[str], therapist: str, model: dict, cfg: dict) -> dict:
    from .models.reml import RandomInterceptModel

    interval = model.get("interval") or cfg["intervals"]["method"]
    method = "bootstrap" if interval == "bootstrap" else "profile"
    res = RandomInterceptModel.from_frame(df, outcome, covariates, therapist=therapist,
                                          method=model.get("method") or "REML").fit()
    lo, hi = res.icc_interval(cfg["intervals"]["level"], method=method,
                              n_boot=cfg["intervals"]["bootstrap_replicates"], seed=cfg["seed"])
    return {"icc": float(res.icc()), "icc_ci_low": float(lo), "icc_ci_high": float(hi),
            "n_patients": int(res.n_obs), "n_therapists": int(res.n_therapists)}


def sensitivity_table(patients: pd.DataFrame, models: list[dict], dataset: dict, cfg: dict) -> pd.DataFrame:
    """One row per (analysis, model); ``patients`` is the canonical patient table.

    ``completers`` is left out when the patient table has no ``dropout`` column (no ending column
    configured), and an analysis whose data cannot be fitted (e.g. fewer than two therapists with 10
    patients) is logged and left out.
    """
    from .models.fitting import model_frame, role_names

    names = role_names(dataset)
    rows = []
    for model in sensitivity_models(models):
        for analysis in ANALYSES:
            pts = patients
            if analysis == "completers":
                if "dropout" not in patients.columns:
                    log.info("sensitivity: no ending column, so no completers analysis")
                    continue
                pts = patients.loc[patients["dropout"] != 1]
            mf = model_frame(pts.reset_index(drop=True), model, dataset)
            df, covariates = mf.df, list(mf.covariates)
            if analysis == "unadjusted":
                covariates = [c for c in covariates if c == names.get("arm")]
            if analysis == "min_caseload_10":
                counts = df[mf.therapist].value_counts()
                df = df.loc[df[mf.therapist].isin(counts.index[counts >= MIN_CASELOAD])].reset_index(drop=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TherapistEffectsWarning)
                    fit = _fit(df, mf.outcome, covariates, mf.therapist, model, cfg)
            except ModelError as exc:
                log.warning("sensitivity: %s / %s not fitted: %s", analysis, model["id"], exc)
                continue
            rows.append({"analysis": analysis, "model": model["id"], **fit})
    return pd.DataFrame(rows, columns=COLUMNS)

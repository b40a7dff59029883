"""Two-stage pooling of therapist ICCs across trials, services or published studies.

Stage 1 (:func:`per_cluster_estimates`): a random-intercept model ``outcome ~ covariates +
(1 | therapist)`` fitted by REML separately in each cluster (trial/service) gives the therapist
ICC, its approximate sampling variance by Donner's large-sample formula and the ICC on the logit
scale. Stage 2 (:func:`pool`): random-effects meta-analysis of logit(ICC) by DerSimonian-Laird,
Paule-Mandel or REML, back-transformed to the ICC scale. :func:`pool_study_table` does stage 2 for
a meta-analyst's own table of published ICCs (no raw data needed).

Donner's large-sample variance of an ICC estimated from k therapists with n patients in all
(Donner A. 1986, "A review of inference procedures for the intraclass correlation coefficient in
the one-way random effects model", Int Stat Rev 54:67-82; the Fisher/Donner formula with the mean
caseload n0 = n / k)::

    var(ICC) = 2 (1 - ICC)^2 (1 + (n0 - 1) ICC)^2 / (n0 (n0 - 1) (k - 1))

On the logit scale (delta method) ``var(logit ICC) = var(ICC) / (ICC (1 - ICC))^2``. An ICC
estimated at 0 (singular fit) is kept: as in the R reference, the ICC is clamped to 1e-4 before
the logit and in the first factor of the delta-method denominator,
``yi = logit(max(ICC, 1e-4))``, ``vi = var(ICC) / (max(ICC, 1e-4) (1 - ICC))^2``; such a study
gets a huge ``vi`` and so almost no weight.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .arm import ArmVarianceModel
from .design import fixed_effects_matrix
from .exceptions import InputError, ModelError, SingularFitWarning, StatisticalWarning
from .reml import RandomInterceptModel

__all__ = [
    "ICC_FLOOR",
    "donner_var_icc",
    "logit_icc",
    "per_cluster_estimates",
    "pool",
    "pool_study_table",
]

ICC_FLOOR = 1e-4


def donner_var_icc(icc, n_patients, n_therapists):
    """Donner's large-sample variance of an ICC (k therapists, n patients, mean caseload n/k)."""
    icc = np.asarray(icc, dtype=float)
    n = np.asarray(n_patients, dtype=float)
    k = np.asarray(n_therapists, dtype=float)
    n0 = n / k
    return 2.0 * (1.0 - icc) ** 2 * (1.0 + (n0 - 1.0) * icc) ** 2 / (n0 * (n0 - 1.0) * (k - 1.0))


def logit_icc(icc, var_icc, floor: float = ICC_FLOOR):
    """(yi, vi): logit of the ICC clamped at ``floor`` and its delta-method variance (as the R reference)."""
    icc = np.asarray(icc, dtype=float)
    p = np.maximum(icc, floor)
    yi = np.log(p / (1.0 - p))
    vi = np.asarray(var_icc, dtype=float) / (p * (1.0 - icc)) ** 2
    return yi, vi


def per_cluster_estimates(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str] = (),
    *,
    therapist: str = "therapist",
    cluster: str = "cluster",
    arm: str | None = None,
    feedback_level=None,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per-cluster (trial/service) therapist ICCs: stage 1 of a two-stage meta-analysis.

    Fits ``outcome ~ covariates + (1 | therapist)`` by REML in each cluster
    (:class:`~therapist_effects.reml.RandomInterceptModel`). Returns one row per cluster:
    ``cluster, n_patients, n_therapists, icc, icc_ci_low, icc_ci_high`` (profile-likelihood
    interval at ``level``), ``var_icc`` (Donner), ``logit_icc,
    var_logit_icc`` (clamped as described in the module docstring) and, when ``arm`` is given, the
    arm-specific ICCs ``icc_control, icc_feedback, icc_ratio`` from
    :class:`~therapist_effects.arm.ArmVarianceModel` (NaN with a warning where a cluster's arm
    model cannot be fitted, e.g. fewer than two therapists in an arm). A cluster whose ICC cannot be
    estimated (e.g. a single therapist) gets NaN estimates, ``estimable`` False and the reason in
    ``not_estimable`` (with a :class:`StatisticalWarning`); the other clusters are fitted as usual.
    """
    for col in (outcome, therapist, cluster, *covariates, *([arm] if arm else [])):
        if col not in df.columns:
            raise ModelError(f"column {col!r} is not in the patient table (columns: {list(df.columns)})")
    rows = []
    for label, d in df.groupby(cluster, sort=True):
        X, _ = fixed_effects_matrix(d, covariates, intercept=True)
        keep = np.linalg.matrix_rank(X) == X.shape[1]
        if not keep:  # e.g. a covariate constant within this cluster: drop aliased columns
            q, r = np.linalg.qr(X)
            X = X[:, np.abs(np.diag(r)) > 1e-10 * np.abs(np.diag(r)).max()]
        try:
            if d[therapist].nunique() < 2:
                raise ModelError("a random-intercept ICC needs at least two therapists")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SingularFitWarning)  # reported in the 'singular' column
                fit = RandomInterceptModel(d[outcome].to_numpy(float), X, d[therapist].to_numpy()).fit()
                icc = fit.icc()
                ci_low, ci_high = fit.icc_interval(level=level, method="profile")
        except ModelError as err:
            # one cluster that cannot be estimated does not stop the others: reported, not pooled
            warnings.warn(f"cluster {label!r}: ICC not estimable ({err})", StatisticalWarning, stacklevel=2)
            row = {"cluster": label, "n_patients": int(len(d)), "n_therapists": int(d[therapist].nunique()),
                   "icc": np.nan, "icc_ci_low": np.nan, "icc_ci_high": np.nan, "var_icc": np.nan,
                   "logit_icc": np.nan, "var_logit_icc": np.nan, "singular": False,
                   "estimable": False, "not_estimable": str(err)}
            if arm is not None:
                row.update(icc_control=np.nan, icc_feedback=np.nan, icc_ratio=np.nan)
            rows.append(row)
            continue
        n, k = fit.n_obs, fit.n_therapists
        var_icc = float(donner_var_icc(icc, n, k))
        yi, vi = logit_icc(icc, var_icc)
        row = {"cluster": label, "n_patients": n, "n_therapists": k, "icc": icc, "icc_ci_low": ci_low,
               "icc_ci_high": ci_high, "var_icc": var_icc, "logit_icc": float(yi), "var_logit_icc": float(vi),
               "singular": bool(fit.singular), "estimable": True, "not_estimable": ""}
        if arm is not None:
            row.update(icc_control=np.nan, icc_feedback=np.nan, icc_ratio=np.nan)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kw = {} if feedback_level is None else {"feedback_level": feedback_level}
                    covs = [c for c in covariates if c != arm]
                    am = ArmVarianceModel.from_frame(d, outcome, covs, therapist=therapist, arm=arm, **kw).fit()
                icc = am.icc_point()
                row.update(icc_control=float(icc[0]), icc_feedback=float(icc[1]), icc_ratio=am.ratio_point())
            except ModelError as err:
                warnings.warn(f"cluster {label!r}: arm-specific ICCs not estimable ({err})", StatisticalWarning,
                              stacklevel=2)
        rows.append(row)
    return pd.DataFrame(rows)


def _tau2_reml(y, v) -> float:
    """REML estimate of the between-study variance (maximises the restricted likelihood, tau2 >= 0)."""

    def nll(t2):
        w = 1.0 / (v + t2)
        mu = np.sum(w * y) / np.sum(w)
        return 0.5 * (np.sum(np.log(v + t2)) + math.log(np.sum(w)) + np.sum(w * (y - mu) ** 2))

    hi = max(10.0 * np.var(y, ddof=1) + 10.0 * np.max(v), 1.0) if len(y) > 1 else 1.0
    res = optimize.minimize_scalar(nll, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-12})
    t2 = float(res.x)
    return 0.0 if nll(0.0) <= nll(t2) else t2


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def pool(yi, vi, method: str = "DL", *, level: float = 0.95, prediction: str = "normal") -> dict:
    """Random-effects pooling of logit ICCs ``yi`` with sampling variances ``vi``.

    ``method``: ``"DL"`` (DerSimonian-Laird) and ``"PM"`` (Paule-Mandel) through statsmodels'
    ``combine_effects``; the DL moment estimate of tau^2 is truncated at 0 as in metafor
    (statsmodels leaves it negative: then the pooled estimate is the fixed-effect one);
    ``"REML"`` maximises the restricted likelihood (metafor's default estimator).

    Returns the pooled logit estimate with ``se``, Wald ``ci_low/ci_high``, ``z``, ``p_value``,
    ``tau2``, ``I2`` (percent, metafor's ``100 tau2 / (tau2 + s2)`` with the typical within-study
    variance ``s2 = (k-1) sum(w) / (sum(w)^2 - sum(w^2))``, ``w = 1/vi``), Cochran's ``Q``, the
    prediction interval ``pi_low/pi_high`` (``estimate -/+ z sqrt(se^2 + tau2)`` as metafor's
    ``predict()``; ``prediction="t"`` uses Higgins et al.'s t with k-2 df) and ``icc``: the same
    back-transformed to the ICC scale (inverse logit; no se there).
    """
    from statsmodels.stats.meta_analysis import combine_effects

    y = np.asarray(yi, dtype=float)
    v = np.asarray(vi, dtype=float)
    if y.shape != v.shape or y.ndim != 1 or len(y) < 2:
        raise ModelError("pool needs at least two studies with one effect and one variance each")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ModelError("pool: effects must be finite and variances finite and positive")
    method = method.upper()
    k = len(y)
    alpha = 1.0 - level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if method in ("DL", "PM"):
            res = combine_effects(y, v, method_re="dl" if method == "DL" else "pm", alpha=alpha)
            tau2 = max(float(res.tau2), 0.0)
            q = float(res.q)
        elif method == "REML":
            tau2 = _tau2_reml(y, v)
            w0 = 1.0 / v
            mu0 = np.sum(w0 * y) / np.sum(w0)
            q = float(np.sum(w0 * (y - mu0) ** 2))
        else:
            raise ModelError(f"pool method must be 'DL', 'PM' or 'REML', got {method!r}")
    w = 1.0 / (v + tau2)
    est = float(np.sum(w * y) / np.sum(w))
    se = float(math.sqrt(1.0 / np.sum(w)))
    zc = stats.norm.ppf(1 - alpha / 2)
    ci = (est - zc * se, est + zc * se)
    w_fe = 1.0 / v
    s2 = (k - 1) * np.sum(w_fe) / (np.sum(w_fe) ** 2 - np.sum(w_fe**2))
    i2 = 100.0 * tau2 / (tau2 + s2)
    if prediction == "t":
        if k < 3:
            raise ModelError("a t-based prediction interval needs at least three studies")
        crit = stats.t.ppf(1 - alpha / 2, k - 2)
    elif prediction == "normal":
        crit = zc
    else:
        raise ModelError(f"prediction must be 'normal' or 't', got {prediction!r}")
    half = crit * math.sqrt(se * se + tau2)
    pi = (est - half, est + half)
    z = est / se
    return {
        "method": method,
        "k": k,
        "estimate": est,
        "se": se,
        "ci_low": float(ci[0]),
        "ci_high": float(ci[1]),
        "z": float(z),
        "p_value": float(2 * stats.norm.sf(abs(z))),
        "tau2": float(tau2),
        "I2": float(i2),
        "Q": q,
        "Q_df": k - 1,
        "Q_p_value": float(stats.chi2.sf(q, k - 1)),
        "pi_low": float(pi[0]),
        "pi_high": float(pi[1]),
        "prediction": prediction,
        "icc": {
            "estimate": float(_expit(est)),
            "ci_low": float(_expit(ci[0])),
            "ci_high": float(_expit(ci[1])),
            "pi_low": float(_expit(pi[0])),
            "pi_high": float(_expit(pi[1])),
        },
    }


def pool_study_table(df: pd.DataFrame, method: str = "DL", *, level: float = 0.95, prediction: str = "normal",
                     source: str = "study table") -> dict:
    """Pool published ICCs from a study-level table (no raw data needed).

    Columns: ``study``, ``icc``, ``n_patients``, ``n_therapists`` and optionally ``var_icc``;
    where ``var_icc`` is absent (or missing in a row) it is computed by Donner's formula (module
    docstring). Returns :func:`pool`'s dict plus ``studies``: the table with ``var_icc``,
    ``logit_icc``, ``var_logit_icc`` and the relative random-effects weight (percent).
    """
    need = ["study", "icc", "n_patients", "n_therapists"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; expected {need} and optionally 'var_icc'")
    t = df.copy()
    for i, row in t.reset_index(drop=True).iterrows():
        icc, n, k = row["icc"], row["n_patients"], row["n_therapists"]
        if not (pd.notna(icc) and 0 <= float(icc) < 1):
            raise InputError(f"{source}: row {i + 1} (study {row['study']!r}), column 'icc': expected a value in [0, 1), got {icc!r}")
        if not (pd.notna(k) and float(k) >= 2 and pd.notna(n) and float(n) > float(k)):
            raise InputError(
                f"{source}: row {i + 1} (study {row['study']!r}): expected n_therapists >= 2 and n_patients > n_therapists"
            )
    donner = donner_var_icc(t["icc"], t["n_patients"], t["n_therapists"])
    if "var_icc" in t.columns:
        t["var_icc"] = t["var_icc"].astype(float).where(t["var_icc"].notna(), donner)
    else:
        t["var_icc"] = donner
    yi, vi = logit_icc(t["icc"], t["var_icc"])
    t["logit_icc"], t["var_logit_icc"] = yi, vi
    out = pool(yi, vi, method, level=level, prediction=prediction)
    w = 1.0 / (vi + out["tau2"])
    t["weight_percent"] = 100.0 * w / w.sum()
    out["studies"] = t.to_dict(orient="records")
    return out

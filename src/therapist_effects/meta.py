"""Pooling therapist ICCs across trials, services or published studies (two-stage and one-stage).

Stage 1 (:func:`per_cluster_estimates`): a random-intercept model ``outcome ~ covariates +
(1 | therapist)`` fitted by REML separately in each cluster (trial/service) gives the therapist
ICC, its profile interval and its large-sample sampling variance (:func:`donner_var_icc`).

Stage 2 (:func:`pool`): random-effects meta-analysis of the ICCs on a pooling scale (``yi``, ``vi``)
with the between-study variance tau^2 estimated by REML (metafor's default), DerSimonian-Laird or
Paule-Mandel, and a Wald (``test="z"``) or Knapp-Hartung (``test="knha"``) interval; all as
``metafor::rma(yi, vi, method, test)`` and ``predict()`` (checked to 1e-6 against metafor 3.8-1,
``tests/reference/metafor.R``). :func:`pool_study_table` does stage 2 for a meta-analyst's own
table of published ICCs (no raw data needed); :func:`leave_one_out` gives the influence table.

Pooling scales (:data:`SCALES`):

* ``fisher_z`` (default): Fisher's z of the ICC, ``yi = atanh(ICC)``, ``vi = var(ICC) / (1 - ICC^2)^2``
  (delta method). Near ICC = 0 it is the identity, so a near-zero or singular trial keeps a variance
  of the size of its neighbours' (Donner's variance at ICC 0 is ``2 / (n0 (n0 - 1) (k - 1))``) and
  its weight. Back-transformed by ``tanh``. Where the variance comes from Donner's formula (raw
  data, or a study table's N and k) it is evaluated at the common ICC (the mean of those studies'
  ICCs, :func:`common_donner_vi`) rather than at each study's own estimate: Donner's variance grows
  with the ICC, so own-estimate weights favour the studies that came out low and bias the pooled ICC
  downwards (by a third at ICC .02 in the simulation test); weights that do not depend on the study's
  own estimate remove that bias.
* ``logit``: ``yi = logit(max(ICC, 1e-4))``, ``vi = var(ICC) / (max(ICC, 1e-4) (1 - ICC))^2`` (the
  earlier default, kept as an option). A near-zero trial's ``vi`` runs to 10^4 and it loses its
  weight, which biases the pooled ICC upwards when true ICCs are small (the simulation test
  ``tests/test_meta_simulation.py`` shows it).

The one-stage alternative (:func:`one_stage_icc`, :func:`one_stage_ratio`) fits the individual
patient data of all trials at once: :class:`~therapist_effects.models.reml.NestedModel` (trial level,
therapists in trials) and :class:`~therapist_effects.models.arm.ArmVarianceModel` with a random trial level.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .models.arm import ArmVarianceModel, arm_labels
from .models.design import fixed_effects_matrix
from .exceptions import InputError, ModelError, SingularFitWarning, StatisticalWarning
from .models.reml import NestedModel, RandomInterceptModel

__all__ = [
    "ICC_FLOOR",
    "METHODS",
    "SCALES",
    "TESTS",
    "STUDY_ROLES",
    "donner_n0",
    "donner_var_icc",
    "common_donner_vi",
    "logit_icc",
    "to_scale",
    "from_scale",
    "var_from_ci",
    "per_cluster_estimates",
    "pool",
    "leave_one_out",
    "study_table",
    "pool_table",
    "pool_study_table",
    "arms_long",
    "pool_arms",
    "one_stage_icc",
    "one_stage_ratio",
    "dataset_meta",
]

ICC_FLOOR = 1e-4
METHODS = ("REML", "DL", "PM")
TESTS = ("z", "knha")
SCALES = ("fisher_z", "logit")
#: roles of a study table's columns (``meta.columns`` maps them to the table's own names)
STUDY_ROLES = ("study", "icc", "ci_low", "ci_high", "var_icc", "n_patients", "n_therapists", "yi", "vi", "arm")


# --------------------------------------------------------------------------------------------
# Stage 1: the ICC's sampling variance and the pooling scales
# --------------------------------------------------------------------------------------------
def donner_n0(caseloads) -> float:
    """Donner's effective caseload of unbalanced data, ``n0 = (N - sum n_i^2 / N) / (k - 1)``.

    ``N = sum n_i`` patients of ``k`` therapists with caseloads ``n_i``; equals ``N / k`` when every
    caseload is the same (Donner 1986, Int Stat Rev 54:67-82, eq. for the unbalanced one-way design).
    """
    n = np.asarray(caseloads, dtype=float)
    n = n[n > 0]
    k, big_n = len(n), n.sum()
    if k < 2:
        raise ModelError("Donner's n0 needs at least two therapists")
    return float((big_n - np.sum(n * n) / big_n) / (k - 1))


def donner_var_icc(icc, n_patients, n_therapists, caseloads=None):
    """Donner's large-sample variance of an ICC from ``k`` therapists and ``N`` patients.

    Donner A. (1986) "A review of inference procedures for the intraclass correlation coefficient
    in the one-way random effects model", International Statistical Review 54:67-82::

        var(ICC) = 2 (1 - ICC)^2 (1 + (n0 - 1) ICC)^2 / (n0 (n0 - 1) (k - 1))

    with the effective caseload ``n0 = (N - sum n_i^2 / N) / (k - 1)`` (:func:`donner_n0`) when the
    therapists' ``caseloads`` are given, else ``n0 = N / k`` (what a published table of ``N`` and
    ``k`` allows; exact for balanced data). With very unequal caseloads ``n0`` is well below ``N / k``
    and the mean-caseload variance understates the sampling variance.
    """
    icc = np.asarray(icc, dtype=float)
    k = np.asarray(n_therapists, dtype=float)
    if caseloads is not None:
        n0 = donner_n0(caseloads)
    else:
        n0 = np.asarray(n_patients, dtype=float) / k
    return 2.0 * (1.0 - icc) ** 2 * (1.0 + (n0 - 1.0) * icc) ** 2 / (n0 * (n0 - 1.0) * (k - 1.0))


def logit_icc(icc, var_icc, floor: float = ICC_FLOOR):
    """(yi, vi): logit of the ICC clamped at ``floor`` and its delta-method variance (as the R reference)."""
    icc = np.asarray(icc, dtype=float)
    p = np.maximum(icc, floor)
    yi = np.log(p / (1.0 - p))
    vi = np.asarray(var_icc, dtype=float) / (p * (1.0 - icc)) ** 2
    return yi, vi


def _check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ModelError(f"pooling scale must be one of {list(SCALES)}, got {scale!r}")
    return scale


def to_scale(icc, var_icc, scale: str = "fisher_z"):
    """(yi, vi): the ICC and its variance on the pooling ``scale`` (delta method; module docstring)."""
    if _check_scale(scale) == "logit":
        return logit_icc(icc, var_icc)
    icc = np.asarray(icc, dtype=float)
    return np.arctanh(icc), np.asarray(var_icc, dtype=float) / (1.0 - icc * icc) ** 2


def from_scale(y, scale: str = "fisher_z"):
    """Back-transform from the pooling scale to the ICC scale (tanh or inverse logit)."""
    y = np.asarray(y, dtype=float)
    if _check_scale(scale) == "logit":
        return 1.0 / (1.0 + np.exp(-y))
    return np.tanh(y)


def _g(x, scale):
    x = np.asarray(x, dtype=float)
    if scale == "logit":
        with np.errstate(divide="ignore"):
            return np.log(x / (1.0 - x))
    return np.arctanh(x)


def var_from_ci(icc, ci_low, ci_high, scale: str = "fisher_z", level: float = 0.95):
    """Sampling variance on the pooling scale back-computed from a published interval of the ICC.

    The interval is taken as symmetric on the pooling scale: ``vi = ((g(hi) - g(lo)) / (2 z))^2``
    with ``g`` the scale's transform and ``z`` the normal quantile of ``level``. On the logit scale
    a lower limit of 0 maps to minus infinity: then the upper half is used,
    ``vi = ((g(hi) - g(icc)) / z)^2``. Returns NaN where neither is finite.
    """
    _check_scale(scale)
    z = stats.norm.ppf(0.5 + level / 2.0)
    lo, hi, mid = _g(ci_low, scale), _g(ci_high, scale), _g(icc, scale)
    full = ((hi - lo) / (2.0 * z)) ** 2
    upper = ((hi - mid) / z) ** 2
    out = np.where(np.isfinite(full) & (full > 0), full, np.where(np.isfinite(upper) & (upper > 0), upper, np.nan))
    return out


def common_donner_vi(t: pd.DataFrame, scale: str = "fisher_z") -> pd.DataFrame:
    """On the ``fisher_z`` scale, re-evaluate the rows whose variance is Donner's (``input ==
    "donner"``, with ``n0`` and ``n_therapists``) at the common ICC, the mean of those rows' ICCs:
    ``vi = donner(mean ICC) / (1 - mean ICC^2)^2``. ``var_icc`` (the study's own Donner variance) is
    kept. Other rows and other scales are returned unchanged (module docstring: why)."""
    if scale != "fisher_z" or "input" not in t.columns or "n0" not in t.columns:
        return t
    rows = (t["input"] == "donner") & np.isfinite(t["n0"].astype(float)) & np.isfinite(t["icc"].astype(float))
    if rows.sum() < 2:
        return t
    t = t.copy()
    rho = float(t.loc[rows, "icc"].astype(float).mean())
    n0 = t.loc[rows, "n0"].astype(float).to_numpy()
    k = t.loc[rows, "n_therapists"].astype(float).to_numpy()
    var = 2.0 * (1.0 - rho) ** 2 * (1.0 + (n0 - 1.0) * rho) ** 2 / (n0 * (n0 - 1.0) * (k - 1.0))
    t.loc[rows, "vi"] = var / (1.0 - rho * rho) ** 2
    t.loc[rows, "icc_common"] = rho
    return t


def _fit_icc(y, X, therapist, level):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularFitWarning)  # reported in the 'singular' column
        fit = RandomInterceptModel(y, X, therapist).fit()
        icc = fit.icc()
        ci_low, ci_high = fit.icc_interval(level=level, method="profile")
    return fit, icc, ci_low, ci_high


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
    scale: str = "fisher_z",
) -> pd.DataFrame:
    """Per-cluster (trial/service) therapist ICCs: stage 1 of a two-stage meta-analysis.

    Fits ``outcome ~ covariates + (1 | therapist)`` by REML in each cluster
    (:class:`~therapist_effects.models.reml.RandomInterceptModel`). Returns one row per cluster:
    ``cluster, n_patients, n_therapists, n0`` (Donner's effective caseload), ``icc, icc_ci_low,
    icc_ci_high`` (profile-likelihood interval at ``level``; a singular trial's interval is passed
    through as the engine gives it), ``var_icc`` (:func:`donner_var_icc` with the unbalanced n0),
    ``yi, vi`` on the pooling ``scale`` (:func:`to_scale`; on ``fisher_z`` ``vi`` is Donner's variance
    at the clusters' mean ICC, :func:`common_donner_vi`), ``logit_icc, var_logit_icc`` and
    ``singular``. When ``arm`` is given, also the arm-specific ICCs ``icc_control, icc_feedback,
    icc_ratio`` from :class:`~therapist_effects.models.arm.ArmVarianceModel` with their Donner variances
    ``var_icc_control, var_icc_feedback`` (each arm's own caseloads) and patient / therapist counts
    per arm (NaN with a warning where a cluster's arm model cannot be fitted, e.g. fewer than two
    therapists in an arm).
    A cluster whose ICC cannot be estimated (e.g. a single therapist) gets NaN estimates,
    ``estimable`` False and the reason in ``not_estimable`` (with a :class:`StatisticalWarning`); the
    other clusters are fitted as usual, and only estimable clusters are pooled.
    """
    _check_scale(scale)
    for col in (outcome, therapist, cluster, *covariates, *([arm] if arm else [])):
        if col not in df.columns:
            raise ModelError(f"column {col!r} is not in the patient table (columns: {list(df.columns)})")
    rows = []
    for label, d in df.groupby(cluster, sort=True):
        X, _ = fixed_effects_matrix(d, covariates, intercept=True)
        if np.linalg.matrix_rank(X) < X.shape[1]:  # e.g. a covariate constant within this cluster
            _, r = np.linalg.qr(X)
            X = X[:, np.abs(np.diag(r)) > 1e-10 * np.abs(np.diag(r)).max()]
        try:
            if d[therapist].nunique() < 2:
                raise ModelError("a random-intercept ICC needs at least two therapists")
            fit, icc, ci_low, ci_high = _fit_icc(d[outcome].to_numpy(float), X, d[therapist].to_numpy(), level)
        except ModelError as err:
            # one cluster that cannot be estimated does not stop the others: reported, not pooled
            warnings.warn(f"cluster {label!r}: ICC not estimable ({err})", StatisticalWarning, stacklevel=2)
            row = {"cluster": label, "n_patients": int(len(d)), "n_therapists": int(d[therapist].nunique()),
                   "n0": np.nan, "icc": np.nan, "icc_ci_low": np.nan, "icc_ci_high": np.nan, "var_icc": np.nan,
                   "scale": scale, "yi": np.nan, "vi": np.nan, "logit_icc": np.nan, "var_logit_icc": np.nan,
                   "singular": False, "input": "donner", "estimable": False, "not_estimable": str(err)}
            if arm is not None:
                row.update(icc_control=np.nan, icc_feedback=np.nan, icc_ratio=np.nan)
            rows.append(row)
            continue
        n, k = fit.n_obs, fit.n_therapists
        caseloads = d.groupby(therapist, sort=False).size().to_numpy()
        var_icc = float(donner_var_icc(icc, n, k, caseloads=caseloads))
        yl, vl = logit_icc(icc, var_icc)
        yi, vi = to_scale(icc, var_icc, scale)
        row = {"cluster": label, "n_patients": n, "n_therapists": k, "n0": donner_n0(caseloads), "icc": icc,
               "icc_ci_low": ci_low, "icc_ci_high": ci_high, "var_icc": var_icc, "scale": scale,
               "yi": float(yi), "vi": float(vi), "logit_icc": float(yl), "var_logit_icc": float(vl),
               "singular": bool(fit.singular), "input": "donner", "estimable": True, "not_estimable": ""}
        if arm is not None:
            row.update(icc_control=np.nan, icc_feedback=np.nan, icc_ratio=np.nan, var_icc_control=np.nan,
                       var_icc_feedback=np.nan, n_patients_control=np.nan, n_patients_feedback=np.nan,
                       n_therapists_control=np.nan, n_therapists_feedback=np.nan)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kw = {} if feedback_level is None else {"feedback_level": feedback_level}
                    # a covariate constant within this cluster carries no information here and would
                    # make the arm model's design rank-deficient (as it is left out of the ICC above)
                    covs = [c for c in covariates if c != arm and d[c].nunique(dropna=False) > 1]
                    am = ArmVarianceModel.from_frame(d, outcome, covs, therapist=therapist, arm=arm, **kw).fit()
                icc_arm = am.icc_point()
                row.update(icc_control=float(icc_arm[0]), icc_feedback=float(icc_arm[1]),
                           icc_ratio=am.ratio_point())
                labels = arm_labels(d[arm].to_numpy())
                for a, name in enumerate(("control", "feedback")):
                    da = d[labels == am.model.arm_levels[a]]
                    loads = da.groupby(therapist, sort=False).size().to_numpy()
                    row[f"n0_{name}"] = donner_n0(loads) if len(loads) >= 2 else np.nan
                    row[f"n_patients_{name}"] = int(loads.sum())
                    row[f"n_therapists_{name}"] = int(len(loads))
                    row[f"var_icc_{name}"] = float(donner_var_icc(icc_arm[a], loads.sum(), len(loads),
                                                                  caseloads=loads))
            except ModelError as err:
                warnings.warn(f"cluster {label!r}: arm-specific ICCs not estimable ({err})", StatisticalWarning,
                              stacklevel=2)
        rows.append(row)
    return common_donner_vi(pd.DataFrame(rows), scale)


# --------------------------------------------------------------------------------------------
# Stage 2: random-effects pooling (metafor's rma for an intercept-only model)
# --------------------------------------------------------------------------------------------
def _wmean(y, w):
    return float(np.sum(w * y) / np.sum(w))


def _tau2_dl(y, v) -> float:
    w = 1.0 / v
    q = float(np.sum(w * (y - _wmean(y, w)) ** 2))
    return max(0.0, (q - (len(y) - 1)) / (np.sum(w) - np.sum(w * w) / np.sum(w)))


def _root_nonneg(f, scale_hint: float) -> float:
    """The root of a decreasing function on [0, inf); 0 when f(0) <= 0."""
    if f(0.0) <= 0.0:
        return 0.0
    hi = max(scale_hint, 1e-8)
    while f(hi) > 0.0:
        hi *= 4.0
        if hi > 1e12:  # pragma: no cover - pathological input
            raise ModelError("tau^2 estimate diverges")
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500))


def _tau2_pm(y, v) -> float:
    """Paule-Mandel: tau2 solves the generalised Q equation ``sum w (y - mu)^2 = k - 1``."""
    k = len(y)

    def f(t2):
        w = 1.0 / (v + t2)
        return float(np.sum(w * (y - _wmean(y, w)) ** 2)) - (k - 1)

    return _root_nonneg(f, float(np.var(y)) + 1e-12)


def _tau2_reml(y, v) -> float:
    """REML: the root of the restricted score ``y'PPy - tr(P)`` (what metafor's Fisher scoring
    converges to), ``P y = w (y - mu)``, ``tr(P) = sum w - sum w^2 / sum w``; 0 when the score is
    negative at 0 (metafor truncates there too)."""

    def score(t2):
        w = 1.0 / (v + t2)
        mu = _wmean(y, w)
        return float(np.sum(w * w * (y - mu) ** 2) - np.sum(w) + np.sum(w * w) / np.sum(w))

    return _root_nonneg(score, float(np.var(y)) + 1e-12)


_TAU2 = {"REML": _tau2_reml, "DL": _tau2_dl, "PM": _tau2_pm}


def _back(x, scale):
    """Back-transform to the ICC (or ratio) scale; an ICC is a variance share, so a Fisher-z limit
    below 0 is reported as 0."""
    if scale is None:
        return None
    if scale == "log":
        return float(np.exp(x))
    return max(float(from_scale(x, scale)), 0.0)


def pool(yi, vi, method: str = "REML", *, test: str = "z", level: float = 0.95, prediction: str = "normal",
         scale: str | None = "fisher_z") -> dict:
    """Random-effects pooling of effects ``yi`` with sampling variances ``vi``, as metafor's
    ``rma(yi, vi, method = method, test = test)`` and ``predict()``.

    ``method``: ``"REML"`` (metafor's default), ``"DL"`` (DerSimonian-Laird) or ``"PM"``
    (Paule-Mandel); every estimate of tau^2 is truncated at 0 as metafor does. ``test``: ``"z"``
    (Wald: normal quantile) or ``"knha"`` (Knapp-Hartung: the variance of the pooled estimate is
    multiplied by ``s^2 = sum w (y - mu)^2 / (k - 1)``, ``w = 1 / (vi + tau2)``, not truncated at 1,
    as metafor's ``test = "knha"``; intervals and the prediction interval use the t distribution
    with k - 1 df).

    Returns the pooled estimate with ``se``, ``ci_low/ci_high``, ``z`` (``t`` for knha), ``p_value``,
    ``tau2``, ``I2`` (percent, metafor's ``100 tau2 / (tau2 + s2)`` with the typical within-study
    variance ``s2 = (k-1) sum(w) / (sum(w)^2 - sum(w^2))``, ``w = 1/vi``), Cochran's ``Q``, the
    prediction interval ``pi_low/pi_high`` (``estimate -/+ crit sqrt(se^2 + tau2)``, crit as the
    test's; ``prediction="t"`` uses Higgins et al.'s t with k-2 df), ``weights`` (percent, metafor's
    ``weights()``) and, for a ``scale`` (``fisher_z``, ``logit``, or ``log`` for ratios), ``icc``: the
    same back-transformed (``ratio`` for ``log``).
    """
    y = np.asarray(yi, dtype=float)
    v = np.asarray(vi, dtype=float)
    if y.shape != v.shape or y.ndim != 1 or len(y) < 2:
        raise ModelError("pool needs at least two studies with one effect and one variance each")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ModelError("pool: effects must be finite and variances finite and positive")
    method = str(method).upper()
    if method not in METHODS:
        raise ModelError(f"pool method must be one of {list(METHODS)}, got {method!r}")
    if test not in TESTS:
        raise ModelError(f"pool test must be one of {list(TESTS)}, got {test!r}")
    if scale is not None and scale != "log":
        _check_scale(scale)
    if not 0.0 < level < 1.0:
        raise ModelError(f"confidence level must be between 0 and 1, got {level}")
    k = len(y)
    alpha = 1.0 - level
    tau2 = _TAU2[method](y, v)
    w_fe = 1.0 / v
    q = float(np.sum(w_fe * (y - _wmean(y, w_fe)) ** 2))
    w = 1.0 / (v + tau2)
    est = _wmean(y, w)
    se = math.sqrt(1.0 / np.sum(w))
    if test == "knha":
        s2w = float(np.sum(w * (y - est) ** 2)) / (k - 1)
        se *= math.sqrt(s2w)
        crit = float(stats.t.ppf(1 - alpha / 2, k - 1))
        # identical effects make s^2 = 0 and the Knapp-Hartung se 0 (as in metafor): no finite statistic
        stat = est / se if se > 0 else math.nan
        p_value = float(2 * stats.t.sf(abs(stat), k - 1)) if se > 0 else math.nan
    else:
        crit = float(stats.norm.ppf(1 - alpha / 2))
        stat = est / se
        p_value = float(2 * stats.norm.sf(abs(stat)))
    ci = (est - crit * se, est + crit * se)
    s2 = (k - 1) * np.sum(w_fe) / (np.sum(w_fe) ** 2 - np.sum(w_fe**2))
    i2 = 100.0 * tau2 / (tau2 + s2)
    if prediction == "t":
        if k < 3:
            raise ModelError("a t-based prediction interval needs at least three studies")
        pcrit = float(stats.t.ppf(1 - alpha / 2, k - 2))
    elif prediction == "normal":
        pcrit = crit
    else:
        raise ModelError(f"prediction must be 'normal' or 't', got {prediction!r}")
    half = pcrit * math.sqrt(se * se + tau2)
    pi = (est - half, est + half)
    out = {
        "method": method,
        "test": test,
        "scale": scale,
        "k": k,
        "estimate": est,
        "se": float(se),
        "ci_low": float(ci[0]),
        "ci_high": float(ci[1]),
        "z": float(stat),
        "p_value": p_value,
        "tau2": float(tau2),
        "I2": float(i2),
        "Q": q,
        "Q_df": k - 1,
        "Q_p_value": float(stats.chi2.sf(q, k - 1)),
        "pi_low": float(pi[0]),
        "pi_high": float(pi[1]),
        "prediction": prediction,
        "weights": [float(x) for x in 100.0 * w / np.sum(w)],
    }
    if scale is not None:
        out["ratio" if scale == "log" else "icc"] = {
            "estimate": _back(est, scale), "ci_low": _back(ci[0], scale), "ci_high": _back(ci[1], scale),
            "pi_low": _back(pi[0], scale), "pi_high": _back(pi[1], scale),
        }
    return out


def leave_one_out(yi, vi, method: str = "REML", *, test: str = "z", level: float = 0.95,
                  scale: str | None = "fisher_z", labels: Sequence | None = None) -> pd.DataFrame:
    """Influence table, as metafor's ``leave1out()``: the pooled result with each study left out.

    One row per study: ``study`` (``labels`` or 1..k), ``estimate, se, ci_low, ci_high, tau2, I2``
    on the pooling scale and, for a ``scale``, ``icc`` / ``icc_ci_low`` / ``icc_ci_high`` (or
    ``ratio...`` for ``log``) back-transformed. Needs at least three studies.
    """
    y = np.asarray(yi, dtype=float)
    v = np.asarray(vi, dtype=float)
    if len(y) < 3:
        raise ModelError("a leave-one-out table needs at least three studies")
    labels = list(labels) if labels is not None else list(range(1, len(y) + 1))
    rows = []
    name = "ratio" if scale == "log" else "icc"
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        r = pool(y[keep], v[keep], method, test=test, level=level, scale=scale)
        row = {"study": labels[i], **{c: r[c] for c in ("estimate", "se", "ci_low", "ci_high", "tau2", "I2")}}
        if scale is not None:
            row.update({name: r[name]["estimate"], f"{name}_ci_low": r[name]["ci_low"],
                        f"{name}_ci_high": r[name]["ci_high"]})
        rows.append(row)
    return common_donner_vi(pd.DataFrame(rows), scale)


# --------------------------------------------------------------------------------------------
# Study tables
# --------------------------------------------------------------------------------------------
def _dicc_dy(icc, scale):
    """d ICC / d y on the pooling scale (to carry a variance from the pooling scale back to the ICC)."""
    icc = np.asarray(icc, dtype=float)
    if scale == "logit":
        p = np.maximum(icc, ICC_FLOOR)
        return p * (1.0 - icc)
    return 1.0 - icc * icc


def _is_blank(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or (isinstance(x, str) and not x.strip()) \
        or (not isinstance(x, str) and pd.isna(x))


def study_table(df: pd.DataFrame, *, columns: Mapping[str, str] | None = None, scale: str = "fisher_z",
                level: float = 0.95, source: str = "study table") -> pd.DataFrame:
    """A study table in canonical form: ``study, icc, var_icc, yi, vi, ci_low, ci_high, n_patients,
    n_therapists, arm, input`` (one row per study, or per study and arm).

    ``columns`` maps roles (:data:`STUDY_ROLES`) to the table's own column names (``meta.columns``);
    unmapped roles are looked up under their own name. Each row gives one of

    * ``yi`` and ``vi``: already on the pooling scale (``input = "yi/vi"``);
    * ``icc`` and ``var_icc`` (``"var_icc"``);
    * ``icc`` with ``ci_low`` and ``ci_high``: ``vi`` back-computed on the pooling scale
      (:func:`var_from_ci`, ``input = "ci"``);
    * ``icc`` with ``n_patients`` and ``n_therapists``: Donner's variance with n0 = N / k
      (``"donner"``; on ``fisher_z`` ``vi`` is evaluated at the mean ICC of these rows,
      :func:`common_donner_vi`).

    Errors are one line naming the source, row (1-based, as in the file) and column.
    """
    _check_scale(scale)
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(STUDY_ROLES))
    if unknown:
        raise InputError(f"{source}: meta.columns: unknown role(s) {unknown}; roles are {list(STUDY_ROLES)}")
    for role, col in columns.items():
        if col not in df.columns:
            raise InputError(f"{source}: meta.columns.{role}: column {col!r} is not in the table "
                             f"(columns: {list(df.columns)})")
    name = {role: columns.get(role, role) for role in STUDY_ROLES}
    if name["study"] not in df.columns:
        raise InputError(f"{source}: missing column {name['study']!r} (the study label; map it with meta.columns.study)")
    if name["icc"] not in df.columns and not (name["yi"] in df.columns and name["vi"] in df.columns):
        raise InputError(f"{source}: missing column(s): expected {name['icc']!r} (with a variance, an interval or "
                         f"{name['n_patients']!r} and {name['n_therapists']!r}), or {name['yi']!r} and {name['vi']!r}")

    def col(role, numeric=True):
        c = name[role]
        if c not in df.columns:
            return pd.Series([np.nan] * len(df), index=df.index)
        return pd.to_numeric(df[c], errors="coerce") if numeric else df[c]

    t = pd.DataFrame({"study": df[name["study"]].astype(str).to_numpy(), "n0": np.nan})
    for role in ("icc", "var_icc", "yi", "vi", "ci_low", "ci_high", "n_patients", "n_therapists"):
        t[role] = col(role).to_numpy(dtype=float)
    t["arm"] = [None if _is_blank(a) else str(a) for a in col("arm", numeric=False)]
    for role in ("icc", "var_icc", "yi", "vi", "ci_low", "ci_high", "n_patients", "n_therapists"):
        raw = df[name[role]] if name[role] in df.columns else None
        if raw is None:
            continue
        bad = raw.notna() & ~raw.astype(str).str.strip().eq("") & pd.to_numeric(raw, errors="coerce").isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{source}: row {i + 1} (study {t.at[i, 'study']!r}), column {name[role]!r}: "
                             f"expected a number, got {raw.iloc[i]!r}")
    inputs = []
    for i in range(len(t)):
        r = t.iloc[i]
        where = f"{source}: row {i + 1} (study {r['study']!r})"
        if np.isfinite(r["yi"]) and np.isfinite(r["vi"]):
            if not r["vi"] > 0:
                raise InputError(f"{where}, column {name['vi']!r}: expected a positive variance, got {r['vi']!r}")
            icc = float(from_scale(r["yi"], scale))
            t.at[i, "icc"] = icc if not np.isfinite(r["icc"]) else r["icc"]
            t.at[i, "var_icc"] = r["vi"] * float(_dicc_dy(t.at[i, "icc"], scale)) ** 2
            inputs.append("yi/vi")
            continue
        if not (np.isfinite(r["icc"]) and 0.0 <= r["icc"] < 1.0):
            raise InputError(f"{where}, column {name['icc']!r}: expected a value in [0, 1), got {df[name['icc']].iloc[i]}"
                             if name["icc"] in df.columns else f"{where}: expected {name['icc']!r} or {name['yi']!r}/{name['vi']!r}")
        if np.isfinite(r["var_icc"]):
            if not r["var_icc"] > 0:
                raise InputError(f"{where}, column {name['var_icc']!r}: expected a positive variance")
            inputs.append("var_icc")
        elif np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"]):
            if not (0.0 <= r["ci_low"] <= r["icc"] <= r["ci_high"] < 1.0 and r["ci_high"] > r["ci_low"]):
                raise InputError(f"{where}, columns {name['ci_low']!r}/{name['ci_high']!r}: expected "
                                 f"0 <= ci_low <= icc <= ci_high < 1, got [{r['ci_low']}, {r['ci_high']}]")
            vi = float(var_from_ci(r["icc"], r["ci_low"], r["ci_high"], scale, level))
            if not np.isfinite(vi):
                raise InputError(f"{where}, columns {name['ci_low']!r}/{name['ci_high']!r}: the interval gives no "
                                 f"variance on the {scale} scale")
            t.at[i, "yi"] = float(to_scale(r["icc"], 0.0, scale)[0])
            t.at[i, "vi"] = vi
            t.at[i, "var_icc"] = vi * float(_dicc_dy(r["icc"], scale)) ** 2
            inputs.append("ci")
            continue
        elif np.isfinite(r["n_patients"]) and np.isfinite(r["n_therapists"]):
            if not (r["n_therapists"] >= 2 and r["n_patients"] > r["n_therapists"]):
                raise InputError(f"{where}: expected n_therapists >= 2 and n_patients > n_therapists "
                                 f"(columns {name['n_therapists']!r}, {name['n_patients']!r})")
            t.at[i, "var_icc"] = float(donner_var_icc(r["icc"], r["n_patients"], r["n_therapists"]))
            t.at[i, "n0"] = r["n_patients"] / r["n_therapists"]
            inputs.append("donner")
        else:
            raise InputError(f"{where}: no variance: give {name['var_icc']!r}, an interval ({name['ci_low']!r}, "
                             f"{name['ci_high']!r}), {name['n_patients']!r} and {name['n_therapists']!r}, "
                             f"or {name['yi']!r} and {name['vi']!r}")
        yi, vi = to_scale(t.at[i, "icc"], t.at[i, "var_icc"], scale)
        t.at[i, "yi"], t.at[i, "vi"] = float(yi), float(vi)
    t["input"] = inputs
    t["scale"] = scale
    t = common_donner_vi(t, scale)
    z = stats.norm.ppf(0.5 + level / 2.0)
    half = z * np.sqrt(t["vi"])
    no_ci = ~(np.isfinite(t["ci_low"]) & np.isfinite(t["ci_high"]))
    t.loc[no_ci, "ci_low"] = np.maximum(from_scale(t.loc[no_ci, "yi"] - half[no_ci], scale), 0.0)
    t.loc[no_ci, "ci_high"] = from_scale(t.loc[no_ci, "yi"] + half[no_ci], scale)
    return t


def _attach(t: pd.DataFrame, out: dict, method, test, level, scale) -> dict:
    t = t.copy()
    t["weight_percent"] = out["weights"]
    out["studies"] = t.to_dict(orient="records")
    if len(t) >= 3:
        out["leave_one_out"] = leave_one_out(t["yi"], t["vi"], method, test=test, level=level, scale=scale,
                                             labels=t["study"]).to_dict(orient="records")
    return out


def pool_table(t: pd.DataFrame, method: str = "REML", *, test: str = "z", level: float = 0.95,
               prediction: str = "normal", scale: str = "fisher_z") -> dict:
    """Pool a canonical study table (:func:`study_table`, or :func:`per_cluster_estimates` rows with
    ``study, yi, vi``): :func:`pool`'s dict plus ``studies`` (with ``weight_percent``) and
    ``leave_one_out`` (three studies or more)."""
    t = common_donner_vi(t, scale)
    out = pool(t["yi"].to_numpy(float), t["vi"].to_numpy(float), method, test=test, level=level,
               prediction=prediction, scale=scale)
    return _attach(t, out, method, test, level, scale)


def pool_study_table(df: pd.DataFrame, method: str = "REML", *, test: str = "z", level: float = 0.95,
                     prediction: str = "normal", scale: str = "fisher_z", columns: Mapping[str, str] | None = None,
                     source: str = "study table", feedback_level=None) -> dict:
    """Pool published ICCs from a study-level table (no raw data needed).

    The table is read by :func:`study_table` (``columns``: the ``meta.columns`` role mapping). Rows
    with an ``arm`` are pooled per arm (:func:`pool_arms`, under ``arms``); the overall pooled ICC
    uses the rows without an arm, or every row when all rows carry one. Returns :func:`pool`'s dict
    plus ``studies`` (the canonical table with ``weight_percent``) and ``leave_one_out``.
    """
    t = study_table(df, columns=columns, scale=scale, level=level, source=source)
    has_arm = t["arm"].notna()
    overall = t[~has_arm] if (~has_arm).any() else t
    if len(overall) < 2:
        raise InputError(f"{source}: at least two studies are needed to pool, found {len(overall)}")
    out = pool_table(overall.reset_index(drop=True), method, test=test, level=level, prediction=prediction,
                     scale=scale)
    if has_arm.any():
        out["arms"] = pool_arms(t[has_arm].reset_index(drop=True), method, test=test, level=level, scale=scale,
                                feedback_level=feedback_level)
    return out


def _feedback_level(levels: Sequence[str]) -> str:
    """The feedback arm among two labels: ``1`` for 0/1 data, else the second label in sorted order
    (as ``datasets.<name>.feedback_level``'s default)."""
    levels = sorted(levels)
    return "1" if set(levels) == {"0", "1"} else levels[1]


def arms_long(per_cluster: pd.DataFrame, scale: str = "fisher_z") -> pd.DataFrame:
    """The arm-specific ICCs of :func:`per_cluster_estimates` as a long study table (one row per
    cluster and arm: ``study, arm, icc, var_icc, yi, vi, n_patients, n_therapists``)."""
    rows = []
    for _, r in per_cluster.iterrows():
        for a in ("control", "feedback"):
            icc, var = r.get(f"icc_{a}", np.nan), r.get(f"var_icc_{a}", np.nan)
            if not (np.isfinite(icc) and np.isfinite(var) and var > 0):
                continue
            yi, vi = to_scale(icc, var, scale)
            rows.append({"study": str(r["study"] if "study" in r else r["cluster"]), "arm": a, "icc": icc,
                         "var_icc": var, "yi": float(yi), "vi": float(vi), "input": "donner",
                         "n0": r.get(f"n0_{a}", np.nan),
                         "n_patients": r.get(f"n_patients_{a}", np.nan), "n_therapists": r.get(f"n_therapists_{a}", np.nan)})
    return pd.DataFrame(rows, columns=["study", "arm", "icc", "var_icc", "yi", "vi", "input", "n0", "n_patients",
                                       "n_therapists"])


def pool_arms(t: pd.DataFrame, method: str = "REML", *, test: str = "z", level: float = 0.95,
              scale: str = "fisher_z", feedback_level=None) -> dict:
    """The feedback meta-analysis, two-stage: a pooled ICC per arm and the pooled ICC ratio.

    ``t``: a long table (``study, arm, icc, var_icc, yi, vi``; :func:`study_table` rows with an arm,
    or :func:`arms_long`). Returns ``{"levels": {"control": ..., "feedback": ...}, "control": pool,
    "feedback": pool, "ratio": pool, "reduction": {...}}``. The ratio is pooled on the log scale over
    the studies with both arms: ``yi = log(ICC_f / ICC_c)``, ``vi = var_f / ICC_f^2 + var_c / ICC_c^2``
    (delta method, arms independent); studies with an arm ICC of 0 have no log ratio and are left
    out with a :class:`StatisticalWarning`. ``reduction`` is ``1 - ratio`` with the interval reversed.
    ``feedback_level``: the arm label of the feedback condition (default: ``feedback`` when the labels
    are ``control`` / ``feedback``, ``1`` for 0/1, else the second label in sorted order).
    """
    levels = sorted(set(t["arm"].astype(str)))
    if len(levels) != 2:
        raise InputError(f"study table: the arm column must have two levels (control, feedback), found {levels}")
    if feedback_level is not None:
        fb = str(feedback_level)
        if fb not in levels:
            raise InputError(f"meta.feedback_level: {fb!r} is not a level of the arm column ({levels})")
    else:
        fb = "feedback" if set(levels) == {"control", "feedback"} else _feedback_level(levels)
    ctrl = [lv for lv in levels if lv != fb][0]
    out: dict = {"levels": {"control": ctrl, "feedback": fb}}
    for role, lv in (("control", ctrl), ("feedback", fb)):
        sub = t[t["arm"].astype(str) == lv].reset_index(drop=True)
        if len(sub) >= 2:
            out[role] = pool_table(sub, method, test=test, level=level, scale=scale)
    c = t[t["arm"].astype(str) == ctrl].set_index("study")
    f = t[t["arm"].astype(str) == fb].set_index("study")
    both = [s for s in c.index if s in f.index]
    ok = [s for s in both if c.at[s, "icc"] > 0 and f.at[s, "icc"] > 0]
    dropped = sorted(set(both) - set(ok))
    if dropped:
        warnings.warn(f"ICC ratio: studies {dropped} have an arm ICC of 0 (singular) and no log ratio; "
                      "left out of the two-stage ratio (the one-stage arm model keeps them)", StatisticalWarning,
                      stacklevel=2)
    if len(ok) >= 2:
        ic, iff = c.loc[ok, "icc"].to_numpy(float), f.loc[ok, "icc"].to_numpy(float)
        vc, vf = c.loc[ok, "var_icc"].to_numpy(float), f.loc[ok, "var_icc"].to_numpy(float)
        rt = pd.DataFrame({"study": ok, "icc_control": ic, "icc_feedback": iff, "icc_ratio": iff / ic,
                           "yi": np.log(iff / ic), "vi": vf / iff**2 + vc / ic**2})
        z = stats.norm.ppf(0.5 + level / 2.0)
        rt["ci_low"] = np.exp(rt["yi"] - z * np.sqrt(rt["vi"]))
        rt["ci_high"] = np.exp(rt["yi"] + z * np.sqrt(rt["vi"]))
        r = pool_table(rt, method, test=test, level=level, scale="log")
        r["left_out"] = dropped
        out["ratio"] = r
        out["reduction"] = {"estimate": 1.0 - r["ratio"]["estimate"], "ci_low": 1.0 - r["ratio"]["ci_high"],
                            "ci_high": 1.0 - r["ratio"]["ci_low"]}
    return out


# --------------------------------------------------------------------------------------------
# One stage: all trials' patients in one model with a trial level
# --------------------------------------------------------------------------------------------
def one_stage_icc(df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *, therapist: str = "therapist",
                  cluster: str = "cluster", level: float = 0.95) -> dict:
    """One-stage IPD pooled therapist ICC: :class:`~therapist_effects.models.reml.NestedModel`
    ``outcome ~ covariates + (1 | cluster) + (1 | cluster:therapist)`` by REML, its ICC
    ``s2_t / (s2_c + s2_t + s2)`` with the profile interval, and the flags (singular fits are
    reported, not hidden)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = NestedModel.from_frame(df, outcome, list(covariates), therapist=therapist, cluster=cluster).fit()
        lo, hi = fit.icc_interval(level=level, method="profile")
    return {"model": "nested", "estimate": float(fit.icc()), "ci_low": float(lo), "ci_high": float(hi),
            "tau2_cluster": float(fit.vcomp["cluster"]), "singular": bool(fit.singular),
            "converged": bool(fit.converged), "n_patients": int(fit.n_obs), "n_clusters": int(fit.n_clusters),
            "warnings": sorted({str(w.message) for w in caught})}


def one_stage_ratio(df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *, therapist: str = "therapist",
                    arm: str = "arm", cluster: str = "cluster", feedback_level=1, level: float = 0.95) -> dict:
    """One-stage IPD feedback meta-analysis: :class:`~therapist_effects.models.arm.ArmVarianceModel` with a
    random trial level (``cluster_random=True``): the ICC per arm, their ratio (feedback / control)
    and the reduction ``1 - ratio``, with profile intervals."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covs = [c for c in covariates if c != arm]
        fit = ArmVarianceModel.from_frame(df, outcome, covs, therapist=therapist, arm=arm,
                                          feedback_level=feedback_level, cluster=cluster, cluster_random=True).fit()
        by_arm = fit.icc_by_arm(level=level)
        ratio = fit.icc_ratio(level=level)
    icc = {str(r["role"]): {"estimate": float(r["estimate"]), "ci_low": float(r["ci_low"]),
                            "ci_high": float(r["ci_high"])} for _, r in by_arm.iterrows()}
    return {"model": "arm_variance (random trial level)", "icc_by_arm": icc,
            "ratio": {k: float(ratio[k]) for k in ("estimate", "ci_low", "ci_high")},
            "reduction": {"estimate": 1.0 - float(ratio["estimate"]), "ci_low": 1.0 - float(ratio["ci_high"]),
                          "ci_high": 1.0 - float(ratio["ci_low"])},
            "singular": bool(fit.singular), "converged": bool(fit.converged),
            "warnings": sorted({str(w.message) for w in caught})}


# --------------------------------------------------------------------------------------------
# What the workflow runs (pipeline.per_cluster_step, pipeline.meta_report_step)
# --------------------------------------------------------------------------------------------
def _opts(meta_cfg: Mapping | None) -> dict:
    m = dict(meta_cfg or {})
    return {"method": m.get("method") or "REML", "test": m.get("test") or "z", "scale": m.get("scale") or "fisher_z"}


def dataset_meta(df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *, therapist: str = "therapist",
                 cluster: str = "cluster", arm: str | None = None, feedback_level=None,
                 meta_cfg: Mapping | None = None, level: float = 0.95) -> tuple[pd.DataFrame, dict]:
    """Two-stage and one-stage pooling of one dataset's clusters (``results/<dataset>/meta.json``).

    Returns the per-cluster table (:func:`per_cluster_estimates`) and ``{"method", "test", "scale",
    "level", "n_clusters", "pooled", "leave_one_out", "one_stage", "arms", "one_stage_arms"}``:
    ``pooled`` is :func:`pool` of the clusters' ICCs; ``one_stage`` :func:`one_stage_icc` (the nested
    model on all patients); with an arm column, ``arms`` is :func:`pool_arms` of the clusters'
    arm-specific ICCs and ``one_stage_arms`` :func:`one_stage_ratio` (three clusters or more). A
    one-stage model that cannot be fitted is reported as ``{"error": message}``.
    """
    o = _opts(meta_cfg)
    table = per_cluster_estimates(df, outcome, covariates, therapist=therapist, cluster=cluster, arm=arm,
                                  feedback_level=feedback_level, level=level, scale=o["scale"])
    t = table.assign(study=table["cluster"].astype(str))
    t = t[t["estimable"]].reset_index(drop=True)  # clusters whose ICC could not be estimated are not pooled
    pooled = pool_table(t, o["method"], test=o["test"], level=level, scale=o["scale"])
    out = {**o, "level": level, "n_clusters": int(len(table)), "n_clusters_pooled": int(len(t)), "pooled": {k: v for k, v in pooled.items()
                                                                            if k not in ("studies", "leave_one_out")},
           "leave_one_out": pooled.get("leave_one_out", [])}
    try:
        out["one_stage"] = one_stage_icc(df, outcome, covariates, therapist=therapist, cluster=cluster, level=level)
    except ModelError as err:
        out["one_stage"] = {"error": str(err)}
    out["arms"] = None
    out["one_stage_arms"] = None
    if arm is not None:
        long = arms_long(t, o["scale"])
        if len(long):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", StatisticalWarning)
                out["arms"] = _strip(pool_arms(long, o["method"], test=o["test"], level=level, scale=o["scale"]))
            out["arms"]["warnings"] = sorted({str(w.message) for w in caught})
        try:
            out["one_stage_arms"] = one_stage_ratio(df, outcome, covariates, therapist=therapist, arm=arm,
                                                    cluster=cluster, feedback_level=1 if feedback_level is None
                                                    else feedback_level, level=level)
        except ModelError as err:
            out["one_stage_arms"] = {"error": str(err)}
    return table, out


def _strip(arms: dict) -> dict:
    """pool_arms' result without the per-study lists of the per-arm pools (kept for the ratio)."""
    out = dict(arms)
    for role in ("control", "feedback"):
        if role in out:
            out[role] = {k: v for k, v in out[role].items() if k not in ("studies", "leave_one_out")}
    return out

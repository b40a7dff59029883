"""Arm-specific therapist effects: does routine progress feedback narrow the gap between therapists?

The model (lme4: ``y ~ x + feedback + (0 + control | therapist) + (0 + feedback | therapist)`` with
``control = 1 - feedback``; glmmTMB: ``diag(0 + factor(feedback) | therapist)``) gives each therapist
*t* a separate effect in each arm *a* (control, feedback)::

    y_i = x_i' b + u_{t(i), a(i)} + e_i,    u_{t,a} ~ N(0, s2_a),    e_i ~ N(0, s2 * r_a)

with ``r_a = 1`` unless ``arm_residual=True`` (arm-specific residual variances). By default the two
arm effects of a therapist are independent; ``correlated=True`` estimates their covariance for
therapists who treat patients in both arms (a 2 x 2 covariance per therapist, which is the same model
as a random feedback slope across therapists, see :mod:`therapist_effects.slopes`).

With ``cluster_random=True`` a random service/trial intercept is added (one-stage IPD analysis of
several trials: ``(1 | cluster) + (0 + control | cluster:therapist) + (0 + feedback |
cluster:therapist)``); its criterion is again exact from the same sums, aggregated per cluster.

The therapist ICC in arm *a* is the therapist share of the outcome variance of a patient in that arm,
``ICC_a = s2_a / (s2_a + s2 r_a)`` (plus the cluster variance in the denominator when there is a
random cluster level). "Feedback narrows the gap" means ``ICC_feedback < ICC_control``;
the model reports the ratio ``ICC_feedback / ICC_control`` and the reduction ``1 - ratio``
(e.g. the 6-trial meta-analysis: ICC .011 overall, .009 with feedback, an 18.2% reduction).

Estimation is exact REML (or ML) computed from per-(therapist, arm) sufficient statistics: with
``W = [X y]`` the criterion needs only the cell counts, the cell sums ``W'1`` and the per-arm cross
products ``W'W``, so one evaluation costs O(therapists * p^2) whatever the number of patients. The
residual scale and the fixed effects are profiled out analytically; the optimiser works on the
relative standard deviations (lme4's theta), with an analytic gradient for the common case.

Intervals. lme4 profiles the *ML* deviance even for a REML fit (``devfun2()`` calls
``refitML()``), which is why the reference's exam ``null_REML`` and ``null_ML`` intervals coincide;
all profiles here do the same by default (``deviance="ML"``; ``"REML"`` profiles the restricted
likelihood). For the variance components ``method="profile"`` reproduces lme4's ``confint``
step for step, including its spline interpolation of the profile; ``"profile_exact"`` solves for
the likelihood-ratio limits themselves (the two differ only where the profile flattens towards a
variance of zero, where lme4's spline is inaccurate). ICCs, the ICC ratio/reduction and the
correlation get exact profile limits; every quantity can also get seeded parametric-bootstrap
percentiles (``method="bootstrap"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .classify import classify_effects
from .design import fixed_effects_matrix, group_codes
from .engine.gaussian import BlockEngine, lambda_to_theta, psd_cholesky
from .engine.inference import DEFAULT_N_BOOT
from .engine.results import ICC, ModelResults, per_arm_icc
from .exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning
from .progress import track

__all__ = ["ArmVarianceModel", "ArmVarianceResults", "arm_labels"]

_LOG2PI = math.log(2.0 * math.pi)
_SINGULAR_TOL = 1e-4  # lme4's isSingular() tolerance on the relative standard deviations (theta)


def _label(value) -> str:
    """Arm level as a string: integer-valued numbers lose their ``.0`` (1.0 -> "1")."""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    return str(value)


def arm_labels(values) -> np.ndarray:
    """Arm levels of ``values`` as strings (``1``, ``1.0`` and ``"1"`` all become ``"1"``)."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(values, dtype=object)), use_na_sentinel=False)
    labels = np.array([_label(v) for v in uniques], dtype=object)
    return labels[codes]


# ----------------------------------------------------------------------------------------------
# the criterion
# ----------------------------------------------------------------------------------------------


class _Engine:
    """The arm model's view of the block engine :class:`therapist_effects.engine.gaussian.BlockEngine`
    (``Z`` = arm indicators, strata = arms, optional cluster level): the criterion at the relative
    therapist covariance ``G``, residual ratios ``r`` and relative cluster variance ``gc``.

    ``V = sigma2 * H`` with ``H = R + Z G Z'``: ``G`` (K x K) is the therapist covariance relative to
    ``sigma2`` (the residual variance of the first arm) and ``R = diag(r_arm(i))``. Also keeps the
    per-(therapist, arm) counts ``n`` and sums ``S`` of ``[X y]`` and the per-arm cross-products ``A``
    (start values, therapist effects). ``diagonal``: uncorrelated arm effects (theta = relative SDs).
    """

    def __init__(self, y, X, tcode, acode, n_therapists, n_arms, tclust=None, diagonal=False):
        self.N, self.p = X.shape
        # cluster (trial/service) of each therapist, for a random cluster level; None: no such level
        self.tclust = None if tclust is None else np.asarray(tclust, dtype=np.int64)
        self.n_clust = 0 if tclust is None else int(self.tclust.max()) + 1
        self.T, self.K = n_therapists, n_arms
        self.X = X
        self.tcode, self.acode = tcode, acode
        self.cell = tcode * n_arms + acode
        self.n = np.bincount(self.cell, minlength=self.T * self.K).reshape(self.T, self.K).astype(float)
        self.SX = np.stack(
            [np.bincount(self.cell, weights=X[:, j], minlength=self.T * self.K) for j in range(self.p)],
            axis=1,
        ).reshape(self.T, self.K, self.p)
        Z = (np.asarray(acode)[:, None] == np.arange(n_arms)).astype(float)
        self.block = BlockEngine(np.asarray(y, dtype=float), X, Z, tcode, n_therapists, cluster=self.tclust,
                                 strata=acode, diagonal=diagonal)
        self.set_y(y)

    def set_y(self, y):
        """(Re)compute the statistics that involve the outcome (used by the parametric bootstrap)."""
        X, K, T = self.X, self.K, self.T
        self.y = y
        sy = np.bincount(self.cell, weights=y, minlength=T * K).reshape(T, K, 1)
        self.S = np.concatenate([self.SX, sy], axis=2)  # (T, K, p + 1)
        A1 = np.column_stack([X, y])
        self.A = np.stack([A1[self.acode == a].T @ A1[self.acode == a] for a in range(K)])
        self.block.set_y(np.asarray(y, dtype=float))
        ZA = self.block.ZA  # per-cell outer products of the (centred) sums, for grad_g
        self._O = (ZA[:, :, :, None] * ZA[:, :, None, :]).reshape(T, K, -1)

    def theta(self, G, gc=None) -> np.ndarray | None:
        """The block engine's theta at ``G`` (and ``gc``); None when ``G`` is not a covariance."""
        G = np.asarray(G, dtype=float)
        if self.block.diagonal:  # (G's off-diagonal is 0 in the diagonal model)
            th = np.sqrt(np.maximum(np.diag(G), 0.0))
        else:
            L = psd_cholesky(G)
            if np.max(np.abs(L @ L.T - G)) > 1e-12 * max(float(np.max(np.abs(G))), 1e-300):
                return None  # (not positive semi-definite: a correlation beyond +-1)
            th = lambda_to_theta(L)
        if self.tclust is not None:
            th = np.append(th, math.sqrt(gc) if gc else 0.0)
        return th

    def grad_g(self, g: np.ndarray, method: str) -> tuple[float, np.ndarray]:
        """Profiled deviance and its gradient in the relative variances ``g`` (diagonal G, r = 1)."""
        b = self.block
        q, p = self.p + 1, self.p
        n = np.diagonal(b.ZZ, axis1=1, axis2=2)  # (T, K) caseloads per arm
        denom = 1.0 + n * g[None, :]
        C = ((g[None, :] / denom).reshape(-1) @ self._O.reshape(len(n) * self.K, -1)).reshape(q, q)
        P = b.AA - C
        try:
            L = np.linalg.cholesky(P)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros_like(g)
        Q = float(L[p, p] ** 2)
        if not Q > 0:
            return np.inf, np.zeros_like(g)
        logdet_H = float(np.log(denom).sum())
        beta = np.linalg.solve(P[:p, :p], P[:p, p])
        v = np.append(-beta, 1.0)
        Pinv = np.linalg.inv(P[:p, :p])
        reml = method == "REML"
        nu = self.N - p if reml else self.N
        grad = np.empty(self.K)
        for k in range(self.K):
            dP = -((1.0 / denom[:, k] ** 2) @ self._O[:, k]).reshape(q, q)
            grad[k] = nu * (v @ dP @ v) / Q + float((n[:, k] / denom[:, k]).sum())
            if reml:
                grad[k] += float(np.sum(Pinv * dP[:p, :p]))
        dev = nu * (1.0 + _LOG2PI + math.log(Q / nu)) + logdet_H
        if reml:
            dev += float(2.0 * np.log(np.diag(L)[:p]).sum())
        return dev, grad

    def deviance(self, G, r, diagonal, method: str, sigma2: float | None = None, gc: float | None = None) -> float:
        """-2 log (restricted) likelihood; ``sigma2`` profiled out when None. (``diagonal``: G's
        structure, which ``G`` itself carries.)"""
        th = self.theta(G, gc)
        if th is None:
            return np.inf
        return self.block.crit(th, method == "REML", ratios=np.asarray(r, dtype=float), sigma2=sigma2)

    def gls(self, G, r, diagonal, method, gc=None):
        """``(beta, sigma2, cov_beta, (r, log|X'H^-1X|))``: GLS fixed effects, the (RE)ML residual
        variance and lme4's ``vcov``, with the penalised residual sum of squares and log-determinant."""
        th = self.theta(G, gc)
        beta, cov, rss, _ = self.block.fixed(th, ratios=np.asarray(r, dtype=float))
        nu = self.N - self.p if method == "REML" else self.N
        sigma2 = rss / nu
        return beta, sigma2, sigma2 * cov, (rss, float(np.linalg.slogdet(cov)[1]) * -1.0)


def _r_backspline_predict(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """R's ``predict(backSpline(interpSpline(y ~ x)), at)$y`` (splines package, R 4.2).

    ``interpSpline`` is the natural cubic interpolation spline of y on x; ``backSpline`` builds a
    piecewise cubic in y through the knots (y_i, x_i) with slopes 1/y'(x_i), natural-like ends.
    Values outside the range of ``y`` are NaN (as in R). Falls back to linear interpolation
    where the spline is not monotone (as lme4's ``confint.thpr`` does).
    """
    from scipy.interpolate import CubicSpline

    order = np.argsort(x)
    x, y = x[order], y[order]
    at = np.asarray(at, dtype=float)
    if len(x) < 4:
        return np.interp(at, y, x, left=np.nan, right=np.nan)
    spl = CubicSpline(x, y, bc_type="natural")
    knots, c1, c2 = x, y, spl(x, 1)
    adiff, kdiff = np.diff(c1), np.diff(knots)
    if not (np.all(adiff > 0) or np.all(adiff < 0)):
        ok = np.all(np.diff(y) >= 0)
        return np.interp(at, y, x, left=np.nan, right=np.nan) if ok else np.full(at.shape, np.nan)
    nk = len(knots)
    b = np.zeros((nk, 4))
    b[:, 0] = knots
    b[:, 1] = 1.0 / c2
    for i in range(nk - 1):
        A = np.array([[adiff[i] ** 2, adiff[i] ** 3], [2 * adiff[i], 3 * adiff[i] ** 2]])
        rhs = np.array([kdiff[i] - adiff[i] * b[i, 1], b[i + 1, 1] - b[i, 1]])
        b[i, 2:4] = np.linalg.solve(A, rhs)
    b[nk - 1, 1:] = np.nan
    if nk > 2:
        b[0, 3] = b[nk - 2, 3] = 0.0
        A = np.array([[adiff[0], adiff[0] ** 2], [1.0, 2 * adiff[0]]])
        b[0, 1:3] = np.linalg.solve(A, np.array([kdiff[0], 1.0 / c2[1]]))
        b[nk - 2, 2] = (kdiff[nk - 2] - adiff[nk - 2] * b[nk - 2, 1]) / adiff[nk - 2] ** 2
    if b[0, 2] > 0:
        b[0, 2] = 0.0
        b[0, 1] = kdiff[0] / adiff[0]
    if b[nk - 2, 2] < 0:
        b[nk - 2, 2] = 0.0
        b[nk - 2, 1] = kdiff[nk - 2] / adiff[nk - 2]
    bknots = c1
    if adiff[0] < 0:
        bknots, b = bknots[::-1], b[::-1]
    out = np.full(at.shape, np.nan)
    for j, v in enumerate(at):
        if v < bknots[0] or v > bknots[-1]:
            continue
        # R: i <- cut(v, knots), intervals (k_i, k_{i+1}]; v == first knot -> first interval
        i = max(int(np.searchsorted(bknots, v, side="left")) - 1, 0)
        d = v - bknots[i]
        out[j] = b[i, 0] + d * (b[i, 1] + d * (b[i, 2] + d * b[i, 3]))
    return out


# ----------------------------------------------------------------------------------------------
# parameterisations
# ----------------------------------------------------------------------------------------------


def _minimise(f, x0, bounds, jac=None, polish=True):
    """Bounded minimisation: SLSQP (analytic or finite-difference gradient), then a bounded
    Nelder-Mead polish. (scipy's L-BFGS-B carries a large per-call overhead in this environment.)"""
    lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    x0 = np.clip(np.asarray(x0, dtype=float), lo, hi)
    best_x, best_f, ok = x0, f(x0), False
    try:
        res = optimize.minimize(
            f, x0, method="SLSQP", jac=jac, bounds=bounds, options={"ftol": 1e-14, "maxiter": 500}
        )
        xr = np.clip(res.x, lo, hi)
        fr = f(xr)
        if fr <= best_f:
            best_x, best_f = xr, fr
        ok = bool(res.success)
    except (ValueError, np.linalg.LinAlgError):
        pass
    if polish:
        res2 = optimize.minimize(
            f, best_x, method="Nelder-Mead", bounds=bounds,
            # fatol is absolute: deviances of 1e4-1e5 carry rounding noise near 1e-11 relative
            options={"xatol": 1e-8, "fatol": max(1e-9, 1e-13 * abs(best_f)), "maxiter": 400 * len(x0)},
        )
        if res2.fun <= best_f:
            best_x, best_f = np.clip(res2.x, lo, hi), float(res2.fun)
        ok = ok or bool(res2.success)
    return best_x, float(best_f), ok


def _profile_limits(profile_dev, est, dev_min, z0, scale, level=0.95, upper_limit=np.inf):
    """Limits of a profile-likelihood interval: where the profiled deviance exceeds its minimum by
    ``qchisq(level, 1)``.

    ``profile_dev(c, z_start) -> (deviance, z)`` minimises the deviance over the other parameters
    ``z`` with the profiled quantity fixed at ``c``. The search steps outward from ``est`` on a
    transformed scale (``"log"`` for variances/ratios, ``"logit"`` for ICCs, ``"atanh"`` for
    correlations), extrapolating the profile quadratically, then brackets the crossing for Brent's
    method on the signed-root scale. A limit that is never reached is the boundary (0, -1, 1 or inf).
    """
    cut = stats.chi2.ppf(level, 1)
    state = {"z": np.array(z0, dtype=float)}

    def excess(c):
        fz, z = profile_dev(c, state["z"])
        if np.isfinite(fz):
            state["z"] = z
        return fz - dev_min - cut

    if scale == "log":
        fwd, inv = (lambda c: math.log(c)), (lambda s: math.exp(s))
        floor_val = 0.0
    elif scale == "logit":
        fwd, inv = (lambda c: math.log(c / (1 - c))), (lambda s: 1.0 / (1.0 + math.exp(-s)))
        floor_val = 0.0
    else:
        fwd, inv = (lambda c: math.atanh(max(min(c, 1 - 1e-12), -1 + 1e-12))), (lambda s: math.tanh(s))
        floor_val = -1.0
    if not np.isfinite(est):
        return float("nan"), float("nan")
    if scale == "atanh":
        at_floor = est <= -1.0 + 1e-12
        at_ceiling = est >= 1.0 - 1e-12
    else:
        at_floor = est < 1e-10
        at_ceiling = False
    if at_floor:
        s_hat = fwd(1e-6) if scale != "atanh" else fwd(-1 + 1e-6)
    elif at_ceiling:
        s_hat = fwd(1 - 1e-6)
    else:
        s_hat = fwd(est)
    rcut = math.sqrt(cut)

    def root_fn(u):  # signed-root scale: nearly linear in u, so Brent converges in a few steps
        return math.sqrt(max(excess(inv(u)) + cut, 0.0)) - rcut

    def search(direction):
        state["z"] = np.array(z0, dtype=float)
        prev, prev_d, h = s_hat, 0.0, 0.1
        for _ in range(60):
            s = s_hat + direction * h
            c = inv(s)
            if scale == "atanh" and abs(c) >= 1 - 1e-10:
                return 1.0 if direction > 0 else -1.0
            if c >= upper_limit or (direction < 0 and c <= 1e-12 and scale != "atanh"):
                break
            d = excess(c) + cut
            if d > cut:
                lo_s, hi_s = (prev, s) if direction > 0 else (s, prev)
                try:
                    root = optimize.brentq(root_fn, lo_s, hi_s, xtol=1e-9, rtol=1e-9)
                except ValueError:
                    # The inner re-optimisation, warm-started from another point, did not reproduce
                    # the bracket's signs (a rough profile): interpolate the signed root linearly
                    # between the two evaluated points instead, and say so.
                    warnings.warn(
                        "profile likelihood is not smooth near an interval end; the end was interpolated",
                        StatisticalWarning,
                    )
                    r0, r1 = math.sqrt(max(prev_d, 0.0)), math.sqrt(d)
                    frac = (rcut - r0) / (r1 - r0) if r1 > r0 else 1.0
                    root = prev + frac * (s - prev)
                return inv(root)
            prev, prev_d = s, d
            guess = h * math.sqrt(cut / d) * 1.1 if d > 1e-8 else h * 4.0
            h = min(max(guess, h * 1.3), h * 6.0)
            if abs(s) > 40:
                break
        if direction > 0:
            return float(upper_limit) if scale != "log" else float("inf")
        return floor_val

    lower = floor_val if at_floor else search(-1.0)
    upper = 1.0 if at_ceiling else search(+1.0)
    return float(lower), float(upper)


def _G_from_theta(theta, rho=None):
    if rho is None:
        return np.diag(np.asarray(theta, dtype=float) ** 2)
    t0, t1 = theta
    c = rho * t0 * t1
    return np.array([[t0 * t0, c], [c, t1 * t1]])


@dataclass
class _Optimum:
    method: str
    x: np.ndarray
    G: np.ndarray
    r: np.ndarray
    deviance: float
    converged: bool
    message: str = ""



def arm_design(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    *,
    therapist: str,
    arm: str,
    feedback_level=1,
    include_arm: bool = True,
    extra: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, str]:
    """Response, fixed-effects design and the 0/1 feedback indicator of a model with an arm.

    The arm enters the fixed part as a 0/1 indicator of ``feedback_level``, named after the arm column
    when the arm is coded 0/1 with ``feedback_level=1`` (e.g. ``feedback``), else ``<arm><level>``
    (R-style); listed in ``covariates`` it keeps that position, else it is appended (unless
    ``include_arm`` is False). Returns ``(y, X, names, indicator, indicator_name)``; the columns
    named and ``extra`` must exist, and missing values are refused (drop them first, and count them).
    """
    for col in (outcome, therapist, arm, *covariates, *extra):
        if col not in df.columns:
            raise ModelError(f"column {col!r} is not in the patient table (columns: {list(df.columns)})")
    used = list(dict.fromkeys([outcome, therapist, arm, *covariates]))
    bad = df[used].isna().any(axis=1)
    if bad.any():
        raise ModelError(f"{int(bad.sum())} rows have missing values in {used}; drop them before fitting")
    labels = arm_labels(df[arm].to_numpy())
    fb = _label(feedback_level)
    if fb not in set(labels):
        raise ModelError(f"feedback_level {fb!r} is not a level of {arm!r} (levels: {sorted(set(labels))})")
    numeric01 = pd.api.types.is_numeric_dtype(df[arm]) and set(labels) <= {"0", "1"} and fb == "1"
    ind_name = arm if numeric01 else f"{arm}{fb}"
    work = df.copy()
    ind_col = "__arm_indicator__"
    work[ind_col] = (labels == fb).astype(float)
    terms = [ind_col if c == arm else c for c in covariates]
    if include_arm and ind_col not in terms:
        terms.append(ind_col)
    X, names = fixed_effects_matrix(work, terms, intercept=True)
    names = [ind_name if nm == ind_col else nm for nm in names]
    return work[outcome].to_numpy(dtype=float), X, names, work[ind_col].to_numpy(), ind_name

class ArmVarianceModel:
    """Linear mixed model with a separate therapist variance in each arm (control, feedback).

    Parameters
    ----------
    endog : outcome per patient (e.g. end-of-treatment PHQ-9).
    exog : fixed-effects design (include the intercept and the arm indicator yourself, or use
        :meth:`from_frame`, which does).
    therapist : therapist of each patient.
    arm : arm of each patient (exactly two levels, e.g. 0 = control, 1 = feedback).
    exog_names : names of the columns of ``exog``.
    method : ``"REML"`` (default) or ``"ML"``.
    feedback_level : the arm level that received feedback; the other level is the control arm.
    correlated : estimate the correlation of a therapist's effects in the two arms.
    arm_residual : separate residual (patient-level) variance per arm.
    cluster : optional service/trial labels. By default only counted (``n_clusters``); to adjust
        for clusters as fixed effects add them as categorical covariates (``trial_idS01``, ...).
    cluster_random : with ``cluster``, a random cluster intercept (one-stage IPD meta-analysis:
        ``(1 | cluster) + (0 + control | cluster:therapist) + (0 + feedback | cluster:therapist)``);
        therapists are then nested in clusters (a therapist seen in two clusters counts as two
        units, as lme4's ``cluster/therapist``) and the ICC of arm a is
        ``s2_a / (s2_cluster + s2_a + residual_a)``.
    """

    def __init__(
        self,
        endog,
        exog,
        therapist,
        arm,
        *,
        exog_names: Sequence[str] | None = None,
        method: str = "REML",
        feedback_level=1,
        correlated: bool = False,
        arm_residual: bool = False,
        cluster=None,
        cluster_random: bool = False,
    ):
        method = str(method).upper()
        if method not in ("REML", "ML"):
            raise ModelError(f"method must be 'REML' or 'ML', got {method!r}")
        y = np.asarray(endog, dtype=float).reshape(-1)
        X = np.asarray(exog, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        if X.shape[0] != y.shape[0]:
            raise ModelError(f"exog has {X.shape[0]} rows but endog has {y.shape[0]}")
        therapist = np.asarray(therapist, dtype=object)
        arm = np.asarray(arm, dtype=object)
        if len(therapist) != len(y) or len(arm) != len(y):
            raise ModelError("therapist and arm must have one entry per patient")
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(X))):
            raise ModelError("outcome or covariates contain missing or infinite values; drop them before fitting")
        if pd.isna(pd.Series(therapist)).any() or pd.isna(pd.Series(arm)).any():
            raise ModelError("therapist or arm contains missing values; drop those patients before fitting")
        labels = arm_labels(arm)
        levels = sorted(set(labels))
        fb = _label(feedback_level)
        if len(levels) != 2:
            raise ModelError(f"arm must have exactly two levels (control, feedback), found {levels}")
        if fb not in levels:
            raise ModelError(f"feedback_level {fb!r} is not a level of arm (levels: {levels})")
        control = [lv for lv in levels if lv != fb][0]
        self.arm_levels = [control, fb]  # index 0 = control, 1 = feedback
        self.feedback_level, self.control_level = fb, control
        acode = (labels == fb).astype(np.int64)
        self.cluster_random = bool(cluster_random)
        tclust = None
        if self.cluster_random:
            if cluster is None:
                raise ModelError("cluster_random=True needs the cluster (trial/service) of each patient")
            cl = pd.Series(np.asarray(cluster, dtype=object)).astype(str)
            if cl.nunique() < 3:
                raise ModelError(f"a random cluster level needs at least three clusters, found {cl.nunique()}")
            therapist = (cl + "\x1f" + pd.Series(therapist).astype(str)).to_numpy(dtype=object)
        tcode, tlabels = group_codes(therapist)
        if self.cluster_random:
            tclust, _ = group_codes(pd.Series([lab.split("\x1f")[0] for lab in tlabels]))
            tlabels = np.array([lab.replace("\x1f", ":") for lab in tlabels], dtype=object)
        self.therapist_labels = tlabels
        self.exog_names = list(exog_names) if exog_names is not None else [f"x{j}" for j in range(X.shape[1])]
        if len(self.exog_names) != X.shape[1]:
            raise ModelError(f"exog_names has {len(self.exog_names)} names for {X.shape[1]} columns")
        if np.linalg.matrix_rank(X) < X.shape[1]:
            raise ModelError(f"fixed-effects design {self.exog_names} is rank deficient")
        self.method = method
        self.correlated = bool(correlated)
        self.arm_residual = bool(arm_residual)
        self.n_clusters = None if cluster is None else int(pd.Series(np.asarray(cluster, dtype=object)).nunique())
        self._eng = _Engine(y, X, tcode, acode, len(tlabels), 2, tclust=tclust, diagonal=not self.correlated)
        n = self._eng.n
        for a, lv in enumerate(self.arm_levels):
            if (n[:, a] > 0).sum() < 2:
                raise ModelError(f"arm {lv!r} has patients of fewer than two therapists; its therapist variance cannot be estimated")
        if self.correlated and ((n > 0).all(axis=1)).sum() < 3:
            raise ModelError("correlated=True needs at least three therapists who treat patients in both arms")
        if X.shape[0] - X.shape[1] <= 0:
            raise ModelError("fewer patients than fixed effects")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        outcome: str,
        covariates: Sequence[str] = (),
        *,
        therapist: str = "therapist",
        arm: str = "arm",
        feedback_level=1,
        include_arm: bool = True,
        cluster: str | None = None,
        **kwargs,
    ) -> ArmVarianceModel:
        """Model ``outcome ~ covariates + arm`` with arm-specific therapist variances from a patient table.

        The arm enters the fixed part as a 0/1 feedback indicator named after the arm column when
        the arm is coded 0/1 with ``feedback_level=1`` (e.g. ``feedback``), else ``<arm><level>``
        (R-style). List the arm column in ``covariates`` to choose its position; otherwise it is
        appended after the covariates (``include_arm=False`` leaves it out). Categorical covariates
        (e.g. ``trial_id``) are treatment-coded as in R (``trial_idS01``, ...).
        """
        y, X, names, _indicator, _name = arm_design(
            df, outcome, covariates, therapist=therapist, arm=arm, feedback_level=feedback_level,
            include_arm=include_arm, extra=[cluster] if cluster else [],
        )
        model = cls(
            y,
            X,
            df[therapist].to_numpy(),
            df[arm].to_numpy(),
            exog_names=names,
            feedback_level=feedback_level,
            cluster=None if cluster is None else df[cluster].to_numpy(),
            **kwargs,
        )
        model.outcome_name = outcome
        model.therapist_name = therapist
        model.arm_name = arm
        return model

    # ------------------------------------------------------------------------------------------
    # parameter vectors used by the optimiser: theta (or Cholesky factor) then log residual ratio
    def _n_par(self):
        return (3 if self.correlated else 2) + (1 if self.arm_residual else 0) + (1 if self.cluster_random else 0)

    def _gc(self, x):
        """Relative cluster variance (last element of the parameter vector), None without that level."""
        return float(x[-1]) ** 2 if self.cluster_random else None

    def _unpack(self, x):
        x = np.asarray(x, dtype=float)
        if self.correlated:
            L = np.array([[x[0], 0.0], [x[1], x[2]]])
            G = L @ L.T
            k = 3
        else:
            G = np.diag(x[:2] ** 2)
            k = 2
        r = np.array([1.0, math.exp(x[k])]) if self.arm_residual else np.ones(2)
        return G, r

    def _bounds(self):
        if self.correlated:
            b = [(0.0, None), (None, None), (0.0, None)]
        else:
            b = [(0.0, None), (0.0, None)]
        if self.arm_residual:
            b.append((-12.0, 12.0))
        if self.cluster_random:
            b.append((0.0, None))
        return b

    def _pack_from(self, G, r):
        if self.correlated:
            g00 = max(G[0, 0], 0.0)
            l00 = math.sqrt(g00)
            l10 = G[1, 0] / l00 if l00 > 1e-12 else 0.0
            l11 = math.sqrt(max(G[1, 1] - l10 * l10, 0.0))
            x = [l00, l10, l11]
        else:
            x = list(np.sqrt(np.maximum(np.diag(G), 0.0)))
        if self.arm_residual:
            x.append(math.log(r[1] / r[0]))
        if self.cluster_random:
            x.append(0.1)
        return np.array(x)

    def _start_values(self):
        """Moment-based start: between-cell variance of residual cell means, per arm."""
        eng = self._eng
        p = eng.p
        A = eng.A.sum(axis=0)
        beta = np.linalg.solve(A[:p, :p], A[:p, p])
        out = []
        res2 = []
        for a in range(2):
            n = eng.n[:, a]
            ok = n > 0
            sres = eng.S[ok, a, p] - eng.S[ok, a, :p] @ beta
            rss = eng.A[a, p, p] - 2 * beta @ eng.A[a, :p, p] + beta @ eng.A[a, :p, :p] @ beta
            nt = n.sum()
            s2 = max(rss / nt, 1e-12)
            means = sres / n[ok]
            between = np.average(means**2, weights=n[ok]) - s2 / np.mean(n[ok])
            out.append(max(between, 0.05 * s2))
            res2.append(s2)
        s2 = res2[0]
        G = np.diag([out[0] / s2, out[1] / s2])
        r = np.array([1.0, res2[1] / res2[0]]) if self.arm_residual else np.ones(2)
        return G, r

    def _optimise(self, method: str, start=None) -> _Optimum:
        eng = self._eng
        diagonal = not self.correlated

        nt, reml = (3 if self.correlated else 2), method == "REML"

        def f(x):  # x is the block engine's theta (then log r, then the cluster SD)
            x = np.asarray(x, dtype=float)
            th = np.append(x[:nt], x[-1]) if self.cluster_random else x[:nt]
            r = np.array([1.0, math.exp(x[nt])]) if self.arm_residual else None
            return eng.block.crit(th, reml, ratios=r)

        jac = None
        if diagonal and not self.arm_residual and not self.cluster_random:
            def jac(x):  # chain rule through g = theta^2
                _, gg = eng.grad_g(np.asarray(x) ** 2, method)
                return gg * 2.0 * np.asarray(x)

        if start is None:
            G0, r0 = self._start_values()
            starts = [self._pack_from(G0, r0)]
            x1 = starts[0].copy()
            x1[: (3 if self.correlated else 2)] = [0.3, 0.0, 0.3] if self.correlated else 0.3
            starts.append(x1)
        else:
            starts = [np.asarray(start, dtype=float)]
        best = None
        for x0 in starts:
            x, fx, ok = _minimise(f, x0, self._bounds(), jac=jac, polish=False)
            if best is None or fx < best[1]:
                best = (x, fx, ok)
        if jac is not None and best[2]:
            x, fx, ok = best  # analytic gradient: SLSQP's optimum is already tight
        else:
            x, fx, ok = _minimise(f, best[0], self._bounds(), jac=jac, polish=True)
        # snap relative SDs that sit numerically on the boundary to exactly 0 (a singular fit)
        sd_idx = ([0, 2] if self.correlated else [0, 1]) + ([len(x) - 1] if self.cluster_random else [])
        for j in sd_idx:
            if 0.0 < x[j] < 1e-6:
                x0 = x.copy()
                x0[j] = 0.0
                f0 = f(x0)
                if f0 <= fx + 1e-9:
                    x, fx = x0, min(fx, f0)
        G, r = self._unpack(x)
        converged = bool(np.isfinite(fx)) and ok
        return _Optimum(method, x, G, r, float(fx), converged, "" if ok else "optimiser reported failure")

    def fit(self) -> ArmVarianceResults:
        """Estimate the model (REML or ML); returns :class:`ArmVarianceResults`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt = self._optimise(self.method)
        return ArmVarianceResults(self, opt)


# ----------------------------------------------------------------------------------------------
# profile-likelihood machinery
# ----------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """A quantity to profile: maps (value c, free vector z) -> (sigma2 or None, G, r)."""

    name: str
    build: object
    z0: np.ndarray
    bounds: list
    scale: str  # "log", "logit" or "atanh": where the outward search steps
    estimate: float
    upper_limit: float = np.inf


@dataclass
class ArmVarianceResults(ModelResults):
    """Fitted arm-specific therapist-variance model."""

    model: ArmVarianceModel
    opt: _Optimum
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        m, opt = self.model, self.opt
        eng = m._eng
        gc = m._gc(opt.x)
        beta, sigma2, cov_beta, ev = eng.gls(opt.G, opt.r, not m.correlated, opt.method, gc)
        self.sigma2 = float(sigma2)
        self.gc_rel = 0.0 if gc is None else gc
        self.G_rel, self.r_rel = opt.G, opt.r
        self.cov_re = sigma2 * opt.G  # therapist covariance (control, feedback)
        self.residual_var = sigma2 * opt.r
        self.fe_params = pd.Series(beta, index=m.exog_names, name="estimate")
        self.cov_params_fe = pd.DataFrame(cov_beta, index=m.exog_names, columns=m.exog_names)
        self.vcov = self.cov_params_fe
        self.bse = pd.Series(np.sqrt(np.diag(cov_beta)), index=m.exog_names, name="se")
        self.deviance = opt.deviance
        self.loglik = -0.5 * opt.deviance
        self.method = opt.method
        self.converged = bool(opt.converged)
        self.n_patients = eng.N
        self.n_therapists = eng.T
        self.feedback_level, self.control_level = m.feedback_level, m.control_level
        keys = [f"therapist[{lv}]" for lv in m.arm_levels]
        vc = {keys[0]: float(self.cov_re[0, 0]), keys[1]: float(self.cov_re[1, 1])}
        if m.correlated:
            sd = np.sqrt(np.diag(self.cov_re))
            self.correlation = float(self.cov_re[0, 1] / (sd[0] * sd[1])) if np.all(sd > 0) else float("nan")
            vc["cov(therapist)"] = float(self.cov_re[0, 1])
        else:
            self.correlation = None
        if m.arm_residual:
            for a, lv in enumerate(m.arm_levels):
                vc[f"residual[{lv}]"] = float(self.residual_var[a])
        else:
            vc["residual"] = float(sigma2)
        if m.cluster_random:
            vc["cluster"] = float(sigma2 * self.gc_rel)
        self.vcomp = vc
        self.params = pd.concat([self.fe_params, pd.Series(vc)])
        # singular: a relative SD (lme4 theta diagonal) below tolerance
        x = opt.x
        diag_idx = [0, 2] if m.correlated else [0, 1]
        if m.cluster_random:
            diag_idx.append(len(x) - 1)
        self.singular = bool(any(x[j] < _SINGULAR_TOL for j in diag_idx))
        if self.singular:
            self._warn(
                "singular fit: a variance component (or the arm correlation) is estimated at the boundary; "
                "an ICC at 0 makes the ICC ratio 0 or undefined",
                SingularFitWarning,
            )
        if not self.converged:
            self._warn(f"optimiser did not report convergence ({opt.message})", ConvergenceWarning)
        self._opt_cache = {opt.method: opt}
        self._profile_cache: dict = {}
        self._boot_cache: dict = {}

    def _n_params(self) -> int:
        """Fixed effects, the optimiser's covariance parameters (theta, residual ratios, cluster)
        and the residual scale (lme4's df of logLik)."""
        return int(len(self.fe_params) + len(self.opt.x) + 1)

    def _warn(self, msg, category):
        self.warnings.append(msg)
        warnings.warn(msg, category, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # point estimates
    def _icc_from(self, G, r, gc=0.0):
        s = np.diag(G)
        return s / (s + r + (gc or 0.0))

    def icc_point(self) -> np.ndarray:
        """ICC per arm (control, feedback)."""
        return self._icc_from(self.G_rel, self.r_rel, self.gc_rel)

    def ratio_point(self) -> float:
        icc = self.icc_point()
        return float(icc[1] / icc[0]) if icc[0] > 0 else float("nan")

    # ------------------------------------------------------------------------------------------
    def _optimum(self, method: str) -> _Optimum:
        if method not in self._opt_cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                self._opt_cache[method] = self.model._optimise(method, start=self.opt.x)
        return self._opt_cache[method]

    def _targets(self, method: str) -> dict:
        """The quantities that can be profiled, each with its re-parameterisation."""
        m = self.model
        opt = self._optimum(method)
        eng = m._eng
        gc_hat = m._gc(opt.x)
        _, s2hat, _, _ = eng.gls(opt.G, opt.r, not m.correlated, method, gc_hat)
        G, r = opt.G, opt.r
        th = np.sqrt(np.maximum(np.diag(G), 0.0))
        rho = None
        if m.correlated:
            rho = float(G[0, 1] / (th[0] * th[1])) if th[0] > 0 and th[1] > 0 else 0.0
            rho = min(max(rho, -1.0), 1.0)
        logr = math.log(r[1]) if m.arm_residual else None
        icc = self._icc_from(G, r, gc_hat)
        targets = {}

        def extras_pack(rho_, logr_):
            z, b = [], []
            if m.correlated:
                z.append(rho_)
                b.append((-1.0, 1.0))
            if m.arm_residual:
                z.append(logr_)
                b.append((-12.0, 12.0))
            return z, b

        def extras_unpack(z):
            k = 0
            rho_ = None
            rr = np.ones(2)
            if m.correlated:
                rho_ = z[k]
                k += 1
            if m.arm_residual:
                rr = np.array([1.0, math.exp(z[k])])
            return rho_, rr

        # therapist variance of arm a (natural scale): z = [log sigma2, theta_other, extras]
        for a, lv in enumerate(m.arm_levels):
            o = 1 - a
            ez, eb = extras_pack(rho, logr)

            def build(c, z, a=a, o=o, gc=0.0):
                s2 = math.exp(z[0])
                th_ = np.zeros(2)
                th_[a] = math.sqrt(max(c, 0.0) / s2)
                th_[o] = z[1]
                rho_, rr = extras_unpack(z[2:])
                return s2, _G_from_theta(th_, rho_), rr

            targets[f"therapist[{lv}]"] = _Target(
                f"therapist[{lv}]", build, np.array([math.log(s2hat), th[o], *ez]),
                [(-50, 50), (0.0, None), *eb], "log", float(s2hat * G[a, a]),
            )
        # residual variance(s)
        if m.arm_residual:
            ez, eb = extras_pack(rho, None)
            ez, eb = ez[: 1 if m.correlated else 0], eb[: 1 if m.correlated else 0]

            def build_r0(c, z, gc=0.0):
                rho_ = z[2] if m.correlated else None
                return c, _G_from_theta(z[:2], rho_), np.array([1.0, math.exp(z[-1])])

            targets[f"residual[{m.arm_levels[0]}]"] = _Target(
                f"residual[{m.arm_levels[0]}]", build_r0, np.array([*th, *ez, logr]),
                [(0.0, None), (0.0, None), *eb, (-12.0, 12.0)], "log", float(s2hat),
            )

            def build_r1(c, z, gc=0.0):
                s2 = math.exp(z[0])
                rho_ = z[3] if m.correlated else None
                return s2, _G_from_theta(z[1:3], rho_), np.array([1.0, c / s2])

            targets[f"residual[{m.arm_levels[1]}]"] = _Target(
                f"residual[{m.arm_levels[1]}]", build_r1, np.array([math.log(s2hat), *th, *ez]),
                [(-50, 50), (0.0, None), (0.0, None), *eb], "log", float(s2hat * r[1]),
            )
        else:
            ez, eb = extras_pack(rho, None)

            def build_res(c, z, gc=0.0):
                rho_ = z[2] if m.correlated else None
                return c, _G_from_theta(z[:2], rho_), np.ones(2)

            targets["residual"] = _Target(
                "residual", build_res, np.array([*th, *ez]), [(0.0, None), (0.0, None), *eb], "log", float(s2hat)
            )
        # correlation of the two arm effects
        if m.correlated:
            ez, eb = extras_pack(None, logr)
            ez, eb = ez[1:], eb[1:]

            def build_cor(c, z, gc=0.0):
                rr = np.array([1.0, math.exp(z[2])]) if m.arm_residual else np.ones(2)
                return None, _G_from_theta(z[:2], c), rr

            targets["correlation"] = _Target(
                "correlation", build_cor, np.array([*th, *ez]), [(0.0, None), (0.0, None), *eb], "atanh", float(rho)
            )
        # ICC of arm a: g_a = c r_a / (1 - c); z = [theta_other, extras]
        for a, lv in enumerate(m.arm_levels):
            o = 1 - a
            ez, eb = extras_pack(rho, logr)

            def build_icc(c, z, a=a, o=o, gc=0.0):
                rho_, rr = extras_unpack(z[1:])
                th_ = np.zeros(2)
                th_[a] = math.sqrt(c * (rr[a] + gc) / (1.0 - c))
                th_[o] = z[0]
                return None, _G_from_theta(th_, rho_), rr

            targets[f"icc[{lv}]"] = _Target(
                f"icc[{lv}]", build_icc, np.array([th[o], *ez]), [(0.0, None), *eb], "logit", float(icc[a]),
                upper_limit=1.0,
            )
        # ICC ratio (feedback / control): z = [ICC_control, extras]

        def build_ratio(c, z, gc=0.0):
            rho_, rr = extras_unpack(z[1:])
            i0 = z[0]
            i1 = c * i0
            if i0 >= 1.0 or i1 >= 1.0:
                return None, None, None
            th_ = np.array([math.sqrt(i0 * (rr[0] + gc) / (1 - i0)), math.sqrt(i1 * (rr[1] + gc) / (1 - i1))])
            return None, _G_from_theta(th_, rho_), rr

        ez, eb = extras_pack(rho, logr)
        ratio_hat = float(icc[1] / icc[0]) if icc[0] > 0 else float("nan")
        targets["icc_ratio"] = _Target(
            "icc_ratio", build_ratio, np.array([icc[0], *ez]), [(0.0, 1.0 - 1e-9), *eb], "log", ratio_hat
        )
        if m.cluster_random:
            # every target gets the relative cluster SD as one more free parameter (last in z)
            thc = math.sqrt(gc_hat)
            for name, t in list(targets.items()):
                def wrapped(c, z, _b=t.build):
                    gc = float(z[-1]) ** 2
                    out = _b(c, z[:-1], gc=gc)
                    return (*out, gc)

                targets[name] = _Target(t.name, wrapped, np.append(t.z0, thc), [*t.bounds, (0.0, None)], t.scale,
                                        t.estimate, t.upper_limit)
            ez, eb = extras_pack(rho, logr)

            def build_cluster(c, z):
                s2 = math.exp(z[0])
                rho_, rr = extras_unpack(z[3:])
                return s2, _G_from_theta(z[1:3], rho_), rr, max(c, 0.0) / s2

            targets["cluster"] = _Target(
                "cluster", build_cluster, np.array([math.log(s2hat), *th, *ez]),
                [(-50, 50), (0.0, None), (0.0, None), *eb], "log", float(s2hat * gc_hat),
            )
        return targets

    def _profile_dev(self, target: _Target, c: float, z0: np.ndarray, method: str):
        m = self.model
        eng = m._eng
        diagonal = not m.correlated
        bounds = list(target.bounds)
        if target.name == "icc_ratio":
            hi = min(1.0, 1.0 / c) if c > 0 else 1.0
            bounds[0] = (0.0, hi * (1 - 1e-9))

        def f(z):
            out = target.build(c, z)
            if out[1] is None:
                return np.inf
            gc = out[3] if len(out) > 3 else None
            return eng.deviance(out[1], out[2], diagonal, method, sigma2=out[0], gc=gc)

        z0 = np.array(z0, dtype=float)
        for j, (lo, hi) in enumerate(bounds):
            if lo is not None and z0[j] < lo:
                z0[j] = lo
            if hi is not None and z0[j] > hi:
                z0[j] = hi
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if len(z0) == 1 and bounds[0][1] is not None:
                lo, hi = bounds[0]
                res = optimize.minimize_scalar(
                    lambda t: f(np.array([t])), bounds=(lo, hi), method="bounded",
                    options={"xatol": 1e-9 + 1e-7 * abs(z0[0])},
                )
                z, fz = np.array([res.x]), res.fun
                f0 = f(z0)
                if f0 < fz:
                    z, fz = z0, f0
            else:
                z, fz, _ = _minimise(f, z0, bounds, polish=True)
        return float(fz), z

    def profile_interval(self, name: str, level: float = 0.95, deviance: str = "ML") -> tuple[float, float]:
        """Profile-likelihood interval of a variance component, ICC, the ICC ratio or the correlation.

        ``name``: ``therapist[<level>]``, ``residual`` (``residual[<level>]``), ``correlation``,
        ``icc[<level>]`` or ``icc_ratio``. ``deviance="ML"`` profiles the ML deviance as lme4's
        ``profile()`` does (for REML fits too); ``"REML"`` profiles the restricted likelihood.
        The limits are where the signed root deviance equals the normal quantile (likelihood-ratio
        chi-square with 1 df).
        """
        deviance = deviance.upper()
        key = (name, level, deviance)
        if key in self._profile_cache:
            return self._profile_cache[key]
        targets = self._targets(deviance)
        if name not in targets:
            raise ModelError(f"cannot profile {name!r}; choose one of {sorted(targets)}")
        t = targets[name]
        dev_min = self._optimum(deviance).deviance
        lims = _profile_limits(
            lambda c, z: self._profile_dev(t, c, z, deviance), t.estimate, dev_min, t.z0, t.scale, level,
            t.upper_limit,
        )
        self._profile_cache[key] = lims
        return lims

    # ------------------------------------------------------------------------------------------
    # parametric bootstrap
    def _bootstrap(self, n_boot: int, seed):
        seed = 0 if seed is None else seed  # the one seed rule: seed=None is seed 0
        key = (n_boot, seed)
        if key in self._boot_cache:
            return self._boot_cache[key]
        m = self.model
        eng = m._eng
        rng = np.random.default_rng(seed)
        mu = eng.X @ self.fe_params.to_numpy()
        w, V = np.linalg.eigh(self.cov_re)
        Lre = V * np.sqrt(np.maximum(w, 0.0))
        res_sd = np.sqrt(self.residual_var)
        clus_sd = math.sqrt(self.sigma2 * self.gc_rel)
        y0 = eng.y
        rows = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in track(range(n_boot), f"parametric bootstrap ({n_boot} refits)"):
                u = rng.standard_normal((eng.T, 2)) @ Lre.T
                e = rng.standard_normal(eng.N) * res_sd[eng.acode]
                ystar = mu + u[eng.tcode, eng.acode] + e
                if m.cluster_random:
                    v = rng.standard_normal(eng.n_clust) * clus_sd
                    ystar = ystar + v[eng.tclust[eng.tcode]]
                eng.set_y(ystar)
                try:
                    opt = m._optimise(self.method, start=self.opt.x)
                    gc = m._gc(opt.x)
                    _, s2, _, _ = eng.gls(opt.G, opt.r, not m.correlated, self.method, gc)
                    icc = self._icc_from(opt.G, opt.r, gc)
                    row = {
                        "cluster": s2 * (gc or 0.0),
                        "therapist[0]": s2 * opt.G[0, 0], "therapist[1]": s2 * opt.G[1, 1],
                        "residual[0]": s2 * opt.r[0], "residual[1]": s2 * opt.r[1],
                        "icc[0]": icc[0], "icc[1]": icc[1],
                        "icc_ratio": icc[1] / icc[0] if icc[0] > 0 else np.nan,
                    }
                    if m.correlated:
                        d = np.sqrt(np.diag(opt.G))
                        row["correlation"] = opt.G[0, 1] / (d[0] * d[1]) if np.all(d > 0) else np.nan
                    rows.append(row)
                except Exception:  # noqa: BLE001 - a failed refit is recorded as missing
                    rows.append({})
                finally:
                    eng.set_y(y0)
        boot = pd.DataFrame(rows)
        self._boot_cache[key] = boot
        return boot

    def _boot_interval(self, name: str, level: float, n_boot: int, seed):
        boot = self._bootstrap(n_boot, seed)
        m = self.model
        col = name
        if "[" in name:  # therapist[<level>] -> therapist[<arm index>]
            base, lv = name[:-1].split("[", 1)
            col = f"{base}[{m.arm_levels.index(lv)}]" if lv in m.arm_levels else name
        if col == "residual":
            col = "residual[0]"
        vals = boot[col].to_numpy(dtype=float)
        ok = np.isfinite(vals)
        if ok.mean() < 0.9:
            self._warn(
                f"{(~ok).sum()} of {len(vals)} bootstrap refits gave no {name} (undefined ratio or failure)",
                StatisticalWarning,
            )
        a = (1 - level) / 2
        return float(np.quantile(vals[ok], a)), float(np.quantile(vals[ok], 1 - a))

    def lme4_profile_interval(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """lme4's ``confint(fit, method = "profile")`` for a variance component, step for step.

        lme4 does not solve for the interval limits: ``profile.merMod`` evaluates the ML profile
        on the standard-deviation scale at points chosen to step the signed root deviance (zeta) by
        ``delta = sqrt(qchisq(0.99, n_parameters)) / 8``, fits a natural interpolation spline of
        zeta on the parameter (``splines::interpSpline``), inverts it (``splines::backSpline``) and
        reads off zeta = -1.96 and 1.96. This replicates that algorithm on this package's exact
        profile, so that it reproduces lme4's numbers (including the spline's interpolation error,
        which is noticeable where the profile flattens towards a variance of zero);
        :meth:`profile_interval` gives the exact limits.
        """
        key = ("lme4", name, level)
        if key in self._profile_cache:
            return self._profile_cache[key]
        targets = self._targets("ML")
        var_names = [k for k in targets if k.startswith(("therapist[", "residual", "cluster"))]
        if name not in var_names:
            raise ModelError(f"lme4-style profile only for variance components {var_names}, not {name!r}")
        t = targets[name]
        base = self._optimum("ML").deviance
        nptot = len(var_names) + (1 if self.model.correlated else 0) + self.model._eng.p
        cutoff = math.sqrt(stats.chi2.ppf(0.99, nptot))
        delta = cutoff / 8.0
        pw = math.sqrt(max(t.estimate, 0.0))
        state = {"z": t.z0.copy()}

        def zeta(sd):
            fz, z = self._profile_dev(t, sd * sd, state["z"], "ML")
            state["z"] = z
            return math.copysign(math.sqrt(max(fz - base, 0.0)), sd - pw) if sd != pw else 0.0

        def fill(rows, lowcut=0.0, upcut=np.inf, maxpts=100):
            i = 1  # 0-based index of the last filled row
            while i < maxpts - 1 and lowcut < rows[i][1] < upcut and abs(rows[i][0]) <= cutoff:
                (z0, p0), (z1, p1) = rows[i - 1], rows[i]
                num, den = p1 - p0, z1 - z0
                if den == 0 or not np.isfinite(den):
                    step = 1e-6
                else:
                    step = delta * num / den
                    if step < 0:
                        step = 1e-6
                    elif abs(step) > 10 * abs(num):
                        step = math.copysign(10 * abs(num), step)
                nxt = min(upcut, max(lowcut, p1 + math.copysign(step, num)))
                rows.append((zeta(nxt), nxt))
                i += 1
            return rows

        shift = 1e-3 if pw == 0 else pw * 1.01
        zs = zeta(shift)
        up = fill([(0.0, pw), (zs, shift)])
        state["z"] = t.z0.copy()
        down = fill([(zs, shift), (0.0, pw)]) if pw > 0 else []
        pts = sorted(set(up + down), key=lambda r: r[1])
        x = np.array([p for _, p in pts])
        y = np.array([z for z, _ in pts])
        zq = stats.norm.ppf([(1 - level) / 2, (1 + level) / 2])
        sd_ci = _r_backspline_predict(x, y, zq)
        lo = 0.0 if not np.isfinite(sd_ci[0]) else sd_ci[0] ** 2
        hi = np.inf if not np.isfinite(sd_ci[1]) else sd_ci[1] ** 2
        self._profile_cache[key] = (float(lo), float(hi))
        return self._profile_cache[key]

    def _interval(self, name, level, method, n_boot, seed, deviance):
        if method == "profile" and name.startswith(("therapist[", "residual", "cluster")):
            return self.lme4_profile_interval(name, level)
        if method in ("profile", "profile_exact"):
            return self.profile_interval(name, level, deviance)
        if method == "bootstrap":
            return self._boot_interval(name, level, n_boot, seed)
        raise ModelError(f"interval method must be 'profile', 'profile_exact' or 'bootstrap', got {method!r}")

    # ------------------------------------------------------------------------------------------
    # public interface
    def conf_int(
        self, level: float = 0.95, method: str = "profile", *, n_boot: int = DEFAULT_N_BOOT, seed=None, deviance: str = "ML"
    ) -> pd.DataFrame:
        """Intervals for the fixed effects (Wald) and the variance components (profile or bootstrap).

        Variance-component rows are named as in :attr:`vcomp`. Methods:

        * ``"profile"`` (default): lme4's ``confint(fit, method = "profile")`` squared onto the
          variance scale, reproduced step for step (ML deviance, spline interpolation; see
          :meth:`lme4_profile_interval`); the correlation (``correlated=True``) by exact profile.
        * ``"profile_exact"``: the exact likelihood-ratio limits (root of the profiled deviance,
          ``deviance="ML"`` or ``"REML"``); they differ from lme4's only where lme4's spline is
          inaccurate, i.e. near a variance of zero.
        * ``"bootstrap"``: seeded parametric-bootstrap percentiles (``n_boot``, ``seed``).

        Fixed effects always get Wald intervals (estimate -/+ z se).
        """
        z = stats.norm.ppf(0.5 + level / 2)
        rows = {
            nm: (float(b - z * s), float(b + z * s)) for nm, b, s in zip(self.fe_params.index, self.fe_params, self.bse)
        }
        for nm in self.vcomp:
            if nm == "cov(therapist)":
                continue
            rows[nm] = self._interval(nm, level, method, n_boot, seed, deviance)
        if self.model.correlated:
            rows["correlation"] = self._interval("correlation", level, method, n_boot, seed, deviance)
        return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])

    def icc_by_arm(
        self, level: float = 0.95, method: str = "profile", *, n_boot: int = DEFAULT_N_BOOT, seed=None, deviance: str = "ML"
    ) -> pd.DataFrame:
        """Therapist ICC in each arm, ``s2_a / (s2_a + residual_a)``, with its interval.

        ``method="profile"`` (or ``"profile_exact"``): exact profile-likelihood limits (ML deviance
        by default, like lme4's profiles; ``deviance="REML"`` for the restricted likelihood);
        ``"bootstrap"``: seeded parametric bootstrap. The ICC ratio and reduction take the same
        arguments; the ratio's profile fixes ICC_feedback = c * ICC_control and maximises over the rest.
        """
        icc = self.icc_point()
        out = []
        for a, lv in enumerate(self.model.arm_levels):
            lo, hi = self._interval(f"icc[{lv}]", level, method, n_boot, seed, deviance)
            out.append({"arm": lv, "role": "control" if a == 0 else "feedback", "estimate": float(icc[a]),
                        "ci_low": lo, "ci_high": hi, "ci_method": method})
        return pd.DataFrame(out).set_index("arm")

    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed=None, deviance: str = "ML") -> ICC:
        """The engines' common ``icc()``: rows ``icc[<arm>]`` (with a ``role`` column), the ICC of
        each arm; no single therapist ICC, so the float value is NaN. With a ``level``, the
        intervals of :meth:`icc_by_arm`."""
        if level is None:
            return per_arm_icc(self.model.arm_levels, self.icc_point())
        method = method or self.default_interval
        return per_arm_icc(self.model.arm_levels, self.icc_point(),
                           self.icc_by_arm(level, method, n_boot=n_boot, seed=seed, deviance=deviance), method)

    def icc_ratio(
        self, level: float = 0.95, method: str = "profile", *, n_boot: int = DEFAULT_N_BOOT, seed=None, deviance: str = "ML"
    ) -> dict:
        """Feedback ICC / control ICC (< 1: feedback narrows the gap between therapists)."""
        lo, hi = self._interval("icc_ratio", level, method, n_boot, seed, deviance)
        return {"estimate": self.ratio_point(), "ci_low": lo, "ci_high": hi, "ci_method": method}

    def icc_reduction(
        self, level: float = 0.95, method: str = "profile", *, n_boot: int = DEFAULT_N_BOOT, seed=None, deviance: str = "ML"
    ) -> dict:
        """Relative reduction of the therapist ICC with feedback, ``1 - ICC_feedback / ICC_control``."""
        r = self.icc_ratio(level, method, n_boot=n_boot, seed=seed, deviance=deviance)
        return {"estimate": 1.0 - r["estimate"], "ci_low": 1.0 - r["ci_high"], "ci_high": 1.0 - r["ci_low"],
                "ci_method": method}

    def lrt_equal_variances(self) -> dict:
        """Likelihood-ratio test of equal therapist variances in the two arms (s2_control = s2_feedback).

        Both models share the fixed effects, so the test uses the fit's own criterion (REML or ML);
        chi-square with 1 df (the null value is interior to the parameter space).
        """
        if "lrt" in self._profile_cache:
            return self._profile_cache["lrt"]
        m = self.model
        eng = m._eng
        method = self.method

        def build(z):
            th = np.array([z[0], z[0]])
            k = 1
            rho = None
            if m.correlated:
                rho = z[k]
                k += 1
            rr = np.array([1.0, math.exp(z[k])]) if m.arm_residual else np.ones(2)
            return _G_from_theta(th, rho), rr

        bounds = [(0.0, None)] + ([(-1.0, 1.0)] if m.correlated else []) + ([(-12.0, 12.0)] if m.arm_residual else [])
        th = np.sqrt(np.diag(self.G_rel))
        z0 = [float(np.sqrt(np.mean(th**2)))] + ([0.0] if m.correlated else []) + (
            [math.log(self.r_rel[1])] if m.arm_residual else []
        )
        if m.cluster_random:
            bounds.append((0.0, None))
            z0.append(math.sqrt(self.gc_rel))

        def dev(z):
            gc = float(z[-1]) ** 2 if m.cluster_random else None
            return eng.deviance(*build(z), not m.correlated, method, gc=gc)

        best = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for start in (z0, [0.3] + z0[1:]):
                _, fz, _ = _minimise(dev, start, bounds)
                if best is None or fz < best:
                    best = fz
        stat = max(float(best - self.deviance), 0.0)
        out = {"statistic": stat, "df": 1, "p_value": float(stats.chi2.sf(stat, 1))}
        self._profile_cache["lrt"] = out
        return out

    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = None) -> pd.DataFrame:
        """Predicted therapist effects (BLUPs) per therapist and arm, on the outcome's scale.

        Columns as :meth:`therapist_effects.reml.MixedResults.therapist_effects`, plus ``arm``:
        ``caseload`` (the therapist's patients in that arm), ``raw_mean`` (their mean outcome),
        ``adjusted_mean`` (case-mix adjusted: the arm's mean fitted fixed part plus the therapist's
        mean residual in the arm; not shrunken), ``effect`` (BLUP: the therapist's deviation from
        the average therapist in that arm, shrunken towards 0), ``effect_se`` (conditional SD,
        lme4's ``condVar``, fixed effects treated as known), ``ci_low``/``ci_high`` and
        ``classification`` ("better/worse than average" when the interval excludes 0 and
        ``higher_is_better`` is given, "above/below average" otherwise, else "not distinguishable
        from average"). Cells where the therapist has no patients are omitted unless the model is
        ``correlated`` (then the other arm informs the prediction).
        """
        m = self.model
        if m.cluster_random:
            raise ModelError("therapist_effects() is not available with cluster_random=True; fit with the "
                             "clusters as fixed effects (categorical covariate) to rank therapists")
        eng = m._eng
        p = eng.p
        G, r = self.G_rel, self.r_rel
        b = self.fe_params.to_numpy()
        resid_sum = eng.S[:, :, p] - eng.S[:, :, :p] @ b
        s = resid_sum / r[None, :]
        D = eng.n / r[None, :]
        IGD = np.eye(2)[None] + G[None, :, :] * D[:, None, :]
        M = np.linalg.solve(IGD, np.broadcast_to(G, IGD.shape))
        u = np.einsum("tkl,tl->tk", M, s)
        var = self.sigma2 * np.stack([M[:, 0, 0], M[:, 1, 1]], axis=1)
        z = stats.norm.ppf(0.5 + level / 2)
        fitted = eng.X @ b
        arm_fixed = [float(fitted[eng.acode == a].mean()) for a in range(2)]
        rows = []
        for t in range(eng.T):
            for a, lv in enumerate(m.arm_levels):
                n = eng.n[t, a]
                if n == 0 and not m.correlated:
                    continue
                se = math.sqrt(max(var[t, a], 0.0))
                lo, hi = float(u[t, a] - z * se), float(u[t, a] + z * se)
                rows.append({
                    "therapist": self.model.therapist_labels[t], "arm": lv, "caseload": int(n),
                    "raw_mean": float(eng.S[t, a, p] / n) if n else float("nan"),
                    "adjusted_mean": arm_fixed[a] + float(resid_sum[t, a] / n) if n else float("nan"),
                    "effect": float(u[t, a]), "effect_se": se, "ci_low": lo, "ci_high": hi,
                    "classification": str(classify_effects(lo, hi, higher_is_better)),
                })
        return pd.DataFrame(rows)

    def _summary_title(self) -> str:
        m = self.model
        return (f"Arm-specific therapist variances ({self.method}); control = {m.control_level}, "
                f"feedback = {m.feedback_level}")

    def _summary_info(self) -> dict:
        info = super()._summary_info()
        if self.model.correlated:
            info["correlation"] = self.correlation
        info["ICC ratio (fb/ctrl)"] = self.ratio_point()
        info["ICC reduction"] = 1.0 - self.ratio_point()
        return info

    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT, seed=None) -> dict:
        """The model's entry of ``estimates.json`` (plain JSON-serialisable values)."""
        m = self.model
        if interval == "wald":  # no Wald intervals for variances (their sampling distribution is skewed)
            self._warn("Wald intervals are not offered for variance components, ICCs or correlations; "
                       "profile-likelihood intervals are reported instead", StatisticalWarning)
            interval = "profile"
        ci = self.conf_int(0.95, interval, n_boot=n_boot, seed=seed)

        def num(v):
            v = float(v)
            return v if np.isfinite(v) else None

        fe = {nm: {"estimate": num(self.fe_params[nm]), "se": num(self.bse[nm]), "ci_low": num(ci.loc[nm, "lower"]),
                   "ci_high": num(ci.loc[nm, "upper"])} for nm in self.fe_params.index}
        vc = {}
        for nm, v in self.vcomp.items():
            if nm == "cov(therapist)":
                continue
            vc[nm] = {"estimate": num(v), "ci_low": num(ci.loc[nm, "lower"]), "ci_high": num(ci.loc[nm, "upper"])}
        icc = self.icc_by_arm(0.95, interval, n_boot=n_boot, seed=seed)
        icc_d = {lv: {"estimate": num(icc.loc[lv, "estimate"]), "ci_low": num(icc.loc[lv, "ci_low"]),
                      "ci_high": num(icc.loc[lv, "ci_high"]), "ci_method": interval} for lv in m.arm_levels}
        ratio = self.icc_ratio(0.95, interval, n_boot=n_boot, seed=seed)
        red = self.icc_reduction(0.95, interval, n_boot=n_boot, seed=seed)
        lrt = self.lrt_equal_variances()
        out = {
            "family": "gaussian",
            "method": self.method,
            "fixed_effects": fe,
            "variance_components": vc,
            "icc_by_arm": icc_d,
            "icc_ratio": {k: (num(v) if k != "ci_method" else v) for k, v in ratio.items()},
            "icc_reduction": {k: (num(v) if k != "ci_method" else v) for k, v in red.items()},
            "lrt_equal_variances": {"statistic": num(lrt["statistic"]), "df": int(lrt["df"]),
                                    "p_value": num(lrt["p_value"])},
            "feedback_level": m.feedback_level,
            "control_level": m.control_level,
            **self.fit_fields(),
            "n_patients": int(self.n_patients),
            "n_therapists": int(self.n_therapists),
            "n_clusters": m.n_clusters,
            "warnings": [str(w) for w in self.warnings],
        }
        if m.correlated:
            cl, ch = ci.loc["correlation"]
            out["correlation"] = {"estimate": num(self.correlation), "ci_low": num(cl), "ci_high": num(ch)}
        return out

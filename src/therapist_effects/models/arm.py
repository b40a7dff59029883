"""Arm-specific therapist effects: does routine progress feedback narrow the gap between therapists?

The model (lme4: ``y ~ x + feedback + (0 + control | therapist) + (0 + feedback | therapist)`` with
``control = 1 - feedback``; glmmTMB: ``diag(0 + factor(feedback) | therapist)``) gives each therapist
*t* a separate effect in each arm *a* (control, feedback)::

    y_i = x_i' b + u_{t(i), a(i)} + e_i,    u_{t,a} ~ N(0, s2_a),    e_i ~ N(0, s2 * r_a)

with ``r_a = 1`` unless ``arm_residual=True`` (arm-specific residual variances). By default the two
arm effects of a therapist are independent; ``correlated=True`` estimates their covariance for
therapists who treat patients in both arms (a 2 x 2 covariance per therapist, which is the same model
as a random feedback slope across therapists, see :mod:`therapist_effects.models.slopes`).

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

from ..classify import classify_effects
from .design import fixed_effects_matrix, group_codes
from ..engine.gaussian import BlockEngine, lambda_to_theta, psd_cholesky
from ..engine.inference import DEFAULT_LEVEL, DEFAULT_N_BOOT
from .arm_inference import ArmBootstrap, ArmProfiles
from ..engine.results import DEFAULT_INTERVAL, ICC, ModelResults, per_arm_icc, reduction_from_ratio
from ..exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning

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


def two_arms(arm, feedback_level) -> tuple[np.ndarray, str, str]:
    """``(labels, control, feedback)``: the arm label of every patient (:func:`arm_labels`) and the
    two levels of an arm variable with exactly two levels, ``feedback_level`` one of them."""
    labels = arm_labels(arm)
    levels = sorted(set(labels))
    fb = _label(feedback_level)
    if len(levels) != 2:
        raise ModelError(f"arm must have exactly two levels (control, feedback), found {levels}")
    if fb not in levels:
        raise ModelError(f"feedback_level {fb!r} is not a level of arm (levels: {levels})")
    return labels, [lv for lv in levels if lv != fb][0], fb


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
        self.tclust = tclust  # (int64 codes, as group_codes gives them)
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
        self.block = BlockEngine(y, X, Z, tcode, n_therapists, cluster=self.tclust,
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
        self.block.set_y(y)
        ZA = self.block.ZA  # per-cell outer products of the (centred) sums, for grad_g
        self._O = (ZA[:, :, :, None] * ZA[:, :, None, :]).reshape(T, K, -1)

    def theta(self, G, gc=None) -> np.ndarray | None:
        """The block engine's theta at ``G`` (and ``gc``); None when ``G`` is not a covariance."""
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

    def deviance(self, G, r, method: str, sigma2: float | None = None, gc: float | None = None) -> float:
        """-2 log (restricted) likelihood; ``sigma2`` profiled out when None (``G`` carries its structure)."""
        th = self.theta(G, gc)
        if th is None:
            return np.inf
        return self.block.crit(th, method == "REML", ratios=r, sigma2=sigma2)

    def gls(self, G, r, method, gc=None):
        """``(beta, sigma2, cov_beta)``: GLS fixed effects, the (RE)ML residual variance and lme4's ``vcov``."""
        th = self.theta(G, gc)
        beta, cov, rss, _ = self.block.fixed(th, ratios=r)
        nu = self.N - self.p if method == "REML" else self.N
        sigma2 = rss / nu
        return beta, sigma2, sigma2 * cov


# ----------------------------------------------------------------------------------------------
# parameterisations
# ----------------------------------------------------------------------------------------------


def _minimise(f, x0, bounds, jac=None, polish=True):
    """Bounded minimisation: SLSQP (analytic or finite-difference gradient), then a bounded
    Nelder-Mead polish. (scipy's L-BFGS-B carries a large per-call overhead in this environment.)"""
    lo = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    hi = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    x0 = np.clip(x0, lo, hi)
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
        labels, control, fb = two_arms(arm, feedback_level)
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
    def _gc(self, x):
        """Relative cluster variance (last element of the parameter vector), None without that level."""
        return float(x[-1]) ** 2 if self.cluster_random else None

    def _unpack(self, x):
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
        """The optimiser's start vector at the diagonal ``G`` and the ratios ``r`` of :meth:`_start_values`."""
        sd = list(np.sqrt(np.diag(G)))
        x = [sd[0], 0.0, sd[1]] if self.correlated else sd
        if self.arm_residual:
            x.append(math.log(r[1]))  # r[0] is 1
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
            th = np.append(x[:nt], x[-1]) if self.cluster_random else x[:nt]
            r = np.array([1.0, math.exp(x[nt])]) if self.arm_residual else None
            return eng.block.crit(th, reml, ratios=r)

        def grad(x):  # chain rule through g = theta^2 (diagonal G, one residual variance, no cluster level)
            _, gg = eng.grad_g(x**2, method)
            return gg * 2.0 * x

        jac = grad if diagonal and not self.arm_residual and not self.cluster_random else None

        if start is None:
            G0, r0 = self._start_values()
            starts = [self._pack_from(G0, r0)]
            x1 = starts[0].copy()
            x1[: (3 if self.correlated else 2)] = [0.3, 0.0, 0.3] if self.correlated else 0.3
            starts.append(x1)
        else:
            starts = [start]
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


@dataclass
class ArmVarianceResults(ArmProfiles, ArmBootstrap, ModelResults):
    """Fitted arm-specific therapist-variance model."""

    model: ArmVarianceModel
    opt: _Optimum
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        m, opt = self.model, self.opt
        eng = m._eng
        gc = m._gc(opt.x)
        beta, sigma2, cov_beta = eng.gls(opt.G, opt.r, opt.method, gc)
        self.sigma2 = float(sigma2)
        self.gc_rel = 0.0 if gc is None else gc
        self.G_rel, self.r_rel = opt.G, opt.r
        self.cov_re = sigma2 * opt.G  # therapist covariance (control, feedback)
        self.residual_var = sigma2 * opt.r
        self.cov_params_fe = self._set_fixed_effects(beta, cov_beta, m.exog_names)
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
            self.correlation = float(self.cov_re[0, 1] / (sd[0] * sd[1])) if np.all(sd > 0) else math.nan
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
        return float(icc[1] / icc[0]) if icc[0] > 0 else math.nan

    def _interval(self, name, level, method, n_boot, seed, deviance):
        if deviance.upper() not in ("ML", "REML"):
            raise ModelError(f"deviance must be 'ML' or 'REML', got {deviance!r}")
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
        self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL, *, n_boot: int = DEFAULT_N_BOOT, seed=None,
        deviance: str = "ML"
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
        self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL, *, n_boot: int = DEFAULT_N_BOOT, seed=None,
        deviance: str = "ML"
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
        self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL, *, n_boot: int = DEFAULT_N_BOOT, seed=None,
        deviance: str = "ML"
    ) -> dict:
        """Feedback ICC / control ICC (< 1: feedback narrows the gap between therapists)."""
        lo, hi = self._interval("icc_ratio", level, method, n_boot, seed, deviance)
        return {"estimate": self.ratio_point(), "ci_low": lo, "ci_high": hi, "ci_method": method}

    def icc_reduction(
        self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL, *, n_boot: int = DEFAULT_N_BOOT, seed=None,
        deviance: str = "ML"
    ) -> dict:
        """Relative reduction of the therapist ICC with feedback, ``1 - ICC_feedback / ICC_control``."""
        return reduction_from_ratio(self.icc_ratio(level, method, n_boot=n_boot, seed=seed, deviance=deviance))

    def therapist_effects(self, level: float = DEFAULT_LEVEL, higher_is_better: bool | None = None) -> pd.DataFrame:
        """Predicted therapist effects (BLUPs) per therapist and arm, on the outcome's scale.

        Columns as :meth:`therapist_effects.models.reml.MixedResults.therapist_effects`, plus ``arm``:
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
                    "raw_mean": float(eng.S[t, a, p] / n) if n else math.nan,
                    "adjusted_mean": arm_fixed[a] + float(resid_sum[t, a] / n) if n else math.nan,
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

    def to_contract(self, interval: str = DEFAULT_INTERVAL, n_boot: int = DEFAULT_N_BOOT, seed=None) -> dict:
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

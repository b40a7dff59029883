"""Random slopes across therapists: who gains most from routine progress feedback?

The model (lme4: ``y ~ x + feedback + (1 + feedback | therapist)``; any patient-level covariate
may take the place of ``feedback`` as the slope variable, ``slope: <column>`` in the config)::

    y_i = x_i' b + b_s s_i + a_t + c_t s_i + e_i,
    (a_t, c_t) ~ N(0, [[s2_a, cov], [cov, s2_c]]),   e_i ~ N(0, s2)

``a_t`` (intercept) is therapist t's effect at ``s = 0`` (without feedback), ``c_t`` (slope) how
much the slope variable changes the therapist's patients' outcomes beyond the average ``b_s``. A
negative intercept-slope correlation on an outcome where higher is worse (PHQ-9) means therapists
whose patients do worse without feedback gain more from it: feedback *narrows the gap*.

Fitted by the exact engine :class:`therapist_effects.engine.gaussian.BlockEngine` (q = 2 random
effects per therapist, per-therapist sufficient statistics, Cholesky parameterisation as lme4's
theta, so a correlation of +-1 is reached exactly and flagged as lme4's ``isSingular`` flags it).
Fixed-effect standard errors are lme4's ``vcov``. Intervals: profile likelihood of the ML deviance
(as lme4's ``confint(method = "profile")``) with the root search of
:mod:`therapist_effects.engine.inference`, or the seeded parametric bootstrap of the same module.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .arm import arm_design
from ..classify import classify_effects
from .design import fixed_effects_matrix, group_codes
from ..engine.derivatives import slope_deviance
from ..engine.gaussian import SINGULAR_TOL, BlockEngine, minimise_box, newton_box
from ..engine.results import ICC, ModelResults, icc_table
from ..engine.inference import (DEFAULT_LEVEL, DEFAULT_N_BOOT, chi2_cut, parametric_bootstrap,
                               signed_root_limit, wald_interval)
from ..exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning

__all__ = ["RandomSlopeModel", "RandomSlopeResults"]

_VC = ("therapist", "therapist_slope", "residual")
#: lower bound of the log relative SDs in the profiles' inner problems: an SD of exp(-50) ~ 2e-22
#: (relative to sigma) is 0 to double precision, and a bound lets Newton stop there
_LOG_SD_FLOOR = -50.0


def slope_design(df: pd.DataFrame, outcome: str, covariates, therapist: str, slope: str):
    """(y, X, exog names) of a random slope on a numeric patient-level column: the slope column is
    also a fixed effect (appended to the covariates when not listed); one-line errors for a missing
    column, a non-numeric slope and missing values."""
    for col in (outcome, therapist, slope, *covariates):
        if col not in df.columns:
            raise ModelError(f"column {col!r} is not in the patient table (columns: {list(df.columns)})")
    if not pd.api.types.is_numeric_dtype(df[slope]):
        raise ModelError(f"slope column {slope!r} must be numeric")
    terms = list(covariates) + ([] if slope in covariates else [slope])
    used = list(dict.fromkeys([outcome, therapist, *terms]))
    if df[used].isna().any(axis=None):
        raise ModelError(f"missing values in {used}; drop those rows before fitting")
    X, names = fixed_effects_matrix(df, terms, intercept=True)
    return df[outcome].to_numpy(float), X, names


def gap_frame(labels, codes: np.ndarray, slope: np.ndarray, u: np.ndarray, slope_fixed: float,
              binary: bool) -> pd.DataFrame:
    """The narrowing-the-gap table of a random-slope fit (gaussian or logistic): per therapist the
    caseload (split by arm for a binary slope), the intercept and slope effects ``u`` (rows of the
    therapists' random effects), the control and feedback effects and the therapist's feedback effect
    (the fixed slope ``slope_fixed`` plus their own)."""
    G = len(labels)
    n = np.bincount(codes, minlength=G)
    nf = np.bincount(codes, weights=(slope == 1.0).astype(float), minlength=G)
    out = pd.DataFrame({"therapist": labels, "n_patients": n.astype(int),
                        "n_control": (n - nf).astype(int), "n_feedback": nf.astype(int),
                        "intercept": u[:, 0], "slope": u[:, 1], "effect_control": u[:, 0],
                        "effect_feedback": u[:, 0] + u[:, 1], "feedback_effect": slope_fixed + u[:, 1]})
    if not binary:
        out = out.drop(columns=["n_control", "n_feedback"])
    return out


def _theta(t1: float, t2: float, rho: float) -> np.ndarray:
    """lme4's theta of (relative intercept SD, relative slope SD, correlation)."""
    return np.array([t1, rho * t2, t2 * math.sqrt(max(1.0 - rho * rho, 0.0))])


def _criterion(eng: BlockEngine, g: np.ndarray, criterion: str) -> float:
    """The value alone of :func:`~therapist_effects.engine.derivatives.slope_deviance` at ``g = (log
    t1, log t2, rho, log s2)``, by the engine's criterion."""
    th = _theta(math.exp(g[0]), math.exp(g[1]), g[2])
    return eng.dev_ml(th, math.exp(g[3])) if criterion == "ml" else eng.crit(th, criterion == "profiled_reml")


def _newton_fit(eng: BlockEngine, criterion: str, theta0: np.ndarray) -> tuple[np.ndarray, float, bool] | None:
    """Minimum ``(theta, criterion, trusted)`` of lme4's deviance (``"profiled_ml"``) or REMLcrit
    (``"profiled_reml"``) by :func:`~therapist_effects.engine.gaussian.newton_box` in ``(log t1,
    log t2, rho)`` from ``theta0``: a correlation of +-1 is held exactly on its bound, so such a
    singular optimum is exactly singular. None when Newton does not vouch for its answer; not
    ``trusted`` when an SD ends at the floor (the log scale cannot tell an SD of 0 from a small one)
    or an SD or a diagonal of theta ends within ``(0, 1e-3)``, near the boundary but not on it."""
    fl = _LOG_SD_FLOOR
    t1, t2 = theta0[0], math.hypot(theta0[1], theta0[2])
    z0 = np.array([math.log(max(t1, math.exp(fl))), math.log(max(t2, math.exp(fl))),
                   theta0[1] / t2 if t1 > 0.0 and t2 > 0.0 else 0.0])

    def fgh(z):
        f, grad, hess = slope_deviance(eng, np.append(z, 0.0), criterion)
        return f, grad[:3], hess[:3, :3]
    z, _, ok = newton_box(fgh, z0, np.array([fl, fl, -1.0]), np.array([np.inf, np.inf, 1.0]))
    if not ok:
        return None
    sd = [0.0 if v <= fl else math.exp(v) for v in z[:2]]
    theta = _theta(sd[0], sd[1], z[2])
    trusted = not any(0.0 <= v < 1e-3 for v in sd) and not any(0.0 < theta[k] < 1e-3 for k in (0, 2))
    return theta, eng.crit(theta, criterion == "profiled_reml"), trusted


def _optimum(eng: BlockEngine, reml: bool, theta0: np.ndarray, global_start: np.ndarray | None = None
             ) -> tuple[np.ndarray, float, bool]:
    """Exact optimum ``(theta, criterion, converged)``: :func:`_newton_fit` from ``theta0`` where it
    vouches for its answer; otherwise the engine's global search (interior and every face of the
    boundary, :func:`~therapist_effects.engine.gaussian.minimise_theta`, from ``global_start``),
    unless Newton's point is lower than the search's answer (the search can stop short of the
    optimum: e.g. at a face of the boundary 5 units of deviance above it)."""
    criterion = "profiled_reml" if reml else "profiled_ml"
    cand = _newton_fit(eng, criterion, theta0)
    if cand is not None and cand[2]:
        return cand[0], cand[1], True
    theta, fmin, ok = eng.fit(reml, global_start)
    if cand is not None and cand[1] < fmin - 1e-9:
        return cand[0], cand[1], True
    return theta, fmin, ok


def _correlation(theta: np.ndarray) -> float:
    """Intercept-slope correlation of lme4's theta: ``l21 / sqrt(l21^2 + l22^2)`` (exactly +-1 on
    the boundary l22 = 0); NaN when either variance is 0."""
    t2 = math.hypot(theta[1], theta[2])
    if not (theta[0] > 0.0 and t2 > 0.0):
        return math.nan
    return float(theta[1] / t2)


class RandomSlopeModel:
    """``outcome ~ covariates + (1 + slope | therapist)``, exact REML or ML.

    Parameters
    ----------
    endog : outcome per patient.
    exog : fixed-effects design including the intercept (and, usually, the slope variable).
    therapist : therapist of each patient.
    slope : the random slope's variable per patient (a 0/1 feedback indicator or any numeric
        patient-level covariate).
    exog_names : names of the fixed effects; ``slope_name`` names the slope variable.
    method : ``"REML"`` (default) or ``"ML"``.
    """

    def __init__(self, endog, exog, therapist, slope, *, exog_names: Sequence[str] | None = None,
                 slope_name: str = "feedback", method: str = "REML"):
        method = str(method).upper()
        if method not in ("REML", "ML"):
            raise ModelError(f"method must be 'REML' or 'ML', got {method!r}")
        self.y = np.asarray(endog, dtype=float).reshape(-1)
        X = np.asarray(exog, dtype=float)
        self.X = X[:, None] if X.ndim == 1 else X
        self.slope = np.asarray(slope, dtype=float).reshape(-1)
        self.therapist = np.asarray(therapist, dtype=object)
        if not (len(self.therapist) == len(self.y) == len(self.slope) == self.X.shape[0]):
            raise ModelError("outcome, design, therapist and slope variable must have one entry per patient")
        if not (np.all(np.isfinite(self.y)) and np.all(np.isfinite(self.X)) and np.all(np.isfinite(self.slope))):
            raise ModelError("outcome, covariates or slope variable contain missing or infinite values")
        self.exog_names = list(exog_names) if exog_names is not None else [f"x{j}" for j in range(self.X.shape[1])]
        if np.linalg.matrix_rank(self.X) < self.X.shape[1]:
            raise ModelError(f"fixed-effects design {self.exog_names} is rank deficient")
        self.slope_name = slope_name
        self.method = method
        self.binary = bool(np.isin(self.slope, (0.0, 1.0)).all())
        self.tcode, self.therapist_labels = group_codes(self.therapist)
        G = len(self.therapist_labels)
        Z = np.column_stack([np.ones(len(self.y)), self.slope])
        self._eng = BlockEngine(self.y, self.X, Z, self.tcode, G)
        # therapists whose patients vary in the slope variable carry information on the slope
        lo = np.full(G, np.inf)
        hi = np.full(G, -np.inf)
        np.minimum.at(lo, self.tcode, self.slope)
        np.maximum.at(hi, self.tcode, self.slope)
        if int((hi > lo).sum()) < 3:
            raise ModelError(f"a random slope on {slope_name!r} needs at least three therapists whose "
                             "patients differ in it (e.g. patients in both arms)")

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *,
                   therapist: str = "therapist", arm: str | None = "feedback", feedback_level=1,
                   slope: str | None = None, method: str = "REML") -> RandomSlopeModel:
        """Build from a patient table. Without ``slope`` the arm column becomes the 0/1 feedback
        indicator (fixed effect and random slope), named as :meth:`ArmVarianceModel.from_frame`
        names it; with ``slope`` that numeric column is the random slope (and a fixed effect,
        appended to the covariates when not listed)."""
        if slope is None or (arm is not None and slope == arm):
            if arm is None:
                raise ModelError("a random slope needs an arm column or a slope column")
            y, X, names, indicator, name = arm_design(
                df, outcome, covariates, therapist=therapist, arm=arm, feedback_level=feedback_level,
            )
            return cls(y, X, df[therapist].to_numpy(), indicator, exog_names=names, slope_name=name,
                       method=method)
        y, X, names = slope_design(df, outcome, covariates, therapist, slope)
        return cls(y, X, df[therapist].to_numpy(), df[slope].to_numpy(float), exog_names=names,
                   slope_name=slope, method=method)

    def fit(self) -> RandomSlopeResults:
        """Exact optimum (:func:`_optimum`): Newton with the analytic derivatives from lme4's start
        (Lambda = I on the engine's centred scale), or the engine's global search."""
        start = self._eng.from_centred(np.array([1.0, 0.0, 1.0]))
        theta, fmin, ok = _optimum(self._eng, self.method == "REML", start)
        return RandomSlopeResults(self, theta, fmin, ok)


class RandomSlopeResults(ModelResults):
    """Fitted random-slope model: exact estimates, profile/bootstrap intervals, BLUPs.

    Attributes: ``theta`` (lme4's), ``fe_params``, ``bse``, ``cov_params`` (lme4's ``vcov``),
    ``cov_re`` (therapist covariance of intercept and slope), ``scale`` (residual variance),
    ``vcomp``, ``correlation``, ``loglik``, ``aic``, ``bic``, ``converged``, ``singular``.
    """

    def __init__(self, model: RandomSlopeModel, theta: np.ndarray, crit_min: float, converged: bool):
        self.model = model
        eng = model._eng
        self._eng = eng
        self.method = model.method
        self._reml = self.method == "REML"
        self.theta = np.asarray(theta, dtype=float)
        self._crit_min = float(crit_min)
        b, covu, r, bc = eng.fixed(self.theta)
        self.scale = r / (eng.n - eng.p) if self._reml else r / eng.n
        self._bc = bc
        names = model.exog_names
        self.cov_params = self._set_fixed_effects(b, self.scale * covu, names)  # lme4's vcov(fit)
        lam = np.array([[self.theta[0], 0.0], [self.theta[1], self.theta[2]]])
        cov = self.scale * lam @ lam.T
        re_names = ["(Intercept)", model.slope_name]
        self.cov_re = pd.DataFrame(cov, index=re_names, columns=re_names)
        self.correlation = _correlation(self.theta)
        self.vcomp = {"therapist": float(cov[0, 0]), "therapist_slope": float(cov[1, 1]),
                      "residual": float(self.scale)}
        self.params = pd.concat([self.fe_params, pd.Series(self.vcomp)])
        self.loglik = -0.5 * self._crit_min
        self.n_patients = eng.n
        self.n_therapists = eng.G
        self.converged = bool(converged)
        self.singular = bool(self.theta[0] < SINGULAR_TOL or self.theta[2] < SINGULAR_TOL)
        self.warnings: list[str] = []
        self._cache: dict = {}
        if not self.converged:
            self._warn("random-slope optimiser did not report convergence", ConvergenceWarning)
        if self.singular:
            self._warn("singular fit: the intercept or slope variance is 0 or the intercept-slope "
                       f"correlation is -1/+1 (correlation {self.correlation:.4g})", SingularFitWarning)

    def _n_params(self) -> int:
        """Fixed effects, the three theta and sigma (lme4's df of logLik)."""
        return int(self._eng.p + 3 + 1)

    def _warn(self, msg, category):
        if msg not in self.warnings:
            self.warnings.append(msg)
        warnings.warn(msg, category, stacklevel=3)

    # -- ML optimum (lme4's profile() refits by ML) -------------------------------------------
    def _ml(self):
        if "ml" not in self._cache:
            if self._reml:
                th, dmin, _ = _optimum(self._eng, False, self.theta, self.theta)  # close: a few Newton steps
            else:
                th, dmin = self.theta, self._crit_min
            s2 = self._eng.scale(th, False)
            t1 = th[0]
            t2 = math.hypot(th[1], th[2])
            rho = th[1] / t2 if t1 > 0 and t2 > 0 else 0.0
            self._cache["ml"] = (th, dmin, s2, t1, t2, rho)
        return self._cache["ml"]

    def _wald_step(self, name: str, q: float) -> float | None:
        """Distance from the ML estimate to the profile limit predicted by the quadratic approximation
        of the ML deviance (its analytic Hessian at the optimum), on the scale the profile steps on
        (log variance, correlation); None at a boundary estimate or a Hessian that is not positive
        definite (the profile then steps from its default)."""
        th, _, s2, t1, t2, rho = self._ml()
        if not (t1 > 0.0 and t2 > 0.0 and abs(rho) < 1.0):
            return None
        _, _, hess = slope_deviance(self._eng, np.array([math.log(t1), math.log(t2), rho, math.log(s2)]), "ml")
        grad = {"therapist": [2.0, 0.0, 0.0, 1.0], "therapist_slope": [0.0, 2.0, 0.0, 1.0],
                "residual": [0.0, 0.0, 0.0, 1.0], "correlation": [0.0, 0.0, 1.0, 0.0]}[name]
        try:
            var = 2.0 * float(np.asarray(grad) @ np.linalg.solve(hess, grad))  # deviance: cov = 2 H^-1
        except np.linalg.LinAlgError:
            return None
        return math.sqrt(q * var) if var > 0.0 and math.isfinite(var) else None

    def _profile(self, name: str, level: float) -> tuple[float, float]:
        key = ("profile", name, level)
        if key in self._cache:
            return self._cache[key]
        eng = self._eng
        th, dmin, s2, t1, t2, rho = self._ml()
        q = chi2_cut(level)
        # inner problems on log SDs (scale-free steps; the relative SDs differ by orders of
        # magnitude when the slope variable is on a wide scale; bounded below by _LOG_SD_FLOOR) and the
        # correlation on [-1, 1]
        fl = _LOG_SD_FLOOR
        ups3 = np.array([np.inf, np.inf, 1.0])
        state: dict = {}
        ln = lambda v: math.log(max(v, 1e-10))  # noqa: E731

        def inner(g0, J, criterion, lows, ups, drop=None):
            # inner minimisation over the other parameters z (the criterion's g = g0 + J z, see
            # :func:`slope_deviance`) by Newton with the analytic gradient and Hessian, warm-started
            # at the solution of the nearest point profiled so far (not the last one: the search also
            # visits the edge); ``drop``: a coordinate the criterion does not depend on at this point
            # (kept fixed). Bounded Nelder-Mead where Newton cannot vouch for its answer.
            c = state["c"]
            near = min(state["done"], key=lambda v: abs(v - c))
            start = state["done"][near]
            keep = [i for i in range(len(start)) if i != drop]
            Jk = J[:, keep]

            def full(zk):
                zz = start.copy()
                zz[keep] = zk
                return zz

            def fgh(zk):
                f, grad, hess = slope_deviance(eng, g0 + J @ full(zk), criterion)
                return f, Jk.T @ grad, Jk.T @ hess @ Jk

            zk, fz, ok = newton_box(fgh, start[keep], lows[keep], ups[keep])
            if not ok:
                zk, fz, _ = minimise_box(lambda zk: _criterion(eng, g0 + J @ full(zk), criterion), start[keep],
                                         lows[keep], ups[keep], xatol=1e-8, fatol=1e-10)
            state["done"][c] = full(zk)
            return fz

        if name == "correlation":
            if not (t1 > 0 and t2 > 0):
                out = (math.nan, math.nan)
                self._cache[key] = out
                return out
            z0 = np.array([ln(t1), ln(t2)])
            J = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # z = (log t1, log t2)

            def excess(c):
                state["c"] = c
                return inner(np.array([0.0, 0.0, c, 0.0]), J, "profiled_ml", np.full(2, fl),
                             np.full(2, np.inf)) - dmin
            kw = dict(lower=-1.0, upper=1.0, step=0.05)
            est = rho
        elif name in ("therapist", "therapist_slope"):
            k = 0 if name == "therapist" else 1
            other = t2 if k == 0 else t1
            z0 = np.array([0.5 * math.log(s2), ln(other), rho])
            # z = (log sigma, log t_other, rho): log t_k = log(c) / 2 - log sigma, log s2 = 2 log sigma
            J = np.zeros((4, 3))
            J[k, 0], J[1 - k, 1], J[2, 2], J[3, 0] = -1.0, 1.0, 1.0, 2.0

            def excess(c, k=k):
                state["c"] = c
                g0 = np.zeros(4)
                g0[k] = 0.5 * math.log(c) if c > 0.0 else -math.inf
                # a variance of 0: the correlation (z[2]) no longer enters the criterion
                return inner(g0, J, "ml", np.array([-np.inf, fl, -1.0]), ups3, drop=2 if c <= 0.0 else None) - dmin
            est = s2 * (t1 if k == 0 else t2) ** 2
            kw = dict(lower=0.0, step=0.25, log_scale=True, scale=1e-3 * s2)
        elif name == "residual":
            z0 = np.array([ln(t1), ln(t2), rho])
            J = np.vstack([np.eye(3), np.zeros(3)])  # z = (log t1, log t2, rho)

            def excess(c):
                state["c"] = c
                return inner(np.array([0.0, 0.0, 0.0, math.log(c)]), J, "ml", np.array([fl, fl, -1.0]), ups3) - dmin
            est = s2
            kw = dict(lower=0.0, step=0.05, log_scale=True, edge_ok=False)
        else:
            raise ModelError(f"cannot profile {name!r}; choose therapist, therapist_slope, residual or correlation")
        # the first trial near the root the quadratic approximation predicts (at most a factor e^2
        # on a variance, 0.5 on the correlation: the approximation is local)
        wald = self._wald_step(name, q)
        cap = 2.0 if kw.get("log_scale") else 0.5
        ends = []
        for d in (-1, 1):
            state["done"] = {est: z0.copy()}
            lim = signed_root_limit(excess, est, q, d, wald=wald, cap=cap, **kw)
            ends.append(lim.value if lim.found else (math.inf if d > 0 else -math.inf))
            if not lim.found:
                self._warn(f"profile likelihood of {name} does not reach the {level:.0%} cut-off "
                           f"({'upper' if d > 0 else 'lower'} end open)", StatisticalWarning)
        out = (float(ends[0]), float(ends[1]))
        self._cache[key] = out
        return out

    # -- bootstrap ------------------------------------------------------------------------------
    def bootstrap(self, n_boot: int = DEFAULT_N_BOOT, seed: int | None = None):
        """Seeded parametric bootstrap (:func:`~therapist_effects.engine.inference.parametric_bootstrap`):
        outcomes simulated from the fit, refitted by the same engine; failed refits are counted."""
        key = ("boot", int(n_boot), seed)
        if key in self._cache:
            return self._cache[key]
        m, eng = self.model, self._eng
        mu = m.X @ self.fe_params.to_numpy()
        lam = np.array([[self.theta[0], 0.0], [self.theta[1], self.theta[2]]]) * math.sqrt(self.scale)
        G = eng.G
        reml = self._reml

        def simulate(rng):
            u = rng.standard_normal((G, 2)) @ lam.T
            return mu + u[m.tcode, 0] + u[m.tcode, 1] * m.slope + math.sqrt(self.scale) * rng.standard_normal(len(mu))

        def refit(ystar):
            e = _with_y(eng, ystar)
            th, _, ok = _optimum(e, reml, self.theta, self.theta)
            s2 = e.scale(th, reml)
            L = np.array([[th[0], 0.0], [th[1], th[2]]])
            cv = s2 * L @ L.T
            v1 = cv[0, 0] + 2 * cv[0, 1] + cv[1, 1]
            return {"therapist": cv[0, 0], "therapist_slope": cv[1, 1], "residual": s2,
                    "correlation": _correlation(th), "icc0": cv[0, 0] / (cv[0, 0] + s2), "icc1": v1 / (v1 + s2),
                    "converged": ok}

        res = parametric_bootstrap(simulate, refit, n_boot, seed, ["therapist", "therapist_slope", "residual",
                                                                   "correlation", "icc0", "icc1"])
        if res.n_failed:
            self._warn(f"{res.n_failed} of {res.n_boot} bootstrap refits failed", ConvergenceWarning)
        self._cache[key] = res
        return res

    def interval(self, name: str, level: float = DEFAULT_LEVEL, method: str = "profile", *,
                 n_boot: int = DEFAULT_N_BOOT, seed: int | None = None) -> tuple[float, float]:
        """Interval for ``therapist``, ``therapist_slope``, ``residual`` or ``correlation``:
        ``"profile"`` (ML deviance, as lme4's ``profile()``) or ``"bootstrap"`` (seeded
        percentiles; ``seed=None`` means 0)."""
        if method == "profile":
            return self._profile(name, level)
        if method == "bootstrap":
            return self.bootstrap(n_boot, seed).interval(name, level)
        raise ModelError(f"interval method must be 'profile' or 'bootstrap', got {method!r}")

    def correlation_interval(self, level: float = DEFAULT_LEVEL, method: str = "profile", *,
                             n_boot: int = DEFAULT_N_BOOT, seed: int | None = None) -> dict:
        """Intercept-slope correlation with its interval (negative: feedback narrows the gap)."""
        lo, hi = self.interval("correlation", level, method, n_boot=n_boot, seed=seed)
        return {"estimate": self.correlation, "ci_low": lo, "ci_high": hi, "ci_method": method}

    def conf_int(self, level: float = DEFAULT_LEVEL, method: str = "profile", *,
                 n_boot: int = DEFAULT_N_BOOT, seed: int | None = None) -> pd.DataFrame:
        """Rows: fixed effects (Wald, from lme4's vcov) then variance components (``method``)."""
        lo, hi = wald_interval(self.fe_params.to_numpy(), self.bse.to_numpy(), level)
        rows = {nm: (a, b) for nm, a, b in zip(self.fe_params.index, lo, hi)}
        for nm in _VC:
            rows[nm] = self.interval(nm, level, method, n_boot=n_boot, seed=seed)
        return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])

    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed: int | None = None) -> ICC:
        """Therapist ICC at ``slope = 0`` (control) and ``slope = 1`` (feedback) implied by the model:
        ``v / (v + s2)`` with ``v = s2_a`` and ``v = s2_a + 2 cov + s2_c``; rows ``icc[<slope>=0]``
        and ``icc[<slope>=1]`` (no single therapist ICC: the float value is NaN). With a ``level``,
        bootstrap percentile intervals (``method="bootstrap"``; the profile of these ICCs is not
        offered)."""
        cov = self.cov_re.to_numpy()
        v0 = cov[0, 0]
        v1 = cov[0, 0] + 2 * cov[0, 1] + cov[1, 1]
        names = [f"icc[{self.model.slope_name}=0]", f"icc[{self.model.slope_name}=1]"]
        est = {names[0]: v0 / (v0 + self.scale), names[1]: v1 / (v1 + self.scale)}
        if level is None:
            return icc_table(est)
        method = method or self.default_interval
        if method != "bootstrap":
            raise ModelError(f"random_slope ICC intervals: method must be 'bootstrap', got {method!r} "
                             "(profile intervals are offered for the variances and the correlation)")
        bt = self.bootstrap(n_boot, seed)
        return icc_table(est, {names[0]: bt.interval("icc0", level), names[1]: bt.interval("icc1", level)},
                         method)

    def therapist_effects(self, level: float = DEFAULT_LEVEL, higher_is_better: bool | None = None
                          ) -> pd.DataFrame:
        """BLUPs (lme4's ``ranef(condVar = TRUE)``), one row per therapist: ``caseload``, ``effect``
        (the therapist's effect at slope 0, the intercept BLUP) with ``effect_se`` (conditional SD),
        ``ci_low``/``ci_high`` and ``classification`` as every engine's table, then ``slope_effect``
        (the therapist's deviation in the slope) with ``slope_effect_se``."""
        m, eng = self.model, self._eng
        u, cv = eng.blups(self.theta, self._bc, self.scale)
        z = stats.norm.ppf(0.5 + level / 2)
        se = np.sqrt(np.clip(cv[:, 0, 0], 0.0, None))
        lo, hi = u[:, 0] - z * se, u[:, 0] + z * se
        return pd.DataFrame({"therapist": m.therapist_labels,
                             "caseload": np.bincount(m.tcode, minlength=eng.G).astype(int),
                             "effect": u[:, 0], "effect_se": se, "ci_low": lo, "ci_high": hi,
                             "classification": classify_effects(lo, hi, higher_is_better),
                             "slope_effect": u[:, 1], "slope_effect_se": np.sqrt(np.clip(cv[:, 1, 1], 0.0, None))})

    def gap_table(self) -> pd.DataFrame:
        """Per-therapist "narrowing the gap" data, ready for a scatter plot.

        One row per therapist: caseload (per arm for a 0/1 slope variable), ``intercept`` (BLUP:
        the therapist's effect at slope 0, without feedback; on PHQ-9 positive = worse outcomes),
        ``slope`` (BLUP: how much the slope variable shifts this therapist's patients' outcomes
        beyond the average; on PHQ-9 negative = they gain more), ``effect_control`` and
        ``effect_feedback`` (intercept, intercept + slope) and ``feedback_effect`` (the average
        effect plus the slope). BLUPs are lme4's ``ranef``.
        """
        m, eng = self.model, self._eng
        u, _ = eng.blups(self.theta, self._bc, self.scale)
        return gap_frame(m.therapist_labels, m.tcode, m.slope, u, float(self.fe_params[m.slope_name]), m.binary)

    def _summary_title(self) -> str:
        return f"Random slope (1 + {self.model.slope_name} | therapist), exact {self.method}"

    def _summary_info(self) -> dict:
        return {**super()._summary_info(), "correlation": self.correlation}

    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT, seed=None) -> dict:
        """The model's entry of ``estimates.json`` (``"type": "random_slope"``)."""
        if interval == "wald":  # no Wald intervals for variances (their sampling distribution is skewed)
            self._warn("Wald intervals are not offered for variance components, ICCs or correlations; "
                       "profile-likelihood intervals are reported instead", StatisticalWarning)
            interval = "profile"

        def num(v):
            v = float(v)
            return v if np.isfinite(v) else None

        lo, hi = wald_interval(self.fe_params.to_numpy(), self.bse.to_numpy())
        fe = {nm: {"estimate": num(b), "se": num(s), "ci_low": num(a), "ci_high": num(c)}
              for nm, b, s, a, c in zip(self.fe_params.index, self.fe_params, self.bse, lo, hi)}
        vc = {}
        for nm, v in self.vcomp.items():
            a, c = self.interval(nm, DEFAULT_LEVEL, interval, n_boot=n_boot, seed=seed)
            vc[nm] = {"estimate": num(v), "ci_low": num(a), "ci_high": num(c)}
        cor = self.correlation_interval(DEFAULT_LEVEL, interval, n_boot=n_boot, seed=seed)
        return {
            "type": "random_slope",
            "family": "gaussian",
            "method": self.method,
            "slope": self.model.slope_name,
            "fixed_effects": fe,
            "variance_components": vc,
            "correlation": {"estimate": num(cor["estimate"]), "ci_low": num(cor["ci_low"]),
                            "ci_high": num(cor["ci_high"]), "ci_method": interval},
            **self.fit_fields(),
            "n_patients": int(self.n_patients),
            "n_therapists": int(self.n_therapists),
            "warnings": [str(w) for w in self.warnings],
        }


def _with_y(eng: BlockEngine, y: np.ndarray) -> BlockEngine:
    import copy

    new = copy.copy(eng)
    new.set_y(y)
    return new

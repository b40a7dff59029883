"""Binary outcomes by arm: a therapist variance per arm on the latent (logit) scale.

For a binary patient outcome and two arms (control, feedback) the model is

    logit P(y_ij = 1) = x_ij' b + u_j,a(i),     u_j,a ~ N(0, s_a^2) independent,

with ``j`` the therapist and ``a(i)`` the arm of patient ``i``: every therapist has one effect per arm
in which they treat patients, and the two arms have their own therapist variance (lme4:
``glmer(y ~ x + feedback + (0 + c0 | therapist) + (0 + c1 | therapist), family = binomial)`` with
``c0 = 1 - feedback``, ``c1 = feedback``). The latent-scale ICC of arm ``a`` is
``s_a^2 / (s_a^2 + pi^2/3)``; the ICC ratio is ICC_feedback / ICC_control and the reduction 1 - ratio.

Each patient is in one arm and the covariance is diagonal, so the likelihood factorises into
one-dimensional integrals, one per therapist x arm block. They are approximated as in
:mod:`therapist_effects.models.glmm` (Laplace = glmer ``nAGQ = 1``; adaptive Gauss-Hermite with ``n_quad``
nodes), vectorised over blocks: block ``k`` of arm ``a`` has the spherical effect ``v_k`` with
``u_k = s_a v_k``, so every formula of the random-intercept engine holds with the scalar ``s``
replaced by the block's ``s_a(k)``; the gradient in ``s_a`` sums the blocks of arm ``a``. (glmer
refuses ``nAGQ > 1`` for this formula because it cannot see the factorisation; the quadrature here is
exact in the limit of many nodes.)

The outer maximisation over (b, s_0, s_1) is L-BFGS-B with the analytic gradient; the log-likelihood
is even in each ``s_a`` separately, so the SDs are optimised over the real line and |s_a| reported
(no bound at 0). An SD below lme4's ``isSingular`` tolerance 1e-4 is set to 0 and the model refitted
with it fixed there (a singular fit, warned). Intervals for the variances, ICCs and the ICC ratio are
profile-likelihood intervals: the ratio's profile fixes ICC_feedback = c * ICC_control and maximises
the likelihood over the rest.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats
from scipy.special import expit

from .arm import arm_design, two_arms
from ..classify import classify_effects
from .design import group_codes
from ..engine.inference import DEFAULT_LEVEL, DEFAULT_N_BOOT, chi2_cut, profile_limit
from ..engine.results import DEFAULT_INTERVAL, ICC, ModelResults, interval_frame, per_arm_icc
from ..exceptions import ModelError, StatisticalWarning
from .glmm import (
    best_start,
    block_modes,
    block_terms,
    LATENT_RESIDUAL_VARIANCE,
    SINGULAR_TOL,
    LogisticRandomInterceptModel,
    _gauss_hermite,
    _jsonable,
    _safe_inv,
    _single_thread_blas,
    check_binary,
    binary_inputs,
    check_quadrature,
    fit_warnings,
    latent_icc,
    observed_information,
    profile_only_notice,
    recorded_warnings,
)

__all__ = ["LogisticArmVarianceModel", "LogisticArmVarianceResults"]

_C = LATENT_RESIDUAL_VARIANCE


@dataclass
class _Eval:
    loglik: float
    grad: np.ndarray | None
    v: np.ndarray
    H: np.ndarray
    newton_ok: bool


class LogisticArmVarianceModel:
    """Logistic GLMM with independent therapist effects per arm and a therapist variance per arm.

    Parameters
    ----------
    endog : array-like of 0/1
    exog : array-like (patients x p), the fixed-effects design including the intercept and the arm
    therapist, arm : array-like, one entry per patient
    feedback_level : the arm level that is the feedback condition (the other is the control)
    method : ``"laplace"`` or ``"agq"`` (with ``n_quad`` nodes)
    """

    def __init__(self, endog, exog, therapist, arm, *, exog_names: Sequence[str] | None = None, feedback_level=1,
                 method: str = "laplace", n_quad: int = 10) -> None:
        method, n_quad = check_quadrature(method, n_quad)
        therapist = np.asarray(therapist, dtype=object)
        arm = np.asarray(arm, dtype=object)
        y, X, names = binary_inputs(endog, exog, exog_names, {"therapist": therapist, "arm": arm})
        n, p = X.shape
        labels, control, fb = two_arms(arm, feedback_level)
        self.arm_levels = [control, fb]
        self.control_level, self.feedback_level = control, fb
        acode = (labels == fb).astype(np.int64)
        tcode, tlabels = group_codes(therapist)
        T = len(tlabels)
        if T < 2:
            raise ModelError(f"at least 2 therapists are needed, got {T}")
        # therapist x arm blocks (only those with patients)
        bcode_full = tcode * 2 + acode
        bcode, bvals = np.unique(bcode_full, return_inverse=True)[1], np.unique(bcode_full)
        self.block_therapist = bvals // 2
        self.block_arm = (bvals % 2).astype(np.int64)
        for a, lv in enumerate(self.arm_levels):
            if int((self.block_arm == a).sum()) < 2:
                raise ModelError(
                    f"arm {lv!r} has patients of fewer than two therapists; its therapist variance cannot be estimated"
                )
        order = np.argsort(bcode, kind="stable")
        self.method = method
        self.n_quad = n_quad
        self.exog_names = names
        self.therapist_labels = tlabels
        self.order = order
        self.y = y[order]
        self.X = X[order]
        self.g = bcode[order]
        self.acode = acode[order]
        self.therapist_code = tcode[order]
        self.n_blocks = len(bvals)
        self.counts = np.bincount(self.g, minlength=self.n_blocks)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.n_obs = n
        self.n_therapists = T
        self.k_fe = p
        self.n_arms = 2
        self._t, self._loga = _gauss_hermite(n_quad)
        self._v_warm = np.zeros(self.n_blocks)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *, therapist: str = "therapist",
                   arm: str = "arm", feedback_level=1, method: str = "laplace", n_quad: int = 10
                   ) -> LogisticArmVarianceModel:
        """``outcome ~ covariates + arm`` with a therapist variance per arm, from a patient table
        (the arm coded as in :func:`therapist_effects.models.arm.arm_design`)."""
        y, X, names, _ind, _name = arm_design(
            df, outcome, covariates, therapist=therapist, arm=arm, feedback_level=feedback_level
        )
        check_binary(y, df, outcome)
        return cls(
            y, X, df[therapist].to_numpy(), df[arm].to_numpy(), exog_names=names, feedback_level=feedback_level,
            method=method, n_quad=n_quad,
        )

    # ------------------------------------------------------------------ internals
    def _gsum(self, a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(a, self.starts, axis=0)

    def _modes(self, eta0, sb, v0):
        """Conditional modes of all blocks (:func:`therapist_effects.models.glmm.block_modes`, SD ``sb`` per block)."""
        return block_modes(self.y, self.g, self._gsum, eta0, sb, v0)

    def _evaluate(self, b: np.ndarray, s: np.ndarray, *, grad: bool = True, warm: bool = True) -> _Eval:
        """Laplace/AGQ log-likelihood and its exact gradient in (b, s_0, s_1)."""
        y, X, g = self.y, self.X, self.g
        s = np.asarray(s, float)
        sb = s[self.block_arm]  # per block
        sp = sb[g]  # per patient
        eta0 = X @ b
        v, mu0, ok, w, W, H, sigma, vk, mu, la, logS, loglik = block_terms(self, eta0, sb, sp, warm)
        if not grad:
            return _Eval(loglik, None, v, H, ok)
        pi = np.exp(la - logS[:, None])
        r = y[:, None] - mu
        Rk = self._gsum(r)
        t = self._t
        rbar = r[:, 0] if t.size == 1 else np.sum(r * pi[g], axis=1)
        hv = sb[:, None] * Rk - vk
        c = np.sum(pi * hv, axis=1)
        d = np.sum(pi * hv * t[None, :], axis=1)
        w1 = w * (1.0 - 2.0 * mu0)
        W1 = self._gsum(w1)
        WX = self._gsum(w[:, None] * X)
        W1X = self._gsum(w1[:, None] * X)
        R0 = self._gsum(y - mu0)
        dv_db = -(sb / H)[:, None] * WX
        dv_ds = (R0 - sb * W * v) / H
        dH_db = (sb * sb)[:, None] * W1X + (sb**3 * W1)[:, None] * dv_db
        dH_ds = 2.0 * sb * W + sb * sb * v * W1 + sb**3 * W1 * dv_ds
        fac = -0.5 / H * (1.0 + d * sigma)
        g_b = X.T @ rbar + (fac[:, None] * dH_db).sum(0) + (c[:, None] * dv_db).sum(0)
        g_blk = np.sum(pi * vk * Rk, axis=1) + fac * dH_ds + c * dv_ds
        g_s = np.bincount(self.block_arm, weights=g_blk, minlength=self.n_arms)
        return _Eval(loglik, np.concatenate([g_b, g_s]), v, H, ok)

    def loglik(self, fe_params, s) -> float:
        """Approximate marginal log-likelihood at fixed effects ``fe_params`` and arm SDs ``s``
        (the same quantity as ``logLik()`` of glmer with nAGQ = 1 for the Laplace model)."""
        return self._evaluate(np.asarray(fe_params, float), np.asarray(s, float), grad=False, warm=False).loglik

    def _scale(self, b, free):
        """Whitening of the free coordinates: GLM information for b, 0.1 for the SDs."""
        p = self.k_fe
        mu = expit(self.X @ b)
        info = self.X.T @ ((mu * (1 - mu))[:, None] * self.X)
        fb = free[:p]
        nf = int(free.sum())
        A = np.zeros((nf, nf))
        nb = int(fb.sum())
        if nb:
            A[:nb, :nb] = np.linalg.inv(np.linalg.cholesky(info[np.ix_(fb, fb)])).T
        for k in range(nb, nf):
            A[k, k] = 0.1
        return A

    def _maximise(self, theta0, free, scale, *, maxiter: int = 500):
        """Maximise over the free entries of theta = (b, s_0, s_1) (SDs on the real line, |s| reported)."""
        p = self.k_fe
        theta0 = np.asarray(theta0, float).copy()
        idx = np.flatnonzero(free)
        A = np.asarray(scale, float)
        base = theta0[idx].copy()

        def unpack(z):
            th = theta0.copy()
            th[idx] = base + A @ z
            return th

        def fun(z):
            th = unpack(z)
            ev = self._evaluate(th[:p], th[p:])
            if not np.isfinite(ev.loglik):
                return 1e300, np.zeros_like(z)
            return -ev.loglik, -(A.T @ ev.grad[idx])

        res = optimize.minimize(fun, np.zeros(idx.size), jac=True, method="L-BFGS-B",
                                options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-7, "maxcor": 20})
        th = unpack(res.x)
        th[p:] = np.abs(th[p:])
        ev = self._evaluate(th[:p], th[p:], grad=True)
        gz = A.T @ ev.grad[idx]
        ok = bool(ev.newton_ok and np.max(np.abs(gz)) < 1e-3 and np.isfinite(ev.loglik))
        return th, ev.loglik, ok, str(res.message)

    def _hessian(self, theta, free=None):
        """Observed information by central differences of the analytic gradient (free coordinates)."""
        p = self.k_fe
        idx = np.arange(theta.size) if free is None else np.flatnonzero(free)
        return observed_information(lambda th: self._evaluate(th[:p], th[p:]).grad, theta, idx)

    def _fit_from(self, theta0, free):
        """Laplace stage, then (AGQ) the quadrature stage started at the Laplace maximum."""
        p = self.k_fe
        nodes = (self._t, self._loga)
        self._t, self._loga = _gauss_hermite(1)
        try:
            self._v_warm = np.zeros(self.n_blocks)
            th, ll, ok, msg = self._maximise(theta0, free, self._scale(theta0[:p], free))
        finally:
            self._t, self._loga = nodes
        if self.n_quad > 1:
            th0 = th.copy()
            th0[p:] = np.where(free[p:], np.maximum(th0[p:], 0.05), th0[p:])
            th, ll, ok, msg = self._maximise(th0, free, self._scale(th0[:p], free))
        return th, ll, ok, msg

    def _estimate(self):
        """(theta, loglik, converged, message, singular arms): tries two starts, then refits any arm
        whose SD is below the singular tolerance with that SD fixed at 0."""
        p = self.k_fe
        glm = LogisticRandomInterceptModel(self.y, self.X, self.g, exog_names=self.exog_names)
        b0 = glm._glm_start()
        free = np.ones(p + 2, bool)
        th, ll, ok, msg = best_start(lambda s0: self._fit_from(np.concatenate([b0, [s0, s0]]), free), (0.5, 0.1))
        sing = th[p:] < SINGULAR_TOL
        if sing.any():
            free2 = free.copy()
            free2[p:] = ~sing
            th0 = th.copy()
            th0[p:] = np.where(sing, 0.0, th0[p:])
            th2, ll2, ok2, msg2 = self._fit_from(th0, free2)
            if ll2 >= ll - 1e-6:
                th, ll, ok, msg = th2, ll2, ok2, msg2
            th[p:] = np.where(sing, 0.0, th[p:])
        return th, ll, ok, msg, sing

    @_single_thread_blas
    def fit(self) -> LogisticArmVarianceResults:
        """Fit; warns ``ConvergenceWarning`` / ``SingularFitWarning`` (an arm's variance at 0)."""
        p = self.k_fe
        th, ll, ok, msg, sing = self._estimate()
        arms = ", ".join(repr(self.arm_levels[a]) for a in np.flatnonzero(sing))
        msgs = fit_warnings("Laplace" if self.n_quad == 1 else f"AGQ{self.n_quad}", ok, msg,
                            f"therapist variance of arm {arms} estimated at 0 (singular fit); an ICC at 0 makes"
                            " the ICC ratio 0 or undefined" if sing.any() else None)
        ev = self._evaluate(th[:p], th[p:], grad=True, warm=False)
        return LogisticArmVarianceResults(self, th, ll, ok, sing, ev.v, ev.H, msgs)


@dataclass
class LogisticArmVarianceResults(ModelResults):
    """Fit of :class:`LogisticArmVarianceModel`.

    ``fe_params``/``bse``: fixed effects (log-odds) and SEs from the inverse observed information of
    (b, s_0, s_1) (b alone for the SDs at 0); ``vcomp``: ``therapist[<control>]``,
    ``therapist[<feedback>]`` (latent-scale variances) and ``residual`` (pi^2/3); ``loglik`` as
    glmer's ``logLik`` (Laplace) or its AGQ counterpart.
    """

    model: LogisticArmVarianceModel
    theta: np.ndarray
    loglik: float
    converged: bool
    singular_arms: np.ndarray
    modes: np.ndarray
    curvature: np.ndarray
    warnings_list: list = field(default_factory=list)

    def _n_params(self) -> int:
        """Fixed effects and the two arm-specific therapist SDs (no residual scale): glmer's df of logLik."""
        return int(self.model.k_fe + 2)

    @_single_thread_blas
    def __post_init__(self):
        m = self.model
        p = m.k_fe
        self.method = "Laplace" if m.n_quad == 1 else f"AGQ{m.n_quad}"
        self.n_obs = self.n_patients = m.n_obs
        self.n_therapists = m.n_therapists
        self.exog_names = list(m.exog_names)
        self.s = np.asarray(self.theta[p:], float)
        self.singular = bool(self.singular_arms.any())
        self.fe_params = pd.Series(self.theta[:p], index=self.exog_names, name="estimate")
        keys = [f"therapist[{lv}]" for lv in m.arm_levels]
        self.vcomp = {keys[0]: float(self.s[0] ** 2), keys[1]: float(self.s[1] ** 2),
                      "residual": LATENT_RESIDUAL_VARIANCE}
        free = np.ones(p + 2, bool)
        free[p:] = ~self.singular_arms
        self._free = free
        info = m._hessian(self.theta, free)
        self._info = info
        cov = _safe_inv(info)
        cov_b = cov[:p, :p]
        se_b = np.sqrt(np.where(np.diag(cov_b) > 0, np.diag(cov_b), np.nan))
        self.cov_fe = pd.DataFrame(cov_b, index=self.exog_names, columns=self.exog_names)
        self.vcov = self.cov_fe
        self.bse = pd.Series(se_b, index=self.exog_names, name="se")
        self.params = pd.concat([self.fe_params, pd.Series({k: self.vcomp[k] for k in keys})]).rename("estimate")
        self._profile_cache: dict = {}
        self._profile_points: dict = {}
        self.n_params = p + 2  # fixed effects and the two variances (lme4's df of logLik)

    # ------------------------------------------------------------------ point estimates
    def icc_point(self) -> np.ndarray:
        """Latent-scale ICC per arm (control, feedback)."""
        return latent_icc(self.s**2)

    def ratio_point(self) -> float:
        icc = self.icc_point()
        return float(icc[1] / icc[0]) if icc[0] > 0 else float("nan")

    # ------------------------------------------------------------------ profiles
    def _constrained_max(self, th0, free, transform):
        """Maximise with ``transform`` mapping a reduced theta to the full one (and the chain rule)."""
        m = self.model
        p = m.k_fe
        idx = np.flatnonzero(free)
        base = th0[idx].copy()
        A = m._scale(th0[:p], free)

        def fun(z):
            th = th0.copy()
            th[idx] = base + A @ z
            full, jac = transform(th)
            if full is None:
                return 1e300, np.zeros_like(z)
            ev = m._evaluate(full[:p], full[p:])
            if not np.isfinite(ev.loglik):
                return 1e300, np.zeros_like(z)
            gth = jac(ev.grad)
            return -ev.loglik, -(A.T @ gth[idx])

        res = optimize.minimize(fun, np.zeros(idx.size), jac=True, method="L-BFGS-B",
                                options={"maxiter": 500, "ftol": 1e-15, "gtol": 1e-7, "maxcor": 20})
        th = th0.copy()
        th[idx] = base + A @ res.x
        return th, -float(res.fun)

    def _profile_ll(self, name: str, value: float) -> float:
        """Profile log-likelihood of ``s[a]`` (name ``"s0"``/``"s1"``) or of the ICC ratio (``"ratio"``)."""
        m = self.model
        p = m.k_fe
        cache = self._profile_points.setdefault(name, {})
        if cache:
            nearest = min(cache, key=lambda x: abs(x - value))
            th0 = cache[nearest].copy()
        else:
            th0 = self.theta.copy()
            th0[p:] = np.where(th0[p:] < 1e-2, 1e-2, th0[p:])
        saved = m._v_warm.copy()
        if name in ("s0", "s1"):
            a = int(name[1])
            th0[p + a] = value
            free = np.ones(p + 2, bool)
            free[p + a] = False

            def transform(th):
                return th, lambda g: g
        else:  # ratio: s_1 determined by s_0 and the ratio; s_1 is not free
            r = float(value)
            free = np.ones(p + 2, bool)
            free[p + 1] = False
            if r * latent_icc(th0[p] ** 2) >= 0.5:  # start inside ICC_feedback = r * ICC_control < 1
                i0 = 0.5 / r
                th0[p] = math.sqrt(_C * i0 / (1.0 - i0))

            def transform(th, r=r):
                s0 = th[p]
                i0 = latent_icc(s0 * s0)
                i1 = r * i0
                if i1 >= 1.0 - 1e-12:
                    return None, None
                s1sq = _C * i1 / (1.0 - i1)
                s1 = math.sqrt(s1sq)
                full = th.copy()
                full[p + 1] = s1
                # d s1 / d s0 by the chain rule through i0 and s1^2
                di0 = 2.0 * s0 * _C / (s0 * s0 + _C) ** 2
                ds1sq = _C * r / (1.0 - i1) ** 2 * di0
                ds1 = ds1sq / (2.0 * s1) if s1 > 1e-12 else 0.0

                def jac(gfull, ds1=ds1):
                    g = gfull.copy()
                    g[p] = gfull[p] + gfull[p + 1] * ds1
                    g[p + 1] = 0.0
                    return g

                return full, jac
        th, ll = self._constrained_max(th0, free, transform)
        th[p:] = np.abs(th[p:])
        cache[value] = th
        m._v_warm = saved
        return ll

    def _profile_interval(self, name: str, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        """Likelihood-ratio interval of s_a (``"s0"``/``"s1"``) or of the ICC ratio (``"ratio"``):
        where 2 (l_max - l_profile) reaches the chi2_1 quantile, by the shared outward-bracketing
        root search (:func:`~therapist_effects.engine.inference.profile_limit`); the lower end is 0
        where the deviance at 0 stays below it, and the ratio is unbounded above when a control ICC
        of 0 is inside its interval."""
        key = (name, level)
        if key in self._profile_cache:
            return self._profile_cache[key]
        q = chi2_cut(level)
        lmax = self.loglik

        def excess(x):
            return max(2.0 * (lmax - self._profile_ll(name, x)), 0.0)

        if name == "ratio":
            est = self.ratio_point()
            step = max(0.5 * est, 0.1)
        else:
            est = float(self.s[int(name[1])])
            step = max(0.3 * est, 0.05)
        if not np.isfinite(est):
            out = (math.nan, math.nan)
        elif name == "ratio" and self._profile_interval("s0", level)[0] == 0.0:
            out = (self._profile_end(excess, est, q, -1, step), math.inf)
        else:
            out = (self._profile_end(excess, est, q, -1, step), self._profile_end(excess, est, q, 1, step))
        self._profile_cache[key] = out
        return out

    @staticmethod
    def _profile_end(excess, est: float, q: float, direction: int, step: float) -> float:
        lim = profile_limit(excess, est, q, direction, lower=0.0, step=step, growth=1.6, xtol=1e-9, rtol=1e-6)
        if not lim.found:
            warnings.warn("profile interval: the deviance did not reach the chi2 quantile; that end is open",
                          StatisticalWarning, stacklevel=4)
        return float(lim.value)

    # ------------------------------------------------------------------ intervals
    @_single_thread_blas
    def variance_interval(self, arm: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        """Profile interval of arm ``arm``'s therapist variance (squared SD interval, as lme4)."""
        lo, hi = self._profile_interval(f"s{arm}", level)
        return lo * lo, hi * hi

    def icc_by_arm(self, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
        """Latent-scale ICC per arm with the profile interval (the variance interval mapped)."""
        icc = self.icc_point()
        rows = []
        for a, lv in enumerate(self.model.arm_levels):
            lo, hi = self.variance_interval(a, level)
            rows.append({"arm": lv, "role": "control" if a == 0 else "feedback", "estimate": float(icc[a]),
                         "ci_low": float(latent_icc(lo)), "ci_high": float(latent_icc(hi)), "ci_method": "profile"})
        return pd.DataFrame(rows).set_index("arm")

    @_single_thread_blas
    def icc_ratio(self, level: float = DEFAULT_LEVEL) -> dict:
        """ICC_feedback / ICC_control with its profile interval."""
        lo, hi = self._profile_interval("ratio", level)
        return {"estimate": self.ratio_point(), "ci_low": lo, "ci_high": hi, "ci_method": "profile"}

    def icc_reduction(self, level: float = DEFAULT_LEVEL) -> dict:
        """1 - ICC_feedback / ICC_control (the ratio's interval reflected)."""
        r = self.icc_ratio(level)
        return {"estimate": 1.0 - r["estimate"], "ci_low": 1.0 - r["ci_high"], "ci_high": 1.0 - r["ci_low"],
                "ci_method": "profile"}

    def lrt_equal_variances(self) -> dict:
        """LRT of s_control^2 = s_feedback^2: the common-variance model is the random-intercept logistic
        model on the therapist x arm blocks; chi2 with 1 df (interior null)."""
        if "lrt" in self._profile_cache:
            return self._profile_cache["lrt"]
        m = self.model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eq = LogisticRandomInterceptModel(m.y, m.X, m.g, exog_names=m.exog_names,
                                              method="agq" if m.n_quad > 1 else "laplace", n_quad=m.n_quad).fit()
        stat = max(2.0 * (self.loglik - eq.loglik), 0.0)
        out = {"statistic": float(stat), "df": 1, "p_value": float(stats.chi2.sf(stat, 1)),
               "loglik_equal": float(eq.loglik)}
        self._profile_cache["lrt"] = out
        return out

    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed=None) -> ICC:
        """The engines' common ``icc()``: rows ``icc[<arm>]`` (latent scale, with a ``role`` column);
        no single therapist ICC, so the float value is NaN. With a ``level``, the profile intervals
        of :meth:`icc_by_arm` (the only method offered)."""
        _profile_only(method)
        if level is None:
            return per_arm_icc(self.model.arm_levels, self.icc_point())
        return per_arm_icc(self.model.arm_levels, self.icc_point(), self.icc_by_arm(level), "profile")

    def conf_int(self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL) -> pd.DataFrame:
        """Wald intervals of the fixed effects, profile intervals of the two variances (the only
        ``method`` offered is ``"profile"``, the default of every engine)."""
        _profile_only(method)
        z = stats.norm.ppf(0.5 + level / 2)
        rows = {nm: (self.fe_params[nm] - z * self.bse[nm], self.fe_params[nm] + z * self.bse[nm])
                for nm in self.exog_names}
        for a, lv in enumerate(self.model.arm_levels):
            rows[f"therapist[{lv}]"] = self.variance_interval(a, level)
        return interval_frame(rows)

    # ------------------------------------------------------------------ therapists
    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = True) -> pd.DataFrame:
        """One row per therapist x arm: caseload, observed rate, conditional mode of the effect (log-odds)
        with its conditional SD (lme4 ``ranef``/``condVar``), interval and classification;
        ``adjusted_mean`` is expit of the arm's mean linear predictor plus the therapist's effect."""
        m = self.model
        p = m.k_fe
        sb = self.s[m.block_arm]
        u = sb * self.modes
        se = sb / np.sqrt(self.curvature)
        z = stats.norm.ppf(0.5 + level / 2)
        lo, hi = u - z * se, u + z * se
        eta = m.X @ self.theta[:p]
        arm_mean = np.array([eta[m.acode == a].mean() for a in range(2)])
        raw = np.bincount(m.g, weights=m.y, minlength=m.n_blocks) / m.counts
        return pd.DataFrame({
            "therapist": m.therapist_labels[m.block_therapist],
            "arm": [m.arm_levels[a] for a in m.block_arm],
            "caseload": m.counts,
            "raw_mean": raw,
            "adjusted_mean": expit(arm_mean[m.block_arm] + u),
            "effect": u,
            "effect_se": se,
            "ci_low": lo,
            "ci_high": hi,
            "classification": classify_effects(lo, hi, higher_is_better),
        })

    def _summary_title(self) -> str:
        m = self.model
        return (f"Arm-specific therapist variances, logistic ({self.method}); control = {m.control_level}, "
                f"feedback = {m.feedback_level}")

    def _summary_info(self) -> dict:
        return {**super()._summary_info(), "ICC scale": "latent (pi^2/3)",
                "ICC ratio (fb/ctrl)": self.ratio_point()}

    @_single_thread_blas
    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT, seed=None) -> dict:
        """The model's ``estimates.json`` entry: the gaussian arm model's keys, ICCs on the latent scale.

        Only profile intervals are offered for the variances, ICCs and ratio (a ``bootstrap`` or
        ``wald`` request is answered with profile intervals and a StatisticalWarning)."""
        caught = list(self.warnings_list)
        with recorded_warnings(caught):
            profile_only_notice("arm_variance", interval)
            ci = self.conf_int(0.95)
            icc = self.icc_by_arm(0.95)
            ratio = self.icc_ratio(0.95)
            red = self.icc_reduction(0.95)
            lrt = self.lrt_equal_variances()
        m = self.model
        vc = {}
        for nm, v in self.vcomp.items():
            if nm == "residual":
                vc[nm] = {"estimate": v, "ci_low": None, "ci_high": None}
            else:
                vc[nm] = {"estimate": v, "ci_low": ci.loc[nm, "lower"], "ci_high": ci.loc[nm, "upper"]}
        return _jsonable({
            "family": "binomial",
            "method": self.method,
            "fixed_effects": {nm: {"estimate": self.fe_params[nm], "se": self.bse[nm],
                                   "ci_low": ci.loc[nm, "lower"], "ci_high": ci.loc[nm, "upper"]}
                              for nm in self.exog_names},
            "variance_components": vc,
            "icc_by_arm": {lv: {"estimate": icc.loc[lv, "estimate"], "ci_low": icc.loc[lv, "ci_low"],
                                "ci_high": icc.loc[lv, "ci_high"], "ci_method": "profile", "scale": "latent"}
                           for lv in m.arm_levels},
            "icc_ratio": ratio,
            "icc_reduction": red,
            "lrt_equal_variances": {"statistic": lrt["statistic"], "df": lrt["df"], "p_value": lrt["p_value"]},
            "feedback_level": m.feedback_level,
            "control_level": m.control_level,
            "loglik": self.loglik,
            "converged": self.converged,
            "singular": self.singular,
            "n_patients": self.n_obs,
            "n_therapists": self.n_therapists,
            "n_clusters": None,
            "warnings": caught,
        })


def _profile_only(method: str | None) -> None:
    if method not in (None, "profile"):
        raise ModelError(f"binomial arm_variance offers profile intervals only, got method {method!r}")

"""Binary outcomes with a random arm slope: ``(1 + arm | therapist)`` on the latent (logit) scale.

For a binary patient outcome the model is

    logit P(y_ij = 1) = x_ij' b + u_j0 + z_ij u_j1,    (u_j0, u_j1) ~ N(0, Sigma),

with ``z`` the slope variable (the 0/1 feedback indicator of the arm; any numeric patient-level
column works the same way) and ``Sigma`` parameterised as lme4 does, by its Cholesky factor
``L = [[t1, 0], [t2, t3]]`` (lme4's ``theta``; ``u = L v`` with ``v ~ N(0, I_2)``), so that a
correlation of +-1 (``t3 = 0``) is reached exactly. lme4:
``glmer(y ~ x + feedback + (1 + feedback | therapist), family = binomial)``.

With every patient in one arm this is the correlated arm-specific model
``(0 + c0 + c1 | therapist)``: the control-arm therapist effect is ``u_0`` (variance ``Sigma_00``),
the feedback-arm effect ``u_0 + u_1`` (variance ``Sigma_00 + 2 Sigma_01 + Sigma_11``). The latent ICC
of arm ``a`` is ``v_a / (v_a + pi^2/3)``; the ratio is ICC_feedback / ICC_control and the reduction
1 - ratio.

The therapist effects do not factorise as in :mod:`therapist_effects.models.glmm_arm` (the two arm effects
of a therapist are correlated): each therapist's integral is two-dimensional. It is approximated by
the Laplace approximation at the conditional mode (glmer's ``nAGQ = 1``; the default) or by adaptive
Gauss-Hermite quadrature on an ``n_quad x n_quad`` product grid centred at the mode and scaled by the
Cholesky factor of the conditional curvature (``method: agq``; glmer refuses ``nAGQ > 1`` here). The
modes of all therapists are found together by a vectorised Newton iteration with step halving (2 x 2
solves in closed form).

The outer maximisation over (b, theta) is L-BFGS-B with a central-difference gradient (the inner
modes are solved to 1e-10, so the gradient is accurate to ~1e-6); the log-likelihood is even in
``t3`` and in the sign of the first column of ``L``, so theta is optimised over the real line and
brought to lme4's canonical form (``t1, t3 >= 0``). A ``t1`` or ``t3`` below lme4's ``isSingular``
tolerance 1e-4 is set to 0 and the model refitted with it fixed there (a singular fit, warned).
Intervals: Wald for the fixed effects (SEs from the finite-difference observed information of
(b, theta), as lme4's ``vcov``), profile likelihood for the variances, the correlation, the per-arm
ICCs and the ICC ratio, with the root search of :mod:`therapist_effects.engine.inference`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize
from scipy.special import expit

from .arm import arm_design
from .design import group_codes
from ..engine.inference import DEFAULT_LEVEL, DEFAULT_N_BOOT, chi2_cut, profile_limit, wald_interval
from ..engine.results import DEFAULT_INTERVAL, ICC, ModelResults, icc_table, interval_frame, per_arm_icc
from ..exceptions import ModelError, StatisticalWarning
from .glmm import (
    LATENT_RESIDUAL_VARIANCE,
    SINGULAR_TOL,
    _NEWTON_MAXIT,
    _NEWTON_TOL,
    LogisticRandomInterceptModel,
    _bernoulli_loglik,
    _gauss_hermite,
    _jsonable,
    _safe_inv,
    _single_thread_blas,
    best_start,
    binary_inputs,
    check_quadrature,
    fit_warnings,
    latent_icc,
    profile_only_notice,
    recorded_warnings,
)

__all__ = ["LogisticRandomSlopeModel", "LogisticRandomSlopeResults"]

_C = LATENT_RESIDUAL_VARIANCE


def _cov(theta) -> np.ndarray:
    """Sigma = L L' of lme4's theta (t1, t2, t3)."""
    t1, t2, t3 = (float(x) for x in theta)
    return np.array([[t1 * t1, t1 * t2], [t1 * t2, t2 * t2 + t3 * t3]])


def _theta_from_sd(s0: float, s1: float, rho: float) -> np.ndarray:
    """lme4's theta of (intercept SD, slope SD, correlation)."""
    rho = min(max(rho, -1.0), 1.0)
    return np.array([s0, rho * s1, s1 * math.sqrt(max(1.0 - rho * rho, 0.0))])


def _theta_from_arms(sc: float, sf: float, r: float) -> np.ndarray | None:
    """lme4's theta of the arm parameterisation (control SD, feedback SD, their correlation):
    intercept = control effect, slope = feedback effect - control effect."""
    r = min(max(r, -1.0), 1.0)
    v1 = sc * sc + sf * sf - 2.0 * r * sc * sf
    c01 = r * sc * sf - sc * sc
    if sc <= 0.0:
        return np.array([0.0, 0.0, math.sqrt(max(v1, 0.0))])
    t2 = c01 / sc
    return np.array([sc, t2, math.sqrt(max(v1 - t2 * t2, 0.0))])


def _canonical(theta) -> np.ndarray:
    t = np.array(theta, float)
    if t[0] < 0:
        t[0], t[1] = -t[0], -t[1]
    t[2] = abs(t[2])
    return t


def _arm_sds(theta) -> tuple[float, float, float]:
    """(control SD, feedback SD, arm correlation) of lme4's theta (slope variable 0/1)."""
    S = _cov(theta)
    v0 = S[0, 0]
    v1 = S[0, 0] + 2 * S[0, 1] + S[1, 1]
    c = S[0, 0] + S[0, 1]
    s0, s1 = math.sqrt(max(v0, 0.0)), math.sqrt(max(v1, 0.0))
    r = c / (s0 * s1) if s0 > 0 and s1 > 0 else 0.0
    return s0, s1, min(max(r, -1.0), 1.0)


def _slope_sds(theta) -> tuple[float, float, float]:
    """(intercept SD, slope SD, correlation) of lme4's theta (correlation 0 where undefined)."""
    t1, t2, t3 = (float(x) for x in theta)
    s1 = math.hypot(t2, t3)
    rho = t2 / s1 if s1 > 0 and abs(t1) > 0 else 0.0
    return abs(t1), s1, rho * (1.0 if t1 >= 0 else -1.0)


class LogisticRandomSlopeModel:
    """Logistic GLMM ``y ~ x + (1 + z | therapist)`` with correlated intercept and slope.

    Parameters
    ----------
    endog : array-like of 0/1
    exog : array-like (patients x p), the fixed-effects design including the intercept (and ``z``)
    therapist : therapist of each patient
    slope : the slope variable ``z`` per patient (the 0/1 feedback indicator, or a numeric column)
    slope_name : its name; ``arm_levels`` (control, feedback) when ``z`` is the arm indicator
    method : ``"laplace"`` (default) or ``"agq"`` (``n_quad`` x ``n_quad`` nodes per therapist)
    """

    def __init__(self, endog, exog, therapist, slope, *, exog_names: Sequence[str] | None = None,
                 slope_name: str = "feedback", arm_levels: Sequence[str] | None = None,
                 method: str = "laplace", n_quad: int = 10) -> None:
        method, n_quad = check_quadrature(method, n_quad)
        z = np.asarray(slope, dtype=float).ravel()
        therapist = np.asarray(therapist, dtype=object)
        y, X, names = binary_inputs(endog, exog, exog_names, {"therapist": therapist}, {"slope": z})
        n, p = X.shape
        tcode, tlabels = group_codes(therapist)
        G = len(tlabels)
        lo = np.full(G, np.inf)
        hi = np.full(G, -np.inf)
        np.minimum.at(lo, tcode, z)
        np.maximum.at(hi, tcode, z)
        if int((hi > lo).sum()) < 3:
            raise ModelError(f"a random slope on {slope_name!r} needs at least three therapists whose "
                             "patients differ in it (e.g. patients in both arms)")
        order = np.argsort(tcode, kind="stable")
        self.method = method
        self.n_quad = n_quad
        self.exog_names = names
        self.slope_name = str(slope_name)
        self.binary = bool(np.all((z == 0) | (z == 1)))
        self.arm_levels = list(arm_levels) if arm_levels is not None and self.binary else None
        self.therapist_labels = tlabels
        self.order = order
        self.y, self.X, self.z, self.g = y[order], X[order], z[order], tcode[order]
        self.n_groups = G
        self.counts = np.bincount(self.g, minlength=G)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.n_obs = n
        self.n_therapists = G
        self.k_fe = p
        t, loga = _gauss_hermite(n_quad)
        self._s0 = np.repeat(t, t.size)
        self._s1 = np.tile(t, t.size)
        self._loga = np.repeat(loga, t.size) + np.tile(loga, t.size)
        self._v_warm = np.zeros((G, 2))

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *,
                   therapist: str = "therapist", arm: str | None = "feedback", feedback_level=1,
                   slope: str | None = None, method: str = "laplace", n_quad: int = 10
                   ) -> LogisticRandomSlopeModel:
        """Build from a patient table, as :meth:`therapist_effects.models.slopes.RandomSlopeModel.from_frame`:
        without ``slope`` the arm's 0/1 feedback indicator is the fixed effect and the random slope."""
        if slope is None or (arm is not None and slope == arm):
            if arm is None:
                raise ModelError("a random slope needs an arm column or a slope column")
            y, X, names, indicator, name = arm_design(
                df, outcome, covariates, therapist=therapist, arm=arm, feedback_level=feedback_level)
            from .arm import _label, arm_labels

            fb = _label(feedback_level)
            control = [lv for lv in sorted(set(arm_labels(df[arm].to_numpy()))) if lv != fb]
            levels = [control[0], fb] if len(control) == 1 else None
            _check_binary(y, df, outcome)
            return cls(y, X, df[therapist].to_numpy(), indicator, exog_names=names, slope_name=name,
                       arm_levels=levels, method=method, n_quad=n_quad)
        from .slopes import slope_design

        y, X, names = slope_design(df, outcome, covariates, therapist, slope)
        _check_binary(y, df, outcome)
        return cls(y, X, df[therapist].to_numpy(), df[slope].to_numpy(float), exog_names=names,
                   slope_name=slope, method=method, n_quad=n_quad)

    # ------------------------------------------------------------------ likelihood
    def _gsum(self, a: np.ndarray) -> np.ndarray:
        return np.add.reduceat(a, self.starts, axis=0)

    def _modes(self, eta0, a0, a1, v0):
        """Conditional modes of all therapists' spherical effects v (G x 2): Newton with step
        halving on h(v) = sum log p(y | eta0 + a0 v_0 + a1 v_1) - |v|^2 / 2 (concave)."""
        y, g = self.y, self.g
        v = v0.copy()

        def h_and(v):
            eta = eta0 + a0 * v[g, 0] + a1 * v[g, 1]
            return self._gsum(_bernoulli_loglik(y, eta)) - 0.5 * (v * v).sum(1), expit(eta)

        h, mu = h_and(v)
        ok = False
        for _ in range(_NEWTON_MAXIT):
            r = y - mu
            w = mu * (1.0 - mu)
            g0 = self._gsum(a0 * r) - v[:, 0]
            g1 = self._gsum(a1 * r) - v[:, 1]
            H00 = 1.0 + self._gsum(w * a0 * a0)
            H01 = self._gsum(w * a0 * a1)
            H11 = 1.0 + self._gsum(w * a1 * a1)
            det = H00 * H11 - H01 * H01
            step = np.column_stack([(H11 * g0 - H01 * g1) / det, (H00 * g1 - H01 * g0) / det])
            if np.max(np.abs(step)) < _NEWTON_TOL:
                ok = True
                break
            for _halving in range(60):
                v_new = v + step
                h_new, mu_new = h_and(v_new)
                bad = h_new < h - 1e-12 * (1.0 + np.abs(h))
                if not bad.any():
                    break
                step = np.where(bad[:, None], 0.5 * step, step)
            v, h, mu = v_new, h_new, mu_new
        return v, mu, ok

    def _loglik(self, b, theta, *, warm: bool = True, details: bool = False):
        """Laplace/AGQ marginal log-likelihood at fixed effects ``b`` and lme4 theta."""
        y, X, z, g = self.y, self.X, self.z, self.g
        t1, t2, t3 = (float(x) for x in theta)
        eta0 = X @ b
        a0 = t1 + z * t2
        a1 = z * t3
        v, mu, ok = self._modes(eta0, a0, a1, self._v_warm if warm else np.zeros((self.n_groups, 2)))
        if warm and ok and np.all(np.isfinite(v)):
            self._v_warm = v
        w = mu * (1.0 - mu)
        H00 = 1.0 + self._gsum(w * a0 * a0)
        H01 = self._gsum(w * a0 * a1)
        H11 = 1.0 + self._gsum(w * a1 * a1)
        c00 = np.sqrt(H00)
        c10 = H01 / c00
        c11 = np.sqrt(np.maximum(H11 - c10 * c10, 1e-300))
        if self._s0.size == 1:
            eta = eta0 + a0 * v[g, 0] + a1 * v[g, 1]
            hk = self._gsum(_bernoulli_loglik(y, eta)) - 0.5 * (v * v).sum(1)
            logS = hk
        else:
            s0, s1 = self._s0[None, :], self._s1[None, :]
            vk0 = v[:, 0:1] + s0 / c00[:, None] - s1 * (c10 / (c00 * c11))[:, None]
            vk1 = v[:, 1:2] + s1 / c11[:, None]
            eta = eta0[:, None] + a0[:, None] * vk0[g] + a1[:, None] * vk1[g]
            hk = self._gsum(_bernoulli_loglik(y[:, None], eta)) - 0.5 * (vk0 * vk0 + vk1 * vk1)
            la = self._loga[None, :] + hk
            top = la.max(axis=1)
            logS = top + np.log(np.exp(la - top[:, None]).sum(axis=1))
        ll = float(np.sum(logS - np.log(c00) - np.log(c11)))
        if details:
            return ll, v, (H00, H01, H11), ok
        return ll

    def loglik(self, fe_params, theta) -> float:
        """Approximate marginal log-likelihood (glmer's ``logLik`` for the Laplace model) at fixed
        effects ``fe_params`` and lme4's ``theta`` (t1, t2, t3)."""
        return self._loglik(np.asarray(fe_params, float), np.asarray(theta, float), warm=False)

    def _scale(self, b):
        """Whitening: the GLM information for b, 0.1 for theta."""
        p = self.k_fe
        mu = expit(self.X @ b)
        info = self.X.T @ ((mu * (1 - mu))[:, None] * self.X)
        A = np.eye(p + 3) * 0.1
        A[:p, :p] = np.linalg.inv(np.linalg.cholesky(info)).T
        return A

    def _maximise(self, psi0, free, to_full: Callable, A, bounds=None, *, maxiter: int = 500):
        """Maximise over the free entries of ``psi`` (``to_full(psi)`` -> (b, theta) vector or None),
        whitened by ``A`` (a matrix over all coordinates; its free block is used); central-difference
        gradient. Returns (psi, loglik, gradient ok, message)."""
        psi0 = np.asarray(psi0, float).copy()
        idx = np.flatnonzero(free)
        Af = A[np.ix_(idx, idx)]
        base = psi0[idx].copy()
        p = self.k_fe

        def unpack(zz):
            ps = psi0.copy()
            ps[idx] = base + Af @ zz
            return ps

        def f(zz):
            full = to_full(unpack(zz))
            if full is None:
                return 1e300
            ll = self._loglik(full[:p], full[p:])
            return -ll if np.isfinite(ll) else 1e300

        def fg(zz):
            """Value and central-difference gradient (one-sided next to an infeasible point)."""
            f0 = f(zz)
            gr = np.zeros_like(zz)
            h = 1e-5
            for k in range(zz.size):
                e = np.zeros_like(zz)
                e[k] = h
                fp, fm = f(zz + e), f(zz - e)
                up_ok, down_ok = fp < 1e299, fm < 1e299
                if up_ok and down_ok:
                    gr[k] = (fp - fm) / (2 * h)
                elif up_ok:
                    gr[k] = (fp - f0) / h
                elif down_ok:
                    gr[k] = (f0 - fm) / h
            return f0, gr

        zb = None
        if bounds is not None:  # bounds on psi's free coordinates, mapped to z (diagonal block of A)
            zb = []
            for j, i in enumerate(idx):
                lo, hi = bounds[i]
                d = Af[j, j]
                if np.count_nonzero(Af[j]) > 1 or np.count_nonzero(Af[:, j]) > 1:
                    zb.append((None, None))
                    continue
                zb.append((None if lo is None else (lo - base[j]) / d, None if hi is None else (hi - base[j]) / d))
        res = optimize.minimize(fg, np.zeros(idx.size), jac=True, method="L-BFGS-B", bounds=zb,
                                options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-6, "maxcor": 20})
        ps = unpack(res.x)
        _, gz = fg(res.x)
        lo_ok = np.ones(idx.size, bool)
        if zb is not None:  # a gradient component pushing against an active bound is fine
            for j, (lo, hi) in enumerate(zb):
                if (lo is not None and res.x[j] <= lo + 1e-10) or (hi is not None and res.x[j] >= hi - 1e-10):
                    lo_ok[j] = False
        ok = bool(np.max(np.abs(gz[lo_ok]), initial=0.0) < 1e-2)
        return ps, -float(res.fun), ok, str(res.message)

    def _fit_theta(self, th0, free):
        """(b, theta) maximum over the free coordinates: Laplace first, then AGQ from there."""
        p = self.k_fe
        A = self._scale(th0[:p])
        ident = lambda ps: ps  # noqa: E731
        grids = (self._s0, self._s1, self._loga)
        self._s0, self._s1, self._loga = np.zeros(1), np.zeros(1), np.zeros(1)
        try:
            self._v_warm = np.zeros((self.n_groups, 2))
            th, ll, ok, msg = self._maximise(th0, free, ident, A)
        finally:
            self._s0, self._s1, self._loga = grids
        if self.n_quad > 1:
            th, ll, ok, msg = self._maximise(th, free, ident, A)
        return th, ll, ok, msg

    def _estimate(self):
        p = self.k_fe
        b0 = LogisticRandomInterceptModel(self.y, self.X, self.g, exog_names=self.exog_names)._glm_start()
        free = np.ones(p + 3, bool)
        th, ll, ok, msg = best_start(lambda start: self._fit_theta(np.concatenate([b0, start]), free),
                                     ((0.5, 0.0, 0.5), (0.2, -0.1, 0.2)))
        th[p:] = _canonical(th[p:])
        sing = np.array([th[p] < SINGULAR_TOL, False, th[p + 2] < SINGULAR_TOL])
        if sing.any():
            free2 = free.copy()
            free2[p:] = ~sing
            th0 = th.copy()
            th0[p:] = np.where(sing, 0.0, th0[p:])
            if sing[0]:  # no intercept variance: t2 is the slope SD alone, t3 is redundant
                th0[p + 1] = math.hypot(th[p + 1], th[p + 2])
                th0[p + 2] = 0.0
                free2[p + 2] = False
            th2, ll2, ok2, msg2 = self._fit_theta(th0, free2)
            if ll2 >= ll - 1e-6:
                th, ll, ok, msg = th2, ll2, ok2, msg2
            th[p:] = np.where(sing, 0.0, th[p:])
            th[p:] = _canonical(th[p:])
        return th, ll, ok, msg, sing

    @_single_thread_blas
    def fit(self) -> LogisticRandomSlopeResults:
        """Fit; warns ``ConvergenceWarning`` / ``SingularFitWarning`` (an SD at 0 or a correlation of +-1)."""
        th, ll, ok, msg, sing = self._estimate()
        what = "the intercept variance is 0" if sing[0] else "the intercept-slope correlation is -1/+1 (theta[3] = 0)"
        msgs = fit_warnings("Laplace" if self.n_quad == 1 else f"AGQ{self.n_quad}x{self.n_quad}", ok, msg,
                            f"singular fit: {what}; intervals at the boundary are one-sided" if sing.any() else None)
        return LogisticRandomSlopeResults(self, th, ll, ok, sing, msgs)


def _check_binary(y, df, outcome):
    notbin = (y != 0) & (y != 1)
    if notbin.any():
        i = int(np.flatnonzero(notbin)[0])
        raise ModelError(f"outcome {outcome!r} must be binary 0/1: row {df.index[i]} has value {y[i]:g}"
                         f" ({int(notbin.sum())} such rows)")


class LogisticRandomSlopeResults(ModelResults):
    """Fit of :class:`LogisticRandomSlopeModel`.

    ``fe_params``/``bse``: fixed effects (log-odds) and SEs; ``theta``: lme4's theta; ``cov_re``:
    Sigma; ``vcomp``: ``therapist`` (intercept variance), ``therapist_slope`` and ``residual``
    (pi^2/3); ``correlation``; ``loglik`` as glmer's ``logLik`` (Laplace) or its AGQ counterpart.
    """

    def __init__(self, model: LogisticRandomSlopeModel, params: np.ndarray, loglik: float, converged: bool,
                 singular_theta: np.ndarray, warnings_list: list[str]):
        m = model
        p = m.k_fe
        self.model = m
        self.loglik = float(loglik)
        self.converged = bool(converged)
        self.singular_theta = np.asarray(singular_theta, bool)
        self.singular = bool(self.singular_theta.any())
        self.warnings_list = list(warnings_list)
        self._params = np.asarray(params, float)
        self.theta = self._params[p:].copy()
        self.method = "Laplace" if m.n_quad == 1 else f"AGQ{m.n_quad}"
        self.n_obs = self.n_patients = m.n_obs
        self.n_therapists = m.n_therapists
        self.exog_names = list(m.exog_names)
        self.fe_params = pd.Series(self._params[:p], index=self.exog_names, name="estimate")
        S = _cov(self.theta)
        self.cov_re = pd.DataFrame(S, index=["(Intercept)", m.slope_name], columns=["(Intercept)", m.slope_name])
        s0, s1, rho = _slope_sds(self.theta)
        self.correlation = float(rho) if s0 > 0 and s1 > 0 else math.nan
        self.vcomp = {"therapist": float(S[0, 0]), "therapist_slope": float(S[1, 1]),
                      "residual": LATENT_RESIDUAL_VARIANCE}
        self._free = np.ones(p + 3, bool)
        self._free[p:] = ~self.singular_theta
        if self.singular_theta[0]:
            self._free[p + 2] = False
        with _single_thread_blas_ctx():
            info = self._information()
        cov = _safe_inv(info)
        cb = cov[:p, :p]
        self.cov_fe = pd.DataFrame(cb, index=self.exog_names, columns=self.exog_names)
        self.vcov = self.cov_fe
        self.bse = pd.Series(np.sqrt(np.where(np.diag(cb) > 0, np.diag(cb), np.nan)), index=self.exog_names,
                             name="se")
        self.params = pd.concat([self.fe_params, pd.Series({"therapist": self.vcomp["therapist"],
                                                            "therapist_slope": self.vcomp["therapist_slope"]})])
        self._ll, self.modes, self._curv, _ = m._loglik(self._params[:p], self.theta, warm=False, details=True)
        self._limits: dict = {}
        self._points: dict = {}

    def _n_params(self) -> int:
        """Fixed effects and the three covariance parameters (no residual scale): glmer's df of logLik."""
        return int(self.model.k_fe + 3)

    def _information(self) -> np.ndarray:
        """Observed information of the free coordinates of (b, theta) by central second differences
        of the log-likelihood (as lme4's ``vcov`` of a glmer fit, which differentiates the deviance)."""
        m = self.model
        p = m.k_fe
        idx = np.flatnonzero(self._free)
        A = m._scale(self._params[:p])
        D = A[np.ix_(idx, idx)]  # work in whitened coordinates: unit curvature, well-scaled steps
        x0 = self._params.copy()

        def f(zz):
            x = x0.copy()
            x[idx] = x0[idx] + D @ zz
            return m._loglik(x[:p], x[p:], warm=False)

        k = idx.size
        h = 1e-3
        f0 = f(np.zeros(k))
        Hz = np.zeros((k, k))
        E = np.eye(k) * h
        fp = [f(E[i]) for i in range(k)]
        fm = [f(-E[i]) for i in range(k)]
        for i in range(k):
            Hz[i, i] = -(fp[i] - 2 * f0 + fm[i]) / (h * h)
            for j in range(i):
                fpp = f(E[i] + E[j])
                fmm = f(-E[i] - E[j])
                Hz[i, j] = Hz[j, i] = -(fpp - fp[i] - fp[j] + 2 * f0 - fm[i] - fm[j] + fmm) / (2 * h * h)
        Dinv = np.linalg.inv(D)
        return Dinv.T @ Hz @ Dinv

    # ------------------------------------------------------------------ per-arm quantities
    @property
    def is_arm(self) -> bool:
        return self.model.arm_levels is not None

    def variance_by_arm(self) -> np.ndarray:
        """Therapist variance of the control (slope 0) and feedback (slope 1) arm."""
        s0, s1, _ = _arm_sds(self.theta)
        return np.array([s0 * s0, s1 * s1])

    def icc_point(self) -> np.ndarray:
        return latent_icc(self.variance_by_arm())

    def ratio_point(self) -> float:
        icc = self.icc_point()
        return float(icc[1] / icc[0]) if icc[0] > 0 else math.nan

    # ------------------------------------------------------------------ profiles
    def _param(self, kind: str) -> tuple[np.ndarray, Callable, list, int]:
        """(psi_hat, psi -> (b, theta), bounds, index of the profiled coordinate) of a
        parameterisation in which ``kind`` is a coordinate: ``sd0``/``sd1``/``rho`` in (intercept SD,
        slope SD, correlation), ``arm1`` in (control SD, feedback SD, arm correlation), ``ratio`` in
        (control SD, ratio, arm correlation)."""
        m = self.model
        p = m.k_fe
        b = self._params[:p]
        nb = [(None, None)] * p
        if kind in ("sd0", "sd1", "rho"):
            s0, s1, rho = _slope_sds(self.theta)
            psi = np.concatenate([b, [s0, s1, rho]])

            def full(ps):
                return np.concatenate([ps[:p], _theta_from_sd(ps[p], ps[p + 1], ps[p + 2])])

            bounds = nb + [(0.0, None), (0.0, None), (-1.0, 1.0)]
            j = {"sd0": 0, "sd1": 1, "rho": 2}[kind]
        elif kind == "arm1":
            sc, sf, r = _arm_sds(self.theta)
            psi = np.concatenate([b, [sc, sf, r]])

            def full(ps):
                return np.concatenate([ps[:p], _theta_from_arms(ps[p], ps[p + 1], ps[p + 2])])

            bounds = nb + [(0.0, None), (0.0, None), (-1.0, 1.0)]
            j = 1
        elif kind == "ratio":
            sc, sf, r = _arm_sds(self.theta)
            psi = np.concatenate([b, [sc, self.ratio_point(), r]])

            def full(ps):
                sc_, ratio, r_ = ps[p], ps[p + 1], ps[p + 2]
                i1 = ratio * latent_icc(sc_ * sc_)
                if i1 >= 1.0 - 1e-12:
                    return None
                sf_ = math.sqrt(_C * i1 / (1.0 - i1))
                return np.concatenate([ps[:p], _theta_from_arms(sc_, sf_, r_)])

            bounds = nb + [(1e-8, None), (0.0, None), (-1.0, 1.0)]
            j = 1
        else:  # pragma: no cover
            raise ModelError(f"cannot profile {kind!r}")
        return psi, full, bounds, p + j

    def _profile_ll(self, kind: str, value: float) -> float:
        m = self.model
        p = m.k_fe
        psi_hat, full, bounds, j = self._param(kind)
        cache = self._points.setdefault(kind, {})
        psi0 = cache[min(cache, key=lambda x: abs(x - value))].copy() if cache else psi_hat.copy()
        psi0[p:] = np.clip(psi0[p:], [0.02, 0.02, -0.98], [np.inf, np.inf, 0.98])
        if kind == "ratio" and value * latent_icc(psi0[p] ** 2) >= 0.5:
            i0 = 0.5 / value
            psi0[p] = math.sqrt(_C * i0 / (1.0 - i0))
        psi0[j] = value
        free = np.ones(p + 3, bool)
        free[j] = False
        A = m._scale(psi0[:p])
        saved = m._v_warm.copy()
        ps, ll, _ok, _msg = m._maximise(psi0, free, full, A, bounds)
        m._v_warm = saved
        cache[value] = ps
        return ll

    def _limits_of(self, kind: str, level: float):
        key = (kind, level)
        if key in self._limits:
            return self._limits[key]
        q = chi2_cut(level)
        psi_hat, _full, _b, j = self._param(kind)
        xhat = float(psi_hat[j])
        lmax = self.loglik

        def excess(x):
            return max(2.0 * (lmax - self._profile_ll(kind, x)), 0.0)

        if kind == "rho":
            if not np.isfinite(self.correlation):
                out = (math.nan, math.nan)
                self._limits[key] = out
                return out
            lims = [profile_limit(excess, xhat, q, d, lower=-1.0, upper=1.0, step=0.1, edge_ok=True,
                                  xtol=1e-6, rtol=1e-6) for d in (-1, 1)]
        else:
            if kind == "ratio" and not np.isfinite(xhat):
                out = (math.nan, math.nan)
                self._limits[key] = out
                return out
            lims = [profile_limit(excess, xhat, q, d, lower=0.0, step=0.3, log_scale=True,
                                  scale=max(xhat, 0.05), edge_ok=True, ceiling=50.0 if kind != "ratio" else 1e3,
                                  xtol=1e-6, rtol=1e-6) for d in (-1, 1)]
            if kind == "ratio" and self._limits_of("sd0", level)[0] == 0.0:
                # a control ICC of 0 is inside its interval: the ratio is unbounded above
                lims[1] = type(lims[1])(math.inf, "open", 0)
        for lim in lims:
            if lim.status == "open" and not (kind == "ratio" and math.isinf(lim.value)):
                warnings.warn(f"profile interval for {kind}: the deviance did not reach the chi2 cut-off; "
                              "that end is open", StatisticalWarning, stacklevel=3)
        out = (float(lims[0].value), float(lims[1].value))
        self._limits[key] = out
        return out

    @_single_thread_blas
    def interval(self, name: str, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        """Profile interval of ``therapist`` / ``therapist_slope`` (variances: the SD interval
        squared, as lme4), ``correlation``, ``therapist[<control>]`` / ``therapist[<feedback>]``
        (arm variances) or ``ratio`` (ICC_feedback / ICC_control)."""
        arms = self.model.arm_levels or []
        if name == "therapist" or (arms and name == f"therapist[{arms[0]}]"):
            lo, hi = self._limits_of("sd0", level)
            return lo * lo, hi * hi
        if name == "therapist_slope":
            lo, hi = self._limits_of("sd1", level)
            return lo * lo, hi * hi
        if name == "correlation":
            return self._limits_of("rho", level)
        if arms and name == f"therapist[{arms[1]}]":
            lo, hi = self._limits_of("arm1", level)
            return lo * lo, hi * hi
        if name == "ratio" and arms:
            return self._limits_of("ratio", level)
        raise ModelError(f"cannot profile {name!r}; choose therapist, therapist_slope, correlation"
                         + (", therapist[<arm>] or ratio" if arms else ""))

    def conf_int(self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL) -> pd.DataFrame:
        """Wald intervals of the fixed effects, profile intervals of the variances and correlation
        (the only ``method`` offered is ``"profile"``); columns ``lower``/``upper`` as every engine's."""
        _profile_only(method)
        lo, hi = wald_interval(self.fe_params.to_numpy(), self.bse.to_numpy(), level)
        rows = {nm: (a, c) for nm, a, c in zip(self.exog_names, lo, hi)}
        for nm in ("therapist", "therapist_slope", "correlation"):
            rows[nm] = self.interval(nm, level)
        return interval_frame(rows)

    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed=None) -> ICC:
        """The engines' common ``icc()``. With the arm as the slope: rows ``icc[<arm>]`` (latent scale;
        the float value is NaN, as for every arm model), with a ``level`` their profile intervals.
        With a continuous slope: row ``icc[<slope>=0]``, the latent ICC where the slope variable is 0
        (no interval)."""
        _profile_only(method)
        if self.is_arm:
            by_arm = self.icc_by_arm(level) if level is not None else None
            return per_arm_icc(self.model.arm_levels, self.icc_point(), by_arm, "profile" if by_arm is not None else None)
        v = self.vcomp["therapist"]
        return icc_table({f"icc[{self.model.slope_name}=0]": v / (v + LATENT_RESIDUAL_VARIANCE)})

    def icc_by_arm(self, level: float = DEFAULT_LEVEL) -> pd.DataFrame:
        """Latent-scale ICC per arm with the profile interval (the arm variance's interval mapped)."""
        if not self.is_arm:
            raise ModelError("per-arm ICCs need the arm as the slope variable")
        icc = self.icc_point()
        rows = []
        for a, lv in enumerate(self.model.arm_levels):
            lo, hi = self.interval(f"therapist[{lv}]", level)
            rows.append({"arm": lv, "role": "control" if a == 0 else "feedback", "estimate": float(icc[a]),
                         "ci_low": float(latent_icc(lo)), "ci_high": float(latent_icc(hi)), "ci_method": "profile"})
        return pd.DataFrame(rows).set_index("arm")

    def icc_ratio(self, level: float = DEFAULT_LEVEL) -> dict:
        lo, hi = self.interval("ratio", level)
        return {"estimate": self.ratio_point(), "ci_low": lo, "ci_high": hi, "ci_method": "profile"}

    def icc_reduction(self, level: float = DEFAULT_LEVEL) -> dict:
        r = self.icc_ratio(level)
        return {"estimate": 1.0 - r["estimate"], "ci_low": 1.0 - r["ci_high"], "ci_high": 1.0 - r["ci_low"],
                "ci_method": "profile"}

    # ------------------------------------------------------------------ therapists
    def gap_table(self) -> pd.DataFrame:
        """Per therapist: caseload, conditional modes of the intercept and slope effects (log-odds;
        lme4's ``ranef``), the control and feedback effects and the therapist's feedback effect."""
        from .slopes import gap_frame

        m = self.model
        L = np.array([[self.theta[0], 0.0], [self.theta[1], self.theta[2]]])
        u = self.modes @ L.T
        return gap_frame(m.therapist_labels, m.g, m.z, u, float(self.fe_params[m.slope_name]), m.binary)

    def _summary_title(self) -> str:
        return f"Random slope (1 + {self.model.slope_name} | therapist), logistic ({self.method})"

    def _summary_info(self) -> dict:
        info = {**super()._summary_info(), "correlation": self.correlation, "ICC scale": "latent (pi^2/3)"}
        if self.is_arm:
            info["ICC ratio (fb/ctrl)"] = self.ratio_point()
        return info

    @_single_thread_blas
    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT, seed=None) -> dict:
        """The model's ``estimates.json`` entry: the gaussian random_slope keys (``therapist``,
        ``therapist_slope``, ``residual``, ``correlation``, ``slope``), and for an arm slope the arm
        model's ``icc_by_arm``, ``icc_ratio``, ``icc_reduction`` (latent scale). Only profile
        intervals are offered (another request is answered with profile intervals and a warning)."""
        caught = list(self.warnings_list)
        with recorded_warnings(caught):
            profile_only_notice("random_slope", interval)
            ci = self.conf_int(DEFAULT_LEVEL)
            extra = {}
            if self.is_arm:
                icc = self.icc_by_arm(DEFAULT_LEVEL)
                extra = {
                    "icc_by_arm": {lv: {"estimate": icc.loc[lv, "estimate"], "ci_low": icc.loc[lv, "ci_low"],
                                        "ci_high": icc.loc[lv, "ci_high"], "ci_method": "profile",
                                        "scale": "latent"} for lv in self.model.arm_levels},
                    "icc_ratio": self.icc_ratio(DEFAULT_LEVEL),
                    "icc_reduction": self.icc_reduction(DEFAULT_LEVEL),
                    "control_level": self.model.arm_levels[0],
                    "feedback_level": self.model.arm_levels[1],
                }
        vc = {nm: {"estimate": self.vcomp[nm], "ci_low": ci.loc[nm, "lower"], "ci_high": ci.loc[nm, "upper"]}
              for nm in ("therapist", "therapist_slope")}
        vc["residual"] = {"estimate": LATENT_RESIDUAL_VARIANCE, "ci_low": None, "ci_high": None}
        return _jsonable({
            "type": "random_slope",
            "family": "binomial",
            "method": self.method,
            "slope": self.model.slope_name,
            "fixed_effects": {nm: {"estimate": self.fe_params[nm], "se": self.bse[nm],
                                   "ci_low": ci.loc[nm, "lower"], "ci_high": ci.loc[nm, "upper"]}
                              for nm in self.exog_names},
            "variance_components": vc,
            "correlation": {"estimate": self.correlation, "ci_low": ci.loc["correlation", "lower"],
                            "ci_high": ci.loc["correlation", "upper"], "ci_method": "profile"},
            **extra,
            **self.fit_fields(),
            "n_patients": self.n_obs,
            "n_therapists": self.n_therapists,
            "n_clusters": None,
            "warnings": caught,
        })


def _single_thread_blas_ctx():
    import contextlib

    from . import glmm

    if glmm._threadpool_limits is not None:
        return glmm._threadpool_limits(limits=1, user_api="blas")
    return contextlib.nullcontext()


def _profile_only(method: str | None) -> None:
    if method not in (None, "profile"):
        raise ModelError(f"binomial random_slope offers profile intervals only, got method {method!r}")

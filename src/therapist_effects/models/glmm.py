"""Binary outcomes: random-intercept logistic GLMM (patients nested in therapists).

For a binary patient outcome (recovered, reliable improvement, deterioration, dropout) the model is

    logit P(y_ij = 1) = x_ij' b + u_j,     u_j ~ N(0, s_u^2),

with ``j`` the therapist and ``i`` the patient. ``s_u^2`` is the between-therapist variance on the
log-odds (latent) scale, and the latent-scale ICC is ``s_u^2 / (s_u^2 + pi^2 / 3)``: the share of the
variance of the latent propensity that lies between therapists.

The marginal likelihood of therapist ``j``'s caseload is a one-dimensional integral over ``u_j``. It
is approximated exactly as R's ``lme4::glmer`` does:

* ``method="laplace"`` (glmer ``nAGQ = 1``): Laplace approximation at the conditional mode;
* ``method="agq"`` with ``n_quad = k`` (glmer ``nAGQ = k``): adaptive Gauss-Hermite quadrature with
  ``k`` nodes centred at the conditional mode and scaled by the conditional SD from the curvature.

Writing ``u_j = s_u v_j`` (``v_j`` standard normal, lme4's "spherical" random effect) and
``h_j(v) = sum_i log p(y_ij | x_ij'b + s_u v) - v^2/2``, the conditional mode ``v^_j`` maximises
``h_j``, ``H_j = 1 + s_u^2 sum_i mu_ij (1 - mu_ij)`` is the curvature there, ``sigma_j = H_j^-1/2``,
and

    log L_j = log sigma_j + log sum_k w_k exp(t_k^2 / 2) exp(h_j(v^_j + sigma_j t_k))

with (t_k, w_k) the probabilists' Gauss-Hermite rule normalised to sum(w) = 1. With one node
(t = 0, w = 1) this is the Laplace approximation. For 0/1 outcomes lme4's deviance residuals equal
``-2 log p(y | eta)`` (the saturated Bernoulli model has likelihood 1), so ``loglik`` here is the
same quantity as ``logLik()`` of glmer for both ``nAGQ = 1`` and ``nAGQ > 1``, constants included.

Everything is vectorised over therapists: patients are sorted by therapist once and per-patient terms
are summed per therapist with ``np.add.reduceat`` (arrays of shape patients x nodes are reduced to
therapists x nodes). Conditional modes come from a vectorised, safeguarded Newton iteration; the
outer maximisation over (b, s_u >= 0) is L-BFGS-B with the exact analytic gradient of the
approximated log-likelihood (including the dependence of the mode and the node positions on the
parameters), as lme4 optimises over (theta = s_u >= 0, beta) in its second stage.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize, stats
from scipy.special import expit

from ..classify import classify_effects
from .design import build_design, group_codes
from ..engine.inference import chi2_cut, parametric_bootstrap, profile_limit
from ..engine.results import (CONF_INT_COLUMNS, DEFAULT_INTERVAL, DEFAULT_LEVEL, DEFAULT_N_BOOT, ICC, ModelResults,
                             icc_table, json_plain)
from ..exceptions import (
    ConvergenceWarning,
    ModelError,
    SingularFitWarning,
    StatisticalWarning,
)

__all__ = ["LogisticRandomInterceptModel", "LogisticMixedResults", "LATENT_RESIDUAL_VARIANCE"]

#: Variance of the standard logistic distribution: the level-1 ("residual") variance of the latent
#: propensity in a logistic model, used for the latent-scale ICC.
LATENT_RESIDUAL_VARIANCE = math.pi**2 / 3.0

#: lme4's ``isSingular`` tolerance on theta (here theta = s_u, the therapist SD on the logit scale).
SINGULAR_TOL = 1e-4

_NEWTON_TOL = 1e-10
_NEWTON_MAXIT = 100

try:  # optional: the optimisers' BLAS calls are on tiny matrices, where threads only cost time
    from threadpoolctl import threadpool_limits as _threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl is not a declared dependency
    _threadpool_limits = None


def _single_thread_blas(func):
    """Run ``func`` with BLAS limited to one thread (when threadpoolctl is available).

    L-BFGS-B and the p x p algebra here make many tiny BLAS calls; on a busy machine multithreaded
    OpenBLAS spends most of the time waiting for its threads (measured: 7x slower fits).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = (
            _threadpool_limits(limits=1, user_api="blas")
            if _threadpool_limits is not None
            else contextlib.nullcontext()
        )
        with ctx:
            return func(*args, **kwargs)

    return wrapper


def _gauss_hermite(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``t`` and log of ``w * exp(t^2/2)`` for k-point Gauss-Hermite with N(0, 1) weight.

    ``sum(w) = 1``; ``int f(t) dt ~= sum_k w_k exp(t_k^2/2) sqrt(2 pi) f(t_k)`` for smooth f. Same
    rule as lme4's ``GHrule(k)``.
    """
    if k == 1:
        return np.zeros(1), np.zeros(1)
    t, w = np.polynomial.hermite_e.hermegauss(k)
    w = w / w.sum()
    return t, np.log(w) + 0.5 * t**2


def _bernoulli_loglik(y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """log p(y | eta) for y in {0, 1} under the logit link, stable for large |eta|."""
    return np.minimum((2.0 * y - 1.0) * eta, 0.0) - np.log1p(np.exp(-np.abs(eta)))


def block_terms(model, eta0: np.ndarray, s_block, s_patient, warm: bool) -> tuple:
    """The conditional modes of ``model``'s blocks (warm-started from ``model._v_warm``, which
    keeps a converged result when ``warm``), the quantities there and the quadrature of
    :func:`quadrature` with ``model``'s nodes: ``(v, mu0, ok, w, W, H, sigma, vk, mu, la, logS,
    loglik)``, with Bernoulli weights ``w`` per patient, their block sums ``W``, the curvature
    ``H = 1 + s^2 W`` and the conditional SDs ``sigma = H^-1/2`` (``s_block``/``s_patient``: the
    random-effect SD of each block / patient, or one number)."""
    v, mu0, ok = model._modes(eta0, s_block, model._v_warm if warm else np.zeros(model._v_warm.shape))
    if warm and ok and np.all(np.isfinite(v)):
        model._v_warm = v
    w = mu0 * (1.0 - mu0)
    W = model._gsum(w)
    H = 1.0 + s_block * s_block * W
    sigma = 1.0 / np.sqrt(H)
    quad = quadrature(model.y, model.g, model._gsum, eta0, s_patient, v, mu0, sigma, model._t, model._loga)
    return (v, mu0, ok, w, W, H, sigma, *quad)


@contextlib.contextmanager
def recorded_warnings(caught: list[str]):
    """Record every warning raised inside (appended to ``caught`` as ``"<Category>: <message>"``,
    for an ``estimates.json`` entry's ``warnings``) and issue it again on leaving."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        yield
    for w in rec:
        caught.append(f"{w.category.__name__}: {w.message}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def profile_only_notice(what: str, interval: str) -> None:
    """Warn that ``interval`` intervals are not offered by the binomial ``what`` model and profile
    intervals are reported instead (a StatisticalWarning; nothing for ``"profile"``)."""
    if interval != "profile":
        warnings.warn(f"binomial {what}: {interval!r} intervals are not offered for variance components, ICCs or"
                      " correlations; profile-likelihood intervals are reported instead", StatisticalWarning,
                      stacklevel=3)


def fit_warnings(label: str, ok: bool, message: str, singular: str | None) -> list[str]:
    """Warn (``ConvergenceWarning`` when the optimiser did not report convergence,
    ``SingularFitWarning`` with the text ``singular`` when given) and return the warnings as the
    results' ``warnings_list`` entries (``"<Category>: <label>: <text>"``)."""
    msgs = []
    for cond, cat, text in ((not ok, ConvergenceWarning,
                             f"optimiser did not converge ({message}); estimates may not be at the maximum"),
                            (singular, SingularFitWarning, singular)):
        if cond:
            warnings.warn(f"{label}: {text}", cat, stacklevel=4)
            msgs.append(f"{cat.__name__}: {label}: {text}")
    return msgs


def best_start(fit, starts):
    """The best of ``fit(start)`` -> ``(theta, loglik, ok, message)`` over ``starts``, tried in
    order until one converges (a later one replaces the best only if its loglik is higher by more
    than 1e-8)."""
    best = None
    for start in starts:
        out = fit(start)
        if best is None or out[1] > best[1] + 1e-8:
            best = out
        if out[2]:
            break
    return best


def quadrature(y, g, gsum, eta0, s, v, mu0, sigma, t, loga):
    """The adaptive Gauss-Hermite (one node: Laplace) log-likelihood of Bernoulli blocks ``g`` with
    random-effect SD ``s`` (a number, or one per patient), conditional modes ``v`` (means ``mu0``
    there) and conditional SDs ``sigma`` per block, nodes ``t`` and log weights ``loga``. Returns
    ``(vk, mu, la, logS, loglik)``: the nodes per block (blocks x nodes), the means there (patients
    x nodes), the log integrand terms, their log sum per block and the log-likelihood."""
    if t.size == 1:  # Laplace: the single node is the mode
        vk = v[:, None]
        mu = mu0[:, None]
        eta = (eta0 + s * v[g])[:, None]
    else:
        vk = v[:, None] + sigma[:, None] * t[None, :]  # G x K
        eta = eta0[:, None] + (s if np.ndim(s) == 0 else s[:, None]) * vk[g]  # n x K
        mu = expit(eta)
    hk = gsum(_bernoulli_loglik(y[:, None], eta)) - 0.5 * vk**2  # G x K
    la = loga[None, :] + hk
    if t.size == 1:
        logS = la[:, 0]
    else:
        top = la.max(axis=1)
        logS = top + np.log(np.exp(la - top[:, None]).sum(axis=1))
    return vk, mu, la, logS, float(np.sum(np.log(sigma) + logS))


@dataclass
class _Eval:
    """Everything computed at one parameter value (b, s_u)."""

    loglik: float
    grad: np.ndarray
    v: np.ndarray  # conditional modes of the spherical effects v_j (u_j = s_u v_j)
    H: np.ndarray  # curvature 1 + s^2 sum w at the mode
    newton_ok: bool


def block_modes(y: np.ndarray, g: np.ndarray, gsum, eta0: np.ndarray, s, v0: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Conditional modes v^_j of h_j(v) = sum_i log p(y_i | eta0_i + s_j v) - v^2/2 for all blocks j
    at once (therapists, or therapist x arm blocks); returns (v^, mu, ok).

    ``s``: the blocks' random-effect SD, one number or one per block; ``g``: each patient's block;
    ``gsum``: the per-block sum of per-patient terms. h_j is strictly concave (h'' <= -1), so h'_j is
    strictly decreasing: Newton steps point to the root, and a step (per block) is halved until |h'_j|
    falls by at least half the fraction of the Newton step taken (a sufficient decrease, which
    guarantees convergence; a mere decrease lets a start far out in the tails, where the curvature
    vanishes, jump between the two tails for ever). ``mu`` are the patients' fitted probabilities at
    the modes.
    """
    s = np.asarray(s, dtype=float)
    if s.ndim == 0 and s == 0.0:
        return np.zeros_like(v0), expit(eta0), True
    s_obs = s[g] if s.ndim else s
    v = np.where(s == 0.0, 0.0, v0)
    mu = expit(eta0 + s_obs * v[g])
    gr = s * gsum(y - mu) - v
    H = 1.0 + s * s * gsum(mu * (1.0 - mu))
    ok = False
    for _ in range(_NEWTON_MAXIT):
        step = gr / H
        if np.max(np.abs(step)) < _NEWTON_TOL:
            ok = True
            break
        for _halving in range(60):
            v_new = v + step
            mu_new = expit(eta0 + s_obs * v_new[g])
            gr_new = s * gsum(y - mu_new) - v_new
            # H |step| / |h'_j| is the fraction of the Newton step taken; a step below the tolerance is
            # taken as it is (|h'_j| is at the level of its rounding there)
            bad = (np.abs(gr_new) > np.abs(gr) - 0.5 * H * np.abs(step)) & (np.abs(step) >= _NEWTON_TOL)
            if not bad.any():
                break
            step = np.where(bad, 0.5 * step, step)
        v, mu, gr = v_new, mu_new, gr_new
        H = 1.0 + s * s * gsum(mu * (1.0 - mu))
    return v, mu, ok


class LogisticRandomInterceptModel:
    """Random-intercept logistic model: binary patient outcome, patients nested in therapists.

    Parameters
    ----------
    endog : array-like of 0/1
        Binary outcome per patient (e.g. recovered).
    exog : array-like, shape (patients, p)
        Fixed-effects design (case-mix covariates, arm), including the intercept column if wanted
        (``from_frame`` adds it).
    therapist : array-like
        Therapist identifier per patient (the grouping factor).
    exog_names : sequence of str, optional
        Names of the fixed effects; taken from a DataFrame's columns, else ``x0, x1, ...``.
    method : {"laplace", "agq"}
        Laplace approximation (glmer ``nAGQ = 1``) or adaptive Gauss-Hermite quadrature
        (glmer ``nAGQ = n_quad``).
    n_quad : int
        Number of quadrature nodes for ``method="agq"`` (default 10, as lme4 ``nAGQ = 10``);
        ignored for ``"laplace"``. ``"agq"`` with one node is the Laplace approximation.
    """

    def __init__(self, endog, exog, therapist, *, exog_names: Sequence[str] | None = None, method: str = "laplace",
                 n_quad: int = 10) -> None:
        method, n_quad = check_quadrature(method, n_quad)
        if exog_names is None and isinstance(exog, pd.DataFrame):
            exog_names = [str(c) for c in exog.columns]
        labels = np.asarray(therapist)
        y, X, exog_names = binary_inputs(endog, exog, exog_names, {"therapist": labels})
        n, p = X.shape
        codes, uniques = group_codes(labels)
        G = len(uniques)
        if G < 2:
            raise ModelError(f"at least 2 therapists are needed, got {G}")

        order = np.argsort(codes, kind="stable")
        self.method = method
        self.n_quad = n_quad
        self.exog_names = list(exog_names)
        self.therapist_labels = uniques
        self.order = order  # row i of the sorted data is row order[i] of the input
        self.y = y[order]
        self.X = X[order]
        self.g = codes[order]
        self.counts = np.bincount(self.g)  # (every code 0..G-1 has a patient)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.n_obs = n
        self.n_therapists = G
        self.k_fe = p
        self._t, self._loga = _gauss_hermite(n_quad)
        self._v_warm = np.zeros(G)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *, therapist: str = "therapist",
                   method: str = "laplace", n_quad: int = 10) -> LogisticRandomInterceptModel:
        """Model ``outcome ~ covariates + (1 | therapist)`` from a patient table (R-style coding)."""
        if therapist not in df.columns:
            raise ModelError(f"therapist column {therapist!r} is not a column of the patient table")
        design = build_design(df, outcome, list(covariates))
        check_binary(design.y, df, outcome)
        if df[therapist].isna().any():
            raise ModelError(
                f"{int(df[therapist].isna().sum())} rows have no therapist in column {therapist!r};"
                " drop them before fitting"
            )
        return cls(
            design.y,
            design.X,
            df[therapist].to_numpy(),
            exog_names=design.names,
            method=method,
            n_quad=n_quad,
        )

    # ------------------------------------------------------------------ internals
    def _gsum(self, a: np.ndarray) -> np.ndarray:
        """Sum per therapist of per-patient terms (rows sorted by therapist); keeps trailing axes."""
        return np.add.reduceat(a, self.starts)

    def _modes(
        self, eta0: np.ndarray, s: float, v0: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Conditional modes v^_j of h_j(v) for all therapists at once; returns (v^, mu, ok)
        (:func:`block_modes`)."""
        return block_modes(self.y, self.g, self._gsum, eta0, s, v0)

    def _evaluate(self, b: np.ndarray, s: float, *, warm: bool = True) -> _Eval:
        """Approximate log-likelihood (Laplace or AGQ) and its exact gradient in (b, s)."""
        y, X, g = self.y, self.X, self.g
        s = float(s)  # the likelihood is even in s; negative values are allowed internally
        eta0 = X @ b
        v, mu0, ok, w, W, H, sigma, vk, mu, la, logS, loglik = block_terms(self, eta0, s, s, warm)
        pi = np.exp(la - logS[:, None])  # G x K, normalised node weights
        r = y[:, None] - mu  # n x K
        Rk = self._gsum(r)  # G x K
        t = self._t
        rbar = r[:, 0] if t.size == 1 else np.sum(r * pi[g], axis=1)  # n
        hv = s * Rk - vk
        c = np.sum(pi * hv, axis=1)
        d = np.sum(pi * hv * t[None, :], axis=1)
        # derivatives of the mode and of the curvature (implicit function theorem)
        w1 = w * (1.0 - 2.0 * mu0)  # d w / d eta
        W1 = self._gsum(w1)
        WX = self._gsum(w[:, None] * X)  # G x p
        W1X = self._gsum(w1[:, None] * X)
        R0 = self._gsum(y - mu0)
        dv_db = -s * WX / H[:, None]
        dv_ds = (R0 - s * W * v) / H
        dH_db = s * s * W1X + (s**3 * W1)[:, None] * dv_db
        dH_ds = 2.0 * s * W + s * s * v * W1 + s**3 * W1 * dv_ds
        fac = -0.5 / H * (1.0 + d * sigma)  # d log sigma * (1 + d sigma)
        g_b = X.T @ rbar + (fac[:, None] * dH_db).sum(0) + (c[:, None] * dv_db).sum(0)
        g_s = np.sum(np.sum(pi * vk * Rk, axis=1) + fac * dH_ds + c * dv_ds)
        return _Eval(loglik, np.concatenate([g_b, [g_s]]), v, H, ok)

    def loglik(self, fe_params, s_u: float) -> float:
        """Approximate marginal log-likelihood at fixed effects ``fe_params`` and therapist SD ``s_u``.

        The same quantity as ``logLik()`` of ``lme4::glmer`` (nAGQ = 1 or n_quad) at those values.
        """
        return block_terms(self, self.X @ np.asarray(fe_params), s_u, s_u, False)[-1]

    def _glm_start(self) -> np.ndarray:
        """Logistic regression without therapist effects by IRLS (start values; not the GLM fit)."""
        X, y = self.X, self.y
        b = np.zeros(self.k_fe)
        for _ in range(50 if self.k_fe else 0):  # no fixed effects (logit P = u_j): nothing to start
            eta = X @ b
            mu = expit(eta)
            w = np.maximum(mu * (1 - mu), 1e-10)
            z = eta + (y - mu) / w
            b_new = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * z))
            if np.max(np.abs(b_new - b)) < 1e-10:
                b = b_new
                break
            b = b_new
        return b

    def _maximise(
        self,
        theta0: np.ndarray,
        free: np.ndarray,
        scale: np.ndarray,
        *,
        maxiter: int = 500,
    ) -> tuple[np.ndarray, float, bool, str]:
        """Maximise the log-likelihood over the free entries of theta = (b, s).

        The approximated log-likelihood is an even function of s (v -> -v leaves the standard
        normal prior unchanged), so s is optimised over the whole real line and |s| reported: this
        avoids a bound at s = 0, which is a stationary point where a bounded quasi-Newton method
        can stall. ``scale`` is a positive-definite matrix for the free coordinates (theta_free =
        theta0_free + scale @ z) that makes L-BFGS-B's problem roughly isotropic.
        """
        p = self.k_fe
        theta0 = theta0.copy()
        idx = np.flatnonzero(free)
        if idx.size == 0:
            ev = self._evaluate(theta0[:p], theta0[p])
            return theta0, ev.loglik, ev.newton_ok, "nothing to optimise"
        base = theta0[idx].copy()

        def unpack(z: np.ndarray) -> np.ndarray:
            th = theta0.copy()
            th[idx] = base + scale @ z
            return th

        def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
            th = unpack(z)
            ev = self._evaluate(th[:p], th[p])
            if not np.isfinite(ev.loglik):
                return 1e300, np.zeros_like(z)
            return -ev.loglik, -(scale.T @ ev.grad[idx])

        res = optimize.minimize(
            fun,
            np.zeros(idx.size),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-7, "maxcor": 20},
        )
        th = unpack(res.x)
        th[p] = abs(th[p])
        ev = self._evaluate(th[:p], th[p])
        gz = scale.T @ ev.grad[idx]
        ok = bool(ev.newton_ok and np.max(np.abs(gz)) < 1e-3 and np.isfinite(ev.loglik))
        return th, ev.loglik, ok, str(res.message)

    def _hessian(self, theta: np.ndarray, free: np.ndarray | None = None) -> np.ndarray:
        """Observed information (minus Hessian of the log-likelihood) by central differences of the
        analytic gradient, symmetrised. ``free`` selects the coordinates (default: all)."""
        p = self.k_fe
        idx = np.arange(p + 1) if free is None else np.flatnonzero(free)
        return observed_information(lambda th: self._evaluate(th[:p], th[p]).grad, theta, idx)

    def _fit_glm(self) -> tuple[np.ndarray, float, bool]:
        """Logistic regression without therapist effect (the s_u = 0 model): ML by the same
        optimiser with s fixed at 0."""
        p = self.k_fe
        b0 = self._glm_start()
        theta0 = np.concatenate([b0, [0.0]])
        free = np.arange(p + 1) < p  # s fixed at 0
        th, ll, ok, _ = self._maximise(theta0, free, self._b_scale(b0, free))
        return th[:p], ll, ok

    def _b_scale(self, b: np.ndarray, free: np.ndarray) -> np.ndarray:
        """Scaling for the free coordinates: inverse Cholesky factor of the GLM information for the
        fixed effects (whitening), and a fixed scale for s."""
        p = self.k_fe
        mu = expit(self.X @ b)
        info = self.X.T @ ((mu * (1 - mu))[:, None] * self.X)
        fb = free[:p]
        A = np.zeros((int(free.sum()), int(free.sum())))
        nb = int(fb.sum())
        if nb:
            L = np.linalg.cholesky(info[np.ix_(fb, fb)])
            A[:nb, :nb] = np.linalg.inv(L).T
        if free[p]:
            A[nb, nb] = 0.1
        return A

    # ------------------------------------------------------------------ fit
    def _estimate(self) -> tuple[np.ndarray, float, bool, str, bool, float]:
        """Maximise the likelihood: (theta = (b, s_u), loglik, converged, optimiser message,
        singular, loglik of the logistic regression without therapist effect).

        For AGQ the Laplace maximum is found first and used as the start (fewer costly AGQ
        evaluations)."""
        p = self.k_fe
        b_glm, ll_glm, ok_glm = self._fit_glm()  # s_u = 0: same for every n_quad
        free = np.ones(p + 1, bool)
        nodes = (self._t, self._loga)
        self._t, self._loga = _gauss_hermite(1)  # Laplace first

        def from_start(s0: float):
            self._v_warm = np.zeros(self.n_therapists)
            return self._maximise(np.concatenate([b_glm, [s0]]), free, self._b_scale(b_glm, free))

        try:
            th, ll, ok, msg = best_start(from_start, (0.5, 0.1))
            scale = None
            if self.n_quad > 1 and th[p] > SINGULAR_TOL:
                # metric for the AGQ stage: the Laplace observed information (AGQ's is close)
                try:
                    scale = np.linalg.inv(np.linalg.cholesky(self._hessian(th))).T
                except np.linalg.LinAlgError:
                    scale = None
        finally:
            self._t, self._loga = nodes
        if self.n_quad > 1:
            # the Laplace maximum is a close start for AGQ
            th0 = th.copy()
            th0[p] = max(th0[p], 0.1)
            if scale is None:
                scale = self._b_scale(th0[:p], free)
            th, ll, ok, msg = self._maximise(th0, free, scale)
        singular = bool(th[p] < SINGULAR_TOL)
        if singular or ll_glm > ll:
            # boundary: the model reduces to the logistic regression without therapist effect
            th = np.concatenate([b_glm, [0.0]])
            ll, ok, singular = ll_glm, ok_glm, True
        return th, ll, ok, msg, singular, ll_glm

    @_single_thread_blas
    def fit(self) -> LogisticMixedResults:
        """Maximum (Laplace / AGQ) likelihood fit; returns :class:`LogisticMixedResults`.

        Warns ``ConvergenceWarning`` if the optimiser or the conditional-mode iteration did not
        converge, ``SingularFitWarning`` if the therapist SD is estimated at zero (below lme4's
        ``isSingular`` tolerance 1e-4); the estimates are then those of the logistic regression
        without therapist effect.
        """
        p = self.k_fe
        try:
            th, ll, ok, msg, singular, ll_glm = self._estimate()
        except np.linalg.LinAlgError as err:
            # the GLM information matrix lost rank on the way to an infinite coefficient
            raise ModelError(
                f"logistic random-intercept fit ({self._label()}): the fixed effects have no finite maximum "
                "likelihood estimate: the outcome is "
                "completely or quasi-completely separated by the covariates (e.g. every patient with one value "
                "of a covariate has the same outcome); leave out or combine that covariate"
            ) from err
        msgs = fit_warnings(self._label(), ok, msg, "therapist variance estimated at 0 (singular fit); estimates are"
                            " those of the logistic regression without therapist effect" if singular else None)
        ev = self._evaluate(th[:p], th[p], warm=False)
        return LogisticMixedResults(
            model=self,
            theta=th,
            loglik=ll,
            converged=ok,
            singular=singular,
            loglik_glm=ll_glm,
            modes=ev.v,
            curvature=ev.H,
            warnings_list=msgs,
        )

    def _label(self) -> str:
        return "Laplace" if self.n_quad == 1 else f"AGQ{self.n_quad}"


@dataclass
class LogisticMixedResults(ModelResults):
    """Fit of a random-intercept logistic model (therapist effects on a binary outcome).

    Attributes
    ----------
    params : pd.Series
        Fixed effects (log-odds scale) followed by ``"therapist"``: the between-therapist variance
        s_u^2 on the latent (logit) scale.
    fe_params, bse : pd.Series
        Fixed effects and their standard errors (inverse observed information of (b, s_u), the
        fixed-effects block, as lme4's default ``vcov`` for glmer; b alone when singular).
        ``bse["therapist"]`` is the delta-method SE of s_u^2 (NaN when singular).
    vcomp : dict
        ``{"therapist": s_u^2}``.
    loglik : float
        Laplace / AGQ log-likelihood (same quantity as lme4's ``logLik``).
    converged, singular : bool
    method : str
        ``"Laplace"`` or ``"AGQ<k>"``.
    n_obs, n_therapists : int
        Number of patients and of therapists.
    """

    model: LogisticRandomInterceptModel
    theta: np.ndarray
    loglik: float
    converged: bool
    singular: bool
    loglik_glm: float
    modes: np.ndarray
    curvature: np.ndarray
    warnings_list: list[str] = field(default_factory=list)

    @_single_thread_blas
    def __post_init__(self) -> None:
        m = self.model
        p = m.k_fe
        self.method = m._label()
        self.n_obs = m.n_obs
        self.n_therapists = m.n_therapists
        self.exog_names = list(m.exog_names)
        s = float(self.theta[p])
        self.s_u = s
        self.fe_params = pd.Series(self.theta[:p], index=self.exog_names, name="estimate")
        self.vcomp = {"therapist": s * s}
        self.params = pd.concat([self.fe_params, pd.Series({"therapist": s * s})]).rename("estimate")
        # covariance of (b, s)
        self._info = None  # observed information of (b, s) at the maximum (interior fits)
        if self.singular:
            free = np.arange(p + 1) < p  # s fixed at 0
            info = m._hessian(self.theta, free)
            cov_b = _safe_inv(info)
            se_s2 = np.nan
        else:
            info = m._hessian(self.theta)
            self._info = info
            cov = _safe_inv(info)
            cov_b = cov[:p, :p]
            se_s2 = 2.0 * s * math.sqrt(cov[p, p]) if np.isfinite(cov[p, p]) and cov[p, p] > 0 else np.nan
        self.cov_fe = pd.DataFrame(cov_b, index=self.exog_names, columns=self.exog_names)
        self.vcov = self.cov_fe
        se_b = np.sqrt(np.where(np.diag(cov_b) > 0, np.diag(cov_b), np.nan))
        self.bse = pd.Series(np.append(se_b, se_s2), index=self.params.index, name="se")
        self._profile_cache: dict = {}
        self._profile_points: dict = {}
        self._boot_cache: dict = {}

    def _n_params(self) -> int:
        """Fixed effects and the therapist SD (no residual scale): lme4's df of logLik."""
        return int(self.model.k_fe + 1)

    # ------------------------------------------------------------------ ICC and intervals
    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed: int | None = None) -> ICC:
        """Latent-scale ICC: s_u^2 / (s_u^2 + pi^2/3), the therapist share of latent variance (row
        ``icc``, the float value of the result); with a ``level``, its :meth:`icc_interval`."""
        s2 = self.vcomp["therapist"]
        est = {"icc": s2 / (s2 + LATENT_RESIDUAL_VARIANCE)}
        if level is None:
            return icc_table(est)
        method = method or self.default_interval
        return icc_table(est, {"icc": self.icc_interval(level, method, n_boot, seed)}, method)

    def _profile_ll(self, j: int, value: float) -> float:
        """Profile log-likelihood: parameter j of (b, s) fixed at ``value``, the others re-optimised
        (started from the solution at the nearest value already profiled)."""
        m = self.model
        p = m.k_fe
        cache = self._profile_points.setdefault(j, {self.theta[j]: self.theta.copy()})
        nearest = min(cache, key=lambda x: abs(x - value))
        th0 = cache[nearest].copy()
        th0[j] = value
        free = np.arange(p + 1) != j
        if free[p] and th0[p] < 1e-2:
            th0[p] = 1e-2  # start off the stationary point s = 0 when s is free
        scale = None
        if self._info is not None:
            # whitening by the observed information at the maximum (free block)
            try:
                scale = np.linalg.inv(np.linalg.cholesky(self._info[np.ix_(free, free)])).T
            except np.linalg.LinAlgError:
                scale = None
        if scale is None:
            scale = m._b_scale(th0[:p], free)
        th, ll, _, _ = m._maximise(th0, free, scale)
        cache[value] = th
        return ll

    def _profile_interval(self, j: int, level: float) -> tuple[float, float]:
        """Likelihood-ratio (profile) interval of coordinate j of (b, s): where the deviance
        2 (l_max - l_p) reaches the chi2_1 quantile, by the shared outward-bracketing root search
        (:func:`~therapist_effects.engine.inference.profile_limit`) stepping from the Wald ends; for
        s the lower end is 0 when the deviance at s = 0 stays below it."""
        key = (j, level)
        if key in self._profile_cache:
            return self._profile_cache[key]
        m = self.model
        p = m.k_fe
        q = chi2_cut(level)
        lmax = self.loglik
        saved_warm = m._v_warm.copy()

        def excess(x: float) -> float:
            return max(2.0 * (lmax - self._profile_ll(j, x)), 0.0)

        est = float(self.theta[j])
        se = self.bse.iloc[j] / (2.0 * est) if j == p and est > 0 else self.bse.iloc[j]
        if not (np.isfinite(se) and se > 0):
            se = 0.1 * max(abs(est), 1.0) if j < p else 0.1
        step = math.sqrt(q) * se  # the first step reaches the Wald end, where the profile is close to quadratic
        ends = []
        for direction in (-1, 1):
            lim = profile_limit(excess, est, q, direction, lower=0.0 if j == p else -math.inf, step=step,
                                growth=1.6, xtol=1e-9, rtol=1e-6)
            if not lim.found:
                warnings.warn(f"profile interval for {self.params.index[j]!r}: deviance did not reach the"
                              " chi2 quantile; that end is open", StatisticalWarning, stacklevel=3)
            ends.append(lim.value)
        m._v_warm = saved_warm
        out = (float(ends[0]), float(ends[1]))
        self._profile_cache[key] = out
        return out

    @_single_thread_blas
    def conf_int(self, level: float = DEFAULT_LEVEL, method: str = DEFAULT_INTERVAL) -> pd.DataFrame:
        """Confidence intervals for the fixed effects and the therapist variance.

        ``method="wald"``: estimate +/- z * SE for fixed effects; for the therapist variance the
        Wald interval of s_u (SD scale, lower end truncated at 0) is squared (NaN when singular;
        prefer the profile interval for variances). ``method="profile"``: likelihood-ratio intervals
        from the profile of the Laplace/AGQ log-likelihood, every other parameter re-optimised, as
        ``confint(fit, method = "profile")`` in lme4 (variance = squared SD interval).
        """
        p = self.model.k_fe
        rows = []
        if method == "wald":
            z = stats.norm.ppf(0.5 + level / 2)
            for j, name in enumerate(self.exog_names):
                est, se = self.fe_params.iloc[j], self.bse.iloc[j]
                rows.append((est - z * se, est + z * se))
            if self.singular or not np.isfinite(self.bse["therapist"]):
                rows.append((np.nan, np.nan))
            else:
                se_s = self.bse["therapist"] / (2 * self.s_u)
                rows.append((max(self.s_u - z * se_s, 0.0) ** 2, (self.s_u + z * se_s) ** 2))
        elif method == "profile":
            for j in range(p):
                rows.append(self._profile_interval(j, level))
            lo, hi = self._profile_interval(p, level)
            rows.append((lo * lo, hi * hi))
        else:
            raise ModelError(f"conf_int method must be 'wald' or 'profile', got {method!r}")
        return pd.DataFrame(rows, index=self.params.index, columns=CONF_INT_COLUMNS)

    @_single_thread_blas
    def _bootstrap(self, n_boot: int, seed: int | None) -> np.ndarray:
        """Parametric bootstrap of s_u^2 (:func:`~therapist_effects.engine.inference.parametric_bootstrap`,
        ``seed=None`` is seed 0): therapists' effects and outcomes simulated from the fit, refitted;
        returns the bootstrap variances (NaN where a refit failed: an outcome without both values,
        or no convergence; failures are counted and warned about)."""
        key = (int(n_boot), 0 if seed is None else int(seed))
        if key in self._boot_cache:
            return self._boot_cache[key]
        m = self.model
        p = m.k_fe
        eta0 = m.X @ self.theta[:p]

        def simulate(rng: np.random.Generator) -> np.ndarray:
            u = self.s_u * rng.standard_normal(m.n_therapists)
            return (rng.random(m.n_obs) < expit(eta0 + u[m.g])).astype(float)

        def refit(yb: np.ndarray) -> dict:
            if yb.min() == yb.max():
                raise ValueError("simulated outcome has a single value")
            mb = LogisticRandomInterceptModel(yb, m.X, m.g, exog_names=m.exog_names, method=m.method,
                                              n_quad=m.n_quad)
            th, _, ok, _, _, _ = mb._estimate()
            return {"therapist": th[p] ** 2, "converged": ok}

        res = parametric_bootstrap(simulate, refit, n_boot, seed, ["therapist"])
        if res.n_failed:
            self.warnings_list.append(f"{res.n_failed} of {res.n_boot} bootstrap refits failed; they are left "
                                      "out of the percentile intervals")
            warnings.warn(self.warnings_list[-1], ConvergenceWarning, stacklevel=3)
        out = res.draws["therapist"].to_numpy()
        self._boot_cache[key] = out
        return out

    @_single_thread_blas
    def icc_interval(
        self, level: float = DEFAULT_LEVEL, method: str = "profile", n_boot: int = DEFAULT_N_BOOT,
        seed: int | None = None
    ) -> tuple[float, float]:
        """Interval for the latent-scale ICC.

        ``"profile"``: the profile-likelihood interval of s_u^2 mapped through the (monotone) ICC
        transformation. ``"bootstrap"``: percentile interval of a parametric bootstrap with
        ``n_boot`` refits, random numbers from ``numpy.random.default_rng(seed)`` (``seed=None``: 0).
        """
        if method == "profile":
            lo, hi = self._profile_interval(self.model.k_fe, level)
            lo2, hi2 = lo * lo, hi * hi
        elif method == "bootstrap":
            draws = self._bootstrap(n_boot, seed)
            draws = draws[np.isfinite(draws)]
            if draws.size < 10:
                raise ModelError(f"bootstrap failed: only {draws.size} of {n_boot} refits succeeded")
            lo2, hi2 = np.quantile(draws, [0.5 - level / 2, 0.5 + level / 2])
        else:
            raise ModelError(f"icc_interval method must be 'profile' or 'bootstrap', got {method!r}")
        return float(latent_icc(lo2)), float(latent_icc(hi2))

    def lrt(self) -> dict:
        """Likelihood-ratio test of the therapist variance against the logistic regression without
        therapist effect. H0 (s_u^2 = 0) is on the boundary, so the p-value is from the 50:50
        mixture of chi2_0 and chi2_1 (Self & Liang 1987)."""
        stat = max(2.0 * (self.loglik - self.loglik_glm), 0.0)
        pval = 0.5 * stats.chi2.sf(stat, 1) + (0.5 if stat <= 0 else 0.0)
        return {
            "statistic": float(stat),
            "df": 1,
            "p_value": float(pval),
            "loglik_glm": float(self.loglik_glm),
            "null_distribution": "0.5 chi2_0 + 0.5 chi2_1",
        }

    # ------------------------------------------------------------------ therapists
    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = True) -> pd.DataFrame:
        """One row per therapist: caseload, observed rate and the therapist's effect.

        ``effect`` is the conditional mode of u_j (log-odds; lme4 ``ranef``), ``effect_se`` the
        conditional SD from the curvature at the mode, s_u / sqrt(H_j) (lme4 ``condVar``), and
        ``ci_low``/``ci_high`` = effect +/- z * effect_se. ``adjusted_mean`` is the model-based rate
        of an average patient (covariates at their means over all patients, e.g. the arm share)
        treated by this therapist: expit(xbar' b + u_j). ``classification`` says whether the
        interval excludes 0 (the average therapist): "better/worse than average" with
        ``higher_is_better`` True (outcome is good, e.g. recovery) or False (e.g. deterioration,
        dropout), "above/below average" when None, else "not distinguishable from average".
        """
        m = self.model
        p = m.k_fe
        s = self.s_u
        u = s * self.modes
        se = s / np.sqrt(self.curvature)
        z = stats.norm.ppf(0.5 + level / 2)
        lo, hi = u - z * se, u + z * se
        xbar = m.X.mean(axis=0)
        adj = expit(xbar @ self.theta[:p] + u)
        raw = np.bincount(m.g, weights=m.y) / m.counts
        cls = classify_effects(lo, hi, higher_is_better)
        return pd.DataFrame(
            {
                "therapist": m.therapist_labels,
                "caseload": m.counts,
                "raw_mean": raw,
                "adjusted_mean": adj,
                "effect": u,
                "effect_se": se,
                "ci_low": lo,
                "ci_high": hi,
                "classification": cls,
            }
        )

    # ------------------------------------------------------------------ output
    def _summary_title(self) -> str:
        return f"Random-intercept logistic model (patients in therapists), {self.method}"

    def _summary_info(self) -> dict:
        t = self.lrt()
        return {**super()._summary_info(), "ICC scale": "latent (pi^2/3)",
                "LRT chi2 (no therapists)": t["statistic"], "LRT p (0.5chi2_0+0.5chi2_1)": t["p_value"]}

    @_single_thread_blas
    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT, seed: int | None = None) -> dict:
        """The model's entry of ``estimates.json`` (see shared/CONTRACT.md), plain JSON values.

        Fixed effects: estimate, SE and Wald interval. Therapist variance and ICC: profile interval
        (``interval="profile"``) or parametric-bootstrap percentile interval (``"bootstrap"``, with
        ``n_boot`` refits and ``numpy.random.default_rng(seed)``, seed 0 when None).
        """
        caught: list[str] = list(self.warnings_list)
        with recorded_warnings(caught):
            wald = self.conf_int(method="wald")
            if interval == "profile":
                lo, hi = self._profile_interval(self.model.k_fe, 0.95)
                v_lo, v_hi = lo * lo, hi * hi
                icc_lo, icc_hi = self.icc_interval(method="profile")
            elif interval == "bootstrap":
                draws = self._bootstrap(n_boot, seed)
                draws = draws[np.isfinite(draws)]
                v_lo, v_hi = (np.quantile(draws, [0.025, 0.975]) if draws.size >= 10 else (np.nan, np.nan))
                icc_lo, icc_hi = (
                    self.icc_interval(method="bootstrap", n_boot=n_boot, seed=seed)
                    if draws.size >= 10
                    else (np.nan, np.nan)
                )
            else:
                raise ModelError(f"interval must be 'profile' or 'bootstrap', got {interval!r}")
        t = self.lrt()
        return json_plain(
            {
                "family": "binomial",
                "method": self.method,
                "fixed_effects": {
                    name: {
                        "estimate": self.fe_params[name],
                        "se": self.bse[name],
                        "ci_low": wald.loc[name, "lower"],
                        "ci_high": wald.loc[name, "upper"],
                    }
                    for name in self.exog_names
                },
                "variance_components": {
                    "therapist": {"estimate": self.vcomp["therapist"], "ci_low": v_lo, "ci_high": v_hi},
                    "residual": {"estimate": LATENT_RESIDUAL_VARIANCE, "ci_low": None, "ci_high": None},
                },
                "icc": {
                    "estimate": self.icc(),
                    "ci_low": icc_lo,
                    "ci_high": icc_hi,
                    "ci_method": interval,
                    "scale": "latent",
                },
                "loglik": self.loglik,
                "converged": self.converged,
                "singular": self.singular,
                "lrt": {"statistic": t["statistic"], "df": t["df"], "p_value": t["p_value"]},
                "n_patients": self.n_obs,
                "n_therapists": self.n_therapists,
                "n_clusters": None,
                "warnings": caught,
            }
        )


def check_binary(y: np.ndarray, df: pd.DataFrame, outcome: str) -> None:
    """One-line ModelError naming the first row of ``df`` whose outcome is not 0/1."""
    notbin = (y != 0) & (y != 1)
    if notbin.any():
        i = int(np.flatnonzero(notbin)[0])
        raise ModelError(
            f"outcome {outcome!r} must be binary 0/1: row {df.index[i]} has value"
            f" {y[i]:g} ({int(notbin.sum())} such rows)"
        )


def binary_inputs(endog, exog, exog_names, labels: dict, numeric: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(y, X, names)`` of a binary model, checked with one-line errors: the identifiers in
    ``labels`` (``{"therapist": ...}``, arms) and the numbers in ``numeric`` (a slope variable)
    have one entry per patient, there are patients, the numbers are finite and no identifier is
    missing; then :func:`check_binary_design`."""
    y = np.asarray(endog, dtype=float).ravel()
    X = np.asarray(exog, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    numeric = {k: np.asarray(v, dtype=float).ravel() for k, v in (numeric or {}).items()}
    n = y.shape[0]
    sizes = {"exog": X.shape[0], **{k: len(v) for k, v in {**labels, **numeric}.items()}}
    if any(m != n for m in sizes.values()):
        raise ModelError(f"endog has {n} rows but " + ", ".join(f"{k} has {m}" for k, m in sizes.items())
                         + ": every array needs one row per patient")
    if n == 0:
        raise ModelError("no patients to fit: the outcome has no rows")
    if not all(np.all(np.isfinite(a)) for a in (y, X, *numeric.values())):
        raise ModelError("outcome, covariates" + "".join(f" or {k}" for k in numeric)
                         + " contain missing/non-finite values; drop them first")
    missing = [k for k, v in labels.items() if pd.isna(pd.Series(v)).any()]
    if missing:
        raise ModelError(f"{' or '.join(missing)} is missing for some patients; drop them first")
    return y, X, check_binary_design(y, X, exog_names)


def check_binary_design(y: np.ndarray, X: np.ndarray, exog_names) -> list[str]:
    """The checks every binary model makes of its 0/1 outcome and full-rank design; returns the
    fixed-effect names (``x0``, ``x1``, ... when ``exog_names`` is None)."""
    if not np.all((y == 0) | (y == 1)):
        bad = int(np.flatnonzero((y != 0) & (y != 1))[0])
        raise ModelError(f"binary outcome expected (0/1): patient at position {bad} has value {y[bad]:g}")
    if y.min() == y.max():
        raise ModelError(f"outcome has no variation: every patient has value {int(y[0])}")
    p = X.shape[1]
    names = [str(s) for s in exog_names] if exog_names is not None else [f"x{i}" for i in range(p)]
    if len(names) != p:
        raise ModelError(f"exog_names has {len(names)} names for {p} columns of exog")
    if p and np.linalg.matrix_rank(X) < p:
        raise ModelError(f"fixed-effects design {names} is rank deficient")
    return names


def latent_icc(v):
    """Latent-scale ICC of a therapist variance ``v`` on the logit scale: ``v / (v + pi^2/3)``."""
    return v / (v + LATENT_RESIDUAL_VARIANCE)


def observed_information(grad, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Observed information (minus the Hessian of the log-likelihood) in the coordinates ``idx`` by
    central differences of the analytic gradient ``grad(theta)``, symmetrised."""
    m = idx.size
    Hm = np.zeros((m, m))
    for a, i in enumerate(idx):
        step = 1e-4 * max(1.0, abs(theta[i]))
        tp, tm = theta.copy(), theta.copy()
        tp[i] += step
        tm[i] -= step
        Hm[:, a] = -(grad(tp)[idx] - grad(tm)[idx]) / (tp[i] - tm[i])
    return 0.5 * (Hm + Hm.T)


def check_quadrature(method: str, n_quad) -> tuple[str, int]:
    """``(method, n_quad)`` of a binomial model: ``"laplace"`` (one node) or ``"agq"`` with a
    positive integer number of nodes; anything else is a one-line ModelError."""
    method = str(method).lower()
    if method not in ("laplace", "agq"):
        raise ModelError(f"method must be 'laplace' or 'agq', got {method!r}")
    if method == "laplace":
        return method, 1
    if int(n_quad) != n_quad or int(n_quad) < 1:
        raise ModelError(f"n_quad must be a positive integer, got {n_quad!r}")
    return method, int(n_quad)


def _safe_inv(a: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(a)
    except np.linalg.LinAlgError:
        return np.full_like(a, np.nan)




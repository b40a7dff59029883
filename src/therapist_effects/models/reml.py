"""Exact, fast REML/ML for Gaussian therapist-effects models.

Models (patients ``j`` nested in therapists ``i``, optionally therapists nested in clusters ``c``,
i.e. services, sites or trials)::

    random intercept:  y = X b + u_therapist + e,                 lme4: y ~ x + (1 | therapist)
    nested:            y = X b + u_cluster + u_therapist + e,     lme4: y ~ x + (1 | cluster/therapist)

with ``u_therapist ~ N(0, s2_t)``, ``u_cluster ~ N(0, s2_c)`` and ``e ~ N(0, s2)``. For a therapist
with caseload ``n_i`` the marginal covariance is ``V_i = s2 (I + g 11')`` with the variance ratio
``g = s2_t / s2``, so ``V_i^{-1} = (I - g/(1 + n_i g) 11') / s2`` and
``log|V_i| = n_i log s2 + log(1 + n_i g)``. Everything the (RE)ML criterion needs is therefore a
function of per-therapist sufficient statistics: caseloads ``n_i``, the therapists' means of the
covariates and outcome, and the pooled within-therapist cross-product matrix. They are computed
in one vectorised pass (``np.bincount``), after which one evaluation of the criterion costs
O(therapists x p^2) whatever the number of patients (summed over distinct caseloads, in fact). Both
models are instances of the block engine :class:`therapist_effects.engine.gaussian.BlockEngine`
(``Z = 1``, theta = ``sqrt(g_t)`` [and ``sqrt(g_c)`` for the cluster level]).

The residual variance ``s2`` and the fixed effects ``b`` are profiled out analytically (as lme4
does), leaving a 1-D criterion in ``g`` (random intercept) or a 2-D one in ``(g_t, g_c)`` (nested;
the cluster block ``s2 (W + g_c 11')`` with ``W = blockdiag(I + g_t 11')`` is inverted by
Woodbury twice, still from per-therapist sums). The optimum is located on a grid in ``log g`` and
refined by Brent, and the boundary ``g = 0`` is always checked, so singular fits (no therapist
variance) are found exactly and flagged.

Criteria (``W_g = s2 V^{-1}``, ``r(g) = min_b (y - Xb)' W_g (y - Xb)``, ``m = n - p``)::

    ML    -2 logLik = n (1 + log(2 pi r / n)) + sum log(1 + n_i g)
    REML  -2 logLik = m (1 + log(2 pi r / m)) + sum log(1 + n_i g) + log|X' W_g X|

exactly lme4's ``deviance`` / ``REMLcrit`` (``logLik`` is minus half of them). The residual
variance estimate is ``r / n`` (ML) or ``r / m`` (REML); ``vcov`` is ``s2 (X' W_g X)^{-1}``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import threadpool_limits

from ..classify import classify_effects
from .design import INTERCEPT, build_design, group_codes
from ..exceptions import ConvergenceWarning, ModelError, SingularFitWarning, StatisticalWarning
from ..engine.gaussian import BlockEngine, fd_derivatives, gls_from_cholesky, newton_minimise
from ..engine.inference import DEFAULT_N_BOOT, parametric_bootstrap, percentile_interval, signed_root_limit
from ..engine.results import ICC, ModelResults, icc_table
from .profile import BOUNDARY_TOL, min1d_local, min_nd_local, min_nonneg_global
from ..progress import track

__all__ = ["RandomInterceptModel", "NestedModel", "MixedResults"]

LOG2PI = math.log(2.0 * math.pi)
#: lme4's ``isSingular`` tolerance on theta = sd_component / sigma
SINGULAR_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# The criterion of the block engine at variance ratios, and the global optimum
# --------------------------------------------------------------------------------------------
def _theta(gt: float, gc: float, nested: bool) -> tuple[float, ...]:
    """The engine's theta (relative SDs: therapist[, cluster]) at the variance ratios."""
    return (math.sqrt(gt), math.sqrt(gc)) if nested else (math.sqrt(gt),)


def _crit(eng: BlockEngine, gt: float, gc: float, reml: bool) -> float:
    """-2 x profiled (RE)ML log-likelihood at the variance ratios (lme4's deviance/REMLcrit)."""
    return eng.crit(_theta(gt, gc, eng.C > 0), reml)


#: the optimisers and profiles make many BLAS calls on tiny matrices (the engine's p x p algebra,
#: crit_many's batch products), where on a busy machine multithreaded OpenBLAS spends most of its
#: time waiting for its threads (measured: crit_many over 49 ratios 16 ms -> 0.7 ms)
_single_thread_blas = threadpool_limits.wrap(limits=1, user_api="blas")


@_single_thread_blas
def _fit(eng: BlockEngine, reml: bool, near: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
    """Global optimum ``(g, crit_min, converged)``; ``g = [g_t]`` or ``[g_t, g_c]``: a grid in
    ``log g`` refined by Brent, the boundary ``g = 0`` checked exactly (singular fits). ``near``:
    an interior optimum of a neighbouring criterion (the REML fit's, for the ML refit of the
    profiles), where the nested model's local refinement starts instead of the 2-D grid's best point."""
    def on_grid(gt: np.ndarray, gc: np.ndarray) -> np.ndarray:  # the criterion at many ratios at once
        th = np.sqrt(np.column_stack([gt, gc]))
        return eng.crit_many(th if eng.C else th[:, :1], reml)

    if not eng.C:
        g, fmin, conv = min_nonneg_global(lambda x: eng.crit((math.sqrt(x),), reml),
                                          f_grid=lambda gs: on_grid(gs, 0.0 * gs))
        return np.array([g]), fmin, conv
    # nested: coarse 2-D grid in log ratios, local refinement on theta = sqrt(g) from the best
    # grid point, and the exact optima on the boundary lines g_t = 0 and g_c = 0
    f2 = lambda gt, gc: _crit(eng, gt, gc, reml)  # noqa: E731
    if near is not None and np.all(near > 0.0):
        th0, conv = np.sqrt(near), True
    else:
        grid = np.exp(np.arange(-12.0, 8.0001, 1.5))
        gt_all, gc_all = np.meshgrid(grid, grid, indexing="ij")
        vals = on_grid(gt_all.ravel(), gc_all.ravel()).reshape(len(grid), len(grid))
        i, j = np.unravel_index(int(np.argmin(vals)), vals.shape)
        th0 = np.sqrt([grid[i], grid[j]])
        conv = bool(i < len(grid) - 1 and j < len(grid) - 1)
    th, fmin = min_nd_local(lambda th: eng.crit(th, reml), th0, 0.25 * th0, np.zeros(2), xtol=1e-10)
    best = (float(fmin), th[0] ** 2, th[1] ** 2)
    gc0, f_c, conv_c = min_nonneg_global(lambda x: f2(0.0, x), f_grid=lambda gs: on_grid(0.0 * gs, gs))
    gt0, f_t, conv_t = min_nonneg_global(lambda x: f2(x, 0.0), f_grid=lambda gs: on_grid(gs, 0.0 * gs))
    for cand in ((f_c, 0.0, gc0), (f_t, gt0, 0.0)):
        if cand[0] <= best[0] + BOUNDARY_TOL:
            best = cand
    fmin, gt, gc = best
    return np.array([gt, gc]), fmin, conv


def _dev_sd(eng: BlockEngine, sds: Sequence[float], sigma: float) -> float:
    """ML deviance at therapist [and cluster] SDs and residual SD, the fixed effects profiled out."""
    return eng.crit(tuple(sd / sigma for sd in sds), False, sigma2=sigma * sigma)


# --------------------------------------------------------------------------------------------
# Profile searches
# --------------------------------------------------------------------------------------------
def _profile_end(excess: Callable[[float], float], xhat: float, q: float, direction: int, **kw) -> tuple[float, bool]:
    """``(end, found)`` of a profile: the root of the signed root of ``excess`` (nearly linear: few
    evaluations), each step after the first aimed just past the crossing it predicts
    (:func:`~therapist_effects.engine.inference.signed_root_limit`; keywords as there)."""
    lim = signed_root_limit(excess, xhat, q, direction, extrapolate=True, **kw)
    return lim.value, lim.found


def _along_profile(H: np.ndarray | None, k: int, inner: list[int], q: float, value: float
                   ) -> tuple[float | None, np.ndarray, np.ndarray | None]:
    """From the deviance's Hessian ``H`` at the optimum, for the profile of coordinate ``k`` (at
    ``value``) with the coordinates ``inner`` re-optimised: the quadratic approximation's distance
    to the limit on the log scale, ``sqrt(q 2 [H^-1]_kk) / value``; the slope of the inner optimum
    along the profile, ``-H_oo^-1 H_ok``; and ``H_oo``. ``(None, 0, None)`` without ``H``."""
    if H is None:
        return None, np.zeros(len(inner)), None
    var = 2.0 * float(np.linalg.inv(H)[k, k])  # deviance: cov = 2 H^-1
    H_oo = H[np.ix_(inner, inner)]
    return math.sqrt(q * var) / value, -np.linalg.solve(H_oo, H[inner, k]), H_oo


def _curvature(f: Callable[[np.ndarray], float], x: np.ndarray, h: np.ndarray) -> np.ndarray | None:
    """Finite-difference Hessian of ``f`` at ``x`` (steps ``h``); None unless positive definite."""
    _, H = fd_derivatives(f, x, h, list(range(len(x))))
    return H if np.all(np.isfinite(H)) and np.all(np.linalg.eigvalsh(H) > 0.0) else None


def _reset(hess: dict, H: np.ndarray | None) -> None:
    """Start a profile end's inner Newton from ``H`` (a fresh finite-difference Hessian if None)."""
    hess.clear()
    if H is not None:
        hess["H"] = H


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _group_codes(labels: Any, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Same codes and labels as :func:`design.group_codes` (groups in sorted order of their labels
    as strings), but converting only the distinct labels to strings: for a million patients the
    per-row string conversion would dominate the whole fit. Falls back to ``group_codes`` when
    two distinct raw labels print alike (e.g. ``1`` and ``"1"``)."""
    arr = np.asarray(labels)
    missing = pd.isna(arr) if arr.dtype.kind in "OfcmMUS" else np.zeros(len(arr), bool)
    if np.any(missing):
        raise ModelError(f"{role} label missing in {int(np.sum(missing))} rows")
    codes0, uniq0 = pd.factorize(arr, sort=False)
    as_str = np.array([str(u) for u in uniq0], dtype=object)
    if len(set(as_str)) != len(as_str):
        return group_codes(arr)
    order = np.argsort(as_str, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[codes0], as_str[order]


def _check_method(method: str) -> str:
    m = str(method).upper()
    if m not in ("REML", "ML"):
        raise ModelError(f"method must be 'REML' or 'ML', got {method!r}")
    return m


def _default_names(exog: Any, X: np.ndarray) -> list[str]:
    if isinstance(exog, pd.DataFrame):
        return [str(c) for c in exog.columns]
    names = []
    for j in range(X.shape[1]):
        names.append(INTERCEPT if np.all(X[:, j] == 1.0) and INTERCEPT not in names else f"x{j}")
    return names


class _BaseModel:
    """Shared set-up of the Gaussian therapist models: checks, group codes, sufficient stats."""

    _nested = False

    def __init__(self, endog: Any, exog: Any, therapist: Any, cluster: Any, *,
                 exog_names: Sequence[str] | None, method: str):
        self.method = _check_method(method)
        y = np.asarray(endog, dtype=float).ravel()
        X = np.asarray(exog, dtype=float)
        if X.ndim == 1:
            X = X[:, None]
        n = len(y)
        if X.shape[0] != n:
            raise ModelError(f"exog has {X.shape[0]} rows but endog has {n}")
        if not (np.all(np.isfinite(y)) and np.all(np.isfinite(X))):
            raise ModelError("outcome or covariates contain missing or infinite values; drop those rows first")
        if n and np.ptp(y) == 0.0:
            raise ModelError("the outcome takes a single value: there is no variance to partition")
        names = list(exog_names) if exog_names is not None else _default_names(exog, X)
        if len(names) != X.shape[1]:
            raise ModelError(f"exog_names has {len(names)} names for {X.shape[1]} columns")
        if X.shape[1] and np.linalg.matrix_rank(X) < X.shape[1]:
            raise ModelError(f"fixed-effects design {names} is rank deficient")
        if len(therapist) != n:
            raise ModelError(f"therapist has {len(therapist)} entries but endog has {n}")
        tcodes, tlabels = _group_codes(therapist, "therapist")
        if cluster is None:
            self.cluster_labels = None
            gcodes, G = tcodes, len(tlabels)
            self.group_therapist = tlabels
            self.group_cluster = None
            cl = None
            self.cluster_codes = None
        else:
            if len(cluster) != n:
                raise ModelError(f"cluster has {len(cluster)} entries but endog has {n}")
            ccodes, clabels = _group_codes(cluster, "cluster")
            C = len(clabels)
            if C < 2:
                raise ModelError("the nested model needs at least 2 clusters; use the random-intercept model")
            # therapist units are cluster:therapist combinations, as lme4's (1 | cluster/therapist)
            pair = ccodes * len(tlabels) + tcodes
            uniq, gcodes = np.unique(pair, return_inverse=True)
            G = len(uniq)
            cl = uniq // len(tlabels)
            self.group_therapist = tlabels[uniq % len(tlabels)]
            self.group_cluster = clabels[cl]
            self.cluster_labels = clabels
            self.cluster_codes = ccodes
        if G < 2:
            raise ModelError("at least 2 therapists are needed to estimate a therapist variance")
        if G >= n:
            raise ModelError(f"{G} therapists for {n} patients: the number of therapists must be "
                             "smaller than the number of patients")
        if n <= X.shape[1]:
            raise ModelError(f"{n} patients for {X.shape[1]} fixed effects")
        self.endog, self.exog, self.exog_names = y, X, names
        self.codes = gcodes  # int64 (factorized or np.unique's inverse)
        self.n_obs, self.n_therapists, self.n_clusters = n, G, (C if cluster is not None else None)
        self._engine = BlockEngine(y, X, np.broadcast_to(1.0, (n, 1)), self.codes, G, cluster=cl)  # (a view: no memory)

    def fit(self) -> MixedResults:
        """Fit by exact (RE)ML; warns (typed) on singular fits and non-convergence."""
        try:
            g, cmin, conv = _fit(self._engine, self.method == "REML")
        except (np.linalg.LinAlgError, ValueError) as err:  # pragma: no cover - degenerate data
            raise ModelError(f"the model cannot be fitted: {err}") from err
        return MixedResults(self, g, cmin, conv)


class RandomInterceptModel(_BaseModel):
    """Gaussian random-intercept model ``y ~ X + (1 | therapist)`` fitted by exact REML or ML.

    ``endog`` is the patients' outcome, ``exog`` the fixed-effects design (include an intercept
    column), ``therapist`` the patients' therapist labels. The therapist variance is the variance
    of the therapists' true mean outcomes around the case-mix-adjusted average.
    """

    def __init__(self, endog: Any, exog: Any, therapist: Any, *,
                 exog_names: Sequence[str] | None = None, method: str = "REML"):
        super().__init__(endog, exog, therapist, None, exog_names=exog_names, method=method)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *,
                   therapist: str = "therapist", method: str = "REML") -> RandomInterceptModel:
        """``outcome ~ covariates + (1 | therapist)`` from a patient table (R-style coding)."""
        if therapist not in df.columns:
            raise ModelError(f"therapist column {therapist!r} is not a column of the patient table")
        d = build_design(df, outcome, list(covariates))
        return cls(d.y, d.X, df[therapist].to_numpy(), exog_names=d.names, method=method)


class NestedModel(_BaseModel):
    """Gaussian model with therapists nested in clusters (services, sites, trials):
    ``y ~ X + (1 | cluster) + (1 | cluster:therapist)``, exact REML or ML.

    A therapist seen in two clusters counts as two therapist units, as in lme4's
    ``(1 | cluster/therapist)``.
    """

    _nested = True

    def __init__(self, endog: Any, exog: Any, therapist: Any, cluster: Any, *,
                 exog_names: Sequence[str] | None = None, method: str = "REML"):
        super().__init__(endog, exog, therapist, cluster, exog_names=exog_names, method=method)

    @classmethod
    def from_frame(cls, df: pd.DataFrame, outcome: str, covariates: Sequence[str] = (), *,
                   therapist: str = "therapist", cluster: str = "cluster",
                   method: str = "REML") -> NestedModel:
        """``outcome ~ covariates + (1 | cluster/therapist)`` from a patient table."""
        for col, role in ((therapist, "therapist"), (cluster, "cluster")):
            if col not in df.columns:
                raise ModelError(f"{role} column {col!r} is not a column of the patient table")
        d = build_design(df, outcome, list(covariates))
        return cls(d.y, d.X, df[therapist].to_numpy(), df[cluster].to_numpy(),
                   exog_names=d.names, method=method)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def _f(x: Any) -> float | None:
    """Plain float for JSON, NaN/inf -> None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class MixedResults(ModelResults):
    """Estimates of a fitted therapist model, with intervals, ICC, LRT and therapist effects.

    Attributes: ``params`` (fixed effects by name, then the variance components ``therapist``,
    [``cluster``], ``residual``), ``fe_params``, ``bse`` (lme4's ``vcov``: ``s2 (X'V^-1X)^-1`` at
    the estimate), ``vcomp`` (dict of variances), ``loglik`` (REML or ML log-likelihood, as lme4's
    ``logLik``), ``converged``, ``singular``, ``method``, ``n_obs``, ``n_therapists``,
    ``n_clusters`` and ``warnings`` (messages of the typed warnings raised so far).
    """

    def __init__(self, model: _BaseModel, g: np.ndarray, crit_min: float, converged: bool):
        self.model = model
        self._eng = model._engine
        self.method = model.method
        self._reml = self.method == "REML"
        self.nested = model._nested
        self.g = np.asarray(g, dtype=float)
        self._crit_min = float(crit_min)
        gt = float(self.g[0])
        gc = float(self.g[1]) if self.nested else 0.0
        b, covu, r, bc = self._eng.fixed(_theta(gt, gc, self.nested))
        n, p = self._eng.n, self._eng.p
        self.scale = r / (n - p) if self._reml else r / n
        self._bc = bc
        names = model.exog_names
        self.fe_params = pd.Series(b, index=names, name="estimate")
        self.cov_params = pd.DataFrame(self.scale * covu, index=names, columns=names)
        self.vcov = self.cov_params  # lme4's vcov(fit)
        self.bse = pd.Series(np.sqrt(np.diag(self.scale * covu)), index=names, name="se")
        self.vcomp: dict[str, float] = {"therapist": gt * self.scale}
        if self.nested:
            self.vcomp["cluster"] = gc * self.scale
        self.vcomp["residual"] = self.scale
        self.params = pd.concat([self.fe_params, pd.Series(self.vcomp)])
        self.params.name = "estimate"
        self.loglik = -0.5 * self._crit_min
        self.n_obs = model.n_obs
        self.n_therapists = model.n_therapists
        self.n_clusters = model.n_clusters
        self.converged = bool(converged)
        self.singular = bool(np.any(np.sqrt(self.g) < SINGULAR_TOL))
        self.warnings: list[str] = []
        self._cache: dict[Any, Any] = {}
        if not self.converged:
            self._warn("optimiser did not converge: the therapist variance runs to the upper bound "
                       "(no within-therapist information?)", ConvergenceWarning)
        if self.singular:
            zero = [k for k, gk in zip(("therapist", "cluster"), self.g) if math.sqrt(gk) < SINGULAR_TOL]
            self._warn(f"singular fit: {' and '.join(zero)} variance estimated at (or next to) zero",
                       SingularFitWarning)

    def _n_params(self) -> int:
        """Fixed effects, the variance ratio(s) and the residual scale (lme4's df of logLik)."""
        return int(self._eng.p + len(self.g) + 1)

    # -- helpers ---------------------------------------------------------------------------------
    def _warn(self, msg: str, cls: type[Warning]) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)
        warnings.warn(msg, cls, stacklevel=3)

    @property
    def _vc_names(self) -> list[str]:
        return ["therapist", "cluster", "residual"] if self.nested else ["therapist", "residual"]

    @staticmethod
    def _zcrit(level: float) -> float:
        if not 0.0 < level < 1.0:
            raise ModelError(f"confidence level must be between 0 and 1, got {level}")
        return float(stats.norm.ppf(0.5 + level / 2.0))

    def _ml(self) -> dict[str, Any]:
        """The ML fit that lme4's profile() refits to (cached)."""
        if "ml" not in self._cache:
            if self._reml:
                g, dmin, _ = _fit(self._eng, False, near=self.g)
            else:
                g, dmin = self.g, self._crit_min
            gt = float(g[0])
            gc = float(g[1]) if self.nested else 0.0
            b, covu, r, _ = self._eng.fixed(_theta(gt, gc, self.nested))
            s2 = r / self._eng.n
            sds = [math.sqrt(gt * s2)] + ([math.sqrt(gc * s2)] if self.nested else [])
            self._cache["ml"] = {"g": np.array(g, dtype=float), "dmin": float(dmin), "b": b,
                                 "se": np.sqrt(np.diag(s2 * covu)), "sigma": math.sqrt(s2),
                                 "sds": np.array(sds)}
        return self._cache["ml"]

    # -- ICC -------------------------------------------------------------------------------------
    def icc(self, level: float | None = None, method: str | None = None, *, n_boot: int = DEFAULT_N_BOOT,
            seed: int | None = None) -> ICC:
        """Intraclass correlation for therapists: share of the total outcome variance (given the
        covariates) that lies between therapists, ``s2_t / (s2_c + s2_t + s2)`` (row ``icc``; the
        float value of the result), and for nested models the cluster share (row ``icc_cluster``).
        With a ``level``, each row carries its :meth:`icc_interval` (``method``, default profile)."""
        est = {"icc": self.vcomp["therapist"] / sum(self.vcomp.values())}
        if self.nested:
            est["icc_cluster"] = self.icc_cluster()
        if level is None:
            return icc_table(est)
        method = method or self.default_interval
        iv = {k: self.icc_interval(level, method, n_boot, seed, which="therapist" if k == "icc" else "cluster")
              for k in est}
        return icc_table(est, iv, method)

    def icc_cluster(self) -> float:
        """Cluster (service/trial) share of the total variance, ``s2_c / (s2_c + s2_t + s2)``."""
        if not self.nested:
            raise ModelError("icc_cluster is defined for nested models only")
        return self.vcomp["cluster"] / sum(self.vcomp.values())

    @_single_thread_blas
    def _icc_profile(self, which: str, level: float) -> tuple[float, float]:
        """Profile-likelihood interval of an ICC under the fit's own criterion (REML or ML).

        The therapist ICC is a monotone function of the odds ``k = g_t / (1 + g_c)``
        (ICC = k / (1 + k)); for the random-intercept model ``k = g`` and the profile is the
        criterion itself, for nested models the other ratio is re-optimised at each ``k``. The
        ends are where -2 log-likelihood exceeds its minimum by the chi-square(1) quantile; a lower
        end at the boundary is reported as 0.
        """
        key = ("icc_profile", which, level)
        if key in self._cache:
            return self._cache[key]
        q = self._zcrit(level) ** 2
        eng, reml, cmin = self._eng, self._reml, self._crit_min
        gt = float(self.g[0])
        gc = float(self.g[1]) if self.nested else 0.0
        if not self.nested:
            khat = gt

            def excess(k: float) -> float:
                return eng.crit((math.sqrt(k),), reml) - cmin
        else:
            start = [math.sqrt(gc) if which == "therapist" else math.sqrt(gt)]
            khat = gt / (1.0 + gc) if which == "therapist" else gc / (1.0 + gt)
            oth = math.sqrt(gc if which == "therapist" else gt)
            hess: dict = {}  # the inner Newton's curvature, handed from one profile point to the next

            def excess(k: float) -> float:
                if which == "therapist":
                    f = lambda th: eng.crit((math.sqrt(k * (1.0 + th * th)), th), reml)  # noqa: E731
                else:
                    f = lambda th: eng.crit((th, math.sqrt(k * (1.0 + th * th))), reml)  # noqa: E731
                # warm-started Newton first; bracketing Brent where it cannot vouch for its answer
                x, fv, ok = newton_minimise(lambda v: f(v[0]), np.array([start[0]]), np.zeros(1), hess=hess)
                th = float(x[0])
                if not ok:
                    th, fv = min1d_local(f, start[0], 0.1 * max(oth, 0.1), 0.0)
                start[0] = th
                return fv - cmin
        lo, _ = _profile_end(excess, khat, q, -1, lower=0.0, log_scale=True, step=0.25)
        hi, found = _profile_end(excess, khat, q, +1, lower=0.0, log_scale=True, step=0.25, scale=1e-3)
        res_lo = lo / (1.0 + lo)
        res_hi = hi / (1.0 + hi) if found else 1.0
        if not found:
            self._warn(f"profile likelihood of the {which} ICC does not reach the {level:.0%} "
                       "cut-off: upper end reported as 1", StatisticalWarning)
        self._cache[key] = (res_lo, res_hi)
        return res_lo, res_hi

    def icc_interval(self, level: float = 0.95, method: str = "profile", n_boot: int = DEFAULT_N_BOOT,
                     seed: int | None = None, *, which: str = "therapist") -> tuple[float, float]:
        """Confidence interval of the therapist ICC (``which="cluster"``: the cluster ICC).

        ``method="profile"``: profile likelihood under the fit's own criterion (the REML
        restricted likelihood for REML fits, whose maximiser is the reported ICC).
        ``method="bootstrap"``: percentile interval of :meth:`bootstrap` replicates (seeded;
        ``seed=None`` means seed 0, so that results are reproducible).
        """
        if which not in ("therapist", "cluster") or (which == "cluster" and not self.nested):
            raise ModelError(f"unknown ICC {which!r} for this model")
        if method == "profile":
            return self._icc_profile(which, level)
        if method == "bootstrap":
            col = "icc" if which == "therapist" else "icc_cluster"
            return self._percentile(self.bootstrap(n_boot, seed)[col], level)
        raise ModelError(f"ICC interval method must be 'profile' or 'bootstrap', got {method!r}")

    # -- profile intervals (lme4's confint(method = "profile")) -----------------------------------
    @_single_thread_blas
    def _profile_intervals(self, level: float) -> pd.DataFrame:
        """Profile intervals of the fixed effects and variance components, as lme4.

        lme4's ``profile()`` first refits a REML model by ML (``devfun2`` calls ``refitML``), so
        for REML and ML fits alike the intervals are those of the *ML* deviance, centred at the
        ML estimates; this is why the reference's ``variance_ci`` of ``null_REML`` and ``null_ML``
        are identical. We do the same, so REML fits get lme4's intervals (their point estimate is
        the REML one). Variance components are profiled on the SD scale (therapist SD, [cluster
        SD], residual SD), every other parameter re-optimised, and reported squared; fixed
        effects are profiled with the variance parameters re-optimised. End points are the roots
        of ``deviance - min = z^2`` (exact root-finding where lme4 interpolates a spline).
        """
        key = ("profile", level)
        if key in self._cache:
            return self._cache[key]
        q = self._zcrit(level) ** 2
        ml = self._ml()
        eng, dmin, n = self._eng, ml["dmin"], self._eng.n
        sds, sigma = ml["sds"], ml["sigma"]
        nsd = len(sds)
        rows: dict[str, tuple[float, float]] = {}
        notes: list[str] = []

        # fixed effects: min over theta of n(1 + log(2 pi r_j / n)) + log|V/s2|,
        # r_j = r + (b_j(theta) - beta)^2 / [(X'WX)^-1]_jj (constrained GLS, sigma profiled)
        th_hat = np.sqrt(ml["g"])
        hess: dict = {}  # the inner optimiser's Hessian, handed from one profile point to the next
        # each end's inner Newton starts from the ML deviance's curvature in theta at the optimum
        H_th = _curvature(lambda th: eng.crit(tuple(th), False), th_hat, 1e-3 * th_hat) if np.all(th_hat > 0) else None
        for j, name in track(list(enumerate(self.fe_params.index)), "profile intervals of the fixed effects"):
            start = [th_hat.copy()]

            def excess(beta: float, j: int = j, start: list = start) -> float:
                def f(th: np.ndarray) -> float:
                    r, _, ldv, L = eng.core(th)  # one factorisation gives b, covu, r and ldv
                    b, covu, _ = gls_from_cholesky(L, eng.S, eng.k0, eng.shift_y)
                    rj = r + (b[j] - beta) ** 2 / covu[j, j]
                    return n * (1.0 + LOG2PI + math.log(rj / n)) + ldv

                x, fv = min_nd_local(f, start[0], 0.1 * np.maximum(th_hat, 0.05), np.zeros(nsd), hess=hess)
                start[0] = x
                return fv - dmin

            ends = []
            for d in (-1, 1):
                start[0] = th_hat.copy()
                _reset(hess, H_th)
                e, found = _profile_end(excess, float(ml["b"][j]), q, d, step=0.5 * float(ml["se"][j]),
                                        wald=math.sqrt(q) * float(ml["se"][j]))
                ends.append(e if found else math.nan)
                if not found:
                    notes.append(name)
            rows[name] = (ends[0], ends[1])

        # variance components on the SD scale. With the ML deviance's curvature in (SDs, log sigma)
        # each end's first trial goes where the quadratic approximation puts it, and each inner
        # optimisation starts where the previous profile point's optimum moves along the profile
        # (its slope -H_oo^-1 H_ok), with H_oo as the inner Newton's first Hessian
        H = self._sd_curvature()
        sd_names = ["therapist", "cluster"][:nsd]
        for k, name in track(list(enumerate(sd_names)), "profile intervals of the variance components"):
            others = [i for i in range(nsd) if i != k]
            inner = [nsd] + others  # v = (log sigma, the other SDs)
            x0 = np.array([math.log(sigma)] + [sds[i] for i in others])
            steps = np.array([0.02] + [0.1 * max(sds[i], 0.05 * sigma) for i in others])
            lows = np.array([-np.inf] + [0.0] * len(others))
            wald, slope, H_in = _along_profile(H, k, inner, q, float(sds[k]))
            start = [(float(sds[k]), x0.copy())]

            def excess(s: float, k: int = k, others: list = others, start: list = start,
                       steps: np.ndarray = steps, lows: np.ndarray = lows, slope: np.ndarray = slope) -> float:
                def f(v: np.ndarray) -> float:
                    sv = np.empty(nsd)
                    sv[k] = s
                    for i, o in enumerate(others):
                        sv[o] = v[1 + i]
                    return _dev_sd(eng, sv, math.exp(v[0]))

                s0, v0 = start[0]
                x, fv = min_nd_local(f, v0 + slope * (s - s0), steps, lows, hess=hess)
                start[0] = (s, x)
                return fv - dmin

            ends = []
            for d in (-1, 1):
                start[0] = (float(sds[k]), x0.copy())
                _reset(hess, H_in)
                # the Wald distance on the log scale, sqrt(q var) / sd, grows without bound as the SD
                # nears 0 (past the search's ceiling: the end was reported missing): at most a factor e^2
                e, found = _profile_end(excess, float(sds[k]), q, d, lower=0.0, log_scale=True, step=0.1,
                                        scale=0.01 * sigma, wald=wald, cap=2.0)
                ends.append(e ** 2 if found else math.nan)
                if not found:
                    notes.append(f"{name} variance")
            rows[name] = (ends[0], ends[1])

        # residual SD: the therapist/cluster SDs re-optimised
        x0 = sds.copy()
        wald, slope, H_in = _along_profile(H, nsd, list(range(nsd)), q, 1.0)
        slope = slope / sigma  # H's coordinate is log sigma
        start = [(sigma, x0.copy())]

        def excess_sigma(sg: float) -> float:
            s0, v0 = start[0]
            x, fv = min_nd_local(lambda v: _dev_sd(eng, v, sg), v0 + slope * (sg - s0),
                                 0.1 * np.maximum(sds, 0.05 * sigma), np.zeros(nsd), hess=hess)
            start[0] = (sg, x)
            return fv - dmin

        ends = []
        for d in (-1, 1):
            start[0] = (sigma, x0.copy())
            _reset(hess, H_in)
            e, found = _profile_end(excess_sigma, sigma, q, d, lower=0.0, log_scale=True, step=0.02, edge_ok=False,
                                    wald=wald)
            ends.append(e ** 2 if found else math.nan)
            if not found:
                notes.append("residual variance")
        rows["residual"] = (ends[0], ends[1])
        if notes:
            self._warn(f"profile likelihood does not reach the {level:.0%} cut-off for "
                       f"{', '.join(notes)}: those ends are missing", StatisticalWarning)
        out = pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])
        self._cache[key] = out
        return out

    def _sd_curvature(self) -> np.ndarray | None:
        """Hessian of the ML deviance in (therapist SD, [cluster SD], log residual SD) at the ML
        optimum (finite differences, relative steps on the SDs); None at a boundary estimate or a
        Hessian that is not positive definite."""
        ml = self._ml()
        sds = ml["sds"]
        if not np.all(sds > 0.0):
            return None
        x = np.append(sds, math.log(ml["sigma"]))
        return _curvature(lambda v: _dev_sd(self._eng, v[:-1], math.exp(v[-1])), x,
                          1e-3 * np.append(sds, max(abs(x[-1]), 0.1)))

    def conf_int(self, level: float = 0.95, method: str = "profile", *, n_boot: int = DEFAULT_N_BOOT,
                 seed: int | None = None) -> pd.DataFrame:
        """Confidence intervals, rows = fixed effects then variance components (as variances).

        ``method="profile"``: lme4's ``confint(fit, method = "profile")`` (see
        :meth:`_profile_intervals`; ML deviance, also for REML fits, as lme4).
        ``method="wald"``: fixed effects +- z se; variance components NaN (no Wald interval).
        ``method="bootstrap"``: percentile intervals of :meth:`bootstrap` replicates.
        """
        if method == "profile":
            return self._profile_intervals(level).loc[list(self.params.index)].copy()
        if method == "wald":
            z = self._zcrit(level)
            out = pd.DataFrame({"lower": self.fe_params - z * self.bse,
                                "upper": self.fe_params + z * self.bse})
            vc = pd.DataFrame(np.nan, index=self._vc_names, columns=["lower", "upper"])
            return pd.concat([out, vc])
        if method == "bootstrap":
            bt = self.bootstrap(n_boot, seed)
            rows = {c: self._percentile(bt[c], level) for c in self.params.index}
            return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])
        raise ModelError(f"interval method must be 'profile', 'wald' or 'bootstrap', got {method!r}")

    # -- LRT -------------------------------------------------------------------------------------
    def lrt(self) -> dict[str, float]:
        """Likelihood-ratio test of ``therapist variance = 0`` (cluster variance re-estimated in
        nested models), under the fit's own criterion (REML is valid here: the fixed effects are
        the same under both hypotheses). The null value is on the boundary, so the reference
        distribution is the 50:50 mixture of chi2_0 and chi2_1: ``p = 0.5 P(chi2_1 > stat)``
        (``p = 1`` when the statistic is 0). ``df`` is reported as 1."""
        if "lrt" not in self._cache:
            eng, reml = self._eng, self._reml
            if self.nested:
                _, c0, _ = min_nonneg_global(lambda gc: _crit(eng, 0.0, gc, reml))
            else:
                c0 = _crit(eng, 0.0, 0.0, reml)
            stat = max(c0 - self._crit_min, 0.0)
            p = 0.5 * float(stats.chi2.sf(stat, 1)) if stat > 0 else 1.0
            self._cache["lrt"] = {"statistic": float(stat), "df": 1.0, "p_value": p}
        return dict(self._cache["lrt"])

    # -- bootstrap -------------------------------------------------------------------------------
    def bootstrap(self, n_boot: int = DEFAULT_N_BOOT, seed: int | None = None) -> pd.DataFrame:
        """Parametric bootstrap: ``n_boot`` data sets simulated from the fitted model (fixed part
        ``X b``, therapist [and cluster] effects and residuals drawn from their fitted normal
        distributions with ``numpy.random.default_rng(seed)``; ``seed=None`` means 0), each refitted
        by the same exact engine and method (:func:`engine.inference.parametric_bootstrap`; failed
        refits are counted, warned about and NaN). Columns: fixed effects, variance components,
        ``icc`` [``icc_cluster``], ``converged``, ``singular``."""
        seed = 0 if seed is None else int(seed)
        n_boot = int(n_boot)
        if n_boot < 1:
            raise ModelError(f"n_boot must be a positive integer, got {n_boot}")
        key = ("boot", n_boot, seed)
        if key in self._cache:
            return self._cache[key]
        m = self.model
        mu = m.exog @ self.fe_params.to_numpy()
        sd_t = math.sqrt(self.vcomp["therapist"])
        sd_c = math.sqrt(self.vcomp.get("cluster", 0.0))
        sd_e = math.sqrt(self.vcomp["residual"])
        n, G, p = self._eng.n, self._eng.G, self._eng.p

        def simulate(rng: np.random.Generator) -> np.ndarray:
            ystar = mu + sd_t * rng.standard_normal(G)[m.codes]
            if self.nested:
                ystar += sd_c * rng.standard_normal(m.n_clusters)[m.cluster_codes]
            return ystar + sd_e * rng.standard_normal(n)

        def refit(ystar: np.ndarray) -> dict:
            eng = self._eng.with_y(ystar)
            g, _, conv = _fit(eng, self._reml)
            gt = float(g[0])
            gc = float(g[1]) if self.nested else 0.0
            b, _, r, _ = eng.fixed(_theta(gt, gc, self.nested))
            s2 = r / (n - p) if self._reml else r / n
            row = dict(zip(self.fe_params.index, b))
            row["therapist"] = gt * s2
            if self.nested:
                row["cluster"] = gc * s2
            row["residual"] = s2
            row["icc"] = gt / (1.0 + gt + gc)
            if self.nested:
                row["icc_cluster"] = gc / (1.0 + gt + gc)
            row["converged"] = bool(conv)
            row["singular"] = bool(np.any(np.sqrt(g) < SINGULAR_TOL))
            return row

        cols = [*self.fe_params.index, *self._vc_names, "icc", *(["icc_cluster"] if self.nested else [])]
        res = parametric_bootstrap(simulate, refit, n_boot, seed, cols, flags=("converged", "singular"))
        out = res.draws
        if res.n_failed:
            self._warn(f"{res.n_failed} of {n_boot} bootstrap refits failed (did not converge); they are "
                       "left out of the percentile intervals", ConvergenceWarning)
        self._cache[key] = out
        return out

    @staticmethod
    def _percentile(x: pd.Series, level: float) -> tuple[float, float]:
        return percentile_interval(x, level)

    # -- therapist effects -----------------------------------------------------------------------
    def therapist_effects(self, level: float = 0.95, higher_is_better: bool | None = None
                          ) -> pd.DataFrame:
        """Empirical-Bayes (BLUP) therapist effects with conditional intervals.

        Columns: ``therapist`` (label; nested models add ``cluster``), ``caseload`` (patients),
        ``raw_mean`` (the therapist's mean outcome), ``adjusted_mean`` (case-mix-adjusted mean:
        the mean over *all* patients of the fitted fixed part ``X b`` plus this therapist's mean
        residual ``mean(y - X b)``, i.e. the therapist's raw mean moved to the average case mix;
        not shrunken), ``effect`` (the BLUP ``E[u_i | y]`` at the estimates, shrunken towards 0:
        ``s2_t n_i / (s2 + n_i s2_t)`` times the mean residual; in nested models the residual
        is taken net of the cluster's BLUP), ``effect_se`` (conditional SD, lme4's ``condVar``:
        ``sqrt(s2 s2_t / (s2 + n_i s2_t))`` plus, nested, the term for the uncertainty of the
        cluster effect), ``ci_low``/``ci_high`` (effect +- z effect_se) and ``classification``:
        "better than average"/"worse than average" when the interval excludes zero and
        ``higher_is_better`` is given (for PHQ-9 end scores lower is better: pass False), else
        "above average"/"below average"; "not distinguishable from average" when it covers zero.
        """
        z = self._zcrit(level)
        eng = self._eng
        gt = float(self.g[0])
        gc = float(self.g[1]) if self.nested else 0.0
        s2 = self.scale
        ni = eng.ni
        rbar = eng.means[:, eng.p] - eng.means[:, : eng.p] @ self._bc  # mean residuals (the shift cancels)
        a = ni / (1.0 + ni * gt)
        if self.nested:
            cl = eng.cluster
            tau = np.bincount(cl, weights=a)  # every cluster has a therapist: C entries
            U = np.bincount(cl, weights=a * rbar)
            w = gc / (1.0 + gc * tau)
            u_c = w * U
            effect = gt * a * (rbar - u_c[cl])
            cvar = s2 * (gt / (1.0 + ni * gt) + (ni * gt / (1.0 + ni * gt)) ** 2 * w[cl])
        else:
            effect = gt * a * rbar
            cvar = s2 * gt / (1.0 + ni * gt)
        se = np.sqrt(cvar)
        lo, hi = effect - z * se, effect + z * se
        grand_fixed = float(self.model.exog.mean(axis=0) @ self.fe_params.to_numpy())
        raw_mean = eng.means[:, eng.p] + eng.shift_y
        cls = classify_effects(lo, hi, higher_is_better)
        out = {"therapist": self.model.group_therapist}
        if self.nested:
            out["cluster"] = self.model.group_cluster
        out.update({"caseload": ni.astype(int), "raw_mean": raw_mean,
                    "adjusted_mean": grand_fixed + rbar, "effect": effect, "effect_se": se,
                    "ci_low": lo, "ci_high": hi, "classification": cls})
        return pd.DataFrame(out)

    # -- reporting -------------------------------------------------------------------------------
    def _summary_title(self) -> str:
        kind = "nested (1 | cluster/therapist)" if self.nested else "random intercept (1 | therapist)"
        return f"Gaussian {kind} model fitted by {self.method}"

    def to_contract(self, interval: str = "profile", n_boot: int = DEFAULT_N_BOOT,
                    seed: int | None = None) -> dict[str, Any]:
        """This model's entry of ``estimates.json`` (all but type/outcome/formula): plain Python
        floats/bools/None, deterministic given the data and ``seed``."""
        ci = self.conf_int(method=interval, n_boot=n_boot, seed=seed)
        fixed = {name: {"estimate": _f(self.fe_params[name]), "se": _f(self.bse[name]),
                        "ci_low": _f(ci.loc[name, "lower"]), "ci_high": _f(ci.loc[name, "upper"])}
                 for name in self.fe_params.index}
        vcs = {name: {"estimate": _f(v), "ci_low": _f(ci.loc[name, "lower"]),
                      "ci_high": _f(ci.loc[name, "upper"])} for name, v in self.vcomp.items()}
        icc_method = interval if interval in ("profile", "bootstrap") else "profile"
        lo, hi = self.icc_interval(method=icc_method, n_boot=n_boot, seed=seed)
        out: dict[str, Any] = {
            "family": "gaussian", "method": self.method, "fixed_effects": fixed,
            "variance_components": vcs,
            "icc": {"estimate": _f(self.icc()), "ci_low": _f(lo), "ci_high": _f(hi),
                    "ci_method": icc_method},
        }
        if self.nested:
            clo, chi = self.icc_interval(method=icc_method, n_boot=n_boot, seed=seed, which="cluster")
            out["icc_cluster"] = {"estimate": _f(self.icc_cluster()), "ci_low": _f(clo),
                                  "ci_high": _f(chi), "ci_method": icc_method}
        lrt = self.lrt()
        out.update({
            "loglik": _f(self.loglik), **{k: _f(v) for k, v in self.information_criteria().items()},
            "converged": bool(self.converged),
            "singular": bool(self.singular),
            "lrt": {k: _f(v) for k, v in lrt.items()},
            "n_patients": int(self.n_obs), "n_therapists": int(self.n_therapists),
            "n_clusters": None if self.n_clusters is None else int(self.n_clusters),
            "warnings": list(self.warnings),
        })
        return out

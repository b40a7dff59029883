"""Inference shared by every likelihood engine: profile-likelihood limits, the parametric
bootstrap and Wald intervals.

The functions here know nothing about therapist models: they take a criterion (a callable giving
the profiled deviance, or a refit) and the bounds of the parameter, so that any engine — the
Gaussian engine of :mod:`therapist_effects.engine.gaussian`, the GLMM, a growth model — uses the
same root search, the same seed rule and the same failure accounting.

Profile limits bracket *outward to the edge of the parameter space*: from the estimate the search
steps away (geometrically on the log scale for positive parameters, also from an estimate at 0)
until the deviance exceeds the cut-off or the edge is reached. A finite edge (a variance of 0, a
correlation of +-1) is evaluated exactly, so a limit sits at the edge only when the profile there
is still below the cut-off; an infinite edge is declared unreachable only beyond ``ceiling``. A
singular fit (variance estimate exactly 0) therefore gets the finite upper limit its profile
implies, where a search with a fixed number of small steps from 0 gives up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

from ..exceptions import ModelError
from ..progress import track

__all__ = ["ProfileLimit", "profile_limit", "profile_interval", "profile_end", "signed_root_limit", "chi2_cut",
           "wald_interval", "percentile_interval", "parametric_bootstrap", "BootstrapResult",
           "bootstrap_rng", "DEFAULT_LEVEL", "DEFAULT_N_BOOT"]

#: the default confidence level and number of bootstrap replicates of every engine
DEFAULT_LEVEL = 0.95
DEFAULT_N_BOOT = 1000


def chi2_cut(level: float) -> float:
    """The deviance cut-off of a ``level`` profile interval: ``qchisq(level, 1)``."""
    if not 0.0 < level < 1.0:
        raise ModelError(f"confidence level must be between 0 and 1, got {level}")
    return float(stats.chi2.ppf(level, 1))


@dataclass(frozen=True)
class ProfileLimit:
    """One end of a profile interval. ``status``: ``"root"`` (the deviance crosses the cut-off
    there), ``"edge"`` (the profile stays below the cut-off up to a finite edge of the parameter
    space, which is the limit) or ``"open"`` (below the cut-off up to ``ceiling`` on an infinite
    side: no finite limit; ``value`` is then +-inf)."""

    value: float
    status: str
    evaluations: int

    @property
    def found(self) -> bool:
        return self.status != "open"


def profile_limit(excess: Callable[[float], float], xhat: float, q: float, direction: int, *,
                  lower: float = -math.inf, upper: float = math.inf, step: float,
                  log_scale: bool = False, scale: float = 1.0, edge_ok: bool = True,
                  ceiling: float | None = None, growth: float = 2.0, extrapolate: bool = False,
                  xtol: float = 1e-14, rtol: float = 1e-11) -> ProfileLimit:
    """The end of a profile-likelihood interval in ``direction`` (+1 upper, -1 lower).

    ``excess(x)`` is the profiled deviance at ``x`` minus its minimum (reached at ``xhat``); the end
    is where it reaches ``q``. The parameter lives in ``[lower, upper]``.

    - A finite edge in the search direction is evaluated first (when ``edge_ok``: the criterion is
      defined there, as for a variance of 0 or a correlation of +-1); if the excess there is below
      ``q`` the edge is the limit.
    - Otherwise the search steps outward: ``xhat +- step * growth**k`` (``log_scale=False``), or
      multiplicatively ``xhat * exp(+-step * growth**k)`` for positive parameters
      (``log_scale=True``), from ``scale * growth**k`` upwards when ``xhat`` is 0. Steps that pass a
      finite edge are clipped to it. The crossing is then located by Brent's method.
    - ``extrapolate``: ``excess`` is (nearly) linear in the step from the estimate (a signed root
      of the excess deviance, see :func:`signed_root_limit`), so after a step that stays below
      ``q`` the next one goes 10% past the crossing a straight line through the estimate and that
      point predicts (at least 1.1 times, at most ``4 growth`` times the last step) instead of
      ``growth`` times as far; not from an estimate at 0 on the log scale. The finite edge is then
      evaluated only when a step reaches it or that line (in ``x``) crosses ``q`` beyond it.
    - Towards an infinite edge (or an edge where the criterion is undefined) the search stops at
      ``ceiling`` (default ``1e12 * max(|xhat|, scale)``) and reports ``"open"``.
    """
    n_eval = [0]

    def ex(x: float) -> float:
        n_eval[0] += 1
        return float(excess(x))

    edge = upper if direction > 0 else lower
    finite_edge = math.isfinite(edge)
    if finite_edge and xhat == edge:
        return ProfileLimit(float(edge), "edge", 0)
    e_edge = None
    if finite_edge and edge_ok and not extrapolate:
        e_edge = ex(edge)
        if e_edge < q:
            return ProfileLimit(float(edge), "edge", n_eval[0])
    if ceiling is None:
        ceiling = 1e12 * max(abs(xhat), scale)
    prev, e_prev = xhat, 0.0
    h = step
    for k in range(400):
        if log_scale:
            if xhat > 0.0:
                lx = math.log(xhat) + direction * h
                if lx > math.log(ceiling):
                    x = math.inf
                elif lx < math.log(xhat) - 700.0:
                    x = lower
                else:
                    x = math.exp(lx)
            else:  # an estimate at 0: step up from scale
                x = scale * growth ** k if direction > 0 else -math.inf
        else:
            x = xhat + direction * h
        beyond = finite_edge and direction * (x - edge) >= 0.0
        if beyond:
            if not edge_ok:  # approach an edge where the criterion is undefined geometrically
                x = edge + (prev - edge) / growth
                if abs(x - edge) <= 1e-12 * max(abs(xhat), scale):
                    return ProfileLimit(-math.inf if direction < 0 else math.inf, "open", n_eval[0])
            else:  # the edge's excess is >= q: the root lies between prev and the edge
                if e_edge is None:  # (deferred by extrapolate)
                    e_edge = ex(edge)
                    if e_edge < q:
                        return ProfileLimit(float(edge), "edge", n_eval[0])
                return ProfileLimit(_root(ex, q, prev, e_prev, edge, e_edge, xtol, rtol), "root", n_eval[0])
        elif not math.isfinite(x) or abs(x) > ceiling:
            return ProfileLimit(math.inf if direction > 0 else -math.inf, "open", n_eval[0])
        e = ex(x)
        if e >= q:
            return ProfileLimit(_root(ex, q, prev, e_prev, x, e, xtol, rtol), "root", n_eval[0])
        prev, e_prev = x, e
        if extrapolate and e > 0.0 and not (log_scale and xhat <= 0.0):
            h = min(max(1.1 * h * q / e, 1.1 * h), 4.0 * growth * h)
            if (finite_edge and edge_ok and e_edge is None
                    and direction * (xhat + (x - xhat) * q / e - edge) >= 0.0):
                e_edge = ex(edge)  # a straight line in x predicts the crossing past the edge
                if e_edge < q:
                    return ProfileLimit(float(edge), "edge", n_eval[0])
        else:
            h = h * growth if extrapolate else step * growth ** (k + 1)
    return ProfileLimit(math.inf * direction, "open", n_eval[0])  # pragma: no cover


def _root(ex: Callable[[float], float], q: float, a: float, ea: float, b: float, eb: float,
          xtol: float, rtol: float) -> float:
    """Brent's root of ``ex - q`` in the bracket ``[a, b]`` whose end values are known (they are
    not evaluated again: a profile whose inner optimisation is warm-started may differ in the last
    digits between two evaluations at the same point)."""
    known = {a: ea - q, b: eb - q}
    lo, hi = sorted((a, b))
    return float(optimize.brentq(lambda t: known[t] if t in known else ex(t) - q, lo, hi,
                                 xtol=xtol, rtol=rtol, maxiter=200))


def profile_interval(excess: Callable[[float], float], xhat: float, level: float, **kw
                     ) -> tuple[ProfileLimit, ProfileLimit]:
    """Both ends of the ``level`` profile interval (keywords as :func:`profile_limit`)."""
    q = chi2_cut(level)
    return (profile_limit(excess, xhat, q, -1, **kw), profile_limit(excess, xhat, q, +1, **kw))


def signed_root_limit(excess: Callable[[float], float], xhat: float, q: float, direction: int, *,
                      wald: float | None = None, cap: float = math.inf, **kw) -> ProfileLimit:
    """:func:`profile_limit` on the signed root ``sqrt(excess)`` of the excess deviance, cut-off
    ``sqrt(q)``: nearly linear in the parameter, so that Brent's interpolation converges in a few
    evaluations. ``wald``: the distance (on the search scale: log scale for ``log_scale``) from the
    estimate to the limit the quadratic (Wald) approximation predicts; the first trial goes there (at
    most ``cap``: the approximation is local), else ``kw["step"]``. Other keywords as
    :func:`profile_limit`; the root is the same as that of ``excess - q``."""
    if wald is not None and math.isfinite(wald) and wald > 0.0:
        kw["step"] = min(wald, cap)
    return profile_limit(lambda x: math.sqrt(max(excess(x), 0.0)), xhat, math.sqrt(q), direction, **kw)


def profile_end(excess: Callable[[float], float], xhat: float, q: float, direction: int, *,
                positive: bool, step: float, zero_allowed: bool = False,
                scale: float = 1.0) -> tuple[float, bool]:
    """``(end, found)`` of :func:`profile_limit` for a parameter on ``[0, inf)`` (``positive``,
    criterion defined at 0 when ``zero_allowed``) or on the real line (the older interface)."""
    if positive:
        lim = profile_limit(excess, xhat, q, direction, lower=0.0, step=step, log_scale=True,
                            scale=scale, edge_ok=zero_allowed)
    else:
        lim = profile_limit(excess, xhat, q, direction, step=step)
    return lim.value, lim.found


# --------------------------------------------------------------------------------------------
# Wald and percentile intervals
# --------------------------------------------------------------------------------------------
def wald_interval(estimate: np.ndarray | float, se: np.ndarray | float, level: float = DEFAULT_LEVEL
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``estimate -+ z se`` with ``z`` the normal quantile of the level."""
    z = math.sqrt(chi2_cut(level))
    est, s = np.asarray(estimate, dtype=float), np.asarray(se, dtype=float)
    return est - z * s, est + z * s


def percentile_interval(x: Sequence[float], level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite values of ``x`` (NaN when there are none)."""
    v = np.asarray(x, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [a, 1.0 - a])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------
# One parametric bootstrap
# --------------------------------------------------------------------------------------------
def bootstrap_rng(seed: int | None) -> np.random.Generator:
    """The seed rule of every bootstrap: ``seed=None`` means seed 0 (so that results are always
    reproducible); the generator is ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(0 if seed is None else int(seed))


@dataclass
class BootstrapResult:
    """Replicates (one row per replicate; NaN rows for failed refits) and the failure count."""

    draws: pd.DataFrame
    n_boot: int
    n_failed: int

    def interval(self, column: str, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
        return percentile_interval(self.draws[column], level)


def parametric_bootstrap(simulate: Callable[[np.random.Generator], object],
                         refit: Callable[[object], dict], n_boot: int, seed: int | None,
                         columns: Sequence[str], flags: Sequence[str] = (),
                         optional: Sequence[str] = ("correlation",)) -> BootstrapResult:
    """Simulate ``n_boot`` data sets from the fit and refit each.

    ``simulate(rng)`` draws one data set (all randomness from ``rng``, one generator per call of
    this function, seeded by :func:`bootstrap_rng`); ``refit(data)`` returns a dict of the
    ``columns`` (it may add ``converged``); a refit that raises or returns non-finite values (in a
    column not listed in ``optional``: quantities a successful refit may leave undefined, such as a
    correlation at a zero SD or a ratio over a zero ICC), or reports ``converged=False``, is counted
    as failed and its row is NaN. ``flags`` are boolean columns copied from the refit as they are
    (e.g. ``converged``, ``singular``).
    """
    n_boot = int(n_boot)
    if n_boot < 1:
        raise ModelError(f"n_boot must be a positive integer, got {n_boot}")
    rng = bootstrap_rng(seed)
    rows, failed = [], 0
    for _ in track(range(n_boot), f"parametric bootstrap ({n_boot} refits)"):
        data = simulate(rng)
        try:
            row = refit(data)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError, ModelError):  # e.g. a separated resample
            row = None
        ok = row is not None and bool(row.get("converged", True)) and all(
            np.isfinite(row.get(c, np.nan)) for c in columns if c not in optional)
        flag_values = {f: bool((row or {}).get(f, False)) for f in flags}
        if not ok:
            failed += 1
            row = {c: math.nan for c in columns}
        rows.append({**{c: float(row[c]) for c in columns}, **flag_values})
    return BootstrapResult(pd.DataFrame(rows, columns=[*columns, *flags]), n_boot, failed)

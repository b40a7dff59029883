"""Numerical helpers of the REML/ML engine: bounded 1-D minimisers and profile-interval end points.

These are deliberately small and robust rather than general: every variance parameter of the
therapist models lives on ``[0, inf)`` and the criteria are smooth, so a grid in ``log g`` plus
Brent refinement (with an explicit check of the boundary ``g = 0``, where singular fits sit) finds
the global optimum exactly; profile intervals are found by bracketing and Brent root-finding on the
deviance difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import optimize

from ..engine.inference import profile_end  # noqa: F401  (re-exported: one profile search)

#: grid in log(variance ratio) used to locate the global optimum before Brent refinement
LOG_G_GRID = np.arange(-14.0, 10.0001, 0.5)
#: a boundary optimum is preferred when it is within this of the interior one (-2 logLik units)
BOUNDARY_TOL = 1e-9


def _brent(f: Callable[[float], float], lo: float, hi: float, xtol: float,
           extra: tuple[tuple[float, float], ...] = ()) -> tuple[float, float]:
    """Bounded Brent on ``[lo, hi]``; returns the best of its answer and the ``extra`` points."""
    res = optimize.minimize_scalar(f, bounds=(lo, hi), options={"xatol": xtol})  # with bounds: method "bounded"
    best = (float(res.x), float(res.fun))
    for x, fx in extra:
        if fx < best[1]:
            best = (x, fx)
    return best


def min_nonneg_global(f: Callable[[float], float], grid: np.ndarray = LOG_G_GRID,
                      f_grid: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[float, float, bool]:
    """Global minimiser of ``f(g)`` over a variance ratio ``g >= 0``.

    Evaluates ``f`` on a grid in ``log g`` and at ``g = 0``, refines the best grid bracket by
    bounded Brent (on ``log g`` in the interior, on ``theta = sqrt(g)`` next to the boundary, as
    lme4 parameterises), and returns ``(g_hat, f_min, converged)``. ``g_hat`` is exactly 0 when the
    boundary is optimal (a singular fit); ``converged`` is False when the optimum runs into the
    upper end of the grid (therapist variance ~1e4 times the residual: no within-therapist
    information). ``f_grid``: ``f`` vectorised over an array of ``g`` (evaluates the grid in one pass).
    """
    gs = np.exp(grid)
    vals = np.asarray(f_grid(gs)) if f_grid is not None else np.array([f(float(g)) for g in gs])
    f0 = f(0.0)
    k = int(np.argmin(vals))
    converged = True
    if k == 0:
        th_hi = math.sqrt(gs[1])
        th, fb = _brent(lambda t: f(t * t), 0.0, th_hi, 1e-12 * th_hi + 1e-14)
        g_best, f_best = th * th, fb
        if vals[0] < f_best:
            g_best, f_best = float(gs[0]), float(vals[0])
    elif k == len(gs) - 1:
        g_best, f_best = float(gs[k]), float(vals[k])
        converged = False
    else:
        t, fb = _brent(lambda t: f(math.exp(t)), float(grid[k - 1]), float(grid[k + 1]), 1e-11,
                       ((float(grid[k]), float(vals[k])),))
        g_best, f_best = math.exp(t), fb
    # the boundary wins ties up to rounding noise of the criterion (~1e-13 in -2 logLik units;
    # 1e-9 is far below any meaningful likelihood difference), so singular fits are exactly 0
    if f0 <= f_best + BOUNDARY_TOL:
        return 0.0, float(f0), True
    return g_best, f_best, converged


def min1d_local(f: Callable[[float], float], x0: float, step: float, lo: float = -np.inf,
                xtol: float = 1e-9) -> tuple[float, float]:
    """Local minimiser of ``f`` on ``[lo, inf)`` from a warm start ``x0``.

    Brackets the minimum by doubling steps away from ``x0`` (stopping at ``lo``), refines by
    bounded Brent, and checks the bound itself. Used for the inner optimisations of profiles,
    where the previous profile point is an excellent start.
    """
    x0 = max(float(x0), lo)
    f0 = f(x0)
    xr = x0 + step
    fr = f(xr)
    if fr < f0:
        a, b, fb = x0, xr, fr
    else:
        if x0 == lo:
            return _brent(f, lo, xr, xtol, ((lo, f0),))
        xl = max(x0 - step, lo)
        fl = f(xl)
        if fl >= f0:
            return _brent(f, xl, xr, xtol, ((x0, f0),))
        if xl == lo:
            return _brent(f, lo, x0, xtol, ((lo, fl),))
        a, b, fb = x0, xl, fl
    h = b - a  # the first step, signed: doubled in the direction of descent
    for _ in range(200):
        h *= 2.0
        c = b + h
        if c <= lo:  # only a step to the left reaches the bound (b >= lo)
            fc = f(lo)
            if fc < fb:
                return _brent(f, lo, b, xtol, ((lo, fc),))
            return _brent(f, lo, a, xtol, ((b, fb),))
        fc = f(c)
        if fc >= fb:
            return _brent(f, min(a, c), max(a, c), xtol, ((b, fb),))
        a, b, fb = b, c, fc
    return b, fb


def min_nd_local(f: Callable[[np.ndarray], float], x0: np.ndarray, steps: np.ndarray,
                 lows: np.ndarray, xtol: float = 1e-7, hess: dict | None = None) -> tuple[np.ndarray, float]:
    """Minimise ``f`` over 1 or 2 coordinates (``x >= lows``) by nested :func:`min1d_local`
    (the first coordinate profiled inside the second), warm-started at ``x0``. ``xtol`` is in
    the coordinates' units; 1e-7 on O(1) coordinates leaves a criterion error of ~1e-14. ``hess``:
    a dict carrying the Hessian from one call to the next (see :func:`newton_minimise`)."""
    x0 = np.maximum(x0, lows)
    if len(x0) == 1:
        x, fx = min1d_local(lambda t: f(np.array([t])), x0[0], steps[0], lows[0], xtol=xtol)
        return np.array([x]), fx
    if len(x0) != 2:  # pragma: no cover - the models here have at most two free parameters
        raise ValueError("min_nd_local handles 1 or 2 coordinates")
    # warm-started damped Newton first (a few dozen evaluations near the previous profile point);
    # the nested Brent searches below only when it cannot vouch for its answer
    from ..engine.gaussian import newton_minimise

    xn, fn, ok = newton_minimise(f, x0, lows, hess=hess)
    if ok:
        return xn, fn
    inner_start = [x0[0]]

    def outer(t1: float) -> float:
        x, fx = min1d_local(lambda t0: f(np.array([t0, t1])), inner_start[0], steps[0], lows[0],
                            xtol=xtol)
        inner_start[0] = x
        return fx

    x1, _ = min1d_local(outer, x0[1], steps[1], lows[1], xtol=xtol)
    xa, fx = min1d_local(lambda t0: f(np.array([t0, x1])), inner_start[0], steps[0], lows[0],
                         xtol=xtol)
    return np.array([xa, x1]), fx

"""The analytic gradient and Hessian of the random-slope criterion (engine/derivatives.py) against
finite differences of the engine's own criterion, the projected Newton that uses them, and the fit
it drives against lme4 (``tests/reference/random_slope_optimum.R``) where the engine's Nelder-Mead
search alone stops short of the optimum."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from refdata import REFERENCE_DIR
from therapist_effects.engine.derivatives import slope_deviance
from therapist_effects.engine.gaussian import minimise_box, newton_box
from therapist_effects.models.slopes import RandomSlopeModel, _criterion


def _data(slope_kind: str, seed: int = 3):
    rng = np.random.default_rng(seed)
    G, n = 60, 900
    t = np.arange(n) % G
    s = rng.integers(0, 2, n).astype(float) if slope_kind == "binary" else rng.normal(12.0, 4.0, n)
    x = rng.normal(size=n)
    ab = rng.multivariate_normal([0, 0], [[0.3, -0.05], [-0.05, 0.04]], size=G)
    y = 2.0 + 0.4 * x + 0.2 * s + ab[t, 0] + ab[t, 1] * s + rng.normal(size=n)
    return RandomSlopeModel(y, np.column_stack([np.ones(n), x, s]), t, s)._eng


def _fd(f, g, h=1e-5):
    """Central differences of a scalar (gradient) or vector (Jacobian of the gradient) function."""
    return np.array([(f(g + h * e) - f(g - h * e)) / (2 * h) for e in np.eye(len(g))])


POINTS = {"interior": [math.log(0.4), math.log(0.15), -0.35, math.log(0.9)],
          "correlation -1": [math.log(0.5), math.log(0.1), -1.0, math.log(1.1)],
          "correlation +1": [math.log(0.3), math.log(0.2), 1.0, math.log(0.8)]}


@pytest.mark.parametrize("slope_kind", ["binary", "continuous"])
@pytest.mark.parametrize("criterion", ["ml", "profiled_ml", "profiled_reml"])
@pytest.mark.parametrize("point", list(POINTS))
def test_derivatives_match_finite_differences(slope_kind, criterion, point):
    eng = _data(slope_kind)
    g = np.array(POINTS[point])
    f, grad, hess = slope_deviance(eng, g, criterion)
    # the value is the engine's criterion (lme4's deviance / REMLcrit, or the ML deviance at s2)
    assert f == pytest.approx(_criterion(eng, g, criterion), rel=1e-12)
    # at a correlation of +-1 the engine's theta is not differentiable in rho (sqrt(1 - rho^2)), the
    # criterion in D = [[a^2, rho a b], [rho a b, b^2]] is: difference that one there
    value = (lambda v: _criterion(eng, v, criterion)) if point == "interior" else (
        lambda v: slope_deviance(eng, v, criterion)[0])
    fd_grad = _fd(value, g)
    np.testing.assert_allclose(grad, fd_grad, rtol=1e-6, atol=1e-6 * np.max(np.abs(fd_grad)))
    fd_hess = _fd(lambda v: slope_deviance(eng, v, criterion)[1], g)
    np.testing.assert_allclose(hess, fd_hess, rtol=1e-5, atol=1e-6 * np.max(np.abs(fd_hess)))
    np.testing.assert_allclose(hess, hess.T, rtol=1e-12, atol=1e-9)
    if criterion != "ml":  # s2 profiled out: no dependence on g[3]
        assert grad[3] == 0.0 and not hess[3].any()


def test_zero_variance_is_exact():
    """A variance of exactly 0 (log SD -inf): finite value equal to the engine's, zero derivatives in
    the vanished SD and the correlation."""
    eng = _data("binary")
    g = np.array([-math.inf, math.log(0.2), 0.3, math.log(0.9)])
    f, grad, hess = slope_deviance(eng, g, "ml")
    assert math.isfinite(f) and f == pytest.approx(_criterion(eng, g, "ml"), rel=1e-12)
    assert grad[0] == 0.0 and grad[2] == 0.0 and np.all(np.isfinite(hess))
    g2 = g.copy()
    g2[2] = -0.8  # the correlation does not enter
    assert slope_deviance(eng, g2, "ml")[0] == pytest.approx(f, rel=1e-14)


def test_newton_box_reaches_the_bound_and_the_interior_optimum():
    """Against the bounded Nelder-Mead of the engine on the correlation bound (a profile of the
    residual variance at s2 = 1), and exactly on the bound of a quadratic."""
    eng = _data("binary")
    J = np.vstack([np.eye(3), np.zeros(3)])  # z = (log t1, log t2, rho) at s2 = 1
    g0 = np.zeros(4)
    lows, ups = np.array([-np.inf, -np.inf, -1.0]), np.array([np.inf, np.inf, 1.0])

    def fgh(z):
        f, gr, H = slope_deviance(eng, g0 + J @ z, "ml")
        return f, J.T @ gr, J.T @ H @ J

    x0 = np.array([math.log(0.3), math.log(0.1), 0.0])
    xn, fn, ok = newton_box(fgh, x0, lows, ups)
    xm, fm, _ = minimise_box(lambda z: _criterion(eng, g0 + J @ z, "ml"), x0, lows, ups)
    assert ok and fn <= fm + 1e-9
    np.testing.assert_allclose(xn, xm, atol=1e-4)
    # a quadratic whose minimum lies outside the box: held exactly at the bound
    A = np.array([[2.0, 0.5], [0.5, 1.0]])
    b = np.array([-4.0, 1.0])
    x, f, ok = newton_box(lambda z: (0.5 * z @ A @ z + b @ z, A @ z + b, A), np.zeros(2),
                          np.array([-1.0, -1.0]), np.array([1.0, 1.0]))
    assert ok and x.tolist() == [1.0, -1.0]  # the KKT point: both gradients point out of the box


OPT = json.loads((REFERENCE_DIR / "random_slope_optimum.json").read_text())


def _optimum_case(key: str):
    d = pd.read_csv(REFERENCE_DIR / f"random_slope_optimum_{key}.csv")
    X = np.column_stack([np.ones(len(d)), d["x"], d["s"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomSlopeModel(d["y"], X, d["t"], d["s"], exog_names=["(Intercept)", "x", "s"]).fit()
    return res, OPT[key]


def test_fit_reaches_lme4_optimum_where_the_global_search_stopped_short():
    """random_slope_optimum.R, data set a: lme4's REML optimum (interior, correlation -0.44); the
    engine's Nelder-Mead search alone stops on the correlation -1 face, 5.4 deviance units above.
    The optimum is flat in the intercept variance: bobyqa stops 2e-7 short in theta (our REMLcrit is
    5e-12 lower), so the variances agree to 1e-5 and logLik to 1e-12 (never lower)."""
    res, ref = _optimum_case("a")
    assert not res.singular and res.converged
    for name in ("therapist", "therapist_slope", "residual"):
        assert res.vcomp[name] == pytest.approx(ref[name], rel=1e-5)
    assert res.correlation == pytest.approx(ref["correlation"], rel=1e-5)
    for k, v in ref["fixef"].items():
        assert res.fe_params[k] == pytest.approx(v, rel=1e-6)
    assert res.loglik == pytest.approx(ref["logLik"], rel=1e-12) and res.loglik >= ref["logLik"] - 1e-10
    _, f_search, _ = res._eng.fit(True)
    assert -2 * res.loglik <= f_search + 1e-9


def test_fit_no_lower_than_lme4_singular_stop():
    """Data set b: lme4 stops on the boundary (intercept SD 0, REMLcrit 2427.3307); the engine's
    criterion at lme4's theta is lme4's REMLcrit, and the fit finds a lower one (interior)."""
    res, ref = _optimum_case("b")
    assert res._eng.crit(np.array(ref["theta"]), True) == pytest.approx(ref["REMLcrit"], rel=1e-10)
    assert res.loglik > ref["logLik"] + 0.01
    _, f_search, _ = res._eng.fit(True)
    assert -2 * res.loglik <= f_search + 1e-9


def test_slope_variance_limit_is_the_profile_root_on_a_wide_scale():
    """A continuous slope variable on a wide scale (mean 500, SD 100; slope variance ~1e-5): the upper
    limit of the slope variance is where the profile deviance, minimised over the other parameters
    by an independent multi-start search (scipy Nelder-Mead and L-BFGS-B), reaches qchisq(.95, 1).
    (The former finite-difference inner search stopped short there: its limit was 37% too low.)"""
    from scipy import optimize

    from therapist_effects.engine.inference import chi2_cut

    rng = np.random.default_rng(1011)
    G, m = int(rng.integers(10, 60)), int(rng.integers(5, 25))
    n = G * m
    t = np.repeat(np.arange(G), m)
    s = rng.normal(500, 100, n)
    x = rng.normal(size=n)
    sa, sb, r = rng.choice([0.0, 0.2, 0.6]), rng.choice([0.0, 0.1, 0.4]) * 0.01, rng.uniform(-0.9, 0.9)
    ab = rng.multivariate_normal([0, 0], [[sa ** 2, r * sa * sb], [r * sa * sb, sb ** 2]], size=G)
    y = 1 + 0.3 * x + 0.002 * s + ab[t, 0] + ab[t, 1] * s + rng.normal(size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = RandomSlopeModel(y, np.column_stack([np.ones(n), x, s]), t, s).fit()
        lo, hi = res.interval("therapist_slope")
    eng = res._eng
    _, dmin, s2, t1, _, _ = res._ml()

    def profile(c):  # z = (log sigma, log t1, rho); the slope variance fixed at c
        def f(z):
            return _criterion(eng, np.array([z[1], 0.5 * math.log(c) - z[0], z[2], 2 * z[0]]), "ml")
        best = math.inf
        for rho in (-0.9, 0.0, 0.9):
            z0 = np.array([0.5 * math.log(s2), math.log(max(t1, 1e-8)), rho])
            for method in ("Nelder-Mead", "L-BFGS-B"):
                best = min(best, optimize.minimize(f, z0, method=method, bounds=[(-20, 20), (-50, 20), (-1, 1)],
                                                   options={"maxiter": 20000}).fun)
        return best - dmin
    assert lo == 0.0 and 0.0 < hi < 1e-4
    assert profile(hi) == pytest.approx(chi2_cut(0.95), abs=1e-5)
    assert profile(0.9 * hi) < chi2_cut(0.95) < profile(1.1 * hi)

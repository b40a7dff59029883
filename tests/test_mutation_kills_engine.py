"""Tests that kill mutants of the Gaussian engine (engine/gaussian.py, engine/derivatives.py) found by
``MUTATION_SAMPLE=... tools/mutation.sh gaussian|derivatives``: each value is checked against an
independent truth (closed forms of the balanced one-way ANOVA, dense-matrix ``V`` computations in numpy
or finite differences), never against the engine itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

from therapist_effects.engine import gaussian as gs
from therapist_effects.engine.gaussian import BlockEngine

LOG2PI = math.log(2.0 * math.pi)


def _balanced(seed: int, G: int = 9, m: int = 6, tau: float = 1.0):
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(G), m)
    y = 10.0 + tau * rng.normal(size=G)[codes] + rng.normal(size=G * m)
    return y, codes


def _anova(y, codes, G, m):
    means = np.bincount(codes, weights=y) / m
    msb = m * np.sum((means - y.mean()) ** 2) / (G - 1)
    msw = np.sum((y - means[codes]) ** 2) / (G * (m - 1))
    return means, msb, msw


def _intercept_engine(y, codes, G):
    n = len(y)
    return BlockEngine(y, np.ones((n, 1)), np.ones((n, 1)), codes, G)


@pytest.mark.parametrize("seed", [0, 3])
def test_balanced_one_way_reml_and_ml_optima_are_the_anova_closed_forms(seed):
    """REML: sigma2 = MSW, tau2 = (MSB - MSW) / m; ML: tau2 = ((1 - 1/G) MSB - MSW) / m (both interior)."""
    G, m = 9, 6
    y, codes = _balanced(seed, G, m)
    means, msb, msw = _anova(y, codes, G, m)
    assert msb > 2 * msw  # interior optimum for both criteria
    eng = _intercept_engine(y, codes, G)
    theta, fmin, ok = eng.fit(reml=True)
    assert ok
    s2 = eng.scale(theta, True)
    assert s2 == pytest.approx(msw, rel=1e-6)
    assert theta[0] ** 2 * s2 == pytest.approx((msb - msw) / m, rel=1e-5)
    assert fmin == pytest.approx(eng.crit(theta, True), rel=1e-12)
    theta_ml, _, ok = eng.fit(reml=False)
    assert ok
    s2_ml = eng.scale(theta_ml, False)
    assert s2_ml == pytest.approx(msw, rel=1e-6)
    assert theta_ml[0] ** 2 * s2_ml == pytest.approx(((1 - 1 / G) * msb - msw) / m, rel=1e-5)


def test_balanced_fixed_effect_blups_and_ml_deviance_by_hand():
    """GLS mean = grand mean with unscaled variance (1 + m theta^2) / (G m); BLUPs shrink the therapist
    means by m tau2 / (sigma2 + m tau2); dev_ml equals the dense Gaussian log-likelihood."""
    G, m = 7, 5
    y, codes = _balanced(11, G, m, tau=0.8)
    means, _, _ = _anova(y, codes, G, m)
    eng = _intercept_engine(y, codes, G)
    theta = np.array([0.7])
    b, cov, r, bc = eng.fixed(theta)
    assert b[0] == pytest.approx(y.mean(), rel=1e-12)
    assert cov[0, 0] == pytest.approx((1 + m * 0.49) / (G * m), rel=1e-12)
    sigma2 = 1.3
    u, ucov = eng.blups(theta, bc, sigma2)
    tau2 = 0.49 * sigma2
    shrink = m * tau2 / (sigma2 + m * tau2)
    np.testing.assert_allclose(u[:, 0], shrink * (means - y.mean()), rtol=1e-10)
    np.testing.assert_allclose(ucov[:, 0, 0], tau2 * sigma2 / (sigma2 + m * tau2), rtol=1e-10)
    n = G * m
    V = sigma2 * (np.eye(n) + 0.49 * (codes[:, None] == codes[None, :]))
    e = y - y.mean()
    dense = n * LOG2PI + np.linalg.slogdet(V)[1] + e @ np.linalg.solve(V, e)
    assert eng.dev_ml(theta, sigma2) == pytest.approx(dense, rel=1e-12)


# -- the optimisers and finite differences, on functions whose minima and derivatives are known exactly --
A = np.array([[3.0, 1.0, 0.5], [1.0, 2.0, -0.3], [0.5, -0.3, 1.5]])
XSTAR = np.array([0.7, -0.4, 1.2])


def _quartic(x):
    """Quadratic bowl plus a quartic term: minimum at XSTAR, value 1."""
    d = np.asarray(x) - XSTAR
    return float(1.0 + 0.5 * d @ A @ d + 0.1 * d[0] ** 4)


def _quartic_derivs(x):
    d = np.asarray(x) - XSTAR
    g = A @ d + np.array([0.4 * d[0] ** 3, 0.0, 0.0])
    H = A + np.diag([1.2 * d[0] ** 2, 0.0, 0.0])
    return g, H


def test_fd_derivatives_and_gradient_are_exact_on_a_quartic():
    """Richardson-extrapolated central differences are exact (to rounding) for a polynomial of degree 4;
    the Hessian's second differences leave an h^2 error from the quartic term only (coordinate 0)."""
    x = np.array([1.1, 0.3, -0.2])
    h = np.array([1e-3, 2e-3, 1.5e-3])
    g_true, H_true = _quartic_derivs(x)
    g, H = gs._fd_derivatives(_quartic, x, h, [0, 1, 2])
    np.testing.assert_allclose(g, g_true, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(H, H_true, rtol=1e-5, atol=1e-5)
    g2, H2 = gs._fd_derivatives(_quartic, x, h, [0, 2], _quartic(x))
    np.testing.assert_allclose(g2, g_true[[0, 2]], rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(H2, H_true[np.ix_([0, 2], [0, 2])], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gs._fd_gradient(_quartic, x, h), g_true, rtol=1e-7, atol=1e-8)


def test_newton_minimise_reaches_the_minimum_and_hands_back_its_hessian():
    hess: dict = {}
    x, f, ok = gs.newton_minimise(_quartic, XSTAR + 0.3, np.full(3, -5.0), np.full(3, 5.0), hess=hess)
    assert ok
    np.testing.assert_allclose(x, XSTAR, atol=1e-7)
    assert f == pytest.approx(1.0, abs=1e-13)
    np.testing.assert_allclose(hess["H"], A, rtol=0.05, atol=0.05)
    # warm start with that Hessian: BFGS steps from it reach the same point
    x2, _, ok2 = gs.newton_minimise(_quartic, XSTAR - 0.2, np.full(3, -5.0), hess={"H": A.copy()})
    assert ok2
    np.testing.assert_allclose(x2, XSTAR, atol=1e-7)
    # a start outside the box, or a minimum beyond a bound: no answer vouched for
    assert gs.newton_minimise(_quartic, np.full(3, 6.0), np.full(3, -5.0), np.full(3, 5.0))[2] is False
    lows = np.array([1.0, -5.0, -5.0])  # the minimum's x0 = 0.7 lies below the bound
    assert gs.newton_minimise(_quartic, np.array([1.2, 0.0, 1.0]), lows, np.full(3, 5.0))[2] is False


def test_box_minimisers_stop_exactly_on_an_active_bound():
    """With x0 >= 1 the minimum of the bowl is on the face x0 = 1: the other coordinates solve
    A[1:, 1:] d = -A[1:, 0] (1 - 0.7) (the quartic term is constant on the face)."""
    lows = np.array([1.0, -5.0, -5.0])
    ups = np.array([5.0, 5.0, 5.0])
    d0 = 1.0 - XSTAR[0]
    rest = XSTAR[1:] + np.linalg.solve(A[1:, 1:], -A[1:, 0] * d0)
    expect = np.concatenate([[1.0], rest])
    for x, f, ok in (gs.minimise_box(_quartic, np.array([2.0, 0.0, 0.0]), lows, ups),
                     gs.newton_box(lambda z: (_quartic(z), *_quartic_derivs(z)), np.array([2.0, 0.0, 0.0]), lows, ups)):
        assert x[0] == 1.0
        np.testing.assert_allclose(x, expect, atol=1e-6)
        assert f == pytest.approx(_quartic(expect), abs=1e-11)
    assert gs.newton_box(lambda z: (_quartic(z), *_quartic_derivs(z)), np.array([2.0, 0.0, 0.0]), lows, ups)[2]
    # interior minimum: found to ~1e-9 by Nelder-Mead + Newton polish
    x, f, ok = gs.minimise_box(_quartic, np.zeros(3), np.full(3, -5.0), ups)
    assert ok
    np.testing.assert_allclose(x, XSTAR, atol=1e-7)
